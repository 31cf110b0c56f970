"""Public data types of the library API (a Pythonic port of the original's types)."""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from arcbox_vm.templates.models import check_template_name

Stream = Literal["stdout", "stderr", "exit", "error"]

# Caller-chosen sandbox ids: used in paths, TAP bookkeeping, VMM ids (Firecracker allows
# [A-Za-z0-9-]{1,64}); anything else is refused rather than escaped.
SANDBOX_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


class SandboxState(str, enum.Enum):
    """Lifecycle states; `str(state)` / `.value` is the lowercase name the original displayed."""

    STARTING = "starting"
    READY = "ready"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    PAUSED = "paused"  # not running the guest (pause_sandbox); in memory or saved to disk

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """A piece of a command's output.

    stream "stdout"/"stderr": `data` holds bytes. The last chunk of a run is either
    "exit" (`exit_code` set; 128+N when killed by signal N) or "error" (the command could
    not finish normally — agent connection lost, VM stopped; `data` is the UTF-8 reason).
    """

    stream: Stream
    data: bytes = b""
    exit_code: int = 0


# The longest command timeout accepted (a day); 0 = none. The agent clamps its own waits too.
MAX_EXEC_TIMEOUT_S = 86400.0


@dataclass(frozen=True)
class ExecSpec:
    """How to run one command — the options every exec path shares (library, daemon, client, CLI).

    env, working_dir and user fall back to the sandbox's defaults (its `SandboxSpec`).
    tty_size is (cols, rows), width first, everywhere. timeout_seconds > 0 kills the
    command and its children after that long (exit 124 from the CLI). stdin gives the
    command a pipe (or the PTY) that the caller writes to.
    """

    cmd: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    user: str = ""
    tty: bool = False
    tty_size: tuple[int, int] | None = None
    timeout_seconds: float = 0.0
    stdin: bool = False

    def __post_init__(self) -> None:
        cmd = self.cmd
        if isinstance(cmd, (str, bytes)) or not cmd or not all(isinstance(c, str) for c in cmd):
            raise ValueError("cmd must be a non-empty list of strings")
        object.__setattr__(self, "cmd", tuple(cmd))
        if not isinstance(self.env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in self.env.items()):
            raise ValueError("env must map strings to strings")
        if self.tty_size is not None:
            cols, rows = self.tty_size
            if not (0 < int(cols) < 65536 and 0 < int(rows) < 65536):
                raise ValueError(f"tty_size must be (cols, rows) in 1..65535, got {self.tty_size}")
            object.__setattr__(self, "tty_size", (int(cols), int(rows)))
        timeout = float(self.timeout_seconds or 0)
        if not 0 <= timeout <= MAX_EXEC_TIMEOUT_S:
            raise ValueError(f"timeout_seconds must be between 0 and {MAX_EXEC_TIMEOUT_S:g}, got {timeout:g}")
        object.__setattr__(self, "timeout_seconds", timeout)

    def replace(self, **changes: object) -> "ExecSpec":
        import dataclasses

        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


# The most CIDRs one allow_out / deny_out list may hold (each becomes a firewall element).
MAX_EGRESS_CIDRS = 256


def egress_cidrs(values: object, what: str = "allow_out") -> list[str]:
    """IPv4 networks for an egress list, normalised ("1.2.3.4" = 1.2.3.4/32) and sorted,
    duplicates dropped; ValueError names the entry that is not one."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple, set, frozenset)):
        raise ValueError(f"{what} must be a list of IPv4 CIDRs like 10.1.2.0/24")
    if len(values) > MAX_EGRESS_CIDRS:
        raise ValueError(f"{what} holds at most {MAX_EGRESS_CIDRS} CIDRs, got {len(values)}")
    out = set()
    for item in values:
        try:
            net = ipaddress.ip_network(str(item).strip(), strict=True)
        except ValueError as exc:
            raise ValueError(f"{what}: {item!r} is not a CIDR like 10.1.2.0/24 ({exc})") from None
        if net.version != 4:
            raise ValueError(f"{what}: {item!r} is IPv6; sandboxes have IPv4 only")
        out.add(net)
    return [str(n) for n in sorted(out)]


@dataclass(frozen=True)
class PortMapping:
    """A TCP port of the guest made reachable on the host (Docker's `-p`).

    A connection to host_addr:host_port reaches 127.0.0.1:guest_port inside the VM,
    through the guest agent (no DNAT: it works with network "none" too). host_port 0 picks a
    free port (`SandboxInfo.ports` shows the one chosen). host_addr is the host's loopback
    by default; "0.0.0.0" (or "::") exposes the guest port to every network the host is on.
    """

    guest_port: int
    host_port: int = 0
    host_addr: str = "127.0.0.1"
    protocol: str = "tcp"

    def __post_init__(self) -> None:
        for name, lo in (("guest_port", 1), ("host_port", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= 65535:
                raise ValueError(f"{name} must be a port number in {lo}..65535, got {value!r}")
        try:
            addr = str(ipaddress.ip_address(str(self.host_addr or "127.0.0.1").strip("[]")))
        except ValueError:
            raise ValueError(f"host_addr must be an IP address (e.g. 127.0.0.1 or 0.0.0.0), "
                             f"got {self.host_addr!r}") from None
        object.__setattr__(self, "host_addr", addr)
        if (self.protocol or "tcp").lower() != "tcp":
            raise ValueError(f"only tcp ports are forwarded, got {self.protocol!r}")
        object.__setattr__(self, "protocol", "tcp")

    @classmethod
    def parse(cls, text: str) -> "PortMapping":
        """Docker's `-p` syntax: `[ADDR:][HOSTPORT:]GUESTPORT[/tcp]` (an IPv6 ADDR in
        brackets; an empty or missing HOSTPORT picks a free one)."""
        spec, _, proto = str(text).strip().partition("/")
        addr = ""
        if spec.startswith("["):
            addr, sep, spec = spec[1:].partition("]")
            if not sep or not spec.startswith(":"):
                raise ValueError(f"port mapping {text!r}: expected [ADDR]:HOSTPORT:GUESTPORT")
            spec = spec[1:]
            parts = spec.split(":")
            if len(parts) != 2:
                raise ValueError(f"port mapping {text!r}: expected [ADDR]:HOSTPORT:GUESTPORT")
        else:
            parts = spec.split(":")
            if len(parts) == 3:
                addr = parts.pop(0)
            elif len(parts) > 3:
                raise ValueError(f"port mapping {text!r}: write an IPv6 address in brackets, e.g. [::1]:8080:80")
        host, guest = parts if len(parts) == 2 else ("", parts[0])
        if not guest.isdigit() or (host and not host.isdigit()):
            raise ValueError(f"port mapping {text!r}: expected [ADDR:]HOSTPORT:GUESTPORT, e.g. 8080:80")
        return cls(guest_port=int(guest), host_port=int(host or 0), host_addr=addr or "127.0.0.1",
                   protocol=proto or "tcp")

    @property
    def host_endpoint(self) -> str:
        """ADDR:PORT (an IPv6 address in brackets)."""
        return f"[{self.host_addr}]:{self.host_port}" if ":" in self.host_addr else f"{self.host_addr}:{self.host_port}"

    def __str__(self) -> str:
        """As `docker port` prints it: `80/tcp -> 127.0.0.1:8080`."""
        return f"{self.guest_port}/{self.protocol} -> {self.host_endpoint}"


class SandboxNetworkSpec(BaseModel):
    """A sandbox's network.

    mode "tap": its own address on a TAP device; "none": no network at all.
    egress: "none" — nothing beyond its TAP except `allow_out`; "nat" — anything, through
      NAT. None = the daemon's `[network] default_egress` ("none" unless configured).
    allow_out: IPv4 CIDRs it may reach even with egress "none".
    deny_out: IPv4 CIDRs it may never reach; wins over allow_out and egress "nat".
    Whatever these say, the host, other sandboxes and the operator's `[network] blocked`
    ranges (private, link-local, metadata) stay out of reach.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["tap", "none"] = "tap"
    egress: Literal["none", "nat"] | None = None
    allow_out: list[str] = Field(default_factory=list)
    deny_out: list[str] = Field(default_factory=list)

    @field_validator("allow_out", "deny_out", mode="before")
    @classmethod
    def _cidrs(cls, v: object, info) -> list[str]:  # noqa: ANN001
        return egress_cidrs(v, info.field_name)

    @model_validator(mode="after")
    def _only_with_tap(self) -> "SandboxNetworkSpec":
        if self.mode == "none" and (self.egress or self.allow_out or self.deny_out):
            raise ValueError("egress, allow_out and deny_out need network mode 'tap'")
        return self


class SandboxSpec(BaseModel):
    """What to create. Empty/zero fields take `VmmConfig.defaults`.

    env, working_dir and user are defaults for every command run in the sandbox.
    ttl_seconds > 0 removes the sandbox that long after it became ready — or, with
    on_ttl="pause", pauses it to disk (its TTL is then spent: a resumed sandbox runs until
    `set_ttl` gives it a new one).
    ports: guest TCP ports forwarded from the host (see PortMapping), network mode or not.
    """

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    kernel: str = ""
    rootfs: str = ""
    initrd: str = ""
    boot_args: str = ""
    vcpus: int = Field(0, ge=0, le=32)
    memory_mib: int = Field(0, ge=0, le=1 << 20)
    network: SandboxNetworkSpec = Field(default_factory=SandboxNetworkSpec)
    ttl_seconds: int = Field(0, ge=0)
    on_ttl: Literal["remove", "pause"] = "remove"
    env: dict[str, str] = Field(default_factory=dict)
    working_dir: str = ""
    user: str = ""
    ports: list[PortMapping] = Field(default_factory=list)
    template: str = ""

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        """A template's name (`arcbox-vm template ls`): the sandbox is a restore of its
        checkpoint, so kernel, rootfs, vCPUs, memory and ports come from the template."""
        return check_template_name(v) if v else ""

    @field_validator("ports", mode="before")
    @classmethod
    def _port_strings(cls, v: object) -> object:
        """"8080:80" (Docker's -p syntax, see PortMapping.parse) is accepted for a mapping."""
        if isinstance(v, (list, tuple)):
            return [PortMapping.parse(m) if isinstance(m, str) else m for m in v]
        return v

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[PortMapping]) -> list[PortMapping]:
        seen = set()
        for m in v:
            if m.host_port and (m.host_addr, m.host_port) in seen:
                raise ValueError(f"host port {m.host_endpoint} is mapped twice")
            seen.add((m.host_addr, m.host_port))
        return v

    @field_validator("id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and v != "" and not SANDBOX_ID_RE.match(v):
            raise ValueError(
                "sandbox ids are 1-63 characters of letters, digits and '-', starting with a letter or digit"
            )
        return v or None

    @field_validator("memory_mib")
    @classmethod
    def _mem(cls, v: int) -> int:
        if v and v < 64:
            raise ValueError("memory_mib must be 0 (default) or at least 64")
        return v


class RestoreSandboxSpec(BaseModel):
    """A new sandbox from a checkpoint: its own id, IP, TAP, MAC and copy of the disk.

    It continues the checkpointed sandbox (files, processes, the default env/user/working
    dir of its commands); `env` is merged over those defaults. `network` None keeps the
    checkpointed sandbox's mode (the only one a restore can have: the saved machine has
    that network device or not). ttl_seconds > 0 removes it that long after it is ready.
    """

    model_config = ConfigDict(extra="forbid")

    snapshot_id: str
    id: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    ttl_seconds: int = Field(0, ge=0)
    network: SandboxNetworkSpec | None = None
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        return SandboxSpec._id(v)  # type: ignore[operator]

    @field_validator("snapshot_id")
    @classmethod
    def _snapshot_id(cls, v: str) -> str:
        if not SANDBOX_ID_RE.match(v or ""):
            raise ValueError("snapshot ids are 1-63 characters of letters, digits and '-'")
        return v


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint (snapshot) of a sandbox: memory, device state and disk.

    in_use: sandboxes restored from it whose memory is still mapped from its files (they
    keep the files alive after a delete)."""

    snapshot_id: str
    name: str
    sandbox_id: str
    created_at: float
    size_bytes: int
    in_use: int = 0


@dataclass(frozen=True)
class SandboxNetworkInfo:
    """A sandbox's address and its egress policy as applied (see SandboxNetworkSpec)."""

    ip_address: str
    gateway: str
    tap_name: str
    egress: str = ""
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()


@dataclass(frozen=True)
class SandboxInfo:
    """A snapshot of one sandbox (timestamps are Unix seconds as floats, None if unset)."""

    id: str
    state: SandboxState
    labels: dict[str, str]
    vcpus: int
    memory_mib: int
    network: SandboxNetworkInfo | None
    created_at: float
    ready_at: float | None = None
    last_exited_at: float | None = None
    last_exit_code: int | None = None
    error: str | None = None
    vmm: str = ""
    pid: int | None = None
    ttl_seconds: int = 0  # removed this long after ready_at (0 = never)
    ports: tuple[PortMapping, ...] = ()  # with the host ports actually chosen
    ttl_deadline: float | None = None  # when the TTL acts (time spent paused added), None if never
    on_ttl: str = "remove"  # what it does then: "remove" or "pause"


@dataclass(frozen=True)
class SandboxSummary:
    id: str
    state: SandboxState
    labels: dict[str, str]
    ip_address: str
    created_at: float


ExecStatus = Literal["running", "detached", "exited", "ended", "lost"]


@dataclass(frozen=True)
class ExecInfo:
    """One command run in a sandbox, as the state database remembers it.

    status: "running" (a client is attached), "detached" (it kept running in the guest
    while the daemon was away; `attach_exec` takes it over, also after it finished),
    "exited" (finished, `exit_code` set), "ended" (its stream ended without an exit: killed
    because the client went away, or the VM stopped), "lost" (running when the daemon
    stopped and gone when it came back — e.g. the VM restarted).
    """

    exec_id: str
    sandbox_id: str
    cmd: list[str]
    status: ExecStatus
    started_at: float
    finished_at: float | None = None
    exit_code: int | None = None


@dataclass(frozen=True)
class SandboxEvent:
    """A lifecycle event. action: created, ready, running, idle, stopping, stopped, failed,
    removed, paused, resumed, checkpointed — or "lagged" (this subscriber missed `attributes["missed"]` events, which
    happens only when it fell behind the retained part of the event log)."""

    sandbox_id: str
    action: str
    timestamp_ns: int
    attributes: dict[str, str] = field(default_factory=dict)
    id: int = 0  # position in the event log (monotonic); resume with subscribe_events(since=id)


@dataclass(frozen=True)
class FileStat:
    """What the guest says about one path. type: "file", "dir", "symlink" or "other"."""

    path: str
    name: str
    type: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime: float
    link_target: str = ""


@dataclass(frozen=True)
class SandboxStats:
    """Resource use of one sandbox's VMM, read at `timestamp_ns` (Unix nanoseconds).

    cpu_seconds and the io bytes count from the VMM's start (its cgroup's, else its process
    tree's, see `source`); memory_bytes is what it holds now; `processes` how many run
    there. source: "cgroup", "processes", or "" when no VMM runs (all zero). CPU % is the
    difference of cpu_seconds between two reads over the time between them.
    """

    id: str
    state: SandboxState
    cpu_seconds: float
    memory_bytes: int
    io_read_bytes: int
    io_write_bytes: int
    processes: int
    timestamp_ns: int
    source: str = ""
