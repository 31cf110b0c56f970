"""Carry a background command's kept output across a graceful daemon restart.

The output a held command produced while no client was attached lives in the daemon's
memory (background.py). When the daemon stops leaving VMs running, that tail is written to
`<sandbox workdir>/execs/<exec id>.tail`; the next daemon puts it in front of whatever the
guest agent spooled meanwhile when the command is first attached, then deletes the file.
(A crash loses the daemon-held tail; the guest's spool of later output survives it.)

Format: records of `stream (1 byte: 0 stdout, 1 stderr) | length (u32, big-endian) | data`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from pathlib import Path

from arcbox_vm.models import OutputChunk

log = logging.getLogger(__name__)

_REC = struct.Struct(">BI")
_STREAMS = ("stdout", "stderr")


def tail_path(workdir: Path, exec_id: str) -> Path:
    return workdir / "execs" / f"{int(exec_id)}.tail"


def save(workdir: Path, exec_id: str, chunks: list[OutputChunk]) -> None:
    """Write the chunks atomically (temp file + rename); errors are logged, not raised."""
    data = [c for c in chunks if c.stream in _STREAMS and c.data]
    if not data:
        return
    path = tail_path(workdir, exec_id)
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        with open(tmp, "wb") as f:
            for c in data:
                f.write(_REC.pack(_STREAMS.index(c.stream), len(c.data)))
                f.write(c.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not keep the output of command %s for the next daemon: %s", exec_id, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


def take(workdir: Path, exec_id: str) -> list[OutputChunk]:
    """Read and delete a saved tail ([] when there is none or it is damaged)."""
    path = tail_path(workdir, exec_id)
    try:
        raw = path.read_bytes()
    except OSError:
        return []
    with contextlib.suppress(OSError):
        path.unlink()
    out: list[OutputChunk] = []
    pos = 0
    while pos + _REC.size <= len(raw):
        kind, n = _REC.unpack_from(raw, pos)
        pos += _REC.size
        if kind >= len(_STREAMS) or pos + n > len(raw):
            log.warning("saved output of command %s is damaged; keeping what was readable", exec_id)
            break
        out.append(OutputChunk(_STREAMS[kind], raw[pos:pos + n]))
        pos += n
    return out
