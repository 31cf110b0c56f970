"""The snapshot part of the `SandboxManager` facade: checkpoint, restore, fork, pause,
resume, list and delete checkpoints. Validate, find the record, call the use case
(`checkpoints.py`, `restore.py`, `pausing.py`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from arcbox_vm.errors import InvalidArgument, ResourceExhausted
from arcbox_vm.manager import checkpoints as ckpts
from arcbox_vm.manager import pausing
from arcbox_vm.manager import restore as _restore
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.pool import PoolStats, WarmPool
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.manager.template_pool import Pools, TemplatePool
from arcbox_vm.models import CheckpointInfo, RestoreSandboxSpec, SandboxSpec

log = logging.getLogger(__name__)


class SnapshotOperations:
    """Mixed into `SandboxManager` (which provides `_ctx`, `_get`, `_ensure_started`)."""

    _ctx: ManagerContext
    _pools: Pools | None = None

    def _get(self, sandbox_id: str) -> SandboxRecord:  # pragma: no cover - provided by SandboxManager
        raise NotImplementedError

    async def _ensure_started(self) -> None:  # pragma: no cover - provided by SandboxManager
        raise NotImplementedError

    async def checkpoint_sandbox(self, sandbox_id: str, name: str = "") -> CheckpointInfo:
        """Save a live sandbox's memory, device state and disk; it keeps running (paused
        for well under a second when its memory is a file, see docs/ARCHITECTURE.md).
        A paused sandbox can be checkpointed too (it stays paused)."""
        await self._ensure_started()
        ck = await ckpts.create(self._ctx, self._get(sandbox_id), name or "")
        return ck.info()

    async def restore_sandbox(self, spec: RestoreSandboxSpec) -> tuple[str, str]:
        """A new sandbox continuing checkpoint `spec.snapshot_id`, with its own id, IP, TAP,
        MAC and copy of the disk. Returns (id, ip) at once; `wait_ready(id)` returns once
        its agent said HELLO again and the guest took its new address, clock and entropy."""
        if not isinstance(spec, RestoreSandboxSpec):
            raise InvalidArgument("restore_sandbox takes a RestoreSandboxSpec")
        await self._ensure_started()
        return await self._with_room(lambda: _restore.restore(self._ctx, spec))

    def list_checkpoints(self, sandbox_id: str | None = None) -> list[CheckpointInfo]:
        """Checkpoints (of `sandbox_id` when given), oldest first."""
        self._ctx.open_events()
        return ckpts.listing(self._ctx, sandbox_id)

    def delete_checkpoint(self, snapshot_id: str) -> None:
        """Delete a checkpoint and its files. Sandboxes restored from it run on: they hold
        the files they use (hard links), which are freed when the last of them is removed."""
        self._ctx.open_events()
        ckpts.delete(self._ctx, snapshot_id)

    async def fork_sandbox(self, sandbox_id: str, count: int = 1, timeout: float = 300) -> list[tuple[str, str]]:
        """`count` clones of a running sandbox — its files and processes included — each
        with its own id, IP, TAP and MAC; returns their (id, ip) once all are READY (none
        is left behind if one fails)."""
        await self._ensure_started()
        return await _restore.fork(self._ctx, self._get(sandbox_id), int(count), timeout)

    async def pause_sandbox(self, sandbox_id: str, to_disk: bool = False) -> None:
        """PAUSED: the guest stops (no CPU); its TTL stops counting; commands and file
        transfers are refused until `resume_sandbox`. `to_disk` also saves it and stops its
        VMM, freeing its memory (it keeps its id, IP, TAP and disk)."""
        await self._ensure_started()
        await pausing.pause(self._ctx, self._get(sandbox_id), to_disk=bool(to_disk))

    async def resume_sandbox(self, sandbox_id: str) -> None:
        """Run a paused sandbox again (restoring it when it was paused to disk)."""
        await self._ensure_started()
        await pausing.resume(self._ctx, self._get(sandbox_id))

    # -- the warm pools ([pool] size, [pool.templates]) ------------------------------------

    @property
    def pool(self) -> WarmPool | None:
        """The default spec's warm pool (None when `[pool] size` is 0 or the VMM cannot restore)."""
        return self._pools.default if self._pools is not None else None

    def template_pool(self, name: str) -> TemplatePool | None:
        """Template `name`'s warm pool (None unless `[pool.templates]` gives it one)."""
        return self._pools.templates.get(name) if self._pools is not None else None

    def pool_stats(self) -> list[PoolStats]:
        """Every warm pool's size, members, ready members, hand-outs and misses (callable from
        any thread: the metrics endpoint reads it at scrape time)."""
        pools = self._pools
        return [p.stats() for p in pools.all()] if pools is not None else []

    def _start_pool(self) -> None:
        cfg = self._ctx.config.pool
        if cfg.size <= 0 and not any(cfg.templates.values()):
            return
        try:
            ckpts.snapshot_driver(self._ctx)
        except Exception as exc:  # noqa: BLE001 - no pool; creating works as ever
            log.warning("warm pool off: %s", exc)
            return
        self._pools = Pools(self._ctx)
        self._pools.start(default=cfg.size > 0)

    def _take_from_pool(self, spec: SandboxSpec) -> tuple[str, str] | None:
        return self._pools.take(spec) if self._pools is not None else None

    async def _with_room(self, make: Callable[[], Awaitable[tuple[str, str]]]) -> tuple[str, str]:
        """`make()`; when `[limits]` leave no room, idle pool members are removed one at a
        time and it is tried again: a pool never starves a sandbox someone asked for."""
        while True:
            try:
                return await make()
            except ResourceExhausted:
                if self._pools is None or not await self._pools.evict_one():
                    raise

    async def _close_pool(self) -> None:
        pools, self._pools = self._pools, None
        if pools is not None:
            await pools.close()
