"""A sandbox from a template: a restore of the template's checkpoint.

So it is READY in restore time with the template's service already running (START ran
and READY passed before the checkpoint). The caller's id, labels, TTL, env, network
policy, working directory and user apply; the machine (vCPUs, memory, kernel, disk,
network device) is the template's, so a spec asking for another one is refused rather
than silently ignored. With `[pool.templates]` NAME = N a ready member of the template's
pool is taken instead when there is one (manager/template_pool.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from arcbox_vm.errors import InvalidArgument
from arcbox_vm.manager import restore as _restore
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.templates import records
from arcbox_vm.models import RestoreSandboxSpec, SandboxNetworkSpec, SandboxSpec

if TYPE_CHECKING:
    from arcbox_vm.manager.template_pool import Pools


def _check_machine(spec: SandboxSpec, rec: records.TemplateRecord) -> None:
    fixed = [f for f in ("kernel", "rootfs", "initrd", "boot_args") if getattr(spec, f)]
    if spec.ports:
        fixed.append("ports")
    if spec.vcpus and spec.vcpus != rec.meta.get("vcpus"):
        fixed.append(f"vcpus (the template has {rec.meta.get('vcpus')})")
    if spec.memory_mib and spec.memory_mib != rec.meta.get("memory_mib"):
        fixed.append(f"memory_mib (the template has {rec.meta.get('memory_mib')})")
    if spec.network.mode != rec.network_mode:
        fixed.append(f"network mode {spec.network.mode!r} (the template's is {rec.network_mode!r})")
    if fixed:
        raise InvalidArgument(f"a sandbox from template {rec.name!r} has the template's machine; these cannot be "
                              f"set with a template: {', '.join(fixed)}")


async def create(ctx: ManagerContext, spec: SandboxSpec, pools: Pools | None = None) -> tuple[str, str]:
    """A ready member of the template's warm pool (`pools`), else register the sandbox and
    start restoring it; returns (id, ip) at once."""
    rec = records.load(ctx, spec.template)
    if rec.network_mode == "none" and spec.network == SandboxNetworkSpec():
        spec = spec.model_copy(update={"network": SandboxNetworkSpec(mode="none")})  # the default: the template's
    _check_machine(spec, rec)
    if pools is not None and (taken := pools.take_template(rec, spec)) is not None:
        return taken  # no await since `rec` was read: a member of a rebuilt template's old checkpoint is not it
    rspec = RestoreSandboxSpec(snapshot_id=rec.checkpoint_id, id=spec.id, labels={records.TEMPLATE_LABEL: rec.name,
                                                                                  **spec.labels},
                               ttl_seconds=spec.ttl_seconds, network=spec.network, env=dict(spec.env))
    sid, ip = await _restore.restore(ctx, rspec, hidden_ok=True)
    sb = ctx.sandboxes[sid]
    if spec.working_dir or spec.user or spec.on_ttl != "remove":
        sb.working_dir = spec.working_dir or sb.working_dir
        sb.user = spec.user or sb.user
        sb.on_ttl = spec.on_ttl
        ctx.save(sb)
    return sid, ip
