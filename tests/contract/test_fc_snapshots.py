"""Firecracker snapshots against the fake firecracker/jailer: pause and resume (PATCH /vm),
save (PUT /snapshot/create), restore (PUT /snapshot/load with network and vsock
overrides) — every body validated against both vendored specs — and what a restore
stages into its jail and leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fake_firecracker import FAKE_FIRECRACKER, FAKE_JAILER
from fc_spec import validate_all

from arcbox_vm.errors import BootFailed
from arcbox_vm.ports import MachineSpec, SnapshotDriver, SnapshotProcess
from arcbox_vm.vmm.firecracker import FirecrackerConfig, FirecrackerDriver, JailerConfig
from arcbox_vm.vmm.firecracker import snapshots
from arcbox_vm.vmm.firecracker.layout import layout_for

BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"


def spec_for(files, workdir: Path, **kw) -> MachineSpec:
    args = dict(sandbox_id="sb-1", workdir=workdir, kernel=files.kernel, rootfs=files.rootfs, boot_args=BOOT_ARGS,
                vcpus=1, memory_mib=256)
    args.update(kw)
    return MachineSpec(**args)


def all_valid(reqs: list[dict]) -> None:
    for r in reqs:
        assert r["status"] == 204, r
        assert validate_all(r["method"], r["path"], r["body"]) == {}, r


def test_restore_requests_validate_against_both_specs(short_dir: Path) -> None:
    cfg = FirecrackerConfig(binary=FAKE_FIRECRACKER, jailer=JailerConfig(uid=1, gid=1, chroot_base_dir=short_dir))
    layout = layout_for(cfg, short_dir / "vm")
    reqs = snapshots.restore_requests(cfg, layout, tap_name="ab12-3", iface_id="eth0", vsock_uds=layout.vsock_uds)
    assert [str(r) for r in reqs] == ["PUT /logger", "PUT /metrics", "PUT /snapshot/load"]
    load = reqs[-1].body
    assert load == {"snapshot_path": "/snapshot.state",
                    "mem_backend": {"backend_type": "File", "backend_path": "/snapshot.mem"},
                    "resume_vm": True, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "ab12-3"}],
                    "vsock_override": {"uds_path": "/v.sock"}}
    for r in reqs:
        assert validate_all(r.method, r.path, r.body) == {}
    no_net = snapshots.restore_requests(cfg, layout, tap_name=None, iface_id="eth0", vsock_uds=layout.vsock_uds)
    assert "network_overrides" not in no_net[-1].body


async def test_direct_mode_pauses_and_saves_but_does_not_restore(fake_env, vm_files, agent_sink_factory) -> None:
    d = FirecrackerDriver(FirecrackerConfig(binary=FAKE_FIRECRACKER, socket_timeout_secs=10))
    assert isinstance(d, SnapshotDriver) and "jailer" in (d.snapshot_support() or "")
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    proc = await d.launch(spec_for(vm_files, vm_files.workdir), ep)
    dest = vm_files.workdir.parent / "saved"
    dest.mkdir()
    try:
        assert isinstance(proc, SnapshotProcess)
        await proc.pause()
        snap = await proc.save_state(dest)
        await proc.resume()
        assert snap.state == dest / "state" and snap.memory == dest / "mem" and snap.vmm == "firecracker"
        assert snap.state.read_bytes() == b"fake-vmstate" and snap.memory.exists()
        reqs = [r for r in fake_env.requests() if r["path"] in ("/vm", "/snapshot/create")]
        assert [(r["method"], r["path"], r["body"]) for r in reqs] == [
            ("PATCH", "/vm", {"state": "Paused"}),
            ("PUT", "/snapshot/create", {"snapshot_path": str(dest / "state"), "mem_file_path": str(dest / "mem"),
                                         "snapshot_type": "Full"}),
            ("PATCH", "/vm", {"state": "Resumed"}),
        ]
        all_valid(reqs)
        with pytest.raises(BootFailed, match="jailer"):
            await d.restore(spec_for(vm_files, vm_files.workdir), ep, snap)
    finally:
        await proc.kill()
        await proc.cleanup()


async def test_jailed_save_and_restore(fake_env, vm_files, short_dir, agent_sink_factory) -> None:
    base = short_dir / "jail"
    base.mkdir()
    cfg = FirecrackerConfig(binary=FAKE_FIRECRACKER, socket_timeout_secs=10,
                            jailer=JailerConfig(binary=FAKE_JAILER, uid=os.getuid(), gid=os.getgid(),
                                                chroot_base_dir=base))
    d = FirecrackerDriver(cfg)
    assert d.snapshot_support() is None
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    src = await d.launch(spec_for(vm_files, vm_files.workdir), ep)
    dest = short_dir / "saved"
    dest.mkdir()
    try:
        await src.pause()
        snap = await src.save_state(dest)
        await src.resume()
    finally:
        await src.kill()
        await src.cleanup()
    create = next(r for r in fake_env.requests() if r["path"] == "/snapshot/create")
    assert create["body"]["snapshot_path"] == "/snapshot.state" and create["body"]["mem_file_path"] == "/snapshot.mem"
    assert sorted(p.name for p in dest.iterdir()) == ["mem", "state"], "moved out of the jail"

    # the restore: its own workdir, jail, disk copy, TAP and vsock socket
    clone_dir = short_dir / "clone"
    clone_dir.mkdir()
    disk = short_dir / "clone-disk.ext4"
    disk.write_bytes(b"\1" * 4096)
    ep2 = d.agent_endpoint(clone_dir)
    await agent_sink_factory(ep2.listen_path)
    fake_env.record.unlink()
    clone = await d.restore(spec_for(vm_files, clone_dir, sandbox_id="sb-2", rootfs=disk, tap_name="tap-clone",
                                     guest_mac="06:00:0a:00:00:03"), ep2, snap)
    jail = layout_for(cfg, clone_dir).jail_root
    try:
        reqs = fake_env.requests()
        assert [f"{r['method']} {r['path']}" for r in reqs] == ["PUT /logger", "PUT /metrics", "PUT /snapshot/load"]
        all_valid(reqs)
        load = reqs[-1]["body"]
        assert load["network_overrides"] == [{"iface_id": "eth0", "host_dev_name": "tap-clone"}]
        assert load["vsock_override"] == {"uds_path": "/v.sock"} and load["resume_vm"] is True
        assert load["mem_backend"] == {"backend_type": "File", "backend_path": "/snapshot.mem"}
        # the checkpoint's memory is linked into the jail, not copied (restores share its pages)
        assert os.stat(jail / "snapshot.mem").st_ino == os.stat(snap.memory).st_ino
        assert (jail / "rootfs").read_bytes() == b"\1" * 4096, "its own disk as /rootfs"
        await clone.pause()
        await clone.resume()
    finally:
        await clone.kill()
        await clone.cleanup()
    assert not jail.parent.exists()
    assert snap.memory.exists() and snap.state.exists(), "the snapshot's own files stay"
