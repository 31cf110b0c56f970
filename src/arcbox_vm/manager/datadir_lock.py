"""One manager per data dir: an exclusive, non-blocking lock on `<data_dir>/manager.lock`.

Two managers on one data dir would adopt, clean up and kill each other's VMs."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from arcbox_vm.errors import ArcboxError, StateError


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.data_dir / "manager.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"cannot use the data dir {self.data_dir}: {exc.strerror}; check that it is "
                             "writable and not full") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ArcboxError(f"another arcbox-vm manager is using {self.data_dir}; stop it or use another "
                              "data dir (data_dir)") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
