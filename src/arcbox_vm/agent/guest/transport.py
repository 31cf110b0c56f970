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
    from typing import Any, Deque, List, Optional

READ_SIZE = 1 << 20  # the receive buffer: a virtio port holds up to 128 pages (512 KiB) of input
_WRITEV_MAX = 128  # buffers per writev call (well under IOV_MAX)
# A virtio-serial port takes at most 32 KiB per write(2), and writev on a character device
# is a loop of writes, one per iovec, that stops at the first short one: a big buffer is
# cut into 32 KiB iovecs so one syscall writes all of it (a socket takes them in one go).
PORT_WRITE = 32 * 1024
VPORTS = "/sys/class/virtio-ports"
PAGE = 4096  # a virtio-serial port's receive buffers are one page each
# a pooled output buffer: room for four 256 KiB frames (headers included), a full pipe's worth
FRAME_BUF = 4 * (protocol.HEADER_SIZE + 256 * 1024)
POOL_MAX = 4  # spare output buffers kept (4 MiB at most)
_HDR = protocol.HEADER_SIZE


class FrameBuf(bytearray):
    """A pooled output buffer: a frame header's room, then a payload read straight into it.

    Reading the payload after 12 bytes of room and packing the header in front makes
    header and payload one contiguous buffer: one iovec (a virtio-serial port turns every
    iovec into its own buffer and host write), and no concatenation copy. ``Conn`` takes
    the buffer back into its pool once the frame has been written.
    """

    __slots__ = ()


def frame_slots(buf: FrameBuf, size: int, total: int) -> List[memoryview]:
    """The payload slots of ``total`` bytes in frames of ``size``, a header's room before each."""
    view = memoryview(buf)
    slots = []
    off = 0
    while total > 0 and off + _HDR < len(buf):
        k = min(total, size, len(buf) - off - _HDR)
        slots.append(view[off + _HDR : off + _HDR + k])
        off += _HDR + k
        total -= k
    return slots


class Conn:
    """An open channel: a non-blocking fd plus a FIFO of bytes waiting to be written.

    Frames are queued whole and written with writev, so one syscall carries many small
    frames and data payloads are never copied into a bigger buffer.
    """

    def __init__(self, fd: int, name: str, keep: Any = None) -> None:
        self.fd = fd
        self.name = name
        self._keep = keep  # e.g. the socket object owning ``fd``
        self._out: Deque[Any] = collections.deque()  # bytes, or memoryviews of FrameBuf
        self._head_off = 0  # bytes of _out[0] already written
        self.out_bytes = 0
        self._pool: List[FrameBuf] = []
        self._inbuf = bytearray(READ_SIZE)
        view = memoryview(self._inbuf)
        self._in_views = [view[i : i + PAGE] for i in range(0, READ_SIZE, PAGE)]
        self._in_view = view
        os.set_blocking(fd, False)

    def frame_buffer(self) -> FrameBuf:
        """An output buffer of FRAME_BUF bytes (a spare from the pool when there is one)."""
        pool = self._pool
        return pool.pop() if pool else FrameBuf(FRAME_BUF)

    def send_frames(self, buf: FrameBuf, type: int, channel: int, n: int, size: int) -> None:
        """Queue the frames read into ``buf`` by ``readv(fd, frame_slots(buf, size, ...))``:
        ``n`` bytes filled the slots in order; every full slot is one frame of ``size``
        bytes, a partial last one a shorter frame. Headers go in the gaps, so all of them
        leave as one contiguous buffer."""
        off = 0
        while n > 0:
            k = min(n, size)
            protocol.HEADER.pack_into(buf, off, protocol.MAGIC, type, 0, channel, k)
            off += _HDR + k
            n -= k
        self._out.append(memoryview(buf)[:off])
        self.out_bytes += off

    def give_back(self, buf: FrameBuf) -> None:
        """A buffer from ``frame_buffer`` that was not queued after all (nothing read into it)."""
        if len(self._pool) < POOL_MAX:
            self._pool.append(buf)

    def _written(self, item: Any) -> None:
        if type(item) is memoryview and type(item.obj) is FrameBuf:
            buf = item.obj
            item.release()  # the pool may hand the buffer out again: no view of it is left
            if len(self._pool) < POOL_MAX:
                self._pool.append(buf)

    def read_into(self) -> memoryview:
        """One read of what the channel holds, into the connection's own receive buffer.

        A virtio-serial port hands out one 4 KiB receive buffer per read(2), and readv on
        a character device is a loop of reads, one per iovec, that stops at the first short
        one: page-sized iovecs take up to 64 buffers in one syscall (a socket fills them in
        one recvmsg). The view is valid until the next call; b"" (empty) means EOF. Raises
        BlockingIOError when nothing is there.
        """
        n = os.readv(self.fd, self._in_views)
        return self._in_view[:n]

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
            bufs: List[Any] = []
            for item in self._out:
                if not bufs and self._head_off:
                    item = memoryview(item)[self._head_off :]
                if len(item) > PORT_WRITE:
                    view = memoryview(item)
                    bufs.extend(view[off : off + PORT_WRITE] for off in range(0, len(view), PORT_WRITE))
                else:
                    bufs.append(item)
                if len(bufs) >= _WRITEV_MAX:
                    break
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
                    self._written(self._out.popleft())
                else:
                    # a short write need not mean "full": a virtio-serial port takes at most
                    # 32 KiB per call. Write on until the fd says EAGAIN.
                    self._head_off = n
                    break
        return True

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
