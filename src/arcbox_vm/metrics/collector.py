"""What is computed at scrape time: sandboxes by state, each sandbox's resource use, and
the warm pools (target size, members, ready members, hand-outs, misses — a pool label of
"default" or "template:NAME").

A custom collector rather than gauges with label sets: the per-sandbox series come from
`SandboxManager.sandbox_stats()` when Prometheus scrapes, so a removed sandbox simply
has none any more — nothing to delete, nothing to leak, the number of series bounded by
the sandboxes alive.

Runs in the HTTP endpoint's thread; the manager calls it makes are safe there (see
manager/stats.py and WarmPool.stats).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from arcbox_vm.models import SandboxState

if TYPE_CHECKING:
    from arcbox_vm.manager.sandbox_manager import SandboxManager

log = logging.getLogger(__name__)


class SandboxCollector(Collector):
    def __init__(self, manager: "SandboxManager") -> None:
        self.manager = manager

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        try:
            states = Counter(s.state.value for s in self.manager.list_sandboxes())
            stats = self.manager.sandbox_stats()
            pools = self.manager.pool_stats()
        except Exception:  # a scrape must not die with half a page: report nothing of ours
            log.exception("reading sandbox metrics failed")
            return
        yield from self._families(states, stats, pools)

    @staticmethod
    def _families(states: Counter | None = None, stats: list | None = None,
                  pools: list | None = None) -> Iterator[Metric]:
        count = GaugeMetricFamily("arcbox_sandboxes", "Sandboxes the manager knows, by state.", labels=["state"])
        cpu = CounterMetricFamily("arcbox_sandbox_cpu_seconds",
                                  "CPU time used by the sandbox's VMM (its cgroup, else its process tree).",
                                  labels=["sandbox"])
        memory = GaugeMetricFamily("arcbox_sandbox_memory_bytes",
                                   "Memory held by the sandbox's VMM now (memory.current of its cgroup, "
                                   "else the resident sets of its processes).", labels=["sandbox"])
        io = CounterMetricFamily("arcbox_sandbox_io_bytes", "Block I/O of the sandbox's VMM, by direction.",
                                 labels=["sandbox", "direction"])
        procs = GaugeMetricFamily("arcbox_sandbox_processes", "Processes in the sandbox's VMM cgroup (or tree).",
                                  labels=["sandbox"])
        if states is not None:
            for state in SandboxState:
                count.add_metric([state.value], states.get(state.value, 0))
        for st in stats or ():
            cpu.add_metric([st.id], st.cpu_seconds)
            memory.add_metric([st.id], st.memory_bytes)
            io.add_metric([st.id, "read"], st.io_read_bytes)
            io.add_metric([st.id, "write"], st.io_write_bytes)
            procs.add_metric([st.id], st.processes)
        yield from (count, cpu, memory, io, procs)
        size = GaugeMetricFamily("arcbox_pool_size", "Sandboxes a warm pool keeps ready (its target).",
                                 labels=["pool"])
        members = GaugeMetricFamily("arcbox_pool_members", "A warm pool's sandboxes now (ready or restoring).",
                                    labels=["pool"])
        ready = GaugeMetricFamily("arcbox_pool_ready", "A warm pool's sandboxes ready to be handed out.",
                                  labels=["pool"])
        handed = CounterMetricFamily("arcbox_pool_handouts", "Creates served from a warm pool.", labels=["pool"])
        misses = CounterMetricFamily("arcbox_pool_misses", "Creates a warm pool serves that found none ready.",
                                     labels=["pool"])
        for p in pools or ():
            size.add_metric([p.pool], p.size)
            members.add_metric([p.pool], p.members)
            ready.add_metric([p.pool], p.ready)
            handed.add_metric([p.pool], p.handed_out)
            misses.add_metric([p.pool], p.misses)
        yield from (size, members, ready, handed, misses)
