"""Every VMM in its own cgroup `<cgroup2 mount>/<daemon.cgroup_parent>/<tag>/<sandbox id>`,
outside the daemon's: it survives the daemon (and its service's cgroup), is removed with
the sandbox, and start-up kills and removes the cgroups no live sandbox owns.

Real VMs (QEMU here); the cgroup2 hierarchy of this machine (pure v2 or hybrid).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from arcbox_vm import SandboxManager, SandboxNetworkSpec, SandboxSpec
from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.paths import manager_tag
from arcbox_vm.vmm.cgroup import SandboxCgroups, find_cgroup2_mount

from .daemon_helpers import Daemon, processes_mentioning, wait_state, write_config
from .manager_helpers import fresh_netns_name, make_config, netns_list, wait_for_event

pytestmark = pytest.mark.vm


def cgroups_root(data_dir: Path, parent: str = "arcbox-vm") -> Path:
    assert os.geteuid() == 0, "the suite runs as root (VMs, TAPs, cgroups)"
    mount = find_cgroup2_mount()
    assert mount is not None, "no cgroup2 hierarchy in /proc/self/mountinfo: this machine must have one"
    cgs = SandboxCgroups.open(parent, manager_tag(data_dir))
    assert cgs.enabled and cgs.root is not None, f"cannot create cgroups under {mount.path}"
    return cgs.root


def cgroup_of(pid: int) -> Path:
    """The cgroup2 directory of `pid` (its `0::` line, under the mount)."""
    mount = find_cgroup2_mount()
    assert mount is not None
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return mount.path / line[3:].lstrip("/")
    raise AssertionError(f"no cgroup2 line for pid {pid}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def plant(cgroup: Path) -> subprocess.Popen:
    """A `sleep` moved into `cgroup` (made if missing): a process some sandbox left behind."""
    cgroup.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    (cgroup / "cgroup.procs").write_text(str(proc.pid))
    assert cgroup_of(proc.pid) == cgroup
    return proc


async def test_vmm_runs_in_the_sandbox_cgroup_and_remove_removes_it(backend, guest_image, tmp_path):
    root = cgroups_root(tmp_path)
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path))
    try:
        events = mgr.subscribe_events()
        sid, _ = await mgr.create_sandbox(SandboxSpec(network=SandboxNetworkSpec(mode="none")))
        assert await wait_for_event(events, sid, "ready")
        pid = mgr.inspect_sandbox(sid).pid
        assert pid and cgroup_of(pid) == root / sid, "the VMM is in its sandbox's cgroup, not the daemon's"
        assert cgroup_of(os.getpid()) != root / sid
        assert pid in [int(p) for p in (root / sid / "cgroup.procs").read_text().split()]
        await mgr.remove_sandbox(sid, True)
        assert not alive(pid)
        assert not (root / sid).exists(), "removing the sandbox removes its cgroup"
        assert not root.exists(), "and our (now empty) root"
    finally:
        await mgr.close()


def test_daemon_restart_keeps_adopted_vm_cgroup_and_removes_the_rest(guest_image, tmp_path):
    data_dir = tmp_path / "data"
    root = cgroups_root(data_dir)
    socket = tmp_path / "d.sock"
    netns = fresh_netns_name()
    cfg = write_config(tmp_path / "c.toml", guest_image, data_dir, socket, netns=netns)
    daemon = Daemon(cfg, socket, tmp_path / "daemon.log").start()
    planted: list[subprocess.Popen] = []
    try:
        stub = daemon.stub()
        for sid in ("cg-keep", "cg-lost"):
            stub.Create(pb.CreateSandboxRequest(id=sid, network=pb.NetworkSpec(mode="none")))
        vmm: dict[str, int] = {}
        for sid in ("cg-keep", "cg-lost"):
            wait_state(stub, sid, ("ready",))
            (vmm[sid],) = processes_mentioning(data_dir / "sandboxes" / sid)
            assert cgroup_of(vmm[sid]) == root / sid
            assert cgroup_of(daemon.pid) != root / sid

        daemon.kill9()
        assert all(alive(p) for p in vmm.values()), "the VMs outlive the daemon"
        assert cgroup_of(vmm["cg-keep"]) == root / "cg-keep"
        # while it is down: one VM dies but leaves a process in its cgroup; a cgroup no
        # sandbox owns appears
        lost_leftover = plant(root / "cg-lost")
        os.kill(vmm["cg-lost"], signal.SIGKILL)
        orphan = plant(root / "orphan-1")
        planted += [lost_leftover, orphan]

        daemon.start()
        stub = daemon.stub()
        wait_state(stub, "cg-keep", ("ready",), timeout=60)
        assert stub.Inspect(pb.InspectSandboxRequest(id="cg-lost")).state == "failed"
        assert alive(vmm["cg-keep"]) and cgroup_of(vmm["cg-keep"]) == root / "cg-keep", \
            "the re-adopted VM keeps its cgroup"
        for proc in (lost_leftover, orphan):
            assert proc.wait(10) == -signal.SIGKILL, "what was left in those cgroups is killed"
        assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["cg-keep"], \
            "the FAILED sandbox's and the orphan cgroup are removed at start-up"
        assert "orphan-1" in daemon.log.read_text()

        stub.Remove(pb.RemoveSandboxRequest(id="cg-keep", force=True))
        stub.Remove(pb.RemoveSandboxRequest(id="cg-lost", force=True))
        deadline = time.monotonic() + 10
        while alive(vmm["cg-keep"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(vmm["cg-keep"])
        assert not (root / "cg-keep").exists(), "removing an adopted sandbox removes its cgroup"
        assert daemon.stop() == 0
    finally:
        for proc in planted:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
        if root.exists():  # a failure above: leave no VM or cgroup behind for the next tests
            cgs = SandboxCgroups.open("arcbox-vm", manager_tag(data_dir))
            for sid in cgs.list():
                await_kill(cgs, sid)
        if netns in netns_list():
            subprocess.run(["ip", "netns", "del", netns], check=False)


def await_kill(cgs: SandboxCgroups, sid: str) -> None:
    asyncio.run(cgs.kill(sid))
