"""FILE_WRITE: one atomic upload per channel.

Data goes to ``.NAME.arcbox-tmp-XXXXXXXX`` in the target's directory (opened once as a
directory fd, so later steps cannot be redirected by a renamed path), then fchown,
fchmod, fsync and rename over the target, only after the host's FILE_END: an interrupted
transfer never leaves a partial file. Any failure, an ERROR from the host, a lost
connection or a shutdown unlinks the temporary file (``abort``).

Each FILE_DATA frame is written to the file as it is decoded, and credit goes back with
WINDOW only for bytes already written, so the host can never have more than one window
in flight and the agent never buffers the file.

All filesystem calls run as the request's user (``fscreds``). A non-root write onto an
existing file also needs write permission on that file (checked by opening it for
writing), not just on its directory.
"""

from __future__ import annotations

import errno
import os
import stat

from arcbox_vm.agent import protocol
from arcbox_vm.agent.protocol import ErrorCode, MsgType, ProtocolError

from .fileinfo import failure, kind_text, safe_text
from .fscreds import Creds
from .log import log

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Dict, Optional

GRANT_BATCH = 256 * 1024  # write credit is returned in batches of at least this
TMP_TAG = ".arcbox-tmp-"


def _open_dir(path: str) -> int:
    """A directory fd usable with dir_fd= (O_PATH: needs search, not read, permission)."""
    return os.open(path, getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC)


def _split(path: str) -> tuple:
    parent, name = os.path.split(path)
    if name in ("", ".", ".."):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "path %r does not name a file" % path)
    return parent or "/", name


class WriteSession:
    """FILE_WRITE on one channel: temp file, data as it arrives, atomic rename at FILE_END."""

    kind = "write"

    def __init__(self, channel: int, req: Dict[str, Any], sink: Any) -> None:
        self.channel = channel
        self.sink = sink
        self.path = req["path"]
        self.mode = req["mode"]
        self.declared: Optional[int] = req["size"]
        self.make_parents = req["make_parents"]
        self.creds = Creds(req["uid"], req["gid"])
        self.dfd = -1
        self.fd = -1
        self.tmp: Optional[str] = None  # temp name inside dfd while it exists
        self.target = self.path  # after following a symlink at the path
        self.name = ""
        self.direct = False  # a character device, written in place
        self.written = 0
        self.granted = 0  # credit returned to the host so far
        self.unacked = 0
        self.done = False
        try:
            self._open()
        except OSError as exc:
            self.abort()
            err = failure(exc, "write", self.path, self.creds)
            if exc.errno == errno.ENOENT and not self.make_parents:
                err.message += "; a parent directory is missing (make_parents creates it)"
            raise err from None
        except BaseException:
            self.abort()
            raise

    def _open(self) -> None:
        parent, name = _split(self.path)
        with self.creds:
            if self.make_parents:
                self._make_parents(parent)
            self.dfd = _open_dir(parent)
            st = _lstat(name, self.dfd)
            if st is not None and stat.S_ISLNK(st.st_mode):
                self.target = os.path.realpath(self.path)
                os.close(self.dfd)
                self.dfd = -1
                parent, name = _split(self.target)
                self.dfd = _open_dir(parent)
                st = _lstat(name, self.dfd)
            self.name = name
            if st is not None:
                m = st.st_mode
                if stat.S_ISDIR(m):
                    raise ProtocolError(ErrorCode.IS_A_DIRECTORY, "cannot write %s: it is a directory" % self.target)
                if stat.S_ISCHR(m):
                    self.fd = os.open(name, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=self.dfd)
                    self.direct = True
                    return
                if not stat.S_ISREG(m):
                    raise ProtocolError(
                        ErrorCode.NOT_REGULAR,
                        "cannot write %s: it is not a regular file (%s)" % (self.target, kind_text(m)),
                    )
                if self.creds.switch:  # the user must be allowed to modify the file it replaces
                    os.close(os.open(name, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=self.dfd))
            if self.declared:
                self._check_space(self.declared)
            base = name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "surrogateescape")
            while True:
                tmp = ".%s%s%s" % (base, TMP_TAG, os.urandom(4).hex())
                try:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                    self.fd = os.open(tmp, flags, 0o600, dir_fd=self.dfd)
                except FileExistsError:
                    continue
                self.tmp = tmp
                return

    def _make_parents(self, parent: str) -> None:
        """mkdir -p, each new directory 0755 and owned by the request's uid/gid."""
        if os.path.isdir(parent):
            return
        cur = ""
        for part in [p for p in parent.split("/") if p]:
            cur += "/" + part
            try:
                st = os.stat(cur)
            except FileNotFoundError:
                st = None
            except OSError as exc:
                raise failure(exc, "create directory", cur, self.creds) from None
            if st is not None:
                if not stat.S_ISDIR(st.st_mode):
                    raise ProtocolError(ErrorCode.NOT_A_DIRECTORY, "cannot create directory %s: %s exists and is not a "
                                        "directory" % (parent, cur))
                continue
            try:
                os.mkdir(cur, 0o755)
            except FileExistsError:
                continue
            except OSError as exc:
                raise failure(exc, "create directory", cur, self.creds) from None
            try:
                fd = os.open(cur, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    self._set_owner(fd)
                    os.fchmod(fd, 0o755)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise failure(exc, "set up new directory", cur, self.creds) from None

    def _set_owner(self, fd: int) -> None:
        if self.creds.chown is None:
            return
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != self.creds.chown:
            os.fchown(fd, self.creds.uid, self.creds.gid)

    def _check_space(self, size: int) -> None:
        try:
            vfs = os.statvfs(self.dfd)
        except (OSError, TypeError):
            return
        free = (vfs.f_bfree if os.geteuid() == 0 and not self.creds.switch else vfs.f_bavail) * vfs.f_frsize
        if vfs.f_blocks and size > free:
            raise ProtocolError(
                ErrorCode.NO_SPACE, "cannot write %s: %d bytes do not fit, the filesystem has %d bytes free"
                % (self.target, size, free)
            )

    def on_data(self, data: bytes) -> None:
        received = self.written + len(data)
        if received > protocol.INITIAL_WINDOW + self.granted:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "FILE_DATA beyond the granted window", self.channel)
        if self.declared is not None and received > self.declared:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "more data than the declared size of %d bytes" % self.declared, self.channel
            )
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            raise failure(exc, "write", self.target, self.creds) from None
        self.written = received
        self.unacked += len(data)
        if self.unacked >= GRANT_BATCH:
            self.sink.send_frame(MsgType.WINDOW, self.channel, protocol.WINDOW_STRUCT.pack(self.unacked))
            self.granted += self.unacked
            self.unacked = 0

    def finish(self) -> Dict[str, Any]:
        """FILE_END: check the size, set owner/mode, fsync, rename into place. Returns FILE_DONE's body."""
        if self.declared is not None and self.written != self.declared:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                "cannot write %s: got %d bytes, the request declared %d" % (self.target, self.written, self.declared),
            )
        if not self.direct:
            step = "write"
            try:
                with self.creds:
                    step = "set the owner of"
                    self._set_owner(self.fd)
                    step = "set the mode of"
                    os.fchmod(self.fd, self.mode)
                    step = "write"  # fsync reports delayed write errors (ENOSPC, EIO)
                    os.fsync(self.fd)
                    step = "replace"
                    os.rename(self.tmp, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)  # type: ignore[arg-type]
                    self.tmp = None
            except OSError as exc:
                raise failure(exc, step, self.target, self.creds) from None
            self._sync_dir()
        self.done = True
        self.close()
        return {"size": self.written, "path": safe_text(self.target)}

    def _sync_dir(self) -> None:
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.dfd)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def close(self) -> None:
        for attr in ("fd", "dfd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                try:
                    os.close(fd)
                except OSError:
                    pass

    def abort(self) -> None:
        """Drop the transfer: close the file and remove the temporary file. Idempotent."""
        self.done = True
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        if self.tmp is not None and self.dfd >= 0:
            tmp, self.tmp = self.tmp, None
            try:
                with self.creds:
                    os.unlink(tmp, dir_fd=self.dfd)
            except Exception:
                try:  # e.g. the switch itself failed: root can always remove it
                    os.unlink(tmp, dir_fd=self.dfd)
                except OSError as exc:
                    log("channel %d: cannot remove temporary file %s: %s" % (self.channel, tmp, exc))
        self.close()


def _lstat(name: str, dfd: int) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
