"""Starting and tracking the Firecracker process (directly or under the jailer).

* `Layout` says where every file of one VM lives, both as a host path and as the path
  Firecracker sees (identical in direct mode; relative to the jail root in jailer mode).
* `firecracker_argv` / `jailer_argv` turn a `FirecrackerConfig` into the exact command line.
* `stage_file` puts kernel/initrd/rootfs into a jail by hard link (copy across filesystems).
* `start` spawns the process with stdout+stderr (the guest serial console) in a per-VM file,
  and `wait_for_api_socket` polls for the API socket, failing fast if the process died.
* `ProcessHandle` tracks the VMM whether it is our child or (jailer `--new-pid-ns`) not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from arcbox_vm.errors import BootFailed, VmmError

from arcbox_vm.config.firecracker import DEFAULT_CHROOT_BASE_DIR, FirecrackerConfig

SOCKET_POLL_INTERVAL = 0.02  # seconds between API-socket probes (Firecracker needs ~12 ms)
MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the terminating NUL
JAIL_API_SOCKET = "/run/firecracker.socket"

# File names inside the per-VM workdir (direct mode) or the jail root (jailer mode).
API_SOCKET_NAME = "fc.sock"
VSOCK_NAME = "v.sock"  # the agent endpoint is <this>_<port>
LOG_NAME = "firecracker.log"
METRICS_NAME = "firecracker.metrics"
CONSOLE_NAME = "console.log"
JAIL_KERNEL = "vmlinux"
JAIL_INITRD = "initrd"
JAIL_ROOTFS = "rootfs"
JAIL_SECCOMP = "seccomp-filter.bpf"

_ID_BAD = re.compile(r"[^A-Za-z0-9-]+")


def instance_id(name: str) -> str:
    """A Firecracker `--id` (`[A-Za-z0-9-]{1,64}`) derived from a sandbox id."""
    cleaned = _ID_BAD.sub("-", name).strip("-")[:64].strip("-")
    return cleaned or "vm"


def jail_id(workdir: Path) -> str:
    """The jail id of a workdir: readable (its name) and unique (hash of its absolute path).

    It is a pure function of the workdir so `agent_endpoint(workdir)` (called before launch)
    and `launch` agree on where the jail is.
    """
    digest = hashlib.sha256(str(Path(workdir).absolute()).encode()).hexdigest()[:8]
    base = instance_id(Path(workdir).name)[:55].strip("-") or "vm"
    return f"{base}-{digest}"


def resolve_binary(binary: Path | str, what: str = "firecracker") -> Path:
    """An absolute path for `binary` (PATH lookup for a bare name); raises VmmError if missing."""
    binary = Path(binary)
    if binary.parent == Path("."):
        found = shutil.which(str(binary))
        if found is None:
            raise VmmError(f"{what} binary '{binary}' was not found on PATH; install it or give its full path")
        return Path(found).absolute()
    if not binary.exists():
        raise VmmError(f"{what} binary {binary} does not exist; install it or fix the configured path")
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise VmmError(f"{what} binary {binary} is not an executable file")
    return binary.absolute()


@dataclass(frozen=True)
class Layout:
    """Where one VM's files live. `fc_path()` maps a host path to Firecracker's view."""

    workdir: Path
    api_socket: Path
    vsock_uds: Path
    log: Path
    metrics: Path
    console_log: Path
    jail_root: Path | None = None  # <chroot_base>/<exec name>/<id>/root (jailer mode)
    jail_id: str | None = None

    @property
    def jailed(self) -> bool:
        return self.jail_root is not None

    @property
    def jail_dir(self) -> Path | None:
        """`<chroot_base>/<exec name>/<id>`: the directory to delete after the VM is gone."""
        return self.jail_root.parent if self.jail_root is not None else None

    def fc_path(self, host_path: Path) -> str:
        """The path Firecracker must be given for `host_path` (jail-relative in jailer mode)."""
        if self.jail_root is None:
            return str(host_path)
        try:
            rel = Path(host_path).relative_to(self.jail_root)
        except ValueError:
            raise VmmError(
                f"{host_path} is outside the jail {self.jail_root}; Firecracker under the jailer "
                "only sees files inside its jail"
            ) from None
        return "/" + str(rel)

    def jail_file(self, name: str) -> Path:
        assert self.jail_root is not None
        return self.jail_root / name


def layout_for(config: FirecrackerConfig, workdir: Path, files_dir: Path | None = None) -> Layout:
    """The file layout of the VM whose socket directory is `workdir`.

    `workdir` holds the sockets (and names the jail); it is kept short because a Unix
    socket path is limited to 107 bytes. Logs and the console go to `files_dir`
    (default: `workdir`), the VM's persistent directory.
    """
    workdir = Path(workdir).absolute()
    files = Path(files_dir).absolute() if files_dir is not None else workdir
    console = files / CONSOLE_NAME
    if config.jailer is None:
        layout = Layout(
            workdir=workdir,
            api_socket=workdir / API_SOCKET_NAME,
            vsock_uds=workdir / VSOCK_NAME,
            log=files / LOG_NAME,
            metrics=files / METRICS_NAME,
            console_log=console,
        )
    else:
        exec_name = _exec_file_name(config.binary)
        base = config.jailer.chroot_base_dir
        with contextlib.suppress(OSError):
            base = base.resolve()  # the jailer canonicalizes --chroot-base-dir too
        jid = jail_id(workdir)
        root = base / exec_name / jid / "root"
        layout = Layout(
            workdir=workdir,
            api_socket=root / JAIL_API_SOCKET.lstrip("/"),
            vsock_uds=root / VSOCK_NAME,
            log=root / LOG_NAME,
            metrics=root / METRICS_NAME,
            console_log=console,
            jail_root=root,
            jail_id=jid,
        )
    for name, path in (("API socket", layout.api_socket), ("vsock socket", layout.vsock_uds)):
        check_socket_path(name, path, reserve=len("_4294967295") if path == layout.vsock_uds else 0)
    return layout


def _exec_file_name(binary: Path) -> str:
    """The name the jailer uses for the chroot: the basename of the *canonical* exec file."""
    path = Path(binary)
    if path.parent == Path("."):
        found = shutil.which(str(path))
        path = Path(found) if found else path
    with contextlib.suppress(OSError):
        path = path.resolve()
    return path.name


def check_socket_path(what: str, path: Path, reserve: int = 0) -> None:
    if len(os.fsencode(str(path))) + reserve > MAX_UNIX_PATH:
        raise VmmError(
            f"the {what} path {path} is too long for a Unix socket ({MAX_UNIX_PATH} bytes max"
            f"{', including the _<port> suffix' if reserve else ''}); use a shorter workdir or chroot_base_dir"
        )


# --------------------------------------------------------------------------- command lines


def firecracker_options(config: FirecrackerConfig, *, log_path: str | None, seccomp_filter: str | None) -> list[str]:
    """Firecracker flags that come from the config (shared by direct and jailer mode)."""
    args: list[str] = []
    if log_path is not None:
        args += ["--log-path", log_path]
    if config.log_level is not None:
        args += ["--level", config.log_level]
    if config.no_seccomp:
        args.append("--no-seccomp")
    elif seccomp_filter is not None:
        args += ["--seccomp-filter", seccomp_filter]
    if config.http_api_max_payload_size is not None:
        args += ["--http-api-max-payload-size", str(config.http_api_max_payload_size)]
    if config.mmds_size_limit is not None:
        args += ["--mmds-size-limit", str(config.mmds_size_limit)]
    return args


def firecracker_argv(
    config: FirecrackerConfig, layout: Layout, vm_id: str, binary: Path | None = None, netns_name: str = ""
) -> list[str]:
    """`firecracker --api-sock S --id ID --log-path L [--level] [--no-seccomp|--seccomp-filter] ...`.

    With `netns_name` the command is prefixed so it runs in that named network namespace
    (`ip netns exec <name>`, which execs in place: the pid stays Firecracker's).
    """
    seccomp = str(config.seccomp_filter) if config.seccomp_filter is not None else None
    prefix: list[str] = []
    if netns_name:
        from arcbox_vm.network.netns import exec_prefix  # shared with the QEMU driver

        prefix = exec_prefix(netns_name)
    return [
        *prefix,
        str(binary or config.binary),
        "--api-sock",
        str(layout.api_socket),
        "--id",
        vm_id,
        *firecracker_options(config, log_path=str(layout.log), seccomp_filter=seccomp),
    ]


NETNS_DIR = Path("/run/netns")  # where `ip netns` binds named namespaces


def jailer_netns(config: FirecrackerConfig, netns_name: str = "") -> Path | None:
    """The `--netns` path: the spec's named namespace, else `jailer.netns`; both must agree."""
    configured = config.jailer.netns if config.jailer is not None else None
    if not netns_name:
        return configured
    wanted = NETNS_DIR / netns_name
    if configured is not None and configured != wanted:
        raise VmmError(
            f"the VM must run in network namespace '{netns_name}' ({wanted}) but firecracker.jailer.netns "
            f"is {configured}; unset firecracker.jailer.netns or make them agree"
        )
    return wanted


def jailer_argv(
    config: FirecrackerConfig,
    layout: Layout,
    *,
    jailer_binary: Path | None = None,
    firecracker_binary: Path | None = None,
    netns_name: str = "",
    join_cgroup: str | None = None,
) -> list[str]:
    """`jailer --id --exec-file --uid --gid [opts] -- --api-sock /run/firecracker.socket [fc opts]`.

    The jailer passes `--id` to Firecracker itself, so it is not repeated after `--`
    (Firecracker rejects duplicate arguments). `netns_name` (a named namespace, from
    `MachineSpec.netns`) becomes `--netns /run/netns/<name>`. `join_cgroup` (the sandbox's
    cgroup, relative to the cgroup2 mount; only when the jailer config sets no cgroups of
    its own) becomes `--cgroup-version 2 --parent-cgroup <it>`: with no `--cgroup` values the
    jailer then moves itself into that existing cgroup before it starts Firecracker.
    """
    jailer = config.jailer
    assert jailer is not None and layout.jail_id is not None
    argv = [
        str(jailer_binary or jailer.binary),
        "--id",
        layout.jail_id,
        "--exec-file",
        str(firecracker_binary or config.binary),
        "--uid",
        str(jailer.uid),
        "--gid",
        str(jailer.gid),
    ]
    if jailer.chroot_base_dir != DEFAULT_CHROOT_BASE_DIR:
        argv += ["--chroot-base-dir", str(jailer.chroot_base_dir)]
    netns = jailer_netns(config, netns_name)
    if netns is not None:
        argv += ["--netns", str(netns)]
    if jailer.new_pid_ns:
        argv.append("--new-pid-ns")
    if join_cgroup is not None:
        if jailer_sets_cgroups(config):
            raise VmmError("firecracker.jailer sets its own cgroups; the jailer cannot also join the sandbox's")
        argv += ["--cgroup-version", "2", "--parent-cgroup", join_cgroup]
    if jailer.cgroup_version is not None:
        argv += ["--cgroup-version", jailer.cgroup_version]
    if jailer.parent_cgroup is not None:
        argv += ["--parent-cgroup", jailer.parent_cgroup]
    for cg in jailer.cgroups:
        argv += ["--cgroup", cg]
    for limit in jailer.resource_limits:
        argv += ["--resource-limit", limit]
    seccomp = "/" + JAIL_SECCOMP if config.seccomp_filter is not None else None
    argv += [
        "--",
        "--api-sock",
        JAIL_API_SOCKET,
        *firecracker_options(config, log_path=layout.fc_path(layout.log), seccomp_filter=seccomp),
    ]
    return argv


# --------------------------------------------------------------------------- files


def unlink_quiet(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def stage_file(src: Path, dst: Path, *, uid: int, gid: int, writable: bool) -> str:
    """Make `src` available at `dst` inside a jail; returns "link" or "copy".

    Hard link when possible (same filesystem), else copy. A writable file (the VM's own
    rootfs) is chowned to the jailed uid:gid. A read-only file that the jailed user could
    not read through a link (not world-readable) is copied and the copy chowned instead, so
    shared image files never change owner.
    """
    unlink_quiet(dst)
    mode = os.stat(src).st_mode
    readable_by_all = bool(mode & 0o004)
    how = "copy"
    if writable or readable_by_all:
        try:
            os.link(src, dst)
            how = "link"
        except OSError:
            how = "copy"
    if how == "copy":
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o600 if writable else 0o400)
    if writable or how == "copy":
        os.chown(dst, uid, gid)
    return how


def create_empty_file(path: Path, uid: int | None = None, gid: int | None = None) -> None:
    """Create (or truncate) a file Firecracker will write to (log, metrics)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    os.close(fd)
    if uid is not None and gid is not None:
        os.chown(path, uid, gid)


def tail(path: Path | None, lines: int = 15, max_bytes: int = 16384) -> str:
    """The last lines of a (log) file, or "" if it cannot be read."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").strip()
    return "\n".join(text.splitlines()[-lines:])


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def diagnostics(log: Path | None, console: Path | None) -> str:
    parts = []
    log_tail = tail(log)
    if log_tail:
        parts.append(f"last lines of the Firecracker log ({log}):\n{log_tail}")
    console_tail = tail(console)
    if console_tail:
        parts.append(f"last lines of its stdout/stderr ({console}):\n{console_tail}")
    return ("\n" + "\n".join(parts)) if parts else ""


def jailer_sets_cgroups(config: FirecrackerConfig) -> bool:
    """Whether `firecracker.jailer` places Firecracker in cgroups of its own choosing (then
    the sandbox cgroups of `daemon.cgroup_parent` are not used for it: its limits live there)."""
    jailer = config.jailer
    return jailer is not None and (jailer.cgroup_version is not None or jailer.parent_cgroup is not None
                                   or bool(jailer.cgroups))


def cgroup_dirs(config: FirecrackerConfig, jid: str, mounts_file: Path = Path("/proc/mounts")) -> list[Path]:
    """The per-VM cgroup directories the jailer creates (only when `--cgroup` values are given)."""
    jailer = config.jailer
    if jailer is None or not jailer.cgroups:
        return []
    parent = jailer.parent_cgroup or _exec_file_name(config.binary)
    version = jailer.cgroup_version or "1"
    dirs: list[Path] = []
    try:
        mounts = mounts_file.read_text().splitlines()
    except OSError:
        return []
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mountpoint, fstype = fields[1], fields[2]
        if (version == "2" and fstype == "cgroup2") or (version == "1" and fstype == "cgroup"):
            dirs.append(Path(mountpoint) / parent / jid)
    return dirs


# --------------------------------------------------------------------------- processes


@dataclass
class ProcessHandle:
    """The VMM process: our child (asyncio) or, under `--new-pid-ns`, a pid we can only watch."""

    pid: int
    child: asyncio.subprocess.Process | None = None
    exit_hint: Callable[[], int | None] | None = None  # how to learn a non-child's exit status
    _returncode: int | None = None
    _exited: asyncio.Event = field(default_factory=asyncio.Event)
    _killed: bool = False
    _watch_task: asyncio.Task | None = None

    @property
    def returncode(self) -> int | None:
        if self.child is not None:
            return self.child.returncode
        if self._returncode is None and not _pid_alive(self.pid):
            self._set_exited()
        return self._returncode

    def _set_exited(self) -> None:
        if self._returncode is None:
            hinted = self.exit_hint() if self.exit_hint else None
            self._returncode = -signal.SIGKILL if self._killed else (hinted if hinted is not None else -1)
        self._exited.set()

    async def wait(self) -> int:
        if self.child is not None:
            return await self.child.wait()
        if self._watch_task is None:
            self._watch_task = asyncio.ensure_future(self._watch())
        await self._exited.wait()
        assert self._returncode is not None
        return self._returncode

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        pidfd = None
        with contextlib.suppress(OSError, AttributeError):
            pidfd = os.pidfd_open(self.pid)  # type: ignore[attr-defined]
        try:
            if pidfd is not None:
                done = asyncio.Event()
                loop.add_reader(pidfd, done.set)
                try:
                    if _pid_alive(self.pid):
                        await done.wait()
                finally:
                    loop.remove_reader(pidfd)
            else:
                while _pid_alive(self.pid):
                    await asyncio.sleep(0.05)
        finally:
            if pidfd is not None:
                os.close(pidfd)
        self._set_exited()

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            return
        if sig == signal.SIGKILL:
            self._killed = True
        with contextlib.suppress(ProcessLookupError):
            if self.child is not None:
                self.child.send_signal(sig)
            else:
                os.kill(self.pid, sig)

    async def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL and wait until the process is gone."""
        self.send_signal(signal.SIGKILL)
        try:
            await asyncio.wait_for(self.wait(), timeout)
        except TimeoutError:
            raise VmmError(f"Firecracker process {self.pid} did not exit within {timeout}s of SIGKILL") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still "exists" for kill(0)
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"
    except OSError:
        return False


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


async def start(argv: list[str], console_log: Path, *, die_with_parent: bool = False) -> asyncio.subprocess.Process:
    """Spawn `argv` with stdin from /dev/null and stdout+stderr written to `console_log`.

    `die_with_parent` asks the kernel to SIGKILL the process when we die (the jailer's
    privilege drop clears this, so under the jailer it only covers the jailer itself).
    """
    fd = os.open(console_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o640)
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,  # a Ctrl-C aimed at the manager must not hit the VMs
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
    except OSError as exc:
        raise VmmError(f"cannot start {argv[0]}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


async def wait_for_pid_file(
    pid_file: Path, jailer: asyncio.subprocess.Process, timeout: float, diag: Callable[[], str]
) -> int:
    """`--new-pid-ns`: the jailer writes Firecracker's pid to `<jail>/<exec>.pid` and exits."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            text = pid_file.read_text().strip()
            if text:
                return int(text)
        except (OSError, ValueError):
            pass
        if jailer.returncode not in (None, 0):
            raise BootFailed(f"the jailer {describe_exit(jailer.returncode)} before starting Firecracker{diag()}")
        if loop.time() >= deadline:
            raise BootFailed(f"the jailer did not write {pid_file} within {timeout:g}s{diag()}")
        await asyncio.sleep(SOCKET_POLL_INTERVAL)


async def wait_for_api_socket(path: Path, proc: ProcessHandle, timeout: float, diag: Callable[[], str]) -> None:
    """Return once `path` accepts connections; raise BootFailed if the process dies or time runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if proc.returncode is not None:
            raise BootFailed(
                f"Firecracker (pid {proc.pid}) {describe_exit(proc.returncode)} before its API socket "
                f"{path} was ready{diag()}"
            )
        if _socket_accepts(path):
            return
        if loop.time() >= deadline:
            raise BootFailed(
                f"Firecracker (pid {proc.pid}) did not open its API socket {path} within {timeout:g}s "
                f"(raise firecracker.socket_timeout_secs if the host is slow){diag()}"
            )
        await asyncio.sleep(SOCKET_POLL_INTERVAL)


def _socket_accepts(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
