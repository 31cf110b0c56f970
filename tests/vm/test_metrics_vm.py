"""The metrics of a real daemon (`arcbox-vm serve`) with one QEMU sandbox running a busy
loop: its CPU seconds rise and its memory is non-zero, read from the VMM's real cgroup
(`daemon.cgroup_parent`, on by default), and its series go with it."""

from __future__ import annotations

import secrets
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.images import GuestImage
from arcbox_vm.paths import manager_tag
from arcbox_vm.vmm.cgroup import SandboxCgroups

from .daemon_helpers import Daemon, wait_state, write_config
from .manager_helpers import netns_list

pytestmark = pytest.mark.vm

BUSY = ["sh", "-c", "while :; do :; done"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def cpu_usec(cgroup: Path) -> int:
    for line in (cgroup / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value)
    raise AssertionError(f"no usage_usec in {cgroup}/cpu.stat")


def test_a_busy_qemu_sandbox_burns_cpu_and_holds_memory_in_its_cgroup(tmp_path: Path,
                                                                       guest_image: GuestImage) -> None:
    netns = f"arcbox-t-{secrets.token_hex(3)}"
    data_dir, port = tmp_path / "data", free_port()
    cfg = write_config(tmp_path / "c.toml", guest_image, data_dir, tmp_path / "d.sock", netns=netns,
                       cidr="10.249.0.0/24", on_shutdown="remove")
    cfg.write_text(cfg.read_text() + f'\n[metrics]\naddr = "127.0.0.1:{port}"\n')
    d = Daemon(cfg, tmp_path / "d.sock", tmp_path / "daemon.log").start()
    try:
        stub = d.stub()
        sid = stub.Create(pb.CreateSandboxRequest(network=pb.NetworkSpec(mode="none"))).id
        wait_state(stub, sid, ("ready",), timeout=180)
        exec_id = stub.Start(pb.StartRequest(id=sid, cmd=BUSY)).exec_id
        cgroups = SandboxCgroups.open("arcbox-vm", manager_tag(data_dir))
        cgroup = cgroups.path(sid)
        assert cgroup is not None and cgroups.pids(sid), "the VMM runs in its own cgroup"

        (stats,) = stub.Stats(pb.StatsRequest(ids=[sid])).sandboxes
        assert stats.source == "cgroup" and stats.memory_bytes > 32 << 20 and stats.processes >= 1
        first = scrape(port)
        key = (("sandbox", sid),)
        cpu0 = first["arcbox_sandbox_cpu_seconds_total"][key]
        assert cpu0 <= cpu_usec(cgroup) / 1e6  # the same counter, read a little later
        time.sleep(5)
        second = scrape(port)
        cpu1 = second["arcbox_sandbox_cpu_seconds_total"][key]
        assert cpu1 - cpu0 > 1.0, (cpu0, cpu1)  # a guest busy loop keeps a host CPU busy
        assert second["arcbox_sandbox_memory_bytes"][key] > 32 << 20  # QEMU holds the guest's memory
        assert second["arcbox_sandbox_processes"][key] >= 1
        assert second["arcbox_sandboxes"][(("state", "running"),)] == 1
        assert second["arcbox_sandbox_ready_seconds_count"][(("source", "cold"),)] == 1

        stub.Signal(pb.SignalRequest(id=sid, exec_id=exec_id))
        stub.Remove(pb.RemoveSandboxRequest(id=sid, force=True))
        after = scrape(port)
        assert not any(dict(labels).get("sandbox") == sid for series in after.values() for labels in series)
        assert after["arcbox_events_total"][(("action", "removed"),)] == 1
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
    assert netns not in netns_list()
