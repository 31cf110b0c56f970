"""The REAL `e2b` SDK (sync and async) against the daemon in-process over the local VMM
test double: `serve()` with [e2b] enabled on loopback ports, the real guest agent as a
host process. Commands run on this host as the test's user: they are harmless and work
in the test's temporary directory. Nothing leaves this machine (127.0.0.1 only).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

e2b = pytest.importorskip("e2b")

from e2b import AsyncSandbox, CommandExitException, Sandbox, SandboxQuery  # noqa: E402
from e2b.exceptions import AuthenticationException, TimeoutException  # noqa: E402
from e2b.sandbox.commands.command_handle import PtySize  # noqa: E402

from arcbox_vm import SandboxManager, VmmConfig  # noqa: E402
from arcbox_vm.config import AgentConfig, DaemonConfig, DefaultVmConfig, E2bConfig, GrpcConfig  # noqa: E402
from arcbox_vm.daemon.serve import serve  # noqa: E402
from tests.support.local_vmm import LocalDriver, NoImageBuild  # noqa: E402

KEY = "e2b_test_key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class E2bDaemon:
    def __init__(self, root: Path, runtime: Path) -> None:
        (root / "vmlinuz").write_bytes(b"not a kernel")
        (root / "rootfs.img").write_bytes(b"not a filesystem")
        self.api = f"127.0.0.1:{free_port()}"
        self.sandbox = f"127.0.0.1:{free_port()}"
        self.config = VmmConfig(
            data_dir=root / "data",
            grpc=GrpcConfig(unix_socket=str(runtime / "d.sock")),
            defaults=DefaultVmConfig(kernel=str(root / "vmlinuz"), rootfs=str(root / "rootfs.img")),
            daemon=DaemonConfig(cgroup_parent="", on_shutdown="remove"),
            agent=AgentConfig(hello_timeout_s=15, keepalive_interval_s=0.5, keepalive_timeout_s=5),
            # the local double's "guest" is this host: no `user` account there, run as ourselves
            e2b=E2bConfig(enabled=True, api_addr=self.api, sandbox_addr=self.sandbox, api_keys=[KEY],
                          default_user="root", network="none", watch_interval_s=0.1),
        )
        self.images = NoImageBuild()
        self.manager: SandboxManager | None = None
        self.task: asyncio.Task | None = None
        self.stop_event = asyncio.Event()

    async def start(self) -> "E2bDaemon":
        self.manager = SandboxManager(self.config, driver=LocalDriver())
        self.manager.adapters.images = self.images
        ready = asyncio.Event()
        self.task = asyncio.create_task(serve(self.config, ready=ready, manager=self.manager, stop=self.stop_event))
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({waiter, self.task}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if not ready.is_set():
            waiter.cancel()
            if self.task.done():
                self.task.result()
            raise AssertionError("the daemon did not come up")
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.stop_event.set()
            await asyncio.wait_for(self.task, 30)
            self.task = None


@pytest_asyncio.fixture
async def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[E2bDaemon]:
    runtime = Path(tempfile.mkdtemp(prefix="abx"))
    monkeypatch.setenv("ARCBOX_VM_RUNTIME_DIR", str(runtime))
    d = E2bDaemon(tmp_path, runtime)
    monkeypatch.setenv("E2B_API_KEY", KEY)
    monkeypatch.setenv("E2B_API_URL", f"http://{d.api}")
    monkeypatch.setenv("E2B_SANDBOX_URL", f"http://{d.sandbox}")
    for var in ("E2B_DOMAIN", "E2B_DEBUG", "E2B_ACCESS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    await d.start()
    try:
        yield d
    finally:
        await d.stop()
        with contextlib.suppress(Exception):
            assert d.manager is not None
            await d.manager.close()
    assert d.images.calls == 0


def sync_session(work: Path) -> dict:
    """The sync SDK end to end; returns what the test checks (run in a thread: the
    daemon shares the test's event loop)."""
    out: dict = {}
    sbx = Sandbox.create(timeout=120, metadata={"suite": "e2b-local", "flavour": "sync"}, envs={"FROM_CREATE": "c"})
    try:
        r = sbx.commands.run("echo hi; echo oops >&2")
        out["run"] = (r.stdout, r.stderr, r.exit_code)
        with pytest.raises(CommandExitException) as err:
            sbx.commands.run("echo before; exit 3")
        out["exit"] = (err.value.exit_code, err.value.stdout)
        out["env"] = sbx.commands.run("echo $FROM_CREATE-$MINE", envs={"MINE": "m"}).stdout
        out["cwd"] = sbx.commands.run("pwd", cwd=str(work)).stdout
        out["root"] = sbx.commands.run("id -u", user="root").stdout if os.geteuid() == 0 else "0\n"
        seen: list[str] = []
        sbx.commands.run("for i in 1 2 3; do echo line$i; sleep 0.05; done", on_stdout=seen.append)
        out["streamed"] = "".join(seen)
        t0 = time.monotonic()
        with pytest.raises(TimeoutException):
            sbx.commands.run("sleep 30", timeout=1)
        out["timeout_s"] = time.monotonic() - t0

        bg = sbx.commands.run("sleep 60", background=True)
        out["listed"] = bg.pid in [p.pid for p in sbx.commands.list()]
        out["killed"] = bg.kill()
        with pytest.raises(CommandExitException):
            bg.wait()
        out["kill_unknown"] = sbx.commands.kill(999999)

        cat = sbx.commands.run("cat", background=True, stdin=True)
        sbx.commands.send_stdin(cat.pid, "piped\n")
        sbx.commands.close_stdin(cat.pid)
        out["stdin"] = cat.wait().stdout

        # files
        f = str(work / "dir" / "hello.txt")
        info = sbx.files.write(f, "hello file")
        out["write_info"] = (info.name, info.path)
        out["read_text"] = sbx.files.read(f)
        blob = os.urandom(10 << 20)
        sbx.files.write(str(work / "big.bin"), blob)
        out["big_ok"] = bytes(sbx.files.read(str(work / "big.bin"), format="bytes")) == blob
        out["exists"] = (sbx.files.exists(f), sbx.files.exists(str(work / "nope")))
        out["make_dir"] = (sbx.files.make_dir(str(work / "made" / "deep")), sbx.files.make_dir(str(work / "made")))
        out["list"] = sorted(e.name for e in sbx.files.list(str(work)))
        out["list_deep"] = sorted(e.path for e in sbx.files.list(str(work / "made"), depth=2))
        renamed = sbx.files.rename(f, str(work / "moved.txt"))
        out["rename"] = (renamed.name, sbx.files.exists(f))
        gi = sbx.files.get_info(str(work / "moved.txt"))
        out["get_info"] = (gi.name, gi.type.value if hasattr(gi.type, "value") else str(gi.type), gi.size)
        sbx.files.remove(str(work / "made"))
        out["removed"] = sbx.files.exists(str(work / "made"))

        # watch_dir (sync: CreateWatcher / GetWatcherEvents)
        wd = work / "watched"
        wd.mkdir()
        handle = sbx.files.watch_dir(str(wd))
        sbx.files.write(str(wd / "new.txt"), "x")
        events = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e.name == "new.txt" for e in events):
            time.sleep(0.2)
            events += handle.get_new_events()
        handle.stop()
        out["watch"] = {(e.name, e.type.name) for e in events}

        # pty
        chunks: list[bytes] = []
        pty = sbx.pty.create(PtySize(rows=24, cols=80), cwd=str(work))
        sbx.pty.resize(pty.pid, PtySize(rows=30, cols=100))
        sbx.pty.send_stdin(pty.pid, b"stty size; exit\n")
        pty.wait(on_pty=chunks.append)
        out["pty"] = b"".join(chunks)

        # the control plane
        listed = Sandbox.list(query=SandboxQuery(metadata={"flavour": "sync"})).next_items()
        out["list_ids"] = [s.sandbox_id for s in listed]
        out["list_none"] = Sandbox.list(query=SandboxQuery(metadata={"flavour": "nope"})).next_items()
        gi2 = sbx.get_info()
        out["info"] = (gi2.sandbox_id, gi2.metadata, gi2.template_id, gi2.state)
        out["metrics"] = sbx.get_metrics()
        out["paused"] = sbx.pause() if hasattr(sbx, "pause") else False
        out["running"] = sbx.is_running()
        again = Sandbox.connect(sbx.sandbox_id)
        out["connect"] = again.commands.run("echo again").stdout
        out["id"] = sbx.sandbox_id
    finally:
        out["kill"] = sbx.kill()
    out["kill_again"] = Sandbox.kill(out["id"])
    return out


async def test_sync_sdk(daemon: E2bDaemon, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = await asyncio.to_thread(sync_session, work)
    assert out["run"] == ("hi\n", "oops\n", 0)
    assert out["exit"] == (3, "before\n")
    assert out["env"] == "c-m\n"
    assert out["cwd"] == f"{work}\n"
    assert out["root"] == "0\n"
    assert out["streamed"] == "line1\nline2\nline3\n"
    assert out["timeout_s"] < 10
    assert out["listed"] and out["killed"] is True and out["kill_unknown"] is False
    assert out["stdin"] == "piped\n"
    assert out["write_info"] == ("hello.txt", str(work / "dir" / "hello.txt"))
    assert out["read_text"] == "hello file"
    assert out["big_ok"]
    assert out["exists"] == (True, False)
    assert out["make_dir"] == (True, False)
    assert out["list"] == ["big.bin", "dir", "made"]
    assert out["list_deep"] == [str(work / "made" / "deep")]
    assert out["rename"] == ("moved.txt", False)
    assert out["get_info"][0] == "moved.txt" and out["get_info"][2] == len("hello file")
    assert out["removed"] is False
    assert ("new.txt", "CREATE") in out["watch"]
    assert b"30 100" in out["pty"]
    assert out["list_ids"] == [out["id"]] and out["list_none"] == []
    assert out["info"][0] == out["id"] and out["info"][1] == {"suite": "e2b-local", "flavour": "sync"}
    assert out["info"][2] == "base"
    assert out["metrics"] and out["metrics"][0].cpu_count >= 1
    assert out["paused"] is False and out["running"] is True
    assert out["connect"] == "again\n"
    assert out["kill"] is True and out["kill_again"] is False
    assert daemon.manager is not None and daemon.manager.list_sandboxes() == []


async def test_async_sdk(daemon: E2bDaemon, tmp_path: Path) -> None:
    sbx = await AsyncSandbox.create(timeout=120, metadata={"flavour": "async"})
    try:
        r = await sbx.commands.run("echo async; echo err >&2")
        assert (r.stdout, r.stderr, r.exit_code) == ("async\n", "err\n", 0)
        with pytest.raises(CommandExitException):
            await sbx.commands.run("exit 7")
        got: list[str] = []
        await sbx.commands.run("echo a; sleep 0.05; echo b", on_stdout=got.append)
        assert "".join(got) == "a\nb\n"
        bg = await sbx.commands.run("sleep 60", background=True)
        assert await sbx.commands.kill(bg.pid) is True
        path = str(tmp_path / "async.bin")
        await sbx.files.write(path, b"\x00\x01bytes")
        assert bytes(await sbx.files.read(path, format="bytes")) == b"\x00\x01bytes"
        assert [e.name for e in await sbx.files.list(str(tmp_path))] == ["async.bin"]

        seen: list = []
        watcher = await sbx.files.watch_dir(str(tmp_path), on_event=seen.append)
        await sbx.files.write(str(tmp_path / "w.txt"), "w")
        for _ in range(100):
            if any(e.name == "w.txt" for e in seen):
                break
            await asyncio.sleep(0.1)
        await watcher.stop()
        assert any(e.name == "w.txt" and e.type.name == "CREATE" for e in seen)

        listed = await (AsyncSandbox.list(query=SandboxQuery(metadata={"flavour": "async"}))).next_items()
        assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
    finally:
        assert await sbx.kill() is True
    assert await AsyncSandbox.kill("no-such-sandbox") is False


async def test_set_timeout_removes_the_sandbox(daemon: E2bDaemon) -> None:
    sbx = await AsyncSandbox.create(timeout=120)
    await sbx.set_timeout(1)
    info = await sbx.get_info()
    assert (info.end_at - info.started_at).total_seconds() < 60
    for _ in range(100):
        if not await sbx.is_running():
            break
        await asyncio.sleep(0.1)
    assert not await sbx.is_running()
    assert daemon.manager is not None and daemon.manager.list_sandboxes() == []


async def test_wrong_api_key_is_an_authentication_error(daemon: E2bDaemon) -> None:
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.create(api_key="wrong")

    def sync() -> None:
        with pytest.raises(AuthenticationException):
            Sandbox.list(api_key="wrong").next_items()

    await asyncio.to_thread(sync)


async def test_envd_needs_the_access_token(daemon: E2bDaemon) -> None:
    import httpx

    sbx = await AsyncSandbox.create(timeout=60)
    try:
        base = f"http://{daemon.sandbox}"
        async with httpx.AsyncClient() as client:
            hdr = {"E2b-Sandbox-Id": sbx.sandbox_id}
            assert (await client.get(f"{base}/files", params={"path": "/etc/hostname"}, headers=hdr)).status_code == 401
            gone = await client.get(f"{base}/health", headers={"E2b-Sandbox-Id": "nope"})
            assert gone.status_code == 502 and "was not found" in gone.json()["message"]
            other = await client.get(f"{base}/", headers={**hdr, "X-Access-Token": sbx._envd_access_token,
                                                           "E2b-Sandbox-Port": "8080"})
            assert other.status_code == 502 and "port is not open" in other.json()["message"]
    finally:
        await sbx.kill()
