"""The agent's table of exec sessions and their lifecycle (a mixin of ``Agent``).

A session is in exactly one place: ``sessions`` (attached to the current connection),
``detached`` (it outlived a connection and may be re-attached) or ``abandoned`` (ended
by protocol, only waiting to be reaped); ``by_pid`` finds it when its child exits.
Finished sessions are settled here: an attached one sends EXIT and goes; a detached one
keeps its exit status and spool for a late ATTACH (the oldest beyond ``KEEP_FINISHED``
are forgotten); an abandoned one is closed.

Detached sessions spool their output so nothing is dropped while no host listens; the
spool is bounded per session by the protocol window and for all of them together by
``SPOOL_TOTAL`` (``spool_room`` / ``spool_changed``, called by the sessions), after
which the children block in write(2).
"""

from __future__ import annotations

import time

from arcbox_vm.agent.protocol import MsgType

from . import procs
from .log import log, log_later

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Dict, List, Set

    from .session import Session

KEEP_FINISHED = 64  # finished detached sessions (exit status + spool) kept for a late ATTACH
SPOOL_TOTAL = 16 << 20  # output bytes all detached sessions together may spool


class SessionTable:
    """Attached, detached and abandoned sessions; reaping, EXIT, forgetting, the spool budget."""

    def _init_sessions(self) -> None:
        self.sessions: Dict[int, Session] = {}  # channel -> Session (attached to the current connection)
        self.detached: Dict[int, Session] = {}  # channel -> session that outlived its connection (re-attachable)
        self.abandoned: Set[Session] = set()  # ended by protocol, waiting to be reaped
        self.spool_total = 0  # bytes spooled by detached sessions
        self.by_pid: Dict[int, Session] = {}

    def _all_sessions(self) -> List[Session]:
        return list(self.sessions.values()) + list(self.detached.values()) + list(self.abandoned)

    def _reap(self) -> None:
        """Collect exited children and hand each status to its session (SIGCHLD, shutdown)."""
        now = time.monotonic()
        for pid, status in procs.reap():
            s = self.by_pid.pop(pid, None)
            if s is not None:
                s.on_exit(status, now)

    def _finish_sessions(self) -> None:
        """After each loop iteration: EXIT for attached sessions that are done, close the rest.

        A session whose output just reached EOF is reaped at once: a child's fds close
        before its SIGCHLD is sent, so it has usually exited by now, and its EXIT goes out
        without waiting one more loop pass for the signal (once per session).
        """
        for s in self.sessions.values():
            if s.status is None and not s.out_fds and not s.reap_tried:
                s.reap_tried = True
                self._reap()
                break  # reaping collects every exited child at once
        exits = 0
        for ch, s in list(self.sessions.items()):
            if s.finished:
                del self.sessions[ch]
                self._remember(ch)
                s.close()
                body = s.exit_body()
                self._send_json(MsgType.EXIT, ch, body)
                log_later("channel %d: pid %d exited: %s" % (ch, s.pid, _describe_exit(body)))
                exits += 1
        if exits and self.conn is not None:
            self._flush()  # EXIT ends the host's wait: send it now, not after the rest of the loop pass
        for s in list(self.abandoned):
            if s.finished:
                self.abandoned.discard(s)
                s.close()
        finished = [s for s in self.detached.values() if s.finished]
        for s in finished:
            if not s.closed:
                s.close()  # fds go now; status and spool stay for ATTACH
                log("channel %d: pid %d exited while detached: %s" % (s.channel, s.pid, _describe_exit(s.exit_body())))
        if len(finished) > KEEP_FINISHED:
            self._forget_finished(len(finished) - KEEP_FINISHED)

    def _forget_finished(self, n: int) -> int:
        """Drop the ``n`` oldest finished detached sessions; returns how many went."""
        done = sorted((s for s in self.detached.values() if s.finished), key=lambda s: s.exited_at or 0.0)
        for s in done[:n]:
            del self.detached[s.channel]
            s.abandon()  # releases its spool
            self._remember(s.channel)
            log("channel %d: forgot finished detached session (never re-attached)" % s.channel)
        return min(n, len(done))

    def _end_session(self, s: Session, code: str, message: str) -> None:
        """End a session the agent failed to serve: ERROR to the host if attached, else just drop it."""
        if self.sessions.get(s.channel) is s:
            self._send_error(s.channel, code, message)
        else:
            self._abandon(s)

    def _abandon(self, s: Session) -> None:
        """Ended by protocol: the session's output is discarded and it waits only to be reaped."""
        if self.sessions.get(s.channel) is s:
            del self.sessions[s.channel]
            self._remember(s.channel)
        if self.detached.get(s.channel) is s:
            del self.detached[s.channel]
            self._remember(s.channel)
        s.abandon()
        self.abandoned.add(s)

    # ---- detached sessions' spool (called by sessions) -------------------------------

    def spool_room(self) -> int:
        return max(0, SPOOL_TOTAL - self.spool_total)

    def spool_changed(self, delta: int) -> None:
        self.spool_total += delta


def _describe_exit(body: Dict[str, Any]) -> str:
    text = "code %s" % body["exit_code"]
    if body.get("signal"):
        text += " (signal %s)" % body["signal"]
    if body.get("timed_out"):
        text += " after timeout"
    return text
