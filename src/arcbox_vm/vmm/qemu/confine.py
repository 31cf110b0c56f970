"""What confining a QEMU takes (`[qemu] sandbox`), and the checks that fail a boot with a
message saying how to fix the host rather than let QEMU fail obscurely — or run unconfined.

Per VM: a uid (and gid of the same number) of its own, claimed from `[qemu] uid_range`
(`arcbox_vm.vmm.users`); no supplementary groups but /dev/kvm's group when KVM is used
and the device is not open to everyone; a fresh network namespace with nothing in it (it
reaches its TAP through the descriptor it is given, no network of the host). Of the host's
files it opens by path only two: its kernel and initrd, through `/proc/self/fd/N` (a
descriptor we opened: the file's mode must let the uid read it, no directory is walked),
and its agent socket, for which the socket directory is given to its gid (root:<gid>,
0710) and the socket made group-writable — every other sandbox's directory stays shut to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path

from arcbox_vm.config.qemu import SANDBOX_OPTIONS
from arcbox_vm.errors import VmmError
from arcbox_vm.ports import AgentEndpoint, MachineSpec
from arcbox_vm.vmm.process import Confinement

KVM_DEVICE = Path("/dev/kvm")
_OPT_OUT = "or set [qemu] sandbox = false to run QEMU unconfined as the daemon's user"
_PROBE_TIMEOUT_S = 30.0


def check_privileges() -> None:
    """Starting QEMU as another uid takes root (CAP_SETUID, CAP_SETGID, CAP_SYS_ADMIN for
    the network namespace)."""
    if os.geteuid() != 0:
        raise VmmError(f"[qemu] sandbox is on: every QEMU runs as a uid of its own, which only a root daemon "
                       f"can start, but this process runs as uid {os.geteuid()}; run it as root, {_OPT_OUT}")


async def check_seccomp(binary: str) -> None:
    """QEMU must accept `-sandbox <our options>` (built with seccomp, a kernel that has it):
    `-device help` exits right after the filter is installed."""
    argv = [binary, "-sandbox", SANDBOX_OPTIONS, "-machine", "none", "-nodefaults", "-no-user-config",
            "-display", "none", "-device", "help"]
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), _PROBE_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise VmmError(f"checking QEMU's seccomp support ({' '.join(argv)}) did not finish in "
                           f"{_PROBE_TIMEOUT_S:.0f} s") from None
    except OSError as exc:
        raise VmmError(f"cannot run {binary} to check its seccomp support: {exc.strerror or exc}") from exc
    if proc.returncode != 0:
        why = err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise VmmError(f"{binary} cannot confine itself with -sandbox {SANDBOX_OPTIONS}: {why}; install a QEMU "
                       f"built with seccomp on a kernel with seccomp filters, {_OPT_OUT}")


def kvm_groups(accel: str, device: Path = KVM_DEVICE) -> tuple[int, ...]:
    """The supplementary groups a confined QEMU needs for `accel`: /dev/kvm's group when
    the device is group- but not world-accessible. Raises when the uid cannot open it."""
    if accel != "kvm":
        return ()
    try:
        st = os.stat(device)
    except OSError as exc:
        raise VmmError(f"cannot stat {device}: {exc.strerror or exc}") from exc
    if st.st_mode & 0o006 == 0o006:
        return ()
    if st.st_mode & 0o060 == 0o060:
        return (st.st_gid,)
    raise VmmError(f"a confined QEMU cannot open {device} (mode {stat.S_IMODE(st.st_mode):04o}, only its owner "
                   f"may): give it to a group (chgrp kvm {device}; chmod 0660 {device}), set [qemu] accel = "
                   f"\"tcg\", {_OPT_OUT}")


def confinement(uid: int, accel: str) -> Confinement:
    return Confinement(uid=uid, gid=uid, groups=kvm_groups(accel), new_netns=True)


def _allows(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    """Whether mode bits `bits` (r=4, x=1; the "other" position) are granted to uid/gid."""
    if st.st_uid == uid:
        return bool(st.st_mode & (bits << 6))
    if st.st_gid == gid:
        return bool(st.st_mode & (bits << 3))
    return bool(st.st_mode & bits)


def check_access(uid: int, spec: MachineSpec, endpoint: AgentEndpoint) -> None:
    """The files QEMU opens by path must be open to `uid`: kernel and initrd readable (their
    mode; they are reached through our descriptors), every directory above the socket
    directory searchable."""
    for what, path in (("kernel", spec.kernel), ("initrd", spec.initrd)):
        if path is None:
            continue
        st = os.stat(path)
        if not _allows(st, uid, uid, 4):
            raise VmmError(f"a confined QEMU (uid {uid}) reads the {what} {path} through a descriptor, but its mode "
                           f"{stat.S_IMODE(st.st_mode):04o} lets nobody but its owner read it: make it readable "
                           f"(chmod a+r {path}), {_OPT_OUT}")
    sockdir = Path(endpoint.listen_path).parent
    for parent in sockdir.parents:
        st = os.stat(parent)
        if not _allows(st, uid, uid, 1):
            raise VmmError(f"a confined QEMU (uid {uid}) connects to its agent socket in {sockdir}, but {parent} "
                           f"(mode {stat.S_IMODE(st.st_mode):04o}) is closed to other users: allow them to pass "
                           f"through it (chmod o+x {parent}), {_OPT_OUT}")


def give_socket(sockdir: Path, socket: Path, uid: int) -> None:
    """The socket directory to root:<uid's gid> 0710, the (bound) agent socket group-writable:
    that VM's QEMU, and no other, can connect. An agent listener bound again later (a
    daemon restart) gives its socket the directory's group."""
    os.chown(sockdir, -1, uid)
    os.chmod(sockdir, 0o710)
    if socket.parent == sockdir and os.path.lexists(socket):
        os.chown(socket, -1, uid, follow_symlinks=False)
        os.chmod(socket, 0o660)


def take_back(sockdir: Path) -> None:
    """Close the socket directory to the uid again (before the uid is released for reuse)."""
    with contextlib.suppress(FileNotFoundError):
        os.chown(sockdir, -1, os.getegid())
        os.chmod(sockdir, 0o700)
