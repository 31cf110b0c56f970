"""Waiting for Firecracker during a launch, failing fast when the process dies.

`wait_for_pid_file`: under the jailer with `--new-pid-ns` the jailer writes Firecracker's
pid to `<jail>/<exec name>.pid` and exits. `wait_for_api_socket`: polls until the API
socket accepts connections (Firecracker needs about 12 ms).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

from arcbox_vm.errors import BootFailed
from arcbox_vm.vmm.process import TrackedProcess

POLL_INTERVAL = 0.02  # seconds between probes


async def wait_for_pid_file(pid_file: Path, jailer: TrackedProcess, timeout: float, diag: Callable[[], str]) -> int:
    """The pid the jailer writes to `pid_file`; BootFailed if the jailer fails or time runs out."""
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
            raise BootFailed(f"the jailer {jailer.status_text()} before starting Firecracker{diag()}")
        if loop.time() >= deadline:
            raise BootFailed(f"the jailer did not write {pid_file} within {timeout:g}s{diag()}")
        await asyncio.sleep(POLL_INTERVAL)


async def wait_for_api_socket(path: Path, proc: TrackedProcess, timeout: float, diag: Callable[[], str]) -> None:
    """Return once `path` accepts connections; raise BootFailed if the process dies or time runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if proc.returncode is not None:
            raise BootFailed(f"{proc.describe_exit()} before its API socket {path} was ready{diag()}")
        if socket_accepts(path):
            return
        if loop.time() >= deadline:
            raise BootFailed(
                f"Firecracker (pid {proc.pid}) did not open its API socket {path} within {timeout:g}s "
                f"(raise firecracker.socket_timeout_secs if the host is slow){diag()}"
            )
        await asyncio.sleep(POLL_INTERVAL)


def socket_accepts(path: Path) -> bool:
    """Whether a Unix stream socket at `path` accepts a connection now."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
