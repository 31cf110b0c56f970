"""Settings of the Firecracker driver (`[firecracker]` and `[firecracker.jailer]`).

Mirrors the original arcbox-vm `FirecrackerConfig` / `JailerConfig` field for field, with two
fixes: the Firecracker options (log level, seccomp, payload limits) now apply in jailer mode
too, and every value is checked up front so a typo fails at load time with a message that
names the key and the accepted values instead of failing inside Firecracker.

The jailer is used by default (`use_jailer = "auto"`) where its binary exists and the daemon
is root, with `[firecracker.jailer]`'s settings or its defaults; without `uid`/`gid` each VM
runs as a uid of its own from `uid_range`, like a confined QEMU.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from arcbox_vm.config.qemu import DEFAULT_UID_RANGE, parse_uid_range

LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"]

DEFAULT_FIRECRACKER_BINARY = Path("/usr/bin/firecracker")
DEFAULT_JAILER_BINARY = Path("/usr/bin/jailer")
DEFAULT_CHROOT_BASE_DIR = Path("/srv/jailer")
DEFAULT_SOCKET_TIMEOUT_SECS = 5.0

_LOG_LEVELS: dict[str, LogLevel] = {
    "error": "Error",
    "warning": "Warning",
    "warn": "Warning",  # Firecracker accepts "Warn" as well
    "info": "Info",
    "debug": "Debug",
    "trace": "Trace",
    "off": "Off",
}
_RESOURCE_LIMIT_RE = re.compile(r"^(fsize|no-file)=([0-9]+)$")
_CGROUP_RE = re.compile(r"^[A-Za-z0-9_]+\.[A-Za-z0-9_.]+=\S.*$")
_MAX_U32 = 2**32 - 1
_MAX_U64 = 2**64 - 1


class JailerConfig(BaseModel):
    """Run Firecracker under the jailer (chroot + namespaces + privilege drop)."""

    model_config = ConfigDict(extra="forbid")

    binary: Path = Field(default=DEFAULT_JAILER_BINARY, description="jailer executable")
    uid: int | None = Field(default=None, description="user id Firecracker runs as; unset = one per VM from uid_range")
    gid: int | None = Field(default=None, description="group id Firecracker runs as (with uid)")
    uid_range: str = Field(DEFAULT_UID_RANGE, description="uids (gid = uid) claimed one per VM when uid is unset")
    chroot_base_dir: Path = Field(
        default=DEFAULT_CHROOT_BASE_DIR,
        description="jails live in <chroot_base_dir>/<firecracker file name>/<id>/root",
    )
    netns: Path | None = Field(default=None, description="network namespace to join (--netns)")
    new_pid_ns: bool = Field(default=False, description="run Firecracker as PID 1 of a new PID namespace")
    cgroup_version: Literal["1", "2"] | None = Field(
        default=None, description="cgroup hierarchy the jailer uses (--cgroup-version; jailer default 1)"
    )
    parent_cgroup: str | None = Field(
        default=None, description="relative cgroup path the per-VM cgroup is created under"
    )
    cgroups: list[str] = Field(
        default_factory=list, description="--cgroup values, e.g. 'cpu.max=50000 100000', 'memory.max=1G'"
    )
    resource_limits: list[str] = Field(
        default_factory=list, description="--resource-limit values: 'fsize=<bytes>' or 'no-file=<n>'"
    )

    @field_validator("uid", "gid")
    @classmethod
    def _id_range(cls, v: int | None, info) -> int | None:  # type: ignore[no-untyped-def]
        if v is not None and not 0 <= v < _MAX_U32:
            raise ValueError(f"firecracker.jailer.{info.field_name} must be between 0 and {_MAX_U32 - 1}, got {v}")
        return v

    @field_validator("uid_range")
    @classmethod
    def _uid_range(cls, v: str) -> str:
        parse_uid_range(v)
        return v.strip()

    @model_validator(mode="after")
    def _uid_and_gid(self) -> JailerConfig:
        if (self.uid is None) != (self.gid is None):
            raise ValueError("firecracker.jailer.uid and gid go together: set both (one user for every VM) "
                             "or neither (a uid of its own per VM from uid_range)")
        return self

    @field_validator("binary", "chroot_base_dir")
    @classmethod
    def _non_empty_path(cls, v: Path, info) -> Path:  # type: ignore[no-untyped-def]
        if str(v) in ("", "."):
            raise ValueError(f"firecracker.jailer.{info.field_name} must not be empty")
        return v

    @field_validator("chroot_base_dir", "netns")
    @classmethod
    def _absolute(cls, v: Path | None, info) -> Path | None:  # type: ignore[no-untyped-def]
        if v is not None and not v.is_absolute():
            raise ValueError(f"firecracker.jailer.{info.field_name} must be an absolute path, got '{v}'")
        return v

    @field_validator("cgroup_version", mode="before")
    @classmethod
    def _cgroup_version(cls, v: object) -> object:
        if v is None:
            return v
        if isinstance(v, bool) or str(v).strip() not in ("1", "2"):
            raise ValueError(f'firecracker.jailer.cgroup_version must be "1" or "2", got {v!r}')
        return str(v).strip()

    @field_validator("parent_cgroup")
    @classmethod
    def _parent_cgroup(cls, v: str | None) -> str | None:
        if v is None:
            return v
        p = PurePosixPath(v)
        if not v or p.is_absolute() or any(part in (".", "..") for part in v.split("/")):
            raise ValueError(
                "firecracker.jailer.parent_cgroup must be a relative cgroup path without '.' or '..' "
                f"components (e.g. 'firecracker' or 'arcbox/vms'), got {v!r}"
            )
        return v

    @field_validator("resource_limits")
    @classmethod
    def _resource_limits(cls, v: list[str]) -> list[str]:
        for item in v:
            m = _RESOURCE_LIMIT_RE.match(item)
            if not m or int(m.group(2)) > _MAX_U64:
                raise ValueError(
                    "firecracker.jailer.resource_limits entries must be 'fsize=<bytes>' or 'no-file=<count>' "
                    f"(unsigned 64-bit), got {item!r}"
                )
        return v

    @field_validator("cgroups")
    @classmethod
    def _cgroups(cls, v: list[str]) -> list[str]:
        for item in v:
            if not _CGROUP_RE.match(item) or item.count("=") != 1:
                raise ValueError(
                    "firecracker.jailer.cgroups entries must look like '<controller>.<file>=<value>' "
                    f"with exactly one '=' (e.g. 'cpuset.cpus=0-1'), got {item!r}"
                )
        return v


class FirecrackerConfig(BaseModel):
    """How to run Firecracker. Unknown keys are rejected so typos surface immediately."""

    model_config = ConfigDict(extra="forbid")

    binary: Path = Field(default=DEFAULT_FIRECRACKER_BINARY, description="firecracker executable")
    jailer: JailerConfig | None = Field(default=None, description="the jailer's settings (implies the jailer)")
    use_jailer: Literal["auto", "always", "never"] = Field(
        default="auto", description='"auto": the jailer when its binary exists and we are root; "never": direct')
    data_dir: Path | None = Field(
        default=None, description="root for sandboxes/snapshots; None = arcbox_vm.paths.data_dir()"
    )
    log_level: LogLevel | None = Field(default=None, description="Firecracker log level (--level)")
    no_seccomp: bool = Field(default=False, description="pass --no-seccomp (not recommended)")
    seccomp_filter: Path | None = Field(default=None, description="custom compiled BPF filter (--seccomp-filter)")
    http_api_max_payload_size: int | None = Field(default=None, description="--http-api-max-payload-size, bytes")
    mmds_size_limit: int | None = Field(default=None, description="--mmds-size-limit, bytes")
    socket_timeout_secs: float | None = Field(
        default=None, description="how long to wait for the API socket after spawning (default 5 s)"
    )

    @field_validator("binary")
    @classmethod
    def _binary(cls, v: Path) -> Path:
        if str(v) in ("", "."):
            raise ValueError("firecracker.binary must not be empty")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, v: object) -> object:
        if v is None:
            return v
        if not isinstance(v, str) or v.strip().lower() not in _LOG_LEVELS:
            raise ValueError(f"firecracker.log_level must be one of Error, Warning, Info, Debug, Trace, Off, got {v!r}")
        return _LOG_LEVELS[v.strip().lower()]

    @field_validator("http_api_max_payload_size", "mmds_size_limit")
    @classmethod
    def _positive_size(cls, v: int | None, info) -> int | None:  # type: ignore[no-untyped-def]
        if v is not None and not 0 < v <= _MAX_U64:
            raise ValueError(f"firecracker.{info.field_name} must be a positive number of bytes, got {v}")
        return v

    @field_validator("socket_timeout_secs")
    @classmethod
    def _timeout(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 3600:
            raise ValueError(f"firecracker.socket_timeout_secs must be > 0 and <= 3600 seconds, got {v}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> FirecrackerConfig:
        if self.no_seccomp and self.seccomp_filter is not None:
            raise ValueError(
                "firecracker.no_seccomp and firecracker.seccomp_filter are mutually exclusive "
                "(Firecracker refuses --no-seccomp together with --seccomp-filter); set only one"
            )
        if self.jailer is not None and self.use_jailer == "never":
            raise ValueError('firecracker.use_jailer = "never" contradicts a [firecracker.jailer] section; '
                             "remove one of them")
        if self.jailer is not None and "firecracker" not in self.binary.name:
            raise ValueError(
                "with firecracker.jailer set, the file name of firecracker.binary must contain "
                f"'firecracker' (the jailer refuses other names), got '{self.binary.name}'"
            )
        return self

    @property
    def api_socket_timeout(self) -> float:
        """Seconds to wait for the API socket (the configured value or 5 s)."""
        return self.socket_timeout_secs if self.socket_timeout_secs is not None else DEFAULT_SOCKET_TIMEOUT_SECS

    def resolved_data_dir(self) -> Path:
        """`data_dir`, or the project-wide data dir when unset."""
        if self.data_dir is not None:
            return self.data_dir
        from arcbox_vm.paths import data_dir

        return data_dir()
