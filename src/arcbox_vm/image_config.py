"""An image's run settings (from its OCI config), kept next to its rootfs as a JSON sidecar.

`arcbox-vm image import-oci` (images/oci_rootfs.py) writes `<rootfs>.oci.json`; the
manager reads it when a sandbox boots that rootfs, so the image's env, working directory
and user become the sandbox's defaults (the spec's own values win). Pure: no adapter, no
tool — the manager and the template pipeline use it directly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arcbox_vm.errors import ImageError

SIDECAR_SUFFIX = ".oci.json"
MAX_SIDECAR_BYTES = 1 << 20


@dataclass(frozen=True)
class OciImageConfig:
    """What an image's config says about how its programs run (the OCI `config` object).

    `env` keeps the image's order; `user` is as written ("1000", "app:app", ""); empty
    fields mean the image does not say.
    """

    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    user: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)

    @property
    def env_list(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.env.items()]

    def to_json(self) -> dict[str, Any]:
        return {"env": dict(self.env), "working_dir": self.working_dir, "user": self.user,
                "entrypoint": list(self.entrypoint), "cmd": list(self.cmd)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OciImageConfig:
        return cls(env={str(k): str(v) for k, v in dict(d.get("env") or {}).items()},
                   working_dir=str(d.get("working_dir") or ""), user=str(d.get("user") or ""),
                   entrypoint=[str(a) for a in d.get("entrypoint") or []],
                   cmd=[str(a) for a in d.get("cmd") or []])

    @classmethod
    def from_oci(cls, image_config: dict[str, Any]) -> OciImageConfig:
        """From an OCI/Docker image config blob (its `config` member; `Env` is `K=V` strings)."""
        c = image_config.get("config") or {}
        if not isinstance(c, dict):
            raise ImageError("the image config's `config` is not an object")
        env: dict[str, str] = {}
        for item in _str_list(c.get("Env"), "Env"):
            k, sep, v = item.partition("=")
            if sep and k:
                env[k] = v
        return cls(env=env, working_dir=_str(c.get("WorkingDir"), "WorkingDir"), user=_str(c.get("User"), "User"),
                   entrypoint=_str_list(c.get("Entrypoint"), "Entrypoint"), cmd=_str_list(c.get("Cmd"), "Cmd"))


def _str(v: object, what: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ImageError(f"the image config's {what} is not a string")
    return v


def _str_list(v: object, what: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(a, str) for a in v):
        raise ImageError(f"the image config's {what} is not a list of strings")
    return list(v)


def sidecar_path(rootfs_path: str | os.PathLike[str]) -> Path:
    return Path(str(rootfs_path) + SIDECAR_SUFFIX)


def write_image_defaults(rootfs_path: str | os.PathLike[str], config: OciImageConfig) -> Path:
    """Write the sidecar of `rootfs_path` atomically (temp + rename); returns its path."""
    path = sidecar_path(rootfs_path)
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    tmp.write_text(json.dumps({"version": 1, "config": config.to_json()}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def image_defaults(rootfs_path: str | os.PathLike[str]) -> OciImageConfig | None:
    """The run settings stored next to `rootfs_path`, or None when it has none (a built or
    hand-made image). A sidecar that is unreadable or malformed is an ImageError: booting
    with silently different defaults would be worse."""
    path = sidecar_path(rootfs_path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIDECAR_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ImageError(f"cannot read the image settings {path}: {e}") from None
    try:
        if len(data) > MAX_SIDECAR_BYTES:
            raise ValueError("too large")
        d = json.loads(data)
        return OciImageConfig.from_json(d["config"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ImageError(f"the image settings {path} are malformed ({e})") from None
