"""Placement: Ray's scheduler chooses the node.

A create is a Ray task that asks for {SLOTS: 1, MEMORY: memory_mib} of the custom
resources the member nodes advertise (node_state.py), with Ray's SPREAD strategy — or
pinned to one node (NodeAffinity, hard) when the caller names it. Ray runs it on a node
with room; there it asks the node's service to create the sandbox, which re-reads the
daemon and lowers the node's resources before the task ends and gives its share back —
so the next placement already sees the slot taken. The daemon's own admission stays the
authority: a node that turns out to be full (or whose daemon just went away) answers
"retry", and the task is placed again until the bounded wait ends in
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.exceptions import (
    GetTimeoutError,
    RayActorError,
    RayTaskError,
    TaskCancelledError,
    TaskUnschedulableError,
)

from arcbox_vm.client.errors import DaemonUnavailable
from arcbox_vm.cluster import kv
from arcbox_vm.cluster.errors import RemoteError, decode, unwrap
from arcbox_vm.cluster.names import MEMORY, SLOTS, actor_name, node_id_key
from arcbox_vm.errors import ArcboxError, ResourceExhausted

__all__ = ["place", "place_and_create"]

RETRY_PAUSE_S = 0.3
CREATE_TIMEOUT_S = 120.0


def place(fields: dict[str, Any], namespace: str) -> dict[str, Any]:
    """The placement task: runs on the node Ray chose; creates the sandbox there."""
    node_id = ray.get_runtime_context().get_node_id()
    name = kv.get_text(node_id_key(node_id), namespace)
    if name is None:
        return {"retry": f"Ray node {node_id} advertises arcbox-vm capacity but has no member"}
    try:
        actor = ray.get_actor(actor_name(name), namespace=namespace)
        created = ray.get(actor.create.remote(fields), timeout=CREATE_TIMEOUT_S)
    except ValueError:
        return {"retry": f"node {name} has no node service", "node": name}
    except RayActorError as exc:
        return {"retry": f"the node service of {name} died ({exc.__class__.__name__})", "node": name}
    except RayTaskError as exc:
        cause = getattr(exc, "cause", exc)
        if isinstance(cause, RemoteError):
            err = decode(cause.payload)
            if isinstance(err, (ResourceExhausted, DaemonUnavailable)):
                return {"retry": f"node {name}: {err}", "node": name}
            raise cause from None
        raise
    return {"node": name, "id": created.id, "ip_address": created.ip_address, "state": created.state}


_task: Any = None


def _place_task() -> Any:
    global _task
    if _task is None:
        _task = ray.remote(place)
    return _task


def place_and_create(fields: dict[str, Any], *, namespace: str, memory_mib: int, strategy: Any,
                     timeout: float, describe_capacity: Any) -> dict[str, Any]:
    """Place and create within `timeout` s; ResourceExhausted when no node had room."""
    task = _place_task().options(num_cpus=0, max_retries=0, resources={SLOTS: 1.0, MEMORY: float(memory_mib)},
                                 scheduling_strategy=strategy)
    started = time.monotonic()
    deadline = started + timeout
    last = ""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ref = task.remote(fields, namespace)
        ready, _ = ray.wait([ref], timeout=remaining)
        if not ready:
            ray.cancel(ref)
            try:
                result = ray.get(ref, timeout=CREATE_TIMEOUT_S)  # it may have started meanwhile
            except RayTaskError as exc:
                err = unwrap(exc)
                if isinstance(err, ArcboxError):
                    raise err from None
                break
            except (TaskCancelledError, GetTimeoutError):
                break
        else:
            try:
                result = ray.get(ref)
            except RayTaskError as exc:
                raise unwrap(exc) from None
            except TaskUnschedulableError:  # pinned to a node that has (had) no room: Ray says so at once
                result = {"retry": "the chosen node has no room"}
        if "retry" not in result:
            return result
        last = result["retry"]
        time.sleep(RETRY_PAUSE_S)
    waited = time.monotonic() - started
    raise ResourceExhausted(
        f"no node of the fleet has room for a sandbox of {memory_mib} MiB (waited {waited:.0f} s"
        + (f"; last: {last}" if last else "") + f"); free capacity: {describe_capacity()}; "
        "remove sandboxes or add nodes")
