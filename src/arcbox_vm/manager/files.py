"""File transfer for SandboxManager: argument checks, the size limit, the agent calls.

The manager's `write_file` / `read_file` / `stat_path` / `list_dir` are thin wrappers
around these. Transfers never change the sandbox's state (a sandbox stays READY while a
file moves); they need a READY or RUNNING sandbox, and fail with AgentDisconnected if the
sandbox stops meanwhile.
"""

from __future__ import annotations

from collections.abc import AsyncIterable

from arcbox_vm.agent import protocol
from arcbox_vm.agent.host import AgentConnection, DirListing, FileReader
from arcbox_vm.errors import FileTooLarge, InvalidArgument
from arcbox_vm.models import FileStat

MIB = 1 << 20
MAX_ID = 0xFFFFFFFE


def limit_bytes(max_file_mib: int) -> int:
    """`daemon.max_file_mib` in bytes (0 = no limit)."""
    return max(0, int(max_file_mib)) * MIB


def check_path(path: object) -> str:
    try:
        return protocol.check_path(path)
    except protocol.ProtocolError as exc:
        raise InvalidArgument(exc.message) from None


def check_write_args(path: str, mode: int, uid: int, gid: int, size: int | None, limit: int) -> None:
    check_path(path)
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise InvalidArgument(f"mode must be an integer in 0..0o7777 (permission bits), got {mode!r}")
    for name, value in (("uid", uid), ("gid", gid)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
            raise InvalidArgument(f"{name} must be an integer in 0..{MAX_ID}, got {value!r}")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"size must be a non-negative integer or None, got {size!r}")
        if limit and size > limit:
            raise FileTooLarge(f"{path}: {size} bytes are too many; {_limit_hint(limit)}")


def _limit_hint(limit: int) -> str:
    return f"the file size limit is {limit} bytes ({limit // MIB} MiB, daemon.max_file_mib)"


async def write_file(agent: AgentConnection, path: str, data: AsyncIterable[bytes], *, mode: int, uid: int,
                     gid: int, make_parents: bool, size: int | None, limit: int) -> int:
    check_write_args(path, mode, uid, gid, size, limit)
    try:
        return await agent.write_file(path, data, mode=mode, uid=uid, gid=gid, make_parents=make_parents,
                                      size=size, max_bytes=limit)
    except FileTooLarge as exc:
        if getattr(exc, "code", None) is None:  # our limit, not the guest's EFBIG
            raise FileTooLarge(f"{path}: the upload is too large; {_limit_hint(limit)}") from None
        raise


async def read_file(agent: AgentConnection, path: str, *, limit: int) -> FileReader:
    check_path(path)
    try:
        return await agent.read_file(path, max_bytes=limit)
    except FileTooLarge as exc:
        if getattr(exc, "code", None) is None:
            raise FileTooLarge(f"{exc}; {_limit_hint(limit)}") from None
        raise


async def stat_path(agent: AgentConnection, path: str, *, follow_symlinks: bool = True) -> FileStat:
    return await agent.stat(check_path(path), follow_symlinks=follow_symlinks)


async def list_dir(agent: AgentConnection, path: str) -> DirListing:
    return await agent.list_dir(check_path(path))
