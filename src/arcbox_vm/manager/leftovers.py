"""Start-up clean-up: what a crashed manager of this data dir left behind.

Sandbox state is in memory, so at start every sandbox directory is an orphan: its VMM
process (found by the directory in its command line) is killed and the directory
removed. TAPs and NAT rules are cleaned by the network backend.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from pathlib import Path

from arcbox_vm.paths import socket_dir

log = logging.getLogger(__name__)


def processes_using(path: Path) -> list[int]:
    """PIDs whose command line mentions `path` (VMMs reference their workdir's sockets)."""
    needle = str(path).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


async def remove_leftovers(data_dir: Path) -> list[str]:
    root = data_dir / "sandboxes"
    removed = []
    if not root.is_dir():
        return removed
    for workdir in sorted(root.iterdir()):
        for pid in processes_using(workdir):
            log.warning("killing VMM process %d left behind in %s", pid, workdir)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(50):
            if not processes_using(workdir):
                break
            await asyncio.sleep(0.05)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(socket_dir(workdir), ignore_errors=True)
        removed.append(workdir.name)
    if removed:
        log.warning("removed %d sandbox directories left behind: %s", len(removed), ", ".join(removed))
    return removed
