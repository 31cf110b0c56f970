"""A sandbox's serial console: kept to a bounded size, and read as it grows.

The console is attacker-controlled output (the guest is root in its VM and may print
forever), so it never grows without bound: the VMM writes `console.log` with O_APPEND
(QEMU's file chardev `append=on`; Firecracker's stdout), and `cap_console`, run per live
sandbox, moves the newest quarter of the cap into `console.log.1` and truncates
`console.log` once it passes a quarter of the cap. Together they hold at most half the
cap plus what the guest writes between two checks: every 0.1 s while the console
is quiet, every 20 ms while it fills up (a guest's UART writes a few hundred KiB/s under
emulation). `arcbox-vm logs` shows `console.log.1` then `console.log`. Bytes written
between the copy and the truncation are lost — the price of a ring the VMM does not
know about.

Reads happen in a worker thread: the files are on local disk, but a read must never
block the event loop that serves every other sandbox."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

CHUNK = 64 * 1024
POLL_S = 0.2
CAP_INTERVAL_S = 0.1
BUSY_INTERVAL_S = 0.02


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def cap_console(path: Path, max_bytes: int) -> int:
    """Keep `path` + its rotated part under `max_bytes`; returns the live file's size
    before any rotation (0 if there is none)."""
    keep = max(1, max_bytes // 4)  # half the cap is left for what arrives while a check is late
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return 0
    if size <= max(1, max_bytes // 4):
        return size
    with open(path, "rb") as f:
        f.seek(max(0, size - keep))
        tail = f.read(keep)
    old = rotated(path)
    tmp = old.with_name(old.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(tail)
    os.replace(tmp, old)
    os.truncate(path, 0)
    return size


async def keep_capped(path: Path, max_bytes: int) -> None:
    """Cap the console until cancelled (a task per live sandbox). The size is looked at on
    the loop (a stat of a local file); only a rotation goes to a worker thread. Checked
    every 0.1 s, every 20 ms while it grows, so a guest that starts a flood after a quiet
    spell is caught within 0.1 s of output."""
    last = 0
    while True:
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = 0
        if size > max_bytes // 4:
            await asyncio.to_thread(cap_console, path, max_bytes)
            last, busy = 0, True
        else:
            busy, last = size != last, size
        await asyncio.sleep(BUSY_INTERVAL_S if busy else CAP_INTERVAL_S)


def tail_text(path: Path, lines: int = 15, max_bytes: int = 16384) -> str:
    """The last lines of the console (for boot-failure messages), read from the end only."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").strip().splitlines()[-lines:])


def _read_from(path: Path, pos: int, limit: int) -> tuple[bytes, int] | None:
    """(data, file size) from `pos`; None if there is no file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(pos)
            return f.read(limit), size
    except FileNotFoundError:
        return None


def _generation(path: Path) -> int:
    """Changes with every rotation (`console.log.1` is replaced: a new inode)."""
    try:
        return os.stat(rotated(path)).st_ino
    except FileNotFoundError:
        return 0


async def follow_console(path: Path, follow: bool, alive: Callable[[], bool]) -> AsyncIterator[bytes]:
    """The console's kept bytes (rotated part first); with `follow`, then new bytes as they
    come, until `alive()` turns false (the sandbox was removed)."""
    pos = 0
    old = rotated(path)
    generation = _generation(path)
    while True:
        got = await asyncio.to_thread(_read_from, old, pos, CHUNK)
        if not got or not got[0]:
            break
        pos += len(got[0])
        yield got[0]
    pos = 0
    while True:
        while True:
            got = await asyncio.to_thread(_read_from, path, pos, CHUNK)
            if got is None:
                break
            data, size = got
            now = _generation(path)
            if size < pos or now != generation:  # rotated meanwhile: start again at the new beginning
                pos, generation = 0, now
                continue
            if not data:
                break
            pos += len(data)
            yield data
        if not follow or not alive():
            return
        await asyncio.sleep(POLL_S)
