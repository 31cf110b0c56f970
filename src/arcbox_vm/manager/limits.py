"""Admission: a sandbox is created only within `[limits]`.

Counted before anything is made (no record, no lease, no process): how many sandboxes hold
resources, their guest memory together, and the size of what a client may store in a
record (labels, env, boot arguments, port mappings)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from arcbox_vm.config.sections import LimitsConfig
from arcbox_vm.errors import InvalidArgument, ResourceExhausted
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.models import SandboxState

S = SandboxState
HOLDING = (S.STARTING, S.READY, S.RUNNING, S.STOPPING, S.PAUSED)  # states that hold a VM, or are about to


def host_memory_mib() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
    except (ValueError, OSError):
        return 0


def check_sizes(limits: LimitsConfig, sb: SandboxRecord) -> None:
    """One request too big → InvalidArgument."""
    if sb.memory_mib > limits.max_memory_mib_per_sandbox:
        raise InvalidArgument(f"memory_mib {sb.memory_mib} is over this daemon's limit of "
                              f"{limits.max_memory_mib_per_sandbox} MiB per sandbox")
    if sb.vcpus > limits.max_vcpus_per_sandbox:
        raise InvalidArgument(f"vcpus {sb.vcpus} is over this daemon's limit of {limits.max_vcpus_per_sandbox}")
    if len(sb.labels) > limits.max_labels:
        raise InvalidArgument(f"{len(sb.labels)} labels are more than the {limits.max_labels} allowed")
    for k, v in sb.labels.items():
        if len(k.encode()) + len(v.encode()) > limits.max_label_bytes:
            raise InvalidArgument(f"label {k[:40]!r} is longer than {limits.max_label_bytes} bytes")
    if len(sb.env) > limits.max_env_vars:
        raise InvalidArgument(f"{len(sb.env)} env variables are more than the {limits.max_env_vars} allowed")
    if sum(len(k.encode()) + len(v.encode()) + 2 for k, v in sb.env.items()) > limits.max_env_bytes:
        raise InvalidArgument(f"the env is larger than {limits.max_env_bytes} bytes")
    if len(sb.boot_args.encode()) > limits.max_boot_args_bytes:
        raise InvalidArgument(f"boot_args are longer than {limits.max_boot_args_bytes} bytes")
    if len(sb.ports) > limits.max_port_mappings:
        raise InvalidArgument(f"{len(sb.ports)} port mappings are more than the {limits.max_port_mappings} allowed")


def check_room(limits: LimitsConfig, sb: SandboxRecord, others: Iterable[SandboxRecord]) -> None:
    """No room for one more → ResourceExhausted (try again once others are removed)."""
    holding = [o for o in others if o.state in HOLDING and not o.removed and o.id != sb.id]
    if len(holding) + 1 > limits.max_sandboxes:
        raise ResourceExhausted(f"this daemon runs at most {limits.max_sandboxes} sandboxes; remove one first")
    total = limits.max_total_memory_mib or host_memory_mib()
    used = sum(o.memory_mib for o in holding)
    if total and used + sb.memory_mib > total:
        raise ResourceExhausted(f"{sb.memory_mib} MiB more guest memory would exceed this daemon's total of "
                                f"{total} MiB ({used} MiB in use)")
