"""SandboxManager over the local VMM test double: the real guest agent as a host process.

What the real-VM tests cover for the manager — lifecycle, TTL, the exit watcher, the
keepalive, stop of a frozen guest, re-adoption after a restart, concurrent commands, flow
control, events, boot-plan hooks — in seconds and without an image: sandboxes boot from
small dummy kernel/rootfs files (the local driver never reads them), network mode "none".
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from arcbox_vm import SandboxManager, SandboxNetworkSpec, SandboxSpec, SandboxState, VmmConfig
from arcbox_vm.config import AgentConfig, DaemonConfig, DefaultVmConfig
from arcbox_vm.errors import InvalidState, SandboxNotFound
from arcbox_vm.manager.events import EventSubscription
from arcbox_vm.manager.leftovers import processes_using
from arcbox_vm.manager.steps import Step
from arcbox_vm.models import SandboxEvent
from arcbox_vm.paths import socket_dir
from arcbox_vm.ports import AdoptSpec, VmmDriver, VmmProcess
from arcbox_vm.vmm.procfs import process_start_time
from tests.support.local_vmm import LocalDriver, NoImageBuild, alive, descendants

S = SandboxState
MiB = 1 << 20


@dataclass
class Rig:
    """Managers on temporary data dirs, each with its own LocalDriver; remembers every
    process a sandbox had so the teardown can prove none outlives the test."""

    root: Path
    kernel: Path
    rootfs: Path
    runtime: Path
    managers: list[SandboxManager] = field(default_factory=list)
    guards: list[NoImageBuild] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)

    def config(self, data: str = "data", **agent: float) -> VmmConfig:
        knobs = {"hello_timeout_s": 15.0, "keepalive_interval_s": 0.2, "keepalive_timeout_s": 1.0, **agent}
        return VmmConfig(data_dir=self.root / data,
                         defaults=DefaultVmConfig(kernel=str(self.kernel), rootfs=str(self.rootfs)),
                         daemon=DaemonConfig(cgroup_parent=""), agent=AgentConfig(**knobs))

    def manager(self, data: str = "data", driver: LocalDriver | None = None, **agent: float) -> SandboxManager:
        mgr = SandboxManager(self.config(data, **agent), driver=driver or LocalDriver())
        guard = NoImageBuild()
        mgr.adapters.images = guard
        self.managers.append(mgr)
        self.guards.append(guard)
        return mgr

    def tree(self, mgr: SandboxManager, sid: str) -> list[int]:
        """The sandbox's agent process and everything below it (remembered for the teardown)."""
        pid = mgr.inspect_sandbox(sid).pid
        assert pid and alive(pid), f"sandbox {sid} has no live process"
        pids = [pid, *descendants(pid)]
        self.pids.update(pids)
        return pids


@pytest_asyncio.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    runtime = Path(tempfile.mkdtemp(prefix="abx"))  # short: Unix socket paths are limited to 107 bytes
    monkeypatch.setenv("ARCBOX_VM_RUNTIME_DIR", str(runtime))
    (tmp_path / "vmlinuz").write_bytes(b"not a kernel")
    (tmp_path / "rootfs.img").write_bytes(b"not a filesystem")
    r = Rig(tmp_path, tmp_path / "vmlinuz", tmp_path / "rootfs.img", runtime)
    try:
        yield r
    finally:
        for mgr in r.managers:
            await mgr.close()
        left = await wait_dead(r.pids)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(runtime, ignore_errors=True)
    assert not left, f"processes outlived their sandboxes: {left}"
    assert all(g.calls == 0 for g in r.guards)


async def wait_dead(pids: set[int] | list[int], timeout: float = 5.0) -> list[int]:
    """Pids still alive after `timeout` (a PID namespace's members die just after its init)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.05)


async def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def next_event(sub: EventSubscription, action: str, timeout: float = 10.0) -> SandboxEvent:
    """The next event with `action` (others are skipped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ev = await sub.recv(max(0.01, deadline - loop.time()))
        if ev.action == action:
            return ev


def spec(sid: str, **kw: object) -> SandboxSpec:
    return SandboxSpec(id=sid, network=SandboxNetworkSpec(mode="none"), **kw)


async def ready_sandbox(mgr: SandboxManager, sid: str, **kw: object) -> str:
    await mgr.create_sandbox(spec(sid, **kw))
    info = await mgr.wait_ready(sid, 15)
    assert info.state == S.READY and info.vmm == "local"
    return sid


async def run(mgr: SandboxManager, sid: str, argv: list[str], **kw: object) -> tuple[bytes, bytes, int]:
    stream = await mgr.run_in_sandbox(sid, argv, **kw)
    return await stream.collect()


def gone(mgr: SandboxManager, sid: str) -> list[str]:
    """What is left of a sandbox on disk: its workdir, its socket dir."""
    workdir = mgr.data_dir / "sandboxes" / sid
    return [str(p) for p in (workdir, socket_dir(workdir)) if p.exists()]


async def chunks_until(stream: AsyncIterator, pred: Callable[[bytes], bool], timeout: float = 10.0) -> bytes:
    """Read a command's stdout until `pred(all so far)` holds."""
    out = b""

    async def read() -> bytes:
        nonlocal out
        async for chunk in stream:
            assert chunk.stream in ("stdout", "stderr"), chunk
            out += chunk.data
            if pred(out):
                return out
        raise AssertionError(f"the command ended early: {out[-200:]!r}")

    return await asyncio.wait_for(read(), timeout)


async def collect_all(stream: AsyncIterator) -> list:
    return [chunk async for chunk in stream]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- lifecycle ---------------------------------------------------------------------------


async def test_create_run_stop_remove_leaves_nothing(rig: Rig) -> None:
    # kernel/rootfs given in the spec (over the config's defaults): copied, never built
    kernel, rootfs = rig.root / "spec-kernel", rig.root / "spec-rootfs"
    kernel.write_bytes(b"k")
    rootfs.write_bytes(b"the spec's rootfs")
    mgr = rig.manager()
    sid = await ready_sandbox(mgr, "life", kernel=str(kernel), rootfs=str(rootfs))
    workdir = mgr.data_dir / "sandboxes" / sid
    assert (workdir / "rootfs.ext4").read_bytes() == b"the spec's rootfs"
    assert rootfs.read_bytes() == b"the spec's rootfs"

    out, err, code = await run(mgr, sid, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (out, err, code) == (b"out\n", b"err\n", 7)
    info = mgr.inspect_sandbox(sid)
    assert info.state == S.READY and info.last_exit_code == 7
    tree = rig.tree(mgr, sid)
    assert len(tree) >= 2, "the agent and its PID namespace's init"
    assert processes_using(workdir), "the 'VMM' names its workdir on its command line"

    await mgr.stop_sandbox(sid, timeout_seconds=10)
    assert mgr.inspect_sandbox(sid).state == S.STOPPED
    assert not await wait_dead(tree)
    assert not socket_dir(workdir).exists()

    await mgr.remove_sandbox(sid)
    with pytest.raises(SandboxNotFound):
        mgr.inspect_sandbox(sid)
    assert gone(mgr, sid) == []
    assert list((mgr.data_dir / "sandboxes").iterdir()) == []
    assert list(rig.runtime.iterdir()) == [], "no socket directory left"
    assert not processes_using(workdir)


async def test_events_of_a_lifecycle_carry_reasons(rig: Rig) -> None:
    mgr = rig.manager()
    await mgr.start()
    async with mgr.subscribe_events(sandbox_id="ev") as sub:
        await ready_sandbox(mgr, "ev")
        await run(mgr, "ev", ["true"])
        await mgr.stop_sandbox("ev", timeout_seconds=10)
        await mgr.remove_sandbox("ev")
        events = []
        while not events or events[-1].action != "removed":
            events.append(await sub.recv(5))
    actions = [e.action for e in events]
    assert actions == ["created", "ready", "running", "idle", "stopping", "stopped", "removed"], actions
    attrs = {e.action: e.attributes for e in events}
    assert attrs["idle"]["exit_code"] == "0"
    assert attrs["stopping"]["reason"] == "user"
    assert attrs["stopped"] == {"reason": "user", "graceful": "true"}, "the agent's SHUTDOWN made the 'VMM' exit"
    assert attrs["removed"]["reason"] == "user"
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_ttl_removes_the_sandbox(rig: Rig) -> None:
    mgr = rig.manager()
    await mgr.start()
    async with mgr.subscribe_events(sandbox_id="ttl") as sub:
        await ready_sandbox(mgr, "ttl", ttl_seconds=1)
        tree = rig.tree(mgr, "ttl")
        ready = time.monotonic()
        ev = await next_event(sub, "removed", timeout=10)
    assert ev.attributes["reason"] == "ttl"
    assert 0.8 <= time.monotonic() - ready < 5
    with pytest.raises(SandboxNotFound):
        mgr.inspect_sandbox("ttl")
    assert not await wait_dead(tree)
    assert gone(mgr, "ttl") == []


# -- the exit watcher and the keepalive ---------------------------------------------------


async def test_killed_vmm_fails_the_sandbox_and_takes_its_commands(rig: Rig) -> None:
    mgr = rig.manager()
    await mgr.start()
    sid = await ready_sandbox(mgr, "killed")
    marker = f"{os.getpid() % 1000 + 700}.{time.time_ns() % 10**6:06d}"  # a sleep unique to this test
    await mgr.start_exec(sid, ["sleep", marker])
    tree = rig.tree(mgr, sid)
    sleepers = [p for p in tree if cmdline(p) == f"sleep\0{marker}\0".encode()]
    assert len(sleepers) == 1, "the background command runs below the agent"
    async with mgr.subscribe_events(sandbox_id=sid) as sub:
        os.kill(tree[0], signal.SIGKILL)
        ev = await next_event(sub, "failed", timeout=10)
    assert ev.attributes["reason"] == "vmm_exited"
    info = mgr.inspect_sandbox(sid)
    assert info.state == S.FAILED and "exited unexpectedly" in (info.error or "")
    assert info.pid is None
    assert not await wait_dead(tree), "a VM's processes die with its VMM"
    assert gone(mgr, sid) == []
    with pytest.raises(InvalidState):
        await mgr.run_in_sandbox(sid, ["true"])
    await mgr.remove_sandbox(sid)


async def test_frozen_agent_fails_by_keepalive(rig: Rig) -> None:
    mgr = rig.manager(keepalive_interval_s=0.2, keepalive_timeout_s=1.0)
    await mgr.start()
    sid = await ready_sandbox(mgr, "frozen")
    stream = await mgr.run_in_sandbox(sid, ["sleep", "30"])
    tree = rig.tree(mgr, sid)
    async with mgr.subscribe_events(sandbox_id=sid) as sub:
        os.kill(tree[0], signal.SIGSTOP)
        t0 = time.monotonic()
        chunks = await asyncio.wait_for(collect_all(stream), 10)
        ended = time.monotonic() - t0
        ev = await next_event(sub, "failed", timeout=15)
    assert [c.stream for c in chunks] == ["error"] and b"did not answer" in chunks[0].data
    assert 0.9 <= ended < 1.0 + 0.2 + 2.0, f"the command's stream ended {ended:.1f} s after the freeze"
    assert ev.attributes["reason"] == "agent_unresponsive"
    assert mgr.inspect_sandbox(sid).state == S.FAILED
    assert not await wait_dead(tree), "the frozen 'VMM' was killed"
    assert gone(mgr, sid) == []


async def test_frozen_agent_fails_within_the_keepalive_timeout(rig: Rig) -> None:
    mgr = rig.manager(keepalive_interval_s=0.2, keepalive_timeout_s=1.0)
    await mgr.start()
    sid = await ready_sandbox(mgr, "frozen-fast")
    tree = rig.tree(mgr, sid)
    async with mgr.subscribe_events(sandbox_id=sid) as sub:
        os.kill(tree[0], signal.SIGSTOP)
        try:
            ev = await next_event(sub, "failed", timeout=1.0 + 0.2 + 2.0)
        except TimeoutError:
            ev = None
    assert ev is not None, "no 'failed' event within keepalive timeout + interval + 2 s of the freeze"
    assert ev.attributes["reason"] == "agent_unresponsive"


async def test_stop_of_a_frozen_sandbox_returns_within_its_timeout(rig: Rig) -> None:
    mgr = rig.manager(keepalive_timeout_s=60.0)  # the keepalive must not get there first
    await mgr.start()
    sid = await ready_sandbox(mgr, "frozen-stop")
    tree = rig.tree(mgr, sid)
    os.kill(tree[0], signal.SIGSTOP)
    async with mgr.subscribe_events(sandbox_id=sid) as sub:
        t0 = time.monotonic()
        await asyncio.wait_for(mgr.stop_sandbox(sid, timeout_seconds=2), 10)
        took = time.monotonic() - t0
        ev = await next_event(sub, "stopped", timeout=1)
    assert took < 2 + 3, took
    assert ev.attributes["graceful"] == "false"
    assert mgr.inspect_sandbox(sid).state == S.STOPPED
    assert not await wait_dead(tree)
    assert gone(mgr, sid) == []


# -- restarts ------------------------------------------------------------------------------


async def test_restart_readopts_a_running_sandbox_and_its_background_command(rig: Rig) -> None:
    first = rig.manager()
    await first.start()
    sid = await ready_sandbox(first, "adopt", working_dir=str(rig.root))
    data = rig.root / "guest-file"

    async def chunks() -> AsyncIterator[bytes]:
        yield b"written before the restart"

    await first.write_file(sid, str(data), chunks())
    loop_cmd = ["sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); sleep 0.02; done"]
    exec_id = await first.start_exec(sid, loop_cmd)
    att = await first.attach_exec(sid, exec_id)
    before = await chunks_until(att, lambda out: out.count(b"\n") >= 3)
    await att.aclose()  # detach: it keeps running
    last_before = int(before.splitlines()[-1][4:])
    pid = first.inspect_sandbox(sid).pid
    tree = rig.tree(first, sid)

    await first.close(remove_sandboxes=False)
    assert alive(pid), "closing a manager this way leaves its VMs running"

    second = rig.manager()
    async with second.subscribe_events(sandbox_id=sid) as sub:
        await second.start()
        ev = await next_event(sub, "ready", timeout=5)
    assert ev.attributes["reason"] == "adopted"
    assert ev.attributes["detached_execs"] == "1" and ev.attributes["lost_execs"] == "0"
    info = second.inspect_sandbox(sid)
    assert info.state == S.READY and info.pid == pid

    reader = await second.read_file(sid, str(data))
    assert await reader.read_all() == b"written before the restart"
    assert await run(second, sid, ["cat", str(data)]) == (b"written before the restart", b"", 0)

    execs = {e.exec_id: e for e in second.list_execs(sid)}
    assert execs[exec_id].status == "detached"
    att = await second.attach_exec(sid, exec_id)
    after = await chunks_until(att, lambda out: out.count(b"\n") >= 3)
    numbers = [int(line[4:]) for line in after.splitlines() if line.startswith(b"line")]
    assert numbers[0] > last_before, "the command kept running while no manager ran"
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "and its output arrives in order"
    await att.aclose()
    assert {e.exec_id: e.status for e in second.list_execs(sid)}[exec_id] == "detached"
    att = await second.attach_exec(sid, exec_id)  # and attachable again
    await chunks_until(att, lambda out: b"\n" in out)
    await second.signal_exec(sid, exec_id, signal.SIGKILL)
    _, _, code = await asyncio.wait_for(att.collect(), 10)
    assert code == 128 + signal.SIGKILL
    await second.remove_sandbox(sid, force=True)
    assert not await wait_dead(tree)
    assert gone(second, sid) == []


async def test_sandbox_whose_vmm_died_while_no_manager_ran_is_lost(rig: Rig) -> None:
    first = rig.manager()
    await first.start()
    sid = await ready_sandbox(first, "lost")
    tree = rig.tree(first, sid)
    await first.close(remove_sandboxes=False)
    os.kill(tree[0], signal.SIGKILL)
    assert not await wait_dead(tree)

    second = rig.manager()
    async with second.subscribe_events(sandbox_id=sid) as sub:
        await second.start()
        ev = await next_event(sub, "failed", timeout=5)
    assert ev.attributes["reason"] == "lost"
    info = second.inspect_sandbox(sid)
    assert info.state == S.FAILED and info.pid is None
    workdir = second.data_dir / "sandboxes" / sid
    assert not socket_dir(workdir).exists() and not (workdir / "rootfs.ext4").exists()
    await second.remove_sandbox(sid)
    assert gone(second, sid) == []


# -- commands ------------------------------------------------------------------------------


async def test_concurrent_execs(rig: Rig) -> None:
    mgr = rig.manager()
    sid = await ready_sandbox(mgr, "conc")
    t0 = time.monotonic()
    results = await asyncio.gather(*(
        run(mgr, sid, ["sh", "-c", f"sleep 0.5; echo n{i}; echo e{i} >&2; exit {i}"]) for i in range(5)))
    took = time.monotonic() - t0
    assert results == [(f"n{i}\n".encode(), f"e{i}\n".encode(), i) for i in range(5)]
    assert took < 2.0, f"5 commands of 0.5 s took {took:.2f} s: they did not run at once"
    assert mgr.inspect_sandbox(sid).state == S.READY


async def test_slow_reader_bounds_host_memory_and_blocks_the_command(rig: Rig) -> None:
    mgr = rig.manager()
    sid = await ready_sandbox(mgr, "slow")
    total = 32 * MiB
    gc.collect()
    rss0 = rss_bytes()
    stream = await mgr.run_in_sandbox(sid, ["head", "-c", str(total), "/dev/zero"])
    cmd_pid = stream.pid
    assert cmd_pid and alive(cmd_pid)
    it = stream.__aiter__()
    got = len((await it.__anext__()).data)
    await asyncio.sleep(1.5)  # a reader that takes nothing for a while
    grown = rss_bytes() - rss0
    assert grown < 12 * MiB, f"host memory grew by {grown / MiB:.1f} MiB while the reader paused"
    assert alive(cmd_pid), "the command is blocked by the reader, not finished"
    peak = grown
    code = None
    async for chunk in it:
        if chunk.stream == "exit":
            code = chunk.exit_code
            break
        got += len(chunk.data)
        if got % (4 * MiB) < len(chunk.data):  # every ~4 MiB: slow down, look around
            peak = max(peak, rss_bytes() - rss0)
            if got < total - 4 * MiB:
                assert alive(cmd_pid), f"the command finished with only {got / MiB:.1f} MiB read"
            await asyncio.sleep(0.05)
    assert (got, code) == (total, 0)
    assert peak < 12 * MiB, f"host memory grew by {peak / MiB:.1f} MiB"


# -- boot-plan hooks -----------------------------------------------------------------------


async def test_boot_plan_hook_adds_a_named_step(rig: Rig) -> None:
    mgr = rig.manager()
    seen: list[tuple[str, list[str], bool, bool]] = []

    def hook(plan, sb) -> None:
        async def mark() -> None:
            seen.append((sb.id, plan.steps.names(), plan.disk.exists(), plan.endpoint.listen_path.exists()))

        plan.steps.insert_after("disk", Step("mark", mark))

    mgr.boot_plan_hooks.append(hook)
    await ready_sandbox(mgr, "hooked")
    assert len(seen) == 1
    sid, names, disk_made, listening = seen[0]
    assert sid == "hooked"
    assert names[names.index("disk") + 1] == "mark" and names.index("mark") < names.index("launch")
    assert disk_made and not listening, "it ran after the disk step, before the listener"
    assert (await run(mgr, "hooked", ["echo", "ok"]))[0] == b"ok\n"


async def test_boot_plan_hook_that_raises_fails_the_sandbox_and_undoes_everything(rig: Rig) -> None:
    mgr = rig.manager()
    await mgr.start()
    undone: list[str] = []
    agent_pids: list[int] = []

    def hook(plan, sb) -> None:
        async def note() -> None:
            pass

        async def undo_note() -> None:
            undone.append("note")

        async def explode() -> None:
            proc = plan.state["process"]
            agent_pids.extend([proc.pid, *descendants(proc.pid)])
            rig.pids.update(agent_pids)
            raise RuntimeError("boom from a hook")

        plan.steps.insert_after("disk", Step("note", note, undo_note))
        plan.steps.insert_after("wait-hello", Step("explode", explode))

    mgr.boot_plan_hooks.append(hook)
    async with mgr.subscribe_events(sandbox_id="doomed") as sub:
        await mgr.create_sandbox(spec("doomed"))
        ev = await next_event(sub, "failed", timeout=15)
    assert ev.attributes["reason"] == "boot_error" and "boom from a hook" in ev.attributes["error"]
    info = mgr.inspect_sandbox("doomed")
    assert info.state == S.FAILED and "boom" in (info.error or "")
    assert undone == ["note"]
    assert agent_pids
    assert not await wait_dead(agent_pids), "the launched 'VMM' was killed by the undo"
    assert gone(mgr, "doomed") == [], "workdir and socket dir removed"
    await mgr.remove_sandbox("doomed")


# -- the test double itself ----------------------------------------------------------------


async def test_local_driver_implements_the_ports_and_adopts_by_pid_and_start_time(rig: Rig) -> None:
    driver = LocalDriver()
    assert isinstance(driver, VmmDriver)
    mgr = rig.manager(driver=driver)
    sid = await ready_sandbox(mgr, "port")
    proc = driver.processes[sid]
    assert isinstance(proc, VmmProcess)
    assert proc.start_time == process_start_time(proc.pid) and proc.returncode is None
    workdir = mgr.data_dir / "sandboxes" / sid

    def adopt_spec(pid: int | None, start: int | None) -> AdoptSpec:
        return AdoptSpec(sandbox_id=sid, workdir=workdir, sockdir=socket_dir(workdir), pid=pid, start_time=start)

    other = LocalDriver()
    recycled = await other.adopt(adopt_spec(proc.pid, proc.start_time + 1))
    assert recycled.returncode is not None and recycled.exited.done(), "same pid, other start time: not ours"
    assert (await other.adopt(adopt_spec(None, None))).exited.done()
    same = await other.adopt(adopt_spec(proc.pid, proc.start_time))
    assert same.returncode is None and not same.exited.done()
    rig.tree(mgr, sid)
    await mgr.remove_sandbox(sid)
    assert await asyncio.wait_for(same.wait(), 5) == -1, "the exit of a process we did not start is seen (pidfd)"
    assert proc.returncode == -signal.SIGKILL
    assert "killed by signal 9" in proc.describe_exit()


async def test_without_a_pid_namespace_kill_still_takes_every_process(rig: Rig) -> None:
    driver = LocalDriver(pid_namespace=False)
    mgr = rig.manager(driver=driver)
    sid = await ready_sandbox(mgr, "no-pidns")
    stream = await mgr.run_in_sandbox(sid, ["sh", "-c", "echo $$"])
    out, _, _ = await stream.collect()
    assert int(out) == stream.pid, "no PID namespace: the command sees its host pid"
    marker = f"{os.getpid() % 1000 + 700}.{time.time_ns() % 10**6:06d}"
    await mgr.start_exec(sid, ["sh", "-c", f"(sleep {marker} &); sleep {marker}"])  # one orphan, one child

    def sleepers() -> list[int]:
        return [p for p in descendants(driver.processes[sid].pid)
                if cmdline(p) == f"sleep\0{marker}\0".encode()]

    await wait_for(lambda: len(sleepers()) == 2, 5, "both sleeps below the agent (a subreaper)")
    tree = rig.tree(mgr, sid)
    await mgr.remove_sandbox(sid, force=True)
    assert not await wait_dead(tree)


async def test_a_dropped_stream_kills_its_command_at_once(rig: Rig) -> None:
    """A stream its caller drops (no aclose) is collected by reference counting — nothing
    may hold it in a cycle — so its command is killed and the state corrected at once."""
    mgr = rig.manager()
    await mgr.start()
    sid = await ready_sandbox(mgr, "dropped")
    stream = await mgr.run_in_sandbox(sid, ["sleep", "1000"])
    assert mgr.inspect_sandbox(sid).state == S.RUNNING
    del stream
    for _ in range(40):
        await asyncio.sleep(0.05)
        if mgr.inspect_sandbox(sid).state == S.READY:
            break
    assert mgr.inspect_sandbox(sid).state == S.READY, "still RUNNING: the dropped stream was not collected"
    statuses = [e.status for e in mgr.list_execs(sid)]
    assert statuses == ["ended"], statuses
