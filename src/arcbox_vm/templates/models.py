"""The public data types of templates: what to build, what a template is, build progress."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# Template names are used in paths and as E2B template ids: like sandbox ids, lower case,
# plus '.' and '_' (never '..' alone: the first character is a letter or digit).
TEMPLATE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
BASE = "arcbox:base"  # FROM this = the built Debian guest image
OCI_PREFIX = "oci-archive:"
MAX_CONTEXT_BYTES = 256 << 20  # a build context (tar) larger than this is refused
MAX_DOCKERFILE_BYTES = 1 << 20
DEFAULT_READY_TIMEOUT_S = 120.0


def check_template_name(name: object) -> str:
    """`name` if it is a valid template name, else ValueError saying what one is."""
    if not isinstance(name, str) or not TEMPLATE_NAME_RE.match(name):
        raise ValueError(f"template names are 1-63 characters of a-z, 0-9, '.', '_' and '-', starting with a "
                         f"letter or digit; got {name!r}")
    return name


@dataclass(frozen=True)
class TemplateBuildSpec:
    """What to build.

    dockerfile: the Dockerfile text (FROM, RUN, COPY, ADD, ENV, WORKDIR, USER, ARG, START,
    READY). context: a directory (library callers only: a host path is trusted there; its
    .dockerignore is honoured) or the bytes of a tar of it (what API clients send).
    disk_size_mib: grow the root disk to this size (0 = the base's size). memory_mib /
    vcpus: the build sandbox's and every sandbox made from the template (0 = defaults).
    build_args: values for ARG. network: the network device of the template's sandboxes
    ("tap", or "none": no network at all; a restore has the device its checkpoint had). egress: the build sandbox's network — "none" (the default:
    no network; only the operator's `[templates] build_egress` may allow "nat").
    ready_timeout_s: how long READY is polled before the build fails.
    """

    name: str
    dockerfile: str
    context: Path | bytes | None = None
    disk_size_mib: int = 0
    memory_mib: int = 0
    vcpus: int = 0
    build_args: dict[str, str] = field(default_factory=dict)
    egress: Literal["none", "nat"] | None = None
    network: Literal["tap", "none"] = "tap"
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    no_cache: bool = False

    def __post_init__(self) -> None:
        check_template_name(self.name)
        if not isinstance(self.dockerfile, str) or len(self.dockerfile.encode()) > MAX_DOCKERFILE_BYTES:
            raise ValueError(f"the Dockerfile must be text of at most {MAX_DOCKERFILE_BYTES >> 10} KiB")
        if not 0 <= int(self.disk_size_mib) <= 1 << 20:
            raise ValueError("disk_size_mib must be between 0 and 1048576 (1 TiB)")
        if self.memory_mib and not 64 <= int(self.memory_mib) <= 1 << 20:
            raise ValueError("memory_mib must be 0 (default) or at least 64")
        if not 0 <= int(self.vcpus) <= 32:
            raise ValueError("vcpus must be 0 (default) to 32")
        if not 0 < float(self.ready_timeout_s) <= 3600:
            raise ValueError("ready_timeout_s must be more than 0 and at most 3600")
        if self.egress not in (None, "none", "nat"):
            raise ValueError("egress must be 'none' or 'nat'")
        if self.network not in ("tap", "none") or (self.network == "none" and self.egress == "nat"):
            raise ValueError("network must be 'tap' or 'none' (and egress 'nat' needs 'tap')")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.build_args.items()):
            raise ValueError("build_args must map strings to strings")


@dataclass(frozen=True)
class TemplateInfo:
    """A finished template: a root disk and a checkpoint of it taken after READY passed.

    key: its content key (same key = same template). steps: the Dockerfile's instructions
    as built. env / working_dir / user: the defaults of commands in its sandboxes.
    in_use: sandboxes made from it that are still running."""

    name: str
    key: str
    created_at: float
    base: str
    size_bytes: int
    memory_mib: int
    vcpus: int
    env: dict[str, str]
    working_dir: str
    user: str
    start: str
    ready: str
    steps: tuple[str, ...] = ()
    build_seconds: float = 0.0
    in_use: int = 0


ProgressKind = Literal["step", "cached", "output", "done", "error"]


@dataclass(frozen=True)
class BuildProgress:
    """One progress event of a build.

    kind "step": step `step` of `total` starts (`text` is the instruction); "cached": that
    step's result was in the cache; "output": a RUN/START/READY step's output (`data`,
    `stream` "stdout"/"stderr"); "done": the template is ready (`text` = its name,
    `cached` = nothing was rebuilt); "error": the build failed at `step` (`text` says why,
    `exit_code` is the failing command's)."""

    kind: ProgressKind
    step: int = 0
    total: int = 0
    text: str = ""
    data: bytes = b""
    stream: str = ""
    exit_code: int | None = None
    cached: bool = False
