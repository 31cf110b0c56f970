"""Bookkeeping of the commands run in sandboxes: the `execs` table and re-attach.

An exec id is the agent channel the command runs on, as a decimal string. Channels are
unique per sandbox for its whole life: after a daemon restart the new agent connection
starts numbering above every channel the database or the agent's HELLO knows.

A command outlives the daemon (the guest agent keeps it running, detached, spooling a
bounded amount of output). On re-adoption `reconcile` marks the ones the agent still
holds "detached" and the rest "lost"; `ExecBook.attach` takes a detached one over — from
then on it is a background command (background.py) — and streams the rest of its output
and its exit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from arcbox_vm.agent.host import AgentConnection, ExecChannel
from arcbox_vm.errors import ArcboxError, ExecError, ExecNotAttachable, ExecNotFound, ResourceExhausted
from arcbox_vm.manager import held_tail
from arcbox_vm.manager.background import MAX_RUNNING, ExecAttachment, HeldExec, evict_finished
from arcbox_vm.manager.exec_stream import ExecHandle, ExecStream
from arcbox_vm.manager.observers import ExecNote, Observers, exec_result
from arcbox_vm.models import ExecInfo, OutputChunk
from arcbox_vm.models import SandboxState as S

if TYPE_CHECKING:
    from arcbox_vm.manager.record import SandboxRecord
    from arcbox_vm.ports.storage import StateStore

log = logging.getLogger(__name__)


def parse_exec_id(sandbox_id: str, exec_id: str | int) -> int:
    text = str(exec_id).strip()
    if not text.isdigit() or not 0 < int(text) <= 0xFFFFFFFF:
        raise ExecNotFound(sandbox_id, str(exec_id))
    return int(text)


def info(row: dict[str, Any]) -> ExecInfo:
    return ExecInfo(exec_id=str(row["channel"]), sandbox_id=row["sandbox_id"], cmd=list(json.loads(row["argv"])),
                    status=row["status"], started_at=row["started_at"], finished_at=row["finished_at"],
                    exit_code=row["exit_code"])


class ExecBook:
    """The manager's command bookkeeping: the execs table, live streams by exec id, the
    background commands it holds (see background.py), attach and signals."""

    def __init__(self, store: "StateStore", emit: Callable[..., None], closed: Callable[[], bool],
                 keep: Callable[[], bool], *, observers: Observers | None = None) -> None:
        self._store = store
        self._emit = emit
        self._closed = closed  # the manager is closed: no more state changes or events
        self._keep = keep  # see SandboxManager.keep_commands_running
        self._observers = observers or Observers()  # told when a command ends

    def track(self, sb: "SandboxRecord", session: ExecChannel, argv: list[str], cls: type[ExecStream],
              new: bool = True) -> ExecStream:
        """Record a started (or re-attached) command and wrap it in an ExecStream whose end
        updates the record, the sandbox's RUNNING/READY state and `last_exit_code`.

        While the manager shuts down leaving VMs running, a stream that ends without an
        exit leaves the command running and its record "running", for the next manager to
        find detached."""
        store, channel = self._store, session.channel
        started = time.monotonic()  # of this stream: a re-attached command is timed from the attach
        with contextlib.suppress(ArcboxError):
            if new:
                store.put_exec(sb.id, channel, argv)
            else:
                store.set_exec_status(sb.id, channel, "running")
        sb.active_execs += 1
        if sb.active_execs == 1 and sb.state == S.READY:
            sb.state = S.RUNNING
            self._emit(sb, "running")

        def done(exit_code: int | None) -> None:
            sb.active_execs -= 1
            sb.streams.pop(channel, None)
            if exit_code is None and (self._keep() or sb.detaching):
                return
            with contextlib.suppress(ArcboxError):
                store.finish_exec(sb.id, channel, exit_code, "exited" if exit_code is not None else "ended")
            # not `stream.timed_out`: this closure must not reference the stream (a cycle would
            # keep a dropped stream alive, and its command running, until the next gc pass)
            timed_out = bool(session.exit_status is not None and session.exit_status.timed_out)
            self._observers.exec_done(ExecNote(sb.id, str(channel), exec_result(exit_code, timed_out),
                                               time.monotonic() - started))
            if sb.removed or self._closed():
                return
            if exit_code is not None:
                sb.last_exit_code = exit_code
                sb.last_exited_at = time.time()
            if sb.active_execs == 0 and sb.state == S.RUNNING:
                sb.state = S.READY
                attrs = {"exit_code": str(exit_code)} if exit_code is not None else {"exit_code": ""}
                self._emit(sb, "idle", **attrs)

        stream = cls(session, done, keep_running=self._keep)
        sb.streams[channel] = stream
        return stream

    def check_room(self, sb: "SandboxRecord") -> None:
        """Refuse another background command beyond MAX_RUNNING (each may keep 1 MiB here)."""
        running = sum(1 for h in sb.held.values() if not h.finished)
        if running >= MAX_RUNNING:
            raise ResourceExhausted(f"sandbox {sb.id!r} already runs {running} background commands (the limit); "
                                    "wait for some or stop them with signal_exec")

    def hold(self, sb: "SandboxRecord", handle: ExecHandle, kept: list[OutputChunk] | None = None) -> HeldExec:
        """Keep a command running in the background (see background.py)."""
        held = HeldExec(sb.id, handle, lambda h: sb.held.pop(int(h.exec_id), None), kept)
        sb.held[int(held.exec_id)] = held
        evict_finished(sb.held)
        return held

    async def attach(self, sb: "SandboxRecord", agent: AgentConnection, exec_id: str | int) -> ExecAttachment:
        """Attach to a background command, or take over one that kept running in the guest
        while the daemon was away ("detached" after a restart). Leaving detaches again."""
        channel = parse_exec_id(sb.id, exec_id)
        held = sb.held.get(channel)
        if held is not None:
            return held.attach()
        rows = self._store.execs(sb.id, channel=channel)
        if not rows:
            raise ExecNotFound(sb.id, str(exec_id))
        row = rows[0]
        if row["status"] != "detached":
            raise ExecNotAttachable(sb.id, str(channel), row["status"])
        try:
            session = await agent.attach(channel)
        except ExecError as exc:
            if exc.code == "no_such_channel":  # the agent forgot it (or the guest restarted)
                with contextlib.suppress(ArcboxError):
                    self._store.finish_exec(sb.id, channel, None, "lost")
                raise ExecNotAttachable(sb.id, str(channel), "lost") from None
            raise
        handle = self.track(sb, session, list(json.loads(row["argv"])), ExecHandle, new=False)
        assert isinstance(handle, ExecHandle)
        return self.hold(sb, handle, held_tail.take(sb.workdir, str(channel))).attach()

    def list(self, sb: "SandboxRecord") -> list[ExecInfo]:
        out = []
        for row in self._store.execs(sb.id):
            held = sb.held.get(row["channel"])
            if held is not None and held.attachment is None and row["status"] == "running":
                row = {**row, "status": "detached"}  # running with no client: attachable
            out.append(info(row))
        return out

    async def signal(self, sb: "SandboxRecord", exec_id: str | int, signum: int) -> None:
        """Send `signum` to a running command's process group (any command the manager
        streams or holds, whoever started it)."""
        channel = parse_exec_id(sb.id, exec_id)
        stream = sb.streams.get(channel)
        if stream is None:
            rows = self._store.execs(sb.id, channel=channel)
            if not rows:
                raise ExecNotFound(sb.id, str(exec_id))
            raise ExecNotAttachable(sb.id, str(channel), rows[0]["status"])
        await stream.signal(signum)

    def forget_all(self, sb: "SandboxRecord", save: bool = False) -> None:
        """Stop holding the sandbox's background commands: it is going (the VM dies with
        them), or, with `save`, the manager closes leaving it running — then their unread
        output is written for the next manager (held_tail.py)."""
        for held in list(sb.held.values()):
            if save and not held.finished:
                held_tail.save(sb.workdir, held.exec_id, held.unread())
            held.forget()


def reconcile(store: "StateStore", sb: "SandboxRecord", agent: AgentConnection | None) -> tuple[int, int]:
    """After a restart: commands the agent still holds become "detached", the others
    running at the time become "lost". Returns (detached, lost)."""
    detached = set(agent.detached) if agent is not None and agent.supports_attach else set()
    n_detached = n_lost = 0
    for row in store.execs(sb.id, status=("running", "detached")):
        with contextlib.suppress(ArcboxError):
            if row["channel"] in detached:
                store.set_exec_status(sb.id, row["channel"], "detached")
                n_detached += 1
            else:
                store.finish_exec(sb.id, row["channel"], None, "lost")
                n_lost += 1
    if agent is not None:
        agent.reserve_channels(max(store.max_exec_channel(sb.id), max(agent.detached, default=0)))
    if n_detached:
        log.info("%d command(s) in sandbox %s kept running while the daemon was away; attach with their exec id",
                 n_detached, sb.id)
    if n_lost:
        log.warning("%d command(s) in sandbox %s were running when the daemon stopped and are gone; marked lost",
                    n_lost, sb.id)
    return n_detached, n_lost
