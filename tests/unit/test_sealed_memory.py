"""A snapshot's sealed memory: one copy for every clone, which no holder can change.

The attack: a confined QEMU (a uid of its own, the memfd its only way in) tries every way
to change the memory the other clones map — write(), a shared writable mapping, punching
a hole, shrinking or growing it, removing the seals. Each is refused by the kernel, while
its own private copy-on-write mapping takes writes.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arcbox_vm.vmm.qemu.sealed_memory import SEALS, SealedMemories, sealed_copy

MIB = 1 << 20


def sparse_image(path: Path, size: int = 16 * MIB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(MIB)
        f.write(b"A" * MIB)
        f.seek(10 * MIB)
        f.write(b"B" * 4096)
    return path


def test_the_copy_has_the_bytes_keeps_holes_and_is_sealed(tmp_path):
    img = sparse_image(tmp_path / "mem")
    fd = sealed_copy(img)
    try:
        assert os.fstat(fd).st_size == img.stat().st_size
        assert os.pread(fd, 16 * MIB, 0) == img.read_bytes()
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        assert os.fstat(fd).st_blocks * 512 < 4 * MIB, "holes were filled in"
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
    finally:
        os.close(fd)


HOSTILE_HOLDER = r"""
import ctypes, fcntl, mmap, os, sys
n = int(sys.argv[1])
fd = os.open(f"/proc/self/fd/{n}", os.O_RDWR)   # what QEMU does with mem-path=/proc/self/fd/N
refused = []
def attempt(name, fn):
    try:
        fn()
    except OSError:
        refused.append(name)
attempt("write", lambda: os.pwrite(fd, b"evil", 0))
attempt("shared-map", lambda: mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
libc = ctypes.CDLL(None, use_errno=True)
def punch():
    if libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(1 << 20)) != 0:
        raise OSError(ctypes.get_errno(), "punch")
attempt("punch-hole", punch)
attempt("shrink", lambda: os.ftruncate(fd, 4096))
attempt("grow", lambda: os.ftruncate(fd, 64 << 20))
attempt("unseal", lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0))
m = mmap.mmap(fd, 16 << 20, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
m[1 << 20:(1 << 20) + 4] = b"mine"                 # its own copy-on-write page
print(",".join(refused), m[1 << 20:(1 << 20) + 4].decode(), os.getuid())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the holder as another uid")
def test_a_hostile_holder_of_another_uid_cannot_change_it(tmp_path):
    img = sparse_image(tmp_path / "mem")
    fd = sealed_copy(img)
    try:
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        res = subprocess.run([python, "-c", HOSTILE_HOLDER, str(fd)], pass_fds=(fd,), user=61234, group=61234,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        refused, own, uid = res.stdout.split()
        assert set(refused.split(",")) == {"write", "shared-map", "punch-hole", "shrink", "grow", "unseal"}
        assert own == "mine" and uid == "61234"
        assert os.pread(fd, 16 * MIB, 0) == img.read_bytes(), "the memory every clone maps changed"
    finally:
        os.close(fd)


async def test_clones_share_one_copy_until_the_last_is_gone(tmp_path):
    img = sparse_image(tmp_path / "mem")
    mems = SealedMemories()
    a, b = await asyncio.gather(mems.acquire(img), mems.acquire(img))  # filled once, for both
    assert a.fd == b.fd and mems.held() == 1
    a.release()
    a.release()  # idempotent
    os.fstat(b.fd)  # still open for b
    b.release()
    assert mems.held() == 0
    with pytest.raises(OSError):
        os.fstat(b.fd)
    c = await mems.acquire(img)  # a fresh one
    assert mems.held() == 1
    c.release()


async def test_a_changed_or_missing_image_is_not_served_stale(tmp_path):
    img = sparse_image(tmp_path / "mem")
    mems = SealedMemories()
    first = await mems.acquire(img)
    img.unlink()
    sparse_image(img, 12 * MIB)  # another image at the same path
    second = await mems.acquire(img)
    assert second.fd != first.fd and os.fstat(second.fd).st_size == 12 * MIB
    first.release()
    second.release()
    with pytest.raises(FileNotFoundError):
        await mems.acquire(tmp_path / "gone")
    assert mems.held() == 0
