"""Boot and halt real VMs: graceful shutdown, PID-1 signal handling, boot failures."""

from __future__ import annotations

import asyncio
import os

import pytest

from arcbox_vm.agent.protocol import exec_request
from arcbox_vm.errors import BootFailed
from arcbox_vm.storage.disks import clone_disk
from arcbox_vm.manager.boot import boot_vm

from .vm_helpers import boot_request, make_driver

pytestmark = pytest.mark.vm


async def test_agent_shutdown_makes_the_vmm_exit_and_cleanup_is_complete(backend, guest_image, vm_data_dir):
    vm = await boot_vm(make_driver(backend), boot_request(backend, guest_image, vm_data_dir), clone_disk=clone_disk)
    assert vm.agent.hello["proto"] == 1
    pid = vm.process.pid
    try:
        assert await vm.shutdown(timeout=30), "the VMM should exit by itself after the agent's shutdown"
    finally:
        await vm.destroy()
    assert not vm.workdir.exists()
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


async def test_sigterm_to_pid1_powers_the_vm_off(backend, guest_image, vm_data_dir):
    vm = await boot_vm(make_driver(backend), boot_request(backend, guest_image, vm_data_dir), clone_disk=clone_disk)
    try:
        # the exec may or may not get to report its exit before the VM goes down
        session = await vm.agent.exec(exec_request(["kill", "-TERM", "1"]))
        with pytest.raises(Exception):
            await asyncio.wait_for(session.collect(), 5)
            await asyncio.sleep(60)  # only reached if the VM keeps running
            await vm.agent.ping()
        await asyncio.wait_for(vm.process.wait(), 30)
    finally:
        await vm.destroy()


async def test_missing_kernel_fails_clearly_and_leaves_nothing(backend, guest_image, vm_data_dir, tmp_path):
    req = boot_request(backend, guest_image, vm_data_dir)
    req.kernel = tmp_path / "no-such-vmlinux"
    with pytest.raises(BootFailed) as info:
        await boot_vm(make_driver(backend), req, clone_disk=clone_disk)
    assert "no-such-vmlinux" in str(info.value)
    assert not req.workdir.exists()


async def test_bad_init_fails_boot_fast_with_console_tail(backend, guest_image, vm_data_dir):
    req = boot_request(backend, guest_image, vm_data_dir, hello_timeout=90)
    req.boot_args = req.boot_args.replace("init=/sbin/vm-agent", "init=/sbin/does-not-exist")
    with pytest.raises(BootFailed):
        await boot_vm(make_driver(backend), req, clone_disk=clone_disk)
    assert not req.workdir.exists()
