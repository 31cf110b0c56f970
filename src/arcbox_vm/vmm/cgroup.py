"""One cgroup (v2) per sandbox, outside the daemon's own cgroup.

Why: a VMM started by the daemon inherits the daemon's cgroup. Under a service manager
(systemd's `KillMode=mixed`) stopping or restarting the daemon then kills every VM in
that cgroup — the opposite of "VMs outlive the daemon". Each VMM is therefore moved into
`<cgroup2 mount>/<parent>/<tag>/<sandbox-id>`, where `<parent>` is `daemon.cgroup_parent`
and `<tag>` names the data dir (as in TAP names), so daemons on different data dirs never
touch each other's cgroups. A sandbox's cgroup also counts every process it owns exactly
and can be killed without racing forks (`cgroup.kill`).

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
    """

    def __init__(self, root: Path | None, mount: Path | None = None,
                 origin: tuple[str, str] | None = None) -> None:
        self.root = root
        self.mount = mount
        self.origin = origin  # (parent, tag) it was opened for, also when that made it "off"

    @classmethod
    def off(cls) -> SandboxCgroups:
        return cls(None)

    @classmethod
    def open(cls, parent: str, tag: str, *, mountinfo: Path = MOUNTINFO,
             self_cgroup: Path = SELF_CGROUP) -> SandboxCgroups:
        """`<cgroup2 mount>/<parent>/<tag>`, or off (with one log line saying why)."""
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
        return cls(root, mount.path, origin)

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

    def sandbox(self, sandbox_id: str) -> SandboxCgroup | None:
        """A handle on one sandbox's cgroup (None when off, or for an id no cgroup can be named after)."""
        if not self.enabled:
            return None
        try:
            return SandboxCgroup(self, check_name(sandbox_id))
        except ValueError as exc:
            log.warning("%s; its VMM stays in the daemon's cgroup", exc)
            return None

    def list(self) -> list[str]:
        """Sandbox ids that have a cgroup under our root."""
        if self.root is None:
            return []
        try:
            return sorted(e.name for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False))
        except OSError:
            return []

    def pids(self, sandbox_id: str) -> list[int]:
        """Every process in the sandbox's cgroup (and cgroups below it)."""
        path = self.path(sandbox_id)
        return _pids(path) if path is not None else []

    def create(self, sandbox_id: str) -> Path | None:
        """mkdir `<root>/<sandbox-id>`; None (logged) if that fails or we are off."""
        path = self.path(sandbox_id)
        if path is None:
            return None
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("cannot create cgroup %s (%s); the VM runs in the daemon's cgroup", path,
                        exc.strerror or exc)
            return None
        return path

    def place(self, sandbox_id: str, pid: int) -> bool:
        """Move `pid` (all its threads) into the sandbox's cgroup. False (logged) if it could
        not be moved: the cgroup is removed again and the VM keeps running where it is."""
        path = self.create(sandbox_id)
        if path is None:
            return False
        try:
            _write(path / "cgroup.procs", str(pid))
            return True
        except OSError as exc:
            log.warning("cannot move pid %d into cgroup %s (%s); it stays in the daemon's cgroup",
                        pid, path, exc.strerror or exc)
        with contextlib.suppress(OSError):
            path.rmdir()
        self._remove_root_if_empty()
        return False

    async def kill(self, sandbox_id: str, timeout: float = KILL_TIMEOUT_S) -> bool:
        """SIGKILL everything in the sandbox's cgroup, wait until it is empty, remove it.

        `cgroup.kill` kills the whole sub-tree atomically (no fork escapes); kernels
        without it get SIGKILL for every listed pid, repeated until none is left. True
        when the cgroup is gone (or never existed)."""
        path = self.path(sandbox_id)
        if path is None or not path.is_dir():
            return True
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
        self._remove_root_if_empty()
        return removed

    def _remove_root_if_empty(self) -> None:
        if self.root is not None:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # ours alone (the tag names our data dir); busy = still used


@dataclass(frozen=True)
class SandboxCgroup:
    """One sandbox's cgroup: what a VMM process keeps to place itself and clean up."""

    cgroups: SandboxCgroups
    sandbox_id: str

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
        return self.cgroups.create(self.sandbox_id) is not None

    def place(self, pid: int) -> bool:
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
