"""Checkpoint, restore, fork, pause and resume of real VMs (QEMU here).

Every test runs a manager on its own data dir with TAP networking inside a network
namespace it creates (nothing reaches the host's interfaces). What only a real VM can
show: memory, processes and files carried over into restores; each restore re-addressed
(its own IP and MAC on eth0, reachable), its clock set and its RNG reseeded; a paused
VMM using no CPU; a VM paused to disk surviving a daemon restart.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from arcbox_vm import RestoreSandboxSpec, SandboxManager, SandboxSpec
from arcbox_vm.errors import CheckpointNotFound, InvalidState, SandboxAlreadyExists
from arcbox_vm.models import SandboxState

from .manager_helpers import fresh_netns_name, make_config

pytestmark = pytest.mark.vm
S = SandboxState
COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done"


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True)


@pytest.fixture
def netns():
    ns = fresh_netns_name()
    assert sh("ip", "netns", "add", ns).returncode == 0
    yield ns
    sh("ip", "netns", "del", ns)


@pytest.fixture
def cfg(backend, guest_image, tmp_path, netns):
    return make_config(backend, guest_image, tmp_path / "data", cidr="10.233.0.0/24", netns=netns)


async def run(mgr: SandboxManager, sid: str, cmd: str) -> str:
    stream = await mgr.run_in_sandbox(sid, ["sh", "-c", cmd], timeout_seconds=60)
    out, err, code = await stream.collect()
    assert code == 0, (cmd, out, err)
    return out.decode().strip()


def sealed_memory_inode(pid: int) -> int | None:
    """The inode of the sealed snapshot memory QEMU `pid` maps (None: it maps none)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "/memfd:arcbox-snapshot-memory" in line:
            return int(line.split()[4])
    return None


async def counter_advances(mgr: SandboxManager, sid: str) -> None:
    first = int(await run(mgr, sid, "cat /tmp/counter"))
    await asyncio.sleep(1.0)
    assert int(await run(mgr, sid, "cat /tmp/counter")) > first, f"the counter in {sid} does not advance"


async def clock_is_now(mgr: SandboxManager, sid: str) -> None:
    guest = float(await run(mgr, sid, "date +%s.%N"))
    assert abs(guest - time.time()) < 2.0, f"the clock of {sid} is {guest - time.time():+.1f} s off"


async def source_with_state(mgr: SandboxManager) -> str:
    sid, _ = await mgr.create_sandbox(SandboxSpec(id="src"))
    await mgr.wait_ready(sid)
    await run(mgr, sid, "echo carried-over > /root/marker && sync")
    await mgr.start_exec(sid, ["sh", "-c", COUNTER])
    await asyncio.sleep(0.5)
    return sid


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_checkpoint_restore_two_readdressed_then_delete(cfg, netns):
    mgr = SandboxManager(cfg)
    try:
        src = await source_with_state(mgr)
        src_ip = mgr.inspect_sandbox(src).network.ip_address
        info = await mgr.checkpoint_sandbox(src, "with-counter")
        await counter_advances(mgr, src)  # live: the source runs on
        ckdir = cfg.data_dir / "checkpoints" / info.snapshot_id
        mem = ckdir / "mem"
        assert mem.exists() and info.size_bytes > 0

        (a, ip_a), (b, ip_b) = await asyncio.gather(
            mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id=info.snapshot_id)),
            mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id=info.snapshot_id, id="clone-b")))
        await asyncio.gather(mgr.wait_ready(a), mgr.wait_ready(b))
        assert len({src_ip, ip_a, ip_b}) == 3
        shared = {sealed_memory_inode(mgr.inspect_sandbox(sid).pid) for sid in (a, b)}
        assert len(shared) == 1 and None not in shared, f"the clones do not map one sealed memory: {shared}"
        seeds = set()
        for sid, ip in ((a, ip_a), (b, ip_b)):
            lease = mgr.inspect_sandbox(sid).network
            assert lease.ip_address == ip
            assert f"inet {ip}/24" in await run(mgr, sid, "ip -4 -o addr show eth0")
            mac = "06:00:" + ":".join(f"{int(x):02x}" for x in ip.split("."))
            assert await run(mgr, sid, "cat /sys/class/net/eth0/address") == mac, "its own MAC"
            assert await run(mgr, sid, "cat /root/marker") == "carried-over"
            assert await run(mgr, sid, "hostname") == sid
            await counter_advances(mgr, sid)
            await clock_is_now(mgr, sid)
            res = sh("ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "5", ip)
            assert res.returncode == 0, f"{sid} at {ip} does not answer: {res.stdout}{res.stderr}"
            seeds.add(await run(mgr, sid, "head -c 16 /dev/urandom | od -An -tx1"))
            assert [e.status for e in mgr.list_execs(sid) if e.cmd[-1] == COUNTER] == ["detached"], \
                "the source's counter is the restore's, attachable"
        assert len(seeds) == 2, "each restore has its own random state"
        assert mgr.list_checkpoints()[0].in_use == 2

        inode = (mem.stat().st_dev, mem.stat().st_ino)
        mgr.delete_checkpoint(info.snapshot_id)
        assert not ckdir.exists() and mgr.list_checkpoints() == []
        await counter_advances(mgr, a)  # its memory stays while it runs
        for sid in (a, b):
            await mgr.remove_sandbox(sid, force=True)
        left = [p for p in cfg.data_dir.rglob("*") if p.is_file() and (p.stat().st_dev, p.stat().st_ino) == inode]
        assert left == [], f"the checkpoint's memory outlived its restores: {left}"
    finally:
        await mgr.close()


async def test_fork_two(cfg):
    mgr = SandboxManager(cfg)
    try:
        src = await source_with_state(mgr)
        clones = await mgr.fork_sandbox(src, 2)
        assert len(clones) == 2
        for sid, ip in clones:
            assert mgr.inspect_sandbox(sid).state == S.READY
            assert await run(mgr, sid, "cat /root/marker") == "carried-over"
            assert f"inet {ip}/24" in await run(mgr, sid, "ip -4 -o addr show eth0")
            await counter_advances(mgr, sid)
        await counter_advances(mgr, src)
        assert mgr.list_checkpoints() == []
        assert list((cfg.data_dir / "checkpoints").iterdir()) == []
    finally:
        await mgr.close()


async def test_a_restore_can_be_checkpointed_and_paused_to_disk(cfg):
    """A restore's memory is a private copy-on-write mapping: its own checkpoints stream
    the memory into the state file, and restoring that gives the VM a shared file again."""
    mgr = SandboxManager(cfg)
    try:
        src = await source_with_state(mgr)
        first = await mgr.checkpoint_sandbox(src, "gen1")
        r1, _ = await mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id=first.snapshot_id))
        await mgr.wait_ready(r1)
        await run(mgr, r1, "echo gen2 > /root/gen && sync")
        second = await mgr.checkpoint_sandbox(r1, "gen2")
        await counter_advances(mgr, r1)
        r2, ip2 = await mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id=second.snapshot_id))
        await mgr.wait_ready(r2)
        assert await run(mgr, r2, "cat /root/marker /root/gen") == "carried-over\ngen2"
        assert f"inet {ip2}/24" in await run(mgr, r2, "ip -4 -o addr show eth0")
        await counter_advances(mgr, r2)
        await mgr.pause_sandbox(r1, to_disk=True)
        await mgr.resume_sandbox(r1)
        assert await run(mgr, r1, "cat /root/gen") == "gen2"
        await counter_advances(mgr, r1)
        await clock_is_now(mgr, r1)
    finally:
        await mgr.close()


async def test_pause_uses_no_cpu_and_resume_runs_on(cfg):
    mgr = SandboxManager(cfg)
    try:
        sid = await source_with_state(mgr)
        pid = mgr.inspect_sandbox(sid).pid
        await mgr.pause_sandbox(sid)
        with pytest.raises(InvalidState, match="resume it first"):
            await mgr.run_in_sandbox(sid, ["true"])
        await asyncio.sleep(0.5)
        before = cpu_seconds(pid)
        await asyncio.sleep(5)
        used = cpu_seconds(pid) - before
        assert used <= 0.05, f"a paused VMM used {used:.2f} s of CPU in 5 s"
        await mgr.resume_sandbox(sid)
        await counter_advances(mgr, sid)
        await clock_is_now(mgr, sid)
    finally:
        await mgr.close()


async def test_pause_to_disk_daemon_restart_resume(cfg):
    mgr = SandboxManager(cfg)
    mgr2 = None
    try:
        sid = await source_with_state(mgr)
        ip = mgr.inspect_sandbox(sid).network.ip_address
        pid = mgr.inspect_sandbox(sid).pid
        await mgr.pause_sandbox(sid, to_disk=True)
        assert not os.path.exists(f"/proc/{pid}"), "the VMM is stopped"
        await mgr.close(remove_sandboxes=False)
        mgr2 = SandboxManager(cfg)
        await mgr2.start()
        info = mgr2.inspect_sandbox(sid)
        assert info.state == S.PAUSED and info.network.ip_address == ip
        await mgr2.resume_sandbox(sid)
        assert await run(mgr2, sid, "cat /root/marker") == "carried-over"
        assert f"inet {ip}/24" in await run(mgr2, sid, "ip -4 -o addr show eth0")
        await counter_advances(mgr2, sid)
        await clock_is_now(mgr2, sid)
    finally:
        await (mgr2 or mgr).close()
        if mgr2 is not None:
            await mgr.close()


async def test_bad_input_leaves_nothing(cfg):
    mgr = SandboxManager(cfg)
    try:
        with pytest.raises(CheckpointNotFound):
            await mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id="no-such"))
        sid, _ = await mgr.create_sandbox(SandboxSpec(id="bad"))
        await mgr.wait_ready(sid)
        info = await mgr.checkpoint_sandbox(sid, "c")
        with pytest.raises(SandboxAlreadyExists):
            await mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id=info.snapshot_id, id=sid))
        await mgr.stop_sandbox(sid)
        with pytest.raises(InvalidState):
            await mgr.checkpoint_sandbox(sid, "late")
        assert [c.snapshot_id for c in mgr.list_checkpoints()] == [info.snapshot_id]
        assert [s.id for s in mgr.list_sandboxes()] == [sid]
        assert sorted(p.name for p in (cfg.data_dir / "sandboxes").iterdir()) == []
    finally:
        await mgr.close()


async def test_pool_of_two_hands_out_ready_sandboxes_and_refills(cfg):
    cfg.pool.size = 2
    mgr = SandboxManager(cfg)
    try:
        await mgr.start()
        deadline = time.monotonic() + 180
        while mgr.pool.ready() < 2:
            assert time.monotonic() < deadline, "the pool did not fill"
            await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        sid, ip = await mgr.create_sandbox(SandboxSpec(labels={"from": "pool"}, env={"X": "42"}))
        took = time.perf_counter() - t0
        assert mgr.inspect_sandbox(sid).state == S.READY and took < 0.05, f"hand-out took {took * 1000:.1f} ms"
        assert await run(mgr, sid, "hostname") == sid
        assert await run(mgr, sid, "echo $X") == "42"
        assert f"inet {ip}/24" in await run(mgr, sid, "ip -4 -o addr show eth0")
        await clock_is_now(mgr, sid)
        deadline = time.monotonic() + 60
        while mgr.pool.ready() < 2:
            assert time.monotonic() < deadline, "the pool did not refill"
            await asyncio.sleep(0.2)
        assert [s.id for s in mgr.list_sandboxes()] == [sid]
    finally:
        await mgr.close()
