"""Checkpoint, restore, fork, pause and resume at the manager level, over the local test
VMM with fake snapshots (tests/support/local_snapshots.py): records, the files a
checkpoint and its restores hold, durability across restarts, errors that leave nothing
half-made. The VM side (memory, processes and files carried over, re-addressing, the
clock) is proven by tests/vm/test_snapshots.py."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from arcbox_vm import RestoreSandboxSpec, SandboxManager, SandboxNetworkSpec, SandboxSpec
from arcbox_vm.errors import (
    CheckpointNotFound,
    InvalidArgument,
    InvalidState,
    SandboxAlreadyExists,
    SandboxNotFound,
    SnapshotsUnsupported,
    VmmError,
)
from arcbox_vm.metrics.collector import SandboxCollector
from arcbox_vm.models import SandboxState
from arcbox_vm.paths import memory_dir, socket_dir
from tests.support.local_snapshots import MEM_BYTES, SnapshotLocalDriver
from tests.support.local_vmm import LocalDriver, alive
from tests.unit.test_manager_local import Rig, next_event, ready_sandbox, rig, run, wait_for  # noqa: F401

S = SandboxState


@pytest.fixture(autouse=True)
def _memory_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCBOX_VM_MEMORY_DIR", str(tmp_path / "shm"))


def manager(rig: Rig, data: str = "data", driver: SnapshotLocalDriver | None = None, **agent: float) -> SandboxManager:
    return rig.manager(data, driver=driver or SnapshotLocalDriver(), **agent)


def ckpt_dir(mgr: SandboxManager, cid: str) -> Path:
    return mgr.data_dir / "checkpoints" / cid


def leftovers(mgr: SandboxManager, sid: str) -> list[str]:
    workdir = mgr.data_dir / "sandboxes" / sid
    return [str(p) for p in (workdir, socket_dir(workdir), memory_dir(workdir)) if p.exists()]


async def test_checkpoint_restore_two_at_once_then_delete(rig: Rig) -> None:
    mgr = manager(rig)
    src = await ready_sandbox(mgr, "src", env={"WHO": "src"}, user="", working_dir="")
    sub = mgr.subscribe_events(sandbox_id=src)
    info = await mgr.checkpoint_sandbox(src, "first")
    assert info.sandbox_id == src and info.name == "first" and info.size_bytes >= MEM_BYTES
    ev = await next_event(sub, "checkpointed")
    assert ev.attributes["snapshot_id"] == info.snapshot_id
    assert (await run(mgr, src, ["true"]))[2] == 0, "the source runs on"
    files = sorted(p.name for p in ckpt_dir(mgr, info.snapshot_id).iterdir())
    assert files == ["disk.ext4", "kernel", "mem", "meta.json", "state"]

    a, _ = await mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id=info.snapshot_id, labels={"k": "a"}))
    b, _ = await mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id=info.snapshot_id, id="clone-b",
                                                        env={"EXTRA": "1"}))
    assert b == "clone-b" and a != b
    for sid in (a, b):
        assert (await mgr.wait_ready(sid, 15)).state == S.READY
    out, _, code = await run(mgr, b, ["sh", "-c", "echo $WHO$EXTRA"])
    assert (out, code) == (b"src1\n", 0), "a restore's commands default to the checkpointed sandbox's env"
    assert mgr.inspect_sandbox(a).labels == {"k": "a"}
    [listed] = mgr.list_checkpoints()
    assert listed.snapshot_id == info.snapshot_id and listed.in_use == 2
    assert mgr.list_checkpoints(sandbox_id=src) == [listed] and mgr.list_checkpoints(sandbox_id=a) == []

    # each restore holds its own link to the memory it maps
    mem = ckpt_dir(mgr, info.snapshot_id) / "mem"
    assert os.stat(mem).st_nlink == 3
    mgr.delete_checkpoint(info.snapshot_id)
    assert not ckpt_dir(mgr, info.snapshot_id).exists() and mgr.list_checkpoints() == []
    with pytest.raises(CheckpointNotFound):
        await mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id=info.snapshot_id))
    with pytest.raises(CheckpointNotFound):
        mgr.delete_checkpoint(info.snapshot_id)
    assert (await run(mgr, a, ["true"]))[2] == 0, "restores run on after the delete"
    links = [mgr.data_dir / "sandboxes" / sid / "snapshot" / "mem" for sid in (a, b)]
    assert [os.stat(p).st_nlink for p in links] == [2, 2]
    for sid in (a, b, src):
        await mgr.remove_sandbox(sid, force=True)
        assert leftovers(mgr, sid) == []
    assert list((mgr.data_dir / "checkpoints").iterdir()) == []


async def test_restore_errors_leave_nothing(rig: Rig) -> None:
    mgr = manager(rig)
    src = await ready_sandbox(mgr, "src")
    with pytest.raises(CheckpointNotFound):
        await mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id="no-such-checkpoint"))
    info = await mgr.checkpoint_sandbox(src, "c")
    with pytest.raises(SandboxAlreadyExists):
        await mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id=info.snapshot_id, id=src))
    with pytest.raises(InvalidArgument, match="network"):
        await mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id=info.snapshot_id, id="other",
                                                     network=SandboxNetworkSpec(mode="tap")))
    assert leftovers(mgr, "other") == []
    assert [s.id for s in mgr.list_sandboxes()] == [src]
    await mgr.stop_sandbox(src)
    with pytest.raises(InvalidState, match="stopped"):
        await mgr.checkpoint_sandbox(src, "late")
    with pytest.raises(SandboxNotFound):
        await mgr.checkpoint_sandbox("nobody", "x")
    assert [c.snapshot_id for c in mgr.list_checkpoints()] == [info.snapshot_id]
    assert sorted(p.name for p in (mgr.data_dir / "checkpoints").iterdir()) == [info.snapshot_id]


async def test_failed_save_resumes_the_vm_and_lists_nothing(rig: Rig) -> None:
    driver = SnapshotLocalDriver()
    mgr = manager(rig, driver=driver)
    src = await ready_sandbox(mgr, "src")
    driver.fail_save = True
    with pytest.raises(VmmError, match="fake save failed"):
        await mgr.checkpoint_sandbox(src, "broken")
    assert mgr.list_checkpoints() == []
    assert not list((mgr.data_dir / "sandboxes" / src).glob("checkpoint-*"))
    assert (await run(mgr, src, ["true"]))[2] == 0, "resumed after the failed save"


async def test_failed_restore_is_failed_and_leaves_no_files(rig: Rig) -> None:
    driver = SnapshotLocalDriver()
    mgr = manager(rig, driver=driver)
    info = await mgr.checkpoint_sandbox(await ready_sandbox(mgr, "src"), "c")
    driver.fail_restore = True
    sid, _ = await mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id=info.snapshot_id, id="broken"))
    with pytest.raises(Exception, match="fake restore failed"):
        await mgr.wait_ready(sid, 15)
    assert mgr.inspect_sandbox(sid).state == S.FAILED
    assert leftovers(mgr, sid) == []
    assert mgr.list_checkpoints()[0].in_use == 0


async def test_snapshots_unsupported_by_the_driver(rig: Rig) -> None:
    mgr = rig.manager(driver=LocalDriver())
    sid = await ready_sandbox(mgr, "plain")
    for call in (mgr.checkpoint_sandbox(sid, "x"), mgr.pause_sandbox(sid), mgr.fork_sandbox(sid, 1)):
        with pytest.raises(SnapshotsUnsupported):
            await call
    assert mgr.inspect_sandbox(sid).state == S.READY


async def test_checkpoints_survive_a_restart_and_interrupted_ones_vanish(rig: Rig) -> None:
    mgr = manager(rig)
    src = await ready_sandbox(mgr, "src")
    info = await mgr.checkpoint_sandbox(src, "keep")
    await mgr.close(remove_sandboxes=False)
    # what a kill -9 in the middle of a checkpoint leaves: a part directory in the
    # sandbox's workdir, or a renamed directory whose record was never written
    part = mgr.data_dir / "sandboxes" / src / "checkpoint-x.part"
    part.mkdir()
    (part / "state").write_text("half")
    orphan = mgr.data_dir / "checkpoints" / "unrecorded"
    orphan.mkdir()
    mgr2 = manager(rig)
    await mgr2.start()
    assert [c.snapshot_id for c in mgr2.list_checkpoints()] == [info.snapshot_id]
    assert not part.exists() and not orphan.exists()
    sid, _ = await mgr2.restore_sandbox(RestoreSandboxSpec(snapshot_id=info.snapshot_id))
    await mgr2.wait_ready(sid, 15)
    assert (await run(mgr2, sid, ["true"]))[2] == 0


async def test_checkpoint_cancelled_mid_save_leaves_nothing_and_resumes(rig: Rig) -> None:
    driver = SnapshotLocalDriver()
    mgr = manager(rig, driver=driver)
    src = await ready_sandbox(mgr, "src")
    driver.save_delay = 5
    task = asyncio.create_task(mgr.checkpoint_sandbox(src, "slow"))
    await wait_for(lambda: driver.processes[src].paused, what="the VM paused")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert mgr.list_checkpoints() == [] and not list((mgr.data_dir / "sandboxes" / src).glob("checkpoint-*"))
    assert not driver.processes[src].paused
    assert (await run(mgr, src, ["true"]))[2] == 0


async def test_pause_resume_in_memory(rig: Rig) -> None:
    driver = SnapshotLocalDriver()
    mgr = manager(rig, driver=driver)  # keepalive: every 0.2 s, 1 s timeout
    sid = await ready_sandbox(mgr, "p", ttl_seconds=2)
    sub = mgr.subscribe_events(sandbox_id=sid)
    await mgr.pause_sandbox(sid)
    assert mgr.inspect_sandbox(sid).state == S.PAUSED
    assert (await next_event(sub, "paused")).attributes["to_disk"] == "false"
    pid = mgr.inspect_sandbox(sid).pid
    assert Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "T", "the VM's process is stopped"
    with pytest.raises(InvalidState, match="resume it first"):
        await mgr.run_in_sandbox(sid, ["true"])
    with pytest.raises(InvalidState, match="resume it first"):
        await mgr.stat_path(sid, "/")
    await asyncio.sleep(2.5)  # longer than the keepalive timeout and the TTL
    assert mgr.inspect_sandbox(sid).state == S.PAUSED, "no keepalive failure, no TTL while paused"
    await mgr.pause_sandbox(sid)  # already paused: nothing to do
    await mgr.resume_sandbox(sid)
    await next_event(sub, "resumed")
    assert (await run(mgr, sid, ["true"]))[2] == 0
    with pytest.raises(InvalidState, match="only a paused"):
        await mgr.resume_sandbox(sid)
    await next_event(sub, "removed", timeout=5)  # the TTL counts on after the resume


async def test_pause_to_disk_restart_resume(rig: Rig) -> None:
    mgr = manager(rig)
    sid = await ready_sandbox(mgr, "d")
    pid = mgr.inspect_sandbox(sid).pid
    assert pid is not None
    await mgr.pause_sandbox(sid, to_disk=True)
    info = mgr.inspect_sandbox(sid)
    assert info.state == S.PAUSED and info.pid is None
    await wait_for(lambda: not alive(pid), what="the VMM gone")
    workdir = mgr.data_dir / "sandboxes" / sid
    assert (workdir / "suspend" / "state").exists() and not memory_dir(workdir).exists()
    await mgr.close(remove_sandboxes=False)
    mgr2 = manager(rig)
    await mgr2.start()
    assert mgr2.inspect_sandbox(sid).state == S.PAUSED
    with pytest.raises(InvalidState, match="resume it first"):
        await mgr2.checkpoint_sandbox(sid, "x")
    await mgr2.resume_sandbox(sid)
    assert mgr2.inspect_sandbox(sid).state == S.READY
    assert (await run(mgr2, sid, ["true"]))[2] == 0
    assert not (workdir / "suspend").exists()
    await mgr2.remove_sandbox(sid)
    assert leftovers(mgr2, sid) == []


async def test_paused_in_memory_survives_a_restart(rig: Rig) -> None:
    mgr = manager(rig)
    sid = await ready_sandbox(mgr, "m")
    await mgr.pause_sandbox(sid)
    pid = mgr.inspect_sandbox(sid).pid
    await mgr.close(remove_sandboxes=False)
    mgr2 = manager(rig)
    await mgr2.start()
    assert mgr2.inspect_sandbox(sid).state == S.PAUSED and alive(pid)
    await mgr2.resume_sandbox(sid)
    assert (await run(mgr2, sid, ["true"]))[2] == 0
    assert mgr2.inspect_sandbox(sid).pid == pid


async def test_stop_and_remove_paused(rig: Rig) -> None:
    mgr = manager(rig)
    a, b = await ready_sandbox(mgr, "a"), await ready_sandbox(mgr, "b")
    await mgr.pause_sandbox(a)
    await mgr.pause_sandbox(b, to_disk=True)
    await mgr.stop_sandbox(a)
    await mgr.stop_sandbox(b)
    assert [mgr.inspect_sandbox(s).state for s in (a, b)] == [S.STOPPED, S.STOPPED]
    assert leftovers(mgr, b) == []
    c = await ready_sandbox(mgr, "c")
    await mgr.pause_sandbox(c)
    await mgr.remove_sandbox(c)
    assert leftovers(mgr, c) == []


async def test_fork(rig: Rig) -> None:
    mgr = manager(rig)
    src = await ready_sandbox(mgr, "src", labels={"team": "x"})
    clones = await mgr.fork_sandbox(src, 2)
    assert len(clones) == 2 and len({c for c, _ in clones}) == 2
    for cid, _ in clones:
        info = mgr.inspect_sandbox(cid)
        assert info.state == S.READY and info.labels == {"team": "x"}
        assert (await run(mgr, cid, ["true"]))[2] == 0
    assert mgr.list_checkpoints() == [] and list((mgr.data_dir / "checkpoints").iterdir()) == []
    with pytest.raises(InvalidArgument):
        await mgr.fork_sandbox(src, 0)


async def test_restored_sandboxes_survive_a_restart(rig: Rig) -> None:
    mgr = manager(rig)
    info = await mgr.checkpoint_sandbox(await ready_sandbox(mgr, "src"), "c")
    sid, _ = await mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id=info.snapshot_id, id="r"))
    await mgr.wait_ready(sid, 15)
    await mgr.close(remove_sandboxes=False)
    mgr2 = manager(rig)
    await mgr2.start()
    assert mgr2.inspect_sandbox(sid).state == S.READY
    assert mgr2.list_checkpoints()[0].in_use == 1
    assert (await run(mgr2, sid, ["true"]))[2] == 0
    shutil.rmtree(mgr2.data_dir / "checkpoints", ignore_errors=True)  # not needed by the restore any more
    assert (await run(mgr2, sid, ["true"]))[2] == 0


# -- the warm pool -------------------------------------------------------------------------


def pool_manager(rig: Rig, size: int = 2, data: str = "data") -> SandboxManager:
    mgr = manager(rig, data)
    mgr.config.pool.size = size
    mgr.config.pool.network = "none"
    return mgr


async def pool_full(mgr: SandboxManager, size: int = 2) -> None:
    await wait_for(lambda: mgr.pool is not None and mgr.pool.ready() == size, timeout=30, what="a full pool")


async def test_pool_hands_out_ready_sandboxes_once_and_refills(rig: Rig) -> None:
    mgr = pool_manager(rig)
    await mgr.start()
    await pool_full(mgr)
    assert mgr.list_sandboxes() == [] and mgr.list_checkpoints() == [], "the pool's sandboxes are hidden"
    sub = mgr.subscribe_events()
    t0 = asyncio.get_running_loop().time()
    sid, ip = await mgr.create_sandbox(SandboxSpec(id="mine", labels={"a": "b"}, ttl_seconds=600, env={"E": "1"},
                                                   network=SandboxNetworkSpec(mode="none")))
    took = asyncio.get_running_loop().time() - t0
    assert (sid, ip) == ("mine", "") and took < 0.1, took
    info = mgr.inspect_sandbox(sid)
    assert info.state == S.READY and info.labels == {"a": "b"}
    assert (await run(mgr, sid, ["sh", "-c", "echo $E"]))[0] == b"1\n"
    assert [e.action for e in [await sub.recv(5), await sub.recv(5)]] == ["created", "ready"]
    assert mgr.pool.handed_out == 1
    await pool_full(mgr)  # refilled
    [st] = mgr.pool_stats()
    assert (st.pool, st.size, st.members, st.ready, st.handed_out) == ("default", 2, 2, 2, 1)
    registry = CollectorRegistry()
    registry.register(SandboxCollector(mgr))
    page = await asyncio.to_thread(generate_latest, registry)  # scraped from another thread, as the endpoint does
    for line in ('arcbox_pool_ready{pool="default"} 2.0', 'arcbox_pool_size{pool="default"} 2.0',
                 'arcbox_pool_handouts_total{pool="default"} 1.0'):
        assert line in page.decode(), line

    # three at once from a pool of two: all distinct, none handed out twice
    got = await asyncio.gather(*(mgr.create_sandbox(SandboxSpec(network=SandboxNetworkSpec(mode="none")))
                                 for _ in range(3)))
    ids = [g[0] for g in got]
    assert len(set(ids)) == 3
    for i in ids:
        await mgr.wait_ready(i, 15)
    pids = {mgr.inspect_sandbox(i).pid for i in [*ids, sid]}
    assert len(pids) == 4 and None not in pids
    assert mgr.pool.handed_out == 3

    # a spec the pool does not serve boots cold
    other, _ = await mgr.create_sandbox(SandboxSpec(vcpus=2, network=SandboxNetworkSpec(mode="none")))
    await mgr.wait_ready(other, 15)
    assert mgr.pool.handed_out == 3
    with pytest.raises(SandboxAlreadyExists):
        await mgr.create_sandbox(SandboxSpec(id="mine", network=SandboxNetworkSpec(mode="none")))
    assert mgr.pool.handed_out == 3


async def test_pool_sandboxes_do_not_outlive_their_daemon(rig: Rig) -> None:
    mgr = pool_manager(rig)
    await mgr.start()
    await pool_full(mgr)
    sid, _ = await mgr.create_sandbox(SandboxSpec(id="kept", network=SandboxNetworkSpec(mode="none")))
    await pool_full(mgr)
    members = [p.pid for p in (mgr._ctx.sandboxes[m.id].vm.process for m in mgr.pool.members())]
    await mgr.close(remove_sandboxes=False)
    for pid in members:
        await wait_for(lambda pid=pid: not alive(pid), what="pool VMs gone with their manager")
    assert [p.name for p in (mgr.data_dir / "checkpoints").iterdir()] == []
    mgr2 = pool_manager(rig)
    await mgr2.start()
    assert [s.id for s in mgr2.list_sandboxes()] == [sid]
    assert (await run(mgr2, sid, ["true"]))[2] == 0, "the handed-out one is an ordinary sandbox"
    await pool_full(mgr2)


async def test_pool_members_that_crash_are_replaced(rig: Rig) -> None:
    mgr = pool_manager(rig, size=1)
    await mgr.start()
    await pool_full(mgr, 1)
    [member] = mgr.pool.members()
    pid = member.vm.process.pid
    os.kill(pid, 9)
    await wait_for(lambda: mgr.pool.members() and mgr.pool.members()[0].id != member.id and mgr.pool.ready() == 1,
                   timeout=30, what="a replacement")
