"""FILE_STAT and FILE_LIST: one-shot questions about paths, answered in a single frame.

Both run as the request's user (``fscreds``) and are bounded so the answer always fits
one frame: a listing stops at its entry limit or at ``LIST_BYTES`` of encoded entries,
whichever comes first, and says it was truncated.
"""

from __future__ import annotations

import json
import os
import stat

from .fileinfo import failure, safe_text, stat_body
from .fscreds import Creds

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Dict, List

LIST_BYTES = 900 * 1024  # encoded size budget of one FILE_LIST_RESULT (frames are <= 1 MiB)


def stat_path(req: Dict[str, Any]) -> Dict[str, Any]:
    """FILE_STAT's answer: the stat object of ``path`` (lstat unless follow_symlinks)."""
    path = req["path"]
    creds = Creds(req["uid"], req["gid"])
    try:
        with creds:
            st = os.stat(path, follow_symlinks=req["follow_symlinks"])
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
    except OSError as exc:
        raise failure(exc, "stat", path, creds) from None
    return stat_body(path, st, link)


def list_dir(req: Dict[str, Any]) -> Dict[str, Any]:
    """FILE_LIST's answer: up to ``limit`` entries (lstat), sorted by name, within LIST_BYTES.

    A huge directory is not read to its end: the listing stops at the limit with
    ``truncated`` true (which entries are included is then the directory's order).
    Entries carry no ``path``: it is the listed path joined with ``name``.
    """
    path = req["path"]
    limit = req["limit"]
    creds = Creds(req["uid"], req["gid"])
    entries: List[Dict[str, Any]] = []
    truncated = False
    budget = LIST_BYTES - 100 - 6 * len(path)
    try:
        with creds:
            with os.scandir(path) as it:
                for entry in it:
                    if len(entries) >= limit:
                        truncated = True
                        break
                    try:
                        st = entry.stat(follow_symlinks=False)
                        link = os.readlink(entry.path) if stat.S_ISLNK(st.st_mode) else ""
                    except OSError:
                        continue  # vanished meanwhile
                    body = stat_body(entry.path, st, link, with_path=False)
                    cost = 150 + _json_len(body["name"]) + _json_len(body["link_target"])
                    if cost > budget:
                        truncated = True
                        break
                    budget -= cost
                    entries.append(body)
    except OSError as exc:
        raise failure(exc, "list", path, creds) from None
    entries.sort(key=lambda e: e["name"])
    return {"path": safe_text(path), "entries": entries, "truncated": truncated}


def _json_len(s: str) -> int:
    return len(s) + 2 if s.isascii() and '"' not in s and "\\" not in s else len(json.dumps(s))
