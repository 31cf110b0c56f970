"""A sandbox's serial console, read as it grows (what `arcbox-vm logs` shows).

Reads happen in a worker thread: the console file is on local disk, but a read must
never block the event loop that serves every other sandbox."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

CHUNK = 64 * 1024
POLL_S = 0.2


def _read_from(path: Path, pos: int, limit: int) -> bytes | None:
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            return f.read(limit)
    except FileNotFoundError:
        return None


async def follow_console(path: Path, follow: bool, alive: Callable[[], bool]) -> AsyncIterator[bytes]:
    """The console's bytes from the start; with `follow`, then new bytes as they come,
    until `alive()` turns false (the sandbox was removed)."""
    pos = 0
    while True:
        while True:
            data = await asyncio.to_thread(_read_from, path, pos, CHUNK)
            if not data:
                break
            pos += len(data)
            yield data
        if not follow or not alive():
            return
        await asyncio.sleep(POLL_S)
