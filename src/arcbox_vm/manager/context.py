"""What the manager's use cases share: configuration, adapters, the live sandbox records,
the state store, the event log and the observers.

`SandboxManager` is a thin facade over use-case modules (`lifecycle.py`, `recovery.py`,
`commands.py`, `files.py`); each takes this context instead of reaching into the
manager's private fields, which keeps the modules free of import cycles.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from arcbox_vm.config import VmmConfig
from arcbox_vm.logctx import fields
from arcbox_vm.errors import ArcboxError, SandboxNotFound
from arcbox_vm.manager import ports
from arcbox_vm.manager.boot import BootPlan
from arcbox_vm.manager.events import EventLog
from arcbox_vm.manager.execs import ExecBook
from arcbox_vm.manager.observers import Observers, StepNote
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.ports import Adapters, Network, StateStore, VmmDriver

log = logging.getLogger(__name__)
steplog = logging.getLogger("arcbox_vm.lifecycle")  # one line per lifecycle event

# Called with the boot plan of every sandbox before it runs (insert/replace/remove steps).
BootPlanHook = Callable[[BootPlan, SandboxRecord], None]


class ManagerContext:
    def __init__(self, config: VmmConfig, adapters: Adapters) -> None:
        self.config = config
        self.adapters = adapters
        self.data_dir = config.data_dir
        self.sandboxes: dict[str, SandboxRecord] = {}
        self.events: EventLog | None = None
        self.closed = False
        self.keep_commands = False  # commands of dropped streams stay running (see keep_commands_running)
        self.boot_plan_hooks: list[BootPlanHook] = []
        # what a TTL with on_ttl "pause" does (set by the manager: pausing imports lifecycle)
        self.pause_to_disk: Callable[[SandboxRecord], Awaitable[None]] | None = None
        self.observers = Observers()
        self.execs = ExecBook(adapters.store, self.emit, lambda: self.closed, lambda: self.keep_commands,
                              observers=self.observers)

    @property
    def store(self) -> StateStore:
        return self.adapters.store

    @property
    def network(self) -> Network:
        return self.adapters.network

    @property
    def driver(self) -> VmmDriver:
        return self.adapters.driver

    def get(self, sandbox_id: str) -> SandboxRecord:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or sb.removed or sb.pool:
            raise SandboxNotFound(sandbox_id)
        return sb

    def open_events(self) -> EventLog:
        """Open the state database (sync and cheap, so subscribing works before start)."""
        if self.events is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.store.open()
            self.events = EventLog(self.store)
        return self.events

    def save(self, sb: SandboxRecord) -> None:
        """Persist the record; must happen before the change is announced."""
        if sb.vm is not None and sb.vm.process.returncode is None:
            sb.pid = sb.vm.process.pid
            if sb.pid_start is None:
                sb.pid_start = sb.vm.process.start_time
        elif sb.vm is None and sb.paused_process is None:
            sb.pid = sb.pid_start = None
        self.store.put_sandbox(sb.to_row(), sb.lease.ip if sb.lease else None)

    def emit(self, sb: SandboxRecord, action: str, *, durations: Mapping[str, float] | None = None,
             **attrs: Any) -> None:
        """Persist the record's new state, then append and announce the event; log it as
        one structured line and tell the observers, with the step's `durations` (seconds)."""
        self.open_events()
        if action == "removed":
            self.store.delete_sandbox(sb.id)
        else:
            self.save(sb)
        self.announce(sb, action, durations=durations, **attrs)

    def announce(self, sb: SandboxRecord, action: str, *, durations: Mapping[str, float] | None = None,
                 **attrs: Any) -> None:
        """`emit` for a change already persisted: append the event, log it, tell the observers."""
        if sb.pool:  # a warm-pool VM is nobody's sandbox yet: no events until it is handed out
            return
        self.open_events().append(sb.id, action, **attrs)
        note = StepNote(sb.id, action, {k: str(v) for k, v in attrs.items()}, dict(durations or {}), sb.source)
        line = {"event": action, "state": sb.state.value, **note.attributes,
                **{f"{k}_seconds": round(v, 3) for k, v in note.durations.items()}}
        steplog.info("%s", action, extra=fields(sb.id, **line))
        self.observers.step(note)

    async def release_network(self, sb: SandboxRecord) -> None:
        """Its forwarded ports (listeners, connections), TAP and IP."""
        await ports.release(sb)
        lease, sb.lease = sb.lease, None
        if lease is not None:
            try:
                await self.network.release(lease)
            except Exception:
                log.exception("releasing the network of sandbox %s failed", sb.id)

    def driver_or_none(self) -> VmmDriver | None:
        """The driver, or None when no VMM can run here (boots then fail on their own)."""
        with contextlib.suppress(ArcboxError):
            return self.driver
        return None
