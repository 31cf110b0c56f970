"""A node's free capacity, as its daemon's admission (manager/limits.py) counts it: the
sandboxes that hold a VM (or are about to) against [limits] max_sandboxes and
max_total_memory_mib. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from arcbox_vm.manager.limits import HOLDING
from arcbox_vm.models import SandboxState

__all__ = ["Capacity", "free_capacity"]

_HOLDING = {s.value for s in HOLDING}


@dataclass(frozen=True)
class Capacity:
    """What a node may hold and what is free of it (memory in MiB of guest memory)."""

    max_sandboxes: int
    max_memory_mib: int
    free_slots: int
    free_memory_mib: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def free_capacity(max_sandboxes: int, max_memory_mib: int,
                  sandboxes: Iterable[tuple[SandboxState | str, int]]) -> Capacity:
    """`sandboxes`: (state, guest memory MiB) of each sandbox the daemon has."""
    holding = [mem for state, mem in sandboxes if str(getattr(state, "value", state)) in _HOLDING]
    return Capacity(max_sandboxes, max_memory_mib, max(0, max_sandboxes - len(holding)),
                    max(0, max_memory_mib - sum(holding)))
