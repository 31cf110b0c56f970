"""One uid per running VMM, claimed host-wide.

A confined VMM runs as a uid (and gid of the same number) that nothing else on the host
uses: a VMM taken over by its guest cannot signal, ptrace or open the files of another
sandbox's VMM, because they are not its own. The uid is claimed from a configured range
when the VMM is launched and released when the driver cleans it up.

Claims are files `<claims dir>/<uid>` naming their owner — the VM's socket directory,
which is unique on the host and exists exactly as long as the VM's files do — so every
daemon and every one-shot run on the host, whatever its data dir, draws from the same
pool without two VMs ever sharing a uid; `flock` on `<claims dir>/.lock` serialises
claimers. A claim outlives a daemon restart (the VMM does too). A claim is stale — and
is taken over — only when its owner directory is gone and no process runs as that uid
(whoever made it crashed and its files were removed since). Nothing is recorded
elsewhere: an adopted VMM's claim is found again by its owner.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from arcbox_vm.errors import ResourceExhausted, VmmError

log = logging.getLogger(__name__)

CLAIMS_DIR = Path("/run/arcbox-vm-uids")
_LOCK = ".lock"


def running_uids(proc: Path = Path("/proc")) -> set[int]:
    """The real uid of every process (from /proc/<pid>/status; vanished ones are skipped)."""
    uids: set[int] = set()
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "status"), "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        uids.add(int(line.split()[1]))
                        break
        except (OSError, ValueError, IndexError):
            continue
    return uids


class VmmUsers:
    """The uids `first`..`last` (inclusive), claimed one per VMM through `claims_dir`."""

    def __init__(self, first: int, last: int, claims_dir: Path = CLAIMS_DIR, proc: Path = Path("/proc")) -> None:
        if not 0 < first <= last:
            raise ValueError(f"bad uid range {first}-{last}")
        self.first, self.last = first, last
        self.claims_dir = Path(claims_dir)
        self._proc = proc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.claims_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.claims_dir / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _claims(self) -> dict[int, str]:
        """uid -> owner of every claim file in our range."""
        found: dict[int, str] = {}
        for entry in os.scandir(self.claims_dir):
            if entry.name.isdigit() and self.first <= int(entry.name) <= self.last:
                with contextlib.suppress(OSError):
                    found[int(entry.name)] = Path(entry.path).read_text().strip()
        return found

    def _write(self, uid: int, owner: Path) -> None:
        path = self.claims_dir / str(uid)
        tmp = path.with_name(f".{uid}.tmp")
        tmp.write_text(f"{owner}\n")
        os.replace(tmp, path)

    def claim(self, owner: Path) -> int:
        """A uid for the VM whose socket directory is `owner` (the same one again if it has
        one). Raises ResourceExhausted when every uid of the range is taken, VmmError when
        the claims cannot be written."""
        try:
            return self._claim(Path(owner).absolute())
        except OSError as exc:
            raise VmmError(f"cannot claim a uid for a VMM in {self.claims_dir}: {exc.strerror or exc}") from exc

    def _claim(self, owner: Path) -> int:
        with self._locked():
            claims = self._claims()
            for uid, who in claims.items():
                if who == str(owner):
                    return uid
            running = running_uids(self._proc)
            for uid in range(self.first, self.last + 1):
                if uid in running:
                    continue
                who = claims.get(uid)
                if who is not None:
                    if os.path.lexists(who):
                        continue
                    log.info("uid %d: taking over the stale claim of %s (gone, no process runs as it)", uid, who)
                self._write(uid, owner)
                return uid
        raise ResourceExhausted(
            f"all {self.last - self.first + 1} VMM uids {self.first}-{self.last} are in use "
            f"(claims in {self.claims_dir}); remove sandboxes or configure a larger [qemu] uid_range")

    def uid_of(self, owner: Path) -> int | None:
        """The uid claimed for `owner`, if any."""
        owner = Path(owner).absolute()
        with contextlib.suppress(FileNotFoundError):
            for uid, who in self._claims().items():
                if who == str(owner):
                    return uid
        return None

    def release(self, owner: Path) -> None:
        """Give back the uid(s) claimed for `owner` (nothing if it has none)."""
        owner = Path(owner).absolute()
        if not self.claims_dir.is_dir():
            return
        with self._locked():
            for uid, who in self._claims().items():
                if who == str(owner):
                    with contextlib.suppress(FileNotFoundError):
                        (self.claims_dir / str(uid)).unlink()
