"""Egress policies through the whole stack but a VM: the Python client, real gRPC, the
daemon, the manager and the real TapNetwork (TAPs and our nftables table in a namespace
this test creates), over the local VMM double. No packet is sent (test_firewall_netns.py
and tests/vm/test_network_policy.py send them)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from arcbox_vm.client import AsyncClient
from arcbox_vm.config import NetworkConfig
from arcbox_vm.errors import ArcboxError, InvalidArgument
from tests.unit.test_daemon_local import Daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft")


def nft(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *args], capture_output=True, text=True).stdout


@pytest.fixture
def netns():
    name = f"arcbox-t-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


async def test_policy_over_grpc_survives_a_restart(tmp_path: Path, netns: str, monkeypatch: pytest.MonkeyPatch):
    runtime = Path(tempfile.mkdtemp(prefix="abx"))
    monkeypatch.setenv("ARCBOX_VM_RUNTIME_DIR", str(runtime))
    daemons: list[Daemon] = []

    def daemon() -> Daemon:
        d = Daemon(tmp_path, runtime, "leave")
        d.config.network = NetworkConfig(cidr="10.231.0.0/24", gateway="10.231.0.1", netns=netns)
        daemons.append(d)
        return d

    try:
        d = await daemon().start()
        async with AsyncClient(socket=d.socket) as client:
            created = await client.create(id="pol", egress="none", allow_out=["1.1.1.1", "10.9.0.0/16"],
                                          deny_out=["10.9.9.0/24"])
            await client.wait_ready("pol", 30)
            net = (await client.inspect("pol")).network
            assert (net.ip_address, net.egress, net.allow_out, net.deny_out) == \
                (created.ip_address, "none", ("1.1.1.1/32", "10.9.0.0/16"), ("10.9.9.0/24",))
            table = nft(netns, "list", "table", "inet", d.manager.adapters.network.table)
            assert "10.9.9.0/24" in table and f"{created.ip_address} . 06:00:" in table

            info = await client.update_network("pol", egress="nat", allow_out=[])
            assert (info.network.egress, info.network.allow_out, info.network.deny_out) == ("nat", (), ("10.9.9.0/24",))
            with pytest.raises(InvalidArgument, match="allow_out"):
                await client.update_network("pol", allow_out=["10.0.0.1/8"])
            with pytest.raises(InvalidArgument, match="egress"):
                await client.update_network("pol", egress="all")  # type: ignore[arg-type]
            await client.create(id="nonet", network="none")
            with pytest.raises(ArcboxError, match="without a network"):
                await client.update_network("nonet", egress="nat")
            await client.remove("nonet", force=True)
        await d.stop()  # on_shutdown "leave": the VM (here: its agent process) keeps running

        d = await daemon().start()
        async with AsyncClient(socket=d.socket) as client:
            net = (await client.inspect("pol")).network
            assert (net.egress, net.allow_out, net.deny_out) == ("nat", (), ("10.9.9.0/24",)), "recorded"
            table = nft(netns, "list", "table", "inet", d.manager.adapters.network.table)
            assert "10.9.9.0/24" in table and "1.1.1.1" not in table, "re-applied at start"
            await client.remove("pol", force=True)
        await d.stop()
        await d.manager.close()
        assert "arcbox_vm_" not in nft(netns, "list", "tables")
    finally:
        for d in daemons:
            with contextlib.suppress(Exception):
                await d.stop()
            if d.manager is not None:
                await d.manager.close()
        shutil.rmtree(runtime, ignore_errors=True)
