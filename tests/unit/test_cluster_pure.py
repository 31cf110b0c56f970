"""The fleet's pure parts, without Ray running: free capacity as the daemon's admission
counts it, errors crossing Ray, the [cluster] section, what the member process is told,
and that nothing imports Ray unless the cluster is used."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import arcbox_vm

from arcbox_vm.client.errors import DaemonUnavailable, ReadyTimeout
from arcbox_vm.cluster.capacity import free_capacity
from arcbox_vm.cluster.errors import NodeUnavailable, RemoteError, decode, encode, unwrap
from arcbox_vm.cluster.membership import member_params
from arcbox_vm.config import VmmConfig
from arcbox_vm.errors import ConfigError, ExecError, GuestFileNotFound, InvalidState, SandboxNotFound
from arcbox_vm.models import SandboxState as S

SOURCE_ROOT = Path(arcbox_vm.__file__).resolve().parents[1]



def test_free_capacity_counts_what_holds_a_vm() -> None:
    cap = free_capacity(4, 1024, [(S.READY, 256), (S.STARTING, 256), (S.STOPPED, 512), (S.FAILED, 512),
                                  ("running", 128)])
    assert (cap.free_slots, cap.free_memory_mib) == (1, 384)
    full = free_capacity(1, 100, [(S.READY, 512)])
    assert (full.free_slots, full.free_memory_mib) == (0, 0)  # never negative
    assert cap.as_dict() == {"max_sandboxes": 4, "max_memory_mib": 1024, "free_slots": 1, "free_memory_mib": 384}


@pytest.mark.parametrize("exc", [
    SandboxNotFound("sb-1"),
    InvalidState("sb-1", "stopped", "start it first"),
    GuestFileNotFound("no such file /x", "/x"),
    ExecError("not found: foo", code="not_found"),
    ReadyTimeout("not ready after 3 s"),
    NodeUnavailable("node n1 is down"),
])
def test_errors_cross_ray_as_plain_data_and_come_back_as_themselves(exc: Exception) -> None:
    remote = pickle.loads(pickle.dumps(encode(exc)))  # what Ray does with it
    assert isinstance(remote, RemoteError)
    back = decode(remote.payload)
    assert type(back) is type(exc) and str(back) == str(exc)
    for name in ("sandbox_id", "path", "code", "state"):
        assert getattr(back, name, None) == getattr(exc, name, None)


def test_unwrap_finds_the_remote_error_in_a_task_error() -> None:
    class TaskError(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__("task failed")
            self.cause = cause

    assert isinstance(unwrap(TaskError(encode(SandboxNotFound("x")))), SandboxNotFound)
    other = TaskError(ValueError("boom"))
    assert unwrap(other) is other
    assert issubclass(NodeUnavailable, DaemonUnavailable)


def test_cluster_section_and_member_params(tmp_path) -> None:  # noqa: ANN001
    assert not VmmConfig().cluster.enabled
    with pytest.raises(ConfigError, match="cluster.ray_address"):
        VmmConfig.from_dict({"cluster": {"ray_address": "no-port"}})
    with pytest.raises(ConfigError, match="cluster.node_name"):
        VmmConfig.from_dict({"cluster": {"ray_address": "10.0.0.1:6379", "node_name": "a b"}})
    cfg = VmmConfig.from_dict({
        "grpc": {"unix_socket": str(tmp_path / "d.sock")},
        "limits": {"max_sandboxes": 7, "max_total_memory_mib": 4096},
        "defaults": {"memory_mib": 256},
        "cluster": {"ray_address": "10.0.0.1:6379", "node_ip": "10.0.0.2", "node_name": "n-1"},
    })
    params = member_params(cfg, 1234)
    assert params == {"ray_address": "10.0.0.1:6379", "node_ip": "10.0.0.2", "name": "n-1",
                      "namespace": "arcbox-vm", "refresh_s": 5.0, "socket": str(tmp_path / "d.sock"),
                      "max_sandboxes": 7, "max_memory_mib": 4096, "default_memory_mib": 256, "daemon_pid": 1234}
    json.dumps(params)
    unnamed = VmmConfig.from_dict({"cluster": {"ray_address": "h:1"}})
    assert member_params(unnamed, 1)["name"] and member_params(unnamed, 1)["max_memory_mib"] > 0


_PROBE = """
import json, sys
import arcbox_vm.cli.main, arcbox_vm.daemon.serve, arcbox_vm.cluster, arcbox_vm.cluster.membership
print(json.dumps(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))))
"""


def test_nothing_imports_ray_unless_the_cluster_is_used() -> None:
    path = os.pathsep.join([str(SOURCE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
