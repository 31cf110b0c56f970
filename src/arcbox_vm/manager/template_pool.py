"""Warm pools per template (`[pool.templates]` NAME = N), and the set of all pools.

A template pool keeps N restores of template NAME's checkpoint READY — the checkpoint the
template already has (a sandbox from a template is a restore of it), so nothing is made
at start and closing the pool never deletes it. `create_sandbox(SandboxSpec(template=NAME))`
takes a member (templates/create.py) with what a restore from the template would have:
the template's env, working directory and user as defaults under the caller's, the
template label over the caller's labels, the caller's id and TTL.

The pool reads the template's row every round: built later → it starts filling; rebuilt
(a new checkpoint) → members of the old one are no longer handed out (`_usable` compares
`restored_from`, and the hand-out compares it with the row the create just read) and are
replaced; removed → the pool is drained. Members are hidden and never outlive their
daemon, as in the default pool.
"""

from __future__ import annotations

import logging
import time
import uuid

from arcbox_vm.manager import network_policy
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.pool import CHECK_EVERY_S, WarmPool
from arcbox_vm.manager.templates import records
from arcbox_vm.models import RestoreSandboxSpec, SandboxNetworkSpec, SandboxSpec, SandboxState

log = logging.getLogger(__name__)

S = SandboxState


class TemplatePool(WarmPool):
    owns_checkpoint = False  # the template's: closing the pool keeps it

    def __init__(self, ctx: ManagerContext, name: str, size: int) -> None:
        super().__init__(ctx, size)
        self.template = name
        self.network_mode = "tap"

    async def _source(self) -> str | None:
        rec = records.find(self.ctx, self.template)
        if rec is not None and rec.checkpoint_id != self.snapshot_id:
            log.info("warm pool %r: template checkpoint %s", self.template, rec.checkpoint_id)
        self.snapshot_id = rec.checkpoint_id if rec is not None else None
        self.network_mode = rec.network_mode if rec is not None else "tap"
        return self.snapshot_id

    def _member_spec(self) -> RestoreSandboxSpec:
        return RestoreSandboxSpec(snapshot_id=self.snapshot_id or "",
                                  id=f"pool-{self.template[:20]}-{uuid.uuid4().hex[:12]}", labels={records.TEMPLATE_LABEL: self.template},
                                  network=SandboxNetworkSpec(mode=self.network_mode))

    def take_for(self, rec: records.TemplateRecord, spec: SandboxSpec) -> tuple[str, str] | None:
        """A ready member as the sandbox `spec` asks for from template `rec` (the machine
        already checked by the caller), or None: none ready, or an egress policy other than
        the default (members are restored with the default one)."""
        net = spec.network
        default = network_policy.resolve(SandboxNetworkSpec(mode=net.mode), self.ctx.config.network.default_egress)
        if net.mode != "none" and network_policy.resolve(net, self.ctx.config.network.default_egress) != default:
            return None
        member = next((sb for sb in self.members()
                       if self._usable(sb) and sb.restored_from == rec.checkpoint_id), None)
        if member is None:
            return self._miss()
        caller = self._caller_record(
            member, spec.id or str(uuid.uuid4()), labels={records.TEMPLATE_LABEL: rec.name, **spec.labels},
            env={**member.env, **spec.env}, ttl_seconds=spec.ttl_seconds, on_ttl=spec.on_ttl,
            working_dir=spec.working_dir or member.working_dir, user=spec.user or member.user)
        return self._claim(member, caller)


class Pools:
    """The default pool and the template pools of one manager."""

    def __init__(self, ctx: ManagerContext) -> None:
        self.ctx = ctx
        self.default: WarmPool | None = None
        self.templates: dict[str, TemplatePool] = {}

    def start(self, default: bool) -> None:
        if default:
            self.default = WarmPool(self.ctx)
            self.default.start()
        for name, n in self.ctx.config.pool.templates.items():
            if n > 0:
                self.templates[name] = TemplatePool(self.ctx, name, n)
                self.templates[name].start()

    def all(self) -> list[WarmPool]:
        return [*([self.default] if self.default is not None else []), *self.templates.values()]

    def take(self, spec: SandboxSpec) -> tuple[str, str] | None:
        return self.default.take(spec) if self.default is not None else None

    def take_template(self, rec: records.TemplateRecord, spec: SandboxSpec) -> tuple[str, str] | None:
        pool = self.templates.get(rec.name)
        return pool.take_for(rec, spec) if pool is not None else None

    def template_changed(self, name: str) -> None:
        """Template `name` was built, rebuilt or removed: its pool looks now."""
        if name in self.templates:
            self.templates[name].changed()

    async def evict_one(self) -> bool:
        """Remove one pool member (from the fullest pool) to make room for a sandbox someone
        asked for; the pools then wait a round before refilling. False: there is none."""
        pools = sorted(self.all(), key=lambda p: len(p.members()), reverse=True)
        until = time.monotonic() + CHECK_EVERY_S
        for p in self.all():
            p.paused_until = until
        for p in pools:
            if await p.evict_one():
                return True
        return False

    async def close(self) -> None:
        for p in self.all():
            await p.close()
        self.default, self.templates = None, {}
