"""Where one Firecracker VM's files live, and the names that locate them.

`Layout` gives every file both as a host path and as the path Firecracker sees: identical
in direct mode, relative to the jail root under the jailer
(`<chroot_base>/<exec name>/<jail id>/root`). The jail id is a pure function of the
VM's socket directory, so `agent_endpoint()` (before launch) and `launch` agree on it.
Unix socket paths are checked against the 107-byte limit before anything is created.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from arcbox_vm.config.firecracker import (
    DEFAULT_CHROOT_BASE_DIR,
    DEFAULT_JAILER_BINARY,
    FirecrackerConfig,
    JailerConfig,
)
from arcbox_vm.errors import VmmError

log = logging.getLogger(__name__)

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


def with_jailer(config: FirecrackerConfig) -> FirecrackerConfig:
    """The config a driver runs with, `use_jailer` resolved into `jailer`: a configured
    jailer is used; "always" uses the default one; "auto" uses it where its binary exists,
    the daemon is root and Firecracker's file name lets the jailer run it — else Firecracker
    runs directly, as the daemon's user (said once, as a warning)."""
    if config.jailer is not None or config.use_jailer == "never":
        return config
    jailer = JailerConfig(binary=DEFAULT_JAILER_BINARY, chroot_base_dir=DEFAULT_CHROOT_BASE_DIR)
    if config.use_jailer == "auto":
        why = ""
        if not (jailer.binary.is_file() and os.access(jailer.binary, os.X_OK)):
            why = f"there is no jailer at {jailer.binary}"
        elif os.geteuid() != 0:
            why = "the jailer needs a root daemon"
        elif "firecracker" not in exec_file_name(config.binary):
            why = f"the jailer only runs files named *firecracker*, not {config.binary}"
        if why:
            log.warning("Firecracker runs without the jailer (%s): unconfined, as the daemon's user; install "
                        "the jailer or set firecracker.use_jailer = \"never\" to say so", why)
            return config
    log.info("Firecracker runs under the jailer %s (a uid of its own per VM, chroot, seccomp)", jailer.binary)
    return config.model_copy(update={"jailer": jailer})


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
        exec_name = exec_file_name(config.binary)
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


def exec_file_name(binary: Path) -> str:
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
