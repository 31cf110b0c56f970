"""Starting an exec session's process: user, environment, cwd, stdio, and fork+exec.

A hand-written fork/exec rather than subprocess, because:

- ``import subprocess`` costs ~0.3 s under software emulation, paid on the first EXEC;
- the child needs setsid + TIOCSCTTY for ttys and a real uid/gid/groups switch, all
  between fork and exec, and the agent is single-threaded so running Python there is safe;
- the parent must never reap through Popen (PID 1 reaps with waitpid(-1)).

Failures between fork and exec (bad cwd, exec error, setuid refused) travel back on a
close-on-exec pipe as ``stage:errno:detail``: EOF on that pipe means exec succeeded.
They become SpawnError with a protocol error code and a message that names the command,
so the host always gets an ERROR instead of a session that never starts.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import struct

from arcbox_vm.agent.protocol import ErrorCode

STDOUT_PIPE_SIZE = 1 << 20  # bytes; the default 64 KiB means one loop wakeup per 64 KiB of output
_F_SETPIPE_SZ = 1031

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Dict, List, Optional

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TTY_TERM = "xterm-256color"


_batch = False  # the agent runs SCHED_BATCH; children are put back to SCHED_OTHER


def batch_scheduling() -> None:
    """Run the agent as SCHED_BATCH (a guest's PID 1 only).

    A batch task does not preempt the running one when it wakes. When a command writes
    output, the pipe's first bytes would otherwise wake the agent at once, which then
    reads a few KiB per switch; as a batch task it waits for its turn while the command
    fills the pipe (1 MiB), and reads it in big bites. Measured under emulation on one
    vCPU: a Python reader gets about 1.4x the throughput. The agent still gets its fair
    share of the CPU, and an idle CPU runs it at once (no added latency when idle).
    """
    global _batch
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        _batch = True
    except (AttributeError, OSError):
        pass


class SpawnError(Exception):
    """The command could not be started; ``code`` is a protocol ErrorCode value."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Identity:
    """Who the child runs as. ``switch`` False means "as the agent" (no set*id calls)."""

    __slots__ = ("uid", "gid", "groups", "name", "home", "switch")

    def __init__(self, uid: int, gid: int, groups: List[int], name: str, home: str, switch: bool) -> None:
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.name = name
        self.home = home
        self.switch = switch


def _check_id(text: str, what: str) -> int:
    value = int(text)
    if value >= 0xFFFFFFFF:
        raise SpawnError(ErrorCode.NO_SUCH_USER, "%s %s is out of range" % (what, text))
    return value


_users: Dict[str, Identity] = {}  # resolve_user's answers while /etc/passwd and /etc/group are unchanged
_users_key: Optional[tuple] = None
_ACCOUNT_FILES = ("/etc/passwd", "/etc/group")


def resolve_user(spec: str) -> Identity:
    """``_resolve_user`` cached: an NSS lookup reads and parses /etc/passwd (and /etc/group
    for groups) on every call, 1-4 ms under emulation on each EXEC; two stats tell whether
    the answer can have changed (size, mtime and inode of both files)."""
    global _users_key
    key = []
    for name in _ACCOUNT_FILES:
        try:
            st = os.stat(name)
            key.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            key.append(None)
    if tuple(key) != _users_key:
        _users.clear()
        _users_key = tuple(key)
    ident = _users.get(spec)
    if ident is None:
        ident = _resolve_user(spec)
        if len(_users) < 64:
            _users[spec] = ident
    return ident


def _resolve_user(spec: str) -> Identity:
    """Parse the EXEC ``user`` field.

    "" = the agent's own identity (root in a guest); "root"; a name; "uid"; "uid:gid"
    or "name:group" (either side a name or a number). A uid without a passwd entry runs
    with gid = uid, HOME=/ and no supplementary groups (never root's group by accident).
    """
    import pwd

    if spec == "":
        uid = os.getuid()
        try:
            me = pwd.getpwuid(uid)
            return Identity(uid, os.getgid(), [], me.pw_name, me.pw_dir, False)
        except KeyError:
            return Identity(uid, os.getgid(), [], str(uid), "/", False)
    user, sep, group = spec.partition(":")
    pw: Optional[pwd.struct_passwd] = None
    if user.isdigit():
        uid = _check_id(user, "uid")
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            pw = None
    elif user:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            if user != "root":
                raise SpawnError(ErrorCode.NO_SUCH_USER, "no such user %r in the guest's /etc/passwd" % user) from None
        uid = pw.pw_uid if pw else 0
    else:
        raise SpawnError(ErrorCode.NO_SUCH_USER, "bad user spec %r: expected name, uid or uid:gid" % spec)
    if sep:
        if group.isdigit():
            gid = _check_id(group, "gid")
        elif group:
            import grp

            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise SpawnError(ErrorCode.NO_SUCH_USER, "no such group %r in the guest's /etc/group" % group) from None
        else:
            raise SpawnError(ErrorCode.NO_SUCH_USER, "bad user spec %r: empty group" % spec)
    else:
        gid = pw.pw_gid if pw else uid
    name = pw.pw_name if pw else (user if not user.isdigit() else str(uid))
    home = pw.pw_dir if pw else ("/root" if uid == 0 else "/")
    groups = [gid]
    if pw is not None:
        try:
            groups = sorted(set(os.getgrouplist(pw.pw_name, gid)))
        except OSError:
            groups = [gid]
    return Identity(uid, gid, groups, name, home, True)


def build_env(ident: Identity, request_env: Dict[str, str], tty: bool) -> Dict[str, str]:
    """The child's environment: fixed defaults overlaid with the request (the agent's own is not inherited)."""
    env = {"PATH": DEFAULT_PATH, "HOME": ident.home, "USER": ident.name, "LOGNAME": ident.name}
    if tty:
        env["TERM"] = TTY_TERM
    env.update(request_env)
    return env


def default_cwd(ident: Identity) -> str:
    return ident.home if ident.home and os.path.isdir(ident.home) else "/"


def set_winsize(fd: int, rows: int, cols: int) -> None:
    import fcntl
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Child:
    """A started process and the parent's ends of its stdio.

    Pipe mode: ``stdin`` (write end or None when stdin is /dev/null), ``stdout``, ``stderr``.
    TTY mode: ``master`` carries input and the merged output; the others are None.
    """

    __slots__ = ("pid", "stdin", "stdout", "stderr", "master")

    def __init__(
        self, pid: int, stdin: Optional[int], stdout: Optional[int], stderr: Optional[int], master: Optional[int]
    ) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.master = master


def spawn(argv: List[str], env: Dict[str, str], cwd: str, ident: Identity, tty: bool, rows: int, cols: int, stdin: bool) -> Child:
    """fork+exec ``argv`` (PATH lookup in ``env``) in a new session; raises SpawnError.

    The child is a session and process-group leader (pid == pgid == sid) so a timeout or a
    SIGNAL frame reaches everything it started. All parent fds are non-blocking.
    """
    parent_fds: List[int] = []
    child_fds: List[int] = []
    fast = not tty and not ident.switch
    try:
        if tty:
            master, slave = os.openpty()
            parent_fds.append(master)
            child_fds.append(slave)
            set_winsize(master, rows, cols)
            child_io = (slave, slave, slave)
            result = Child(0, None, None, None, master)
        else:
            if stdin:
                in_r, in_w = os.pipe()
                parent_fds.append(in_w)
                child_fds.append(in_r)
            else:
                in_r, in_w = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), None
                child_fds.append(in_r)
            out_r, out_w = os.pipe()
            _grow_pipe(out_r)
            err_r, err_w = os.pipe()
            parent_fds += [out_r, err_r]
            child_fds += [out_w, err_w]
            child_io = (in_r, out_w, err_w)
            result = Child(0, in_w, out_r, err_r, None)
        if fast and min(child_io) > 2:
            pid = _posix_spawn(argv, env, cwd, child_io)
            if pid:
                _close_all(child_fds)
                for fd in parent_fds:
                    os.set_blocking(fd, False)
                result.pid = pid
                return result
        err_r_pipe, err_w_pipe = os.pipe()  # both close-on-exec (PEP 446)
    except OSError as exc:
        _close_all(parent_fds + child_fds)
        why = "creating stdio failed: %s" % exc.strerror
        raise SpawnError(ErrorCode.SPAWN_FAILED, "cannot start %r: %s" % (argv[0], why)) from None

    try:
        pid = os.fork()
    except OSError as exc:
        _close_all(parent_fds + child_fds + [err_r_pipe, err_w_pipe])
        raise SpawnError(ErrorCode.SPAWN_FAILED, "cannot start %r: fork failed: %s" % (argv[0], exc.strerror)) from None
    if pid == 0:
        _child(argv, env, cwd, ident, tty, child_io, err_w_pipe)  # never returns

    _close_all(child_fds + [err_w_pipe])
    report = bytearray()
    try:
        while True:
            chunk = os.read(err_r_pipe, 4096)  # blocks only until the child execs or fails
            if not chunk:
                break
            report += chunk
    finally:
        os.close(err_r_pipe)
    if report:
        # the child exits right after reporting; reap it here so no zombie lingers
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        _close_all(parent_fds)
        raise _spawn_error(argv, cwd, env, bytes(report))
    for fd in parent_fds:
        os.set_blocking(fd, False)
    result.pid = pid
    return result


_start_dir = -1  # the agent's own working directory (an fd), to return to after a spawn


def _posix_spawn(argv: List[str], env: Dict[str, str], cwd: str, io: tuple) -> int:
    """The common case (pipes, the agent's own user) with posix_spawn; 0 = use fork instead.

    glibc's posix_spawn is a vfork: the child shares the agent's memory until it execs, so
    nothing is copied and no Python runs in it. A Python fork copies the page tables of the
    whole interpreter and then runs Python in the child (signal resets, setsid, dup2,
    chdir, execve along PATH), touching copy-on-write pages: under emulation that was
    ~9 ms of a 30 ms exec of ``true``. The working directory is set by a chdir in the agent
    around the call (single-threaded, so nothing else sees it) and the program is looked
    up along the child's PATH there, as ``_exec`` does. Anything unusual — a chdir or
    lookup that fails, posix_spawn refusing (ENOEXEC: a script without ``#!``, EACCES) —
    returns 0 and the fork path runs, reproducing exactly its error reports; nothing has
    been started then.
    """
    global _start_dir
    if _start_dir < 0:
        _start_dir = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(cwd)
    except OSError:
        return 0
    try:
        path = _lookup(argv[0], env)
        if path is None:
            return 0
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(io)]
        sigdef = [sig for sig in (getattr(signal, "SIGPIPE", None), getattr(signal, "SIGXFSZ", None)) if sig]
        kw: Dict[str, object] = {}
        if _batch:  # (scheduler=None is a SystemError in Python 3.11: pass it only when set)
            kw["scheduler"] = (os.SCHED_OTHER, os.sched_param(0))
        return os.posix_spawn(path, argv, env, file_actions=actions, setsid=True, setsigdef=sigdef, **kw)
    except Exception:  # OSError from the exec; NotImplementedError where setsid is missing
        return 0
    finally:
        os.fchdir(_start_dir)


def _lookup(prog: str, env: Dict[str, str]) -> Optional[str]:
    """execvp's choice for ``prog`` in ``env``'s PATH: the first regular file with an x bit
    (one stat per directory; if it is not executable for us after all, posix_spawn fails
    and the fork path searches on exactly as execvp does)."""
    if "/" in prog:
        return prog
    for d in env.get("PATH", DEFAULT_PATH).split(":"):
        full = (d or ".") + "/" + prog
        try:
            st = os.stat(full)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return full
    return None


def _close_all(fds: List[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _spawn_error(argv: List[str], cwd: str, env: Dict[str, str], report: bytes) -> SpawnError:
    stage, _, rest = report.decode("utf-8", "replace").partition(":")
    num, _, detail = rest.partition(":")
    err = int(num) if num.isdigit() else 0
    why = os.strerror(err) if err else detail
    cmd = argv[0]
    if stage == "path":
        return SpawnError(ErrorCode.NOT_FOUND, "%s: command not found (PATH=%s)" % (cmd, env.get("PATH", "")))
    if stage == "exec":
        if err in (errno.ENOENT, errno.ENOTDIR):
            return SpawnError(ErrorCode.NOT_FOUND, "cannot execute %s: %s" % (detail or cmd, why))
        if err in (errno.EACCES, errno.EPERM):
            return SpawnError(ErrorCode.PERMISSION, "cannot execute %s: %s" % (detail or cmd, why))
        return SpawnError(ErrorCode.SPAWN_FAILED, "cannot execute %s: %s" % (detail or cmd, why))
    if stage == "chdir":
        if err in (errno.ENOENT, errno.ENOTDIR):
            return SpawnError(ErrorCode.NOT_FOUND, "cannot run %s: working directory %s: %s" % (cmd, cwd, why))
        if err in (errno.EACCES, errno.EPERM):
            return SpawnError(ErrorCode.PERMISSION, "cannot run %s: working directory %s: %s" % (cmd, cwd, why))
    if stage in ("setgroups", "setgid", "setuid") and err in (errno.EPERM, errno.EACCES):
        return SpawnError(ErrorCode.PERMISSION, "cannot run %s: %s failed: %s" % (cmd, stage, why))
    return SpawnError(ErrorCode.SPAWN_FAILED, "cannot run %s: %s failed: %s" % (cmd, stage, why))


def _child(argv: List[str], env: Dict[str, str], cwd: str, ident: Identity, tty: bool, io: tuple, report_fd: int) -> None:
    """In the forked child: set up and exec, or report the failing stage. Never returns."""
    stage = "setup"
    try:
        # Python ignores these at startup and ignored signals survive exec
        for name in ("SIGPIPE", "SIGXFSZ"):
            sig = getattr(signal, name, None)
            if sig is not None:
                signal.signal(sig, signal.SIG_DFL)
        if _batch:
            stage = "sched"
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        stage = "setsid"
        os.setsid()
        if tty:
            import fcntl
            import termios

            stage = "tty"
            fcntl.ioctl(io[0], termios.TIOCSCTTY, 0)
        stage = "stdio"
        for target, fd in enumerate(io):
            os.dup2(fd, target)  # dup2 makes the copy inheritable
        for fd in set(io):
            if fd > 2:
                os.close(fd)
        if ident.switch:
            stage = "setgroups"
            os.setgroups(ident.groups)
            stage = "setgid"
            os.setgid(ident.gid)
            stage = "setuid"
            os.setuid(ident.uid)
        stage = "chdir"
        os.chdir(cwd)
        stage = "exec"
        _exec(argv, env)
    except _PathError:
        msg = "path:%d:" % errno.ENOENT
    except OSError as exc:
        detail = getattr(exc, "filename", None) or ""
        msg = "%s:%d:%s" % (stage, exc.errno or 0, detail)
    except BaseException as exc:
        msg = "%s:0:%r" % (stage, exc)
    else:  # pragma: no cover - _exec never returns normally
        msg = "exec:0:returned"
    try:
        os.write(report_fd, msg.encode("utf-8", "replace"))
    finally:
        os._exit(127)


def _exec(argv: List[str], env: Dict[str, str]) -> None:
    """execve with execvp-style PATH search in the *child's* environment."""
    prog = argv[0]
    if "/" in prog:
        _execve(prog, argv, env)
    saved: Optional[OSError] = None
    for d in env.get("PATH", DEFAULT_PATH).split(":"):
        full = os.path.join(d or ".", prog)
        try:
            _execve(full, argv, env)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            if saved is None:
                saved = exc  # e.g. EACCES: keep looking, report it if nothing else runs
    if saved is not None:
        raise saved
    raise _PathError()


def _execve(path: str, argv: List[str], env: Dict[str, str]) -> None:
    try:
        os.execve(path, argv, env)
    except OSError as exc:
        if exc.errno == errno.ENOEXEC:  # a script without "#!": run it with sh, as execvp does
            try:
                os.execve("/bin/sh", ["sh", path] + argv[1:], env)
            except OSError:
                pass
        raise OSError(exc.errno, exc.strerror, path) from None


class _PathError(Exception):
    """argv[0] has no slash and is in no PATH directory."""


def _grow_pipe(fd: int) -> None:
    """Enlarge a stdout pipe so a chatty command is read in big bites (fewer agent wakeups
    under emulation); best effort — the kernel may cap it (fs.pipe-max-size)."""
    import fcntl

    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, STDOUT_PIPE_SIZE)
    except OSError:
        pass
