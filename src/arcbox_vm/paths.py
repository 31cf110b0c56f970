"""Where arcbox-vm keeps its files on the host."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DEFAULT_DATA_DIR = Path("/var/lib/arcbox-vm")


def data_dir() -> Path:
    """`$ARCBOX_VM_DATA_DIR` if set, else /var/lib/arcbox-vm (images, sandboxes, state)."""
    env = os.environ.get("ARCBOX_VM_DATA_DIR")
    return Path(env) if env else DEFAULT_DATA_DIR


def runtime_dir() -> Path:
    """Short-lived sockets: `$ARCBOX_VM_RUNTIME_DIR`, else /run/arcbox-vm (root) or
    $XDG_RUNTIME_DIR/arcbox-vm. Kept apart from the data dir because a Unix socket path
    is limited to 107 bytes, and data dirs can be long."""
    env = os.environ.get("ARCBOX_VM_RUNTIME_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/arcbox-vm")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "arcbox-vm" if xdg else Path(f"/tmp/arcbox-vm-{os.getuid()}")


def memory_root() -> Path:
    """Guest memory files: `$ARCBOX_VM_MEMORY_DIR`, else /dev/shm/arcbox-vm (root) or
    /dev/shm/arcbox-vm-<uid>: a memory-backed filesystem, so a VM's RAM in a file there
    costs no disk writes."""
    env = os.environ.get("ARCBOX_VM_MEMORY_DIR")
    if env:
        return Path(env)
    return Path("/dev/shm/arcbox-vm" if os.geteuid() == 0 else f"/dev/shm/arcbox-vm-{os.getuid()}")


def memory_dir(workdir: Path) -> Path:
    """The per-VM directory for guest memory files belonging to `workdir` (derived like
    `socket_dir`, so start-up clean-up finds it from the workdir alone)."""
    return memory_root() / _workdir_hash(workdir)


def _workdir_hash(workdir: Path) -> str:
    return hashlib.sha1(str(Path(workdir).resolve()).encode()).hexdigest()[:16]


def socket_dir(workdir: Path) -> Path:
    """The per-VM socket directory belonging to `workdir` (short, derived, so it can be
    found again from the workdir alone, e.g. by start-up clean-up)."""
    return runtime_dir() / _workdir_hash(workdir)


def manager_tag(data_dir: Path) -> str:
    """4 hex chars naming one data dir's TAPs, NAT table and cgroups (so managers on
    different data dirs never touch each other's)."""
    return hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:4]
