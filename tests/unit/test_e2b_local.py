"""The REAL `e2b` SDK (sync and async) against the daemon in-process over the local VMM
test double: `serve()` with [e2b] enabled on loopback ports, the real guest agent as a
host process. Commands run on this host as the test's user: they are harmless and work
in the test's temporary directory. Nothing leaves this machine (127.0.0.1 only).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

e2b = pytest.importorskip("e2b")

from e2b import AsyncSandbox, CommandExitException, Sandbox, SandboxQuery  # noqa: E402
from e2b import SandboxNotRunningException, SandboxState  # noqa: E402
from e2b.exceptions import AuthenticationException  # noqa: E402

from arcbox_vm import SandboxManager, VmmConfig  # noqa: E402
from arcbox_vm.config import (  # noqa: E402
    AgentConfig,
    DaemonConfig,
    DefaultVmConfig,
    E2bConfig,
    GrpcConfig,
    LimitsConfig,
)
from arcbox_vm.models import SandboxState as S  # noqa: E402
from tests.support.local_snapshots import SnapshotLocalDriver  # noqa: E402
from tests.support.local_daemon import Serving, free_port  # noqa: E402
from tests.support.local_vmm import NoImageBuild  # noqa: E402

KEY = "e2b_test_key"



class E2bDaemon:
    """`network`: a Network adapter standing in for TAPs (E2B sandboxes then get network
    "tap"); else they have none. `limits`: the [limits] section."""

    def __init__(self, root: Path, runtime: Path, network: object = None, limits: LimitsConfig | None = None) -> None:
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
                          default_user="root", network="tap" if network else "none", watch_interval_s=0.1),
            limits=limits or LimitsConfig(),
        )
        self.network = network
        self.images = NoImageBuild()
        self.manager: SandboxManager | None = None
        self.serving = Serving()

    async def start(self) -> "E2bDaemon":
        self.manager = SandboxManager(self.config, driver=SnapshotLocalDriver())  # can pause (fakes a save)
        self.manager.adapters.images = self.images
        if self.network is not None:
            self.manager.adapters.network = self.network  # type: ignore[assignment]
        await self.serving.start(self.config, self.manager)
        return self

    async def stop(self) -> None:
        await self.serving.stop()


@contextlib.asynccontextmanager
async def e2b_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> AsyncIterator[E2bDaemon]:
    """A started E2bDaemon (kwargs: its options) with the SDK's environment pointing at it."""
    runtime = Path(tempfile.mkdtemp(prefix="abx"))
    monkeypatch.setenv("ARCBOX_VM_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("ARCBOX_VM_MEMORY_DIR", str(tmp_path / "shm"))
    d = E2bDaemon(tmp_path, runtime, **kwargs)  # type: ignore[arg-type]
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
        shutil.rmtree(runtime, ignore_errors=True)
    assert d.images.calls == 0


@pytest_asyncio.fixture
async def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[E2bDaemon]:
    async with e2b_daemon(tmp_path, monkeypatch) as d:
        yield d


async def test_sync_sdk(daemon: E2bDaemon, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    # The sync SDK blocks in native code holding the GIL: it runs in its own process
    # (the daemon shares this test's event loop and would stall meanwhile).
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).with_name("e2b_sync_session.py")), str(work),
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    stdout, _ = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, stdout.decode(errors="replace")[-3000:]
    out = json.loads(stdout.decode().strip().splitlines()[-1])
    out = {k: tuple(v) if isinstance(v, list) and k not in ("list", "list_deep", "list_ids", "list_none") else v
           for k, v in out.items()}
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
    assert ["new.txt", "CREATE"] in out["watch"]
    assert "30 100" in out["pty"]
    assert out["list_ids"] == [out["id"]] and out["list_none"] == []
    assert out["info"][0] == out["id"] and out["info"][1] == {"suite": "e2b-local", "flavour": "sync"}
    assert out["info"][2] == "base" and out["info"][3] == "running"
    assert out["metrics"] >= 1
    assert out["paused"] is True and out["running"] is False  # paused; connect resumed it
    assert out["connect"] == "again\n"
    assert out["kill"] is True and out["kill_again"] is False
    assert daemon.manager is not None and daemon.manager.list_sandboxes() == []


async def test_async_sdk(daemon: E2bDaemon, tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()  # the "guest" is this host: its login shells must not read our profile
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    sbx = await AsyncSandbox.create(timeout=120, metadata={"flavour": "async"}, envs={"HOME": str(tmp_path.parent / "home")})
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


async def test_pause_list_connect(daemon: E2bDaemon, tmp_path: Path) -> None:
    """pause (to disk) → listed as paused → commands refused → connect resumes it: a file
    written before the pause is there, commands run, the timeout starts again."""
    mgr = daemon.manager
    assert mgr is not None
    work = tmp_path / "work"
    work.mkdir()
    home = {"HOME": str(work)}  # the "guest" is this host: its login shells must not read our profile
    sbx = await AsyncSandbox.create(timeout=120, metadata={"flavour": "pause"}, envs=home)
    other = await AsyncSandbox.create(timeout=120, metadata={"flavour": "pause"}, envs=home)
    try:
        await sbx.files.write(str(work / "before.txt"), "kept")
        assert await sbx.pause() is True
        assert mgr.inspect_sandbox(sbx.sandbox_id).state == S.PAUSED
        assert (mgr.data_dir / "sandboxes" / sbx.sandbox_id / "suspend").is_dir(), "paused to disk"
        assert await AsyncSandbox.pause(sbx.sandbox_id) is False, "already paused: 409"
        assert (await sbx.get_info()).state == SandboxState.PAUSED
        assert (await other.get_info()).state == SandboxState.RUNNING

        async def ids(*states: SandboxState) -> set[str]:
            query = SandboxQuery(metadata={"flavour": "pause"}, state=list(states) if states else None)
            return {s.sandbox_id for s in await AsyncSandbox.list(query=query).next_items()}

        assert await ids(SandboxState.PAUSED) == {sbx.sandbox_id}
        assert await ids(SandboxState.RUNNING) == {other.sandbox_id}
        assert await ids(SandboxState.RUNNING, SandboxState.PAUSED) == {sbx.sandbox_id, other.sandbox_id}
        assert await ids() == {sbx.sandbox_id, other.sandbox_id}

        assert await sbx.is_running() is False
        with pytest.raises(SandboxNotRunningException, match="paused"):
            await sbx.commands.run("true")
        with pytest.raises(SandboxNotRunningException):
            await sbx.files.read(str(work / "before.txt"))

        again = await AsyncSandbox.connect(sbx.sandbox_id, timeout=90)
        assert mgr.inspect_sandbox(sbx.sandbox_id).state in (S.READY, S.RUNNING)
        assert await again.files.read(str(work / "before.txt")) == "kept"
        assert (await again.commands.run("echo resumed")).stdout == "resumed\n"
        info = await again.get_info()
        assert info.state == SandboxState.RUNNING
        assert 60 < (info.end_at - dt_now()).total_seconds() <= 91, "connect gave it its timeout from now"
        assert (await AsyncSandbox.connect(sbx.sandbox_id)).sandbox_id == sbx.sandbox_id  # running: as before
    finally:
        assert await sbx.kill() is True
        assert await other.kill() is True


async def test_pause_unknown_and_killing_a_paused_sandbox(daemon: E2bDaemon) -> None:
    from e2b import NotFoundException

    with pytest.raises(NotFoundException):
        await AsyncSandbox.pause("no-such-sandbox")
    with pytest.raises(NotFoundException):
        await AsyncSandbox.connect("no-such-sandbox")
    sbx = await AsyncSandbox.create(timeout=120)
    assert await sbx.pause() is True
    assert await sbx.kill() is True
    assert daemon.manager is not None and daemon.manager.list_sandboxes() == []
    assert await AsyncSandbox.kill(sbx.sandbox_id) is False


async def test_auto_pause_at_the_timeout(daemon: E2bDaemon, tmp_path: Path) -> None:
    """lifecycle on_timeout "pause" (autoPause): the timeout pauses it to disk instead of
    removing it; connect resumes it with a fresh timeout."""
    mgr = daemon.manager
    assert mgr is not None
    sbx = await AsyncSandbox.create(timeout=60, lifecycle={"on_timeout": "pause"}, envs={"HOME": str(tmp_path)})
    await sbx.files.write(str(tmp_path / "auto.txt"), "still here")
    assert mgr.inspect_sandbox(sbx.sandbox_id).on_ttl == "pause"
    await sbx.set_timeout(1)
    for _ in range(100):
        if mgr.inspect_sandbox(sbx.sandbox_id).state == S.PAUSED:
            break
        await asyncio.sleep(0.1)
    assert (await sbx.get_info()).state == SandboxState.PAUSED
    await asyncio.sleep(0.5)
    assert mgr.inspect_sandbox(sbx.sandbox_id).state == S.PAUSED, "it stays paused"
    again = await AsyncSandbox.connect(sbx.sandbox_id)
    try:
        assert await again.files.read(str(tmp_path / "auto.txt")) == "still here"
        assert (await again.commands.run("echo back")).stdout == "back\n"
        await asyncio.sleep(2.5)
        assert mgr.inspect_sandbox(sbx.sandbox_id).state in (S.READY, S.RUNNING), "not paused again at once"
        end = (await again.get_info()).end_at
        assert 250 < (end - dt_now()).total_seconds() <= 300, "the SDK's default timeout from the resume"
    finally:
        assert await again.kill() is True
    with pytest.raises(Exception, match="autoResume"):
        await AsyncSandbox.create(timeout=30, lifecycle={"on_timeout": "pause", "auto_resume": True})


def dt_now():  # noqa: ANN201
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)
