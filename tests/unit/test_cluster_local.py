"""The fleet on real Ray, fast: a Ray head and two Ray nodes on loopback addresses
(127.0.0.2x), each node an `arcbox-vm serve` — the real daemon, as a process of its own,
over the local VMM test double (the real guest agent as a host process: no VM) — with
its own data dir, socket and [cluster] section. The cluster starts once for the module.

Covered: capacity registered as Ray resources, placement by Ray (spread, pinned, no room
→ RESOURCE_EXHAUSTED after a bounded wait), routing of commands and files through
handles (also from inside a Ray task), node failure (daemon killed, Ray node stopped:
its sandboxes are "lost", creates go elsewhere; back again: reachable again), the CLI,
and that every process started here is gone at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from arcbox_vm.client import Client  # noqa: E402
from arcbox_vm.cluster import Fleet, FleetSandbox, NodeUnavailable  # noqa: E402
from arcbox_vm.cluster.names import MEMORY, SLOTS  # noqa: E402
from arcbox_vm.errors import ResourceExhausted, SandboxNotFound  # noqa: E402
from tests.support.ray_cluster import Proc, RayCluster, naming, session_members, process_env  # noqa: E402

HEAD = "127.0.0.20"
IPS = {"n1": "127.0.0.21", "n2": "127.0.0.22"}
MAX_SANDBOXES = 3
MAX_MEMORY = 1024
MEM = 256
ARCBOX = str(Path(sys.executable).with_name("arcbox-vm"))


class LocalNode:
    """One `arcbox-vm serve` over the local test double, as a restartable process."""

    def __init__(self, root: Path, name: str, ip: str, ray_address: str) -> None:
        d = root / name
        d.mkdir()
        (d / "vmlinuz").write_bytes(b"not a kernel")
        (d / "rootfs.img").write_bytes(b"not a filesystem")
        self.name, self.socket = name, d / "d.sock"
        self.config = d / "config.toml"
        self.config.write_text(f"""
data_dir = "{d / 'data'}"
[grpc]
unix_socket = "{self.socket}"
[defaults]
memory_mib = {MEM}
kernel = "{d / 'vmlinuz'}"
rootfs = "{d / 'rootfs.img'}"
[daemon]
cgroup_parent = ""
on_shutdown = "remove"
[agent]
hello_timeout_s = 15
keepalive_interval_s = 0.5
keepalive_timeout_s = 5
[limits]
max_sandboxes = {MAX_SANDBOXES}
max_total_memory_mib = {MAX_MEMORY}
[cluster]
ray_address = "{ray_address}"
node_ip = "{ip}"
node_name = "{name}"
refresh_s = 2
""")
        env = process_env(ARCBOX_VM_RUNTIME_DIR=str(root / "run"))
        self.proc = Proc([sys.executable, "-m", "tests.support.local_daemon", str(self.config)], d / "daemon.log", env)

    def start(self) -> "LocalNode":
        self.proc.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.running, self.proc.tail()
            if self.socket.exists():
                try:
                    with Client(socket=self.socket) as c:
                        c.list()
                    return self
                except Exception:  # noqa: BLE001 - not up yet
                    pass
            time.sleep(0.1)
        raise AssertionError(f"daemon {self.name} did not come up: {self.proc.tail()}")

    def client(self) -> Client:
        return Client(socket=self.socket)


@dataclass
class Env:
    root: Path
    cluster: RayCluster
    fleet: Fleet
    nodes: dict[str, LocalNode]


def until(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
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
def env() -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="abxr"))  # short: Unix socket paths are limited
    (root / "run").mkdir()
    cluster = RayCluster(root, HEAD)
    nodes: dict[str, LocalNode] = {}
    try:
        cluster.start_head()
        for name, ip in IPS.items():
            cluster.start_node(name, ip)
        fleet = Fleet(cluster.address, node_ip=HEAD, placement_timeout=20)
        cluster.wait_alive(list(IPS))
        for name, ip in IPS.items():
            nodes[name] = LocalNode(root, name, ip, cluster.address).start()
        until("both nodes joined", lambda: {n.name for n in fleet.nodes() if n.alive} == set(IPS), 120)
        yield Env(root, cluster, fleet, nodes)
    finally:
        for node in nodes.values():
            node.proc.stop()
        ray.shutdown()
        cluster.close()
        sessions = cluster.sessions() | {s for n in nodes.values() for s in n.proc.sessions}
        left = sorted(set(session_members(sessions)) | set(naming(root)))
        for pid in left:  # reported below; not left running
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if os.environ.get("ARCBOX_TEST_KEEP"):
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left behind: {left}"


def cleanup(fleet: Fleet, prefix: str) -> None:
    for e in fleet.list(labels={"t": prefix}):
        if not e.lost:
            fleet.get(e.id).remove(force=True)


# -- membership and placement --------------------------------------------------------------


def test_nodes_register_their_capacity_as_ray_resources(env: Env) -> None:
    nodes = {n.name: n for n in env.fleet.nodes()}
    assert set(nodes) == {"n1", "n2"}
    for name, n in nodes.items():
        assert n.alive and n.ray_alive and n.daemon_up
        assert n.address == IPS[name]
        assert (n.capacity.max_sandboxes, n.capacity.max_memory_mib) == (MAX_SANDBOXES, MAX_MEMORY)
        assert (n.capacity.free_slots, n.capacity.free_memory_mib) == (MAX_SANDBOXES, MAX_MEMORY)
    until("Ray has both nodes' resources", lambda: (ray.cluster_resources().get(SLOTS),
                                                      ray.cluster_resources().get(MEMORY))
          == (2 * MAX_SANDBOXES, 2 * MAX_MEMORY), 10)


def test_creates_spread_over_nodes_and_requests_route_to_them(env: Env) -> None:
    fleet = env.fleet
    try:
        sbs = [fleet.create(network="none", labels={"t": "spread", "i": str(i)}, timeout=30) for i in range(4)]
        assert Counter(sb.node for sb in sbs) == {"n1": 2, "n2": 2}
        assert len({sb.id for sb in sbs}) == 4
        for sb in sbs:  # each node's daemon has exactly its own
            with env.nodes[sb.node].client() as c:
                assert sb.id in {s.id for s in c.list()}
            r = sb.run(["sh", "-c", "echo out-$0; echo err >&2; exit 3", sb.id], timeout=20)
            assert (r.stdout, r.stderr, r.exit_code) == (f"out-{sb.id}\n".encode(), b"err\n", 3)
            assert sb.info().state.value == "ready"
            path = str(env.root / f"{sb.id}.txt")
            assert sb.files.write(path, b"x" * 100_000) == 100_000
            assert sb.files.read(path) == b"x" * 100_000
            assert sb.files.stat(path).size == 100_000 and sb.files.exists(path)
        big = env.root / "big.bin"
        big.write_bytes(bytes(range(256)) * 40_000)  # 10 MiB: streamed in chunks
        assert sbs[0].files.write(str(env.root / "big-copy.bin"), big) == big.stat().st_size
        assert b"".join(sbs[0].files.read_stream(str(env.root / "big-copy.bin"))) == big.read_bytes()
        chunks = []
        r = sbs[1].run("for i in 1 2 3; do echo $i; done", on_stdout=chunks.append)
        assert r.ok and b"".join(chunks) == b"1\n2\n3\n"
        entries = {e.id: e for e in fleet.list(labels={"t": "spread"})}
        assert {i: e.node for i, e in entries.items()} == {sb.id: sb.node for sb in sbs}
        assert {e.state for e in entries.values()} == {"ready"}
        assert [e.id for e in fleet.list(labels={"t": "spread", "i": "2"})] == [sbs[2].id]
        assert fleet.get(sbs[3].id).node == sbs[3].node
        until("Ray sees the slots taken", lambda: ray.available_resources().get(SLOTS) == 2 * MAX_SANDBOXES - 4)
    finally:
        cleanup(fleet, "spread")
    assert fleet.list(labels={"t": "spread"}) == []
    with pytest.raises(SandboxNotFound):
        fleet.get(sbs[0].id)
    until("the slots are free again", lambda: ray.available_resources().get(SLOTS) == 2 * MAX_SANDBOXES)


@ray.remote(num_cpus=0)
def _use_in_task(sb: FleetSandbox, path: str) -> tuple[bytes, bytes, str]:
    out = sb.run(["sh", "-c", "echo from-task"]).stdout
    sb.files.write(path, b"written in a task")
    again = Fleet.current().get(sb.id)  # the fleet of the task's own Ray connection
    return out, again.files.read(path), again.node


def test_handles_work_inside_ray_tasks(env: Env) -> None:
    with env.fleet.create(network="none", labels={"t": "task"}, timeout=30) as sb:
        path = str(env.root / "task.txt")
        out, read, node = ray.get(_use_in_task.remote(sb, path), timeout=120)
        assert (out, read, node) == (b"from-task\n", b"written in a task", sb.node)
        assert Path(path).read_bytes() == b"written in a task"
    assert env.fleet.list(labels={"t": "task"}) == []


def test_interactive_and_background_commands(env: Env) -> None:
    with env.fleet.create(network="none", labels={"t": "exec"}, node="n2", timeout=30) as sb:
        assert sb.node == "n2"
        session = sb.exec(["sh", "-c", "cat; echo done >&2"])
        session.write(b"hello ")
        session.write("world")
        session.close_stdin()
        r = session.wait()
        assert (r.stdout, r.stderr, r.exit_code) == (b"hello world", b"done\n", 0)
        exec_id = sb.start(["sh", "-c", "echo bg; sleep 0.3; echo end"])
        assert sb.attach(exec_id).wait().stdout.endswith(b"end\n")
        assert any(e.exec_id == exec_id for e in sb.execs())


def test_no_room_anywhere_is_resource_exhausted_after_a_bounded_wait(env: Env) -> None:
    fleet = env.fleet
    try:
        held = [fleet.create(network="none", labels={"t": "full"}, node="n1", timeout=30, wait=False)
                for _ in range(MAX_SANDBOXES)]
        assert {sb.node for sb in held} == {"n1"}
        started = time.monotonic()
        with pytest.raises(ResourceExhausted, match="no node of the fleet has room"):
            fleet.create(network="none", labels={"t": "full"}, node="n1", placement_timeout=2)
        assert time.monotonic() - started < 15
        with pytest.raises(ResourceExhausted):  # more memory than any node has
            fleet.create(network="none", labels={"t": "full"}, memory_mib=MAX_MEMORY * 2, placement_timeout=2)
        other = fleet.create(network="none", labels={"t": "full"}, timeout=30)  # SPREAD finds n2
        assert other.node == "n2"
    finally:
        cleanup(fleet, "full")


# -- node failure -----------------------------------------------------------------------------


def _by_node(fleet: Fleet, label: str) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for e in fleet.list(labels={"t": label}):
        out.setdefault(e.node, set()).add((e.id, e.state))
    return out


def test_a_killed_daemon_makes_its_sandboxes_lost_until_it_is_back(env: Env) -> None:
    fleet, node = env.fleet, env.nodes["n1"]
    try:
        # one on each node, pinned: Ray's SPREAD is best effort (a loaded machine can put both
        # on one node); spreading has its own test above
        sbs = [fleet.create(network="none", labels={"t": "kill"}, node=name, timeout=30) for name in ("n1", "n2")]
        assert {sb.node for sb in sbs} == {"n1", "n2"}
        on_n1 = next(sb for sb in sbs if sb.node == "n1")
        node.proc.kill9()
        until("n1's sandbox is lost", lambda: _by_node(fleet, "kill").get("n1") == {(on_n1.id, "lost")}, 60)
        [lost] = fleet.list(state="lost")
        assert lost.id == on_n1.id and lost.node == "n1"
        assert lost.last_state == "ready" and lost.labels["t"] == "kill"
        assert {n.name: n.alive for n in fleet.nodes()} == {"n1": False, "n2": True}
        with pytest.raises(NodeUnavailable):
            on_n1.run("true")
        new = fleet.create(network="none", labels={"t": "kill"}, timeout=30)
        assert new.node == "n2"
        node.start()  # re-adopts its sandboxes; the node service sees the daemon again
        until("n1 is back", lambda: _by_node(fleet, "kill").get("n1") == {(on_n1.id, "ready")}, 120)
        assert on_n1.run(["echo", "back"]).stdout == b"back\n"
        until("n1 alive", lambda: {n.name: n.alive for n in fleet.nodes()} == {"n1": True, "n2": True})
    finally:
        cleanup(fleet, "kill")


def test_a_stopped_ray_node_makes_its_sandboxes_lost_until_it_rejoins(env: Env) -> None:
    fleet, cluster = env.fleet, env.cluster
    try:
        sbs = [fleet.create(network="none", labels={"t": "ray"}, node=name, timeout=30) for name in ("n1", "n2")]
        on_n2 = next(sb for sb in sbs if sb.node == "n2")
        cluster.stop_node("n2")
        until("n2's sandbox is lost", lambda: _by_node(fleet, "ray").get("n2") == {(on_n2.id, "lost")}, 60)
        assert {n.name: n.ray_alive for n in fleet.nodes()} == {"n1": True, "n2": False}
        with pytest.raises(NodeUnavailable):
            on_n2.files.read("/etc/hostname")
        new = fleet.create(network="none", labels={"t": "ray"}, timeout=30)
        assert new.node == "n1"
        cluster.start_node("n2", IPS["n2"])  # the daemon kept running; its member process rejoins
        until("n2 is back", lambda: _by_node(fleet, "ray").get("n2") == {(on_n2.id, "ready")}, 180, every=0.5)
        assert on_n2.run(["echo", "again"]).stdout == b"again\n"
    finally:
        cleanup(fleet, "ray")


# -- CLI ----------------------------------------------------------------------------------------


def _cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    cli_env = process_env(ARCBOX_VM_RAY_NODE_IP=HEAD)
    return subprocess.run([ARCBOX, *args], env=cli_env, capture_output=True, text=True, timeout=120, check=False)


def test_cli_cluster_nodes_ls_and_create_exec_rm(env: Env) -> None:
    addr = env.cluster.address
    nodes = _cli(env, "cluster", "nodes", "--address", addr, "--json")
    assert nodes.returncode == 0, nodes.stderr
    assert {n["name"]: n["alive"] for n in json.loads(nodes.stdout)} == {"n1": True, "n2": True}
    created = _cli(env, "create", "--cluster", addr, "--network", "none", "-l", "t=cli", "--node", "n1")
    assert created.returncode == 0, created.stderr
    sid = created.stdout.strip().splitlines()[-1]
    out = _cli(env, "exec", "--cluster", addr, sid, "--", "sh", "-c", "echo via-cli; exit 5")
    assert (out.returncode, out.stdout) == (5, "via-cli\n"), out.stderr
    ls = _cli(env, "cluster", "ls", "--address", addr, "-l", "t=cli")
    assert ls.returncode == 0 and sid in ls.stdout and "n1" in ls.stdout, ls.stdout + ls.stderr
    rm = _cli(env, "rm", "--cluster", addr, sid)
    assert rm.returncode == 0 and rm.stdout.strip() == sid, rm.stderr
    assert env.fleet.list(labels={"t": "cli"}) == []
