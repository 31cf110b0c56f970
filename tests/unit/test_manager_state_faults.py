"""The manager when its data dir fills up or turns read-only: a clear error, nothing half-made.

Uses a small tmpfs as the data dir (root, as the rest of the suite), no VM boots: the
failure happens when the new sandbox is recorded, before any resource is made.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from arcbox_vm import DefaultVmConfig, FirecrackerConfig, SandboxManager, SandboxNetworkSpec, SandboxSpec, VmmConfig
from arcbox_vm.storage.state import StateCorrupt, StateError


@pytest.fixture
def small_data_dir(tmp_path):
    assert os.geteuid() == 0, "the suite runs as root (VMs, TAPs); this test mounts a tmpfs"
    d = tmp_path / "data"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], check=True)
    yield d
    subprocess.run(["umount", "-l", str(d)], check=True)


def manager(data_dir) -> SandboxManager:
    return SandboxManager(VmmConfig(backend="qemu", firecracker=FirecrackerConfig(data_dir=str(data_dir)),
                                    defaults=DefaultVmConfig(kernel="/nonexistent/k", rootfs="/nonexistent/r"),
                                    limits={"max_sandboxes": 1000}))


async def test_full_data_dir_refuses_create_cleanly(small_data_dir):
    mgr = manager(small_data_dir)
    await mgr.start()
    try:
        filler = small_data_dir / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
            except OSError:
                pass
        with pytest.raises(StateError) as info:
            for i in range(200):  # until the database has no page left to grow into
                await mgr.create_sandbox(SandboxSpec(id=f"sb-{i}", network=SandboxNetworkSpec(mode="none"),
                                                     labels={"pad1": "x" * 1000, "pad2": "x" * 1000}))
        assert "full" in str(info.value) and "nothing was changed" in str(info.value)
        failed_id = f"sb-{len(mgr.list_sandboxes())}"
        assert failed_id not in {s.id for s in mgr.list_sandboxes()}
        assert not (small_data_dir / "sandboxes" / failed_id).exists()
    finally:
        for s in mgr.list_sandboxes():
            await mgr.remove_sandbox(s.id, force=True)
        await mgr.close()


async def test_read_only_data_dir_is_a_clear_error_not_corruption(small_data_dir):
    mgr = manager(small_data_dir)
    await mgr.start()
    await mgr.close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_data_dir)], check=True)
    try:
        again = manager(small_data_dir)
        with pytest.raises(StateError) as info:
            await again.start()
        assert not isinstance(info.value, StateCorrupt)
        assert "writable" in str(info.value)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_data_dir)], check=True)


async def test_corrupt_database_refuses_to_start(tmp_path):
    (tmp_path / "state.db").write_bytes(b"not sqlite" * 1000)
    mgr = manager(tmp_path)
    with pytest.raises(StateCorrupt) as info:
        await mgr.start()
    assert f"mv {tmp_path / 'state.db'}" in str(info.value)
    assert (tmp_path / "state.db").read_bytes().startswith(b"not sqlite"), "never silently replaced"
