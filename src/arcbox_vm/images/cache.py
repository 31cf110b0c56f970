"""The on-disk image cache: content keys, complete-or-absent image directories, the build lock.

Layout under the data dir:
    images/<key>/{vmlinuz,vmlinux,initrd.img,rootfs.ext4,manifest.json}   finished images
    images/.build-<key>-<pid>/                                           being built (never "found")
    cache/debs/*.deb, cache/base/base-<key>.tar, cache/kernel-package.json   shared downloads
An image directory only ever appears by `rename` of a finished build directory, so a crash
leaves at most a `.build-*` directory, which the next build removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILES = {"kernel": "vmlinuz", "vmlinux": "vmlinux", "initrd": "initrd.img", "rootfs": "rootfs.ext4"}
MANIFEST = "manifest.json"
BUILD_PREFIX = ".build-"


@dataclass(frozen=True)
class GuestImage:
    """A finished guest image (see docs/CONTRACTS.md)."""

    key: str
    dir: Path
    kernel: Path  # bzImage, for QEMU
    vmlinux: Path  # uncompressed ELF, for Firecracker
    initrd: Path  # newc cpio: busybox + virtio modules + /init
    rootfs: Path  # ext4: Debian minbase + python3 + the agent
    kernel_release: str

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())


def digest(obj: Any, length: int = 16) -> str:
    """Short SHA-256 of a JSON-able value (canonical form)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:length]


def images_dir(data_dir: Path) -> Path:
    return data_dir / "images"


def cache_dir(data_dir: Path) -> Path:
    return data_dir / "cache"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_image(directory: Path) -> GuestImage | None:
    """The image in `directory` if it is complete (manifest and every file present), else None."""
    if directory.name.startswith("."):
        return None
    manifest = read_json(directory / MANIFEST)
    if not manifest or manifest.get("key") != directory.name:
        return None
    paths = {attr: directory / name for attr, name in FILES.items()}
    if not all(p.is_file() for p in paths.values()):
        return None
    return GuestImage(key=directory.name, dir=directory, kernel_release=str(manifest.get("kernel_release", "")),
                      **paths)


def list_images(data_dir: Path) -> list[tuple[GuestImage, dict[str, Any]]]:
    """Every complete image with its manifest, newest first."""
    out = []
    root = images_dir(data_dir)
    if not root.is_dir():
        return []
    for d in root.iterdir():
        img = load_image(d) if d.is_dir() else None
        if img:
            out.append((img, img.manifest()))
    out.sort(key=lambda pair: str(pair[1].get("created_at", "")), reverse=True)
    return out


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(build_dir: Path, final: Path, replace: bool = False) -> None:
    """Move a finished build directory into place with rename (atomic for readers)."""
    for name in os.listdir(build_dir):
        fd = os.open(build_dir / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(build_dir)
    old = None
    if final.exists() and replace:
        old = final.with_name(f"{BUILD_PREFIX}old-{final.name}-{os.getpid()}")
        os.rename(final, old)
    os.rename(build_dir, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def new_build_dir(data_dir: Path, key: str) -> Path:
    root = images_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    d = root / f"{BUILD_PREFIX}{key}-{os.getpid()}-{time.time_ns() % 10**9}"
    d.mkdir()
    return d


def remove_stale_builds(data_dir: Path) -> None:
    """Remove leftovers of crashed builds (call with the build lock held)."""
    root = images_dir(data_dir)
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(BUILD_PREFIX):
                shutil.rmtree(d, ignore_errors=True)
    tmp = cache_dir(data_dir) / "tmp"
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    for leftover in cache_dir(data_dir).glob("*/*.part*"):
        with contextlib.suppress(OSError):
            leftover.unlink()
    for leftover in cache_dir(data_dir).glob("*/.download-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def build_lock(data_dir: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """One image build at a time per data dir (other builders wait)."""
    root = images_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prune_images(data_dir: Path, keep: int, protect: str = "") -> list[str]:
    """Delete all but the `keep` newest complete images (never `protect`); returns the removed keys."""
    removed = []
    for img, _manifest in list_images(data_dir)[keep:]:
        if img.key == protect:
            continue
        trash = img.dir.with_name(f"{BUILD_PREFIX}old-{img.key}-{os.getpid()}")
        try:
            os.rename(img.dir, trash)  # disappears atomically, then is deleted
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(img.key)
    return removed


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (cheap, files in images are never modified in place) or copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
