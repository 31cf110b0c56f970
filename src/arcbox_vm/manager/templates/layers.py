"""The layer cache of template builds: one root disk image per Dockerfile step, by content.

A layer is the build sandbox's whole root disk after a RUN or COPY step — a sparse copy
(a reflink where the file system has them), not a diff: booting a layer needs no
assembly, and a rebuild starts from the newest layer whose key it still has. The key of
a step is the sha256 of its parent's key, its resolved instruction text, the ARG values
it sees (RUN) and the digest of what it copies (COPY), so a changed step changes every
key after it — Docker's rule — and an unchanged Dockerfile finds every key again.

Files live in `<data dir>/templates/layers/<key>.ext4`, written under a temporary name
and renamed; the row is written last, so a crash leaves at most an unrecorded file that
the next start removes. `prune` removes layers no template is built on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from arcbox_vm.errors import ArcboxError
from arcbox_vm.manager.context import ManagerContext

log = logging.getLogger(__name__)

DIR = "templates"
LAYERS = "layers"


def step_key(parent: str, text: str, args: dict[str, str] | None = None, content: str = "") -> str:
    """The cache key of a step (see the module docstring)."""
    body = json.dumps([parent, text, sorted((args or {}).items()), content], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def root(ctx: ManagerContext) -> Path:
    return ctx.data_dir / DIR


def layer_dir(ctx: ManagerContext) -> Path:
    d = root(ctx) / LAYERS
    if not d.is_dir():
        d.mkdir(parents=True, exist_ok=True)
        root(ctx).chmod(0o700)  # disks: nobody else's to read
    return d


def path_of(ctx: ManagerContext, key: str) -> Path:
    return layer_dir(ctx) / f"{key}.ext4"


def find(ctx: ManagerContext, key: str) -> Path | None:
    """The layer's disk if it is recorded and its file is there."""
    row = ctx.store.layer(key)
    if row is None:
        return None
    p = Path(row["path"])
    return p if p.is_file() else None


async def add(ctx: ManagerContext, key: str, parent: str, step: str, disk: Path) -> Path:
    """Keep a copy of `disk` (not being written: the VM is paused or stopped) as layer `key`."""
    dest = path_of(ctx, key)
    dest.unlink(missing_ok=True)  # an unrecorded leftover of the same key
    await ctx.adapters.clone_disk(disk, dest)
    now = time.time()
    try:
        ctx.store.put_layer({"key": key, "parent": parent, "step": step, "path": str(dest),
                             "size_bytes": dest.stat().st_blocks * 512, "created_at": now, "used_at": now})
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def touch(ctx: ManagerContext, key: str) -> None:
    with contextlib.suppress(ArcboxError):
        ctx.store.touch_layer(key)


def prune(ctx: ManagerContext, keep: set[str]) -> tuple[int, int]:
    """Remove every layer not in `keep` (the layers templates are built on); returns
    (layers removed, bytes freed). Sandboxes never boot from a layer directly (they
    restore a template's checkpoint, which has a disk of its own), so this is always safe."""
    removed = freed = 0
    for row in ctx.store.layers():
        if row["key"] in keep:
            continue
        ctx.store.delete_layer(row["key"])
        with contextlib.suppress(FileNotFoundError):
            p = Path(row["path"])
            freed += p.stat().st_blocks * 512
            p.unlink()
        removed += 1
    return removed, freed


def reconcile(ctx: ManagerContext) -> None:
    """At start: files no row records (a crash mid-copy) and rows whose file is gone."""
    d = root(ctx) / LAYERS
    rows = ctx.store.layers()
    known = {Path(r["path"]).name for r in rows}
    if d.is_dir():
        for entry in d.iterdir():
            if entry.name not in known:
                log.warning("removing template layer %s that no record owns (an interrupted build)", entry.name)
                with contextlib.suppress(OSError):
                    os.unlink(entry)
    for r in rows:
        if not Path(r["path"]).is_file():
            ctx.store.delete_layer(r["key"])
