"""QEMU driver settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class QemuConfig(BaseModel):
    """How sandboxes are started with QEMU.

    accel "auto" probes KVM (see `arcbox_vm.vmm.kvm`) and falls back to TCG, software
    emulation, which works everywhere but boots in seconds rather than milliseconds.
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
