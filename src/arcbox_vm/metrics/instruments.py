"""`ManagerMetrics`: the Prometheus metrics of one `SandboxManager`, in a registry of their own.

Counters and histograms are fed by the manager's observers (manager/observers.py); the
sandbox gauges and per-sandbox resource use are read at scrape time (collector.py); the
daemon's own process metrics come from prometheus_client's default collectors.

Every label has a small, fixed set of values, and the known ones are exported from the
start (at 0), so a rate() over them never misses the first increment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client import gc_collector, platform_collector, process_collector
from prometheus_client.exposition import generate_latest

from arcbox_vm.manager.observers import AGENT_ERROR_KINDS, EXEC_RESULTS, ExecNote, StepNote
from arcbox_vm.metrics.collector import SandboxCollector

if TYPE_CHECKING:
    from arcbox_vm.manager.sandbox_manager import SandboxManager

ACTIONS = ("created", "ready", "running", "idle", "stopping", "stopped", "failed", "removed")
SOURCES = ("cold",)  # later: restore, pool

CREATE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
READY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0)
EXEC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class ManagerMetrics:
    """Metrics of `manager`: `attach()` starts counting (before the manager starts, to
    count what its start-up does too), `detach()` stops; `registry` is what to serve."""

    def __init__(self, manager: "SandboxManager", *, process_metrics: bool = True) -> None:
        self.manager = manager
        self.registry = CollectorRegistry()
        if process_metrics:  # what prometheus_client's default registry has: process_*, python_*
            process_collector.ProcessCollector(registry=self.registry)
            platform_collector.PlatformCollector(registry=self.registry)
            gc_collector.GCCollector(registry=self.registry)
        r = self.registry
        self.events = Counter("arcbox_events", "Lifecycle events, by action.", ["action"], registry=r)
        self.create_seconds = Histogram(
            "arcbox_sandbox_create_seconds", "Time to register a sandbox (the Create call: id, limits, "
            "network lease, record), by how its VM is made.", ["source"], buckets=CREATE_BUCKETS, registry=r)
        self.ready_seconds = Histogram(
            "arcbox_sandbox_ready_seconds", "Time from the create request until the sandbox was ready "
            "(its guest agent said HELLO), by how its VM is made.", ["source"], buckets=READY_BUCKETS, registry=r)
        self.execs = Counter("arcbox_execs", "Commands that ended, by result: ok, failed (non-zero exit), timeout, "
                             "error (no exit status), rejected (could not start).", ["result"], registry=r)
        self.exec_seconds = Histogram("arcbox_exec_seconds", "Run time of commands that ended.",
                                      buckets=EXEC_BUCKETS, registry=r)
        self.agent_errors = Counter("arcbox_agent_errors", "Guest agent failures, by kind: unresponsive, "
                                    "disconnected, no_hello, reconnect.", ["kind"], registry=r)
        for action in ACTIONS:
            self.events.labels(action=action)
        for source in SOURCES:
            self.create_seconds.labels(source=source)
            self.ready_seconds.labels(source=source)
        for result in EXEC_RESULTS:
            self.execs.labels(result=result)
        for kind in AGENT_ERROR_KINDS:
            self.agent_errors.labels(kind=kind)
        r.register(SandboxCollector(manager))
        self._attached = False

    def attach(self) -> "ManagerMetrics":
        if not self._attached:
            obs = self.manager.observers
            obs.steps.append(self._on_step)
            obs.execs.append(self._on_exec)
            obs.agent_errors.append(self._on_agent_error)
            self._attached = True
        return self

    def detach(self) -> None:
        if self._attached:
            obs = self.manager.observers
            obs.steps.remove(self._on_step)
            obs.execs.remove(self._on_exec)
            obs.agent_errors.remove(self._on_agent_error)
            self._attached = False

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (what /metrics serves)."""
        return generate_latest(self.registry)

    # -- observers -------------------------------------------------------------------

    def _on_step(self, note: StepNote) -> None:
        self.events.labels(action=note.action).inc()
        if note.action == "created" and "create" in note.durations:
            self.create_seconds.labels(source=note.source).observe(note.durations["create"])
        elif note.action == "ready" and "ready" in note.durations:  # not a re-adoption after a restart
            self.ready_seconds.labels(source=note.source).observe(note.durations["ready"])

    def _on_exec(self, note: ExecNote) -> None:
        self.execs.labels(result=note.result).inc()
        if note.seconds is not None:
            self.exec_seconds.observe(note.seconds)

    def _on_agent_error(self, sandbox_id: str, kind: str) -> None:
        self.agent_errors.labels(kind=kind).inc()
