"""A sandbox's egress policy: resolved at create (the spec over `[network] default_egress`),
changed while it runs (`update`: applied at once, then recorded), re-applied by recovery
from the record."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pydantic import ValidationError

from arcbox_vm.errors import ArcboxError, InvalidArgument, InvalidState
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.models import SandboxNetworkSpec
from arcbox_vm.ports import EgressPolicy

log = logging.getLogger(__name__)


def resolve(net: SandboxNetworkSpec, default_egress: str) -> EgressPolicy:
    return EgressPolicy(net.egress or default_egress, tuple(net.allow_out), tuple(net.deny_out))  # type: ignore[arg-type]


async def update(ctx: ManagerContext, sb: SandboxRecord, egress: str | None = None,
                 allow_out: Iterable[str] | None = None, deny_out: Iterable[str] | None = None) -> EgressPolicy:
    """Replace what is given (None keeps it) of the sandbox's policy: its rules change at
    once (open connections to what is no longer allowed stop too), then the record."""
    if sb.network_mode != "tap":
        raise InvalidState(sb.id, sb.state.value, "it was created without a network (mode none)")
    current = sb.egress or EgressPolicy(ctx.config.network.default_egress)  # type: ignore[arg-type]
    try:
        spec = SandboxNetworkSpec(
            egress=egress or current.egress,
            allow_out=list(current.allow_out if allow_out is None else allow_out),
            deny_out=list(current.deny_out if deny_out is None else deny_out))
    except ValidationError as exc:
        raise InvalidArgument(_message(exc)) from None
    new = resolve(spec, ctx.config.network.default_egress)
    async with sb.lock:
        lease = sb.lease  # none when stopped or failed: only recorded
        if lease is not None:
            await ctx.network.set_policy(lease, new)
        old, sb.egress = sb.egress, new
        try:
            ctx.save(sb)
        except ArcboxError:
            sb.egress = old
            if lease is not None and sb.lease is lease:
                await ctx.network.set_policy(lease, old)
            raise
    log.info("sandbox %s egress policy: %s, allow_out %s, deny_out %s", sb.id, new.egress,
             list(new.allow_out) or "-", list(new.deny_out) or "-")
    return new


def _message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        msg, where = err["msg"].removeprefix("Value error, "), ".".join(str(x) for x in err["loc"])
        parts.append(msg if not where or msg.startswith(where) else f"{where}: {msg}")
    return "; ".join(parts)
