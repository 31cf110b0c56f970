"""Resolve a path inside a guest filesystem we cannot chroot into.

Debian roots have merged /usr (`/sbin -> usr/sbin`), and a user's image may hold absolute
symlinks: written naively, `/sbin/vm-agent` would fail (debugfs) or, worse, land on the host
(an unpacked tree whose link points at `/usr/sbin`). Both writers resolve the parent directory
here, component by component, with symlinks interpreted relative to the guest root.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from arcbox_vm.errors import ImageError

# lookup(absolute guest path without symlinks in its parents) ->
#   None if missing, else (kind, link_target) with kind in {"dir", "file", "symlink", "other"}
Lookup = Callable[[str], "tuple[str, str] | None"]

MAX_LINKS = 40


def split(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ImageError(f"guest path must be absolute: {path!r}")
    return [p for p in path.split("/") if p not in ("", ".")]


def join(parts: list[str]) -> str:
    return "/" + "/".join(parts)


def resolve_dir(path: str, lookup: Lookup) -> tuple[list[str], list[str]]:
    """Resolve directory `path`: (existing real directory components, components still missing).

    Symlinks are followed inside the guest; a component that exists but is not a directory is an error.
    """
    real: list[str] = []
    pending = split(path)
    links = 0
    while pending:
        c = pending.pop(0)
        if c in ("", "."):
            continue
        if c == "..":
            if real:
                real.pop()
            continue
        info = lookup(join(real + [c]))
        if info is None:
            missing = [c] + [p for p in pending if p not in ("", ".")]
            if ".." in missing:
                raise ImageError(f"cannot create {path!r} in the guest: '..' after a missing directory")
            return real, missing
        kind, target = info
        if kind == "symlink":
            links += 1
            if links > MAX_LINKS:
                raise ImageError(f"too many levels of symbolic links resolving {path!r} in the guest")
            if target.startswith("/"):
                real = []
            pending = [p for p in target.split("/") if p] + pending
            continue
        if kind != "dir":
            raise ImageError(f"{join(real + [c])} in the guest is not a directory (needed for {path})")
        real.append(c)
    return real, []


def resolve_file(path: str, lookup: Lookup) -> str | None:
    """Follow `path` (including a final symlink) to an existing non-directory; None if it does not exist."""
    parts = split(path)
    links = 0
    while True:
        real, missing = resolve_dir(join(parts[:-1]), lookup) if parts else ([], [])
        if missing or not parts:
            return None
        full = join(real + [parts[-1]])
        info = lookup(full)
        if info is None:
            return None
        kind, target = info
        if kind != "symlink":
            return full if kind != "dir" else None
        links += 1
        if links > MAX_LINKS:
            return None
        parts = split(target) if target.startswith("/") else real + [p for p in target.split("/") if p]


def tree_lookup(root: Path) -> Lookup:
    """Lookup function for an unpacked directory tree at `root` (never follows links itself)."""

    def lookup(guest: str) -> tuple[str, str] | None:
        p = os.path.join(root, guest.lstrip("/"))
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return "symlink", os.readlink(p)
        if stat.S_ISDIR(st.st_mode):
            return "dir", ""
        if stat.S_ISREG(st.st_mode):
            return "file", ""
        return "other", ""

    return lookup
