"""`arcbox-vm cp SRC DST`: one file into or out of a sandbox (exactly one side `ID:/path`).

Like `docker cp` for single files: a destination that is an existing directory (or ends
in '/') receives the file under its source name; the permission bits are kept. `-` is
stdin (upload) or stdout (download). Downloads land in a temporary file next to the
destination and are renamed into place, so an interrupted copy leaves no half file.
Everything streams in 1 MiB chunks; a progress bar shows on stderr for files of 8 MiB
or more when stderr is a terminal. Directories are not supported (yet): tar them.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from arcbox_vm.cli.exec_cmd import write_all
from arcbox_vm.cli.parsing import RemotePath, parse_cp_operands
from arcbox_vm.cli.tty import stdin_chunks
from arcbox_vm.client.aio import AsyncClient
from arcbox_vm.client.sources import iter_chunks
from arcbox_vm.errors import GuestFileNotFound, InvalidArgument

__all__ = ["PROGRESS_MIN_BYTES", "copy"]

PROGRESS_MIN_BYTES = 8 * 1024 * 1024


Advance = Callable[[int], None]


@contextlib.contextmanager
def _progress(label: str, total: int | None) -> Iterator[Advance]:
    if total is None or total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


async def _counted(chunks: AsyncIterator[bytes], advance: Advance) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk
        advance(len(chunk))


async def _remote_is_dir(client: AsyncClient, dst: RemotePath) -> bool:
    try:
        return (await client.stat(dst.sandbox_id, dst.path)).type == "dir"
    except GuestFileNotFound:
        return False


async def upload(client: AsyncClient, src: str, dst: RemotePath) -> None:
    if src == "-":
        chunks: AsyncIterator[bytes] = stdin_chunks(0)
        size, mode, name = None, 0o644, ""
    else:
        st = os.stat(src)
        if os.path.isdir(src):
            raise InvalidArgument(f"cp: {src} is a directory; copying directories is not supported (tar it, "
                                  "copy the archive and untar it with exec)")
        chunks = iter_chunks(Path(src))
        size, mode, name = st.st_size, st.st_mode & 0o777, os.path.basename(os.path.normpath(src))
    target = dst.path
    if target.endswith("/") or await _remote_is_dir(client, dst):
        if not name:
            raise InvalidArgument(f"cp: {dst} is a directory; name the file to create from stdin")
        target = posixpath.join(target, name)
    with _progress(f"{name or 'stdin'} → {dst.sandbox_id}", size) as advance:
        await client.upload(dst.sandbox_id, target, _counted(chunks, advance), mode=mode, size=size)


def local_name(guest_path: str) -> str:
    """The name a downloaded file gets in a local directory: the last component of the path
    the USER asked for — never a name the guest reports (a hostile guest could answer
    "../../.bashrc" or "/etc/cron.d/x")."""
    name = posixpath.basename(posixpath.normpath(guest_path))
    if name in ("", ".", "..", "/") or "/" in name or "\0" in name:
        raise InvalidArgument(f"cp: cannot name a local file after {guest_path!r}; give the destination file name")
    return name


def local_mode(guest_mode: int) -> int:
    """Permission bits for a downloaded file: the guest's rwx bits at most, never setuid,
    setgid or sticky, and never more than this process's umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    return (guest_mode & 0o777 or 0o644) & ~umask


async def download(client: AsyncClient, src: RemotePath, dst: str) -> None:
    st = await client.stat(src.sandbox_id, src.path)
    if st.type == "dir":
        raise InvalidArgument(f"cp: {src} is a directory; copying directories is not supported (tar it in the "
                              "sandbox with exec, then copy the archive)")
    stream = client.download(src.sandbox_id, src.path)
    if dst == "-":
        async for chunk in stream:
            write_all(1, chunk)
        return
    target = dst
    if dst.endswith("/") or os.path.isdir(dst):
        target = os.path.join(dst, local_name(src.path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".part",
                               dir=os.path.dirname(os.path.abspath(target)))
    try:
        with os.fdopen(fd, "wb") as f, _progress(f"{src.sandbox_id} → {os.path.basename(target)}", st.size) as adv:
            async for chunk in stream:
                f.write(chunk)
                adv(len(chunk))
            os.fchmod(f.fileno(), local_mode(st.mode))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def copy(client: AsyncClient, src: str, dst: str) -> None:
    """Copy SRC to DST; exactly one is `ID:/path`."""
    s, d = parse_cp_operands(src, dst)
    if isinstance(d, RemotePath):
        assert isinstance(s, str)
        await upload(client, s, d)
    else:
        assert isinstance(s, RemotePath)
        await download(client, s, d)
