"""A daemon restart with the fake Firecracker/jailer: a new `FirecrackerDriver` takes back a
VM an earlier one launched (`adopt(AdoptSpec)`, by pid + start time) and cleans up exactly
what the first one made: no jail, no socket, no cgroup left. A recorded VMM that is gone
(or whose pid now belongs to another process) comes back exited, and its cleanup still
removes the jail."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from pathlib import Path

import pytest
from fake_firecracker import FAKE_FIRECRACKER, FAKE_JAILER

from arcbox_vm.ports import AdoptSpec, MachineSpec, VmmProcess
from arcbox_vm.vmm.cgroup import SandboxCgroups, find_cgroup2_mount
from arcbox_vm.vmm.firecracker import FirecrackerConfig, FirecrackerDriver, JailerConfig
from arcbox_vm.vmm.firecracker.layout import layout_for
from arcbox_vm.vmm.procfs import pid_alive, process_start_time

PARENT = "arcbox-vm-test-adopt"


@pytest.fixture
async def cgroup_parent():
    assert os.geteuid() == 0, "the suite runs as root; these tests create real cgroups"
    mount = find_cgroup2_mount()
    assert mount is not None, "no cgroup2 hierarchy in /proc/self/mountinfo: this machine must have one"
    parent = f"{PARENT}-{secrets.token_hex(3)}"
    yield parent
    cgroups = SandboxCgroups.open(parent, "fa01")
    for sandbox_id in cgroups.list():  # only when a test failed
        await cgroups.kill(sandbox_id)
    for p in (mount.path / parent / "fa01", mount.path / parent):
        if p.exists():
            p.rmdir()


def open_cgroups(parent: str) -> SandboxCgroups:
    """What each daemon start does: open the sandbox cgroup tree of its data dir."""
    cgs = SandboxCgroups.open(parent, "fa01")
    assert cgs.enabled
    return cgs


def config(short_dir: Path, mode: str) -> FirecrackerConfig:
    if mode == "direct":
        return FirecrackerConfig(binary=FAKE_FIRECRACKER, socket_timeout_secs=10)
    base = short_dir / "jail"
    base.mkdir(exist_ok=True)
    return FirecrackerConfig(binary=FAKE_FIRECRACKER, socket_timeout_secs=10, jailer=JailerConfig(
        binary=FAKE_JAILER, uid=os.getuid(), gid=os.getgid(), chroot_base_dir=base,
        new_pid_ns=mode == "jailer-new-pid-ns"))


def machine(files, sockdir: Path) -> MachineSpec:
    return MachineSpec(sandbox_id="sb-1", workdir=files.workdir, sockdir=sockdir, kernel=files.kernel,
                       rootfs=files.rootfs, boot_args="console=ttyS0 reboot=k panic=1 pci=off",
                       vcpus=1, memory_mib=256)


def sockets_under(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.exists() for p in d.rglob("*") if p.is_socket()]


async def launch(driver: FirecrackerDriver, files, sockdir: Path, agent_sink_factory):
    sockdir.mkdir(exist_ok=True)
    ep = driver.agent_endpoint(sockdir)
    await agent_sink_factory(ep.listen_path)  # what the manager binds before launch
    return await driver.launch(machine(files, sockdir), ep), ep.listen_path


@pytest.mark.parametrize("mode", ["jailer", "jailer-new-pid-ns", "direct"])
async def test_adopted_vm_is_killed_and_cleaned_up_after_a_daemon_restart(
        mode, cgroup_parent, fake_env, vm_files, short_dir, agent_sink_factory) -> None:
    cfg = config(short_dir, mode)
    sockdir = short_dir / "s"
    first = FirecrackerDriver(cfg, cgroups=open_cgroups(cgroup_parent))
    launched, listen_path = await launch(first, vm_files, sockdir, agent_sink_factory)
    pid, start_time = launched.pid, launched.start_time  # what the state database records
    assert start_time is not None and start_time == process_start_time(pid)
    layout = layout_for(cfg, sockdir, vm_files.workdir)
    cgroups = open_cgroups(cgroup_parent)
    assert cgroups.pids("sb-1") == [pid]
    await launched.api.aclose()  # the first daemon is gone: it cleans up nothing

    # the daemon restarts: a new driver (and cgroup tree) adopts the VM it recorded
    driver = FirecrackerDriver(cfg, cgroups=cgroups)
    adopted = await driver.adopt(AdoptSpec(sandbox_id="sb-1", workdir=vm_files.workdir, sockdir=sockdir,
                                           pid=pid, start_time=start_time))
    try:
        assert isinstance(adopted, VmmProcess)
        assert (adopted.pid, adopted.start_time, adopted.returncode) == (pid, start_time, None)
        assert not adopted.exited.done()
        assert (await adopted.api.get("/"))["state"] == "Running"  # its API socket outlived the daemon
    finally:
        await adopted.kill()
        await adopted.cleanup()
    assert adopted.returncode == -signal.SIGKILL
    assert adopted.exited.done()
    assert not pid_alive(pid)
    if layout.jail_dir is not None:
        assert not layout.jail_dir.exists() and not layout.jail_dir.parent.exists(), "no jail left"
    # the agent's listen socket is the manager's (it goes with the jail under the jailer)
    assert [p for p in sockets_under(short_dir) if p != listen_path] == [], "no socket of the driver's left"
    assert list(vm_files.workdir.iterdir()) == [], "no file of the driver's left"
    assert cgroups.list() == [] and not cgroups.root.exists(), "no cgroup left"


async def test_adopting_a_vm_that_is_gone_or_whose_pid_was_recycled(
        cgroup_parent, fake_env, vm_files, short_dir, agent_sink_factory) -> None:
    cfg = config(short_dir, "jailer")
    sockdir = short_dir / "s"
    first = FirecrackerDriver(cfg, cgroups=open_cgroups(cgroup_parent))
    launched, _ = await launch(first, vm_files, sockdir, agent_sink_factory)
    pid, start_time = launched.pid, launched.start_time
    layout = layout_for(cfg, sockdir, vm_files.workdir)
    await launched.request_stop()  # the guest shuts down while no daemon runs
    assert await asyncio.wait_for(launched.wait(), 5) == 0
    await launched.api.aclose()
    assert layout.jail_dir.is_dir(), "nobody cleaned up yet"

    bystander = await asyncio.create_subprocess_exec("sleep", "60")  # holds a pid that is not our VM
    try:
        driver = FirecrackerDriver(cfg, cgroups=open_cgroups(cgroup_parent))
        specs = {
            "gone": AdoptSpec("sb-1", vm_files.workdir, sockdir, pid=pid, start_time=start_time),
            "recycled": AdoptSpec("sb-1", vm_files.workdir, sockdir, pid=bystander.pid, start_time=start_time),
            "never recorded": AdoptSpec("sb-1", vm_files.workdir, sockdir, pid=None, start_time=None),
        }
        adopted = {what: await driver.adopt(spec) for what, spec in specs.items()}
        for what, proc in adopted.items():
            assert proc.returncode is not None, what
            assert proc.exited.done(), what
            assert await asyncio.wait_for(proc.wait(), 1) == proc.returncode
            assert proc.describe_exit().startswith("Firecracker (pid ")
            await proc.request_stop()  # nothing left to ask: no call is made
            await proc.kill()  # nothing to kill: no signal is sent
        assert adopted["gone"].returncode == 0, "not our child: its exit status comes from Firecracker's log"
        assert pid_alive(bystander.pid), "a recycled pid is never taken for the VM"
        await adopted["recycled"].cleanup()
        assert pid_alive(bystander.pid)
        assert not layout.jail_dir.exists() and not layout.jail_dir.parent.exists(), "the jail is removed"
        assert sockets_under(short_dir) == []
        assert open_cgroups(cgroup_parent).list() == []
        for proc in adopted.values():
            await proc.cleanup()  # idempotent: nothing left, no error
    finally:
        bystander.kill()
        await bystander.wait()
