"""The daemon (`daemon.serve`) in-process over the local VMM test double, and the Python
client against it: real gRPC on a temporary Unix socket, the real manager, the real guest
agent as a host process — no VM, no image (dummy kernel/rootfs files), network "none".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from arcbox_vm import SandboxManager, VmmConfig
from arcbox_vm.client import AsyncClient, AsyncSandbox, Sandbox
from arcbox_vm.config import AgentConfig, DaemonConfig, DefaultVmConfig, GrpcConfig
from arcbox_vm.errors import SandboxNotFound
from arcbox_vm.models import SandboxEvent
from tests.support.local_daemon import Serving
from tests.support.local_vmm import LocalDriver, NoImageBuild, alive, descendants


class Daemon:
    """`serve()` as a task of the test's loop, over a manager with a LocalDriver; restartable."""

    def __init__(self, root: Path, runtime: Path, on_shutdown: str) -> None:
        (root / "vmlinuz").write_bytes(b"not a kernel")
        (root / "rootfs.img").write_bytes(b"not a filesystem")
        self.socket = runtime / "d.sock"
        self.config = VmmConfig(
            data_dir=root / "data",
            grpc=GrpcConfig(unix_socket=str(self.socket)),
            defaults=DefaultVmConfig(kernel=str(root / "vmlinuz"), rootfs=str(root / "rootfs.img")),
            daemon=DaemonConfig(cgroup_parent="", on_shutdown=on_shutdown),  # type: ignore[arg-type]
            agent=AgentConfig(hello_timeout_s=15, keepalive_interval_s=0.5, keepalive_timeout_s=5),
        )
        self.serving = Serving()
        self.manager: SandboxManager | None = None
        self.images = NoImageBuild()
        self.pids: set[int] = set()  # every sandbox process seen (the teardown checks they are gone)

    async def start(self) -> Daemon:
        self.manager = SandboxManager(self.config, driver=LocalDriver())
        self.images = NoImageBuild()
        self.manager.adapters.images = self.images
        await self.serving.start(self.config, self.manager)
        return self

    async def stop(self) -> None:
        """What SIGTERM does: no new calls, a grace period, then leave or remove the sandboxes."""
        await self.serving.stop()

    def tree(self, sid: str) -> list[int]:
        assert self.manager is not None
        pid = self.manager.inspect_sandbox(sid).pid
        assert pid and alive(pid)
        pids = [pid, *descendants(pid)]
        self.pids.update(pids)
        return pids


@pytest_asyncio.fixture
async def daemon_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator:
    runtime = Path(tempfile.mkdtemp(prefix="abx"))  # short: Unix socket paths are limited to 107 bytes
    monkeypatch.setenv("ARCBOX_VM_RUNTIME_DIR", str(runtime))
    made: list[Daemon] = []

    def make(on_shutdown: str = "remove") -> Daemon:
        d = Daemon(tmp_path, runtime, on_shutdown)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            with contextlib.suppress(Exception):
                await d.stop()
            if d.manager is not None:
                await d.manager.close()
        pids = {p for d in made for p in d.pids}
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = [p for p in pids if alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        shutil.rmtree(runtime, ignore_errors=True)
    assert not left, f"processes outlived the daemon's sandboxes: {left}"
    assert all(d.images.calls == 0 for d in made), "no guest image was asked for"


async def wait_dead(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return [p for p in pids if alive(p)]


async def events_until(events: AsyncIterator[SandboxEvent], last: str, timeout: float = 15) -> list[SandboxEvent]:
    out: list[SandboxEvent] = []

    async def read() -> None:
        async for ev in events:
            out.append(ev)
            if ev.action == last:
                return

    await asyncio.wait_for(read(), timeout)
    return out


async def test_client_create_run_files_background_events_remove(daemon_factory, tmp_path: Path) -> None:
    d = await daemon_factory("remove").start()
    assert stat.S_IMODE(d.socket.stat().st_mode) == 0o660
    async with AsyncClient(socket=d.socket) as client:
        async with await AsyncSandbox.create(id="api", network="none", client=client, timeout=15) as sb:
            assert (await sb.info()).state == "ready"
            tree = d.tree("api")

            r = await sb.run(["sh", "-c", "echo hi; echo oops >&2; exit 3"])
            assert (r.stdout, r.stderr, r.exit_code) == (b"hi\n", b"oops\n", 3)
            r = await sb.run("echo $((6 * 7))", working_dir=str(tmp_path))
            assert (r.stdout, r.exit_code) == (b"42\n", 0)

            path = str(tmp_path / "sub" / "f.bin")
            payload = os.urandom(3 * (1 << 20) + 5)  # several upload chunks
            assert await sb.files.write(path, payload, mode=0o600, make_parents=True) == len(payload)
            assert await sb.files.read(path) == payload
            st = await sb.files.stat(path)
            assert (st.type, st.size, st.mode & 0o777) == ("file", len(payload), 0o600)
            assert [e.name for e in await sb.files.list(str(tmp_path / "sub"))] == ["f.bin"]
            assert not await sb.files.exists(str(tmp_path / "nope"))

            exec_id = await sb.start(["sh", "-c", "echo started; sleep 0.3; echo done >&2; exit 5"])
            async with await sb.attach(exec_id) as session:
                result = await asyncio.wait_for(session.wait(), 10)
            assert (result.stdout, result.stderr, result.exit_code) == (b"started\n", b"done\n", 5)
            statuses = {e.exec_id: (e.status, e.exit_code) for e in await sb.execs()}
            assert statuses[exec_id] == ("exited", 5)

            console = b"".join([chunk async for chunk in sb.logs()])
            assert b"agent starting" in console, "Logs streams the 'VM console' (the agent's own log)"
        # leaving the block removed it; the event log replays its life (since=0)
        seen = await events_until(client.events(id="api", since=0), "removed")
        with pytest.raises(SandboxNotFound):
            await client.inspect("api")
    actions = [e.action for e in seen]
    assert actions[:2] == ["created", "ready"] and actions[-1] == "removed", actions
    assert "running" in actions and "idle" in actions
    assert seen[-1].attributes["reason"] == "user"
    assert not await wait_dead(tree)
    await d.stop()
    assert not d.socket.exists(), "the daemon removes its socket on shutdown"


async def test_sync_client_against_the_daemon(daemon_factory, tmp_path: Path) -> None:
    d = await daemon_factory("remove").start()
    target = tmp_path / "sync.txt"

    def use_it() -> tuple[bytes, int, bytes, str]:
        with Sandbox.create(id="sync", network="none", socket=d.socket, timeout=15) as sb:
            r = sb.run(["sh", "-c", "echo sync"])
            sb.files.write(str(target), b"from the sync client")
            data = sb.files.read(str(target))
            state = sb.info().state
        return r.stdout, r.exit_code, data, str(state)

    out, code, data, state = await asyncio.to_thread(use_it)
    assert (out, code, data, state) == (b"sync\n", 0, b"from the sync client", "ready")
    assert target.read_bytes() == b"from the sync client", "the 'guest' is this host"
    assert d.manager is not None and d.manager.list_sandboxes() == []


async def test_daemon_restart_keeps_a_background_command_attachable(daemon_factory, tmp_path: Path) -> None:
    d = await daemon_factory("leave").start()
    async with AsyncClient(socket=d.socket) as client:
        await (await AsyncSandbox.create(id="keep", network="none", client=client, timeout=15,
                                         remove_on_exit=False)).info()
        loop_cmd = "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); sleep 0.02; done"
        exec_id = await client.start("keep", loop_cmd)
        last_event = 0
        async for ev in client.events(id="keep", since=0):
            last_event = ev.id
            if ev.action == "running":
                break
        tree = d.tree("keep")
    await d.stop()  # on_shutdown=leave: the sandbox and its command keep running
    assert alive(tree[0]), "on_shutdown=leave leaves the VM running"

    d2 = await daemon_factory("remove").start()
    async with AsyncClient(socket=d2.socket) as client:
        replay = await events_until(client.events(id="keep", since=last_event), "ready", timeout=10)
        assert replay[-1].attributes["reason"] == "adopted"
        assert replay[-1].attributes["detached_execs"] == "1"
        execs = {e.exec_id: e.status for e in await client.list_execs("keep")}
        assert execs[exec_id] == "detached"
        session = await client.attach("keep", exec_id)
        got = b""
        async for out in session:
            got += out.data
            if got.count(b"\n") >= 5:
                break
        numbers = [int(line[4:]) for line in got.splitlines() if line.startswith(b"line")]
        assert numbers and numbers == sorted(numbers)
        await client.signal("keep", exec_id, signal.SIGKILL)
        result = await asyncio.wait_for(session.wait(), 10)
        assert result.exit_code == 128 + signal.SIGKILL
        r = await client.run("keep", ["echo", "after the restart"])
        assert r.stdout == b"after the restart\n"
        await client.remove("keep", force=True)
        with pytest.raises(SandboxNotFound):
            await client.inspect("keep")


async def test_subscribe_returns_once_live_so_no_event_after_it_is_missed(daemon_factory) -> None:
    """`await client.subscribe()` then create: the `created` event is always there (with a
    bare `events()` the daemon may subscribe after the create — a race seen 1 in 20)."""
    d = await daemon_factory("remove").start()
    async with AsyncClient(socket=str(d.socket)) as client:
        for i in range(10):
            events = await client.subscribe(id=f"sub-{i}", action="created")
            await client.create(id=f"sub-{i}", network="none")
            first = await asyncio.wait_for(anext(events), 5)
            assert (first.sandbox_id, first.action) == (f"sub-{i}", "created")
            await events.aclose()
            await client.remove(f"sub-{i}", force=True)
