"""`TrackedProcess` (vmm/process.py), the one process type of both VMM drivers: our own
child, or a pid we only watch (pid + start time, pidfd); and the QEMU driver on top of it:
adopt, request_stop, and VMMs that die with a one-shot parent."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from arcbox_vm.config.qemu import QemuConfig
from arcbox_vm.errors import VmmError
from arcbox_vm.ports import AdoptSpec, VmmProcess
from arcbox_vm.vmm.process import TrackedProcess, exit_status_text
from arcbox_vm.vmm.procfs import is_same_process, pid_alive, process_start_time
from arcbox_vm.vmm.qemu.driver import QemuDriver
from arcbox_vm.vmm.users import VmmUsers


def orphan_sleep() -> int:
    """A `sleep` that is not our child (its parent shell exits at once), like a VMM a
    previous daemon started or one the jailer handed over."""
    out = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                         check=True, start_new_session=True)
    return int(out.stdout)


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def orphan():
    pid = orphan_sleep()
    yield pid
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_procfs_start_time_identifies_a_process(orphan) -> None:
    start = process_start_time(orphan)
    assert start is not None and pid_alive(orphan)
    assert is_same_process(orphan, start)
    assert not is_same_process(orphan, start + 1)
    assert not is_same_process(None, start) and not is_same_process(orphan, None)


def test_exit_status_text() -> None:
    assert exit_status_text(None) == "is still running"
    assert exit_status_text(3) == "exited with code 3"
    assert exit_status_text(-9) == "was killed by SIGKILL"


async def test_spawned_child_logs_and_exits(tmp_path) -> None:
    log = tmp_path / "vmm.log"
    log.write_text("earlier run\n")
    proc = await TrackedProcess.spawn(["sh", "-c", "echo out; echo err >&2; exit 3"], log, name="QEMU")
    assert proc.is_child
    assert await asyncio.wait_for(proc.wait(), 5) == 3
    assert proc.exited.result() == 3 and proc.returncode == 3
    assert proc.describe_exit() == f"QEMU (pid {proc.pid}) exited with code 3"
    assert proc.log_tail() == "earlier run\nout\nerr"  # appended to

    again = await TrackedProcess.spawn(["sh", "-c", "echo fresh"], log, name="Firecracker", truncate=True)
    await asyncio.wait_for(again.wait(), 5)
    assert log.read_text() == "fresh\n"


async def test_spawned_child_runs_in_its_own_session_and_is_killed(tmp_path) -> None:
    proc = await TrackedProcess.spawn(["sleep", "60"], tmp_path / "log", name="QEMU")
    assert os.getsid(proc.pid) == proc.pid
    assert proc.start_time == process_start_time(proc.pid)
    assert await proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert "was killed by SIGKILL" in proc.describe_exit()


async def test_spawn_failure_is_a_vmm_error(tmp_path) -> None:
    with pytest.raises(VmmError, match="cannot start QEMU"):
        await TrackedProcess.spawn([str(tmp_path / "missing")], tmp_path / "log", name="QEMU")


async def test_watched_pid_is_killed_through_its_pidfd(orphan) -> None:
    proc = TrackedProcess.watch(orphan, name="Firecracker", log_path=None)  # a pid just handed over
    assert not proc.is_child and proc.start_time == process_start_time(orphan)
    assert proc.returncode is None and not proc.exited.done()
    assert await proc.kill()
    assert proc.returncode == -signal.SIGKILL and proc.exited.result() == -signal.SIGKILL
    assert not pid_alive(orphan)


async def test_watched_pid_exit_is_seen_at_once_with_the_status_it_reports(orphan) -> None:
    proc = TrackedProcess.watch(orphan, name="Firecracker", log_path=None, exit_status=lambda: 0)
    os.kill(orphan, signal.SIGTERM)  # it ends on its own (not through us)
    assert wait_until(lambda: not pid_alive(orphan), 5)
    assert proc.returncode == 0  # checked now, before the event loop ran
    assert await asyncio.wait_for(proc.wait(), 1) == 0


async def test_watched_pid_with_unknown_status(orphan) -> None:
    proc = TrackedProcess.watch(orphan, name="QEMU", log_path=None, start_time=process_start_time(orphan))
    os.kill(orphan, signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 5) == -1
    assert proc.describe_exit() == f"QEMU (pid {orphan}) exited"


async def test_a_recycled_pid_is_never_ours(orphan) -> None:
    wrong = process_start_time(orphan) + 1  # the recorded process started at another time
    proc = TrackedProcess.watch(orphan, name="QEMU", log_path=None, start_time=wrong)
    assert proc.returncode == -1 and proc.exited.done()
    assert await proc.kill()  # nothing to kill
    await asyncio.sleep(0.1)
    assert pid_alive(orphan), "a process that is not ours was signalled"
    gone = TrackedProcess.watch(None, name="QEMU", log_path=None, start_time=None)
    assert gone.returncode == -1 and gone.pid == 0


# ---------------------------------------------------------------- the QEMU driver


async def test_qemu_adopt_request_stop_kill_and_cleanup(orphan, tmp_path) -> None:
    driver = QemuDriver()
    (tmp_path / "vmm.log").write_text("qemu-system-x86_64: terminating on signal 9\n")
    spec = AdoptSpec("sb-1", tmp_path, tmp_path, pid=orphan, start_time=process_start_time(orphan))
    proc = await driver.adopt(spec)
    assert isinstance(proc, VmmProcess)
    assert (proc.pid, proc.returncode, proc.console_log) == (orphan, None, tmp_path / "console.log")
    await proc.request_stop()  # microvm has no keyboard controller: nothing happens
    await asyncio.sleep(0.1)
    assert proc.returncode is None and pid_alive(orphan)
    await proc.kill()
    await proc.cleanup()
    assert not pid_alive(orphan) and proc.returncode == -signal.SIGKILL
    assert proc.describe_exit().endswith("was killed by SIGKILL: qemu-system-x86_64: terminating on signal 9")

    gone = await driver.adopt(spec)  # the recorded QEMU is gone now
    assert gone.returncode is not None and gone.exited.done()
    await gone.cleanup()


PARENT = r"""
import asyncio, json, sys
from pathlib import Path

from arcbox_vm import composition
from arcbox_vm.config import VmmConfig
from arcbox_vm.ports import MachineSpec

args = json.loads(sys.argv[1])


async def main():
    config = VmmConfig(backend="qemu", data_dir=args["dir"],
                       qemu={"binary": args["qemu"], "accel": "tcg", "sandbox": args["sandbox"]})
    driver = composition.build_adapters(config, one_shot=True).select_driver()
    workdir = Path(args["dir"])
    spec = MachineSpec(sandbox_id="sb-1", workdir=workdir, kernel=workdir / "bzImage",
                       rootfs=workdir / "rootfs.ext4", boot_args="", vcpus=1, memory_mib=128)
    proc = await driver.launch(spec, driver.agent_endpoint(workdir))
    print(json.dumps({"driver": type(driver).__name__, "pid": proc.pid}), flush=True)
    await asyncio.sleep(3600)


asyncio.run(main())
"""


def status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@pytest.mark.parametrize("sandbox", [True, False], ids=["confined", "unconfined"])
def test_qemu_dies_with_a_one_shot_parent(tmp_path, sandbox) -> None:
    """`arcbox-vm run` under QEMU: SIGKILL the process that launched the VM, the VMM goes too
    — also when it was started unprivileged (die-with-parent is set after the uid change,
    which would clear it)."""
    base = tmp_path
    if sandbox:  # a confined "QEMU" must be able to execute the script and reach its socket
        base = Path(tempfile.mkdtemp(prefix="arcbox-t-", dir="/tmp"))
        base.chmod(0o755)
    fake_qemu = base / "qemu"
    # answers the seccomp check (`-device help`) like a QEMU with seccomp; else "runs the VM"
    fake_qemu.write_text('#!/bin/sh\ncase "$*" in *"-device help"*) exit 0;; esac\nexec sleep 600\n')
    fake_qemu.chmod(0o755)
    (base / "bzImage").write_bytes(b"kernel")
    (base / "rootfs.ext4").write_bytes(b"\0" * 4096)
    args = {"dir": str(base), "qemu": str(fake_qemu), "sandbox": sandbox}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, json.dumps(args)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    vm_pid = None
    try:
        line = parent.stdout.readline()
        assert line, f"the parent printed nothing: {parent.communicate(timeout=10)[1][-3000:]}"
        launched = json.loads(line)
        assert launched["driver"] == "QemuDriver"
        vm_pid = launched["pid"]
        assert pid_alive(vm_pid)
        status = status_fields(vm_pid)
        if sandbox:
            uid = int(status["Uid"].split()[0])
            assert uid >= QemuConfig().uids[0] and status["Uid"].split() == [str(uid)] * 4
            assert status["Gid"].split() == [str(uid)] * 4 and status["Groups"] == ""
            assert status["NoNewPrivs"] == "1" and status["CapEff"] == "0" * 16
            assert os.readlink(f"/proc/{vm_pid}/ns/net") != os.readlink("/proc/self/ns/net"), "a network of its own"
        else:
            assert status["Uid"].split()[0] == str(os.getuid())
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert wait_until(lambda: not pid_alive(vm_pid), 5), "the VMM outlived `arcbox-vm run`"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        parent.stderr.close()
        if vm_pid is not None and pid_alive(vm_pid):
            os.kill(vm_pid, signal.SIGKILL)
        if sandbox:
            VmmUsers(*QemuConfig().uids).release(base)  # the killed parent could not
            shutil.rmtree(base, ignore_errors=True)


def test_log_tails_never_follow_a_symlink_or_block_on_a_fifo(tmp_path) -> None:
    """A jailed VMM owns its jail: its log may have been replaced by a link to a host file,
    or by a FIFO; error messages must not show the one nor hang on the other."""
    from arcbox_vm.vmm.firecracker.process import exit_code_from_log
    from arcbox_vm.vmm.process import tail

    secret = tmp_path / "secret"
    secret.write_text("exit_code=3\nroot's secret\n")
    log = tmp_path / "firecracker.log"
    log.symlink_to(secret)
    assert tail(log) == "" and exit_code_from_log(log) is None
    log.unlink()
    os.mkfifo(log)
    assert tail(log) == "" and exit_code_from_log(log) is None
    log.unlink()
    log.write_text("a\nb\nexit_code=0\n")
    assert tail(log, lines=2) == "b\nexit_code=0" and exit_code_from_log(log) == 0


def run_confined(*args: str) -> subprocess.CompletedProcess:
    from arcbox_vm.vmm.process import CONFINED_EXEC

    return subprocess.run([sys.executable, "-I", "-S", str(CONFINED_EXEC), *args], capture_output=True, text=True,
                          timeout=30, check=False)


def test_confined_exec_drops_everything_then_execs_in_place() -> None:
    """The helper a confined VMM starts as (no Python runs in a forked copy of the daemon)."""
    from arcbox_vm.vmm.process import Confinement

    argv = Confinement(uid=5003, gid=5004, groups=(5005,)).argv(["/bin/cat", "/proc/self/status"])
    assert argv[:3] == [sys.executable, "-I", "-S"] and argv[-3:] == ["--", "/bin/cat", "/proc/self/status"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    status = dict(line.split(":", 1) for line in res.stdout.splitlines())
    assert status["Uid"].split() == ["5003"] * 4 and status["Gid"].split() == ["5004"] * 4
    assert status["Groups"].split() == ["5005"]
    assert status["CapEff"].strip() == status["CapPrm"].strip() == "0" * 16
    assert status["NoNewPrivs"].strip() == "1"
    net = subprocess.run(Confinement(uid=5003, gid=5003).argv(["/bin/cat", "/proc/self/net/dev"]),
                         capture_output=True, text=True, timeout=30, check=False)
    devices = [line.split(":")[0].strip() for line in net.stdout.splitlines()[2:]]
    assert devices == ["lo"], "a network namespace with nothing in it"


@pytest.mark.parametrize("args, why", [
    (["--uid", "0", "--gid", "5", "--", "/bin/true"], "refusing to run a confined VMM as root"),
    (["--uid", "5", "--gid", "5", "/bin/true"], "usage"),
    (["--uid", "5", "--gid", "5", "--bogus", "--", "/bin/true"], "unknown option"),
    (["--uid", "5", "--gid", "5", "--", "/no/such/vmm"], "No such file"),
])
def test_confined_exec_refuses_and_says_why(args, why) -> None:
    res = run_confined(*args)
    assert res.returncode == 126 and "cannot start the VMM confined" in res.stderr and why in res.stderr
