"""`[e2b]`: the E2B-compatible API (the real `e2b` SDK talks to the daemon)."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENVD_PORT = 49983  # the in-sandbox API's port as the SDK names it (E2b-Sandbox-Port)


def _is_loopback(addr: str) -> bool:
    host = addr.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_addr(v: str) -> str:
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port (e.g. 127.0.0.1:3000), got {v!r}")
    return v


class E2bConfig(BaseModel):
    """The E2B-compatible API, served by `arcbox-vm serve` over the same manager.

    enabled: serve it.
    api_addr: the control plane (E2B_API_URL): create, list, kill, timeout, ...
    sandbox_addr: the in-sandbox API (E2B_SANDBOX_URL): commands, files, PTYs; one
      address for every sandbox, routed on the SDK's `E2b-Sandbox-Id` header.
    api_keys / api_keys_file: accepted `X-API-KEY` values (the file: one key a line, `#`
      comments); at least one is required.
    tls_cert / tls_key: required when either address is not a loopback address.
    default_user: the guest user commands and files use when the SDK names none (E2B's
      base image: "user").
    network: the network of sandboxes made through the E2B API ("tap": as configured in
      [network], with the SDK's allow_internet_access / network allowOut, denyOut as
      their egress policy; "none": no TAP, so no egress at all — creating one with
      internet access or allowOut is refused). Their ports are reachable either way
      (through the guest agent, `get_host(port)`).
    secure: every sandbox gets an access token (envdAccessToken) that the in-sandbox
      API requires, and a traffic access token (trafficAccessToken) for its other ports
      (`get_host(port)`: header E2b-Traffic-Access-Token); the SDK sends the first by itself.
    max_timeout_s: the longest sandbox timeout a client may ask for.
    max_processes / max_watchers: per sandbox, what the in-sandbox API may hold.
    max_request_mib: the largest JSON request body (file uploads are bounded by
      daemon.max_file_mib instead).
    watch_interval_s / watch_max_entries / watch_max_depth: directory watching polls
      the guest (the agent has no file-watch operation) at this interval, over at most
      this many entries and levels.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = False
    api_addr: str = "127.0.0.1:3000"
    sandbox_addr: str = f"127.0.0.1:{ENVD_PORT}"
    api_keys: list[str] = Field(default_factory=list)
    api_keys_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    default_user: str = "user"
    network: Literal["tap", "none"] = "tap"
    secure: bool = True
    max_timeout_s: int = Field(86400, ge=1)
    max_processes: int = Field(64, ge=1, le=4096)
    max_watchers: int = Field(16, ge=1, le=1024)
    max_request_mib: int = Field(4, ge=1, le=64)
    watch_interval_s: float = Field(0.5, ge=0.05, le=60)
    watch_max_entries: int = Field(10_000, ge=1, le=1_000_000)
    watch_max_depth: int = Field(8, ge=1, le=64)

    @field_validator("api_addr", "sandbox_addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        return _check_addr(v)

    @field_validator("default_user")
    @classmethod
    def _user(cls, v: str) -> str:
        if any(c in v for c in ":/\x00") or v != v.strip():
            raise ValueError(f"must be a user name (or '' for the agent's own user), got {v!r}")
        return v

    @model_validator(mode="after")
    def _tls(self) -> "E2bConfig":
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        return self

    @property
    def needs_tls(self) -> bool:
        """Either address is reachable from other machines: TLS is required."""
        return not (_is_loopback(self.api_addr) and _is_loopback(self.sandbox_addr))
