"""Finding processes that still use a sandbox directory (VMMs name their workdir and
sockets on their command line); start-up reconciliation (recovery.py) kills the ones
no record owns."""

from __future__ import annotations

import os
from pathlib import Path


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
