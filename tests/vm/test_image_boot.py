"""The built image boots under QEMU: kernel -> initramfs /init -> switch_root -> the `init=` program.

Builds the image with `build_image` (or reuses the cached one); never skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arcbox_vm.images import GuestImage, build_image
from arcbox_vm.images.inject import write_files
from arcbox_vm.paths import data_dir

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 90.0
TSC_ARGS = "tsc_early_khz=2000000 tsc=reliable"  # TCG cannot calibrate the TSC without these

TEST_INIT = b"""#!/bin/sh
/bin/mount -t proc proc /proc
echo "ARCBOX_ROOT $(/bin/grep ' / ' /proc/mounts)"
echo "ARCBOX_PY $(/usr/bin/python3 -S -c 'import sys; print(sys.version_info[0])')"
[ -x /sbin/vm-agent ] && echo "ARCBOX_AGENT present"
echo "ARCBOX_USER $(/usr/bin/id -u sandbox):$(/usr/bin/id -g sandbox)"
echo "ARCBOX_BOOT_OK $(/bin/uname -r)"
/bin/sync
echo b > /proc/sysrq-trigger
"""


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_image(data_dir(), progress=lambda msg: print(f"[image] {msg}", file=sys.stderr))


def qemu() -> str:
    path = shutil.which("qemu-system-x86_64")
    assert path, "qemu-system-x86_64 is not installed (apt-get install -y qemu-system-x86)"
    return path


def boot(kernel: Path, initrd: Path, rootfs: Path, append: str, log: Path, readonly: bool = False,
         marker: str = "") -> tuple[int, str, float | None]:
    """Boot to guest reboot; returns (QEMU exit code, serial log, seconds until `marker` appeared)."""
    drive = f"id=root,file={rootfs},format=raw,if=none" + (",readonly=on" if readonly else "")
    cmd = [qemu(), "-machine", "microvm", "-accel", "tcg", "-m", "256", "-smp", "1", "-nodefaults",
           "-no-user-config", "-display", "none", "-no-reboot", "-serial", f"file:{log}",
           "-kernel", str(kernel), "-initrd", str(initrd),
           "-append", f"console=ttyS0 reboot=t panic=-1 {TSC_ARGS} {append}",
           "-drive", drive, "-device", "virtio-blk-device,drive=root"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: float | None = None
    while proc.poll() is None and time.monotonic() - start < BOOT_TIMEOUT:
        if marker and seen is None and log.exists() and marker in log.read_text(errors="replace"):
            seen = time.monotonic() - start
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        text = log.read_text(errors="replace") if log.exists() else ""
        pytest.fail(f"QEMU did not exit within {BOOT_TIMEOUT:.0f} s; serial log tail:\n{text[-3000:]}")
    text = log.read_text(errors="replace")
    if marker and seen is None and marker in text:
        seen = time.monotonic() - start
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    assert proc.returncode == 0, f"QEMU failed ({proc.returncode}): {out}\n{text[-3000:]}"
    return proc.returncode, text, seen


def test_boots_and_switches_root_to_init(image: GuestImage, tmp_path: Path) -> None:
    disk = tmp_path / "rootfs.ext4"
    subprocess.run(["cp", "--sparse=always", str(image.rootfs), str(disk)], check=True)
    write_files(disk, {"/sbin/test-init": (TEST_INIT, 0o755)})

    marker = f"ARCBOX_BOOT_OK {image.kernel_release}"
    _, log, seconds = boot(image.kernel, image.initrd, disk, "init=/sbin/test-init", tmp_path / "serial.log",
                           marker=marker)
    assert marker in log, log[-3000:]
    print(f"\nmarker after {seconds:.1f} s", file=sys.stderr)
    assert "arcbox-init: root /dev/vda (rw), starting /sbin/test-init" in log
    assert "ARCBOX_ROOT /dev/vda / ext4 rw" in log  # rw unless `ro` is on the command line
    assert "ARCBOX_PY 3" in log
    assert "ARCBOX_AGENT present" in log
    assert "ARCBOX_USER 1000:1000" in log


def test_vmlinux_boots_and_init_failure_exits_the_vm(image: GuestImage, tmp_path: Path) -> None:
    """The uncompressed vmlinux (Firecracker's kernel) boots too (QEMU loads it via PVH); a missing
    init= program is reported on the console and the VM exits instead of hanging. Read-only disk."""
    _, log, _ = boot(image.vmlinux, image.initrd, image.rootfs, "ro init=/no/such/init",
                     tmp_path / "serial.log", readonly=True)
    assert f"Linux version {image.kernel_release}" in log, log[-3000:]
    assert "arcbox-init: init program /no/such/init not found on root device /dev/vda" in log, log[-3000:]
    assert "arcbox-init: rebooting so that the VMM exits" in log
