"""Protobuf <-> library types (pure functions; no I/O)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.errors import InvalidArgument
from arcbox_vm.models import (
    ExecInfo,
    ExecSpec,
    FileStat,
    OutputChunk,
    PortMapping,
    SandboxEvent,
    SandboxInfo,
    SandboxNetworkSpec,
    SandboxSpec,
    SandboxStats,
    SandboxSummary,
)


def spec_from_create(req: pb.CreateSandboxRequest) -> SandboxSpec:
    """Validate and convert; fields the daemon does not implement are refused, not ignored."""
    unsupported = [name for name, present in (
        ("image", bool(req.image)), ("cmd", bool(req.cmd)), ("mounts", bool(req.mounts)),
        ("ssh_public_key", req.HasField("ssh_public_key")),
    ) if present]
    if unsupported:
        raise InvalidArgument(f"{', '.join(unsupported)} not supported yet: create the sandbox without it "
                              "and use Run / UploadFile instead")
    return SandboxSpec(
        id=req.id or None, labels=dict(req.labels), kernel=req.kernel, rootfs=req.rootfs, initrd=req.initrd,
        boot_args=req.boot_args, vcpus=req.limits.vcpus, memory_mib=req.limits.memory_mib,
        network=network_spec(req.network), ttl_seconds=req.ttl_seconds, env=dict(req.env),
        working_dir=req.working_dir, user=req.user, ports=[port_mapping(m) for m in req.ports],
        template=req.template,
    )


def network_spec(net: pb.NetworkSpec) -> SandboxNetworkSpec:
    """An unset message is all defaults (tap, the daemon's default egress, no lists)."""
    mode = net.mode or "tap"
    if mode not in ("tap", "none"):
        raise InvalidArgument(f"network.mode must be 'tap' or 'none', got {mode!r}")
    egress = check_egress(net.egress)
    try:
        return SandboxNetworkSpec(mode=mode, egress=egress, allow_out=list(net.allow_out),
                                  deny_out=list(net.deny_out))
    except ValidationError as exc:
        raise InvalidArgument("network: " + "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) \
            from None


def check_egress(egress: str) -> str | None:
    """"" = unset (the daemon's default / keep); else "none" or "nat"."""
    if egress and egress not in ("none", "nat"):
        raise InvalidArgument(f"network egress must be 'none' or 'nat', got {egress!r}")
    return egress or None


def network_update(req: pb.UpdateNetworkRequest) -> dict[str, Any]:
    """The keywords of `SandboxManager.update_network`: an unset field keeps that part."""
    return {
        "egress": check_egress(req.egress),
        "allow_out": list(req.allow_out.cidrs) if req.HasField("allow_out") else None,
        "deny_out": list(req.deny_out.cidrs) if req.HasField("deny_out") else None,
    }


def port_mapping(m: pb.PortMapping) -> PortMapping:
    try:
        return PortMapping(guest_port=m.guest_port, host_port=m.host_port, host_addr=m.host_addr or "127.0.0.1",
                           protocol=m.protocol or "tcp")
    except ValueError as exc:
        raise InvalidArgument(f"ports: {exc}") from None


def port_mapping_pb(m: PortMapping) -> pb.PortMapping:
    return pb.PortMapping(host_addr=m.host_addr, host_port=m.host_port, guest_port=m.guest_port, protocol=m.protocol)


def tty_size(size: pb.TerminalSize | None, has: bool) -> tuple[int, int] | None:
    if not has:
        return None
    w, h = size.width or 80, size.height or 24
    if not (1 <= w <= 0xFFFF and 1 <= h <= 0xFFFF):
        raise InvalidArgument(f"tty_size must be between 1 and 65535 columns/rows, got {w}x{h}")
    return w, h


def exec_spec(request: Any, *, stdin: bool = False) -> ExecSpec:
    """An ExecSpec from a RunRequest / ExecRequest / StartRequest (they share these fields)."""
    try:
        return ExecSpec(cmd=list(request.cmd), env=dict(request.env), working_dir=request.working_dir,  # type: ignore[arg-type]
                        user=request.user, tty=request.tty,
                        tty_size=tty_size(request.tty_size, request.HasField("tty_size")),
                        timeout_seconds=request.timeout_seconds, stdin=stdin)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def output(chunk: OutputChunk, cls=pb.RunOutput, timed_out: bool = False):  # noqa: ANN001
    done = chunk.stream in ("exit", "error")
    return cls(stream=chunk.stream, data=chunk.data, exit_code=chunk.exit_code, done=done, timed_out=timed_out)


def info(i: SandboxInfo) -> pb.SandboxInfo:
    msg = pb.SandboxInfo(
        id=i.id, state=i.state.value, labels=i.labels,
        limits=pb.ResourceLimits(vcpus=i.vcpus, memory_mib=i.memory_mib),
        created_at=int(i.created_at), ready_at=int(i.ready_at or 0), last_exited_at=int(i.last_exited_at or 0),
        last_exit_code=i.last_exit_code or 0, error=i.error or "", vmm=i.vmm,
        ports=[port_mapping_pb(m) for m in i.ports],
    )
    if i.network is not None:
        n = i.network
        msg.network.CopyFrom(pb.SandboxNetwork(ip_address=n.ip_address, gateway=n.gateway, tap_name=n.tap_name,
                                               egress=n.egress, allow_out=n.allow_out, deny_out=n.deny_out))
    return msg


def summary(s: SandboxSummary) -> pb.SandboxSummary:
    return pb.SandboxSummary(id=s.id, state=s.state.value, labels=s.labels, ip_address=s.ip_address,
                             created_at=int(s.created_at))


def event(ev: SandboxEvent) -> pb.SandboxEvent:
    return pb.SandboxEvent(sandbox_id=ev.sandbox_id, action=ev.action, timestamp=ev.timestamp_ns,
                           attributes=ev.attributes, id=ev.id)


def file_stat(st: FileStat) -> pb.FileStat:
    return pb.FileStat(path=st.path, name=st.name, type=st.type, size=st.size, mode=st.mode, uid=st.uid,
                       gid=st.gid, mtime=st.mtime, link_target=st.link_target)


def exec_info(e: ExecInfo) -> pb.ExecInfo:
    msg = pb.ExecInfo(exec_id=e.exec_id, cmd=e.cmd, status=e.status, started_at=int(e.started_at),
                      finished_at=int(e.finished_at or 0))
    if e.exit_code is not None:
        msg.exit_code = e.exit_code
    return msg


def stats(st: SandboxStats) -> pb.SandboxStats:
    return pb.SandboxStats(id=st.id, state=st.state.value, cpu_seconds=st.cpu_seconds, memory_bytes=st.memory_bytes,
                           io_read_bytes=st.io_read_bytes, io_write_bytes=st.io_write_bytes,
                           processes=st.processes, timestamp=st.timestamp_ns, source=st.source)
