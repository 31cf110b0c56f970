"""`arcbox-vm run` never leaves a VM behind when the CLI dies, under Firecracker too.

A parent process builds its adapters the way `arcbox-vm run` does
(`composition.build_adapters(config, one_shot=True)`), launches a VM with the fake
Firecracker and prints the VMM's pid; the test SIGKILLs the parent (no clean-up code of
ours can run) and the kernel must take the VMM with it (PR_SET_PDEATHSIG). A daemon's
driver (`one_shot=False`) is the control: its VMMs outlive it by design.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_firecracker import FAKE_FIRECRACKER

from arcbox_vm.vmm.procfs import pid_alive

PARENT = r"""
import asyncio, json, sys
from pathlib import Path

from arcbox_vm import composition
from arcbox_vm.config import VmmConfig
from arcbox_vm.ports import MachineSpec
from arcbox_vm.vmm.firecracker import probe

probe.firecracker_usable = lambda *a, **k: (True, "the fake Firecracker")  # no KVM needed
args = json.loads(sys.argv[1])


async def main():
    config = VmmConfig(backend="firecracker", data_dir=args["data_dir"],
                       firecracker={"binary": args["binary"], "socket_timeout_secs": 10})
    if args["one_shot"]:
        driver = composition.build_adapters(config, one_shot=True).select_driver()
    else:
        driver = composition.select_driver(config)
    workdir = Path(args["workdir"])
    spec = MachineSpec(sandbox_id="sb-1", workdir=workdir, kernel=Path(args["kernel"]),
                       rootfs=Path(args["rootfs"]), boot_args="console=ttyS0 reboot=k panic=1 pci=off",
                       vcpus=1, memory_mib=256)
    proc = await driver.launch(spec, driver.agent_endpoint(workdir))
    print(json.dumps({"driver": type(driver).__name__, "die_with_parent": driver.die_with_parent,
                      "pid": proc.pid}), flush=True)
    await asyncio.sleep(3600)


asyncio.run(main())
"""


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 2:].split()[1])


@pytest.mark.parametrize("one_shot", [True, False], ids=["run", "daemon-control"])
def test_vmm_dies_with_the_process_that_launched_it(one_shot, fake_env, vm_files, short_dir) -> None:
    fake_env.set("FAKE_FC_NO_GUEST", "1")  # nobody listens for the agent here
    args = {"one_shot": one_shot, "binary": str(FAKE_FIRECRACKER), "data_dir": str(short_dir / "data"),
            "workdir": str(vm_files.workdir), "kernel": str(vm_files.kernel), "rootfs": str(vm_files.rootfs)}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, json.dumps(args)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    vm_pid = None
    try:
        line = parent.stdout.readline()
        assert line, f"the parent printed nothing: {parent.communicate(timeout=10)[1][-3000:]}"
        launched = json.loads(line)
        vm_pid = launched["pid"]
        assert launched["driver"] == "FirecrackerDriver"
        assert launched["die_with_parent"] is one_shot
        assert pid_alive(vm_pid) and ppid(vm_pid) == parent.pid, "the VMM runs, as the parent's child"

        parent.send_signal(signal.SIGKILL)  # the CLI dies: no clean-up of ours runs
        parent.wait(10)
        if one_shot:
            assert wait_until(lambda: not pid_alive(vm_pid), 5), "the VMM outlived `arcbox-vm run`"
        else:
            time.sleep(0.5)
            assert pid_alive(vm_pid), "a daemon's VMM outlives the daemon"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        parent.stderr.close()
        if vm_pid is not None and pid_alive(vm_pid):
            os.kill(vm_pid, signal.SIGKILL)
            wait_until(lambda: not pid_alive(vm_pid), 5)
