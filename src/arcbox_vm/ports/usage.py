"""The resource-usage port: what one sandbox's VMM uses right now (CPU time, memory, I/O).

The adapter (`vmm/usage.py`) reads the sandbox's cgroup when its VMM runs in one, else
the VMM's process tree from /proc. Reads are small blocking file reads: call them off
the event loop when there are many sandboxes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

UsageSource = Literal["cgroup", "processes"]


@dataclass(frozen=True)
class ResourceUsage:
    """Cumulative CPU seconds and I/O bytes since the VMM started; memory now (bytes);
    `processes` in the cgroup (or the tree); `source` says where it was read."""

    cpu_seconds: float
    memory_bytes: int
    io_read_bytes: int
    io_write_bytes: int
    processes: int
    source: UsageSource


class UsageReader(Protocol):
    def read(self, vmms: Iterable[tuple[str, int | None]]) -> Mapping[str, ResourceUsage]:
        """Usage of each (sandbox id, VMM pid or None) whose VMM runs; the others are left out."""
