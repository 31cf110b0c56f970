"""Debian's cloud kernel: unpack the .deb, and make the uncompressed ELF vmlinux Firecracker boots.

QEMU boots the bzImage (`vmlinuz`) directly; Firecracker on x86_64 needs the uncompressed ELF.
Debian's bzImage carries it LZ4-compressed (other kernels: gzip, xz or zstd); the setup header
says where the compressed payload is and the payload's last 4 bytes give the uncompressed size,
so the result is checked exactly.
"""

from __future__ import annotations

import lzma
import os
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from arcbox_vm.errors import ImageError
from arcbox_vm.images import tools

# compressed-payload magics -> name
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x02\x21\x4c\x18", "lz4"),  # LZ4 legacy frame (what the kernel's lz4 compressor writes)
    (b"\x04\x22\x4d\x18", "lz4"),  # LZ4 frame
    (b"\x1f\x8b\x08", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


@dataclass(frozen=True)
class ExtractedKernel:
    """A kernel package unpacked with `dpkg -x`."""

    root: Path
    release: str
    vmlinuz: Path
    modules_dir: Path  # .../lib/modules/<release>
    config: Path | None


def release_from_package(name: str) -> str:
    """`linux-image-6.1.0-56-cloud-amd64` -> `6.1.0-56-cloud-amd64`."""
    prefix = "linux-image-"
    if not name.startswith(prefix) or len(name) == len(prefix):
        raise ImageError(f"{name!r} is not a linux-image-<release> package name")
    return name[len(prefix):]


def unpack_deb(deb: Path, dest: Path, release: str | None = None) -> ExtractedKernel:
    """`dpkg -x DEB DEST` and locate the kernel image and module tree in it."""
    dpkg = tools.require("dpkg", "to unpack the kernel package")
    dest.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([dpkg, "-x", str(deb), str(dest)], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise ImageError(f"dpkg -x {deb.name} failed (exit {res.returncode}): {res.stderr.strip()}")
    releases: dict[str, Path] = {}
    for base in ("lib/modules", "usr/lib/modules"):
        d = dest / base
        if d.is_dir():
            for sub in d.iterdir():
                if sub.is_dir():
                    releases[sub.name] = sub
    if release is None:
        if len(releases) != 1:
            raise ImageError(f"{deb.name}: expected one module tree, found {sorted(releases) or 'none'}")
        release = next(iter(releases))
    if release not in releases:
        raise ImageError(f"{deb.name} has no modules for {release} (found {sorted(releases) or 'none'})")
    vmlinuz = dest / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.is_file():
        raise ImageError(f"{deb.name} has no boot/vmlinuz-{release}")
    config = dest / "boot" / f"config-{release}"
    return ExtractedKernel(root=dest, release=release, vmlinuz=vmlinuz, modules_dir=releases[release],
                           config=config if config.is_file() else None)


def _payload(image: bytes) -> tuple[bytes, int | None] | None:
    """The compressed kernel inside a bzImage and its uncompressed size, from the setup header."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    version, = struct.unpack_from("<H", image, 0x206)
    if version < 0x0208:  # payload_offset/length exist since boot protocol 2.08
        return None
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = image[start:start + length]
    if len(payload) != length or length < 8:
        return None
    size, = struct.unpack_from("<I", payload, length - 4)  # the kernel build appends the size
    return payload[:-4], size


def _kind(data: bytes) -> str | None:
    for magic, name in _MAGICS:
        if data.startswith(magic):
            return name
    return None


def _decompress(kind: str, data: bytes, out: Path) -> None:
    if kind in ("lz4", "zstd"):
        tool = tools.require(kind, "to decompress the kernel image")
        with open(out, "wb") as f:
            res = subprocess.run([tool, "-dc"], input=data, stdout=f, stderr=subprocess.PIPE, check=False)
        if res.returncode != 0:
            raise ImageError(f"{kind} -dc failed: {res.stderr.decode(errors='replace').strip()}")
        return
    if kind == "gzip":
        raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)  # tolerates trailing bytes
    else:  # xz
        raw = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    out.write_bytes(raw)


def is_x86_64_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(20)
    return len(head) == 20 and head[:4] == b"\x7fELF" and head[4] == 2 and head[18:20] == b"\x3e\x00"


def extract_vmlinux(bzimage: Path, out: Path) -> str:
    """Write the uncompressed ELF kernel inside `bzimage` to `out`; returns the compression used."""
    image = bzimage.read_bytes()
    tmp = out.with_name(out.name + ".part")
    candidates: list[tuple[bytes, int | None]] = []
    found = _payload(image)
    if found:
        candidates.append(found)
    else:  # not a bzImage with a usable header: try every compressed stream we can spot
        for magic, _ in _MAGICS:
            pos = image.find(magic)
            while pos != -1:
                candidates.append((image[pos:], None))
                pos = image.find(magic, pos + 1)
    errors: list[str] = []
    for data, size in candidates:
        kind = _kind(data)
        if kind is None:
            errors.append(f"unknown compression (magic {data[:4].hex()})")
            continue
        try:
            _decompress(kind, data, tmp)
        except (ImageError, OSError, lzma.LZMAError, EOFError) as e:
            errors.append(f"{kind}: {e}")
            continue
        if not is_x86_64_elf(tmp):
            errors.append(f"{kind}: the result is not an x86-64 ELF")
            continue
        if size is not None and tmp.stat().st_size != size:
            errors.append(f"{kind}: got {tmp.stat().st_size} bytes, the header says {size}")
            continue
        os.replace(tmp, out)
        return kind
    tmp.unlink(missing_ok=True)
    raise ImageError(f"could not extract an ELF vmlinux from {bzimage.name}: "
                     + ("; ".join(errors) or "no compressed kernel found"))
