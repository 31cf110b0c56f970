"""Acting as a guest user for the filesystem calls of one file request.

A file request's ``uid``/``gid`` other than root are applied around every filesystem
call of that request (open, mkdir, rename, unlink, stat, readdir) with
setfsuid/setfsgid through ctypes, after setgroups to the user's supplementary groups
(those of its passwd entry, else just ``gid``). Without ctypes (python3-minimal) the
same is done with seteuid/setegid. Either way the kernel drops the capabilities that let
root ignore permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_CHOWN,
...) for as long as the ids are switched, so every path component, directory write
permission, sticky bit and ownership check is the kernel's own, made for that user:
"..", symlinks or odd modes get exactly what that user could do with a shell in the
guest, nothing more. This is what confines a non-root request: the kernel's own checks
for that user, not path rules of the agent's.

The switch is undone before the call returns; the agent has one thread, so nothing else
ever runs with those ids. Root requests (uid 0) run as the agent itself.
"""

from __future__ import annotations

import errno
import os

from arcbox_vm.agent.protocol import ErrorCode, ProtocolError

from .log import log

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, List, Optional

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
