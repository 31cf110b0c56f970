"""Bookkeeping of the commands run in sandboxes: the `execs` table and re-attach.

An exec id is the agent channel the command runs on, as a decimal string. Channels are
unique per sandbox for its whole life: after a daemon restart the new agent connection
starts numbering above every channel the database or the agent's HELLO knows.

A command outlives the daemon (the guest agent keeps it running, detached, spooling a
bounded amount of output). On re-adoption `reconcile` marks the ones the agent still
holds "detached" and the rest "lost"; `attach` takes a detached one over and streams the
rest of its output and its exit, like a fresh exec.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from arcbox_vm.agent.host import AgentConnection, ExecSession
from arcbox_vm.errors import ArcboxError, ExecError, ExecNotAttachable, ExecNotFound
from arcbox_vm.manager.exec_stream import ExecHandle, ExecStream
from arcbox_vm.models import ExecInfo
from arcbox_vm.models import SandboxState as S

if TYPE_CHECKING:
    from arcbox_vm.manager.record import SandboxRecord
    from arcbox_vm.storage.state import StateStore

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


def list_execs(store: "StateStore", sandbox_id: str) -> list[ExecInfo]:
    return [info(r) for r in store.execs(sandbox_id)]


def track(store: "StateStore", sb: "SandboxRecord", session: ExecSession, argv: list[str],
          cls: type[ExecStream], emit: Callable[..., None], closed: Callable[[], bool],
          new: bool = True, keep: Callable[[], bool] = lambda: False) -> ExecStream:
    """Record a started (or re-attached) command and wrap it in an ExecStream whose end
    updates the record, the sandbox's RUNNING/READY state and `last_exit_code`.

    `keep()` true (a shutdown that leaves VMs running): a stream that ends without an exit
    leaves the command running and its record "running", for the next manager to find
    detached."""
    channel = session.channel
    with contextlib.suppress(ArcboxError):
        if new:
            store.put_exec(sb.id, channel, argv)
        else:
            store.set_exec_status(sb.id, channel, "running")
    sb.active_execs += 1
    if sb.active_execs == 1 and sb.state == S.READY:
        sb.state = S.RUNNING
        emit(sb, "running")

    def done(exit_code: int | None) -> None:
        sb.active_execs -= 1
        if exit_code is None and keep():
            return
        with contextlib.suppress(ArcboxError):
            store.finish_exec(sb.id, channel, exit_code, "exited" if exit_code is not None else "ended")
        if sb.removed or closed():
            return
        if exit_code is not None:
            sb.last_exit_code = exit_code
            sb.last_exited_at = time.time()
        if sb.active_execs == 0 and sb.state == S.RUNNING:
            sb.state = S.READY
            attrs = {"exit_code": str(exit_code)} if exit_code is not None else {"exit_code": ""}
            emit(sb, "idle", **attrs)

    return cls(session, done, keep_running=keep)


async def attach(store: "StateStore", sb: "SandboxRecord", agent: AgentConnection, exec_id: str | int,
                 emit: Callable[..., None], closed: Callable[[], bool],
                 keep: Callable[[], bool] = lambda: False) -> ExecHandle:
    """Take over the detached command `exec_id`: its spooled output, the rest, its exit."""
    channel = parse_exec_id(sb.id, exec_id)
    rows = store.execs(sb.id, channel=channel)
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
                store.finish_exec(sb.id, channel, None, "lost")
            raise ExecNotAttachable(sb.id, str(channel), "lost") from None
        raise
    stream = track(store, sb, session, list(json.loads(row["argv"])), ExecHandle, emit, closed, new=False, keep=keep)
    assert isinstance(stream, ExecHandle)
    return stream


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
