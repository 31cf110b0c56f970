"""The warm pool (`[pool] size = N`): sandboxes restored and ready before anyone asks.

At start the pool boots one sandbox of the default spec (the template), checkpoints it
(a hidden checkpoint), removes it, and keeps `size` restores of that checkpoint READY.
`take(spec)` hands one out when the pool serves the spec (default kernel, rootfs,
initrd, boot arguments, vCPUs, memory and egress policy; the pool's network mode): the
member becomes the caller's sandbox — the id asked for (or a new UUID), labels, TTL
(counted from now), env, user and working directory — all in memory and one record
write, no guest round trip: its hostname follows through a REINIT queued on its channel
ahead of anything the caller sends. The pool then refills in the background.

A member is taken synchronously (no await between choosing and claiming it), so it is
never handed out twice. Members are hidden (not listed, no events, unknown to every
by-id call) and never outlive their daemon: closing the manager removes them, a restart
after a crash removes what is left (recovery.py) and deletes the hidden checkpoint.
A VM launched as a member keeps its launch name (workdir, cgroup) after the hand-out;
the record's `vm_name` remembers it.

Template pools (`[pool.templates]`) are subclasses (template_pool.py): the checkpoint is
the template's, not made here. A pool's members are told apart by their template label
("" for this one). Members count against `[limits]`; when a create finds no room the
manager removes idle members first (`pause_refill` keeps the pools from taking that room
straight back), and a pool that finds no room waits quietly.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import secrets
import time
from typing import NamedTuple

from arcbox_vm.agent.host.reinit import send_reinit
from arcbox_vm.errors import ArcboxError, BootFailed, ResourceExhausted, SandboxAlreadyExists
from arcbox_vm.manager import checkpoints as ckpts
from arcbox_vm.manager import lifecycle, limits, network_policy
from arcbox_vm.manager import restore as _restore
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.manager.templates.records import TEMPLATE_LABEL
from arcbox_vm.models import RestoreSandboxSpec, SandboxNetworkSpec, SandboxSpec, SandboxState

log = logging.getLogger(__name__)

S = SandboxState
CHECK_EVERY_S = 5.0  # a member can fail without the pool being told: look this often
MAX_BACKOFF_S = 60.0


class PoolStats(NamedTuple):
    """One pool's figures: `pool` is "default" or "template:NAME"; `misses` counts creates it
    serves that found no member ready (they booted or restored the slow way)."""

    pool: str
    size: int
    members: int
    ready: int
    handed_out: int
    misses: int


class WarmPool:
    """The pool of the default spec (`[pool] size`); the base of the template pools."""

    template = ""  # the template label its members carry ("": the default spec's pool)
    owns_checkpoint = True  # made at start, deleted at close (a template pool's is the template's)

    def __init__(self, ctx: ManagerContext, size: int | None = None) -> None:
        self.ctx = ctx
        self.cfg = ctx.config.pool
        self.size = self.cfg.size if size is None else size
        self.snapshot_id: str | None = None
        self.paused_until = 0.0  # no refill before this (monotonic): a create needed the room
        self.handed_out = 0
        self.misses = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    # -- serving ---------------------------------------------------------------------

    def serves(self, spec: SandboxSpec) -> bool:
        d = self.ctx.config.defaults
        net = spec.network
        default_policy = network_policy.resolve(SandboxNetworkSpec(mode=net.mode), self.ctx.config.network.default_egress)
        return (not spec.ports and spec.kernel in ("", d.kernel) and spec.rootfs in ("", d.rootfs)
                and spec.initrd in ("", d.initrd) and spec.boot_args in ("", d.boot_args) and spec.vcpus in (0, d.vcpus)
                and spec.memory_mib in (0, d.memory_mib) and net.mode == self.cfg.network
                and (net.mode == "none" or network_policy.resolve(net, self.ctx.config.network.default_egress)
                     == default_policy))

    def members(self) -> list[SandboxRecord]:
        # list(): one step under the GIL, so `stats()` may run in the metrics endpoint's thread
        return [sb for sb in list(self.ctx.sandboxes.values())
                if sb.pool and not sb.removed and sb.labels.get(TEMPLATE_LABEL, "") == self.template]

    def stats(self) -> PoolStats:
        """Its figures now (plain reads: callable from any thread)."""
        return PoolStats(f"template:{self.template}" if self.template else "default", self.size,
                         len(self.members()), self.ready(), self.handed_out, self.misses)

    def ready(self) -> int:
        return sum(1 for sb in self.members() if self._usable(sb))

    def _usable(self, sb: SandboxRecord) -> bool:
        return sb.state == S.READY and sb.vm is not None and sb.restored_from is not None \
            and sb.restored_from == self.snapshot_id

    def take(self, spec: SandboxSpec) -> tuple[str, str] | None:
        """A ready member as the sandbox `spec` asks for, or None (not served, or none ready)."""
        if not self.serves(spec):
            return None
        member = next((sb for sb in self.members() if self._usable(sb)), None)
        if member is None:
            return self._miss()
        rec = lifecycle.new_record(self.ctx, spec)  # the id is free, the sizes fit (else: raises, nothing taken)
        return self._claim(member, rec)

    def _miss(self) -> None:
        self.misses += 1
        self._changed.set()
        return None

    def _caller_record(self, member: SandboxRecord, sid: str, **fields: object) -> SandboxRecord:
        """`member` as the caller's sandbox would be (a copy: nothing claimed yet), its id
        free and its sizes checked — else raises, and the member stays in the pool."""
        if sid in self.ctx.sandboxes or (self.ctx.data_dir / "sandboxes" / sid).exists():
            raise SandboxAlreadyExists(sid)
        rec = copy.copy(member)
        rec.id = sid
        for k, v in fields.items():
            setattr(rec, k, v)
        limits.check_sizes(self.ctx.config.limits, rec)
        return rec

    def _claim(self, member: SandboxRecord, rec: SandboxRecord) -> tuple[str, str]:
        """Make `member` the caller's sandbox `rec` (its id, labels, env, TTL, user, working
        directory): in memory and one record write, no await."""
        t0 = time.monotonic()
        old = member.id
        member.pool = False  # claimed: from here on it is the caller's
        member.vm_name = member.vm_name or old
        member.id = rec.id
        member.labels, member.env, member.ttl_seconds = rec.labels, rec.env, rec.ttl_seconds
        member.on_ttl = rec.on_ttl
        member.working_dir, member.user = rec.working_dir, rec.user
        member.created_at = member.ready_at = time.time()
        member.source = "pool"
        del self.ctx.sandboxes[old]
        self.ctx.sandboxes[member.id] = member
        try:
            self.ctx.store.rename_sandbox(old, member.to_row(), member.lease.ip if member.lease else None)
        except BaseException:
            del self.ctx.sandboxes[member.id]
            member.id, member.pool = old, True
            self.ctx.sandboxes[old] = member
            raise
        took = time.monotonic() - t0
        self.ctx.announce(member, "created", durations={"create": took}, reason="pool")  # recorded by the rename
        self.ctx.announce(member, "ready", durations={"ready": took}, reason="pool")
        if member.ttl_seconds > 0:
            member.tasks["ttl"] = asyncio.create_task(lifecycle.ttl(self.ctx, member), name=f"ttl-{member.id}")
        assert member.vm is not None
        with contextlib.suppress(ArcboxError):  # its hostname: queued before anything the caller sends
            done = send_reinit(member.vm.agent, {"hostname": member.id[:63]})
            done.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: never "never retrieved"
        self.handed_out += 1
        self._changed.set()
        return member.id, member.lease.ip if member.lease else ""

    # -- filling ---------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None and self.size > 0:
            self._task = asyncio.create_task(self._run(), name=f"warm-pool{'-' if self.template else ''}{self.template}")

    def changed(self) -> None:
        """Look again now (a member was taken, the template was rebuilt or removed)."""
        self._changed.set()

    async def _source(self) -> str | None:
        """The checkpoint members are restored from (None: none for now, hold no members)."""
        if self.snapshot_id is None:
            await self._make_template()
        return self.snapshot_id

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            try:
                if await self._source() is None:
                    await self.drain()
                elif time.monotonic() >= self.paused_until:
                    await self._fill()
                backoff = 1.0
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), CHECK_EVERY_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the pool retries; create works without it
                log.warning("warm pool: %s; retrying in %.0f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _make_template(self) -> None:
        tid = f"pool-template-{secrets.token_hex(4)}"
        await lifecycle.create(self.ctx, SandboxSpec(id=tid, network=SandboxNetworkSpec(mode=self.cfg.network)),
                               pool=True)
        sb = self.ctx.sandboxes[tid]
        try:
            await asyncio.shield(sb.tasks["boot"])
            if sb.state != S.READY:
                raise BootFailed(f"the pool's template sandbox did not boot: {sb.error}")
            ck = await ckpts.create(self.ctx, sb, "warm pool", hidden=True)
            self.snapshot_id = ck.id
            log.info("warm pool: template checkpoint %s (%d bytes)", ck.id, ck.size_bytes)
        finally:
            await lifecycle.remove(self.ctx, sb, reason="pool")

    async def _fill(self) -> None:
        for sb in self.members():
            if sb.state not in (S.STARTING, S.READY) or (sb.state == S.READY and not self._usable(sb)):
                await lifecycle.remove(self.ctx, sb, reason="pool")
        missing = self.size - len(self.members())
        if missing <= 0:
            return
        gate = asyncio.Semaphore(self.cfg.parallel)

        async def one() -> None:
            async with gate:
                try:
                    sid, _ = await _restore.restore(self.ctx, self._member_spec(), hidden_ok=True, pool=True)
                except ResourceExhausted as exc:  # no room: sandboxes people asked for come first
                    log.debug("warm pool %r: %s", self.template, exc)
                    return
                await _restore.wait_ready(self.ctx, [sid], self.ctx.config.agent.hello_timeout_s + 60)

        tasks = [asyncio.create_task(one(), name="warm-pool-restore") for _ in range(missing)]
        try:
            await asyncio.wait(tasks)
        finally:
            for t in tasks:
                t.cancel()
        failures = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
        if failures:
            raise failures[0]

    def _member_spec(self) -> RestoreSandboxSpec:
        return RestoreSandboxSpec(snapshot_id=self.snapshot_id or "", id=f"pool-{secrets.token_hex(6)}")

    async def drain(self) -> None:
        """Remove every member (hidden: no events)."""
        for sb in self.members():
            with contextlib.suppress(Exception):
                await lifecycle.remove(self.ctx, sb, reason="pool")

    async def evict_one(self) -> bool:
        """Remove one member to make room for a sandbox someone asked for (a ready one
        last: it is the one worth keeping); False when there is none."""
        members = sorted(self.members(), key=lambda sb: sb.state == S.READY)
        if not members:
            return False
        await lifecycle.remove(self.ctx, members[0], reason="pool_evicted")
        return True

    async def close(self) -> None:
        """Stop filling; remove the members and the template checkpoint."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self.drain()
        if self.snapshot_id is not None and self.owns_checkpoint:
            with contextlib.suppress(ArcboxError):
                ckpts.delete(self.ctx, self.snapshot_id, hidden_ok=True)
            self.snapshot_id = None
