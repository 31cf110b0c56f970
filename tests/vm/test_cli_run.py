"""`arcbox-vm run`, the main job, as a user runs it: a real process booting a real VM."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

CLI = [str(Path(sys.executable).with_name("arcbox-vm"))]


def arcbox(*args: str, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def test_run_prints_the_guest_kernel_release(guest_image):
    proc = arcbox("run", "--vmm", "qemu", "--", "uname", "-r")
    assert proc.returncode == 0, proc.stderr.decode()
    release = proc.stdout.decode().strip()
    assert release == guest_image.kernel_release
    assert release != platform.release()


def test_run_exits_with_the_commands_code_and_keeps_streams_apart(guest_image):
    proc = arcbox("run", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert proc.returncode == 7
    assert proc.stdout == b"out\n"
    assert proc.stderr == b"err\n"


def test_run_options_and_error_codes(guest_image):
    proc = arcbox("run", "-e", "A=1", "-w", "/tmp", "--user", "sandbox", "--memory", "192", "--vcpus", "2",
                  "--", "sh", "-c", 'echo "$A $(pwd) $(id -un) $(nproc)"')
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["1", "/tmp", "sandbox", "2"]


def test_run_missing_command_exits_127_and_leaves_no_vm(guest_image, vm_data_dir):
    runs = vm_data_dir / "runs"
    proc = arcbox("run", "--", "no-such-command-xyz")
    assert proc.returncode == 127
    assert b"no-such-command-xyz" in proc.stderr
    assert not runs.exists() or os.listdir(runs) == []


def test_run_timeout_exits_124(guest_image):
    proc = arcbox("run", "--timeout", "2", "--", "sleep", "1000")
    assert proc.returncode == 124
    assert b"timed out" in proc.stderr


def test_run_uses_the_config_file(guest_image, tmp_path):
    """`run --config` takes the daemon's defaults (here: memory and a user boot argument)."""
    cfg = tmp_path / "arcbox.toml"
    cfg.write_text('backend = "qemu"\n[defaults]\nmemory_mib = 320\n'
                   'boot_args = "console=ttyS0 reboot=k panic=1 pci=off init=/sbin/vm-agent arcbox_test_marker=1"\n')
    proc = arcbox("run", "--config", str(cfg), "--", "sh", "-c",
                  "grep MemTotal /proc/meminfo; tr ' ' '\\n' < /proc/cmdline | grep arcbox_test_marker")
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    total_kib = int(lines[0].split()[1])
    assert 250 * 1024 < total_kib <= 320 * 1024, lines[0]
    assert lines[1] == "arcbox_test_marker=1"
