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
