"""SandboxManager: the library API (a Pythonic port of the original's, without its bugs).

A thin facade: each method validates, finds the record and calls a use case —
`lifecycle.py` (create, boot, watch, TTL, stop, remove), `recovery.py` (start-up),
`execs.py` / `background.py` (commands), `files.py`, `console.py` — over a shared
`ManagerContext`. The adapters come from `arcbox_vm.composition` unless given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

from arcbox_vm.agent import protocol
from arcbox_vm.agent.host import AgentConnection, FileReader
from arcbox_vm.config import VmmConfig
from arcbox_vm.errors import ArcboxError, BootFailed, ExecError, InvalidArgument, InvalidState, StateError
from arcbox_vm.manager import files as _files
from arcbox_vm.manager import lifecycle, network_policy, pausing, ports
from arcbox_vm.manager.background import ExecAttachment
from arcbox_vm.manager.console import follow_console
from arcbox_vm.manager.context import BootPlanHook, ManagerContext
from arcbox_vm.manager.datadir_lock import DataDirLock
from arcbox_vm.manager.events import EventSubscription
from arcbox_vm.manager.images import named_image
from arcbox_vm.manager.exec_stream import ExecHandle, ExecStream
from arcbox_vm.manager.observers import ExecNote, Observers
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.manager.pausing import require_live, stop_paused
from arcbox_vm.manager.recovery import recover
from arcbox_vm.manager.snapshot_facade import SnapshotOperations
from arcbox_vm.manager.templates import create as _from_template
from arcbox_vm.manager.templates import records as _templates
from arcbox_vm.manager.templates.facade import TemplateOperations
from arcbox_vm.manager.stats import read_stats
from arcbox_vm.models import (
    ExecInfo,
    ExecSpec,
    FileStat,
    SandboxInfo,
    SandboxSpec,
    SandboxState,
    SandboxStats,
    SandboxSummary,
)
from arcbox_vm.ports import Adapters, VmmDriver

log = logging.getLogger(__name__)

S = SandboxState
_LIVE = lifecycle.LIVE


class SandboxManager(SnapshotOperations, TemplateOperations):
    """Creates, runs commands in, checkpoints, restores, pauses, stops and removes sandboxes (microVMs).

    The constructor touches nothing slow; the first call that needs it takes the data
    dir's lock, removes what a crashed manager left behind, and selects the VMM.
    Use `async with SandboxManager(cfg) as mgr:` or call `await mgr.close()`, which
    removes every sandbox this manager owns. `adapters` (or just `driver`) replace what
    `arcbox_vm.composition.build_adapters(config)` would build.
    """

    def __init__(self, config: VmmConfig | None = None, *, driver: VmmDriver | None = None,
                 adapters: Adapters | None = None) -> None:
        self.config = config or VmmConfig()
        if adapters is None:
            from arcbox_vm.composition import build_adapters  # the composition root (no cycle: it imports no manager)

            adapters = build_adapters(self.config, driver=driver)
        self._ctx = ManagerContext(self.config, adapters)
        self._ctx.pause_to_disk = lambda sb: pausing.pause(self._ctx, sb, to_disk=True)  # on_ttl "pause"
        self.data_dir = self.config.data_dir
        self._lock = DataDirLock(self.data_dir)
        self._start_lock: asyncio.Lock | None = None
        self._started = False

    # -- lifecycle of the manager itself ---------------------------------------------

    @property
    def driver(self) -> VmmDriver:
        return self._ctx.driver

    @property
    def adapters(self) -> Adapters:
        """The adapters this manager works with (driver, network, store, images, cgroups)."""
        return self._ctx.adapters

    @property
    def boot_plan_hooks(self) -> list[BootPlanHook]:
        """Functions called with each sandbox's `BootPlan` (and record) before it runs:
        they may insert, replace or remove named steps."""
        return self._ctx.boot_plan_hooks

    @property
    def observers(self) -> Observers:
        """Callbacks told about lifecycle events (with durations), finished commands and
        guest agent failures (see manager/observers.py; `arcbox_vm.metrics` uses them)."""
        return self._ctx.observers

    async def _ensure_started(self) -> None:
        if self._ctx.closed:
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
            self._lock.acquire()
            try:
                self._ctx.open_events()
                await recover(self._ctx)
                await self._remove_build_sandboxes()
                _templates.reconcile(self._ctx)
                self._start_pool()
            except BaseException:
                self._ctx.store.close()
                self._lock.release()
                raise
            self._started = True

    async def _remove_build_sandboxes(self) -> None:
        """Build sandboxes a crashed manager left (a build never outlives its manager)."""
        for sb in list(self._ctx.sandboxes.values()):
            if _templates.BUILD_LABEL in sb.labels:
                with contextlib.suppress(Exception):
                    await lifecycle.remove(self._ctx, sb, reason="template_build_interrupted")

    async def start(self) -> None:
        """Open the state, adopt surviving VMs, clean up orphans (done lazily otherwise)."""
        await self._ensure_started()

    async def close(self, remove_sandboxes: bool = True) -> None:
        """Release the data dir. remove_sandboxes=True (default) removes every sandbox and
        undoes the network set-up; False leaves the VMs running, recorded in the state
        database, for the next manager on this data dir to adopt."""
        ctx = self._ctx
        if ctx.closed:
            return
        if not remove_sandboxes:
            self.keep_commands_running()
        ctx.closed = True
        if not self._started:
            return
        await self._close_pool()  # its sandboxes never outlive the manager
        if remove_sandboxes:
            for sb in list(ctx.sandboxes.values()):
                with contextlib.suppress(Exception):
                    await lifecycle.remove(ctx, sb, reason="manager_closed")
            with contextlib.suppress(Exception):
                await ctx.network.close()
        else:
            await lifecycle.detach_all(ctx)
            if not any(sb.state in lifecycle.WATCHED for sb in ctx.sandboxes.values()):
                with contextlib.suppress(Exception):
                    await ctx.network.close()  # nothing to keep: no namespace, TAP or rule
        if ctx.events is not None:
            ctx.events.close()
        ctx.store.close()
        self._lock.release()

    def keep_commands_running(self) -> None:
        """From now on a command whose stream is dropped is left running in the guest
        (detached, re-attachable by the next manager on this data dir) instead of killed:
        for a shutdown that leaves the VMs running (`close(remove_sandboxes=False)`, the
        daemon's on_shutdown=leave)."""
        self._ctx.keep_commands = True

    async def __aenter__(self) -> "SandboxManager":
        await self._ensure_started()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- queries ---------------------------------------------------------------------

    def _get(self, sandbox_id: str) -> SandboxRecord:
        return self._ctx.get(sandbox_id)

    def inspect_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return self._get(sandbox_id).info()

    def list_sandboxes(self, state: SandboxState | str | None = None,
                       labels: dict[str, str] | None = None) -> list[SandboxSummary]:
        """Sandboxes in `state` (None/"" = any) carrying every label in `labels`."""
        want = SandboxState(str(state).lower()) if state else None
        out = []
        for sb in list(self._ctx.sandboxes.values()):  # a snapshot: also callable from another thread
            if sb.removed or sb.pool or (want is not None and sb.state != want):
                continue
            if labels and any(sb.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(sb.summary())
        return sorted(out, key=lambda s: s.created_at)

    def sandbox_stats(self, ids: list[str] | None = None) -> list[SandboxStats]:
        """CPU seconds, memory, I/O bytes and processes of each sandbox's VMM, read now from
        its cgroup (else its process tree): of `ids` (zeros where no VMM runs; an unknown id
        raises SandboxNotFound), or of every sandbox whose VMM runs. Blocking file reads,
        safe from any thread: from async code with many sandboxes, `asyncio.to_thread` it."""
        return read_stats(self._ctx, ids)

    def subscribe_events(self, since: int | None = None, *, sandbox_id: str = "",
                         action: str = "") -> EventSubscription:
        """Events from now on, or every event after id `since` (replayed from the log);
        only those of `sandbox_id` / `action` when given ("lagged" always comes through)."""
        if self._ctx.closed:
            raise ArcboxError("this SandboxManager is closed; create a new one")
        return self._ctx.open_events().subscribe(since, sandbox_id, action)

    # -- create / stop / remove ------------------------------------------------------

    async def create_sandbox(self, spec: SandboxSpec | None = None) -> tuple[str, str]:
        """Register a sandbox and start booting it; returns (id, ip) before boot ("" = no network)."""
        spec = spec or SandboxSpec()
        if not isinstance(spec, SandboxSpec):
            raise InvalidArgument("create_sandbox takes a SandboxSpec")
        await self._ensure_started()
        if spec.template:  # a restore of the template's checkpoint (or its pool's): its service already runs
            return await self._with_room(lambda: _from_template.create(self._ctx, spec, self._pools))
        return self._take_from_pool(spec) or await self._with_room(lambda: lifecycle.create(self._ctx, spec))

    def resolve_image_names(self, spec: SandboxSpec) -> SandboxSpec:
        """For untrusted callers (the API): `spec` with its kernel/initrd/rootfs names
        replaced by the files they name in the images directory (`images.dir`); anything
        else — a host path, `..`, a symlink out of it, a missing file — raises
        InvalidArgument before anything is made."""
        d = self.config.named_images_dir
        return spec.model_copy(update={what: named_image(d, getattr(spec, what), what)
                                       for what in ("kernel", "initrd", "rootfs")})

    def set_ttl(self, sandbox_id: str, seconds: float) -> None:
        """Remove the sandbox `seconds` from now (0 = never), replacing its TTL. Before it
        is ready, `seconds` counts from ready (as a TTL given at create does)."""
        if not 0 <= seconds <= 10 * 365 * 86400:
            raise InvalidArgument(f"seconds must be between 0 and ten years, got {seconds}")
        lifecycle.set_ttl(self._ctx, self._get(sandbox_id), seconds)

    async def stop_sandbox(self, sandbox_id: str, timeout_seconds: float = 30) -> None:
        """Shut the guest down gracefully (up to `timeout_seconds`, 0 = 30), then kill it.

        The VM's process, disk copy, TAP and IP are released; the record stays STOPPED
        until removed.
        """
        sb = self._get(sandbox_id)
        timeout = timeout_seconds if timeout_seconds and timeout_seconds > 0 else 30
        if sb.state == S.PAUSED:
            await stop_paused(self._ctx, sb)
        await lifecycle.stop(self._ctx, sb, timeout)

    async def remove_sandbox(self, sandbox_id: str, force: bool = False) -> None:
        """Remove a sandbox and everything made for it. A RUNNING one needs force=True."""
        sb = self._get(sandbox_id)
        if sb.state == S.RUNNING and not force:
            raise InvalidState(sb.id, sb.state.value, "commands are running in it; pass force=True to remove it anyway")
        await lifecycle.remove(self._ctx, sb, reason="user")

    async def update_network(self, sandbox_id: str, *, egress: str | None = None,
                             allow_out: list[str] | None = None, deny_out: list[str] | None = None) -> SandboxInfo:
        """Change a sandbox's egress policy; None keeps that part. egress "none" | "nat";
        allow_out / deny_out replace the lists (IPv4 CIDRs; deny wins). A running sandbox's
        rules change at once — connections to what is no longer allowed stop too —, and the
        record keeps the policy for a restarted daemon. InvalidArgument for a bad CIDR;
        InvalidState for a sandbox without network."""
        sb = self._get(sandbox_id)
        await network_policy.update(self._ctx, sb, egress, allow_out, deny_out)
        return sb.info()

    async def connect_port(self, sandbox_id: str, port: int) -> ports.PortStream:
        """A TCP connection to 127.0.0.1:`port` inside a ready or running sandbox, through
        its guest agent (no network needed): `read()` / `write()` / `write_eof()`, then
        `close()` (or `async with`). It counts against `[limits] max_port_connections` with
        the sandbox's forwarded connections (ResourceExhausted at the limit) and is reset
        when the sandbox stops or is removed. AgentError(code="refused") when nothing
        listens there; InvalidState when the sandbox is not ready."""
        return await ports.connect(self._get(sandbox_id), self.config.limits, port)

    # -- commands --------------------------------------------------------------------

    @staticmethod
    def _spec(cmd: list[str] | ExecSpec, env: dict[str, str] | None, working_dir: str, user: str, tty: bool,
              tty_size: tuple[int, int] | None, timeout_seconds: float, stdin: bool) -> ExecSpec:
        if isinstance(cmd, ExecSpec):
            return cmd.replace(stdin=stdin) if stdin and not cmd.stdin else cmd
        try:
            return ExecSpec(cmd=cmd, env=dict(env or {}), working_dir=working_dir, user=user, tty=tty,  # type: ignore[arg-type]
                            tty_size=tty_size, timeout_seconds=timeout_seconds or 0, stdin=stdin)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(str(exc)) from None

    @staticmethod
    def _request(sb: SandboxRecord, spec: ExecSpec) -> dict[str, Any]:
        """The agent's EXEC request: the spec over the sandbox's defaults, validated."""
        cols, rows = spec.tty_size or (80, 24)
        try:
            return protocol.validate_exec_request(protocol.exec_request(
                list(spec.cmd), env={**sb.env, **spec.env}, cwd=spec.working_dir or sb.working_dir,
                user=spec.user or sb.user, tty=spec.tty, rows=rows, cols=cols, timeout=spec.timeout_seconds,
                stdin=spec.stdin))
        except protocol.ProtocolError as exc:
            raise InvalidArgument(exc.message) from None

    async def _start_exec(self, sb: SandboxRecord, spec: ExecSpec, cls: type[ExecStream]) -> ExecStream:
        request = self._request(sb, spec)
        require_live(sb, "commands run only in a ready or running sandbox")
        assert sb.vm is not None
        try:
            session = await sb.vm.agent.exec(request)
        except ExecError:  # the agent could not start it (not found, bad user or directory)
            self._ctx.observers.exec_done(ExecNote(sb.id, "", "rejected", None))
            raise
        return self._ctx.execs.track(sb, session, list(request["argv"]), cls)

    async def run_in_sandbox(self, sandbox_id: str, cmd: list[str] | ExecSpec, env: dict[str, str] | None = None,
                             working_dir: str = "", user: str = "", tty: bool = False,
                             tty_size: tuple[int, int] | None = None, timeout_seconds: float = 0) -> ExecStream:
        """Start `cmd` (no stdin); iterate the result for OutputChunks, the last being "exit"
        (or "error"). Unknown id, wrong state or a command that cannot start raise here.
        `cmd` may be an `ExecSpec` holding all the options."""
        sb = self._get(sandbox_id)
        spec = self._spec(cmd, env, working_dir, user, tty, tty_size, timeout_seconds, stdin=False)
        return await self._start_exec(sb, spec.replace(stdin=False) if spec.stdin else spec, ExecStream)

    async def exec_in_sandbox(self, sandbox_id: str, cmd: list[str] | ExecSpec, env: dict[str, str] | None = None,
                              working_dir: str = "", user: str = "", tty: bool = False,
                              tty_size: tuple[int, int] | None = None, timeout_seconds: float = 0) -> ExecHandle:
        """Like run_in_sandbox, interactive: `send_stdin()`, `resize()`, `close_stdin()`."""
        sb = self._get(sandbox_id)
        spec = self._spec(cmd, env, working_dir, user, tty, tty_size, timeout_seconds, stdin=True)
        stream = await self._start_exec(sb, spec, ExecHandle)
        assert isinstance(stream, ExecHandle)
        return stream

    async def start_exec(self, sandbox_id: str, cmd: list[str] | ExecSpec, env: dict[str, str] | None = None,
                         working_dir: str = "", user: str = "", tty: bool = False,
                         tty_size: tuple[int, int] | None = None, timeout_seconds: float = 0,
                         stdin: bool = False) -> str:
        """Start `cmd` in the background and return its exec id at once. The manager reads
        its output (keeping the newest 1 MiB while nobody is attached), so it never blocks;
        `attach_exec` streams it, `signal_exec` stops it, `list_execs` shows its status and
        exit code. `stdin=True` gives it a pipe an attached client can write to."""
        sb = self._get(sandbox_id)
        spec = self._spec(cmd, env, working_dir, user, tty, tty_size, timeout_seconds, stdin=stdin)
        self._ctx.execs.check_room(sb)
        handle = await self._start_exec(sb, spec, ExecHandle)
        assert isinstance(handle, ExecHandle)
        return self._ctx.execs.hold(sb, handle).exec_id

    async def attach_exec(self, sandbox_id: str, exec_id: str) -> ExecAttachment:
        """Attach to a background command (`start_exec`), or to one that kept running while
        the daemon was away ("detached" in `list_execs`): iterate the result for the output
        kept meanwhile, the rest and the exit; stdin/resize work if the command has them.
        Closing the attachment (`aclose()`) detaches: the command runs on. Unknown id:
        ExecNotFound; another client attached, or not running: ExecNotAttachable."""
        sb = self._get(sandbox_id)
        require_live(sb, "commands can be attached only in a ready or running sandbox")
        assert sb.vm is not None
        return await self._ctx.execs.attach(sb, sb.vm.agent, exec_id)

    async def signal_exec(self, sandbox_id: str, exec_id: str, signum: int = signal.SIGKILL) -> None:
        """Send `signum` (default SIGKILL) to a running command's process group."""
        sb = self._get(sandbox_id)
        if not 1 <= int(signum) <= 64:
            raise InvalidArgument(f"signal must be 1..64, got {signum}")
        await self._ctx.execs.signal(sb, exec_id, int(signum))

    def list_execs(self, sandbox_id: str) -> list[ExecInfo]:
        """Every command run in the sandbox (oldest first) with its exec id and status."""
        return self._ctx.execs.list(self._get(sandbox_id))

    # -- files -----------------------------------------------------------------------

    def _file_agent(self, sandbox_id: str) -> AgentConnection:
        sb = self._get(sandbox_id)
        require_live(sb, "files move only in and out of a ready or running sandbox")
        assert sb.vm is not None
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

    # -- console and helpers ---------------------------------------------------------

    def console_log(self, sandbox_id: str) -> Path:
        return self._get(sandbox_id).workdir / "console.log"

    def console_output(self, sandbox_id: str, follow: bool = False) -> AsyncIterator[bytes]:
        """The sandbox's serial console; with `follow`, also what it prints later, until
        the sandbox is removed."""
        sb = self._get(sandbox_id)
        return follow_console(sb.workdir / "console.log", follow, lambda: not sb.removed)

    async def wait_ready(self, sandbox_id: str, timeout: float = 120) -> SandboxInfo:
        """Wait until the sandbox is READY (raises BootFailed if it fails)."""
        sb = self._get(sandbox_id)
        boot = sb.tasks.get("boot")
        if boot is not None:
            await asyncio.wait_for(asyncio.shield(boot), timeout)
        if sb.state == S.FAILED:
            raise BootFailed(sb.error or "boot failed")
        return sb.info()
