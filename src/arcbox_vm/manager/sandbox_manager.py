"""SandboxManager: the library API (a Pythonic port of the original's, without its bugs).

- Ready means the agent's HELLO arrived; TTL counts from ready.
- Stop really waits: agent shutdown, then the VMM's own stop request, then kill.
- Several commands may run at once; RUNNING while any runs, READY after the last.
- Remove and boot failure release everything: process, TAP, IP lease, sockets, disk copy, directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Any

from arcbox_vm.agent import protocol
from arcbox_vm.agent.host import AgentConnection, FileReader
from arcbox_vm.config import VmmConfig
from arcbox_vm.errors import (
    ArcboxError,
    BootFailed,
    InvalidArgument,
    InvalidState,
    SandboxAlreadyExists,
    SandboxNotFound,
)
from arcbox_vm.manager import execs as _execs
from arcbox_vm.manager import files as _files
from arcbox_vm.manager.background import ExecAttachment
from arcbox_vm.manager.boot import BootRequest, boot_vm
from arcbox_vm.manager.events import EventLog, EventSubscription
from arcbox_vm.manager.exec_stream import ExecHandle, ExecStream
from arcbox_vm.manager.images import ImageResolver
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.manager.recovery import recover
from arcbox_vm.models import ExecInfo, FileStat, SandboxInfo, SandboxSpec, SandboxState, SandboxSummary
from arcbox_vm.network.backend import TapNetwork
from arcbox_vm.ports import VmmDriver
from arcbox_vm.storage.state import StateError, StateStore
from arcbox_vm.vmm.adopted import process_start_time
from arcbox_vm.vmm.select import select_driver

log = logging.getLogger(__name__)

S = SandboxState
_LIVE = (S.READY, S.RUNNING)


class SandboxManager:
    """Creates, runs commands in, stops and removes sandboxes (microVMs).

    The constructor touches nothing slow; the first call that needs it takes the data
    dir's lock, removes what a crashed manager left behind, and selects the VMM.
    Use `async with SandboxManager(cfg) as mgr:` or call `await mgr.close()`, which
    removes every sandbox this manager owns.
    """

    def __init__(self, config: VmmConfig | None = None, *, driver: VmmDriver | None = None) -> None:
        self.config = config or VmmConfig()
        self.data_dir = self.config.data_dir
        self._driver = driver
        self._sandboxes: dict[str, SandboxRecord] = {}
        self._store = StateStore(self.data_dir)
        self._events: EventLog | None = None
        self._network = TapNetwork(self.config.network, self.data_dir)
        self._images = ImageResolver(self.config, self.data_dir)
        self._lock_fd: int | None = None
        self._start_lock: asyncio.Lock | None = None
        self._started = False
        self._closed = False
        self._keep_commands = False  # see keep_commands_running
        self._execs = _execs.ExecBook(self._store, self._emit, lambda: self._closed, lambda: self._keep_commands)

    # -- lifecycle of the manager itself ---------------------------------------------

    @property
    def driver(self) -> VmmDriver:
        if self._driver is None:
            self._driver = select_driver(self.config.backend, qemu=self.config.qemu,
                                         firecracker=self.config.firecracker)
        return self._driver

    async def _ensure_started(self) -> None:
        if self._closed:
            raise ArcboxError("this SandboxManager is closed; create a new one")
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            try:
                (self.data_dir / "sandboxes").mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StateError(f"cannot use the data dir {self.data_dir}: {exc.strerror}") from None
            self._take_lock()
            try:
                self._open_store()
                await recover(self)
            except BaseException:
                self._store.close()
                self._release_lock()
                raise
            self._started = True

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _take_lock(self) -> None:
        try:
            fd = os.open(self.data_dir / "manager.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"cannot use the data dir {self.data_dir}: {exc.strerror}; check that it is "
                             "writable and not full") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ArcboxError(f"another arcbox-vm manager is using {self.data_dir}; stop it or use another "
                              "data dir (firecracker.data_dir)") from None
        self._lock_fd = fd

    async def close(self, remove_sandboxes: bool = True) -> None:
        """Release the data dir. remove_sandboxes=True (default) removes every sandbox and
        undoes the network set-up; False leaves the VMs running, recorded in the state
        database, for the next manager on this data dir to adopt."""
        if self._closed:
            return
        if not remove_sandboxes:
            self.keep_commands_running()
        self._closed = True
        if not self._started:
            return
        if remove_sandboxes:
            for sb in list(self._sandboxes.values()):
                with contextlib.suppress(Exception):
                    await self._remove(sb, reason="manager_closed")
            with contextlib.suppress(Exception):
                await self._network.close()
        else:
            await self._detach_all()
            if not any(sb.state in _LIVE for sb in self._sandboxes.values()):
                with contextlib.suppress(Exception):
                    await self._network.close()  # nothing to keep: no namespace, TAP or rule
        if self._events is not None:
            self._events.close()
        self._store.close()
        self._release_lock()

    def keep_commands_running(self) -> None:
        """From now on a command whose stream is dropped is left running in the guest
        (detached, re-attachable by the next manager on this data dir) instead of killed:
        for a shutdown that leaves the VMs running (`close(remove_sandboxes=False)`, the
        daemon's on_shutdown=leave)."""
        self._keep_commands = True

    async def _detach_all(self) -> None:
        """Let go of every VM without stopping it (booting ones cannot be adopted: removed)."""
        for sb in list(self._sandboxes.values()):
            if sb.state == S.STARTING:
                with contextlib.suppress(Exception):
                    await self._remove(sb, reason="manager_closed")
                continue
            self._cancel_tasks(sb, "watch", "ttl", "boot")
            # first: commands keep running in the guest (keep_commands_running), their unread output saved
            self._execs.forget_all(sb, save=True)
            vm, sb.vm = sb.vm, None
            if vm is not None:
                await vm.detach()

    async def __aenter__(self) -> "SandboxManager":
        await self._ensure_started()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- queries ---------------------------------------------------------------------

    def _get(self, sandbox_id: str) -> SandboxRecord:
        sb = self._sandboxes.get(sandbox_id)
        if sb is None or sb.removed:
            raise SandboxNotFound(sandbox_id)
        return sb

    def inspect_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return self._get(sandbox_id).info()

    def list_sandboxes(self, state: SandboxState | str | None = None,
                       labels: dict[str, str] | None = None) -> list[SandboxSummary]:
        """Sandboxes in `state` (None/"" = any) carrying every label in `labels`."""
        want = SandboxState(str(state).lower()) if state else None
        out = []
        for sb in self._sandboxes.values():
            if sb.removed or (want is not None and sb.state != want):
                continue
            if labels and any(sb.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(sb.summary())
        return sorted(out, key=lambda s: s.created_at)

    def subscribe_events(self, since: int | None = None) -> EventSubscription:
        """Events from now on, or every event after id `since` (replayed from the log)."""
        if self._closed:
            raise ArcboxError("this SandboxManager is closed; create a new one")
        return self._open_store().subscribe(since)

    def _open_store(self) -> EventLog:
        """Open the state database (sync and cheap, so subscribing works before start)."""
        if self._events is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._store.open()
            self._events = EventLog(self._store)
        return self._events

    async def start(self) -> None:
        """Open the state, adopt surviving VMs, clean up orphans (done lazily otherwise)."""
        await self._ensure_started()

    def _save(self, sb: SandboxRecord) -> None:
        """Persist the record; must happen before the change is announced."""
        if sb.vm is not None and sb.vm.process.returncode is None:
            sb.pid = sb.vm.process.pid
            if sb.pid_start is None:
                sb.pid_start = process_start_time(sb.pid)
        elif sb.vm is None:
            sb.pid = sb.pid_start = None
        self._store.put_sandbox(sb.to_row(), sb.lease.ip if sb.lease else None)

    def _emit(self, sb: SandboxRecord, action: str, **attrs: Any) -> None:
        """Persist the record's new state, then append and announce the event."""
        assert self._events is not None
        if action == "removed":
            self._store.delete_sandbox(sb.id)
        else:
            self._save(sb)
        self._events.append(sb.id, action, **attrs)

    # -- create ----------------------------------------------------------------------

    async def create_sandbox(self, spec: SandboxSpec | None = None) -> tuple[str, str]:
        """Register a sandbox and start booting it; returns (id, ip) before boot ("" = no network)."""
        spec = spec or SandboxSpec()
        if not isinstance(spec, SandboxSpec):
            raise InvalidArgument("create_sandbox takes a SandboxSpec")
        await self._ensure_started()
        sid = spec.id or str(uuid.uuid4())
        if sid in self._sandboxes:
            raise SandboxAlreadyExists(sid)
        d = self.config.defaults
        sb = SandboxRecord(
            id=sid, labels=dict(spec.labels), vcpus=spec.vcpus or d.vcpus,
            memory_mib=spec.memory_mib or d.memory_mib, kernel=spec.kernel or d.kernel,
            rootfs=spec.rootfs or d.rootfs, initrd=spec.initrd or d.initrd,
            boot_args=spec.boot_args or d.boot_args, env=dict(spec.env), working_dir=spec.working_dir,
            user=spec.user, ttl_seconds=spec.ttl_seconds, network_mode=spec.network.mode,
            workdir=self.data_dir / "sandboxes" / sid,
        )
        if sb.workdir.exists():
            raise SandboxAlreadyExists(sid)
        self._sandboxes[sid] = sb  # reserve the id before the first await
        try:
            if sb.network_mode == "tap":
                sb.lease = await self._network.allocate(sid)
            self._emit(sb, "created")  # recorded before anything else happens
        except BaseException:
            del self._sandboxes[sid]
            await self._release_network(sb)
            raise
        sb.tasks["boot"] = asyncio.create_task(self._boot(sb), name=f"boot-{sid}")
        return sid, sb.lease.ip if sb.lease else ""

    async def _boot(self, sb: SandboxRecord) -> None:
        driver = self.driver
        sb.vmm = driver.name
        try:
            kernel, initrd, rootfs = await self._images.resolve(driver, sb.kernel, sb.initrd, sb.rootfs)
            lease = sb.lease
            req = BootRequest(
                sandbox_id=sb.id, workdir=sb.workdir, kernel=kernel, rootfs=rootfs, initrd=initrd,
                vcpus=sb.vcpus, memory_mib=sb.memory_mib, boot_args=sb.boot_args,
                extra_boot_args=lease.boot_args if lease else (),
                tap_name=lease.tap_name if lease else None, guest_mac=lease.mac if lease else None,
                netns=self._network.netns if lease else "",
                hello_timeout=self.config.agent.hello_timeout_s,
            )
            vm = await boot_vm(driver, req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._release_network(sb)
            sb.state = S.FAILED
            sb.error = str(exc)
            log.warning("sandbox %s failed to boot: %s", sb.id, exc)
            self._emit(sb, "failed", error=str(exc), reason="boot_error")
            return
        sb.vm = vm
        sb.state = S.READY
        sb.ready_at = time.time()
        try:
            self._emit(sb, "ready")
        except ArcboxError as exc:  # could not record it: do not run an unrecorded VM
            sb.vm = None
            await vm.destroy()
            await self._release_network(sb)
            sb.state = S.FAILED
            sb.error = str(exc)
            return
        self._start_watchers(sb)

    def _start_watchers(self, sb: SandboxRecord) -> None:
        """VMM-exit watcher, and the TTL timer (counted from ready) when one is set."""
        sb.tasks["watch"] = asyncio.create_task(self._watch_vmm(sb), name=f"watch-{sb.id}")
        if sb.ttl_seconds > 0:
            sb.tasks["ttl"] = asyncio.create_task(self._ttl(sb), name=f"ttl-{sb.id}")

    async def _watch_vmm(self, sb: SandboxRecord) -> None:
        """An unexpected VMM exit (reason vmm_exited) or an agent that stopped answering
        its keepalive (reason agent_unresponsive; the VMM is then killed) fails the sandbox."""
        vm = sb.vm
        assert vm is not None
        a = self.config.agent
        vm.agent.start_keepalive(a.keepalive_interval_s, a.keepalive_timeout_s)
        exited = asyncio.ensure_future(vm.process.wait())
        try:
            await asyncio.wait({exited, vm.agent.closed}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():  # a guest that powers off closes the channel just before
                await asyncio.wait({exited}, timeout=5.0)
        finally:
            if not exited.done():
                exited.cancel()
        if sb.state not in _LIVE or sb.removed or sb.vm is not vm:
            return  # stop/remove in progress: they own the outcome
        if exited.done() and not exited.cancelled():
            reason, sb.error = "vmm_exited", f"the VMM exited unexpectedly (status {exited.result()})"
        else:
            reason, sb.error = "agent_unresponsive", f"the guest agent stopped answering: {vm.agent.closed.result()}"
        sb.state = S.FAILED
        sb.vm = None
        await vm.destroy()
        await self._release_network(sb)
        self._emit(sb, "failed", error=sb.error, reason=reason)

    async def _ttl(self, sb: SandboxRecord) -> None:
        await asyncio.sleep(max(0.0, (sb.ready_at or time.time()) + sb.ttl_seconds - time.time()))
        if not sb.removed:
            sb.tasks.pop("ttl", None)  # do not cancel ourselves
            await self._remove(sb, reason="ttl")

    async def _release_network(self, sb: SandboxRecord) -> None:
        lease, sb.lease = sb.lease, None
        if lease is not None:
            try:
                await self._network.release(lease)
            except Exception:
                log.exception("releasing the network of sandbox %s failed", sb.id)

    # -- stop / remove ---------------------------------------------------------------

    async def stop_sandbox(self, sandbox_id: str, timeout_seconds: float = 30) -> None:
        """Shut the guest down gracefully (up to `timeout_seconds`, 0 = 30), then kill it.

        The VM's process, disk copy, TAP and IP are released; the record stays STOPPED
        until removed.
        """
        sb = self._get(sandbox_id)
        async with sb.lock:
            if sb.state not in _LIVE:
                raise InvalidState(sb.id, sb.state.value, "only a ready or running sandbox can be stopped")
            timeout = timeout_seconds if timeout_seconds and timeout_seconds > 0 else 30
            sb.state = S.STOPPING
            self._emit(sb, "stopping", reason="user")
            self._cancel_tasks(sb, "watch", "ttl")
            vm, sb.vm = sb.vm, None
            graceful = False
            if vm is not None:
                graceful = await vm.shutdown(timeout)
                await vm.destroy()
            self._execs.forget_all(sb)
            await self._release_network(sb)
            sb.state = S.STOPPED
            self._emit(sb, "stopped", reason="user", graceful=str(graceful).lower())

    async def remove_sandbox(self, sandbox_id: str, force: bool = False) -> None:
        """Remove a sandbox and everything made for it. A RUNNING one needs force=True."""
        sb = self._get(sandbox_id)
        if sb.state == S.RUNNING and not force:
            raise InvalidState(sb.id, sb.state.value, "commands are running in it; pass force=True to remove it anyway")
        await self._remove(sb, reason="user")

    async def _remove(self, sb: SandboxRecord, reason: str) -> None:
        if sb.removed:
            return
        sb.removed = True
        sb.removing = True
        with contextlib.suppress(ArcboxError):
            self._save(sb)  # a restart finishes what this starts
        self._cancel_tasks(sb, "watch", "ttl")
        boot = sb.tasks.pop("boot", None)
        if boot is not None and not boot.done():
            boot.cancel()
        if boot is not None:
            with contextlib.suppress(BaseException):
                await boot  # its start-up steps undo themselves
        async with sb.lock:
            vm, sb.vm = sb.vm, None
            if vm is not None:
                await vm.destroy()
            self._execs.forget_all(sb)
            await self._release_network(sb)
            shutil.rmtree(sb.workdir, ignore_errors=True)
            self._sandboxes.pop(sb.id, None)
            self._emit(sb, "removed", reason=reason)

    def _cancel_tasks(self, sb: SandboxRecord, *names: str) -> None:
        current = asyncio.current_task()
        for name in names:
            task = sb.tasks.pop(name, None)
            if task is not None and task is not current:
                task.cancel()

    # -- commands --------------------------------------------------------------------

    def _exec_request(self, sb: SandboxRecord, cmd: list[str], env: dict[str, str] | None, working_dir: str,
                      user: str, tty: bool, tty_size: tuple[int, int] | None, timeout_seconds: float,
                      stdin: bool) -> dict[str, Any]:
        if not cmd or not all(isinstance(c, str) for c in cmd):
            raise InvalidArgument("cmd must be a non-empty list of strings")
        cols, rows = tty_size or (80, 24)
        merged = {**sb.env, **(env or {})}
        try:
            return protocol.validate_exec_request(protocol.exec_request(
                cmd, env=merged, cwd=working_dir or sb.working_dir, user=user or sb.user, tty=tty,
                rows=rows, cols=cols, timeout=timeout_seconds or 0, stdin=stdin))
        except protocol.ProtocolError as exc:
            raise InvalidArgument(exc.message) from None

    async def _start_exec(self, sb: SandboxRecord, request: dict[str, Any], cls: type[ExecStream]) -> ExecStream:
        if sb.state not in _LIVE or sb.vm is None:
            raise InvalidState(sb.id, sb.state.value, "commands run only in a ready or running sandbox")
        session = await sb.vm.agent.exec(request)
        return self._execs.track(sb, session, list(request["argv"]), cls)

    async def run_in_sandbox(self, sandbox_id: str, cmd: list[str], env: dict[str, str] | None = None,
                             working_dir: str = "", user: str = "", tty: bool = False,
                             tty_size: tuple[int, int] | None = None, timeout_seconds: float = 0) -> ExecStream:
        """Start `cmd` (no stdin); iterate the result for OutputChunks, the last being "exit"
        (or "error"). Unknown id, wrong state or a command that cannot start raise here."""
        sb = self._get(sandbox_id)
        req = self._exec_request(sb, cmd, env, working_dir, user, tty, tty_size, timeout_seconds, stdin=False)
        return await self._start_exec(sb, req, ExecStream)

    async def exec_in_sandbox(self, sandbox_id: str, cmd: list[str], env: dict[str, str] | None = None,
                              working_dir: str = "", user: str = "", tty: bool = False,
                              tty_size: tuple[int, int] | None = None, timeout_seconds: float = 0) -> ExecHandle:
        """Like run_in_sandbox, interactive: `send_stdin()`, `resize()`, `close_stdin()`."""
        sb = self._get(sandbox_id)
        req = self._exec_request(sb, cmd, env, working_dir, user, tty, tty_size, timeout_seconds, stdin=True)
        stream = await self._start_exec(sb, req, ExecHandle)
        assert isinstance(stream, ExecHandle)
        return stream

    async def start_exec(self, sandbox_id: str, cmd: list[str], env: dict[str, str] | None = None,
                         working_dir: str = "", user: str = "", tty: bool = False,
                         tty_size: tuple[int, int] | None = None, timeout_seconds: float = 0,
                         stdin: bool = False) -> str:
        """Start `cmd` in the background and return its exec id at once. The manager reads
        its output (keeping the newest 1 MiB while nobody is attached), so it never blocks;
        `attach_exec` streams it, `signal_exec` stops it, `list_execs` shows its status and
        exit code. `stdin=True` gives it a pipe an attached client can write to."""
        sb = self._get(sandbox_id)
        req = self._exec_request(sb, cmd, env, working_dir, user, tty, tty_size, timeout_seconds, stdin=stdin)
        self._execs.check_room(sb)
        handle = await self._start_exec(sb, req, ExecHandle)
        assert isinstance(handle, ExecHandle)
        return self._execs.hold(sb, handle).exec_id

    async def attach_exec(self, sandbox_id: str, exec_id: str) -> ExecAttachment:
        """Attach to a background command (`start_exec`), or to one that kept running while
        the daemon was away ("detached" in `list_execs`): iterate the result for the output
        kept meanwhile, the rest and the exit; stdin/resize work if the command has them.
        Closing the attachment (`aclose()`) detaches: the command runs on. Unknown id:
        ExecNotFound; another client attached, or not running: ExecNotAttachable."""
        sb = self._get(sandbox_id)
        if sb.state not in _LIVE or sb.vm is None:
            raise InvalidState(sb.id, sb.state.value, "commands can be attached only in a ready or running sandbox")
        return await self._execs.attach(sb, sb.vm.agent, exec_id)

    async def signal_exec(self, sandbox_id: str, exec_id: str, signum: int = signal.SIGKILL) -> None:
        """Send `signum` (default SIGKILL) to a running command's process group."""
        sb = self._get(sandbox_id)
        if not 1 <= int(signum) <= 64:
            raise InvalidArgument(f"signal must be 1..64, got {signum}")
        await self._execs.signal(sb, exec_id, int(signum))

    def list_execs(self, sandbox_id: str) -> list[ExecInfo]:
        """Every command run in the sandbox (oldest first) with its exec id and status."""
        sb = self._get(sandbox_id)
        return self._execs.list(sb)

    # -- files -----------------------------------------------------------------------

    def _file_agent(self, sandbox_id: str) -> AgentConnection:
        sb = self._get(sandbox_id)
        if sb.state not in _LIVE or sb.vm is None:
            raise InvalidState(sb.id, sb.state.value, "files move only in and out of a ready or running sandbox")
        return sb.vm.agent

    @property
    def _file_limit(self) -> int:
        return _files.limit_bytes(self.config.daemon.max_file_mib)

    async def write_file(self, sandbox_id: str, path: str, data: AsyncIterable[bytes], *, mode: int = 0o644,
                         uid: int = 0, gid: int = 0, make_parents: bool = False, size: int | None = None) -> int:
        """Stream `data` into the guest file `path`, atomically replacing it; returns bytes written.

        The file gets `mode` and `uid`:`gid`; with a non-root uid the guest creates it with
        that user's permissions (a root-only directory refuses). `make_parents` creates
        missing directories (0755, owned by uid:gid). `size`, if given, must match the data.
        Larger than `daemon.max_file_mib` raises FileTooLarge. The sandbox state is unchanged.
        """
        agent = self._file_agent(sandbox_id)
        return await _files.write_file(agent, path, data, mode=mode, uid=uid, gid=gid, make_parents=make_parents,
                                       size=size, limit=self._file_limit)

    async def read_file(self, sandbox_id: str, path: str) -> FileReader:
        """Open the guest file `path` for download: `.size`, async-iterate bytes, `aclose()`."""
        return await _files.read_file(self._file_agent(sandbox_id), path, limit=self._file_limit)

    async def stat_path(self, sandbox_id: str, path: str) -> FileStat:
        """Type, size, mode, owner, mtime (and link target) of a guest path; symlinks are followed."""
        return await _files.stat_path(self._file_agent(sandbox_id), path)

    async def list_dir(self, sandbox_id: str, path: str) -> list[FileStat]:
        """The entries of a guest directory, sorted by name (the result's `.truncated` is true
        when the directory was too big to list whole)."""
        return await _files.list_dir(self._file_agent(sandbox_id), path)

    # -- helpers for tests and tools -------------------------------------------------

    async def wait_ready(self, sandbox_id: str, timeout: float = 120) -> SandboxInfo:
        """Wait until the sandbox is READY (raises BootFailed if it fails)."""
        sb = self._get(sandbox_id)
        boot = sb.tasks.get("boot")
        if boot is not None:
            await asyncio.wait_for(asyncio.shield(boot), timeout)
        if sb.state == S.FAILED:
            raise BootFailed(sb.error or "boot failed")
        return sb.info()

    def console_log(self, sandbox_id: str) -> Path:
        return self._get(sandbox_id).workdir / "console.log"
