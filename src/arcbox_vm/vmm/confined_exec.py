"""Run in place of a confined VMM: drop everything, then exec the VMM (the same pid).

    python -I -S confined_exec.py --uid U --gid G [--groups A,B] [--new-netns]
                                  [--die-with PID] -- /usr/bin/qemu-system-x86_64 ...

The daemon starts this file the way it starts any program (vfork + exec, nothing of
Python runs in a copy of the daemon: a forked copy of a process with gRPC's threads runs
their fork handlers, and one crashed a child before exec), and it does, as root and in
this order: a new, empty network namespace; no supplementary groups but `--groups`; the
gid; the uid (all of real, effective and saved — which leaves no capabilities);
no-new-privs; with `--die-with`, SIGKILL when that parent dies (set after the uid change,
which would clear it; and the parent must still be there). Then the VMM, with the
descriptors it was given. Standard library only; any failure is printed to stderr (the
VMM's log) and ends it with status 126 before the VMM runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
EXIT_CANNOT_CONFINE = 126


def _parse(args: list[str]) -> tuple[dict[str, str], list[str]]:
    if "--" not in args:
        raise ValueError("usage: confined_exec.py --uid U --gid G [options] -- PROGRAM [ARGS...]")
    split = args.index("--")
    opts: dict[str, str] = {}
    flags = iter(args[:split])
    for flag in flags:
        if flag == "--new-netns":
            opts["new-netns"] = "1"
        elif flag in ("--uid", "--gid", "--groups", "--die-with"):
            opts[flag[2:]] = next(flags)
        else:
            raise ValueError(f"unknown option {flag!r}")
    program = args[split + 1:]
    if not program or "uid" not in opts or "gid" not in opts:
        raise ValueError("--uid, --gid and a program are required")
    return opts, program


def _check(ok: int, what: str) -> None:
    if ok != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def confine(opts: dict[str, str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)  # the interpreter's own libc: no library search
    uid, gid = int(opts["uid"]), int(opts["gid"])
    if uid == 0 or gid == 0:
        raise ValueError("refusing to run a confined VMM as root")
    if "new-netns" in opts:
        _check(libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    os.setgroups([int(g) for g in opts.get("groups", "").split(",") if g])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if "die-with" in opts:
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != int(opts["die-with"]):  # it died before the request took effect
            os._exit(1)


def main(args: list[str]) -> int:
    try:
        opts, program = _parse(args)
        confine(opts)
        os.execv(program[0], program)
    except (OSError, ValueError) as exc:
        print(f"arcbox-vm: cannot start the VMM confined: {exc}", file=sys.stderr, flush=True)
    return EXIT_CANNOT_CONFINE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
