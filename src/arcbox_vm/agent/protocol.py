"""Wire protocol between the host and the guest agent (stdlib only).

This one module is imported by both sides: by the host (``arcbox_vm.agent.host``) and,
copied verbatim into every guest image, by the PID-1 agent (``arcbox_vm.agent.guest``).
It must therefore stay stdlib-only and compatible with Python 3.8+ (guest images such as
Ubuntu 22.04 ship 3.10).

One byte stream carries everything (a virtio-serial port under QEMU, a vsock connection
under Firecracker). The agent *dials* the host and speaks first, with a versioned HELLO.

Frame layout (big-endian, 12-byte header)::

    magic   2 bytes   b"AV"        lets a reader resynchronise after garbage
    type    u8        MsgType
    flags   u8        reserved, must be 0 (ignored by readers)
    channel u32       0 = connection control; N > 0 = one exec session, file operation or forwarded
                      TCP connection (the host picks N)
    length  u32       payload length, at most ``max_payload`` (default 1 MiB)
    payload           ``length`` bytes: raw bytes for data frames, UTF-8 JSON objects otherwise

Flow control: data frames (STDOUT/STDERR guest->host, STDIN host->guest, FILE_DATA and
PORT_DATA either way) spend credit. Each direction of each channel starts with
``INITIAL_WINDOW`` bytes of credit (port channels: ``PORT_WINDOW``); the
receiver returns credit with WINDOW frames (payload: u32 increment) as it consumes data.
A sender with no credit stops reading its source (the child's pipes, the user's stdin),
so memory stays bounded on both sides whatever the reader's speed.

Detach and re-attach (feature "attach" in HELLO): when the channel is lost (the host's
daemon died or restarted) exec sessions keep running, *detached*. A detached session
keeps reading its child's output into a spool of at most INITIAL_WINDOW bytes (so a
restart within that much output loses nothing and the command does not stall), then stops
reading, so the child blocks in write(2) instead of output being dropped. A finished
detached session keeps its spool and exit status. The next HELLO lists them::

    "detached": [{"channel", "pid", "argv0", "tty", "exited"}]

and the host must choose new channel numbers above every listed one. ATTACH on such a
channel rebinds it to the new connection: the agent answers STARTED {"pid", "attached":
true, "stdin_window", "stdin_open"} (``stdin_window`` = the STDIN credit the host starts
with), sends the spool as STDOUT/STDERR frames (it fits the fresh INITIAL_WINDOW of output
credit) and carries on as a normal session: more output, EXIT. ATTACH on any other channel
is answered with ERROR no_such_channel (or channel_in_use). Bytes that were in flight
when the old channel broke (queued in the agent or the VMM, unread by the dead host) are
lost; everything produced after that is delivered.

Snapshots (feature "reinit"): a restored VM's agent gets HELLO_AGAIN until it treats the stream
as new (sessions detached, a HELLO listing them), then REINIT {time, entropy, hostname, ip, mac},
answered REINIT_DONE {errors} once the guest has its own clock, RNG state and address.

File transfer (channel N > 0, feature "files" in HELLO; frame types 0x30-0x3F): the host
opens a channel with FILE_WRITE, FILE_READ, FILE_STAT or FILE_LIST. Requests carry absolute
``path`` strings (no NUL) and optional ``uid``/``gid`` (default 0): the agent performs the
filesystem calls with those credentials (fsuid/fsgid + supplementary groups), so a request
can do exactly what that user could do in the guest, no more.

- write: FILE_WRITE {path, mode, uid, gid, make_parents, size?} -> FILE_READY {path} (or
  ERROR); FILE_DATA* (host->guest, spends guest-granted credit, returned with WINDOW as the
  agent writes it to disk); FILE_END -> FILE_DONE {size, path} after fchown/fchmod, fsync
  and an atomic rename of ``.NAME.arcbox-tmp-XXXXXXXX`` (same directory) over the target,
  or ERROR. An ERROR either way, or a lost connection, removes the temporary file. A
  symlink at the target is followed; a directory refuses; a character device (e.g.
  /dev/null) is written in place; other special files refuse (``not_regular``). With
  ``size`` the agent refuses up front when the filesystem lacks the space, and at FILE_END
  when the byte count differs.
- read: FILE_READ {path} -> FILE_INFO {stat} then FILE_DATA* (guest->host, spends
  host-granted credit) then FILE_END; or ERROR. The host aborts with ERROR (``cancelled``).
- stat: FILE_STAT {path, follow_symlinks} -> FILE_STAT_RESULT {stat}.
- list: FILE_LIST {path, limit?} -> FILE_LIST_RESULT {path, entries: [stat without
  "path"...], truncated}. Entries are lstat'ed and sorted by name; at most ``limit``
  (default and maximum LIST_LIMIT) and never more than fit one frame. A bigger directory
  is not read to its end: ``truncated`` is true and which entries came is arbitrary.

A stat object: {path, name, type ("file"|"dir"|"symlink"|"other"), size, mode (permission
bits, st_mode & 0o7777), uid, gid, mtime (float seconds), link_target ("" unless symlink)}.
Names that are not UTF-8 are sent with U+FFFD in place of the undecodable bytes.
The host cancels a transfer with ERROR {code: "cancelled"} on its channel; frames that
arrive on a channel after it ended are ignored.
File errors use the codes not_found, permission, is_a_directory, not_a_directory, exists,
no_space, too_large, not_regular, io (and bad_request for malformed requests).

Port forwarding (channel N > 0, feature "ports" in HELLO; types 0x40-0x4F): PORT_CONNECT
{"port"} asks the agent to connect to 127.0.0.1:port in the guest; it answers PORT_CONNECTED
{} or ERROR (``refused``, ``too_many``, ``io``...). Then PORT_DATA goes both ways, each
direction with PORT_WINDOW bytes of credit returned by WINDOW as the receiver writes to its
socket (neither side holds more than PORT_WINDOW per connection). PORT_EOF: the sender's
socket read EOF (half-close; the receiver shuts down writing once it wrote what it holds).
A side forgets the channel once it sent PORT_EOF and wrote the peer's EOF. PORT_CLOSE (or
ERROR): the sender dropped the connection (reset, failure, gave up); the receiver closes its
socket at once, discarding what it holds, and sends nothing more on the channel.

Decoding never raises on bad input: ``FrameDecoder.feed`` yields ``Frame`` objects and
``DecodeError`` objects; the caller answers errors with an ERROR frame and keeps going.
"""

from __future__ import annotations

import enum
import json
import struct

# typing is imported for type checkers only: it is one of the slowest stdlib imports, and the
# guest agent imports this module at boot under software emulation. Annotations are strings.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, FrozenSet, List, Optional, Union

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; HELLO carries it and the host refuses unknown majors."""

SUPPORTED_VERSIONS = frozenset({1})

MAGIC = b"AV"
HEADER = struct.Struct(">2sBBII")
HEADER_SIZE = HEADER.size  # 12
DEFAULT_MAX_PAYLOAD = 1 << 20  # 1 MiB
INITIAL_WINDOW = 1 << 20  # credit per direction per channel, bytes
DATA_CHUNK = 64 * 1024  # how much the host puts in one data frame (the agent reads output 256 KiB at a time)
WINDOW_STRUCT = struct.Struct(">I")

CONTROL_CHANNEL = 0

# Default agent endpoints: the virtio-serial port name (QEMU) and the vsock port the
# agent dials on the host (CID 2; Firecracker forwards it to ``<uds_path>_<port>``).
SERIAL_PORT_NAME = "arcbox.agent.0"
VSOCK_PORT = 52
HOST_CID = 2
# Kernel command-line key that tells the agent which transport to use, e.g.
# ``arcbox.channel=serial:arcbox.agent.0`` or ``arcbox.channel=vsock:52``.
CHANNEL_CMDLINE_KEY = "arcbox.channel"


class MsgType(enum.IntEnum):
    """Frame types. Direction and channel are part of each type's contract."""

    # --- connection control (channel 0) ---
    HELLO = 0x01  # guest->host JSON: {"proto", "agent_version", "kernel", "hostname", "pid", "features"}
    HELLO_ACK = 0x02  # host->guest JSON: {"proto"}; host refuses with ERROR(code="version") instead
    PING = 0x03  # either way, any channel; payload is echoed back in PONG
    PONG = 0x04
    ERROR = 0x05  # either way JSON {"code", "message"}; channel N>0 ends that session
    SHUTDOWN = 0x06  # host->guest JSON {"action": "poweroff"|"reboot"}; guest answers SHUTDOWN_ACK then halts
    SHUTDOWN_ACK = 0x07  # guest->host, empty
    HELLO_AGAIN = 0x08  # host->guest, empty: a new host is behind this stream; say HELLO again
    REINIT = 0x09  # host->guest JSON {"time", "entropy", "hostname", "ip", "mac"} (all optional)
    REINIT_DONE = 0x0A  # guest->host JSON {"errors": [str]}

    # --- exec sessions (channel N > 0, chosen by the host, unique per connection) ---
    EXEC = 0x10  # host->guest JSON ExecRequest (see exec_request())
    STARTED = 0x11  # guest->host JSON {"pid"} (after ATTACH also "attached", "stdin_window", "stdin_open")
    STDIN = 0x12  # host->guest raw bytes (spends guest-granted credit)
    STDIN_EOF = 0x13  # host->guest, empty: close the child's stdin
    STDOUT = 0x14  # guest->host raw bytes (spends host-granted credit)
    STDERR = 0x15  # guest->host raw bytes (same credit as STDOUT)
    EXIT = 0x16  # guest->host JSON {"exit_code", "signal", "timed_out"}; last frame of a session
    RESIZE = 0x17  # host->guest JSON {"rows", "cols"} (TTY sessions)
    SIGNAL = 0x18  # host->guest JSON {"signal"}: sent to the session's process group
    WINDOW = 0x19  # either way, u32 credit increment for the opposite data direction
    ATTACH = 0x1A  # host->guest, empty or {}: take over the detached session on this channel (feature "attach")

    # --- file transfer (channel N > 0; 0x30-0x3F; see the module docstring) ---
    FILE_WRITE = 0x30  # host->guest JSON {"path", "mode", "uid", "gid", "make_parents", "size"?}
    FILE_READY = 0x31  # guest->host JSON {"path"}: the write is open, send FILE_DATA
    FILE_DATA = 0x32  # raw bytes, host->guest (write) or guest->host (read); spends credit
    FILE_END = 0x33  # empty: host->guest "all data sent" (write), guest->host "end of file" (read)
    FILE_DONE = 0x34  # guest->host JSON {"size", "path"}: written, synced, renamed into place
    FILE_READ = 0x35  # host->guest JSON {"path", "uid"?, "gid"?}
    FILE_INFO = 0x36  # guest->host JSON stat object of the opened file; FILE_DATA follows
    FILE_STAT = 0x37  # host->guest JSON {"path", "follow_symlinks"?, "uid"?, "gid"?}
    FILE_STAT_RESULT = 0x38  # guest->host JSON stat object
    FILE_LIST = 0x39  # host->guest JSON {"path", "limit"?, "uid"?, "gid"?}
    FILE_LIST_RESULT = 0x3A  # guest->host JSON {"path", "entries": [stat...], "truncated"}
    # 0x3B-0x3F stay reserved for file transfer.

    # --- port forwarding (channel N > 0; 0x40-0x4F; see the module docstring) ---
    PORT_CONNECT = 0x40  # host->guest JSON {"port"}: connect to 127.0.0.1:port in the guest
    PORT_CONNECTED = 0x41  # guest->host JSON {}: connected; PORT_DATA may flow both ways
    PORT_DATA = 0x42  # raw bytes either way; spends the receiver's credit (PORT_WINDOW)
    PORT_EOF = 0x43  # empty, either way: the sender's socket reached EOF (half-close)
    PORT_CLOSE = 0x44  # empty, either way: the sender dropped the connection; the channel ends


DATA_TYPES = frozenset({MsgType.STDIN, MsgType.STDOUT, MsgType.STDERR, MsgType.FILE_DATA, MsgType.PORT_DATA})
JSON_TYPES = frozenset({
    MsgType.HELLO, MsgType.HELLO_ACK, MsgType.ERROR, MsgType.SHUTDOWN, MsgType.REINIT, MsgType.REINIT_DONE,
    MsgType.EXEC, MsgType.ATTACH, MsgType.STARTED, MsgType.EXIT, MsgType.RESIZE, MsgType.SIGNAL,
    MsgType.FILE_WRITE, MsgType.FILE_READY, MsgType.FILE_DONE, MsgType.FILE_READ, MsgType.FILE_INFO,
    MsgType.FILE_STAT, MsgType.FILE_STAT_RESULT, MsgType.FILE_LIST, MsgType.FILE_LIST_RESULT,
    MsgType.PORT_CONNECT, MsgType.PORT_CONNECTED,
})
FILE_REQUEST_TYPES = frozenset({MsgType.FILE_WRITE, MsgType.FILE_READ, MsgType.FILE_STAT, MsgType.FILE_LIST})

FEATURE_FILES = "files"
"""HELLO ``features`` entry of agents that implement the FILE_* messages."""

FEATURE_REINIT = "reinit"  # HELLO ``features`` entry: HELLO_AGAIN and REINIT are understood

FEATURE_ATTACH = "attach"
"""HELLO ``features`` entry of agents that keep exec sessions across a lost channel for ATTACH."""

FEATURE_PORTS = "ports"
"""HELLO ``features`` entry of agents that forward TCP connections (PORT_* messages)."""

PORT_WINDOW = 256 * 1024  # credit per direction of a port channel: what either side holds per connection

LIST_LIMIT = 10000
"""Most entries one FILE_LIST_RESULT carries (the frame size caps it further)."""

MAX_PATH = 4096  # longest path a file request may name (PATH_MAX)


class ErrorCode:
    """Values of ERROR frames' ``code`` field."""

    BAD_FRAME = "bad_frame"  # magic mismatch / garbage; the reader resynchronises
    OVERSIZED = "oversized"  # payload longer than max_payload; skipped
    UNKNOWN_TYPE = "unknown_type"
    BAD_REQUEST = "bad_request"  # payload is not the JSON the type requires
    VERSION = "version"  # HELLO's proto is not supported
    NO_SUCH_CHANNEL = "no_such_channel"
    CHANNEL_IN_USE = "channel_in_use"
    TOO_MANY = "too_many"  # session limit reached
    SPAWN_FAILED = "spawn_failed"  # the command could not be started (message says why)
    NOT_FOUND = "not_found"  # executable or working directory does not exist
    PERMISSION = "permission"  # not executable / not allowed
    NO_SUCH_USER = "no_such_user"
    INTERNAL = "internal"
    # file transfer (NOT_FOUND and PERMISSION above apply too)
    IS_A_DIRECTORY = "is_a_directory"
    NOT_A_DIRECTORY = "not_a_directory"
    EXISTS = "exists"
    NO_SPACE = "no_space"  # ENOSPC / EDQUOT
    TOO_LARGE = "too_large"  # EFBIG, or a limit
    NOT_REGULAR = "not_regular"  # a FIFO, socket or device where a regular file is needed
    IO = "io"  # any other OS error (message says which)
    CANCELLED = "cancelled"  # host->guest: abandon this transfer
    REFUSED = "refused"  # port forwarding: nothing listens on that guest port


class Frame:
    """One decoded frame. ``payload`` is raw bytes; use ``json()`` for JSON types."""

    __slots__ = ("type", "channel", "payload", "flags")

    def __init__(self, type: int, channel: int, payload: bytes = b"", flags: int = 0) -> None:
        self.type = type
        self.channel = channel
        self.payload = payload
        self.flags = flags

    def json(self) -> Dict[str, Any]:
        """Decode the payload as a JSON object or raise ProtocolError(BAD_REQUEST)."""
        return decode_json(self.payload)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Frame)
            and self.type == other.type
            and self.channel == other.channel
            and self.payload == other.payload
        )

    def __repr__(self) -> str:
        try:
            name = MsgType(self.type).name
        except ValueError:
            name = hex(self.type)
        return "Frame(%s, ch=%d, %d bytes)" % (name, self.channel, len(self.payload))


class ProtocolError(Exception):
    """A request could not be understood; ``code`` is an ErrorCode value."""

    def __init__(self, code: str, message: str, channel: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.channel = channel


class DecodeError:
    """Yielded by FrameDecoder for bad input. Not an exception: the stream continues."""

    __slots__ = ("code", "message", "channel")

    def __init__(self, code: str, message: str, channel: int = 0) -> None:
        self.code = code
        self.message = message
        self.channel = channel

    def __repr__(self) -> str:
        return "DecodeError(%s, %r, ch=%d)" % (self.code, self.message, self.channel)


def encode_frame(type: int, channel: int = 0, payload: bytes = b"", max_payload: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    """Serialise one frame. Raises ValueError for out-of-range fields (a local bug, not input)."""
    if not 0 <= type <= 0xFF:
        raise ValueError("frame type out of range: %r" % (type,))
    if not 0 <= channel <= 0xFFFFFFFF:
        raise ValueError("channel out of range: %r" % (channel,))
    if len(payload) > max_payload:
        raise ValueError("payload of %d bytes exceeds the %d-byte limit" % (len(payload), max_payload))
    return HEADER.pack(MAGIC, type, 0, channel, len(payload)) + payload  # one copy, a view's too


def encode_json(type: int, channel: int, obj: Dict[str, Any]) -> bytes:
    """Serialise a JSON-payload frame."""
    return encode_frame(type, channel, json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def encode_error(channel: int, code: str, message: str) -> bytes:
    return encode_json(MsgType.ERROR, channel, {"code": code, "message": message})


def encode_window(channel: int, increment: int) -> bytes:
    return encode_frame(MsgType.WINDOW, channel, WINDOW_STRUCT.pack(increment))


def decode_window(payload: bytes) -> int:
    if len(payload) != WINDOW_STRUCT.size:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "WINDOW payload must be 4 bytes, got %d" % len(payload))
    return WINDOW_STRUCT.unpack(payload)[0]


def decode_json(payload: bytes) -> Dict[str, Any]:
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: deeply nested input ("[[[[...") must be a bad request, not a crash.
        raise ProtocolError(ErrorCode.BAD_REQUEST, "payload is not valid UTF-8 JSON: %s" % exc) from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "payload must be a JSON object")
    return obj


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get frames and errors back.

    Bad magic: one DecodeError(BAD_FRAME), then bytes are dropped up to the next magic.
    Oversized length: one DecodeError(OVERSIZED) naming the channel, then exactly that
    many payload bytes are skipped, so the stream stays in sync. Memory held is at most
    one header plus ``max_payload`` bytes.
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD, views: FrozenSet[int] = frozenset()) -> None:
        # views: types whose payload may be a memoryview into the fed data (valid until it changes)
        self.max_payload = max_payload
        self.views = views
        self._buf = bytearray()
        self._skip = 0  # payload bytes still to discard after an oversized header
        self._resyncing = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> List[Union[Frame, DecodeError]]:
        """Decode what ``data`` completes, cutting frames straight out of it (one copy per payload, none for
        ``views`` types); a pending frame takes just what it lacks, only an unfinished tail is kept."""
        out: List[Union[Frame, DecodeError]] = []
        buf = self._buf
        if len(buf) >= HEADER_SIZE and not (self._skip or self._resyncing) and buf[:2] == MAGIC:
            need = HEADER_SIZE + HEADER.unpack_from(buf)[4] - len(buf)
            if 0 < need <= len(data) and need + len(buf) <= HEADER_SIZE + self.max_payload:
                data = memoryview(data)
                buf += data[:need]
                _, mtype, flags, channel, _ = HEADER.unpack_from(buf)
                payload = memoryview(buf)[HEADER_SIZE:]  # a view: the frame keeps this buffer, we take a new one
                out.append(Frame(mtype, channel, payload if mtype in self.views else bytes(payload), flags))
                self._buf = buf = bytearray()
                data = data[need:]
        if buf:
            buf += data
        src = buf if buf else data  # type: Any
        size, pos = len(src), 0
        while True:
            if self._skip:
                n = min(self._skip, size - pos)
                pos += n
                self._skip -= n
                if self._skip:
                    break
            if self._resyncing or (size - pos >= 2 and src[pos : pos + 2] != MAGIC):
                if type(src) is memoryview:  # find() needs bytes: copy the rest once
                    src, size, pos = bytes(src[pos:]), size - pos, 0
                idx = src.find(MAGIC, pos)
                if not self._resyncing:
                    self._resyncing = True
                    out.append(DecodeError(ErrorCode.BAD_FRAME, "bad frame magic; resynchronising"))
                if idx < 0:  # keep a trailing byte that may be the first half of the magic
                    pos = size - (1 if size > pos and src[size - 1 : size] == MAGIC[:1] else 0)
                    break
                pos = idx
                self._resyncing = False
            if size - pos < HEADER_SIZE:
                break
            _, mtype, flags, channel, length = HEADER.unpack_from(src, pos)
            if length > self.max_payload:
                pos += HEADER_SIZE
                self._skip = length
                out.append(DecodeError(ErrorCode.OVERSIZED, "frame of %d bytes exceeds the %d-byte limit"
                                       % (length, self.max_payload), channel))
                continue
            end = pos + HEADER_SIZE + length
            if size < end:
                break
            if type(src) is bytes or (mtype in self.views and src is not buf):
                payload = src[pos + HEADER_SIZE : end]  # type: Any
            else:  # one copy, through a view: a bytearray's slice would be a second one
                payload = bytes(memoryview(src)[pos + HEADER_SIZE : end])
            pos = end
            out.append(Frame(mtype, channel, payload, flags))
        if src is buf:
            del buf[:pos]
        elif pos < size:
            buf += src[pos:]
        return out

    def eof(self) -> Optional[DecodeError]:
        """Call at end of stream: reports a truncated trailing frame, if any."""
        if self._skip or (self._buf and not self._resyncing):
            n = len(self._buf) + self._skip
            self._buf.clear()
            self._skip = 0
            return DecodeError(ErrorCode.BAD_FRAME, "stream ended inside a frame (%d bytes pending)" % n)
        self._buf.clear()
        return None


# ---- message bodies -------------------------------------------------------------------


def exec_request(
    argv: List[str],
    env: Optional[Dict[str, str]] = None,
    cwd: str = "",
    user: str = "",
    tty: bool = False,
    rows: int = 24,
    cols: int = 80,
    timeout: float = 0.0,
    stdin: bool = False,
) -> Dict[str, Any]:
    """Build an EXEC body.

    argv: program and arguments (argv[0] is looked up in PATH).
    env: variables merged over the agent's default environment (PATH, HOME, TERM...).
    cwd: working directory; "" means the user's home directory (or "/").
    user: "" or "root", a name, "uid", or "uid:gid"; the child really switches
          uid, gid and supplementary groups.
    tty: run on a new pseudo-terminal (stdout and stderr merged into STDOUT).
    timeout: seconds; 0 = none. On expiry the whole process group is SIGKILLed and
             EXIT carries timed_out=true.
    stdin: if false the child's stdin is /dev/null and STDIN frames are refused.
    """
    return {
        "argv": list(argv),
        "env": dict(env or {}),
        "cwd": cwd,
        "user": user,
        "tty": bool(tty),
        "rows": int(rows),
        "cols": int(cols),
        "timeout": float(timeout),
        "stdin": bool(stdin),
    }


def validate_exec_request(obj: Dict[str, Any]) -> Dict[str, Any]:
    """Check an EXEC body's shape; returns it with defaults filled. Raises ProtocolError."""

    def bad(msg: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_REQUEST, msg)

    argv = obj.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise bad("argv must be a non-empty list of strings")
    if any("\x00" in a for a in argv):
        raise bad("argv must not contain NUL characters")
    env = obj.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise bad("env must be an object of string values")
    if any(not k or "=" in k or "\x00" in k or "\x00" in v for k, v in env.items()):
        raise bad("env names must be non-empty without '=' or NUL, values without NUL")
    out = exec_request(argv, env)
    for key in ("cwd", "user"):
        val = obj.get(key, "")
        if not isinstance(val, str):
            raise bad("%s must be a string" % key)
        if "\x00" in val:
            raise bad("%s must not contain NUL characters" % key)
        out[key] = val
    for key in ("tty", "stdin"):
        val = obj.get(key, False)
        if not isinstance(val, bool):  # "false" would otherwise be truthy
            raise bad("%s must be a boolean" % key)
        out[key] = val
    for key, lo, hi in (("rows", 1, 0xFFFF), ("cols", 1, 0xFFFF)):
        val = obj.get(key, out[key])
        if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= hi:
            raise bad("%s must be an integer in %d..%d" % (key, lo, hi))
        out[key] = val
    timeout = obj.get("timeout", 0)
    # `not timeout >= 0` also rejects NaN (json accepts it); infinity is not a timeout either
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout >= 0 or timeout == float("inf"):
        raise bad("timeout must be a finite number >= 0")
    out["timeout"] = float(timeout)
    return out


def file_write_request(
    path: str, mode: int = 0o644, uid: int = 0, gid: int = 0, make_parents: bool = False, size: Optional[int] = None
) -> Dict[str, Any]:
    """Build a FILE_WRITE body. ``size`` (optional) is the number of bytes that will follow."""
    body: Dict[str, Any] = {"path": path, "mode": int(mode), "uid": int(uid), "gid": int(gid),
                            "make_parents": bool(make_parents)}
    if size is not None:
        body["size"] = int(size)
    return body


def check_path(path: object) -> str:
    """An absolute path without NUL, at most MAX_PATH bytes; raises ProtocolError(BAD_REQUEST)."""
    if not isinstance(path, str) or not path:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "path must be a non-empty string")
    if "\x00" in path:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "path must not contain NUL characters")
    if not path.startswith("/"):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "path must be absolute (start with '/'), got %r" % path[:200])
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "path is longer than %d bytes" % MAX_PATH)
    return path


def _uint(obj: Dict[str, Any], key: str, default: int, hi: int) -> int:
    val = obj.get(key, default)
    if not isinstance(val, int) or isinstance(val, bool) or not 0 <= val <= hi:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "%s must be an integer in 0..%d" % (key, hi))
    return val


def validate_file_request(type: int, obj: Dict[str, Any]) -> Dict[str, Any]:
    """Check a FILE_WRITE/READ/STAT/LIST body; returns it normalised. Raises ProtocolError."""
    out: Dict[str, Any] = {"path": check_path(obj.get("path")),
                           "uid": _uint(obj, "uid", 0, 0xFFFFFFFE), "gid": _uint(obj, "gid", 0, 0xFFFFFFFE)}
    if type == MsgType.FILE_WRITE:
        out["mode"] = _uint(obj, "mode", 0o644, 0o7777)
        mp = obj.get("make_parents", False)
        if not isinstance(mp, bool):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "make_parents must be a boolean")
        out["make_parents"] = mp
        size = obj.get("size")
        out["size"] = None if size is None else _uint(obj, "size", 0, (1 << 63) - 1)
    elif type == MsgType.FILE_STAT:
        follow = obj.get("follow_symlinks", True)
        if not isinstance(follow, bool):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "follow_symlinks must be a boolean")
        out["follow_symlinks"] = follow
    elif type == MsgType.FILE_LIST:
        out["limit"] = _uint(obj, "limit", LIST_LIMIT, LIST_LIMIT) or LIST_LIMIT
    elif type != MsgType.FILE_READ:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "not a file request type: %r" % (type,))
    return out


def validate_port_request(obj: Dict[str, Any]) -> int:
    """A PORT_CONNECT body's port (1..65535); raises ProtocolError(BAD_REQUEST)."""
    port = obj.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 0xFFFF:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "port must be an integer in 1..65535")
    return port
