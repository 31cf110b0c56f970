"""Guest file facts (`FileStat`) as envd's `EntryInfo`, and bounded recursive listing."""

from __future__ import annotations

import posixpath
from typing import Any

from arcbox_vm.e2b.proto import Timestamp, filesystem_pb
from arcbox_vm.models import FileStat

FT = filesystem_pb.FileType
_TYPES = {"file": FT.FILE, "dir": FT.DIRECTORY, "symlink": FT.SYMLINK}
_CHAR = {"file": "-", "dir": "d", "symlink": "L"}


def permissions(st: FileStat) -> str:
    """As Go's FileMode.String(), which envd sends: "-rw-r--r--", "drwxr-xr-x"."""
    bits = "".join(c if st.mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
    return _CHAR.get(st.type, "?") + bits


def entry(st: FileStat, path: str, owners: tuple[dict[int, str], dict[int, str]]) -> Any:
    secs = int(st.mtime)
    users, groups = owners
    info = filesystem_pb.EntryInfo(
        name=posixpath.basename(path) or "/", type=_TYPES.get(st.type, FT.UNSPECIFIED), path=path, size=st.size,
        mode=st.mode & 0o7777, permissions=permissions(st), owner=users.get(st.uid, str(st.uid)),
        group=groups.get(st.gid, str(st.gid)),
        modified_time=Timestamp(seconds=secs, nanos=int((st.mtime - secs) * 1e9)),
        is_symlink=st.type == "symlink")
    if st.link_target:
        info.symlink_target = st.link_target
    return info


async def walk(manager: Any, sandbox_id: str, root: str, depth: int, max_entries: int) -> list[FileStat]:
    """The entries under `root` down to `depth` levels (1 = its own entries), breadth
    first, at most `max_entries`; symlinked directories are not followed."""
    out: list[FileStat] = []
    level = [root]
    for _ in range(max(1, depth)):
        below: list[str] = []
        for d in level:
            try:
                listing = await manager.list_dir(sandbox_id, d)
            except Exception:  # noqa: BLE001 - a directory that went away meanwhile (not the root)
                if d == root:
                    raise
                continue
            for st in listing:
                if len(out) >= max_entries:
                    return out
                out.append(st)
                if st.type == "dir":
                    below.append(st.path)
        if not below:
            break
        level = below
    return out
