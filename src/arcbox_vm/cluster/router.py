"""Routing to the node services: the part of the fleet a FleetSandbox handle needs.

`Router` finds a node's service (the Ray actor `arcbox-vm-node:<name>`), makes the call
and maps what can go wrong: an ArcboxError raised on the node is rebuilt (errors.py); a
node service that is gone, or a node whose daemon does not answer, is NodeUnavailable.
`Fleet` (fleet.py) is a Router; `Router.current()` is the one a handle unpickled in a
Ray task or actor uses.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, TaskCancelledError

from arcbox_vm.client.errors import DaemonUnavailable
from arcbox_vm.cluster import kv
from arcbox_vm.cluster.errors import NodeUnavailable, unwrap
from arcbox_vm.cluster.names import DEFAULT_NAMESPACE, actor_name, sandbox_key

__all__ = ["ENV_NODE_IP", "Router", "connect"]

ENV_NODE_IP = "ARCBOX_VM_RAY_NODE_IP"  # this machine's Ray node address, when Ray cannot tell


def connect(address: str | None, node_ip: str | None) -> None:
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False}
    ip = node_ip or os.environ.get(ENV_NODE_IP)
    if ip and not (address or "").startswith("ray://"):
        kwargs["_node_ip_address"] = ip
    ray.init(address=address or "auto", **kwargs)



class Router:
    """Calls to the node services of one fleet (`namespace`) over this process's Ray."""

    _current: dict[str, "Router"] = {}
    _lock = threading.Lock()

    def __init__(self, address: str | None = "auto", *, namespace: str = DEFAULT_NAMESPACE,
                 node_ip: str | None = None) -> None:
        connect(address, node_ip)
        self.address = address
        self.namespace = namespace
        self._actors: dict[str, Any] = {}
        with Router._lock:
            if not isinstance(Router._current.get(namespace), type(self)):
                Router._current[namespace] = self  # a Fleet replaces a plain Router

    @classmethod
    def current(cls, namespace: str = DEFAULT_NAMESPACE) -> "Router":
        """The router of this process's Ray connection (made on first use: in a Ray task or
        actor, or after unpickling a handle)."""
        with Router._lock:
            found = Router._current.get(namespace)
        if isinstance(found, cls):
            return found
        return cls(None if ray.is_initialized() else "auto", namespace=namespace)

    # -- routing --------------------------------------------------------------------------

    def _actor(self, node: str) -> Any:
        actor = self._actors.get(node)
        if actor is None:
            try:
                actor = ray.get_actor(actor_name(node), namespace=self.namespace)
            except ValueError:
                raise NodeUnavailable(f"node {node} of the fleet is not serving (its Ray node or daemon is down; "
                                      "its sandboxes are listed as lost until it is back)") from None
            self._actors[node] = actor
        return actor

    def _lost(self, node: str, exc: BaseException) -> NodeUnavailable:
        self._actors.pop(node, None)
        return NodeUnavailable(f"node {node} of the fleet cannot be reached ({type(exc).__name__}); its sandboxes "
                               "are listed as lost until it is back")

    def _replaced(self, node: str) -> Any:
        """After a call failed on the cached service of `node`: a different live service
        registered under its name (the node came back), or None. A call is retried there
        only then — the old service was gone before the call, so it never ran."""
        stale = self._actors.pop(node, None)
        try:
            fresh = ray.get_actor(actor_name(node), namespace=self.namespace)
        except ValueError:
            return None
        if stale is None or fresh._actor_id == stale._actor_id:
            return None
        self._actors[node] = fresh
        return fresh

    def _call(self, node: str, fn: Callable[[Any], Any], timeout: float | None = None,
              idempotent: bool = False) -> Any:
        """`fn(actor)` → an ObjectRef; its value, with errors mapped. An `idempotent` call
        (a read) that Ray cancelled on the node's service — its connection to the daemon
        was being replaced — is tried once more."""
        actor = self._actor(node)
        for attempt in (1, 2):
            try:
                return ray.get(fn(actor), timeout=timeout)
            except TaskCancelledError as exc:
                if not (idempotent and attempt == 1):
                    raise _on_node(node, unwrap(exc)) from None
                actor = self._replaced(node) or self._actor(node)
            except RayTaskError as exc:
                raise _on_node(node, unwrap(exc)) from None
            except (RayActorError, GetTimeoutError) as exc:
                fresh = self._replaced(node) if attempt == 1 and isinstance(exc, RayActorError) else None
                if fresh is None:
                    raise self._lost(node, exc) from None
                actor = fresh
        raise AssertionError("unreachable")

    def _stream(self, node: str, fn: Callable[[Any], Any]) -> Iterator[Any]:
        """The items of a streaming call, with errors mapped."""
        actor = self._actor(node)
        for attempt in (1, 2):
            started = False
            try:
                for ref in fn(actor):
                    item = ray.get(ref)
                    started = True
                    yield item
                return
            except RayTaskError as exc:
                raise _on_node(node, unwrap(exc)) from None
            except RayActorError as exc:
                fresh = None if started or attempt == 2 else self._replaced(node)
                if fresh is None:
                    raise self._lost(node, exc) from None
                actor = fresh

    def _forget_sandbox(self, sandbox_id: str, node: str) -> None:
        if kv.get_text(sandbox_key(sandbox_id), self.namespace) == node:
            kv.delete(sandbox_key(sandbox_id), self.namespace)


def _on_node(node: str, exc: BaseException) -> BaseException:
    """A node whose daemon does not answer is an unavailable node of the fleet."""
    if isinstance(exc, DaemonUnavailable) and not isinstance(exc, NodeUnavailable):
        return NodeUnavailable(f"the daemon of node {node} cannot be reached ({exc}); its sandboxes are listed "
                               "as lost until it is back")
    return exc
