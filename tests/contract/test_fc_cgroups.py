"""The Firecracker driver puts each VMM in its sandbox's cgroup (fake firecracker/jailer,
real cgroup2 hierarchy): directly after spawn, or — under the jailer — by the jailer itself
(`--cgroup-version 2 --parent-cgroup`), unless the jailer config sets cgroups of its own."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
from fake_firecracker import FAKE_FIRECRACKER, FAKE_JAILER

from arcbox_vm.errors import FirecrackerApiError
from arcbox_vm.ports import MachineSpec
from arcbox_vm.vmm import cgroup as cg
from arcbox_vm.vmm.cgroup import SandboxCgroups, find_cgroup2_mount
from arcbox_vm.vmm.firecracker import FirecrackerConfig, FirecrackerDriver, JailerConfig
from arcbox_vm.vmm.procfs import pid_alive


@pytest.fixture
def cgroups():
    assert os.geteuid() == 0, "the suite runs as root; these tests create real cgroups"
    mount = find_cgroup2_mount()
    assert mount is not None, "no cgroup2 hierarchy in /proc/self/mountinfo: this machine must have one"
    parent = f"arcbox-vm-test-{secrets.token_hex(3)}"
    cgs = SandboxCgroups.open(parent, "fc01")
    assert cgs.enabled, f"cannot create cgroups under {mount.path}"
    yield cgs
    for p in (cgs.root, mount.path / parent):
        if p.exists():
            p.rmdir()


def cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


def spec(files) -> MachineSpec:
    return MachineSpec(sandbox_id="sb-1", workdir=files.workdir, kernel=files.kernel, rootfs=files.rootfs,
                       boot_args="console=ttyS0 reboot=k panic=1 pci=off", vcpus=1, memory_mib=256)


def jailed(base: Path, **jailer_kw) -> FirecrackerConfig:
    base.mkdir()
    return FirecrackerConfig(binary=FAKE_FIRECRACKER, socket_timeout_secs=10, jailer=JailerConfig(
        binary=FAKE_JAILER, uid=os.getuid(), gid=os.getgid(), chroot_base_dir=base, **jailer_kw))


@pytest.mark.parametrize("mode", ["direct", "jailer", "jailer-new-pid-ns"])
async def test_vmm_lands_in_the_sandbox_cgroup_and_cleanup_removes_it(
        mode, cgroups, fake_env, vm_files, short_dir, agent_sink_factory, monkeypatch) -> None:
    if mode == "direct":
        cfg = FirecrackerConfig(binary=FAKE_FIRECRACKER, socket_timeout_secs=10)
    else:
        cfg = jailed(short_dir / "jail", new_pid_ns=mode == "jailer-new-pid-ns")
        # prove the jailer joins by itself: our own write after spawn does nothing here
        monkeypatch.setattr(cg.SandboxCgroups, "place", lambda self, sid, pid: True)
    d = FirecrackerDriver(cfg, cgroups=cgroups)
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    proc = await d.launch(spec(vm_files), ep)
    try:
        assert cgroup_of(proc.pid) == "/" + cgroups.relative("sb-1")
        assert cgroups.pids("sb-1") == [proc.pid]
        if mode != "direct":
            jargv = fake_env.jailer_argv()
            i = jargv.index("--cgroup-version")
            assert jargv[i:i + 4] == ["--cgroup-version", "2", "--parent-cgroup", cgroups.relative("sb-1")]
    finally:
        await proc.kill()
        await proc.cleanup()
    assert not pid_alive(proc.pid)
    assert cgroups.list() == [] and not cgroups.root.exists()


async def test_a_failed_launch_leaves_no_cgroup(cgroups, fake_env, vm_files) -> None:
    fake_env.fail("PUT", "/machine-config", message="refused for the test", status=400)
    d = FirecrackerDriver(FirecrackerConfig(binary=FAKE_FIRECRACKER, socket_timeout_secs=10), cgroups=cgroups)
    placed: list[int] = []
    real_place = cg.SandboxCgroups.place

    def place(self, sid, pid):
        placed.append(pid)
        return real_place(self, sid, pid)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cg.SandboxCgroups, "place", place)
        with pytest.raises(FirecrackerApiError, match="refused for the test"):
            await d.launch(spec(vm_files), d.agent_endpoint(vm_files.workdir))
    assert placed, "the VMM was in its cgroup when the launch failed"
    assert not pid_alive(placed[0])
    assert cgroups.list() == [] and not cgroups.root.exists()


async def test_a_jailer_with_cgroups_of_its_own_is_left_alone(cgroups, fake_env, vm_files, short_dir,
                                                              agent_sink_factory) -> None:
    d = FirecrackerDriver(jailed(short_dir / "jail", cgroup_version="1"), cgroups=cgroups)
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    proc = await d.launch(spec(vm_files), ep)
    try:
        assert cgroups.list() == [], "the jailer's cgroups win: the sandbox cgroup is not used"
        assert fake_env.jailer_argv().count("--cgroup-version") == 1
    finally:
        await proc.kill()
        await proc.cleanup()
