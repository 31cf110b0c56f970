"""The fleet over real microVMs: a Ray head and two Ray nodes on loopback addresses, each
node a real `arcbox-vm serve` (QEMU) with its own data dir, CIDR and network namespace,
joined by its [cluster] section. Short on purpose (few boots, network "none"): the
fast variant (tests/unit/test_cluster_local.py) covers the rest over the test double.

Four sandboxes created through the fleet land on both nodes; commands and file copies
work through the handles, also from a Ray task; one node stopped (daemon killed, Ray
node stopped) → its sandboxes are "lost" and a new create lands on the other; started
again → the daemon re-adopts its VMs and they answer through the fleet again.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from arcbox_vm.cluster import Fleet, FleetSandbox  # noqa: E402
from arcbox_vm.images import GuestImage  # noqa: E402
from tests.support.ray_cluster import Proc, RayCluster, naming, process_env, session_members  # noqa: E402

from .manager_helpers import netns_list  # noqa: E402

pytestmark = pytest.mark.vm

HEAD = "127.0.0.30"
NODES = {"v1": ("127.0.0.31", "10.244.1.0/24"), "v2": ("127.0.0.32", "10.244.2.0/24")}
ARCBOX = str(Path(sys.executable).with_name("arcbox-vm"))


class VmNode:
    def __init__(self, root: Path, name: str, ip: str, cidr: str, image: GuestImage, ray_address: str) -> None:
        d = root / name
        d.mkdir()
        self.name, self.socket, self.netns = name, d / "d.sock", f"arcbox-t-{secrets.token_hex(3)}"
        gw = cidr.rsplit(".", 1)[0] + ".1"
        config = d / "config.toml"
        config.write_text(f"""
backend = "qemu"
data_dir = "{d / 'data'}"
[grpc]
unix_socket = "{self.socket}"
[network]
cidr = "{cidr}"
gateway = "{gw}"
netns = "{self.netns}"
[defaults]
memory_mib = 256
kernel = "{image.kernel}"
initrd = "{image.initrd}"
rootfs = "{image.rootfs}"
[daemon]
on_shutdown = "remove"
[limits]
max_sandboxes = 3
[cluster]
ray_address = "{ray_address}"
node_ip = "{ip}"
node_name = "{name}"
refresh_s = 2
""")
        self.proc = Proc([ARCBOX, "serve", "--config", str(config)], d / "daemon.log", process_env())

    def start(self) -> "VmNode":
        self.proc.start()
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            assert self.proc.running and time.monotonic() < deadline, self.proc.tail()
            time.sleep(0.1)
        return self


def until(what: str, check, timeout: float = 120.0, every: float = 0.5):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # noqa: BLE001 - keep trying until the deadline
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"{what}: not after {timeout} s (last: {last!r})")


@pytest.fixture(scope="module")
def fleet_env(guest_image: GuestImage) -> Iterator[tuple[Fleet, RayCluster, dict[str, VmNode], Path]]:
    root = Path(tempfile.mkdtemp(prefix="abxv"))
    cluster = RayCluster(root, HEAD)
    nodes: dict[str, VmNode] = {}
    try:
        cluster.start_head()
        for name, (ip, _) in NODES.items():
            cluster.start_node(name, ip)
        fleet = Fleet(cluster.address, node_ip=HEAD, placement_timeout=30)
        for name, (ip, cidr) in NODES.items():
            nodes[name] = VmNode(root, name, ip, cidr, guest_image, cluster.address).start()
        until("both nodes joined", lambda: {n.name for n in fleet.nodes() if n.alive} == set(NODES), 180)
        yield fleet, cluster, nodes, root
    finally:
        codes = {name: node.proc.stop(timeout=120) for name, node in nodes.items()}
        ray.shutdown()
        cluster.close()
        sessions = cluster.sessions() | {s for n in nodes.values() for s in n.proc.sessions}
        left = sorted(set(session_members(sessions)) | set(naming(root)))
        for pid in left:  # reported below; not left running
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for node in nodes.values():  # the namespace of a daemon that never came back
            if node.netns in netns_list():
                subprocess.run(["ip", "netns", "delete", node.netns], check=False)
                left.append(node.netns)  # type: ignore[arg-type]
        if not os.environ.get("ARCBOX_TEST_KEEP"):
            shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left behind: {left}"
        assert all(code == 0 for code in codes.values()), codes


@ray.remote(num_cpus=0)
def _in_task(sb: FleetSandbox) -> bytes:
    sb.files.write("/tmp/from-task", b"task wrote this")
    return sb.run(["cat", "/tmp/from-task"]).stdout


def test_a_fleet_of_two_real_daemons(fleet_env) -> None:  # noqa: ANN001
    fleet, cluster, nodes, root = fleet_env
    sbs = [fleet.create(network="none", labels={"t": "vm", "i": str(i)}, wait=False) for i in range(4)]
    assert Counter(sb.node for sb in sbs) == {"v1": 2, "v2": 2}
    for sb in sbs:
        sb.wait_ready(timeout=300)
        assert sb.run(["cat", "/proc/sys/kernel/hostname"]).ok
    one = sbs[0]
    payload = bytes(range(256)) * 4096  # 1 MiB
    assert one.files.write("/tmp/payload", payload) == len(payload)
    assert one.run(["sha256sum", "/tmp/payload"]).stdout.split()[0] == \
        __import__("hashlib").sha256(payload).hexdigest().encode()
    assert one.files.read("/tmp/payload") == payload
    assert ray.get(_in_task.remote(sbs[1]), timeout=180) == b"task wrote this"
    assert {e.id: e.node for e in fleet.list(labels={"t": "vm"})} == {sb.id: sb.node for sb in sbs}

    # the node v2 goes away: its daemon is killed (its VMs keep running) and its Ray node stops
    on_v2 = [sb for sb in sbs if sb.node == "v2"]
    nodes["v2"].proc.kill9()
    cluster.stop_node("v2")
    until("v2's sandboxes are lost",
          lambda: {e.id for e in fleet.list(state="lost")} == {sb.id for sb in on_v2}, 120)
    assert {n.name: n.alive for n in fleet.nodes()} == {"v1": True, "v2": False}
    extra = fleet.create(network="none", labels={"t": "vm"}, timeout=300)
    assert extra.node == "v1" and extra.run(["true"]).ok

    # back: Ray node first, then the daemon, which re-adopts its VMs and joins again
    cluster.start_node("v2", NODES["v2"][0])
    nodes["v2"].start()
    until("v2's sandboxes are back",
          lambda: {(e.id, e.state) for e in fleet.list(labels={"t": "vm"}) if e.node == "v2"}
          == {(sb.id, "ready") for sb in on_v2}, 240)
    for sb in on_v2:
        assert sb.run(["echo", "back"]).stdout == b"back\n"
    for sb in [*sbs, extra]:
        sb.remove()
    assert fleet.list(labels={"t": "vm"}) == []
