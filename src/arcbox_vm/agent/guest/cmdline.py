"""Kernel command line and channel-spec parsing.

The host configures the agent only through the kernel command line (see
docs/CONTRACTS.md): there is no config file in the image and no environment we control
once the kernel has started init. Parsing is pure so it can be unit-tested on the host.
"""

from __future__ import annotations

from arcbox_vm.agent import protocol

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Dict, List, Tuple


def read_cmdline(path: str = "/proc/cmdline") -> str:
    """The raw command line, or "" if it cannot be read (e.g. /proc not mounted yet)."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def split_cmdline(text: str) -> List[str]:
    """Split like the kernel does: on whitespace, double quotes group (and are removed)."""
    words: List[str] = []
    cur: List[str] = []
    in_quotes = False
    have = False
    for ch in text:
        if ch == '"':
            in_quotes = not in_quotes
            have = True
        elif ch.isspace() and not in_quotes:
            if have:
                words.append("".join(cur))
                cur = []
                have = False
        else:
            cur.append(ch)
            have = True
    if have:
        words.append("".join(cur))
    return words


def parse_cmdline(text: str) -> Dict[str, str]:
    """``key=value`` words to a dict (the last occurrence wins); bare words map to ""."""
    out: Dict[str, str] = {}
    for word in split_cmdline(text):
        key, _, value = word.partition("=")
        if key:
            out[key] = value
    return out


def parse_channel(spec: str) -> Tuple[str, str]:
    """Parse a channel spec into (kind, argument).

    ``serial:<port-name>``, ``vsock:<port>`` (CID 2) or ``vsock:<cid>:<port>``,
    ``unix:<path>`` (tests and manual runs), or ``auto``/"" (autodetect).
    Raises ValueError with a message naming the bad spec.
    """
    spec = spec.strip()
    if spec in ("", "auto"):
        return ("auto", "")
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise ValueError("bad channel spec %r: expected serial:<name>, vsock:<port> or unix:<path>" % spec)
    if kind == "serial":
        return ("serial", arg)
    if kind == "unix":
        return ("unix", arg)
    if kind == "vsock":
        parts = arg.split(":")
        if len(parts) > 2 or not all(p.isdigit() for p in parts):
            raise ValueError("bad vsock channel spec %r: expected vsock:<port> or vsock:<cid>:<port>" % spec)
        if len(parts) == 1:
            parts.insert(0, str(protocol.HOST_CID))
        if not 0 < int(parts[1]) < 1 << 32:
            raise ValueError("bad vsock port in %r" % spec)
        return ("vsock", "%s:%s" % (int(parts[0]), int(parts[1])))
    raise ValueError("unknown channel kind %r in %r (serial, vsock or unix)" % (kind, spec))
