"""The manager's record of one sandbox (internal; `SandboxInfo` is the public snapshot)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arcbox_vm.manager.boot import BootedVm
from arcbox_vm.models import PortMapping, SandboxInfo, SandboxNetworkInfo, SandboxState, SandboxSummary
from arcbox_vm.ports.network import EgressPolicy, NetworkLease


@dataclass
class SandboxRecord:
    id: str
    labels: dict[str, str]
    vcpus: int
    memory_mib: int
    kernel: str
    rootfs: str
    initrd: str
    boot_args: str
    env: dict[str, str]
    working_dir: str
    user: str
    ttl_seconds: int
    network_mode: str
    workdir: Path
    state: SandboxState = SandboxState.STARTING
    created_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    last_exited_at: float | None = None
    last_exit_code: int | None = None
    error: str | None = None
    lease: NetworkLease | None = None
    egress: EgressPolicy | None = None  # tap mode; None = the configured default (records of older versions)
    vm: BootedVm | None = None
    vmm: str = ""
    active_execs: int = 0
    # exec id -> live ExecStream (manager/execs.py); weak: a stream its caller dropped must
    # still be collected (its __del__ kills the command)
    streams: weakref.WeakValueDictionary[int, Any] = field(default_factory=weakref.WeakValueDictionary)
    held: dict[int, Any] = field(default_factory=dict)  # exec id -> HeldExec (manager/background.py)
    tasks: dict[str, asyncio.Task] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    removed: bool = False
    detaching: bool = False  # streams that end now leave their commands running (e.g. pause to disk)
    paused_process: Any = None  # a paused VMM adopted after a restart, before resume re-attaches it
    removing: bool = False  # persisted: a restart finishes a half-done removal
    pid: int | None = None
    pid_start: int | None = None
    source: str = "cold"  # how its VM was made (observers, metrics): cold boot; later restore, pool
    ports: list[PortMapping] = field(default_factory=list)  # persisted with the host ports chosen
    forwards: Any = None  # its listeners and forwarded connections (manager/ports.py)
    # snapshot facts (persisted as JSON in `extra`): the checkpoint whose memory file this
    # VM maps (None once it does not); the name its VM was launched under (directories,
    # cgroup: differs from `id` for a warm-pool VM handed out); pause bookkeeping
    restored_from: str | None = None
    vm_name: str = ""
    paused_at: float | None = None
    paused_total: float = 0.0
    suspended: bool = False  # paused to disk: no VMM, its state in <workdir>/suspend
    pool: bool = False  # a warm-pool VM not handed out yet (not listed)
    booted_kernel: str = ""  # the kernel and initrd the VM really runs (resolved at boot)
    booted_initrd: str = ""
    on_ttl: str = "remove"  # what the TTL does: "remove", or "pause" (to disk)

    _SPEC_FIELDS = ("labels", "vcpus", "memory_mib", "kernel", "rootfs", "initrd", "boot_args", "env",
                    "working_dir", "user", "ttl_seconds", "network_mode")
    _EXTRA_FIELDS = ("restored_from", "vm_name", "paused_at", "paused_total", "suspended", "pool", "booted_kernel",
                     "booted_initrd", "source", "on_ttl")

    @property
    def launch_name(self) -> str:
        """The name the VMM was started under (its cgroup's)."""
        return self.vm_name or self.id

    def ttl_deadline(self) -> float | None:
        """When the TTL removes it (time spent paused does not count), None without a TTL."""
        if self.ttl_seconds <= 0 or self.ready_at is None:
            return None
        paused = self.paused_total + ((time.time() - self.paused_at) if self.paused_at is not None else 0.0)
        return self.ready_at + self.ttl_seconds + paused

    def to_row(self) -> dict:
        """The persisted form (see storage/state.py)."""
        lease = None
        if self.lease is not None:
            lease = json.dumps({**self.lease.__dict__, "boot_args": list(self.lease.boot_args)})
        return {
            "id": self.id, "state": self.state.value,
            "spec": json.dumps({**{k: getattr(self, k) for k in self._SPEC_FIELDS},
                                "egress": self.egress.to_json() if self.egress is not None else None,
                                "ports": [dataclasses.asdict(m) for m in self.ports]}),
            "workdir": str(self.workdir), "vmm": self.vmm, "pid": self.pid, "pid_start": self.pid_start,
            "lease": lease, "created_at": self.created_at, "ready_at": self.ready_at,
            "last_exited_at": self.last_exited_at, "last_exit_code": self.last_exit_code, "error": self.error,
            "removing": self.removing,
            "extra": json.dumps({k: getattr(self, k) for k in self._EXTRA_FIELDS}),
        }

    @classmethod
    def from_row(cls, row: dict) -> "SandboxRecord":
        spec = json.loads(row["spec"])
        rec = cls(id=row["id"], workdir=Path(row["workdir"]), **{k: spec[k] for k in cls._SPEC_FIELDS})
        rec.state = SandboxState(row["state"])
        if spec.get("egress"):
            rec.egress = EgressPolicy.from_json(spec["egress"])
        rec.ports = [PortMapping(**m) for m in spec.get("ports", [])]
        rec.vmm = row["vmm"] or ""
        rec.pid, rec.pid_start = row["pid"], row["pid_start"]
        if row["lease"]:
            data = json.loads(row["lease"])
            data["boot_args"] = tuple(data["boot_args"])
            rec.lease = NetworkLease(**data)
        rec.created_at, rec.ready_at = row["created_at"], row["ready_at"]
        rec.last_exited_at, rec.last_exit_code, rec.error = row["last_exited_at"], row["last_exit_code"], row["error"]
        rec.removing = bool(row["removing"])
        extra = json.loads(row.get("extra") or "{}")
        for k in cls._EXTRA_FIELDS:
            if k in extra:
                setattr(rec, k, extra[k])
        return rec

    def info(self) -> SandboxInfo:
        pol = self.egress
        net = (SandboxNetworkInfo(self.lease.ip, self.lease.gateway, self.lease.tap_name,
                                  pol.egress if pol else "", pol.allow_out if pol else (), pol.deny_out if pol else ())
               if self.lease is not None else None)
        pid = self.vm.process.pid if self.vm is not None and self.vm.process.returncode is None else None
        return SandboxInfo(
            id=self.id, state=self.state, labels=dict(self.labels), vcpus=self.vcpus,
            memory_mib=self.memory_mib, network=net, created_at=self.created_at, ready_at=self.ready_at,
            last_exited_at=self.last_exited_at, last_exit_code=self.last_exit_code, error=self.error,
            vmm=self.vmm, pid=pid, ttl_seconds=self.ttl_seconds, ports=tuple(self.ports),
            ttl_deadline=self.ttl_deadline(), on_ttl=self.on_ttl,
        )

    def summary(self) -> SandboxSummary:
        return SandboxSummary(self.id, self.state, dict(self.labels),
                              self.lease.ip if self.lease else "", self.created_at)
