"""Resource limits of a sandbox's cgroup: memory, CPU time, process count.

Every VMM gets
- memory: its guest memory + `[limits] vmm_overhead_mib` (the VMM's own memory, TCG's
  translation cache, buffers) — v2 `memory.max`, v1 `memory.limit_in_bytes`;
- cpu: as much CPU time as it has vCPUs — v2 `cpu.max` "<vcpus × period> <period>", v1
  `cpu.cfs_quota_us` / `cpu.cfs_period_us`;
- pids: `[limits] pids_max` processes and threads — `pids.max` in both.

Where they are written is decided once per manager (`LimitPlan.detect`): in the sandbox's
cgroup2 directory for each controller the cgroup2 hierarchy offers (enabled in the
`cgroup.subtree_control` of every cgroup above it); else, on hybrid hosts whose cgroup2
hierarchy has no controllers, in a per-sandbox v1 cgroup `<controller mount>/<cgroup
parent>/<tag>/<sandbox id>`, created and removed with the cgroup2 one. A controller that
is in neither is logged once and not limited; a limit that cannot be written is logged,
and the VM boots anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from arcbox_vm.vmm.procfs import MOUNTINFO, mounts

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000
MIB = 1 << 20


def _write(path: Path, text: str) -> None:
    """One write(2) of `text` (cgroup files take one value per write)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class CgroupLimits:
    """The limits of one VMM's cgroup."""

    memory_bytes: int
    cpu_quota_us: int
    pids: int
    cpu_period_us: int = CPU_PERIOD_US

    @classmethod
    def for_vm(cls, vcpus: int, memory_mib: int, overhead_mib: int, pids_max: int) -> CgroupLimits:
        return cls(memory_bytes=(memory_mib + overhead_mib) * MIB, cpu_quota_us=vcpus * CPU_PERIOD_US,
                   pids=pids_max)

    def files(self, controller: str, version: int) -> list[tuple[str, str]]:
        """(file, value) to write, in order, for `controller` in a cgroup of `version`."""
        if controller == "memory":
            return [("memory.max" if version == 2 else "memory.limit_in_bytes", str(self.memory_bytes))]
        if controller == "cpu":
            if version == 2:
                return [("cpu.max", f"{self.cpu_quota_us} {self.cpu_period_us}")]
            return [("cpu.cfs_period_us", str(self.cpu_period_us)), ("cpu.cfs_quota_us", str(self.cpu_quota_us))]
        if controller == "pids":
            return [("pids.max", str(self.pids))]
        raise ValueError(f"unknown controller {controller!r}")


def write_limits(path: Path, controllers: tuple[str, ...] | list[str], limits: CgroupLimits, version: int) -> bool:
    """Write `limits` for `controllers` into the cgroup at `path`; False (logged) if one failed."""
    ok = True
    for controller in controllers:
        for name, value in limits.files(controller, version):
            try:
                _write(path / name, value)
            except OSError as exc:
                log.warning("cannot set %s = %s in %s (%s); that limit is not applied", name, value, path,
                            exc.strerror or exc)
                ok = False
    return ok


def _v2_controllers(mount: Path) -> set[str]:
    try:
        return set((mount / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _v1_mounts(mountinfo: Path) -> dict[str, Path]:
    """controller -> mount point of its writable cgroup v1 hierarchy (whole-hierarchy mounts first)."""
    found: dict[str, Path] = {}
    for m in sorted(mounts(mountinfo), key=lambda m: m.root != "/"):
        if m.fstype != "cgroup" or m.read_only:
            continue
        for controller in CONTROLLERS:
            if controller in m.super_options:
                found.setdefault(controller, m.path)
    return found


@dataclass
class LimitPlan:
    """How one manager's sandbox cgroups are limited on this host (see the module docstring).

    `v2`: controllers written in the sandbox's cgroup2 directory; `v1`: controller -> our
    v1 root (`<mount>/<parent>/<tag>`) for the others; `missing`: neither."""

    overhead_mib: int
    pids_max: int
    v2: tuple[str, ...] = ()
    v1: dict[str, Path] = field(default_factory=dict)
    missing: tuple[str, ...] = ()

    @classmethod
    def detect(cls, mount: Path, parent: str, tag: str, *, overhead_mib: int, pids_max: int,
               mountinfo: Path = MOUNTINFO) -> LimitPlan:
        offered = _v2_controllers(mount)
        v2 = tuple(c for c in CONTROLLERS if c in offered)
        v1_mounts = _v1_mounts(mountinfo)
        v1 = {c: v1_mounts[c] / parent / tag for c in CONTROLLERS if c not in v2 and c in v1_mounts}
        missing = tuple(c for c in CONTROLLERS if c not in v2 and c not in v1)
        plan = cls(overhead_mib, pids_max, v2, v1, missing)
        if missing:
            log.warning("VMM cgroup limits: no %s controller in the cgroup2 hierarchy at %s nor a cgroup v1 "
                        "hierarchy for it; VMMs run without that limit", "/".join(missing), mount)
        if v1:
            log.info("VMM cgroup limits: %s in cgroup v1 (%s), %s in cgroup2", "/".join(v1),
                     ", ".join(str(p) for p in v1.values()), "/".join(v2) or "nothing")
        return plan

    def limits_for(self, vcpus: int, memory_mib: int) -> CgroupLimits:
        return CgroupLimits.for_vm(vcpus, memory_mib, self.overhead_mib, self.pids_max)

    # -- cgroup2

    def enable_v2(self, mount: Path, root: Path) -> None:
        """Enable our v2 controllers in `cgroup.subtree_control` of the mount's root and of
        every cgroup down to `root` (so its children, the sandboxes, have them). Done for
        every new sandbox cgroup (`root` comes and goes with them); enabling an enabled
        controller changes nothing. One that cannot be enabled is dropped (logged once)."""
        if not self.v2:
            return
        chain = [mount, *reversed([p for p in root.parents if mount in p.parents]), root]
        failed: set[str] = set()
        for cg in chain:
            for controller in self.v2:
                if controller in failed:
                    continue
                try:
                    _write(cg / "cgroup.subtree_control", f"+{controller}")
                except OSError as exc:
                    log.warning("cannot enable the %s controller in %s (%s); VMMs run without that limit",
                                controller, cg / "cgroup.subtree_control", exc.strerror or exc)
                    failed.add(controller)
        self.v2 = tuple(c for c in self.v2 if c not in failed)

    def write_v2(self, path: Path, limits: CgroupLimits) -> bool:
        return write_limits(path, self.v2, limits, 2)

    # -- cgroup v1 (hybrid hosts)

    def v1_dirs(self, sandbox_id: str) -> dict[str, Path]:
        return {c: root / sandbox_id for c, root in self.v1.items()}

    def create_v1(self, sandbox_id: str, limits: CgroupLimits | None) -> None:
        for controller, path in self.v1_dirs(sandbox_id).items():
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.warning("cannot create cgroup %s (%s); VMMs run without the %s limit", path,
                            exc.strerror or exc, controller)
                continue
            if limits is not None:
                write_limits(path, (controller,), limits, 1)

    def place_v1(self, sandbox_id: str, pid: int) -> None:
        for path in self.v1_dirs(sandbox_id).values():
            if not path.is_dir():
                continue
            try:
                _write(path / "cgroup.procs", str(pid))
            except OSError as exc:
                log.warning("cannot move pid %d into cgroup %s (%s); it runs without that limit", pid, path,
                            exc.strerror or exc)

    def v1_ids(self) -> set[str]:
        ids: set[str] = set()
        for root in self.v1.values():
            with contextlib.suppress(OSError):
                ids.update(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False))
        return ids

    def remove_v1_roots_if_empty(self) -> None:
        for root in self.v1.values():
            with contextlib.suppress(OSError):
                root.rmdir()  # ours alone (the tag names our data dir); busy = still used
