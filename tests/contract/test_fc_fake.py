"""The fake Firecracker itself follows the contract (so passing against it means something)."""

from __future__ import annotations

import os
import socket
import stat

import httpx
import pytest
from fake_firecracker import FakeFirecracker

from arcbox_vm.errors import FirecrackerApiError
from arcbox_vm.vmm.firecracker import FirecrackerApi, bodies


@pytest.fixture
async def fake(short_dir):
    kernel = short_dir / "vmlinux"
    kernel.write_bytes(b"k")
    disk = short_dir / "disk"
    disk.write_bytes(b"d")
    server = FakeFirecracker(short_dir / "api.sock")
    server.kernel, server.disk = kernel, disk
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def api(fake):
    client = FirecrackerApi(fake.socket_path, timeout=5)
    yield client
    await client.aclose()


async def boot(fake, api) -> None:
    await api.send(bodies.put_boot_source(str(fake.kernel)))
    await api.send(bodies.put_drive("rootfs", str(fake.disk), is_root_device=True, is_read_only=False))
    await api.send(bodies.instance_start())


async def expect_fault(coro, text: str) -> None:
    with pytest.raises(FirecrackerApiError) as info:
        await coro
    assert text in info.value.fault_message
    assert info.value.status == 400


async def test_phase_rules(fake, api) -> None:
    await expect_fault(api.send(bodies.send_ctrl_alt_del()), "not supported before starting")
    await expect_fault(api.send(bodies.pause_vm()), "not supported before starting")
    await expect_fault(api.send(bodies.patch_drive("rootfs")), "not supported before starting")
    await expect_fault(api.send(bodies.instance_start()), "without kernel configuration")
    await boot(fake, api)
    await expect_fault(api.send(bodies.instance_start()), "not supported after starting")
    await expect_fault(api.send(bodies.put_machine_config(1, 128)), "not supported after starting")
    await expect_fault(api.send(bodies.put_boot_source(str(fake.kernel))), "not supported after starting")
    await expect_fault(api.send(bodies.put_vsock(3, "/x")), "not supported after starting")
    await expect_fault(
        api.send(bodies.put_drive("d2", str(fake.disk), is_root_device=False, is_read_only=True)),
        "not supported after starting",
    )  # hot-plug needs --enable-pci
    await api.send(bodies.patch_drive("rootfs", path_on_host=str(fake.disk)))
    await api.send(bodies.pause_vm())
    assert (await api.get("/"))["state"] == "Paused"


async def test_ids_and_schema(fake, api) -> None:
    await expect_fault(
        api.request("PUT", "/drives/root-fs", {"drive_id": "root-fs", "is_root_device": True}),
        "alphanumeric characters and underscores",
    )
    await expect_fault(
        api.request(
            "PUT",
            "/drives/a",
            {"drive_id": "b", "path_on_host": str(fake.disk), "is_root_device": True, "is_read_only": False},
        ),
        "does not match the id from the body",
    )
    await expect_fault(
        api.request("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/x", "vsock_idd": "a"}),
        "Additional properties are not allowed",
    )
    await expect_fault(
        api.request("PUT", "/metrics", {"metrics_path": "/m", "emit_id": True}), "firecracker.yaml@v1.16.1"
    )  # HEAD-only field: rejected by the release
    await expect_fault(api.request("PUT", "/nope", {"a": 1}), "Invalid request method and/or path")
    await expect_fault(api.request("DELETE", "/vsock"), "Invalid request method and/or path")
    await expect_fault(api.request("PUT", "/logger"), "Empty PUT request")
    assert all(r.status == 400 for r in fake.requests)


async def test_metrics_only_once_and_one_root(fake, api, short_dir) -> None:
    await api.send(bodies.put_metrics(str(short_dir / "m")))
    await expect_fault(api.send(bodies.put_metrics(str(short_dir / "m"))), "Reinitialization of metrics")
    await api.send(bodies.put_drive("rootfs", str(fake.disk), is_root_device=True, is_read_only=False))
    await expect_fault(
        api.send(bodies.put_drive("r2", str(fake.disk), is_root_device=True, is_read_only=False)),
        "root block device already exists",
    )


async def test_vsock_binds_uds_path(fake, api, short_dir) -> None:
    uds = short_dir / "v.sock"
    await api.send(bodies.put_vsock(3, str(uds)))
    assert stat.S_ISSOCK(os.stat(uds).st_mode)
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(uds))  # listening
    s.close()
    other = short_dir / "taken.sock"
    other.write_bytes(b"")
    await expect_fault(api.send(bodies.put_vsock(3, str(other))), "AddrInUse")


async def test_get_with_body_and_chunked(fake) -> None:
    transport = httpx.AsyncHTTPTransport(uds=str(fake.socket_path))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        r = await client.request("GET", "/", content=b'{"a":1}')
        assert r.status_code == 400 and r.json() == {"fault_message": "GET request cannot have a body."}

        async def gen():
            yield b'{"action_type":'
            yield b'"InstanceStart"}'

        r = await client.put("/actions", content=gen())  # streaming body -> chunked
        assert r.status_code == 400 and "error" in r.json()


async def test_payload_limit(short_dir) -> None:
    server = FakeFirecracker(short_dir / "small.sock", max_payload=64)
    await server.start()
    try:
        async with FirecrackerApi(server.socket_path) as api:
            with pytest.raises(FirecrackerApiError) as info:
                await api.send(bodies.put_boot_source("/k", boot_args="x" * 100))
        assert "larger than the limit of 64 allowed by server" in info.value.fault_message
    finally:
        await server.stop()
