"""The API client against the in-process fake server: keep-alive, JSON, both error shapes."""

from __future__ import annotations

import pytest
from fake_firecracker import FakeFirecracker

from arcbox_vm.errors import FirecrackerApiError, VmmError
from arcbox_vm.vmm.firecracker import FirecrackerApi, bodies, parse_error_body


@pytest.fixture
async def fake(short_dir):
    server = FakeFirecracker(short_dir / "api.sock")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def api(fake):
    client = FirecrackerApi(fake.socket_path, timeout=5)
    yield client
    await client.aclose()


async def test_get_returns_json_and_put_returns_none(fake, api) -> None:
    info = await api.get("/")
    assert info == {
        "app_name": "Firecracker",
        "id": "anonymous-instance",
        "state": "Not started",
        "vmm_version": "1.16.1",
    }
    assert (await api.get("/version"))["firecracker_version"] == "1.16.1"
    assert await api.send(bodies.put_machine_config(2, 512)) is None
    assert (await api.get("/machine-config"))["mem_size_mib"] == 512


async def test_one_keep_alive_connection(fake, api) -> None:
    for _ in range(10):
        await api.get("/")
    await api.send(bodies.put_logger(level="Debug"))
    assert fake.connections == 1
    assert len(fake.requests) == 11


@pytest.mark.parametrize(
    "shape,message,expected",
    [
        ("fault_message", "The kernel file cannot be opened", "The kernel file cannot be opened"),
        (
            "error",
            "Request payload with size 60000 is larger than the limit of 51200 allowed by server.",
            "Request payload with size 60000 is larger than the limit of 51200 allowed by server.",
        ),
        ("text", "<html>proxy error</html>", "<html>proxy error</html>"),
        ("empty", "", "(empty response body)"),
    ],
)
async def test_error_shapes(fake, api, shape, message, expected) -> None:
    fake.fail("PUT", "/boot-source", shape=shape, message=message, status=400)
    with pytest.raises(FirecrackerApiError) as info:
        await api.send(bodies.put_boot_source("/vmlinux"))
    err = info.value
    assert (err.method, err.path, err.status, err.fault_message) == ("PUT", "/boot-source", 400, expected)
    assert isinstance(err, VmmError)
    # the connection survives an error response
    assert (await api.get("/"))["state"] == "Not started"


async def test_real_fault_from_the_vmm_layer(fake, api) -> None:
    with pytest.raises(FirecrackerApiError, match="The kernel file cannot be opened") as info:
        await api.send(bodies.put_boot_source("/definitely/not/here/vmlinux"))
    assert info.value.status == 400


async def test_status_413(fake, api) -> None:
    fake.fail("PUT", "/mmds", status=413, message="The MMDS data store size exceeds the limit")
    with pytest.raises(FirecrackerApiError) as info:
        await api.request("PUT", "/mmds", {"a": "b"})
    assert info.value.status == 413


async def test_unreachable_socket_is_a_vmm_error(short_dir) -> None:
    async with FirecrackerApi(short_dir / "nothing.sock", timeout=1) as api:
        with pytest.raises(VmmError, match="could not be sent") as info:
            await api.get("/")
    assert not isinstance(info.value, FirecrackerApiError)


@pytest.mark.parametrize(
    "body,expected",
    [
        (b'{"fault_message": "boom"}', "boom"),
        (b'{"error": "too big"}', "too big"),
        (b'{"fault_message": "", "error": "e"}', "e"),
        (b'{"something": "else"}', '{"something": "else"}'),
        (b"plain text\n", "plain text"),
        (b"", "(empty response body)"),
        (b"\xff\xfe", "\ufffd\ufffd"),
        (b'["a"]', '["a"]'),
    ],
)
def test_parse_error_body(body, expected) -> None:
    assert parse_error_body(body) == expected
