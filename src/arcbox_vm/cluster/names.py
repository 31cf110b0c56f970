"""The names a fleet shares: Ray custom resources, the node services' actor names and the
keys of the fleet's registry in the GCS key-value store. Pure; imports no Ray."""

from __future__ import annotations

from arcbox_vm.config.cluster import DEFAULT_NAMESPACE

__all__ = ["DEFAULT_NAMESPACE", "MEMORY", "SLOTS", "actor_name", "inventory_key", "node_id_key", "node_key",
           "sandbox_key"]

# Custom resources each member node advertises: its free sandbox slots and free guest
# memory (MiB), as [limits] allow and its daemon's sandboxes leave them. A placement
# task asks for {SLOTS: 1, MEMORY: memory_mib}.
SLOTS = "arcbox_vm_slots"
MEMORY = "arcbox_vm_memory_mib"

NODE_PREFIX = "node/"            # node/<name>       -> the node's registration (JSON)
INVENTORY_PREFIX = "inventory/"  # inventory/<name>  -> its sandboxes as last seen (JSON list)
NODE_ID_PREFIX = "nodeid/"       # nodeid/<ray id>   -> <name>
SANDBOX_PREFIX = "sandbox/"      # sandbox/<id>      -> <name>: the node that holds it


def actor_name(node: str) -> str:
    return f"arcbox-vm-node:{node}"


def node_key(node: str) -> bytes:
    return (NODE_PREFIX + node).encode()


def inventory_key(node: str) -> bytes:
    return (INVENTORY_PREFIX + node).encode()


def node_id_key(ray_node_id: str) -> bytes:
    return (NODE_ID_PREFIX + ray_node_id).encode()


def sandbox_key(sandbox_id: str) -> bytes:
    return (SANDBOX_PREFIX + sandbox_id).encode()
