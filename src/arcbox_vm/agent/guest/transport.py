"""The byte channel to the host: opening it and buffered non-blocking writes.

The agent always dials (the host listens), over one of:

- ``serial:<name>``: the virtio-serial port QEMU exposes with that name. There is no udev
  in the guest, so the port is found through /sys/class/virtio-ports/*/name and its device
  node is created with mknod when /dev lacks it. While the host side is not connected the
  port reads EOF (and polls HUP), so "connected" is only known by trying.
- ``vsock:[<cid>:]<port>``: AF_VSOCK to the host (CID 2); under Firecracker the host
  listens on ``<uds_path>_<port>``. The listener may not be up yet, hence retries.
- ``unix:<path>``: tests and manual runs on a normal host.
- ``auto``: the virtio port named ``protocol.SERIAL_PORT_NAME`` if present, else vsock 52.

``Transport.open()`` makes one attempt and raises OSError on failure; the event loop owns
retry timing so exec sessions keep being served while the channel is down.
"""

from __future__ import annotations

import collections
import os

from arcbox_vm.agent import protocol

from .cmdline import parse_channel

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Deque, Optional

READ_SIZE = 256 * 1024
_WRITEV_MAX = 64  # buffers per writev call (well under IOV_MAX)
VPORTS = "/sys/class/virtio-ports"


class Conn:
    """An open channel: a non-blocking fd plus a FIFO of bytes waiting to be written.

    Frames are queued whole and written with writev, so one syscall carries many small
    frames and data payloads are never copied into a bigger buffer.
    """

    def __init__(self, fd: int, name: str, keep: Any = None) -> None:
        self.fd = fd
        self.name = name
        self._keep = keep  # e.g. the socket object owning ``fd``
        self._out: Deque[bytes] = collections.deque()
        self._head_off = 0  # bytes of _out[0] already written
        self.out_bytes = 0
        os.set_blocking(fd, False)

    def send(self, data: bytes) -> None:
        if data:
            self._out.append(data)
            self.out_bytes += len(data)

    def send_frame(self, type: int, channel: int, payload: bytes = b"") -> None:
        """Queue one frame without concatenating header and payload."""
        self.send(protocol.HEADER.pack(protocol.MAGIC, type, 0, channel, len(payload)))
        self.send(payload)

    def flush(self) -> bool:
        """Write as much as the fd takes now. True when the queue is empty.

        Raises OSError (other than EAGAIN) when the channel is broken.
        """
        while self._out:
            bufs = []
            first = self._out[0]
            bufs.append(memoryview(first)[self._head_off :] if self._head_off else first)
            for i in range(1, min(len(self._out), _WRITEV_MAX)):
                bufs.append(self._out[i])
            try:
                n = os.writev(self.fd, bufs)
            except BlockingIOError:
                return False
            self.out_bytes -= n
            n += self._head_off
            self._head_off = 0
            while n:
                head = self._out[0]
                if n >= len(head):
                    n -= len(head)
                    self._out.popleft()
                else:
                    self._head_off = n
                    return False  # short write: the fd is full
        return True

    def read(self) -> bytes:
        """One read; b"" means EOF. Raises BlockingIOError when nothing is there."""
        return os.read(self.fd, READ_SIZE)

    def close_queue(self) -> None:
        """Drop whatever is still queued (a frame half written included: the reader on the
        other end resynchronises on the next frame's magic)."""
        self._out.clear()
        self._head_off = 0
        self.out_bytes = 0

    def close(self) -> None:
        self._out.clear()
        self.out_bytes = 0
        if self._keep is not None:
            try:
                self._keep.close()  # closes fd
            except OSError:
                pass
            self._keep = None
        else:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = -1


class Transport:
    """How to reach the host. ``open()`` is one attempt; callers retry with backoff."""

    name = "?"

    def open(self) -> Conn:  # pragma: no cover - abstract
        raise NotImplementedError


def find_virtio_port(name: str, root: str = VPORTS) -> Optional[str]:
    """The device name (e.g. ``vport1p1``) of the virtio-serial port called ``name``."""
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return None
    for dev in entries:
        try:
            with open(os.path.join(root, dev, "name")) as f:
                if f.read().strip() == name:
                    return dev
        except OSError:
            continue
    return None


def _ensure_dev_node(dev: str, root: str = VPORTS) -> str:
    """/dev/<dev>, created from sysfs' major:minor when there is no udev to do it."""
    path = "/dev/" + dev
    if not os.path.exists(path):
        import stat

        with open(os.path.join(root, dev, "dev")) as f:
            major, minor = (int(x) for x in f.read().strip().split(":"))
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(major, minor))
    return path


class SerialTransport(Transport):
    def __init__(self, port_name: str) -> None:
        self.port_name = port_name
        self.name = "serial:" + port_name

    def open(self) -> Conn:
        dev = find_virtio_port(self.port_name)
        if dev is None:
            raise FileNotFoundError(2, "no virtio-serial port named %r under %s" % (self.port_name, VPORTS))
        path = _ensure_dev_node(dev)
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        return Conn(fd, "%s (%s)" % (self.name, path))


class VsockTransport(Transport):
    def __init__(self, cid: int, port: int) -> None:
        self.cid = cid
        self.port = port
        self.name = "vsock:%d:%d" % (cid, port)

    def open(self) -> Conn:
        import socket

        family = getattr(socket, "AF_VSOCK", 40)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(2.0)
            sock.connect((self.cid, self.port))
        except BaseException:
            sock.close()
            raise
        return Conn(sock.fileno(), self.name, keep=sock)


class UnixTransport(Transport):
    def __init__(self, path: str) -> None:
        self.path = path
        self.name = "unix:" + path

    def open(self) -> Conn:
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(2.0)
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return Conn(sock.fileno(), self.name, keep=sock)


class AutoTransport(Transport):
    """Serial port ``SERIAL_PORT_NAME`` when the guest has it, else vsock to the default port."""

    name = "auto"

    def open(self) -> Conn:
        if find_virtio_port(protocol.SERIAL_PORT_NAME) is not None:
            return SerialTransport(protocol.SERIAL_PORT_NAME).open()
        return VsockTransport(protocol.HOST_CID, protocol.VSOCK_PORT).open()


def make_transport(spec: str) -> Transport:
    """Build a Transport from a channel spec (see cmdline.parse_channel); ValueError if bad."""
    kind, arg = parse_channel(spec)
    if kind == "serial":
        return SerialTransport(arg)
    if kind == "vsock":
        cid, port = arg.split(":")
        return VsockTransport(int(cid), int(port))
    if kind == "unix":
        return UnixTransport(arg)
    return AutoTransport()
