"""Warm pools per template (`[pool.templates]`) at the manager level, over the local test
VMM with fake snapshots: hand-out, no double hand-out, refill, a rebuild replacing
members, removal draining the pool, members never outliving their manager, and pools
giving way to sandboxes people ask for under `[limits]`. A template here is what a build
records (an owned hidden checkpoint and a row), made without a build; the real thing is
proven by tests/vm/test_templates.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from arcbox_vm import SandboxManager, SandboxNetworkSpec, SandboxSpec
from arcbox_vm.config import ConfigError, VmmConfig
from arcbox_vm.errors import ResourceExhausted
from arcbox_vm.manager import checkpoints as ckpts
from arcbox_vm.manager.templates import records
from arcbox_vm.models import SandboxState
from tests.support.local_snapshots import SnapshotLocalDriver
from tests.support.local_vmm import alive
from tests.unit.test_manager_local import Rig, ready_sandbox, rig, run, wait_for  # noqa: F401

S = SandboxState
NONE = SandboxNetworkSpec(mode="none")


@pytest.fixture(autouse=True)
def _memory_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCBOX_VM_MEMORY_DIR", str(tmp_path / "shm"))


def pool_manager(rig: Rig, pools: dict[str, int], data: str = "data", **limits: int) -> SandboxManager:
    mgr = rig.manager(data, driver=SnapshotLocalDriver())
    mgr.config.pool.templates = pools
    mgr.config.pool.network = "none"
    for k, v in limits.items():
        setattr(mgr.config.limits, k, v)
    return mgr


async def make_template(mgr: SandboxManager, name: str, who: str) -> str:
    """What a build records: a hidden checkpoint owned by the template, then its row."""
    ctx = mgr._ctx
    sid = await ready_sandbox(mgr, f"build-{who}", env={"WHO": who, "BASE": "t"}, working_dir="/tmp")
    ck = await ckpts.create(ctx, ctx.sandboxes[sid], "", hidden=True, owner=records.owner_of(name))
    await mgr.remove_sandbox(sid)
    info = ck.meta["machine"]
    records.replace(ctx, records.TemplateRecord(name, f"key-{who}", ck.id, time.time(), {
        "network_mode": "none", "vcpus": info["vcpus"], "memory_mib": info["memory_mib"], "env": {"WHO": who},
        "working_dir": "/tmp"}))
    mgr._template_changed(name)
    return ck.id


async def pool_full(mgr: SandboxManager, name: str, n: int, ckpt: str | None = None) -> None:
    def full() -> bool:
        p = mgr.template_pool(name)
        return p is not None and p.ready() == n and len(p.members()) == n and \
            all(m.restored_from == (ckpt or p.snapshot_id) for m in p.members())
    await wait_for(full, timeout=30, what=f"template pool {name} full")


async def test_template_pool_hands_out_once_and_refills(rig: Rig) -> None:
    mgr = pool_manager(rig, {"web": 2})
    await mgr.start()
    assert mgr.pool is None and mgr.template_pool("web").members() == [], "no template yet: nothing to restore"
    ck = await make_template(mgr, "web", "v1")
    await pool_full(mgr, "web", 2, ck)
    assert mgr.list_sandboxes() == [], "members are hidden"
    sub = mgr.subscribe_events()
    t0 = time.monotonic()
    sid, _ = await mgr.create_sandbox(SandboxSpec(id="mine", template="web", labels={"a": "b"}, env={"E": "1"},
                                                  ttl_seconds=600))
    took = time.monotonic() - t0
    info = mgr.inspect_sandbox(sid)
    assert info.state == S.READY and took < 0.1, (info.state, took)
    assert info.labels == {records.TEMPLATE_LABEL: "web", "a": "b"}
    assert (await run(mgr, sid, ["sh", "-c", "echo $WHO $BASE $E; pwd"]))[0] == b"v1 t 1\n/tmp\n"
    assert [(await sub.recv(5)).action for _ in range(2)] == ["created", "ready"]
    pool = mgr.template_pool("web")
    assert pool.handed_out == 1 and mgr.inspect_template("web").in_use == 3
    await pool_full(mgr, "web", 2, ck)  # refilled
    assert [(st.pool, st.size, st.ready, st.handed_out) for st in mgr.pool_stats()] == [("template:web", 2, 2, 1)]

    # three at once from a pool of two: all distinct, two from the pool, one restored
    got = await asyncio.gather(*(mgr.create_sandbox(SandboxSpec(template="web")) for _ in range(3)))
    ids = {g[0] for g in got}
    assert len(ids) == 3 and pool.handed_out == 3
    for i in ids:
        await mgr.wait_ready(i, 15)
    assert len({mgr.inspect_sandbox(i).pid for i in [*ids, sid]}) == 4
    # a default-spec create is not served by a template pool
    other, _ = await mgr.create_sandbox(SandboxSpec(network=NONE))
    await mgr.wait_ready(other, 15)
    assert pool.handed_out == 3


async def test_rebuild_replaces_members_and_rm_drains(rig: Rig) -> None:
    mgr = pool_manager(rig, {"web": 1})
    await mgr.start()
    old = await make_template(mgr, "web", "v1")
    await pool_full(mgr, "web", 1, old)
    [stale] = mgr.template_pool("web").members()
    new = await make_template(mgr, "web", "v2")
    # at once (the pool has not looked yet): the old build's member is not handed out
    sid, _ = await mgr.create_sandbox(SandboxSpec(template="web"))
    await mgr.wait_ready(sid, 15)
    assert mgr._ctx.sandboxes[sid].restored_from == new and stale.id != sid
    assert (await run(mgr, sid, ["sh", "-c", "echo $WHO"]))[0] == b"v2\n"
    await pool_full(mgr, "web", 1, new)
    assert stale.removed and not (mgr.data_dir / "sandboxes" / stale.id).exists()
    assert not (mgr.data_dir / "checkpoints" / old).exists()

    [member] = mgr.template_pool("web").members()
    pid = member.vm.process.pid
    assert mgr.remove_template("web") == 2  # the handed-out sandbox and the member still map it
    await wait_for(lambda: not mgr.template_pool("web").members(), what="the pool drained")
    await wait_for(lambda: not alive(pid), what="the member's VM gone")
    assert sorted(p.name for p in (mgr.data_dir / "sandboxes").iterdir()) == [mgr._ctx.sandboxes[sid].workdir.name]
    assert [p.name for p in (mgr.data_dir / "checkpoints").iterdir()] == []
    assert (await run(mgr, sid, ["true"]))[2] == 0, "sandboxes made from it run on"


async def test_members_do_not_outlive_their_manager_and_the_template_stays(rig: Rig) -> None:
    mgr = pool_manager(rig, {"web": 2})
    await mgr.start()
    ck = await make_template(mgr, "web", "v1")
    await pool_full(mgr, "web", 2, ck)
    kept, _ = await mgr.create_sandbox(SandboxSpec(id="kept", template="web"))
    await pool_full(mgr, "web", 2, ck)
    pids = [m.vm.process.pid for m in mgr.template_pool("web").members()]
    kept_dir = mgr._ctx.sandboxes[kept].workdir.name  # a handed-out member keeps its launch name
    await mgr.close(remove_sandboxes=False)
    for pid in pids:
        await wait_for(lambda pid=pid: not alive(pid), what="pool VMs gone with their manager")
    assert [p.name for p in (mgr.data_dir / "checkpoints").iterdir()] == [ck], "the template's checkpoint is kept"
    assert sorted(p.name for p in (mgr.data_dir / "sandboxes").iterdir()) == [kept_dir]

    mgr2 = pool_manager(rig, {"web": 2})
    await mgr2.start()
    assert [s.id for s in mgr2.list_sandboxes()] == [kept]
    await pool_full(mgr2, "web", 2, ck)  # filled again, from the same template
    assert (await run(mgr2, kept, ["true"]))[2] == 0


async def test_pools_give_way_to_sandboxes_people_ask_for(rig: Rig) -> None:
    mgr = pool_manager(rig, {"web": 2}, max_sandboxes=3)
    await mgr.start()
    ck = await make_template(mgr, "web", "v1")
    await pool_full(mgr, "web", 2, ck)
    a, _ = await mgr.create_sandbox(SandboxSpec(id="a", network=NONE))  # the third slot
    b, _ = await mgr.create_sandbox(SandboxSpec(id="b", network=NONE))  # a member is evicted for it
    c, _ = await mgr.create_sandbox(SandboxSpec(id="c", network=NONE))  # and the other
    for sid in (a, b, c):
        assert (await mgr.wait_ready(sid, 15)).state == S.READY
    assert mgr.template_pool("web").members() == []
    with pytest.raises(ResourceExhausted):
        await mgr.create_sandbox(SandboxSpec(id="d", network=NONE))
    await asyncio.sleep(0.5)
    assert mgr.template_pool("web").members() == [], "a full daemon: the pool waits quietly"
    await mgr.remove_sandbox(c)
    await pool_full(mgr, "web", 1, ck)  # room again


def test_pool_templates_config_is_checked() -> None:
    cfg = VmmConfig.from_dict({"pool": {"size": 1, "templates": {"web": 2, "api.v2": 0}}})
    assert cfg.pool.templates == {"web": 2, "api.v2": 0}
    for bad in ({"Web App": 1}, {"web": 65}, {"web": -1}):
        with pytest.raises(ConfigError, match="pool.templates"):
            VmmConfig.from_dict({"pool": {"templates": bad}})
