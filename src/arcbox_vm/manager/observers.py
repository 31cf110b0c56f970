"""Observers: callbacks told what the manager does — for metrics, tracing, audit.

The manager does not know who listens (the Prometheus metrics live in `arcbox_vm.metrics`
and register here). It reports:

- every lifecycle event, as a `StepNote` with the event's attributes and the step's
  durations in seconds (see `lifecycle.py`: "create" on created; "ready", "boot",
  "launch", "hello" on ready; "boot" on a failed boot; "stop" on stopped; "remove" on
  removed) and how the sandbox was made (`source`: "cold"; later "restore", "pool");
- every command that ends, or that the guest agent refused to start, as an `ExecNote`;
- guest agent failures, as (sandbox id, kind), kind one of `AGENT_ERROR_KINDS`.

Callbacks run on the manager's event loop and must be quick; one that raises is logged,
never raised into the manager.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

ExecResult = Literal["ok", "failed", "timeout", "error", "rejected"]
EXEC_RESULTS: tuple[ExecResult, ...] = ("ok", "failed", "timeout", "error", "rejected")

# unresponsive: no answer to the keepalive (the sandbox failed, reason agent_unresponsive);
# disconnected: its channel closed while the VMM ran on (the sandbox failed, reason agent_unresponsive);
# no_hello: a boot ended without the agent's HELLO (timeout, or the VMM exited first);
# reconnect: a VM that survived a daemon restart did not dial back.
AgentErrorKind = Literal["unresponsive", "disconnected", "no_hello", "reconnect"]
AGENT_ERROR_KINDS: tuple[AgentErrorKind, ...] = ("unresponsive", "disconnected", "no_hello", "reconnect")


@dataclass(frozen=True)
class StepNote:
    """One lifecycle event (action: created, ready, running, idle, stopping, stopped, failed, removed)."""

    sandbox_id: str
    action: str
    attributes: Mapping[str, str]
    durations: Mapping[str, float]
    source: str = "cold"


@dataclass(frozen=True)
class ExecNote:
    """A command ended. result: ok (exit 0), failed (another exit code), timeout (its
    timeout killed it), error (it ended without an exit status: agent gone, VM stopped,
    or killed because its caller went away), rejected (the agent could not start it:
    not found, bad user or directory; `seconds` is then None)."""

    sandbox_id: str
    exec_id: str
    result: ExecResult
    seconds: float | None


def exec_result(exit_code: int | None, timed_out: bool) -> ExecResult:
    if exit_code is None:
        return "error"
    if timed_out:
        return "timeout"
    return "ok" if exit_code == 0 else "failed"


class Observers:
    """The manager's lists of callbacks; append to them (`SandboxManager.observers`)."""

    def __init__(self) -> None:
        self.steps: list[Callable[[StepNote], None]] = []
        self.execs: list[Callable[[ExecNote], None]] = []
        self.agent_errors: list[Callable[[str, AgentErrorKind], None]] = []

    def step(self, note: StepNote) -> None:
        _call(self.steps, note)

    def exec_done(self, note: ExecNote) -> None:
        _call(self.execs, note)

    def agent_error(self, sandbox_id: str, kind: AgentErrorKind) -> None:
        _call(self.agent_errors, sandbox_id, kind)


def _call(callbacks: list[Callable[..., None]], *args: object) -> None:
    for fn in list(callbacks):
        try:
            fn(*args)
        except Exception:  # an observer never breaks the manager
            log.exception("observer %r failed", fn)
