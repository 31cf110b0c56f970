"""Where the daemon is and how to talk to it: target resolution, credentials, channel options.

Resolution order (first match wins; giving both a socket and a host at the same level is
an error, because silently preferring one would send requests to the wrong daemon):

1. explicit arguments (`socket=` / `--socket`, `host=` / `--host`)
2. the environment (`ARCBOX_VM_SOCKET`, `ARCBOX_VM_HOST`)
3. the daemon's config file (`config=` / `--config`, else `ARCBOX_VM_CONFIG`):
   `[grpc] unix_socket`, else the built-in default /run/arcbox-vm/arcbox-vm.sock

Unix sockets carry no credentials (file permissions guard them). TCP uses TLS unless
`insecure` (the CA from `tls_ca` / `ARCBOX_VM_TLS_CA`, else the system roots) and sends
the token (`token` / `ARCBOX_VM_TOKEN`) as `authorization: Bearer <token>` metadata —
as metadata rather than call credentials so that it works on plaintext channels too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc

from arcbox_vm.errors import ArcboxError, InvalidArgument

__all__ = ["CHANNEL_OPTIONS", "MAX_MESSAGE_BYTES", "Target", "resolve_target"]

ENV_SOCKET = "ARCBOX_VM_SOCKET"
ENV_HOST = "ARCBOX_VM_HOST"
ENV_TOKEN = "ARCBOX_VM_TOKEN"
ENV_TLS_CA = "ARCBOX_VM_TLS_CA"
ENV_INSECURE = "ARCBOX_VM_INSECURE"
ENV_CONFIG = "ARCBOX_VM_CONFIG"

# File chunks are 1 MiB; 16 MiB leaves room for large output bursts and listings.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

# Only over TCP: notice a dead peer (NAT timeouts, a rebooted host) on long streams such as
# `events -f`. Pings go out only while calls are active, every 60 s, and (gRPC's default)
# at most 2 in a row without data — so even a server with gRPC's default ping policy
# (5 min between pings without data, GOAWAY after more than 2 strikes) never hangs up.
KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
]


@dataclass(frozen=True)
class Target:
    """A resolved daemon address plus what is needed to open a channel to it."""

    address: str                         # "unix:/abs/path" or "host:port"
    transport: Literal["unix", "tcp"]
    tls: bool = False
    tls_ca: str | None = None
    token: str | None = None

    def __str__(self) -> str:
        return self.address

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer token, over TCP only."""
        if self.transport == "tcp" and self.token:
            return (("authorization", f"Bearer {self.token}"),)
        return ()

    @property
    def options(self) -> list[tuple[str, Any]]:
        return CHANNEL_OPTIONS + (KEEPALIVE_OPTIONS if self.transport == "tcp" else [])

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials for a secure TCP channel (reads the CA file now, to fail early)."""
        root: bytes | None = None
        if self.tls_ca:
            try:
                root = Path(self.tls_ca).read_bytes()
            except OSError as exc:
                raise ArcboxError(f"cannot read the TLS CA certificate {self.tls_ca}: {exc.strerror}") from None
        return grpc.ssl_channel_credentials(root_certificates=root)

    def aio_channel(self) -> grpc.aio.Channel:
        """A grpc.aio channel; call inside the event loop that will use it."""
        if self.tls:
            return grpc.aio.secure_channel(self.address, self.credentials(), options=self.options)
        return grpc.aio.insecure_channel(self.address, options=self.options)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _unix(path: str) -> str:
    return "unix:" + os.path.abspath(os.path.expanduser(path))


def _tcp(host: str) -> str:
    """Validate HOST:PORT ([v6]:PORT for IPv6) so a typo fails here, not as UNAVAILABLE."""
    h, sep, port = host.rpartition(":")
    if not sep or not h or not port.isdigit() or not 0 < int(port) < 65536 or (":" in h and not h.startswith("[")):
        raise InvalidArgument(f"host {host!r}: expected HOST:PORT, e.g. 10.0.0.5:7000 or [::1]:7000")
    return host


def _config_socket(config: str | os.PathLike[str] | None) -> str:
    if config is None:
        from arcbox_vm.config import GrpcConfig

        return GrpcConfig().unix_socket
    from arcbox_vm.config import VmmConfig

    return VmmConfig.from_file(config).grpc.unix_socket


def resolve_target(socket: str | os.PathLike[str] | None = None, host: str | None = None, *,
                   token: str | None = None, tls_ca: str | os.PathLike[str] | None = None,
                   insecure: bool = False, config: str | os.PathLike[str] | None = None,
                   environ: Mapping[str, str] | None = None) -> Target:
    """Pick the daemon's address from arguments, then the environment, then the config.

    Empty strings count as unset, so CLI defaults and empty environment variables are
    harmless. Raises InvalidArgument for a socket and a host given together, or a host
    without a port; ConfigError for an unreadable config file.
    """
    env = os.environ if environ is None else environ
    sock = os.fspath(socket) if socket else None
    if sock and host:
        raise InvalidArgument("give either a Unix socket (--socket) or a TCP host (--host), not both")
    if not sock and not host:
        env_sock, env_host = env.get(ENV_SOCKET) or None, env.get(ENV_HOST) or None
        if env_sock and env_host:
            raise InvalidArgument(f"both {ENV_SOCKET} and {ENV_HOST} are set; unset one, or pass --socket/--host")
        sock, host = env_sock, env_host
    if not sock and not host:
        sock = _config_socket(config or env.get(ENV_CONFIG) or None)
    if sock:
        return Target(address=_unix(sock), transport="unix")
    assert host
    plaintext = bool(insecure) or _truthy(env.get(ENV_INSECURE))
    ca = os.fspath(tls_ca) if tls_ca else (env.get(ENV_TLS_CA) or None)
    return Target(address=_tcp(host), transport="tcp", tls=not plaintext, tls_ca=None if plaintext else ca,
                  token=token or env.get(ENV_TOKEN) or None)
