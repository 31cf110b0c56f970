"""`Fleet`: the client of a fleet of arcbox-vm nodes on Ray.

    from arcbox_vm.cluster import Fleet
    fleet = Fleet("auto")                       # or "HOST:PORT", "ray://HOST:PORT"
    with fleet.create(memory_mib=256, labels={"job": "x"}) as sb:   # placed by Ray; waits until ready
        print(sb.node, sb.run(["uname", "-r"]).stdout)
    fleet.list(labels={"job": "x"})             # across nodes; each entry names its node
    fleet.nodes()                               # name, address, capacity, alive

Requests for a sandbox go to the node service of its node (a Ray actor on that node,
node_service.py), which calls the node's daemon. Which node holds which sandbox is in the
fleet's registry (the GCS key-value store, names.py); so is each node's inventory, and a
node that cannot be reached — its Ray node or its daemon is down — has its sandboxes
listed as "lost" rather than dropped, until it comes back.

Inside Ray tasks and actors the process's Ray connection is used; FleetSandbox handles
pickle by id and work there.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from arcbox_vm.cluster import kv
from arcbox_vm.cluster.capacity import Capacity
from arcbox_vm.cluster.errors import NodeUnavailable
from arcbox_vm.cluster.handle import FleetSandbox
from arcbox_vm.cluster.names import DEFAULT_NAMESPACE, NODE_PREFIX, inventory_key, node_key, sandbox_key
from arcbox_vm.cluster.placement import place_and_create
from arcbox_vm.cluster.router import ENV_NODE_IP, Router
from arcbox_vm.config import DEFAULT_MEMORY_MIB
from arcbox_vm.errors import InvalidArgument, SandboxAlreadyExists, SandboxNotFound
from arcbox_vm.models import SandboxSpec

__all__ = ["ENV_NODE_IP", "Fleet", "FleetEntry", "LOST", "NodeInfo"]

LOST = "lost"
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class FleetEntry:
    """One sandbox of the fleet. state: the daemon's state, or "lost" while its node cannot
    be reached (then `last_state` is the state it was last seen in)."""

    id: str
    node: str
    state: str
    labels: dict[str, str] = field(default_factory=dict)
    ip_address: str = ""
    created_at: float = 0.0
    last_state: str = ""

    @property
    def lost(self) -> bool:
        return self.state == LOST


@dataclass(frozen=True)
class NodeInfo:
    """A member node. alive: its Ray node, node service and daemon all answer."""

    name: str
    address: str
    ray_node_id: str
    alive: bool
    ray_alive: bool
    daemon_up: bool
    capacity: Capacity
    sandboxes: int = 0
    default_memory_mib: int = DEFAULT_MEMORY_MIB


def _create_fields(spec: SandboxSpec) -> dict[str, Any]:
    """A SandboxSpec as the client's create() keywords."""
    net = spec.network
    return {"id": spec.id, "labels": dict(spec.labels), "vcpus": spec.vcpus, "memory_mib": spec.memory_mib,
            "kernel": spec.kernel, "rootfs": spec.rootfs, "initrd": spec.initrd, "boot_args": spec.boot_args,
            "network": net.mode, "ttl_seconds": spec.ttl_seconds, "env": dict(spec.env),
            "working_dir": spec.working_dir, "user": spec.user, "egress": net.egress,
            "allow_out": list(net.allow_out), "deny_out": list(net.deny_out), "ports": list(spec.ports)}


class Fleet(Router):
    """A connection to the fleet registered in the Ray cluster at `address`."""

    def __init__(self, address: str | None = "auto", *, namespace: str = DEFAULT_NAMESPACE,
                 node_ip: str | None = None, placement_timeout: float = 30.0) -> None:
        super().__init__(address, namespace=namespace, node_ip=node_ip)
        self.placement_timeout = placement_timeout

    # -- registry ---------------------------------------------------------------------------

    def _registrations(self) -> dict[str, dict[str, Any]]:
        regs = {}
        for key in kv.keys(NODE_PREFIX, self.namespace):
            reg = kv.get_json(key.encode(), self.namespace)
            if isinstance(reg, dict) and reg.get("name"):
                regs[reg["name"]] = reg
        return regs

    def forget_node(self, name: str) -> None:
        """Drop a node that is gone for good (and its lost sandboxes) from the registry."""
        for row in kv.get_json(inventory_key(name), self.namespace) or ():
            self._forget_sandbox(row.get("id", ""), name)
        kv.delete(inventory_key(name), self.namespace)
        kv.delete(node_key(name), self.namespace)
        self._actors.pop(name, None)

    # -- nodes ------------------------------------------------------------------------------

    def nodes(self) -> list[NodeInfo]:
        regs = self._registrations()
        ray_alive = {n["NodeID"]: bool(n["Alive"]) for n in ray.nodes()}
        probes: dict[str, Any] = {}
        for name, reg in regs.items():
            if ray_alive.get(reg.get("ray_node_id", "")):
                try:
                    probes[name] = self._actor(name).status.remote()
                except NodeUnavailable:
                    pass
        answers = self._gather(probes, PROBE_TIMEOUT_S)
        out = []
        for name, reg in sorted(regs.items()):
            status = answers.get(name)
            current = status if isinstance(status, dict) and status.get("name") else reg
            cap = Capacity(**current.get("capacity", {}))
            up = bool(current.get("daemon_up")) and status is not None
            ray_up = ray_alive.get(reg.get("ray_node_id", ""), False)
            out.append(NodeInfo(name=name, address=current.get("address", ""),
                                ray_node_id=current.get("ray_node_id", ""),
                                alive=ray_up and up, ray_alive=ray_up, daemon_up=up, capacity=cap,
                                sandboxes=int(current.get("sandboxes", 0)),
                                default_memory_mib=int(current.get("default_memory_mib", DEFAULT_MEMORY_MIB))))
        return out

    def _gather(self, refs: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """The values of the calls (by node) that answered within `timeout`; a node whose
        call failed or did not answer is left out (and its service looked up afresh)."""
        if not refs:
            return {}
        by_ref = {ref: name for name, ref in refs.items()}
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=timeout)
        out = {}
        for ref in ready:
            try:
                out[by_ref[ref]] = ray.get(ref)
            except Exception:  # noqa: BLE001 - a node that fails to answer is reported as down
                pass
        for name in set(refs) - set(out):
            self._actors.pop(name, None)
        return out

    def _describe_capacity(self) -> str:
        regs = self._registrations()
        return ", ".join(f"{n}: {r['capacity']['free_slots']} slots / {r['capacity']['free_memory_mib']} MiB"
                         + ("" if r.get("daemon_up") else " (down)") for n, r in sorted(regs.items())) or "no nodes"

    # -- sandboxes --------------------------------------------------------------------------

    def create(self, spec: SandboxSpec | Mapping[str, Any] | None = None, *, node: str | None = None,
               wait: bool = True, timeout: float | None = 120.0, placement_timeout: float | None = None,
               remove_on_exit: bool = True, **fields: Any) -> FleetSandbox:
        """Create a sandbox on a node Ray chooses (SPREAD), or on `node`; wait until it is
        ready (wait=True; it is removed if it fails to boot). `spec` and `fields` are what
        SandboxSpec / Sandbox.create take (fields win). ResourceExhausted when no node has
        room within `placement_timeout` s; SandboxAlreadyExists for an id in use."""
        base = spec.model_dump() if isinstance(spec, SandboxSpec) else dict(spec or {})
        net = dict(base.get("network") or {})
        if "network" in fields:
            value = fields.pop("network")
            net.update({"mode": value} if isinstance(value, str) else dict(value or {}))
        for key in ("egress", "allow_out", "deny_out"):
            if key in fields:
                net[key] = fields.pop(key)
        if net:
            base["network"] = net
        try:
            full = SandboxSpec.model_validate({**base, **fields})
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        sandbox_id = full.id or f"sb-{secrets.token_hex(8)}"
        if not kv.put_new(sandbox_key(sandbox_id), "", self.namespace):
            raise SandboxAlreadyExists(sandbox_id)
        placed = None
        try:
            strategy: Any = "SPREAD"
            if node is not None:
                reg = self._registrations().get(node)
                if reg is None:
                    raise InvalidArgument(f"no node named {node!r} in the fleet; see Fleet.nodes()")
                strategy = NodeAffinitySchedulingStrategy(reg["ray_node_id"], soft=False)
            memory = full.memory_mib or max((int(r.get("default_memory_mib", 0)) for r in
                                             self._registrations().values()), default=DEFAULT_MEMORY_MIB)
            wait_s = self.placement_timeout if placement_timeout is None else placement_timeout
            placed = place_and_create({**_create_fields(full), "id": sandbox_id}, namespace=self.namespace,
                                      memory_mib=memory, strategy=strategy, timeout=wait_s,
                                      describe_capacity=self._describe_capacity)
        finally:
            if placed is None and kv.get_text(sandbox_key(sandbox_id), self.namespace) == "":
                kv.delete(sandbox_key(sandbox_id), self.namespace)
        kv.put(sandbox_key(sandbox_id), placed["node"], self.namespace)
        handle = FleetSandbox(self, sandbox_id, placed["node"], remove_on_exit=remove_on_exit)
        if wait:
            try:
                handle.wait_ready(timeout)
            except BaseException:
                handle.remove_on_exit = True
                handle.close()
                raise
        return handle

    def get(self, sandbox_id: str) -> FleetSandbox:
        """A handle on a sandbox of the fleet (SandboxNotFound if no node has it). Its node
        need not be reachable now: calls raise NodeUnavailable until it is back."""
        node = kv.get_text(sandbox_key(sandbox_id), self.namespace)
        if not node:
            raise SandboxNotFound(sandbox_id)
        return FleetSandbox(self, sandbox_id, node, remove_on_exit=False)

    def list(self, labels: Mapping[str, str] | None = None, state: str | None = None) -> list[FleetEntry]:
        """Every sandbox of every node (with `labels`, in `state`), each naming its node;
        the sandboxes of a node that cannot be reached have state "lost"."""
        want = dict(labels or {})
        regs = self._registrations()
        ray_alive = {n["NodeID"]: bool(n["Alive"]) for n in ray.nodes()}
        calls: dict[str, Any] = {}
        for name, reg in regs.items():  # also for state="lost": which nodes answer decides it
            if ray_alive.get(reg.get("ray_node_id", "")) and reg.get("daemon_up"):
                try:
                    calls[name] = self._actor(name).list.remote(None if state == LOST else state, want)
                except NodeUnavailable:
                    pass
        answers = self._gather(calls, PROBE_TIMEOUT_S)
        out: list[FleetEntry] = []
        for name in sorted(regs):
            rows = answers.get(name)
            if isinstance(rows, list):
                if state == LOST:
                    continue
                out.extend(FleetEntry(id=s.id, node=name, state=str(getattr(s.state, "value", s.state)),
                                      labels=dict(s.labels), ip_address=s.ip_address, created_at=s.created_at)
                           for s in rows)
            elif state in (None, LOST):
                out.extend(FleetEntry(id=r["id"], node=name, state=LOST, labels=dict(r.get("labels") or {}),
                                      ip_address=r.get("ip_address", ""), created_at=r.get("created_at", 0.0),
                                      last_state=r.get("state", ""))
                           for r in kv.get_json(inventory_key(name), self.namespace) or ()
                           if all((r.get("labels") or {}).get(k) == v for k, v in want.items()))
        return sorted(out, key=lambda e: (e.created_at, e.id))
