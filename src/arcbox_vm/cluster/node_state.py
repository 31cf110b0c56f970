"""What a node tells the fleet, kept current by its node service: free capacity as Ray
custom resources on its Ray node, its registration (`node/<name>`), its inventory
(`inventory/<name>`: its sandboxes as last seen — what the fleet reports as "lost" when
the node cannot be reached) and the sandbox → node index (`sandbox/<id>`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from arcbox_vm.cluster import kv
from arcbox_vm.cluster.capacity import Capacity, free_capacity
from arcbox_vm.cluster.names import MEMORY, SLOTS, inventory_key, node_id_key, node_key, sandbox_key
from arcbox_vm.models import SandboxSummary

log = logging.getLogger("arcbox_vm.cluster")

__all__ = ["MemberConf", "NodeState"]


@dataclass(frozen=True)
class MemberConf:
    """What the daemon tells its node service (member.py builds it from the config)."""

    name: str
    namespace: str
    socket: str
    ray_node_id: str
    address: str
    max_sandboxes: int
    max_memory_mib: int
    default_memory_mib: int
    refresh_s: float = 5.0
    daemon_pid: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemberConf":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class NodeState:
    conf: MemberConf
    daemon_up: bool = False
    capacity: Capacity | None = None
    applied: tuple[int, int] | None = None  # the totals Ray has for our resources
    clamped: bool = False                   # Ray kept a higher total (work held it): retry soon
    inventory: list[dict[str, Any]] = field(default_factory=list)
    _published: tuple[str, str] = ("", "")

    def down_capacity(self) -> Capacity:
        return Capacity(self.conf.max_sandboxes, self.conf.max_memory_mib, 0, 0)

    def update(self, summaries: Iterable[SandboxSummary] | None, memory: dict[str, int]) -> None:
        """The daemon's sandboxes now (None: the daemon cannot be reached)."""
        if summaries is None:
            self.daemon_up = False
            self.capacity = self.down_capacity()
        else:
            rows = list(summaries)
            self.daemon_up = True
            self.capacity = free_capacity(self.conf.max_sandboxes, self.conf.max_memory_mib,
                                          [(s.state, memory.get(s.id, 0)) for s in rows])
            self.inventory = [{"id": s.id, "state": str(getattr(s.state, "value", s.state)), "labels": s.labels,
                               "ip_address": s.ip_address, "created_at": s.created_at,
                               "memory_mib": memory.get(s.id, 0)} for s in sorted(rows, key=lambda s: s.id)]
        self._apply_capacity()
        self._publish()

    def _apply_capacity(self) -> None:
        cap = self.capacity or self.down_capacity()
        want = (cap.free_slots, cap.free_memory_mib)
        if want == self.applied and not self.clamped:
            return
        totals = kv.resize_node_resources(self.conf.ray_node_id, {SLOTS: float(want[0]), MEMORY: float(want[1])})
        self.applied = want
        self.clamped = (round(totals.get(SLOTS, 0.0)), round(totals.get(MEMORY, 0.0))) != want
        log.debug("capacity of %s: %s free slots, %s MiB free (%s)", self.conf.name, want[0], want[1],
                  "held higher by running placements" if self.clamped else "applied")

    def registration(self) -> dict[str, Any]:
        cap = self.capacity or self.down_capacity()
        c = self.conf
        return {"name": c.name, "ray_node_id": c.ray_node_id, "address": c.address, "daemon_up": self.daemon_up,
                "default_memory_mib": c.default_memory_mib, "capacity": cap.as_dict(),
                "sandboxes": len(self.inventory), "updated_at": time.time()}

    def _publish(self) -> None:
        ns, name = self.conf.namespace, self.conf.name
        reg = self.registration()
        reg_text = json.dumps({k: v for k, v in reg.items() if k != "updated_at"}, sort_keys=True)
        inv_text = json.dumps(self.inventory, sort_keys=True)
        old_reg, old_inv = self._published
        if reg_text != old_reg:
            kv.put_json(node_key(name), reg, ns)
            kv.put(node_id_key(self.conf.ray_node_id), name, ns)
        if inv_text != old_inv and self.daemon_up:
            before = {row["id"] for row in json.loads(old_inv)} if old_inv else set()
            now = {row["id"] for row in self.inventory}
            for sid in now - before:
                kv.put(sandbox_key(sid), name, ns)
            for sid in before - now:
                if kv.get_text(sandbox_key(sid), ns) == name:
                    kv.delete(sandbox_key(sid), ns)
            kv.put(inventory_key(name), inv_text, ns)
            self._published = (reg_text, inv_text)
        else:
            self._published = (reg_text, old_inv)
