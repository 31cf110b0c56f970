"""Protobuf messages ↔ the client's data types, in one place.

The wire uses 0 / "" for "unset" (proto3); the Python side uses None, as the in-process
`SandboxInfo` does. Unknown states are kept as their string rather than rejected, so an
older client still lists sandboxes of a newer daemon.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.client.types import Created, Output
from arcbox_vm.errors import InvalidArgument
from arcbox_vm.models import (
    ExecInfo,
    ExecSpec,
    FileStat,
    PortMapping,
    SandboxEvent,
    SandboxInfo,
    SandboxNetworkInfo,
    SandboxState,
    SandboxStats,
    SandboxSummary,
)

__all__ = [
    "created_from_pb", "event_from_pb", "exec_info_from_pb", "exec_request_to_pb", "file_stat_from_pb", "info_from_pb",
    "network_spec_to_pb", "network_update_to_pb", "output_from_pb", "ports_to_pb", "stats_from_pb", "str_map",
    "summary_from_pb", "timeout_to_pb", "tty_size_to_pb",
]

# The three requests that start a command share the ExecSpec fields; only Start has stdin.
ExecRequestT = TypeVar("ExecRequestT", pb.RunRequest, pb.ExecRequest, pb.StartRequest)


def _state(value: str) -> SandboxState:
    try:
        return SandboxState(value)
    except ValueError:
        return value  # type: ignore[return-value]


def _opt_time(seconds: int) -> float | None:
    return float(seconds) if seconds else None


def exec_info_from_pb(m: pb.ExecInfo, sandbox_id: str) -> ExecInfo:
    return ExecInfo(exec_id=m.exec_id, sandbox_id=sandbox_id, cmd=list(m.cmd), status=m.status,  # type: ignore[arg-type]
                    started_at=float(m.started_at), finished_at=_opt_time(m.finished_at),
                    exit_code=m.exit_code if m.HasField("exit_code") else None)


def info_from_pb(m: pb.SandboxInfo) -> SandboxInfo:
    net = None
    if m.HasField("network") and m.network.ip_address:
        n = m.network
        net = SandboxNetworkInfo(n.ip_address, n.gateway, n.tap_name, n.egress, tuple(n.allow_out), tuple(n.deny_out))
    return SandboxInfo(
        id=m.id, state=_state(m.state), labels=dict(m.labels), vcpus=m.limits.vcpus, memory_mib=m.limits.memory_mib,
        network=net, created_at=float(m.created_at), ready_at=_opt_time(m.ready_at),
        last_exited_at=_opt_time(m.last_exited_at),
        last_exit_code=m.last_exit_code if m.last_exited_at else None,
        error=m.error or None, vmm=m.vmm, ports=tuple(_port_from_pb(p) for p in m.ports),
    )


def _port_from_pb(m: pb.PortMapping) -> PortMapping:
    return PortMapping(guest_port=m.guest_port, host_port=m.host_port, host_addr=m.host_addr or "127.0.0.1",
                       protocol=m.protocol or "tcp")


def ports_to_pb(ports: Sequence[PortMapping | str] | None) -> list[pb.PortMapping]:
    """Port mappings (or Docker's `-p` strings such as "8080:80") → protobuf; InvalidArgument
    names a bad one."""
    out = []
    for item in ports or ():
        try:
            m = PortMapping.parse(item) if isinstance(item, str) else item
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if not isinstance(m, PortMapping):
            raise InvalidArgument(f"ports: expected PortMapping or a string like '8080:80', got {item!r}")
        out.append(pb.PortMapping(host_addr=m.host_addr, host_port=m.host_port, guest_port=m.guest_port,
                                  protocol=m.protocol))
    return out


def summary_from_pb(m: pb.SandboxSummary) -> SandboxSummary:
    return SandboxSummary(id=m.id, state=_state(m.state), labels=dict(m.labels), ip_address=m.ip_address,
                          created_at=float(m.created_at))


def stats_from_pb(m: pb.SandboxStats) -> SandboxStats:
    return SandboxStats(id=m.id, state=_state(m.state), cpu_seconds=m.cpu_seconds, memory_bytes=m.memory_bytes,
                        io_read_bytes=m.io_read_bytes, io_write_bytes=m.io_write_bytes, processes=m.processes,
                        timestamp_ns=m.timestamp, source=m.source)


def event_from_pb(m: pb.SandboxEvent) -> SandboxEvent:
    return SandboxEvent(sandbox_id=m.sandbox_id, action=m.action, timestamp_ns=m.timestamp,
                        attributes=dict(m.attributes), id=m.id)


def created_from_pb(m: pb.CreateSandboxResponse) -> Created:
    return Created(id=m.id, ip_address=m.ip_address, state=m.state)


def output_from_pb(m: pb.RunOutput | pb.ExecOutput) -> Output:
    return Output(stream=m.stream, data=m.data, exit_code=m.exit_code,  # type: ignore[arg-type]
                  timed_out=m.timed_out, done=m.done)


def file_stat_from_pb(m: pb.FileStat) -> FileStat:
    return FileStat(path=m.path, name=m.name, type=m.type, size=m.size, mode=m.mode, uid=m.uid, gid=m.gid,
                    mtime=m.mtime, link_target=m.link_target)


def timeout_to_pb(seconds: float | None) -> int:
    """Seconds → the proto's whole seconds, rounded up (0.5 s must not mean "no timeout")."""
    if not seconds or seconds <= 0:
        return 0
    return min(math.ceil(seconds), 2**32 - 1)


def tty_size_to_pb(size: tuple[int, int] | None) -> pb.TerminalSize | None:
    """(cols, rows) → TerminalSize; None leaves the daemon's default (80x24)."""
    if size is None:
        return None
    cols, rows = size
    return pb.TerminalSize(width=int(cols), height=int(rows))


def exec_request_to_pb(message: type[ExecRequestT], sandbox_id: str, spec: ExecSpec) -> ExecRequestT:
    """The one ExecSpec → RunRequest / ExecRequest / StartRequest conversion. `stdin` goes
    only where the message has it (an Exec stream always carries stdin)."""
    request = message(id=sandbox_id, cmd=spec.cmd, env=spec.env, working_dir=spec.working_dir, user=spec.user,
                      tty=spec.tty, tty_size=tty_size_to_pb(spec.tty_size),
                      timeout_seconds=timeout_to_pb(spec.timeout_seconds))
    if "stdin" in message.DESCRIPTOR.fields_by_name:
        request.stdin = spec.stdin
    return request


def _cidrs(values: Sequence[str] | None, what: str) -> list[str]:
    if values is None:
        return []
    if isinstance(values, (str, bytes)) or not all(isinstance(v, str) for v in values):
        raise InvalidArgument(f"{what} must be a list of CIDR strings, got {values!r}")
    return list(values)


def network_spec_to_pb(mode: str | None, egress: str | None, allow_out: Sequence[str] | None,
                       deny_out: Sequence[str] | None) -> pb.NetworkSpec | None:
    """The Create request's network; None when everything is the daemon's default."""
    allow, deny = _cidrs(allow_out, "allow_out"), _cidrs(deny_out, "deny_out")
    if not (mode or egress or allow or deny):
        return None
    return pb.NetworkSpec(mode=mode or "", egress=egress or "", allow_out=allow, deny_out=deny)


def network_update_to_pb(sandbox_id: str, egress: str | None, allow_out: Sequence[str] | None,
                         deny_out: Sequence[str] | None) -> pb.UpdateNetworkRequest:
    """None keeps that part of the policy; a list (even empty) replaces it."""
    request = pb.UpdateNetworkRequest(id=sandbox_id, egress=egress or "")
    if allow_out is not None:
        request.allow_out.CopyFrom(pb.CidrList(cidrs=_cidrs(allow_out, "allow_out")))
    if deny_out is not None:
        request.deny_out.CopyFrom(pb.CidrList(cidrs=_cidrs(deny_out, "deny_out")))
    return request


def str_map(values: Mapping[str, str] | None) -> dict[str, str]:
    """Copy a str→str mapping, refusing non-strings early with a message naming them."""
    out: dict[str, str] = {}
    for key, value in (values or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument(f"expected strings, got {key!r}: {value!r}")
        out[key] = value
    return out
