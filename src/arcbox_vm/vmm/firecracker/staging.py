"""The files one Firecracker VM needs, and removing them again.

Under the jailer, kernel/initrd/rootfs are staged into the jail by hard link (a copy
across filesystems, or for a read-only file the jailed user could not read); the log and
metrics files are created for Firecracker to write to. `clear_jail` empties a jail left by
a crashed run (stale device nodes and pid file make the jailer fail); `discard` removes
everything the driver made for one VM: sockets, log/metrics/console files, the jail and
the cgroups the jailer created for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from arcbox_vm.config.firecracker import FirecrackerConfig
from arcbox_vm.vmm.cgroup import find_cgroup1_mount, find_cgroup2_mount
from arcbox_vm.vmm.procfs import MOUNTINFO

from .layout import Layout, exec_file_name


def unlink_quiet(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def stage_file(src: Path, dst: Path, *, uid: int, gid: int, writable: bool) -> str:
    """Make `src` available at `dst` inside a jail; returns "link" or "copy".

    Hard link when possible (same filesystem), else copy. A writable file (the VM's own
    rootfs) is chowned to the jailed uid:gid. A read-only file that the jailed user could
    not read through a link (not world-readable) is copied and the copy chowned instead, so
    shared image files never change owner.
    """
    unlink_quiet(dst)
    mode = os.stat(src).st_mode
    readable_by_all = bool(mode & 0o004)
    how = "copy"
    if writable or readable_by_all:
        try:
            os.link(src, dst)
            how = "link"
        except OSError:
            how = "copy"
    if how == "copy":
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o600 if writable else 0o400)
    if writable or how == "copy":
        os.chown(dst, uid, gid)
    if writable:
        os.chmod(dst, 0o600)  # the VM's own disk: its uid's alone
    return how


def create_empty_file(path: Path, uid: int | None = None, gid: int | None = None) -> None:
    """Create (or truncate) a file Firecracker will write to (log, metrics)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    os.close(fd)
    if uid is not None and gid is not None:
        os.chown(path, uid, gid)


def clear_jail(root: Path, keep_name: str | None) -> None:
    """Empty a jail root except `keep_name` (stale files would break the jailer: mknod, pid file)."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name == keep_name:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            unlink_quiet(entry)


def discard(layout: Layout, config: FirecrackerConfig, keep: Path | None = None) -> None:
    """Delete what the driver made for one VM. `keep` (the agent listen socket, bound by
    the caller inside the jail) survives a failed launch; then the jail is only emptied."""
    unlink_quiet(layout.console_log)
    if layout.jail_root is None:
        for path in (layout.api_socket, layout.vsock_uds, layout.log, layout.metrics):
            unlink_quiet(path)
        return
    jail_dir = layout.jail_dir
    assert jail_dir is not None
    if keep is not None and keep.parent == layout.jail_root and keep.exists():
        clear_jail(layout.jail_root, keep_name=keep.name)
    else:
        shutil.rmtree(jail_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            jail_dir.parent.rmdir()  # <base>/<exec name>, if no other jail is left
    assert layout.jail_id is not None
    for cg in cgroup_dirs(config, layout.jail_id):
        with contextlib.suppress(OSError):
            cg.rmdir()


def cgroup_dirs(config: FirecrackerConfig, jid: str, mountinfo: Path = MOUNTINFO) -> list[Path]:
    """The per-VM cgroup directories the jailer creates when `firecracker.jailer` gives
    `--cgroup` values: `<mount>/<parent cgroup>/<jail id>`, on the cgroup2 mount (v2) or
    on the mount of each v1 controller named (`cpu.shares=..` -> the "cpu" hierarchy)."""
    jailer = config.jailer
    if jailer is None or not jailer.cgroups:
        return []
    parent = jailer.parent_cgroup or exec_file_name(config.binary)
    if (jailer.cgroup_version or "1") == "2":
        mount = find_cgroup2_mount(mountinfo)
        return [mount.path / parent / jid] if mount is not None else []
    dirs: list[Path] = []
    for value in jailer.cgroups:
        controller = value.partition("=")[0].partition(".")[0]
        path = find_cgroup1_mount(controller, mountinfo)
        if path is not None and path / parent / jid not in dirs:
            dirs.append(path / parent / jid)
    return dirs
