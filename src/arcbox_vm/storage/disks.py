"""Per-sandbox writable disks: a base image is never written by a VM.

Each VM gets its own copy of the rootfs: a reflink where the filesystem supports it
(instant, shared blocks), else a sparse copy (only allocated blocks are copied).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from arcbox_vm.errors import ArcboxError


async def clone_disk(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` (reflink if possible, sparse otherwise). `dst` must not exist."""
    if not src.is_file():
        raise ArcboxError(f"disk image {src} does not exist")
    if dst.exists():
        raise ArcboxError(f"refusing to overwrite {dst}")
    tmp = dst.with_name(dst.name + ".part")
    proc = await asyncio.create_subprocess_exec(
        "cp", "--reflink=auto", "--sparse=always", "--", str(src), str(tmp),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ArcboxError(f"copying {src} to {dst} failed: {err.decode(errors='replace').strip()}")
    tmp.rename(dst)


async def grow_disk(path: Path, size_mib: int) -> None:
    """Grow the ext4 image `path` (not in use) to `size_mib` MiB: the file, then its file
    system (e2fsck first: resize2fs insists on a freshly checked one). A template asks
    for more room than the base image has (`template build --disk-size`)."""
    size = size_mib << 20
    if path.stat().st_size > size:
        raise ArcboxError(f"the disk image is {path.stat().st_size >> 20} MiB; it can grow, not shrink, "
                          f"to {size_mib} MiB")
    if path.stat().st_size == size:
        return
    with open(path, "r+b") as f:
        f.truncate(size)
    for argv in (["e2fsck", "-f", "-y", "-q", str(path)], ["resize2fs", "-f", str(path)]):
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        ok = proc.returncode in (0, 1) if argv[0] == "e2fsck" else proc.returncode == 0  # e2fsck 1: fixed
        if not ok:
            raise ArcboxError(f"{argv[0]} on {path.name} failed ({proc.returncode}): "
                              f"{out.decode(errors='replace').strip()[-400:]}")
