"""Firecracker snapshots: pause, resume, save (`PUT /snapshot/create`), and the API calls
of a restore (`PUT /snapshot/load`).

- pause / resume: `PATCH /vm {"state": "Paused" | "Resumed"}`.
- save: a Full snapshot of the paused VM — the device state and the guest memory, two
  files. Under the jailer Firecracker writes them inside its jail; they are moved to the
  destination (the sandbox's own directory) afterwards. The disk is not part of it.
- restore: a fresh Firecracker, `PUT /logger` and `PUT /metrics` (the only calls allowed
  before a load), then `PUT /snapshot/load` with the memory as a `File` backend (mapped
  copy-on-write: restores of one checkpoint share its pages), `network_overrides` (eth0 to
  the restore's own TAP), `vsock_override` (its own vsock socket, so the guest agent dials
  the new endpoint after the vsock reset every snapshot causes) and `resume_vm`.

A snapshot names the VM's disk by the path Firecracker was given at boot, and a load has
no override for it. Under the jailer that path is `/rootfs` inside each VM's own jail, so a
restore opens its own copy; without the jailer it would be the checkpointed sandbox's own
disk. Restores (and so checkpoints) therefore need the jailer; pause and resume do not.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from arcbox_vm.config.firecracker import FirecrackerConfig
from arcbox_vm.ports import VmSnapshot

from . import bodies
from .bodies import ApiRequest
from .layout import Layout

STATE_FILE = "state"  # in a snapshot directory
MEMORY_FILE = "mem"
JAIL_STATE = "snapshot.state"  # inside a jail, while Firecracker writes or loads them
JAIL_MEMORY = "snapshot.mem"
NO_JAILER = ("Firecracker restores need the jailer: a snapshot names its disk by the path the VM booted "
             "with, and only a jail gives each restore its own /rootfs (configure [firecracker.jailer])")


def restore_support(config: FirecrackerConfig) -> str | None:
    return None if config.jailer is not None else NO_JAILER


def save_paths(layout: Layout, dest: Path) -> tuple[Path, Path]:
    """Where Firecracker writes the state and the memory (host view)."""
    if layout.jailed:
        return layout.jail_file(JAIL_STATE), layout.jail_file(JAIL_MEMORY)
    return dest / STATE_FILE, dest / MEMORY_FILE


def create_request(layout: Layout, dest: Path) -> ApiRequest:
    state, mem = save_paths(layout, dest)
    return bodies.create_snapshot(layout.fc_path(state), layout.fc_path(mem), snapshot_type="Full")


def collect(layout: Layout, dest: Path, details: dict) -> VmSnapshot:
    """The saved files in `dest` (moved out of the jail under the jailer)."""
    state, mem = save_paths(layout, dest)
    if layout.jailed:
        for src, name in ((state, STATE_FILE), (mem, MEMORY_FILE)):
            try:
                os.replace(src, dest / name)
            except OSError:  # another file system
                shutil.move(src, dest / name)
            # written by the jailed uid, which a later VM may get: the snapshot is the daemon's,
            # readable (restores link it into their jails; checkpoints live in a 0700 directory)
            os.chown(dest / name, os.getuid(), os.getgid())
            os.chmod(dest / name, 0o644)
    return VmSnapshot(state=dest / STATE_FILE, memory=dest / MEMORY_FILE, vmm="firecracker", details=details)


def restore_requests(config: FirecrackerConfig, layout: Layout, *, tap_name: str | None, iface_id: str,
                     vsock_uds: Path, resume: bool = True) -> list[ApiRequest]:
    """The calls that turn a fresh (jailed) Firecracker into the restored VM."""
    assert layout.jailed, NO_JAILER
    return [
        bodies.put_logger(level=config.log_level, show_level=True, show_log_origin=False),
        bodies.put_metrics(layout.fc_path(layout.metrics)),
        bodies.load_snapshot(
            layout.fc_path(layout.jail_file(JAIL_STATE)), layout.fc_path(layout.jail_file(JAIL_MEMORY)),
            mem_backend_type="File", resume_vm=resume,
            network_overrides={iface_id: tap_name} if tap_name else None,
            vsock_override=layout.fc_path(vsock_uds)),
    ]
