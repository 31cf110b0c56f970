"""An OCI archive → a bootable ext4 rootfs: unpack, add the agent and its runtime, pack.

    build_rootfs_from_oci(archive, out_image, disk_size) -> OciImageConfig
    rootfs_from_dir(tree, out_image, size) -> RootfsInfo
    prepare_tree(tree) -> RuntimeInfo           the agent, its runtime, mount points, /etc basics

The image may have no python3 and no shell: the agent runs on its private runtime
(images/runtime.py), started by the initramfs' /init. The image's run settings go into a
sidecar next to the ext4 (arcbox_vm.image_config), where the manager finds them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from arcbox_vm.agent.bundle import agent_files
from arcbox_vm.errors import ImageError
from arcbox_vm.image_config import OciImageConfig, sidecar_path, write_image_defaults
from arcbox_vm.images import guestpath, rootfs, runtime, tools
from arcbox_vm.images.oci import DEFAULT_MAX_BYTES, unpack_oci_archive

# Mount points the agent and /init use; made when the image lacks them (scratch images do).
MOUNT_POINTS: tuple[tuple[str, int], ...] = (("/dev", 0o755), ("/proc", 0o555), ("/sys", 0o555),
                                              ("/tmp", 0o1777), ("/run", 0o755), ("/etc", 0o755),
                                              ("/root", 0o700))
_MIB = 1 << 20


def _ensure_dir(tree: Path, guest: str, mode: int) -> None:
    """Make directory `guest` unless the image has something there (a directory, or a symlink
    the guest will follow)."""
    target = rootfs._guest_target(tree, guest)  # parents resolved inside the tree
    if target.is_symlink() or target.exists():
        return
    target.mkdir()
    os.chmod(target, mode)


def prepare_tree(tree: Path, hostname: str = rootfs.HOSTNAME) -> runtime.RuntimeInfo:
    """Make an unpacked image bootable by arcbox-vm: the agent, its runtime, mount points,
    hostname, hosts and an empty resolv.conf (the agent fills it). Users are the image's own."""
    for guest, mode in MOUNT_POINTS:
        _ensure_dir(tree, guest, mode)
    agent_paths = {}
    for guest, (data, mode) in agent_files().items():
        agent_paths[guest] = rootfs.write_file(tree, guest, data, mode)
    for host in agent_paths.values():  # a __pycache__ of the image's there is never written through
        cache = host.parent / "__pycache__"
        if cache.is_symlink() or (cache.exists() and not cache.is_dir()):
            cache.unlink()
        elif cache.is_dir():
            shutil.rmtree(cache)
    rootfs.write_file(tree, "/etc/hostname", f"{hostname}\n".encode())
    rootfs.write_file(tree, "/etc/hosts", (f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"
                                           "::1\tlocalhost ip6-localhost ip6-loopback\n").encode())
    if guestpath.resolve_file("/etc/resolv.conf", guestpath.tree_lookup(tree)) is None:
        rootfs.write_file(tree, "/etc/resolv.conf", b"")
    return runtime.install_runtime(tree, agent_paths)


def rootfs_from_dir(tree: Path, out_image: Path, size: int | None = None,
                    label: str = rootfs.LABEL) -> rootfs.RootfsInfo:
    """Pack `tree` into the ext4 image `out_image` with `mke2fs -d` (no mount, no loop device).

    `size` is the image's size in bytes (rounded up to MiB); None = the files plus 1 GiB free.
    A tree that does not fit is an ImageError saying how much it needs.
    """
    if size is None:
        s, free = rootfs.make_ext4(tree, out_image, rootfs.DEFAULT_FREE_SPACE, label)
        return rootfs.RootfsInfo(size=s, free=free)
    size = (size + _MIB - 1) // _MIB * _MIB
    used, inodes = rootfs.tree_usage(tree)
    need = used * 106 // 100 + 40 * _MIB  # a rough floor (journal, inode tables); mke2fs has the last word
    if size < need:
        raise ImageError(f"the image needs at least {need // _MIB} MiB; --disk-size is {size // _MIB} MiB")
    mke2fs = tools.require("mke2fs", "to build the ext4 root filesystem")
    out_image.unlink(missing_ok=True)
    res = subprocess.run([mke2fs, "-q", "-F", "-t", "ext4", "-m", "0", "-L", label, "-N", str(inodes * 2 + 4096),
                          "-d", str(tree), str(out_image), f"{size // 1024}k"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        out_image.unlink(missing_ok=True)
        msg = (res.stderr or res.stdout).strip()
        if "allocate" in msg or "space" in msg.lower():
            raise ImageError(f"the files ({used // _MIB} MiB) do not fit in {size // _MIB} MiB; "
                             f"give a larger --disk-size ({msg.splitlines()[-1] if msg else ''})")
        raise ImageError(f"mke2fs failed (exit {res.returncode}): {msg}")
    free, _total = rootfs.free_bytes(out_image)
    return rootfs.RootfsInfo(size=size, free=free)


def build_rootfs_from_oci(archive: Path, out_image: Path, disk_size: int | None = None,
                          max_bytes: int = DEFAULT_MAX_BYTES) -> OciImageConfig:
    """`archive` (docker save / OCI layout tarball) → the bootable ext4 `out_image` (`disk_size`
    bytes; None = files + 1 GiB) and its settings sidecar (`<out_image>.oci.json`).

    Works in a temporary directory beside `out_image` (same filesystem, removed whatever
    happens); the image appears under its name only when complete, replacing an older one.
    """
    if os.geteuid() != 0:
        raise ImageError("importing an image needs root (the files keep their owners)")
    archive, out_image = Path(archive), Path(out_image)
    out_image.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".oci-import-", dir=out_image.parent))
    try:
        os.chmod(work, 0o700)
        tree = work / "tree"
        config = unpack_oci_archive(archive, tree, max_bytes)
        prepare_tree(tree)
        part = work / "rootfs.ext4"
        rootfs_from_dir(tree, part, disk_size)
        shutil.rmtree(tree)
        os.chmod(part, 0o644)
        side = write_image_defaults(part, config)
        os.replace(part, out_image)
        os.replace(side, sidecar_path(out_image))
        return config
    finally:
        shutil.rmtree(work, ignore_errors=True)
