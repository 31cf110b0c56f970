"""What one guest agent may make the host do: the bounds, and checks of the guest's values.

The code in a sandbox is root in its guest: it can replace or freeze the agent and speak
on its channel. So every byte from the guest is input from an attacker, and this module
holds the numbers that keep one guest from costing the daemon more than a bounded share
of memory, time and log space (docs/SECURITY.md, "The agent channel", describes them):

- sends to the guest have a deadline (`SEND_TIMEOUT`); one that cannot finish fails the
  connection (the guest stopped reading);
- channel 0 (control) frames and malformed frames are rate-limited (`TokenBucket`); a
  guest over the limit is cut off with `AgentProtocolViolation`;
- log lines caused by the guest are rate-limited per connection (`LogLimiter`);
- every field the guest sends is checked for type and range before use (`guest_int`,
  `guest_str`, `guest_bool`, `exit_status`, `check_hello`, ...); a bad value ends that
  channel with `ProtocolViolation` (or refuses the HELLO), it never reaches the manager.

Imports only the protocol module and the error types.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any

from arcbox_vm.agent import protocol as p
from arcbox_vm.errors import AgentDisconnected, AgentError

VIOLATION = "protocol_violation"
"""`code` of the errors raised when the guest broke the protocol (the reason it was cut off)."""

# -- time ---------------------------------------------------------------------------------

SEND_TIMEOUT = 30.0
"""Seconds a send may wait for the guest to take bytes off the channel. A send that cannot
complete in time fails the whole connection (the guest stopped reading): it is closed and
every stream on it ends with an error."""

CLOSE_TIMEOUT = 1.0  # seconds `close()` waits for the transport to report closed after aborting it

# -- rates --------------------------------------------------------------------------------

CONTROL_RATE = 200.0  # channel-0 frames per second a guest may send, sustained ...
CONTROL_BURST = 2000  # ... and in a burst. A real agent sends a PONG per keepalive and one HELLO.
VIOLATION_RATE = 50.0  # malformed frames (bad magic, oversized, bad JSON, bad values, overruns) per second ...
VIOLATION_BURST = 500  # ... and in a burst. A real agent sends none.
LOG_RATE = 5.0  # log lines per second one connection may cause ...
LOG_BURST = 20  # ... and in a burst; the rest is counted and summarised in one line

MAX_BUFFERED_NOWAIT = 1 << 20
"""Bytes the transport may hold before a best-effort frame (a cancellation notice, an ERROR
telling the guest why its channel ended) is dropped instead of queued."""

# -- values ---------------------------------------------------------------------------------

MAX_PID = 1 << 22  # PID_MAX_LIMIT on 64-bit Linux
MAX_EXIT_CODE = 255  # what a wait status can carry: 0..255, 128+N for signal N
MAX_SIGNAL = 127
MAX_CHANNEL = 0xFFFFFFFF  # the frame header's channel field
MAX_GUEST_CHANNEL = 0x7FFFFFFF
"""Highest channel a HELLO may list as detached: the host numbers new channels above every
listed one, so this leaves it more than 2**31 numbers."""
MAX_DETACHED = 1024  # detached sessions a HELLO may list (the agent keeps at most 256)
MAX_FEATURES = 64  # entries in HELLO's "features" ...
MAX_FEATURE_LEN = 64  # ... each at most this long
MAX_HELLO_TEXT = 256  # HELLO's kernel, hostname, agent_version: longer is cut
MAX_ARGV0 = 4096  # a detached session's argv0: longer is cut
MAX_ERROR_CODE = 64  # an ERROR's code: [a-z0-9_], at most this long, else "internal"
MAX_ERROR_MESSAGE = 8192  # an ERROR's message: longer is cut
MAX_NAME = 1024  # a stat object's name (NAME_MAX is 255 bytes)
MAX_TEXT_PATH = 2 * p.MAX_PATH  # a stat object's path / link_target
MAX_FILE_SIZE = (1 << 63) - 1
MAX_ID = 0xFFFFFFFF  # uid / gid
MAX_MTIME = float(1 << 53)  # seconds either side of the epoch
STAT_TYPES = frozenset({"file", "dir", "symlink", "other"})

_CODE_RE = re.compile(rf"[a-z0-9_]{{1,{MAX_ERROR_CODE}}}\Z")
_MISSING: Any = object()


class ProtocolViolation(AgentError):
    """The guest broke the protocol on one channel (e.g. sent beyond its credit, an
    impossible exit status): that channel ended, the connection goes on."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=VIOLATION)


class AgentProtocolViolation(AgentDisconnected):
    """The guest broke the protocol badly enough to be cut off (a flood of control frames,
    too many malformed frames): the connection was closed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = VIOLATION


# -- rates --------------------------------------------------------------------------------


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; `take()` is False when empty."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        if self.tokens < n:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens < n:
                return False
        self.tokens -= n
        return True


class LogLimiter:
    """Log lines caused by one guest: `LOG_BURST` at once, `LOG_RATE` a second after that;
    what is held back is counted and reported in one summary line."""

    def __init__(self, logger: logging.Logger, rate: float = LOG_RATE, burst: float = LOG_BURST) -> None:
        self._log = logger
        self._bucket = TokenBucket(rate, burst)
        self.suppressed = 0

    def __call__(self, level: int, msg: str, *args: Any, exc_info: bool = False) -> None:
        if not self._log.isEnabledFor(level):
            return
        if not self._bucket.take():
            self.suppressed += 1
            return
        self.flush()
        self._log.log(level, msg, *args, exc_info=exc_info)

    def flush(self) -> None:
        """Report how many lines were held back since the last report (if any)."""
        if self.suppressed:
            n, self.suppressed = self.suppressed, 0
            self._log.warning("%d more log line(s) caused by this guest agent were suppressed (rate limit)", n)


# -- values ---------------------------------------------------------------------------------


def _bad(msg: str) -> p.ProtocolError:
    return p.ProtocolError(p.ErrorCode.BAD_REQUEST, msg)


def guest_int(body: dict[str, Any], key: str, lo: int, hi: int, default: Any = _MISSING) -> int:
    """body[key] as an int in lo..hi (a JSON integer, not a bool, float or string)."""
    val = body.get(key, default)
    if val is _MISSING:
        raise _bad(f"{key} is missing")
    if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= hi:
        raise _bad(f"{key} must be an integer in {lo}..{hi}, got {_show(val)}")
    return val


def guest_bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    val = body.get(key, default)
    if val is None:
        return default
    if not isinstance(val, bool):
        raise _bad(f"{key} must be true or false, got {_show(val)}")
    return val


def guest_str(body: dict[str, Any], key: str, limit: int, default: str = "", *, cut: bool = False) -> str:
    """body[key] as a string of at most `limit` characters (longer: cut, or refused)."""
    val = body.get(key, default)
    if val is None:
        return default
    if not isinstance(val, str):
        raise _bad(f"{key} must be a string, got {_show(val)}")
    if len(val) > limit:
        if not cut:
            raise _bad(f"{key} is longer than {limit} characters")
        val = val[:limit]
    return val


def clean_text(text: str, limit: int) -> str:
    """Guest text for messages and logs: at most `limit` characters, control characters
    (other than newline and tab) shown as U+FFFD."""
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in text)


def _show(val: Any) -> str:
    text = repr(val)
    return text if len(text) <= 40 else text[:37] + "..."


def error_body(body: Any) -> tuple[str, str]:
    """An ERROR frame's (code, message), made safe: a code outside [a-z0-9_]{1,64} is
    "internal", the message is cut to MAX_ERROR_MESSAGE and cleaned of control characters."""
    if not isinstance(body, dict):
        return p.ErrorCode.INTERNAL, ""
    code = body.get("code")
    if not isinstance(code, str) or not _CODE_RE.match(code):
        code = p.ErrorCode.INTERNAL
    msg = body.get("message")
    msg = clean_text(msg, MAX_ERROR_MESSAGE) if isinstance(msg, str) else ""
    return code, msg


def exit_status(body: dict[str, Any]) -> tuple[int, int | None, bool]:
    """EXIT's (exit_code, signal, timed_out): a code in 0..255 (128+N for signal N), a
    signal in 1..127 or none. Anything else is not a wait status: ProtocolError."""
    code = guest_int(body, "exit_code", 0, MAX_EXIT_CODE)
    sig = body.get("signal")
    if sig is not None:
        sig = guest_int(body, "signal", 1, MAX_SIGNAL)
    return code, sig, guest_bool(body, "timed_out")


def stat_fields(body: Any) -> dict[str, Any]:
    """A stat object's fields, checked (see the protocol module); ProtocolError if wrong."""
    if not isinstance(body, dict):
        raise _bad("a stat object must be a JSON object")
    kind = guest_str(body, "type", 16, "other")
    if kind not in STAT_TYPES:
        raise _bad(f"type must be one of {sorted(STAT_TYPES)}, got {_show(kind)}")
    mtime = body.get("mtime", 0.0)
    if (not isinstance(mtime, (int, float)) or isinstance(mtime, bool) or not math.isfinite(mtime)
            or abs(mtime) > MAX_MTIME):
        raise _bad(f"mtime must be a finite number of seconds, got {_show(mtime)}")
    return {
        "path": guest_str(body, "path", MAX_TEXT_PATH),
        "name": guest_str(body, "name", MAX_NAME),
        "type": kind,
        "size": guest_int(body, "size", 0, MAX_FILE_SIZE, 0),
        "mode": guest_int(body, "mode", 0, 0o7777, 0),
        "uid": guest_int(body, "uid", 0, MAX_ID, 0),
        "gid": guest_int(body, "gid", 0, MAX_ID, 0),
        "mtime": float(mtime),
        "link_target": guest_str(body, "link_target", MAX_TEXT_PATH),
    }


def check_hello(hello: Any) -> dict[str, Any]:
    """HELLO's body with every field checked: the known fields only, text cut to its bound.
    Raises ProtocolError for a wrong type, an out-of-range number or an overlong list."""
    if not isinstance(hello, dict):
        raise _bad("HELLO must be a JSON object")
    out: dict[str, Any] = {"proto": hello.get("proto")}
    for key in ("agent_version", "kernel", "hostname"):
        out[key] = guest_str(hello, key, MAX_HELLO_TEXT, cut=True)
    if "pid" in hello:
        out["pid"] = guest_int(hello, "pid", 1, MAX_PID)
    if "sessions" in hello:
        out["sessions"] = guest_int(hello, "sessions", 0, MAX_PID)
    features = hello.get("features", [])
    if (not isinstance(features, list) or len(features) > MAX_FEATURES
            or not all(isinstance(f, str) and len(f) <= MAX_FEATURE_LEN for f in features)):
        raise _bad(f"features must be a list of at most {MAX_FEATURES} short strings")
    out["features"] = list(features)
    detached = hello.get("detached", [])
    if not isinstance(detached, list) or len(detached) > MAX_DETACHED:
        raise _bad(f"detached must be a list of at most {MAX_DETACHED} sessions")
    entries, seen = [], set()
    for item in detached:
        if not isinstance(item, dict):
            raise _bad("a detached session must be a JSON object")
        ch = guest_int(item, "channel", 1, MAX_GUEST_CHANNEL)
        if ch in seen:
            raise _bad(f"detached channel {ch} is listed twice")
        seen.add(ch)
        entries.append({"channel": ch, "pid": guest_int(item, "pid", 1, MAX_PID),
                        "argv0": guest_str(item, "argv0", MAX_ARGV0, cut=True),
                        "tty": guest_bool(item, "tty"), "exited": guest_bool(item, "exited")})
    out["detached"] = entries
    return out


def _detached_sessions(hello: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """HELLO's "detached" list as {channel: entry}; malformed or out-of-range entries are
    ignored (`handshake` refuses a HELLO with any, see `check_hello`)."""
    out: dict[int, dict[str, Any]] = {}
    items = hello.get("detached")
    for item in items[:MAX_DETACHED] if isinstance(items, list) else []:
        ch = item.get("channel") if isinstance(item, dict) else None
        if isinstance(ch, int) and not isinstance(ch, bool) and 0 < ch <= MAX_GUEST_CHANNEL:
            out[ch] = item
    return out
