"""A fleet of arcbox-vm nodes on Ray: placement, routing, node failure (docs/CLUSTER.md).

Install with `pip install 'arcbox-vm[cluster]'`. The node side runs inside `arcbox-vm
serve` when `[cluster] ray_address` is set (membership.py → member.py → node_service.py);
the client side is `Fleet` (fleet.py) and its `FleetSandbox` handles (handle.py).

    from arcbox_vm.cluster import Fleet
    fleet = Fleet("auto")
    sb = fleet.create(memory_mib=256)
    print(sb.node, sb.run("echo hi").stdout)

Re-exported lazily: importing this package imports no Ray.

Modules: names (resources, actor names, registry keys), capacity (free capacity, pure),
errors (NodeUnavailable; errors across Ray), kv (the GCS registry and resource resize:
the only private Ray calls), node_state + node_service (the node service actor),
member (the daemon's member process), membership (the daemon side, no Ray), placement
(the placement task), handle + fleet (the client).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Fleet": "arcbox_vm.cluster.fleet",
    "FleetEntry": "arcbox_vm.cluster.fleet",
    "NodeInfo": "arcbox_vm.cluster.fleet",
    "LOST": "arcbox_vm.cluster.fleet",
    "FleetSandbox": "arcbox_vm.cluster.handle",
    "FleetExecSession": "arcbox_vm.cluster.handle",
    "FleetFiles": "arcbox_vm.cluster.handle",
    "Capacity": "arcbox_vm.cluster.capacity",
    "NodeUnavailable": "arcbox_vm.cluster.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'arcbox_vm.cluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
