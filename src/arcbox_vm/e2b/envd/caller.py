"""Who an envd request is for: the sandbox (E2b-Sandbox-Id) and the guest user."""

from __future__ import annotations

import base64
import binascii
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass

from arcbox_vm.errors import InvalidArgument

SANDBOX_HEADER = "e2b-sandbox-id"
PORT_HEADER = "e2b-sandbox-port"
TOKEN_HEADER = "x-access-token"
TRAFFIC_TOKEN_HEADER = "e2b-traffic-access-token"  # other ports: the sandbox's trafficAccessToken
MAX_USER = 64


@dataclass(frozen=True)
class Caller:
    sandbox_id: str
    user: str  # a guest user name; "" = the agent's own (root)


def basic_user(header: str | None) -> str | None:
    """The user of `Authorization: Basic b64("user:")`, None without the header."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise InvalidArgument("Authorization must be Basic base64('user:')")
    try:
        text = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidArgument("Authorization: Basic carries no valid base64 'user:'") from None
    return check_user(text.partition(":")[0])


def check_user(name: str) -> str:
    if len(name) > MAX_USER or any(c in name for c in ":/\x00\n") or name != name.strip():
        raise InvalidArgument(f"not a user name: {name[:MAX_USER]!r}")
    return name


def caller(headers: Mapping[str, str], default_user: str, username: str | None = None) -> Caller:
    """From the request's headers (`username`: the /files query parameter, which wins)."""
    user = check_user(username) if username else basic_user(headers.get("authorization"))
    return Caller(headers.get(SANDBOX_HEADER, ""), default_user if user is None else user)


def guest_path(path: str, home: str) -> str:
    """An absolute, normalised guest path; relative ones are under the user's home."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise InvalidArgument("path must be a non-empty string without NUL")
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    if not path.startswith("/"):
        path = posixpath.join(home or "/", path)
    out = posixpath.normpath(path)
    return "/" + out.lstrip("/")
