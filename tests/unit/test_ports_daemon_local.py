"""Port forwarding through the daemon over the local VMM test double: the Python client's
`create(ports=...)`, Inspect's ports, the status codes of bad mappings and of a host port in
use, and the CLI's `create -p` and `port` (as subprocesses, against the in-process daemon).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

import grpc
import pytest
from test_daemon_local import daemon_factory  # noqa: F401 - a fixture
from test_ports_local import GuestServer, free_port, guest_server, refused, roundtrip

from arcbox_vm import PortMapping
from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.api.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from arcbox_vm.client import AsyncClient
from arcbox_vm.errors import HostPortUnavailable, InvalidArgument, ResourceExhausted, SandboxNotFound
from tests.support.local_vmm import SRC_DIR


async def cli(daemon, *args: str) -> tuple[int, str, str]:  # noqa: ANN001
    """`arcbox-vm ARGS --socket <the daemon's>` in a subprocess (our loop keeps serving)."""
    env = dict(os.environ, PYTHONPATH=str(SRC_DIR))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arcbox_vm.cli.main", *args, "--socket", str(daemon.socket), env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_client_create_with_ports_inspect_and_errors(daemon_factory) -> None:  # noqa: F811
    d = await daemon_factory("remove").start()
    srv = await guest_server()
    fixed = free_port()
    async with AsyncClient(socket=d.socket) as client:
        await client.create(id="pc", network="none", ports=[str(srv.port), PortMapping(srv.port, fixed)])
        await client.wait_ready("pc", 15)
        info = await client.inspect("pc")
        chosen, given = info.ports
        assert chosen.guest_port == srv.port and chosen.host_port not in (0, fixed)
        assert given == PortMapping(srv.port, fixed, "127.0.0.1", "tcp")
        assert await roundtrip(chosen.host_port, b"through the daemon") == b"through the daemon"
        assert await roundtrip(fixed, b"and the fixed port") == b"and the fixed port"

        with pytest.raises(HostPortUnavailable) as err:  # the client rebuilds the daemon's error class
            await client.create(id="pc2", network="none", ports=[f"{fixed}:{srv.port}"])
        assert isinstance(err.value, ResourceExhausted) and f"127.0.0.1:{fixed} is in use" in str(err.value)
        with pytest.raises(SandboxNotFound):
            await client.inspect("pc2")
        with pytest.raises(InvalidArgument, match="IPv6 address in brackets"):
            await client.create(id="pc3", ports=["1:2:3:4"])  # refused by the client already

        stub = pb_grpc.SandboxServiceStub(grpc.aio.insecure_channel(f"unix:{d.socket}"))
        for bad, why in (
            (pb.PortMapping(guest_port=0), "guest_port must be a port number"),
            (pb.PortMapping(guest_port=80, host_port=70000), "host_port must be a port number"),
            (pb.PortMapping(guest_port=80, protocol="udp"), "only tcp"),
            (pb.PortMapping(guest_port=80, host_addr="localhost"), "host_addr must be an IP address"),
            (pb.PortMapping(guest_port=80, host_addr="192.0.2.1"), "not an address of this host"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as rpc:
                await stub.Create(pb.CreateSandboxRequest(id="bad", network=pb.NetworkSpec(mode="none"), ports=[bad]))
            assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, rpc.value.details())
            assert why in rpc.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as rpc:
            await stub.Create(pb.CreateSandboxRequest(id="bad", network=pb.NetworkSpec(mode="none"),
                                                      ports=[pb.PortMapping(guest_port=80, host_port=fixed)]))
        assert rpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(rpc.value.trailing_metadata())["arcbox-error"] == "HostPortUnavailable"
        msg = await stub.Inspect(pb.InspectSandboxRequest(id="pc"))
        assert [(m.host_addr, m.host_port, m.guest_port, m.protocol) for m in msg.ports] == [
            ("127.0.0.1", chosen.host_port, srv.port, "tcp"), ("127.0.0.1", fixed, srv.port, "tcp")]
        await client.remove("pc")
    assert refused(fixed) and refused(chosen.host_port)
    srv.close()


async def test_cli_create_p_and_port(daemon_factory) -> None:  # noqa: F811
    d = await daemon_factory("remove").start()
    srv: GuestServer = await guest_server()
    fixed = free_port()
    code, out, err = await cli(d, "create", "--id", "clip", "--network", "none", "--timeout", "15",
                               "-p", f"127.0.0.1::{srv.port}", "-p", f"{fixed}:{srv.port}/tcp")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "clip"

    code, out, err = await cli(d, "port", "clip")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[1] == f"{srv.port}/tcp -> 127.0.0.1:{fixed}"
    chosen = int(lines[0].rpartition(":")[2])
    assert lines[0] == f"{srv.port}/tcp -> 127.0.0.1:{chosen}" and chosen != fixed
    assert await roundtrip(chosen, b"via the cli's mapping") == b"via the cli's mapping"

    code, out, _ = await cli(d, "port", "clip", f"{srv.port}/tcp")
    assert (code, out.splitlines()) == (0, [f"127.0.0.1:{chosen}", f"127.0.0.1:{fixed}"])
    code, out, err = await cli(d, "port", "clip", "9")
    assert code == 1 and out == "" and "no forwarded port 9/tcp" in err

    code, out, err = await cli(d, "inspect", "clip")
    assert code == 0, err
    assert json.loads(out)["ports"] == [
        {"guest_port": srv.port, "host_port": chosen, "host_addr": "127.0.0.1", "protocol": "tcp"},
        {"guest_port": srv.port, "host_port": fixed, "host_addr": "127.0.0.1", "protocol": "tcp"}]

    busy = socket.create_server(("127.0.0.1", 0))
    code, out, err = await cli(d, "create", "--id", "clip2", "--network", "none", "-p",
                               f"{busy.getsockname()[1]}:80")
    busy.close()
    assert code == 1 and "is in use" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = await cli(d, "create", "--network", "none", "-p", "80:80:80:80")
    assert code == 1 and "-p '80:80:80:80'" in err, err

    code, _, err = await cli(d, "rm", "-f", "clip")
    assert code == 0, err
    assert refused(fixed) and refused(chosen)
    srv.close()
