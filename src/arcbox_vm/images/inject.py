"""Put the guest agent into an existing ext4 image without mounting it (debugfs -w).

No loop device, no mount, no root needed beyond write access to the file. Parent directories
are resolved inside the image (merged-/usr symlinks such as /sbin -> usr/sbin are followed),
missing ones are created, existing files are replaced, and everything written is read back
and compared. Running it twice gives the same result.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import subprocess
import tempfile
from pathlib import Path

from arcbox_vm.agent.bundle import agent_files
from arcbox_vm.errors import ImageError
from arcbox_vm.images import guestpath, tools

log = logging.getLogger(__name__)

EXT_MAGIC = 0xEF53
_INCOMPAT_RECOVER = 0x4
_INCOMPAT_JOURNAL_DEV = 0x8
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+@/-]+$")


def check_ext_image(path: Path) -> None:
    """Raise ImageError unless `path` is an ext2/3/4 filesystem image that is safe to modify offline."""
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path} is not a regular file (expected an ext4 filesystem image)")
    with open(path, "rb") as f:
        head = f.read(2048)
    if len(head) < 2048:
        raise ImageError(f"{path} is too small to be an ext4 filesystem image")
    magic, = struct.unpack_from("<H", head, 1024 + 0x38)
    if magic != EXT_MAGIC:
        hint = ""
        if head[510:512] == b"\x55\xaa":
            hint = " (it looks like a partitioned disk image; use the image of the root partition itself)"
        raise ImageError(f"{path} is not an ext4 filesystem image (no ext2/3/4 superblock){hint}")
    incompat, = struct.unpack_from("<I", head, 1024 + 0x60)
    if incompat & _INCOMPAT_JOURNAL_DEV:
        raise ImageError(f"{path} is an external ext4 journal, not a filesystem")
    if incompat & _INCOMPAT_RECOVER:
        raise ImageError(f"{path} has an unreplayed journal (it was not cleanly unmounted); "
                         f"run 'e2fsck -fy {path}' first")
    loop = _attached_loop_device(path)
    if loop:
        raise ImageError(f"{path} is attached to {loop} (probably mounted); unmount and detach it first")
    if _locked_by_other_process(path):
        raise ImageError(f"{path} is in use (another process, e.g. a running VM, holds a lock on it); "
                         "stop it first")


def _locked_by_other_process(path: Path) -> bool:
    """True if another process holds a POSIX/OFD lock on the file (QEMU locks the disks it has open)."""
    getlk = getattr(fcntl, "F_OFD_GETLK", None)
    if getlk is None:
        return False
    fmt = "@hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len (0 = to EOF), l_pid
    try:
        with open(path, "rb") as f:
            res = fcntl.fcntl(f, getlk, struct.pack(fmt, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return False
    return struct.unpack(fmt, res)[0] != fcntl.F_UNLCK


def _attached_loop_device(path: Path) -> str | None:
    real = os.path.realpath(path)
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if os.path.realpath(backing.read_text().strip()) == real:
                return "/dev/" + backing.parent.parent.name
        except OSError:
            continue
    return None


class _Debugfs:
    """Read-side queries against an image with memoised `stat` lookups."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.bin = tools.require("debugfs", "to write into ext4 images without mounting them")
        self._cache: dict[str, tuple[str, str] | None] = {}

    def request(self, cmd: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([self.bin, "-R", cmd, str(self.image)], stdin=subprocess.DEVNULL,
                              capture_output=True, check=False)

    def lookup(self, path: str) -> tuple[str, str] | None:
        if path not in self._cache:
            self._cache[path] = self._stat(path)
        return self._cache[path]

    def _stat(self, path: str) -> tuple[str, str] | None:
        res = self.request(f'stat "{path}"')
        out = res.stdout.decode(errors="replace")
        m = re.search(r"Type: (\w+)", out)
        if not m:
            return None
        kind = {"regular": "file", "directory": "dir", "symlink": "symlink"}.get(m.group(1), "other")
        target = ""
        if kind == "symlink":
            fast = re.search(r'Fast link dest: "(.*)"', out)
            target = fast.group(1) if fast else self.request(f'cat "{path}"').stdout.decode(errors="replace")
        return kind, target

    def run_script(self, lines: list[str], write: bool) -> str:
        """Run commands with `debugfs [-w] -f`; returns stderr minus the version banner."""
        with tempfile.NamedTemporaryFile("w", suffix=".debugfs", delete=False) as f:
            f.write("\n".join(lines) + "\n")
            script = f.name
        try:
            args = [self.bin] + (["-w"] if write else []) + ["-f", script, str(self.image)]
            res = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        finally:
            os.unlink(script)
        err = "\n".join(line for line in res.stderr.decode(errors="replace").splitlines()
                        if line.strip() and not line.startswith("debugfs "))
        if res.returncode != 0 and not err:
            err = f"debugfs exited with {res.returncode}"
        return err


def write_files(image: str | os.PathLike[str], files: dict[str, tuple[bytes, int]],
                uid: int = 0, gid: int = 0) -> None:
    """Write `{guest_path: (content, mode)}` into the ext4 image, creating parent directories.

    Existing files at those paths are replaced; an existing directory there is an error.
    """
    image = Path(image)
    check_ext_image(image)
    for p in files:
        if not _SAFE_PATH.match(p):
            raise ImageError(f"unsupported guest path for injection: {p!r}")
    with open(image, "rb+") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # one writer at a time (between arcbox-vm processes)
        dbg = _Debugfs(image)
        script: list[str] = []
        created: set[str] = set()
        targets: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="arcbox-inject-") as tmp:
            for n, (guest, (data, mode)) in enumerate(sorted(files.items())):
                parent, name = guest.rsplit("/", 1)
                real, missing = guestpath.resolve_dir(parent or "/", dbg.lookup)
                cur = list(real)
                for comp in missing:
                    cur.append(comp)
                    d = guestpath.join(cur)
                    if d not in created:
                        created.add(d)
                        script += [f'mkdir "{d}"', f'sif "{d}" mode 040755',
                                   f'sif "{d}" uid {uid}', f'sif "{d}" gid {gid}']
                dest = guestpath.join(cur + [name])
                existing = None if missing else dbg.lookup(dest)
                if existing is not None:
                    if existing[0] == "dir":
                        raise ImageError(f"{dest} is a directory in {image}; cannot write a file there")
                    script.append(f'rm "{dest}"')
                local = os.path.join(tmp, f"f{n}")
                with open(local, "wb") as f:
                    f.write(data)
                script += [f'write "{local}" "{dest}"', f'sif "{dest}" mode 0{0o100000 | (mode & 0o7777):o}',
                           f'sif "{dest}" uid {uid}', f'sif "{dest}" gid {gid}']
                targets[dest] = guest
            err = dbg.run_script(script, write=True)
            if err:
                raise ImageError(f"debugfs could not write into {image}:\n{err}")
            _verify(dbg, files, targets, tmp)


def _verify(dbg: _Debugfs, files: dict[str, tuple[bytes, int]], targets: dict[str, str], tmp: str) -> None:
    outdir = os.path.join(tmp, "readback")
    os.mkdir(outdir)
    names = {dest: os.path.join(outdir, f"r{i}") for i, dest in enumerate(targets)}
    dbg.run_script([f'dump "{dest}" "{local}"' for dest, local in names.items()], write=False)
    for dest, local in names.items():
        data, mode = files[targets[dest]]
        try:
            got = Path(local).read_bytes()
        except OSError:
            got = None
        if got != data:
            raise ImageError(f"{dbg.image}: {dest} did not read back correctly after writing it")
        st = dbg.request(f'stat "{dest}"').stdout.decode(errors="replace")
        m = re.search(r"Mode:\s+(\d+)", st)
        if not m or int(m.group(1), 8) != (mode & 0o7777):
            raise ImageError(f"{dbg.image}: {dest} has mode {m.group(1) if m else '?'}, expected {mode:04o}")


def has_python3(image: str | os.PathLike[str]) -> bool:
    """Whether /usr/bin/python3 exists in the image (following symlinks inside the image)."""
    dbg = _Debugfs(Path(image))
    return guestpath.resolve_file("/usr/bin/python3", dbg.lookup) is not None


def inject_agent(rootfs_path: str | os.PathLike[str]) -> list[str]:
    """Write the guest agent (`agent_files()`) into an existing ext4 image; returns warnings.

    Idempotent. The agent runs with /usr/bin/python3: an image without one gets a warning,
    not an error (it may be added later).
    """
    path = Path(rootfs_path)
    write_files(path, agent_files())
    warnings: list[str] = []
    if not has_python3(path):
        warnings.append(f"{path} has no /usr/bin/python3; the agent (/sbin/vm-agent) needs it to start "
                        "(install python3 in the image)")
    for w in warnings:
        log.warning(w)
    return warnings
