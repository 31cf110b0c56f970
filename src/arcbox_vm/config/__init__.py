"""`VmmConfig` and its sections, as in the original's config.rs — every section optional.

Sections live in `sections.py` (the manager's own), `firecracker.py` and `qemu.py` (the
VMM drivers'); this package imports no adapter, so reading a config (the client does, to
find the daemon's socket) stays cheap.

`VmmConfig.from_file(path)` reads TOML. Unknown keys and bad values are errors naming the
key (`network.cidr: ...`); the original required all four sections and ignored `dns`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from arcbox_vm.config.cluster import ClusterConfig
from arcbox_vm.config.e2b import E2bConfig
from arcbox_vm.config.firecracker import FirecrackerConfig, JailerConfig
from arcbox_vm.config.qemu import QemuConfig
from arcbox_vm.config.sections import (
    DEFAULT_BOOT_ARGS,
    DEFAULT_MEMORY_MIB,
    DEFAULT_VCPUS,
    AgentConfig,
    DaemonConfig,
    DefaultVmConfig,
    GrpcConfig,
    ImagesConfig,
    LimitsConfig,
    MetricsConfig,
    NetworkConfig,
    PoolConfig,
    TemplatesConfig,
    _Section,
)
from arcbox_vm.errors import ConfigError
from arcbox_vm.paths import data_dir as default_data_dir

DEFAULT_CONFIG_PATH = Path("/etc/arcbox-vm/config.toml")

__all__ = [
    "DEFAULT_BOOT_ARGS",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_MEMORY_MIB",
    "DEFAULT_VCPUS",
    "AgentConfig",
    "ClusterConfig",
    "DaemonConfig",
    "DefaultVmConfig",
    "E2bConfig",
    "FirecrackerConfig",
    "GrpcConfig",
    "ImagesConfig",
    "JailerConfig",
    "LimitsConfig",
    "MetricsConfig",
    "NetworkConfig",
    "PoolConfig",
    "QemuConfig",
    "TemplatesConfig",
    "VmmConfig",
]


class VmmConfig(_Section):
    """The whole configuration. `backend` picks the VMM ("auto": Firecracker if usable, else QEMU)."""

    backend: Literal["auto", "firecracker", "qemu"] = "auto"
    data_dir: Path = Field(default_factory=default_data_dir)
    firecracker: FirecrackerConfig = Field(default_factory=FirecrackerConfig)
    qemu: QemuConfig = Field(default_factory=QemuConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    defaults: DefaultVmConfig = Field(default_factory=DefaultVmConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    e2b: E2bConfig = Field(default_factory=E2bConfig)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    templates: TemplatesConfig = Field(default_factory=TemplatesConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @property
    def named_images_dir(self) -> Path:
        """Where the images API clients name live (`images.dir`, else `<data_dir>/named-images`)."""
        return Path(self.images.dir) if self.images.dir else self.data_dir / "named-images"

    @model_validator(mode="before")
    @classmethod
    def _data_dir_alias(cls, data: Any) -> Any:
        """`data_dir` (top level) is where images, sandboxes and state live, whatever the VMM;
        the original's `firecracker.data_dir` is accepted as an alias for it."""
        if isinstance(data, dict):
            fc = data.get("firecracker")
            alias = fc.get("data_dir") if isinstance(fc, dict) else getattr(fc, "data_dir", None)
            top = data.get("data_dir")
            if alias and top and Path(alias) != Path(top):
                raise ValueError(f"data_dir ({top}) and its alias firecracker.data_dir ({alias}) disagree; "
                                 "set only data_dir")
            if alias and not top:
                data = {**data, "data_dir": alias}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VmmConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @classmethod
    def discover(cls, path: str | Path | None = None) -> "VmmConfig":
        """`path`, else `$ARCBOX_VM_CONFIG`, else /etc/arcbox-vm/config.toml if it exists,
        else the defaults — how the daemon and `arcbox-vm run` find their configuration."""
        import os

        chosen = Path(path) if path else (Path(os.environ["ARCBOX_VM_CONFIG"]) if os.environ.get("ARCBOX_VM_CONFIG")
                                          else None)
        if chosen is None and DEFAULT_CONFIG_PATH.exists():
            chosen = DEFAULT_CONFIG_PATH
        return cls.from_file(chosen) if chosen is not None else cls()

    @classmethod
    def from_file(cls, path: str | Path) -> "VmmConfig":
        """Read a TOML file; errors name the file and the key."""
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {p}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{p}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)
