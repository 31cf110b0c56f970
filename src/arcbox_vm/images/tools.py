"""Find the host tools the image builder runs, or say which Debian package to install.

Every external program the builder calls is looked up here, so a missing one fails
early with `MissingToolError(tool, package)` instead of a bare FileNotFoundError.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

from arcbox_vm.errors import MissingToolError

# tool -> Debian package that ships it
PACKAGES: dict[str, str] = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "dpkg": "dpkg",
    "dpkg-deb": "dpkg",
    "depmod": "kmod",
    "lz4": "lz4",
    "zstd": "zstd",
    "busybox": "busybox-static",
    "mmdebstrap": "mmdebstrap",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "tar": "tar",
    "ldd": "libc-bin",
    "skopeo": "skopeo",
    "umoci": "umoci",
}

# Where busybox-static puts the binary (checked after $PATH)
BUSYBOX_PATHS: tuple[str, ...] = ("/bin/busybox", "/usr/bin/busybox")

# Searched after $PATH: a non-root shell often lacks the sbin directories (mke2fs, depmod).
EXTRA_DIRS: tuple[str, ...] = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def find(tool: str) -> str | None:
    """Absolute path of `tool`, searching $PATH and then the sbin/bin directories."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    dirs += [d for d in EXTRA_DIRS if d not in dirs]
    return shutil.which(tool, path=os.pathsep.join(dirs)) if dirs else None


def require(tool: str, why: str = "") -> str:
    """Absolute path of `tool`, or MissingToolError naming the package that provides it."""
    path = find(tool)
    if path is None:
        raise MissingToolError(tool, PACKAGES.get(tool, tool), why)
    return path


def require_all(*tools: str, why: str = "") -> dict[str, str]:
    """`require` each tool (the first missing one raises)."""
    return {t: require(t, why) for t in tools}


def is_static_elf(path: str | Path) -> bool:
    """True if `path` is an ELF executable without a program interpreter (statically linked)."""
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 64 or ident[:4] != b"\x7fELF":
                return False
            is64 = ident[4] == 2
            endian = "<" if ident[5] == 1 else ">"
            if is64:
                phoff, = struct.unpack_from(endian + "Q", ident, 0x20)
                phentsize, phnum = struct.unpack_from(endian + "HH", ident, 0x36)
            else:
                phoff, = struct.unpack_from(endian + "I", ident, 0x1C)
                phentsize, phnum = struct.unpack_from(endian + "HH", ident, 0x2A)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):
        p_type, = struct.unpack_from(endian + "I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP: dynamically linked
            return False
    return True


def static_busybox() -> str:
    """Path of a statically linked busybox (package busybox-static), for the initramfs."""
    why = "the initramfs needs a statically linked busybox"
    candidates = [find("busybox"), *BUSYBOX_PATHS]
    for c in candidates:
        if c and os.path.exists(c) and is_static_elf(c):
            return c
    raise MissingToolError("busybox (static)", "busybox-static", why)
