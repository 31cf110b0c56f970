"""`python -m arcbox_vm.cluster.member PARAMS`: the daemon's member process.

The daemon (membership.py) runs it when `[cluster] ray_address` is set. It joins Ray as
a driver on this host's Ray node, makes sure the node service runs there (a detached
actor named after the node, pinned to this Ray node: node_service.py), configures it
with the daemon's socket and limits, and then watches: if the node service dies it is
made again; if this Ray node dies (the operator stopped it, it crashed) the process
exits and the daemon starts it again until the node is back — a new Ray node, a new
node service, the same name and sandboxes.

Ray runs in this process, never in the daemon: a Ray driver whose node goes away is
left half-connected, and the daemon must outlive any of that. The process dies with the
daemon (PR_SET_PDEATHSIG); SIGTERM first takes the node out of placement.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import asdict
from typing import Any

from arcbox_vm.cluster.names import actor_name
from arcbox_vm.cluster.node_state import MemberConf

log = logging.getLogger("arcbox_vm.cluster")

EXIT_NODE_GONE = 3
EXIT_NAME_TAKEN = 4
WATCH_S = 2.0
PR_SET_PDEATHSIG = 1


class NameTaken(Exception):
    pass


def _die_with(parent: int) -> None:
    if parent:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the line above
            sys.exit(0)


def _node_alive(ray: Any, node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def _ensure_actor(ray: Any, conf: MemberConf) -> Any:
    """The node service of `conf.name`, made on this Ray node if there is none."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from arcbox_vm.cluster.node_service import NodeService

    name = actor_name(conf.name)
    try:
        existing = ray.get_actor(name, namespace=conf.namespace)
    except ValueError:
        existing = None
    if existing is not None:
        try:
            where = ray.get(existing.status.remote(), timeout=30).get("actor_node_id")
        except Exception:  # noqa: BLE001 - dead or dying: replaced below
            where = None
        if where == conf.ray_node_id:
            return existing
        if where is not None and _node_alive(ray, where):
            raise NameTaken(f"node name {conf.name!r} is taken by another live node ({where}); "
                            "set [cluster] node_name")
        ray.kill(existing)
    actor = ray.remote(NodeService).options(
        name=name, namespace=conf.namespace, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=0, max_concurrency=1000,
        scheduling_strategy=NodeAffinitySchedulingStrategy(conf.ray_node_id, soft=False),
    ).remote(conf.name, conf.namespace)
    return actor


def run(params: dict[str, Any], stop: threading.Event) -> int:
    import ray

    ray.init(address=params["ray_address"], _node_ip_address=params.get("node_ip") or None,
             namespace=params["namespace"], logging_level=logging.WARNING, log_to_driver=False)
    node_id = ray.get_runtime_context().get_node_id()
    address = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), "")
    conf = MemberConf.from_dict({**params, "ray_node_id": node_id, "address": address})
    actor = _ensure_actor(ray, conf)
    status = ray.get(actor.configure.remote(asdict(conf)), timeout=120)
    log.info("joined the fleet as node %s (Ray node %s at %s): %s", conf.name, node_id, address,
             status.get("capacity"))
    try:
        while not stop.wait(WATCH_S):
            if not _node_alive(ray, node_id):
                log.warning("this host's Ray node %s is gone; rejoining once it is back", node_id)
                return EXIT_NODE_GONE
            try:
                ray.get(actor.status.remote(), timeout=30)
            except Exception as exc:  # noqa: BLE001 - the node service died: make it again
                log.warning("the node service of %s is gone (%s); starting it again", conf.name, exc)
                actor = _ensure_actor(ray, conf)
                ray.get(actor.configure.remote(asdict(conf)), timeout=120)
        try:
            ray.get(actor.daemon_leaving.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - best effort: the node service notices by itself
            pass
        return 0
    finally:
        ray.shutdown()


def main(argv: list[str]) -> int:
    params = json.loads(argv[1])
    logging.basicConfig(level=logging.INFO, format="arcbox-vm cluster member: %(levelname)s %(message)s")
    _die_with(int(params.get("daemon_pid") or 0))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        return run(params, stop)
    except NameTaken as exc:
        log.error("%s", exc)
        return EXIT_NAME_TAKEN
    except Exception as exc:  # noqa: BLE001 - the daemon restarts us; say why in one line
        log.warning("cannot join the Ray cluster at %s: %s", params.get("ray_address"), exc)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
