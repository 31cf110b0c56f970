"""`[cluster]`: this daemon as a node of a fleet on Ray (arcbox_vm.cluster).

Ray is an optional extra (`pip install 'arcbox-vm[cluster]'`); this section only names
where the Ray cluster is, so reading a config never imports Ray.
"""

from __future__ import annotations

import socket

from pydantic import Field, field_validator

from arcbox_vm.config.sections import _Section, check_host_port

__all__ = ["DEFAULT_NAMESPACE", "ClusterConfig"]

DEFAULT_NAMESPACE = "arcbox-vm"


class ClusterConfig(_Section):
    """Membership in a fleet of arcbox-vm nodes (see docs/CLUSTER.md).

    ray_address: the Ray head's GCS address "HOST:PORT" (what `ray start --address` takes);
      "" = not a member (the default). The operator runs `ray start` on this host as usual;
      the daemon then registers this node's free capacity with Ray as custom resources and
      serves the fleet's requests for its sandboxes.
    node_ip: this host's Ray node address (its `ray start --node-ip-address`); "" = Ray's
      own detection.
    node_name: this node's name in the fleet (unique); "" = the hostname.
    namespace: the Ray namespace of the node services and of the fleet's registry.
    refresh_s: capacity and inventory are re-read this often even without events.
    """

    ray_address: str = ""
    node_ip: str = ""
    node_name: str = ""
    namespace: str = DEFAULT_NAMESPACE
    refresh_s: float = Field(5.0, gt=0, le=300)

    @field_validator("ray_address")
    @classmethod
    def _address(cls, v: str) -> str:
        return check_host_port(v)

    @field_validator("node_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v and (len(v) > 63 or not all(c.isalnum() or c in "-_." for c in v)):
            raise ValueError(f"must be 1-63 letters, digits, '-', '_' or '.', got {v!r}")
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.ray_address)

    def resolved_node_name(self) -> str:
        return self.node_name or socket.gethostname().split(".")[0] or "node"
