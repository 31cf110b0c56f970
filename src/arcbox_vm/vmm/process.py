"""A VMM child process we own: start it, watch it exit, kill it, explain failures.

Shared by the drivers so each only decides *what* to run. The process runs in its own
session (a terminal's Ctrl-C reaches us, not the VMM, so we can shut the guest down
properly); `die_with_parent` additionally asks the kernel to SIGKILL it if we die, for
one-shot runs that must never leave a VM behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def _pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ChildProcess:
    """An asyncio subprocess with stdout/stderr in a log file and an exit future."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path, argv: Sequence[str]) -> None:
        self._proc = proc
        self.log_path = log_path
        self.argv = list(argv)
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiter = asyncio.create_task(self._wait(), name=f"wait-{proc.pid}")

    @classmethod
    async def start(cls, argv: Sequence[str], log_path: Path, *, die_with_parent: bool = False,
                    cwd: Path | None = None) -> "ChildProcess":
        with open(log_path, "ab") as logf:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                start_new_session=True, cwd=str(cwd) if cwd else None,
                preexec_fn=_pdeathsig if die_with_parent else None,
            )
        return cls(proc, log_path, argv)

    async def _wait(self) -> None:
        rc = await self._proc.wait()
        if not self.exited.done():
            self.exited.set_result(rc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)

    def send_signal(self, sig: int) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def kill(self, timeout: float = 5.0) -> None:
        self.send_signal(signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wait(), timeout)

    def log_tail(self, max_bytes: int = 2000) -> str:
        """The end of the process's own output, for error messages."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def describe_exit(self, what: str) -> str:
        rc = self._proc.returncode
        status = f"signal {-rc}" if rc is not None and rc < 0 else f"status {rc}"
        tail = self.log_tail()
        return f"{what} exited with {status}" + (f": {tail}" if tail else " (it printed nothing)")
