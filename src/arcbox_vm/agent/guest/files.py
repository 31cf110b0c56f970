"""File transfer for the agent: atomic writes, streamed reads, stat and directory listings.

Everything here runs on the agent's single event-loop thread and never blocks it for
long. A write session writes each FILE_DATA frame to the file as it arrives (the channel
is read at most 256 KiB at a time) and returns credit with WINDOW only for bytes already
written, so the host can never have more than one window in flight. A read session is
pumped by the loop (``Agent._pump_files``): at most ``READ_BUDGET`` bytes per loop
iteration across all reads, never beyond the host's credit, and not at all while the
channel's output queue is congested. Neither side ever buffers a whole file.

Writes are atomic: data goes to ``.NAME.arcbox-tmp-XXXXXXXX`` in the target's directory
(opened once as a directory fd, so later steps cannot be redirected by a renamed path),
then fchown, fchmod, fsync and rename over the target. Any failure, an ERROR from the
host, a lost connection or a shutdown unlinks the temporary file.

Credentials: a request's ``uid``/``gid`` other than root are applied around every
filesystem call of that request (open, mkdir, rename, unlink, stat, readdir) with
setfsuid/setfsgid through ctypes, after setgroups to the user's supplementary groups
(those of its passwd entry, else just ``gid``). Without ctypes (python3-minimal) the
same is done with seteuid/setegid. Either way the kernel drops the capabilities that let
root ignore permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_CHOWN,
...) for as long as the ids are switched, so every path component, directory write
permission, sticky bit and ownership check is the kernel's own, made for that user:
"..", symlinks or odd modes get exactly what that user could do with a shell in the
guest, nothing more. A non-root write onto an existing file also needs write permission
on that file (checked by opening it for writing), not just on its directory. The switch
is undone before the call returns; the agent has one thread, so nothing else ever runs
with those ids. Root requests (uid 0) run as the agent itself.
"""

from __future__ import annotations

import errno
import json
import os
import stat

from arcbox_vm.agent import protocol
from arcbox_vm.agent.protocol import ErrorCode, MsgType, ProtocolError

from .log import log

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Dict, List, Optional

READ_BUDGET = 256 * 1024  # file bytes read per loop iteration, all read sessions together
GRANT_BATCH = 256 * 1024  # write credit is returned in batches of at least this
LIST_BYTES = 900 * 1024  # encoded size budget of one FILE_LIST_RESULT (frames are <= 1 MiB)
MAX_FILE_SESSIONS = 64  # concurrent reads + writes
TMP_TAG = ".arcbox-tmp-"

_ERRNO_CODES = {
    errno.ENOENT: ErrorCode.NOT_FOUND,
    errno.EACCES: ErrorCode.PERMISSION,
    errno.EPERM: ErrorCode.PERMISSION,
    errno.EROFS: ErrorCode.PERMISSION,
    errno.EISDIR: ErrorCode.IS_A_DIRECTORY,
    errno.ENOTDIR: ErrorCode.NOT_A_DIRECTORY,
    errno.EEXIST: ErrorCode.EXISTS,
    errno.ENOTEMPTY: ErrorCode.EXISTS,
    errno.ENOSPC: ErrorCode.NO_SPACE,
    errno.EDQUOT: ErrorCode.NO_SPACE,
    errno.EFBIG: ErrorCode.TOO_LARGE,
    errno.ENAMETOOLONG: ErrorCode.BAD_REQUEST,
}


def failure(exc: OSError, verb: str, path: str, creds: Optional[Creds] = None) -> ProtocolError:
    """A ProtocolError for an OSError, e.g. ``cannot write /a/b: No such file or directory``."""
    code = _ERRNO_CODES.get(exc.errno or 0, ErrorCode.IO)
    reason = exc.strerror or str(exc)
    msg = "cannot %s %s: %s" % (verb, path, reason)
    if creds is not None and creds.switch:
        msg += " (as uid %d, gid %d)" % (creds.uid, creds.gid)
    return ProtocolError(code, msg)


def safe_text(s: str) -> str:
    """File names that are not UTF-8 (surrogate-escaped) are shown with U+FFFD."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def stat_body(path: str, st: os.stat_result, link_target: str = "", with_path: bool = True) -> Dict[str, Any]:
    m = st.st_mode
    if stat.S_ISREG(m):
        kind = "file"
    elif stat.S_ISDIR(m):
        kind = "dir"
    elif stat.S_ISLNK(m):
        kind = "symlink"
    else:
        kind = "other"
    body = {
        "name": safe_text(os.path.basename(path.rstrip("/")) or "/"),
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(m),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime": st.st_mtime,
        "link_target": safe_text(link_target),
    }
    if with_path:
        body["path"] = safe_text(path)
    return body


# ---- credentials --------------------------------------------------------------------------

_libc: Any = None  # None = not tried, False = no ctypes, else the CDLL


def _get_libc() -> Any:
    global _libc
    if _libc is None:
        try:
            import ctypes

            lib = ctypes.CDLL(None, use_errno=True)
            for fn in (lib.setfsuid, lib.setfsgid):
                fn.argtypes = [ctypes.c_uint32]
                fn.restype = ctypes.c_int
            _libc = lib
        except Exception as exc:  # no ctypes (python3-minimal), no symbol
            log("setfsuid unavailable (%s); file requests switch ids with seteuid" % exc)
            _libc = False
    return _libc


_NO_ID = 0xFFFFFFFF  # setfs[ug]id(-1) changes nothing and returns the current id


class Creds:
    """The ids a file request acts as. ``with creds:`` switches to them (if needed) and back."""

    __slots__ = ("uid", "gid", "switch", "chown", "groups", "_saved_groups", "_saved_egid", "_active")

    def __init__(self, uid: int, gid: int) -> None:
        self.uid = uid
        self.gid = gid
        euid = os.geteuid()
        if euid == 0:
            self.switch = uid != 0
            self.chown: Optional[tuple] = (uid, gid)
        else:  # not root (tests on a normal host): it can only act as itself
            if uid not in (0, euid) or gid not in (0, os.getegid()):
                raise ProtocolError(
                    ErrorCode.PERMISSION, "the agent runs as uid %d, not root: it cannot act as uid %d gid %d" % (euid, uid, gid)
                )
            self.switch = False
            self.chown = None
        self.groups: List[int] = []
        if self.switch:
            self.groups = [gid]
            try:
                import pwd

                name = pwd.getpwuid(uid).pw_name
                self.groups = sorted(set(os.getgrouplist(name, gid)))
            except (KeyError, OSError):
                pass
        self._active = False

    def __enter__(self) -> Creds:
        if self.switch:
            self._saved_groups = os.getgroups()
            self._saved_egid = os.getegid()
            os.setgroups(self.groups)
            self._active = True
            lib = _get_libc()
            try:
                if lib:
                    lib.setfsgid(self.gid)
                    lib.setfsuid(self.uid)
                    if lib.setfsgid(_NO_ID) != self.gid or lib.setfsuid(_NO_ID) != self.uid:
                        raise OSError(errno.EPERM, "setfsuid/setfsgid to %d/%d refused" % (self.uid, self.gid))
                else:
                    os.setegid(self.gid)
                    os.seteuid(self.uid)
            except BaseException:
                self._restore()
                raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.switch:
            self._restore()

    def _restore(self) -> None:
        if not self._active:
            return
        lib = _get_libc()
        if lib:
            lib.setfsuid(0)
            lib.setfsgid(self._saved_egid)
        else:
            os.seteuid(0)
            os.setegid(self._saved_egid)
        os.setgroups(self._saved_groups)
        self._active = False


def _open_dir(path: str) -> int:
    """A directory fd usable with dir_fd= (O_PATH: needs search, not read, permission)."""
    return os.open(path, getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC)


def _split(path: str) -> tuple:
    parent, name = os.path.split(path)
    if name in ("", ".", ".."):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "path %r does not name a file" % path)
    return parent or "/", name


# ---- write ------------------------------------------------------------------------------


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
                        ErrorCode.NOT_REGULAR, "cannot write %s: it is not a regular file (%s)" % (self.target, _kind(m))
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


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "a special file"


# ---- read -------------------------------------------------------------------------------


class ReadSession:
    """FILE_READ on one channel: FILE_INFO, then FILE_DATA as credit allows, then FILE_END."""

    kind = "read"

    def __init__(self, channel: int, req: Dict[str, Any], sink: Any) -> None:
        self.channel = channel
        self.sink = sink
        self.path = req["path"]
        self.creds = Creds(req["uid"], req["gid"])
        self.credit = protocol.INITIAL_WINDOW
        self.sent = 0
        self.done = False
        self.fd = -1
        try:
            with self.creds:
                # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
                self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            st = os.fstat(self.fd)
        except OSError as exc:
            self.abort()
            raise failure(exc, "read", self.path, self.creds) from None
        if stat.S_ISDIR(st.st_mode):
            self.abort()
            raise ProtocolError(ErrorCode.IS_A_DIRECTORY, "cannot read %s: it is a directory (list it instead)" % self.path)
        if not stat.S_ISREG(st.st_mode):
            self.abort()
            raise ProtocolError(ErrorCode.NOT_REGULAR, "cannot read %s: it is not a regular file (%s)" % (self.path,
                                                                                                     _kind(st.st_mode)))
        self.info = stat_body(self.path, st)

    def wants(self) -> bool:
        return not self.done and self.credit > 0

    def pump(self, budget: int) -> int:
        """Send one FILE_DATA of at most ``budget`` bytes (or FILE_END at EOF). Returns bytes sent."""
        n = min(protocol.DATA_CHUNK, self.credit, budget)
        if n <= 0:
            return 0
        try:
            data = os.read(self.fd, n)
        except OSError as exc:
            raise failure(exc, "read", self.path, self.creds) from None
        if not data:
            self.sink.send_frame(MsgType.FILE_END, self.channel)
            self.done = True
            self.abort()
            return 0
        self.sink.send_frame(MsgType.FILE_DATA, self.channel, data)
        self.credit -= len(data)
        self.sent += len(data)
        return len(data)

    def on_window(self, increment: int) -> None:
        self.credit += increment

    def abort(self) -> None:
        self.done = True
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


# ---- stat and list ----------------------------------------------------------------------


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
