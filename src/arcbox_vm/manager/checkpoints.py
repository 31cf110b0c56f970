"""Checkpoints: a live sandbox's memory, device state and disk, saved while it runs on.

A checkpoint is taken with the VM paused for as short as possible: the driver saves the
device state (and copies the memory file, see `SnapshotProcess.save_state`), the disk is
copied (a restore with a different disk than its memory expects would corrupt the
guest), and the VM runs on. The files are made in `<workdir>/checkpoint-<id>.part/`,
then renamed into `<data dir>/checkpoints/<id>/` and only then recorded: a crash at any
point leaves no half-made checkpoint listed (start-up removes unrecorded directories).

A checkpoint directory holds: `state`, `mem` (when the memory is kept apart),
`disk.ext4`, `kernel` and `initrd` (hard links to what the VM booted, so a restore uses
exactly those files even after the image was rebuilt) and `meta.json` (what the
database row holds).

Deleting removes the directory and the record at once. Sandboxes restored from it keep
working: each holds hard links to the files its VMM uses (see `restore_plan.py`), so
the memory they share stays until the last of them is gone — the file system's own
reference count. `in_use` in the listing counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arcbox_vm.errors import ArcboxError, CheckpointNotFound, InvalidArgument, InvalidState, SnapshotsUnsupported
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.models import CheckpointInfo, SandboxState
from arcbox_vm.ports import SnapshotDriver, SnapshotProcess, VmSnapshot

log = logging.getLogger(__name__)

S = SandboxState
DIR = "checkpoints"
DISK = "disk.ext4"
MAX_NAME = 200
# a sandbox whose VMM maps a checkpoint's memory is one of these states
_MAPS_MEMORY = (S.STARTING, S.READY, S.RUNNING, S.PAUSED, S.STOPPING)


@dataclass
class Checkpoint:
    id: str
    name: str
    sandbox_id: str
    created_at: float
    size_bytes: int
    dir: Path
    meta: dict[str, Any]
    hidden: bool = False

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Checkpoint":
        return cls(row["id"], row["name"], row["sandbox_id"], row["created_at"], row["size_bytes"],
                   Path(row["dir"]), json.loads(row["meta"]), bool(row["hidden"]))

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "sandbox_id": self.sandbox_id, "created_at": self.created_at,
                "size_bytes": self.size_bytes, "dir": str(self.dir), "meta": json.dumps(self.meta),
                "hidden": self.hidden}

    def file(self, key: str) -> Path | None:
        name = self.meta["files"].get(key)
        return self.dir / name if name else None

    def snapshot(self, base: Path | None = None) -> VmSnapshot:
        """The VMM's view of it; with `base`, of the same files in another directory."""
        d = base or self.dir
        files = self.meta["files"]
        return VmSnapshot(state=d / files["state"], memory=d / files["memory"] if files.get("memory") else None,
                          vmm=self.meta["vmm"], details=dict(self.meta.get("details") or {}))

    def info(self, in_use: int = 0) -> CheckpointInfo:
        return CheckpointInfo(self.id, self.name, self.sandbox_id, self.created_at, self.size_bytes, in_use)


def root(ctx: ManagerContext) -> Path:
    return ctx.data_dir / DIR


def snapshot_driver(ctx: ManagerContext) -> SnapshotDriver:
    driver = ctx.driver
    why = driver.snapshot_support() if isinstance(driver, SnapshotDriver) else \
        f"the {driver.name} driver cannot pause, checkpoint or restore VMs"
    if why:
        raise SnapshotsUnsupported(why)
    return driver  # type: ignore[return-value]


def snapshot_process(ctx: ManagerContext, sb: SandboxRecord, restorable: bool = True) -> SnapshotProcess:
    """The sandbox's VMM as one that can pause (and save, when `restorable`: its driver
    must be able to restore what it saves)."""
    if restorable:
        snapshot_driver(ctx)
    proc = sb.vm.process if sb.vm is not None else None
    if not isinstance(proc, SnapshotProcess):
        raise SnapshotsUnsupported(f"the VMM of sandbox {sb.id!r} cannot be paused or saved")
    return proc


def load(ctx: ManagerContext, snapshot_id: str, *, hidden_ok: bool = False) -> Checkpoint:
    for row in ctx.store.checkpoints():
        if row["id"] == snapshot_id and (hidden_ok or not row["hidden"]):
            return Checkpoint.from_row(row)
    raise CheckpointNotFound(snapshot_id)


def in_use(ctx: ManagerContext, snapshot_id: str) -> int:
    return sum(1 for sb in ctx.sandboxes.values()
               if sb.restored_from == snapshot_id and sb.state in _MAPS_MEMORY and not sb.removed)


def listing(ctx: ManagerContext, sandbox_id: str | None = None) -> list[CheckpointInfo]:
    return [ck.info(in_use(ctx, ck.id)) for ck in map(Checkpoint.from_row, ctx.store.checkpoints())
            if not ck.hidden and (not sandbox_id or ck.sandbox_id == sandbox_id)]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _size(d: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in d.iterdir() if p.is_file())


async def create(ctx: ManagerContext, sb: SandboxRecord, name: str, *, hidden: bool = False,
                 owner: str = "") -> Checkpoint:
    """Checkpoint a live sandbox (READY, RUNNING or PAUSED in memory); it keeps its state.
    `owner` (hidden ones only, e.g. "template:NAME"): kept across restarts, deleted by its owner."""
    if not isinstance(name, str) or len(name) > MAX_NAME or "\x00" in name:
        raise InvalidArgument(f"a checkpoint name is a string of at most {MAX_NAME} characters")
    async with sb.lock:
        if sb.state not in (S.READY, S.RUNNING, S.PAUSED) or sb.vm is None:
            hint = "resume it first" if sb.suspended else "only a ready, running or paused sandbox can be checkpointed"
            raise InvalidState(sb.id, sb.state.value + (" (to disk)" if sb.suspended else ""), hint)
        proc = snapshot_process(ctx, sb)
        cid = str(uuid.uuid4())
        part = sb.workdir / f"checkpoint-{cid}.part"
        final = root(ctx) / cid
        was_paused = sb.state == S.PAUSED
        t0 = time.perf_counter()
        try:
            part.mkdir()
            try:
                await proc.pause()  # the disk is final from here: state, memory and disk in parallel
                snap, _ = await _both(proc.save_state(part),
                                      ctx.adapters.clone_disk(sb.workdir / "rootfs.ext4", part / DISK))
            finally:
                if not was_paused:
                    await proc.resume()
            paused_s = time.perf_counter() - t0
            files = {"state": snap.state.name, "memory": snap.memory.name if snap.memory else None, "disk": DISK,
                     "kernel": "kernel", "initrd": "initrd" if sb.booted_initrd else None}
            _link_or_copy(Path(sb.booted_kernel or sb.kernel), part / "kernel")
            if sb.booted_initrd:
                _link_or_copy(Path(sb.booted_initrd), part / "initrd")
            ck = Checkpoint(cid, name, sb.id, time.time(), 0, final, {
                "vmm": snap.vmm, "details": snap.details, "files": files,
                "machine": {"vcpus": sb.vcpus, "memory_mib": sb.memory_mib, "boot_args": sb.boot_args,
                            "network_mode": sb.network_mode},
                "defaults": {"env": sb.env, "working_dir": sb.working_dir, "user": sb.user, "labels": sb.labels,
                             "ttl_seconds": sb.ttl_seconds,
                             "egress": sb.egress.to_json() if sb.egress is not None else None},
                "execs": [{"channel": r["channel"], "argv": json.loads(r["argv"])}
                          for r in ctx.store.execs(sb.id, status=("running", "detached"))],
                "paused_s": round(paused_s, 4),
                **({"owner": owner} if owner else {}),
            }, hidden)
            (part / "meta.json").write_text(json.dumps(ck.to_row(), indent=1))
            ck.size_bytes = _size(part)
            root(ctx).mkdir(parents=True, exist_ok=True)
            root(ctx).chmod(0o700)  # VMs' memory and disks: nobody else's to read (a VMM runs as its own uid)
            os.rename(part, final)
        except BaseException:
            shutil.rmtree(part, ignore_errors=True)
            raise
        try:
            ctx.store.put_checkpoint(ck.to_row())
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
    if not hidden:
        with contextlib.suppress(ArcboxError):
            ctx.open_events().append(sb.id, "checkpointed", snapshot_id=cid, name=name, size_bytes=ck.size_bytes,
                                     paused_ms=int(paused_s * 1000))
    log.info("checkpoint %s of sandbox %s: %d bytes, VM paused %.0f ms", cid, sb.id, ck.size_bytes, paused_s * 1000)
    return ck


async def _both(a: Awaitable[Any], b: Awaitable[Any]) -> tuple[Any, Any]:
    """Run two awaitables at once; if one fails the other is cancelled (and awaited)."""
    ta, tb = asyncio.ensure_future(a), asyncio.ensure_future(b)
    try:
        return await ta, await tb
    finally:
        for t in (ta, tb):
            if not t.done():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t


def delete(ctx: ManagerContext, snapshot_id: str, *, hidden_ok: bool = False) -> None:
    """Forget the checkpoint and remove its directory (running restores keep their links)."""
    ck = load(ctx, snapshot_id, hidden_ok=hidden_ok)
    ctx.store.delete_checkpoint(ck.id)
    shutil.rmtree(ck.dir, ignore_errors=True)
    users = in_use(ctx, ck.id)
    if users:
        log.info("checkpoint %s deleted; %d sandbox(es) restored from it keep its memory until they are removed",
                 ck.id, users)


def reconcile(ctx: ManagerContext) -> None:
    """At start: hidden checkpoints (of an interrupted fork, of the warm pool) are
    deleted — not those with an owner (a template's: see manager/templates/records.py);
    directories no record owns (a crash mid-checkpoint) are removed."""
    rows = ctx.store.checkpoints()
    for row in rows:
        if row["hidden"] and not json.loads(row["meta"]).get("owner"):
            with contextlib.suppress(ArcboxError):
                delete(ctx, row["id"], hidden_ok=True)
    for sb in ctx.sandboxes.values():
        for part in sb.workdir.glob("checkpoint-*.part"):
            shutil.rmtree(part, ignore_errors=True)
    known = {Path(r["dir"]).name for r in ctx.store.checkpoints()}
    d = root(ctx)
    if d.is_dir():
        for entry in d.iterdir():
            if entry.name not in known:
                log.warning("removing checkpoint directory %s that no record owns (an interrupted checkpoint)",
                            entry.name)
                shutil.rmtree(entry, ignore_errors=True)
