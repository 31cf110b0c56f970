"""One cgroup (v2) per sandbox, outside the daemon's own cgroup.

Why: a VMM started by the daemon inherits the daemon's cgroup. Under a service manager
(systemd's `KillMode=mixed`) stopping or restarting the daemon then kills every VM in
that cgroup — the opposite of "VMs outlive the daemon". Each VMM is therefore moved into
`<cgroup2 mount>/<parent>/<tag>/<sandbox-id>`, where `<parent>` is `daemon.cgroup_parent`
and `<tag>` names the data dir (as in TAP names), so daemons on different data dirs never
touch each other's cgroups. A sandbox's cgroup also counts every process it owns exactly
and can be killed without racing forks (`cgroup.kill`).

Each sandbox cgroup is also where its VMM's memory, CPU and process limits are written
(`cgroup_limits.py`): in the cgroup2 directory where the hierarchy has the controllers,
else in per-sandbox cgroup v1 directories beside it, made and removed together with it.

Nothing here is required for a VM to run: without a writable cgroup2 hierarchy (not
root, read-only, not mounted) this is "off" after one log line, and a failed move leaves
the VM running in the daemon's cgroup. Only plain file operations are used (the daemon
never forks). The path is derived from tag + sandbox id, so nothing is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from arcbox_vm.config.sections import check_cgroup_parent
from arcbox_vm.vmm.cgroup_limits import CgroupLimits, LimitPlan
from arcbox_vm.vmm.procfs import MOUNTINFO, Mount, mounts, pid_alive

log = logging.getLogger(__name__)

SELF_CGROUP = Path("/proc/self/cgroup")
KILL_TIMEOUT_S = 10.0
_POLL_S = 0.02


@dataclass(frozen=True)
class Cgroup2Mount:
    """Where the cgroup2 hierarchy is mounted, and whether it is mounted read-only."""

    path: Path
    read_only: bool = False


def _prefer_whole(found: list[Mount]) -> Mount | None:
    """A mount of the hierarchy's root ("/") over a bind mount of a sub-tree."""
    return next((m for m in found if m.root == "/"), found[0] if found else None)


def find_cgroup2_mount(mountinfo: Path = MOUNTINFO) -> Cgroup2Mount | None:
    """The cgroup2 mount from `mountinfo` (pure v2: /sys/fs/cgroup; hybrid: usually
    /sys/fs/cgroup/unified), never a hard-coded path. A mount of the hierarchy's root
    ("/") is preferred over a bind mount of a sub-tree. None if there is none."""
    mount = _prefer_whole([m for m in mounts(mountinfo) if m.fstype == "cgroup2"])
    return Cgroup2Mount(mount.path, mount.read_only) if mount is not None else None


def find_cgroup1_mount(controller: str, mountinfo: Path = MOUNTINFO) -> Path | None:
    """The mount point of the cgroup v1 hierarchy that has `controller` (e.g. "cpu"), or None."""
    mount = _prefer_whole([m for m in mounts(mountinfo)
                           if m.fstype == "cgroup" and controller in m.super_options])
    return mount.path if mount is not None else None


def own_cgroup(self_cgroup: Path = SELF_CGROUP) -> str | None:
    """This process's cgroup2 path (the `0::` line of /proc/self/cgroup), e.g. "/system.slice/x"."""
    try:
        for line in self_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return None


def check_name(name: str, what: str = "sandbox id") -> str:
    """A single path component we may create under our root (no '/', '.', '..', NUL)."""
    if not name or "/" in name or "\0" in name or name in (".", "..") or name.startswith("cgroup."):
        raise ValueError(f"{what} {name!r} cannot name a cgroup")
    return name


def _write(path: Path, text: str) -> None:
    """One write(2) of `text` (cgroup files take one value per write)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class SandboxCgroups:
    """The sandbox cgroups of one daemon instance, under `root` (None = off).

    Build it with `SandboxCgroups.open(parent, tag)`; `SandboxCgroups.off()` does nothing.
    `root` itself is created with the first sandbox cgroup and removed with the last.
    With `limits` (a `LimitPlan`) each sandbox cgroup made for a VM of known size gets its
    memory, CPU and pids limits.
    """

    def __init__(self, root: Path | None, mount: Path | None = None,
                 origin: tuple[str, str] | None = None, limits: LimitPlan | None = None) -> None:
        self.root = root
        self.mount = mount
        self.origin = origin  # (parent, tag) it was opened for, also when that made it "off"
        self.limits = limits if root is not None else None

    @classmethod
    def off(cls) -> SandboxCgroups:
        return cls(None)

    @classmethod
    def open(cls, parent: str, tag: str, *, mountinfo: Path = MOUNTINFO, self_cgroup: Path = SELF_CGROUP,
             vmm_overhead_mib: int | None = None, pids_max: int | None = None) -> SandboxCgroups:
        """`<cgroup2 mount>/<parent>/<tag>`, or off (with one log line saying why). With
        `vmm_overhead_mib` and `pids_max` (`[limits]`) VMM cgroups get limits."""
        origin = (parent, tag)
        if not parent:
            log.info("per-sandbox cgroups are off (daemon.cgroup_parent is empty)")
            return cls(None, origin=origin)
        check_cgroup_parent(parent)
        check_name(tag, "tag")
        mount = find_cgroup2_mount(mountinfo)
        why = ""
        if mount is None:
            why = "no cgroup2 hierarchy is mounted"
        elif mount.read_only:
            why = f"the cgroup2 hierarchy at {mount.path} is mounted read-only"
        if why:
            return cls._off_because(why, origin)
        assert mount is not None
        root = mount.path / parent / tag
        mine = own_cgroup(self_cgroup)
        if mine is not None:
            own = mount.path / mine.lstrip("/")
            if own == root or root in own.parents:
                return cls._off_because(f"the daemon itself runs inside {root}", origin)
            if own != mount.path and own in root.parents:
                log.warning("%s is inside the daemon's own cgroup %s: stopping the daemon's service would "
                            "kill the VMs; set daemon.cgroup_parent to a path outside it", root, own)
        existed = root.is_dir()
        try:  # proves we may create cgroups there; an empty root is not left behind
            root.mkdir(parents=True, exist_ok=True)
            if not existed:
                root.rmdir()
        except OSError as exc:
            return cls._off_because(f"cannot create {root}: {exc.strerror or exc}", origin)
        plan = None
        if vmm_overhead_mib is not None and pids_max is not None:
            plan = LimitPlan.detect(mount.path, parent, tag, overhead_mib=vmm_overhead_mib, pids_max=pids_max,
                                    mountinfo=mountinfo)
        return cls(root, mount.path, origin, plan)

    @classmethod
    def _off_because(cls, why: str, origin: tuple[str, str]) -> SandboxCgroups:
        log.warning("per-sandbox cgroups are off: %s; VMM processes stay in the daemon's cgroup "
                    "(a service manager that stops the daemon may kill them)", why)
        return cls(None, origin=origin)

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def path(self, sandbox_id: str) -> Path | None:
        """`<root>/<sandbox-id>` (None when off)."""
        return self.root / check_name(sandbox_id) if self.root is not None else None

    def relative(self, sandbox_id: str) -> str | None:
        """The sandbox's cgroup relative to the cgroup2 mount (e.g. for the jailer's --parent-cgroup)."""
        path = self.path(sandbox_id)
        if path is None or self.mount is None:
            return None
        return str(PurePosixPath(path.relative_to(self.mount)))

    def sandbox(self, sandbox_id: str, *, vcpus: int | None = None,
                memory_mib: int | None = None) -> SandboxCgroup | None:
        """A handle on one sandbox's cgroup (None when off, or for an id no cgroup can be
        named after); with the VM's size it carries the limits its cgroup is made with."""
        if not self.enabled:
            return None
        try:
            name = check_name(sandbox_id)
        except ValueError as exc:
            log.warning("%s; its VMM stays in the daemon's cgroup", exc)
            return None
        limits = None
        if self.limits is not None and vcpus is not None and memory_mib is not None:
            limits = self.limits.limits_for(vcpus, memory_mib)
        return SandboxCgroup(self, name, limits)

    def list(self) -> list[str]:
        """Sandbox ids that have a cgroup under our root (cgroup2 or one of our v1 roots)."""
        if self.root is None:
            return []
        ids: set[str] = set()
        with contextlib.suppress(OSError):
            ids.update(e.name for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False))
        if self.limits is not None:
            ids |= self.limits.v1_ids()
        return sorted(ids)

    def _v1_dirs(self, sandbox_id: str) -> list[Path]:
        return list(self.limits.v1_dirs(check_name(sandbox_id)).values()) if self.limits is not None else []

    def pids(self, sandbox_id: str) -> list[int]:
        """Every process in the sandbox's cgroup (and cgroups below it), v1 ones included."""
        path = self.path(sandbox_id)
        if path is None:
            return []
        found = _pids(path)
        for extra in self._v1_dirs(sandbox_id):
            found += [pid for pid in _pids(extra) if pid not in found]
        return found

    def create(self, sandbox_id: str, limits: CgroupLimits | None = None) -> Path | None:
        """mkdir `<root>/<sandbox-id>` (and its v1 companions), `limits` written if given;
        None (logged) if that fails or we are off. A limit that cannot be set is only logged."""
        path = self.path(sandbox_id)
        if path is None:
            return None
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("cannot create cgroup %s (%s); the VM runs in the daemon's cgroup", path,
                        exc.strerror or exc)
            return None
        if self.limits is not None:
            if limits is not None:
                assert self.mount is not None and self.root is not None
                self.limits.enable_v2(self.mount, self.root)
                self.limits.write_v2(path, limits)
            self.limits.create_v1(sandbox_id, limits)
        return path

    def place(self, sandbox_id: str, pid: int, limits: CgroupLimits | None = None) -> bool:
        """Move `pid` (all its threads) into the sandbox's cgroup(s), made with `limits` if
        new. False (logged) if it could not be moved: the cgroups are removed again and the
        VM keeps running where it is."""
        path = self.create(sandbox_id, limits)
        if path is None:
            return False
        try:
            _write(path / "cgroup.procs", str(pid))
            if self.limits is not None:
                self.limits.place_v1(sandbox_id, pid)
            return True
        except OSError as exc:
            log.warning("cannot move pid %d into cgroup %s (%s); it stays in the daemon's cgroup",
                        pid, path, exc.strerror or exc)
        for cg in (path, *self._v1_dirs(sandbox_id)):
            with contextlib.suppress(OSError):
                cg.rmdir()
        self._remove_root_if_empty()
        return False

    async def kill(self, sandbox_id: str, timeout: float = KILL_TIMEOUT_S) -> bool:
        """SIGKILL everything in the sandbox's cgroup, wait until it is empty, remove it.

        `cgroup.kill` kills the whole sub-tree atomically (no fork escapes); kernels
        without it get SIGKILL for every listed pid, repeated until none is left. True
        when the cgroup is gone (or never existed)."""
        path = self.path(sandbox_id)
        if path is None:
            return True
        v1 = [d for d in self._v1_dirs(sandbox_id) if d.is_dir()]
        if not path.is_dir():
            return await self._kill_v1(v1, timeout) if v1 else True
        if os.getpid() in _pids(path):  # never: the daemon is checked at open; never kill ourselves
            log.error("refusing to kill cgroup %s: the daemon itself is in it", path)
            return False
        kill_file = path / "cgroup.kill"
        has_kill_file = _has_kill_file(path)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            if has_kill_file:
                _write(kill_file, "1")  # the kernel also kills what is forked meanwhile
        except OSError as exc:
            log.warning("writing %s failed (%s); killing its processes one by one", kill_file, exc.strerror or exc)
            has_kill_file = False
        while _populated(path):
            if not has_kill_file:
                _sigkill_all(path)
            if loop.time() >= deadline:
                log.warning("cgroup %s still has processes %s %.0fs after SIGKILL", path, _pids(path), timeout)
                return False
            await asyncio.sleep(_POLL_S)
        removed = _rmdir_tree(path)
        if v1:  # the same processes: gone now, so only the directories are left
            removed = await self._kill_v1(v1, max(0.5, deadline - loop.time())) and removed
        self._remove_root_if_empty()
        return removed

    async def _kill_v1(self, dirs: list[Path], timeout: float) -> bool:
        """SIGKILL what is in our v1 cgroups of one sandbox (no cgroup.kill there) and remove them."""
        if os.getpid() in [pid for d in dirs for pid in _pids(d)]:
            log.error("refusing to kill cgroups %s: the daemon itself is in one", dirs)
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ok = True
        for d in dirs:
            while any(pid_alive(pid) for pid in _pids(d)):
                _sigkill_all(d)
                if loop.time() >= deadline:
                    log.warning("cgroup %s still has processes %s after SIGKILL", d, _pids(d))
                    return False
                await asyncio.sleep(_POLL_S)
            ok = _rmdir_tree(d) and ok
        self._remove_root_if_empty()
        return ok

    def _remove_root_if_empty(self) -> None:
        if self.root is not None:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # ours alone (the tag names our data dir); busy = still used
        if self.limits is not None:
            self.limits.remove_v1_roots_if_empty()


@dataclass(frozen=True)
class SandboxCgroup:
    """One sandbox's cgroup: what a VMM process keeps to place itself and clean up."""

    cgroups: SandboxCgroups
    sandbox_id: str
    limits: CgroupLimits | None = None  # written when the cgroup is made

    @property
    def path(self) -> Path:
        path = self.cgroups.path(self.sandbox_id)
        assert path is not None
        return path

    @property
    def relative(self) -> str:
        rel = self.cgroups.relative(self.sandbox_id)
        assert rel is not None
        return rel

    def create(self) -> bool:
        return self.cgroups.create(self.sandbox_id, self.limits) is not None

    def place(self, pid: int) -> bool:
        if self.limits is not None:
            self.cgroups.create(self.sandbox_id, self.limits)  # new: made with its limits
        return self.cgroups.place(self.sandbox_id, pid)

    def pids(self) -> list[int]:
        return self.cgroups.pids(self.sandbox_id)

    async def remove(self) -> bool:
        """Kill whatever is left in the cgroup and remove it (after the VMM is gone)."""
        return await self.cgroups.kill(self.sandbox_id)


def _subtree(path: Path) -> list[Path]:
    """`path` and the cgroups below it, deepest first (the order rmdir needs)."""
    return [Path(dirpath) for dirpath, _dirs, _files in os.walk(path, topdown=False)]


def _has_kill_file(path: Path) -> bool:
    """cgroup.kill exists since Linux 5.14."""
    return (path / "cgroup.kill").exists()


def _pids(path: Path) -> list[int]:
    pids: list[int] = []
    for cg in _subtree(path):
        try:
            text = (cg / "cgroup.procs").read_text()
        except OSError:
            continue
        pids += [int(p) for p in text.split() if p.isdigit()]
    return pids


def _sigkill_all(path: Path) -> None:
    for pid in _pids(path):
        if pid == os.getpid():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _populated(path: Path) -> bool:
    """cgroup.events says whether any live process is in the sub-tree (zombies are not)."""
    try:
        for line in (path / "cgroup.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "populated":
                return value.strip() != "0"
    except FileNotFoundError:
        if not path.exists():
            return False
    except OSError:
        pass
    return any(pid_alive(pid) for pid in _pids(path))


def _rmdir_tree(path: Path) -> bool:
    ok = True
    for cg in _subtree(path):
        try:
            cg.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove cgroup %s: %s", cg, exc.strerror or exc)
            ok = False
    return ok
