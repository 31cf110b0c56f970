"""QEMU driver settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Not in any distribution's or systemd's ranges (systemd leaves 1879048192-2130706431 unused):
# numeric ids with no passwd entry, one per running sandbox.
DEFAULT_UID_RANGE = "2000000000-2000065535"
SANDBOX_OPTIONS = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to the kernel


def parse_uid_range(text: str) -> tuple[int, int]:
    """"first-last" (inclusive) -> (first, last); raises ValueError naming what is wrong."""
    first, sep, last = text.strip().partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ValueError(f"must look like '2000000000-2000065535' (first-last), got {text!r}")
    lo, hi = int(first), int(last)
    if lo < 1000 or hi > _MAX_ID or lo > hi:
        raise ValueError(f"must lie within 1000-{_MAX_ID} with first <= last (ids below 1000 are system "
                         f"users), got {text!r}")
    return lo, hi


class QemuConfig(BaseModel):
    """How sandboxes are started with QEMU.

    accel "auto" probes KVM (see `arcbox_vm.vmm.kvm`) and falls back to TCG, software
    emulation, which works everywhere but boots in seconds rather than milliseconds.

    sandbox (default on): every QEMU runs as a uid of its own from `uid_range` (gid the
    same number, no supplementary groups), with no capabilities, no-new-privs, in a network
    namespace of its own with nothing in it, and under QEMU's seccomp filter (`-sandbox
    on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny`). It gets its
    disk, console, kernel, initrd and TAP as file descriptors and can reach nothing else of
    the host but its own agent socket. Needs a root daemon and a QEMU built with seccomp:
    without either, boots fail with a message saying so. `sandbox = false` runs QEMU as the
    daemon's own user, unconfined (development, hosts without seccomp) — never silently.
    uid_range: "first-last"; a uid is claimed per running QEMU host-wide (all daemons and
    one-shot runs share the claims), so the range bounds how many run at once.
    """

    model_config = ConfigDict(extra="forbid")

    binary: str = "qemu-system-x86_64"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    machine: Literal["microvm", "q35"] = "microvm"
    tcg_tb_size_mib: int = Field(64, ge=8, le=2048, description="TCG translation cache; dominates idle RSS")
    tsc_khz: int = Field(0, ge=0, description="TSC rate given to TCG guests (they cannot calibrate it); 0 = the "
                                              "host's (a TCG guest's TSC counts at the host's rate: any other "
                                              "value makes its clock run fast or slow)")
    extra_args: list[str] = Field(default_factory=list)
    sandbox: bool = Field(True, description="unprivileged uid per QEMU, seccomp, no-new-privs, no network")
    uid_range: str = Field(DEFAULT_UID_RANGE, description="uids (and gids) QEMU processes run as, one each")

    @field_validator("uid_range")
    @classmethod
    def _uid_range(cls, v: str) -> str:
        parse_uid_range(v)
        return v.strip()

    @property
    def uids(self) -> tuple[int, int]:
        return parse_uid_range(self.uid_range)
