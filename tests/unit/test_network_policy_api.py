"""The egress policy through every layer but the kernel: the manager's update (on a fake
network port), the record, the gRPC conversions both ways, the client's requests and the
CLI's argument checks. No VM, no TAP."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from arcbox_vm.api import convert
from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.cli.main import app
from arcbox_vm.client import convert as client_convert
from arcbox_vm.config import VmmConfig
from arcbox_vm.errors import ArcboxError, InvalidArgument, InvalidState
from arcbox_vm.manager import network_policy
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.models import SandboxInfo, SandboxNetworkInfo, SandboxNetworkSpec, SandboxState
from arcbox_vm.ports import Adapters, EgressPolicy, NetworkLease
from arcbox_vm.storage.state import StateStore

LEASE = NetworkLease("172.20.0.2", "172.20.0.1", "255.255.0.0", "ab1a2b-2", "06:00:ac:14:00:02", ("ip=...",))


class FakeNetwork:
    netns = ""

    def __init__(self, fail: bool = False) -> None:
        self.applied: list[tuple[NetworkLease, EgressPolicy | None]] = []
        self.fail = fail

    async def set_policy(self, lease: NetworkLease, policy: EgressPolicy | None) -> None:
        if self.fail:
            raise ArcboxError("nft failed: no")
        self.applied.append((lease, policy))


def context(tmp_path, network: FakeNetwork, **net: object) -> ManagerContext:
    cfg = VmmConfig(firecracker={"data_dir": str(tmp_path)}, network=net)
    store = StateStore(tmp_path)
    store.open()
    adapters = Adapters(select_driver=lambda: None, network=network, store=store, images=None,  # type: ignore[arg-type]
                        cgroups=None, clone_disk=None)  # type: ignore[arg-type]
    return ManagerContext(cfg, adapters)


def record(tmp_path, mode: str = "tap", lease: NetworkLease | None = LEASE,
           egress: EgressPolicy | None = EgressPolicy("none", ("1.1.1.1/32",))) -> SandboxRecord:
    return SandboxRecord(id="sb-1", labels={}, vcpus=1, memory_mib=256, kernel="k", rootfs="r", initrd="", boot_args="",
                         env={}, working_dir="", user="", ttl_seconds=0, network_mode=mode,
                         workdir=tmp_path / "sandboxes" / "sb-1", state=SandboxState.READY, lease=lease, egress=egress)


def stored(ctx: ManagerContext) -> SandboxRecord:
    (row,) = ctx.store.sandboxes()
    return SandboxRecord.from_row(row)


async def test_update_applies_then_records_and_keeps_what_is_not_given(tmp_path):
    net = FakeNetwork()
    ctx = context(tmp_path, net)
    sb = record(tmp_path)
    new = await network_policy.update(ctx, sb, deny_out=["9.9.9.9"])
    assert new == EgressPolicy("none", ("1.1.1.1/32",), ("9.9.9.9/32",))
    assert net.applied == [(LEASE, new)]
    assert stored(ctx).egress == new, "the record keeps it for a restarted daemon"
    new = await network_policy.update(ctx, sb, egress="nat", allow_out=[])
    assert new == EgressPolicy("nat", (), ("9.9.9.9/32",))
    assert stored(ctx).egress == new and sb.info().network.egress == "nat"


async def test_update_of_a_stopped_sandbox_only_records(tmp_path):
    net = FakeNetwork()
    ctx = context(tmp_path, net)
    sb = record(tmp_path, lease=None)
    await network_policy.update(ctx, sb, egress="nat")
    assert net.applied == [] and stored(ctx).egress == EgressPolicy("nat", ("1.1.1.1/32",))


async def test_update_refuses_bad_input_before_touching_anything(tmp_path):
    net = FakeNetwork()
    ctx = context(tmp_path, net)
    sb = record(tmp_path)
    with pytest.raises(InvalidArgument, match="allow_out: '10.0.0.1/8'"):
        await network_policy.update(ctx, sb, allow_out=["10.0.0.1/8"])
    with pytest.raises(InvalidArgument, match="egress"):
        await network_policy.update(ctx, sb, egress="open")
    with pytest.raises(InvalidState, match="without a network"):
        await network_policy.update(ctx, record(tmp_path, mode="none", lease=None, egress=None), egress="nat")
    assert net.applied == [] and ctx.store.sandboxes() == []


async def test_a_failed_apply_changes_nothing(tmp_path):
    ctx = context(tmp_path, FakeNetwork(fail=True))
    sb = record(tmp_path)
    with pytest.raises(ArcboxError, match="nft failed"):
        await network_policy.update(ctx, sb, egress="nat")
    assert sb.egress == EgressPolicy("none", ("1.1.1.1/32",)) and ctx.store.sandboxes() == []


async def test_no_recorded_policy_starts_from_the_configured_default(tmp_path):
    net = FakeNetwork()
    ctx = context(tmp_path, net, default_egress="nat")
    sb = record(tmp_path, egress=None)  # a record of an older version
    assert (await network_policy.update(ctx, sb, deny_out=["8.8.8.8/32"])).egress == "nat"


def test_resolve_uses_the_default_only_when_unset():
    assert network_policy.resolve(SandboxNetworkSpec(), "nat") == EgressPolicy("nat")
    assert network_policy.resolve(SandboxNetworkSpec(egress="none", allow_out=["1.2.3.4"]), "nat") == \
        EgressPolicy("none", ("1.2.3.4/32",))


def test_record_round_trip_and_older_records(tmp_path):
    sb = record(tmp_path, egress=EgressPolicy("nat", (), ("10.0.0.0/8",)))
    row = sb.to_row()
    assert json.loads(row["spec"])["egress"] == {"egress": "nat", "allow_out": [], "deny_out": ["10.0.0.0/8"]}
    again = SandboxRecord.from_row({**row, "removing": 0})
    assert again.egress == sb.egress
    old_spec = {k: v for k, v in json.loads(row["spec"]).items() if k != "egress"}
    assert SandboxRecord.from_row({**row, "spec": json.dumps(old_spec), "removing": 0}).egress is None


# -- gRPC --------------------------------------------------------------------------------


def test_create_request_network_fields():
    spec = convert.spec_from_create(pb.CreateSandboxRequest(network=pb.NetworkSpec(
        egress="none", allow_out=["10.1.0.0/16", "1.1.1.1"], deny_out=["10.1.2.0/24"])))
    assert spec.network == SandboxNetworkSpec(egress="none", allow_out=["1.1.1.1/32", "10.1.0.0/16"],
                                              deny_out=["10.1.2.0/24"])
    assert convert.spec_from_create(pb.CreateSandboxRequest()).network == SandboxNetworkSpec()


@pytest.mark.parametrize("net, match", [
    (pb.NetworkSpec(egress="all"), "egress"),
    (pb.NetworkSpec(allow_out=["nope"]), "allow_out"),
    (pb.NetworkSpec(mode="none", egress="nat"), "mode 'tap'"),
])
def test_create_request_refuses(net, match):
    with pytest.raises(InvalidArgument, match=match):
        convert.spec_from_create(pb.CreateSandboxRequest(network=net))


def test_update_request_unset_keeps_set_replaces():
    assert convert.network_update(pb.UpdateNetworkRequest(id="x")) == \
        {"egress": None, "allow_out": None, "deny_out": None}
    req = client_convert.network_update_to_pb("x", "nat", [], ["1.0.0.0/8"])
    assert convert.network_update(pb.UpdateNetworkRequest.FromString(req.SerializeToString())) == \
        {"egress": "nat", "allow_out": [], "deny_out": ["1.0.0.0/8"]}


def test_info_carries_the_policy_both_ways():
    info = SandboxInfo(id="sb", state=SandboxState.READY, labels={}, vcpus=1, memory_mib=256,
                       network=SandboxNetworkInfo("172.20.0.2", "172.20.0.1", "ab1a2b-2", "none", ("1.1.1.1/32",),
                                                  ("1.1.1.0/24",)), created_at=1.0)
    back = client_convert.info_from_pb(convert.info(info))
    assert back.network == info.network


def test_client_create_sends_a_network_only_when_needed():
    assert client_convert.network_spec_to_pb(None, None, (), ()) is None
    msg = client_convert.network_spec_to_pb(None, "nat", (), ["10.0.0.0/8"])
    assert (msg.mode, msg.egress, list(msg.deny_out)) == ("", "nat", ["10.0.0.0/8"])
    with pytest.raises(InvalidArgument, match="allow_out"):
        client_convert.network_spec_to_pb(None, None, "10.0.0.0/8", ())


# -- CLI (argument checks happen before any connection) -------------------------------------


@pytest.mark.parametrize("args, match", [
    (["update", "sb"], "nothing to update"),
    (["update", "sb", "--egress", "all"], "--egress"),
    (["update", "sb", "--allow-out", "1.1.1.1/32", "--clear-allow-out"], "not both"),
    (["create", "--egress", "open"], "--egress"),
])
def test_cli_refuses(args, match):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and match in res.output, res.output


def test_cli_help_names_the_options():
    out = CliRunner().invoke(app, ["create", "--help"], env={"COLUMNS": "200"}).output
    assert "--egress" in out and "--allow-out" in out and "--deny-out" in out
    out = CliRunner().invoke(app, ["update", "--help"], env={"COLUMNS": "200"}).output
    assert "--clear-allow-out" in out


# -- TapNetwork's bookkeeping (nft and netlink replaced by recorders) ------------------------


class Recorder:
    def __init__(self, monkeypatch, fail_on: str = "") -> None:  # noqa: ANN001
        from arcbox_vm.network import firewall, tap

        self.scripts: list[str] = []
        self.taps: set[str] = set()
        self.forwarding = 0

        async def nft(netns: str, script: str, check: bool = True) -> tuple[int, str]:
            if fail_on and fail_on in script:
                raise ArcboxError("nft failed: injected")
            self.scripts.append(script)
            return 0, ""

        async def enable_forwarding(netns: str) -> None:
            self.forwarding += 1

        async def create_tap(netns: str, name: str, gateway: str, ip: str) -> None:
            self.taps.add(name)

        async def delete_tap(netns: str, name: str) -> None:
            self.taps.discard(name)

        async def list_taps(netns: str, prefix: str) -> list[str]:
            return sorted(self.taps)

        monkeypatch.setattr(firewall, "nft", nft)
        monkeypatch.setattr(firewall, "enable_forwarding", enable_forwarding)
        monkeypatch.setattr(tap, "create_tap", create_tap)
        monkeypatch.setattr(tap, "delete_tap", delete_tap)
        monkeypatch.setattr(tap, "list_taps", list_taps)


def tap_network(tmp_path, **net: object):  # noqa: ANN201
    from arcbox_vm.config.sections import NetworkConfig
    from arcbox_vm.network.backend import TapNetwork

    return TapNetwork(NetworkConfig(cidr="10.231.0.0/24", gateway="10.231.0.1", **net), tmp_path)


async def test_tap_network_lease_rules_follow_the_lease(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    net = tap_network(tmp_path)
    await net.start()
    assert rec.scripts[0].startswith(f"add table inet {net.table}\ndelete table inet {net.table}")
    lease = await net.allocate("sb-1", EgressPolicy("none", ("1.1.1.1/32",)))
    assert lease.tap_name in rec.taps and f"{lease.ip} . {lease.mac}" in rec.scripts[-1]
    assert rec.forwarding == 1, "allow_out lets something leave: forwarding on (once)"
    await net.set_policy(lease, EgressPolicy("nat"))
    assert rec.forwarding == 1 and rec.scripts[-1].rstrip().endswith(f"jump sb_{lease.tap_name.replace('-', '_')} }}")
    await net.release(lease)
    assert "delete chain" in rec.scripts[-1] and lease.tap_name not in rec.taps
    n = len(rec.scripts)
    await net.set_policy(lease, EgressPolicy("nat"))  # an update that lost the race with a release
    assert len(rec.scripts) == n, "a released lease's rules are never re-added"
    await net.close()
    assert rec.scripts[-1].startswith(f"add table inet {net.table}\ndelete table inet {net.table}")


async def test_tap_network_failed_rules_undo_the_lease(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch, fail_on="add rule")
    net = tap_network(tmp_path)
    await net.start()
    with pytest.raises(ArcboxError, match="injected"):
        await net.allocate("sb-1")
    assert rec.taps == set() and net.pool.leases() == {}, "no TAP, no address held"
    assert rec.forwarding == 0, "egress none with no allow_out never turns forwarding on"


async def test_tap_network_start_adopts_in_one_transaction(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    net = tap_network(tmp_path, default_egress="nat")
    kept = NetworkLease("10.231.0.2", "10.231.0.1", "255.255.255.0", f"{net.tap_prefix}2", "06:00:0a:e7:00:02", ())
    rec.taps = {kept.tap_name, f"{net.tap_prefix}9"}
    await net.start(keep_taps={kept.tap_name}, adopted=[(kept, None)])
    assert rec.taps == {kept.tap_name}, "the TAP nobody owns is gone"
    (script,) = rec.scripts
    assert f"table inet {net.table} {{" in script and f'"{kept.tap_name}" . 10.231.0.2' in script
    assert "sb_" + kept.tap_name.replace("-", "_") + " accept" in script, "no recorded policy = the default (nat)"
    assert rec.forwarding == 1
