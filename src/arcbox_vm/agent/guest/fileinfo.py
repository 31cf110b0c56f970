"""How files and filesystem failures are described to the host.

Shared by every file request (write, read, stat, list), so the host sees one shape of
stat object, one spelling of names that are not UTF-8, and one mapping from errno to the
protocol's error codes, whichever request hit it.
"""

from __future__ import annotations

import errno
import os
import stat

from arcbox_vm.agent.protocol import ErrorCode, ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Dict, Optional

    from .fscreds import Creds

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


def kind_text(mode: int) -> str:
    """What a file that cannot be read or written is, for the error message ("a FIFO", ...)."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "a special file"
