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
import socket
import sys
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
from arcbox_vm.config import (  # noqa: E402
    AgentConfig,
    DaemonConfig,
    DefaultVmConfig,
    E2bConfig,
    GrpcConfig,
    LimitsConfig,
)
from arcbox_vm.daemon.serve import serve  # noqa: E402
from tests.support.local_vmm import LocalDriver, NoImageBuild  # noqa: E402

KEY = "e2b_test_key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        self.task: asyncio.Task | None = None
        self.stop_event = asyncio.Event()

    async def start(self) -> "E2bDaemon":
        self.manager = SandboxManager(self.config, driver=LocalDriver())
        self.manager.adapters.images = self.images
        if self.network is not None:
            self.manager.adapters.network = self.network  # type: ignore[assignment]
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


@contextlib.asynccontextmanager
async def e2b_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> AsyncIterator[E2bDaemon]:
    """A started E2bDaemon (kwargs: its options) with the SDK's environment pointing at it."""
    runtime = Path(tempfile.mkdtemp(prefix="abx"))
    monkeypatch.setenv("ARCBOX_VM_RUNTIME_DIR", str(runtime))
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
    assert out["paused"] is False and out["running"] is True
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
