"""The Firecracker driver against a real `firecracker` (collected only when one is configured).

Environment (as in the original's e2e tests):

    FC_BINARY   path to the firecracker binary
    FC_KERNEL   guest kernel, uncompressed ELF vmlinux
    FC_ROOTFS   ext4 root filesystem with the arcbox agent at /sbin/vm-agent
    FC_INITRD   optional initramfs (the project's image builder makes one)
    FC_BOOT_TIMEOUT  seconds to wait for the agent's HELLO (default 60)

The tests launch a VM through `FirecrackerDriver` with the agent endpoint listening and wait
for the agent's first bytes (a HELLO frame) on the endpoint socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

import pytest

from arcbox_vm.agent.protocol import FrameDecoder, MsgType
from arcbox_vm.errors import FirecrackerApiError
from arcbox_vm.ports import MachineSpec
from arcbox_vm.vmm.firecracker import FirecrackerApi, FirecrackerConfig, FirecrackerDriver, firecracker_usable
from arcbox_vm.vmm.firecracker.cmdline import firecracker_argv
from arcbox_vm.vmm.firecracker.layout import layout_for
from arcbox_vm.vmm.firecracker.waits import wait_for_api_socket
from arcbox_vm.vmm.process import TrackedProcess, tail

pytestmark = pytest.mark.firecracker

BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd init=/sbin/vm-agent"


def need(*names: str) -> dict[str, str]:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        pytest.skip(
            f"real Firecracker test: environment variable{'s' if len(missing) > 1 else ''} {', '.join(missing)} not set"
        )
    return {n: os.environ[n] for n in names}


@pytest.fixture
def fc_vm(tmp_path: Path):
    env = need("FC_BINARY", "FC_KERNEL", "FC_ROOTFS")
    ok, why = firecracker_usable(env["FC_BINARY"], kernel=env["FC_KERNEL"])
    if not ok:
        pytest.fail(f"FC_BINARY/FC_KERNEL are set but Firecracker cannot run here: {why}")
    workdir = tmp_path / "vm"
    workdir.mkdir()
    rootfs = tmp_path / "rootfs.ext4"
    shutil.copyfile(env["FC_ROOTFS"], rootfs)  # the VM's own writable disk
    return env, workdir, rootfs


async def test_boot_until_agent_hello(fc_vm) -> None:
    env, workdir, rootfs = fc_vm
    driver = FirecrackerDriver(FirecrackerConfig(binary=env["FC_BINARY"], log_level="Info", socket_timeout_secs=15))
    endpoint = driver.agent_endpoint(workdir)
    received = bytearray()
    got = asyncio.Event()

    async def on_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            received.extend(chunk)
            got.set()
        writer.close()

    server = await asyncio.start_unix_server(on_agent, path=str(endpoint.listen_path))
    spec = MachineSpec(
        sandbox_id="fc-real-test",
        workdir=workdir,
        kernel=Path(env["FC_KERNEL"]),
        rootfs=rootfs,
        boot_args=BOOT_ARGS,
        vcpus=1,
        memory_mib=256,
        initrd=Path(os.environ["FC_INITRD"]) if os.environ.get("FC_INITRD") else None,
        extra_boot_args=("arcbox.hostname=fc-real-test",),
    )
    proc = await driver.launch(spec, endpoint)
    try:
        timeout = float(os.environ.get("FC_BOOT_TIMEOUT", "60"))
        exited = asyncio.ensure_future(proc.wait())
        waiter = asyncio.ensure_future(got.wait())
        done, _ = await asyncio.wait({exited, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if exited in done:
            pytest.fail(f"{proc.describe_exit()}\nconsole:\n{tail(proc.console_log, 40)}")
        if not received:
            pytest.fail(
                f"no bytes from the agent within {timeout:g}s\nconsole:\n{tail(proc.console_log, 40)}"
            )
        for _ in range(50):  # a HELLO may arrive in more than one read
            frames = [f for f in FrameDecoder().feed(bytes(received)) if hasattr(f, "type")]
            if frames:
                break
            await asyncio.sleep(0.1)
        assert frames, f"undecodable bytes from the agent: {bytes(received[:64])!r}"
        assert frames[0].type == MsgType.HELLO
        assert "proto" in frames[0].json()
        await proc.request_stop()  # Ctrl+Alt+Del; whether the guest acts on it is up to its init
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(exited), 10)
    finally:
        await proc.kill()
        await proc.cleanup()
        server.close()
    assert sorted(p.name for p in workdir.iterdir() if p != endpoint.listen_path) == []


async def test_real_error_shapes(tmp_path: Path) -> None:
    """Both error bodies of a real Firecracker parse into FirecrackerApiError."""
    env = need("FC_BINARY")
    cfg = FirecrackerConfig(binary=env["FC_BINARY"], http_api_max_payload_size=256, socket_timeout_secs=15)
    layout = layout_for(cfg, tmp_path)
    handle = await TrackedProcess.spawn(firecracker_argv(cfg, layout, "fc-err-test"), layout.console_log,
                                        name="Firecracker", truncate=True)
    try:
        await wait_for_api_socket(layout.api_socket, handle, 15, lambda: "")
        async with FirecrackerApi(layout.api_socket) as api:
            assert (await api.get("/"))["app_name"] == "Firecracker"
            with pytest.raises(FirecrackerApiError) as info:  # VMM layer: {"fault_message": ...}
                await api.request("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v"), "bogus": 1})
            assert info.value.status == 400 and "bogus" in info.value.fault_message
        async with FirecrackerApi(layout.api_socket) as api:
            with pytest.raises(FirecrackerApiError) as info:  # HTTP layer: {"error": ...}
                await api.request("PUT", "/boot-source", {"kernel_image_path": "/x" * 200})
            assert "larger than the limit" in info.value.fault_message
    finally:
        await handle.kill()
