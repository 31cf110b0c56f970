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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time

from arcbox_vm.agent.host.reinit import send_reinit
from arcbox_vm.errors import ArcboxError, BootFailed
from arcbox_vm.manager import checkpoints as ckpts
from arcbox_vm.manager import lifecycle, network_policy
from arcbox_vm.manager import restore as _restore
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.models import RestoreSandboxSpec, SandboxNetworkSpec, SandboxSpec, SandboxState

log = logging.getLogger(__name__)

S = SandboxState
CHECK_EVERY_S = 5.0  # a member can fail without the pool being told: look this often
MAX_BACKOFF_S = 60.0


class WarmPool:
    def __init__(self, ctx: ManagerContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.config.pool
        self.snapshot_id: str | None = None
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
        return [sb for sb in self.ctx.sandboxes.values() if sb.pool and not sb.removed]

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
            self.misses += 1
            self._changed.set()
            return None
        t0 = time.monotonic()
        rec = lifecycle.new_record(self.ctx, spec)  # the id is free, the sizes fit (else: raises, nothing taken)
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
        if self._task is None and self.cfg.size > 0:
            self._task = asyncio.create_task(self._run(), name="warm-pool")

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            try:
                if self.snapshot_id is None:
                    await self._make_template()
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
        missing = self.cfg.size - len(self.members())
        if missing <= 0:
            return
        gate = asyncio.Semaphore(self.cfg.parallel)

        async def one() -> None:
            async with gate:
                spec = RestoreSandboxSpec(snapshot_id=self.snapshot_id or "", id=f"pool-{secrets.token_hex(6)}")
                sid, _ = await _restore.restore(self.ctx, spec, hidden_ok=True, pool=True)
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

    async def close(self) -> None:
        """Stop filling; remove the members and the template checkpoint."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for sb in self.members():
            with contextlib.suppress(Exception):
                await lifecycle.remove(self.ctx, sb, reason="pool")
        if self.snapshot_id is not None:
            with contextlib.suppress(ArcboxError):
                ckpts.delete(self.ctx, self.snapshot_id, hidden_ok=True)
            self.snapshot_id = None
