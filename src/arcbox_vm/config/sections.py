"""The sections of `VmmConfig` that configure the manager itself (network, API, daemon,
defaults, agent). Every default is stated once, here; the CLI, the daemon and the library
all read them from a `VmmConfig`."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The kernel command line every sandbox starts from (the driver adds what it needs).
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off init=/sbin/vm-agent"
DEFAULT_MEMORY_MIB = 512
DEFAULT_VCPUS = 1


def check_cgroup_parent(parent: str) -> str:
    """`daemon.cgroup_parent`: a relative cgroup path such as "arcbox-vm" or "vms/arcbox"."""
    parts = parent.split("/")
    if parent.startswith("/") or any(p in ("", ".", "..") or p.startswith("cgroup.") for p in parts) \
            or not parent.isprintable() or any(c.isspace() for c in parent):
        raise ValueError(f"must be a relative cgroup path like 'arcbox-vm' (no leading '/', '.', '..', "
                         f"empty parts or spaces), got {parent!r}")
    return parent


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Never reachable from a guest unless `blocked_except` says otherwise: the private
# ranges (RFC 1918), carrier-grade NAT (RFC 6598) and link-local (cloud metadata services).
DEFAULT_BLOCKED = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16"]
HOST_ALLOW_PROTOCOLS = ("tcp", "udp", "icmp")


def _ipv4_networks(values: list[str], what: str) -> list[str]:
    out = []
    for item in values:
        try:
            net = ipaddress.IPv4Network(item, strict=True)
        except ValueError as exc:
            raise ValueError(f"{what} entries must be IPv4 CIDRs like 10.0.0.0/8, got {item!r} ({exc})") from None
        out.append(str(net))
    return out


def parse_host_allow(entry: str) -> tuple[str, int, str]:
    """"172.20.0.1:53/udp" -> ("172.20.0.1", 53, "udp"); "172.20.0.1/icmp" (ping) -> port 0."""
    addr, sep, proto = entry.strip().rpartition("/")
    proto = proto.lower()
    if not sep or proto not in HOST_ALLOW_PROTOCOLS:
        raise ValueError(f"host_allow entries are '<ip>:<port>/tcp', '<ip>:<port>/udp' or '<ip>/icmp', got {entry!r}")
    port = 0
    if proto != "icmp":
        addr, sep, port_s = addr.rpartition(":")
        if not sep or not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise ValueError(f"host_allow: {entry!r} needs a port 1-65535 ('<ip>:<port>/{proto}')")
        port = int(port_s)
    try:
        ip = str(ipaddress.IPv4Address(addr))
    except ValueError:
        raise ValueError(f"host_allow: {entry!r} needs an IPv4 address of the host (e.g. the gateway)") from None
    return ip, port, proto


class NetworkConfig(_Section):
    """Sandbox networking (mode "tap"): one TAP per sandbox, point-to-point to the gateway.

    cidr: the pool guest addresses come from (network, broadcast and gateway excluded).
    gateway: the host end of every TAP and the guest's default route.
    dns: resolvers written to the guest's /etc/resolv.conf; empty = none (no guest sends
      DNS traffic to a resolver nobody configured). Guests reach them only if allowed:
      one on the host through `host_allow`, others through the sandbox's egress policy.
    default_egress: the egress of a sandbox whose spec does not say: "none" (nothing
      beyond its TAP except its allow_out list) or "nat" (anything not blocked, through
      NAT; IPv4 forwarding is enabled the first time a sandbox may leave).
    nat: the old switch; true = default_egress "nat" when default_egress is not set.
    host_allow: what guests may reach on the host itself, "<ip>:<port>/tcp|udp" or
      "<ip>/icmp" (ping), e.g. "172.20.0.1:53/udp" for a DNS forwarder on the gateway.
      Everything else a guest sends to the host is dropped (replies to connections the
      host opened excepted). Independent of the sandboxes' egress policies.
    blocked: IPv4 CIDRs no guest ever reaches, whatever its policy says (default: the
      private ranges, 100.64.0.0/10 and 169.254.0.0/16 — cloud metadata). The sandbox
      network (`cidr`) is always blocked too.
    blocked_except: CIDRs inside `blocked` that sandboxes may reach after all — when their
      own policy allows them (e.g. an internal package mirror). Only the operator can
      open a blocked range; a sandbox's allow_out cannot.
    netns: named network namespace for the TAPs, routes, rules and VMM processes (a
      confined QEMU gets an empty one of its own and its TAP as a descriptor);
      "" = the host's. Created if missing (and then removed when the manager closes).

    Firewall rules (nftables, table `arcbox_vm_<tag>`, family inet) are ours: installed at
    start, per-sandbox elements with each lease, all removed when the manager closes.
    """

    cidr: str = "172.20.0.0/16"
    gateway: str = "172.20.0.1"
    dns: list[str] = Field(default_factory=list)
    default_egress: Literal["none", "nat"] = "none"
    nat: bool = False
    host_allow: list[str] = Field(default_factory=list)
    blocked: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCKED))
    blocked_except: list[str] = Field(default_factory=list)
    netns: str = ""

    @field_validator("host_allow")
    @classmethod
    def _host_allow(cls, v: list[str]) -> list[str]:
        out = []
        for entry in v:
            ip, port, proto = parse_host_allow(entry)
            out.append(f"{ip}/icmp" if proto == "icmp" else f"{ip}:{port}/{proto}")
        return out

    @field_validator("blocked", "blocked_except")
    @classmethod
    def _ranges(cls, v: list[str], info) -> list[str]:  # noqa: ANN001
        return _ipv4_networks(v, info.field_name)

    @model_validator(mode="before")
    @classmethod
    def _nat_means_default_egress(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("nat") is True and "default_egress" not in data:
            return {**data, "default_egress": "nat"}
        return data

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        try:
            net = ipaddress.IPv4Network(v, strict=True)
        except ValueError as exc:
            raise ValueError(f"must be an IPv4 network like 172.20.0.0/16 ({exc})") from None
        if not 1 <= net.prefixlen <= 30:
            raise ValueError(f"prefix must be between /1 and /30, got /{net.prefixlen}")
        return str(net)

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, v: str) -> str:
        try:
            return str(ipaddress.IPv4Address(v))
        except ValueError:
            raise ValueError(f"must be an IPv4 address, got {v!r}") from None

    @field_validator("dns")
    @classmethod
    def _dns(cls, v: list[str]) -> list[str]:
        out = []
        for item in v:
            try:
                out.append(str(ipaddress.ip_address(item)))
            except ValueError:
                raise ValueError(f"entries must be IP addresses, got {item!r}") from None
        return out

    @field_validator("netns")
    @classmethod
    def _netns(cls, v: str) -> str:
        if v and (len(v) > 64 or "/" in v or v in (".", "..") or not v.isprintable() or " " in v):
            raise ValueError(f"must be a namespace name (no '/', spaces; at most 64 chars), got {v!r}")
        return v

    @model_validator(mode="after")
    def _gateway_in_cidr(self) -> "NetworkConfig":
        net = ipaddress.IPv4Network(self.cidr)
        gw = ipaddress.IPv4Address(self.gateway)
        if gw not in net or gw in (net.network_address, net.broadcast_address):
            raise ValueError(f"gateway {gw} must be a host address inside {net}")
        return self


class GrpcConfig(_Section):
    """Where the daemon listens.

    unix_socket: created mode 0660 (group `socket_group` if set); file permissions are the
      access control there.
    tcp_addr: "host:port", "" disables TCP. TCP requires TLS (tls_cert + tls_key) and a
      bearer token (token or token_file) unless the daemon runs with --insecure-tcp.
    """

    unix_socket: str = "/run/arcbox-vm/arcbox-vm.sock"
    tcp_addr: str = ""
    socket_group: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    token: str = ""
    token_file: str = ""
    max_message_mib: int = Field(16, ge=4, le=1024)

    @field_validator("tcp_addr")
    @classmethod
    def _tcp(cls, v: str) -> str:
        return check_host_port(v)


def check_host_port(v: str) -> str:
    """"host:port" (an IPv6 host in brackets: "[::1]:9464"); "" passes (= off)."""
    if v:
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host.strip("[]"):
            raise ValueError(f"must be host:port (e.g. 127.0.0.1:7070), got {v!r}")
    return v


class DaemonConfig(_Section):
    """`arcbox-vm serve` behaviour.

    on_shutdown: what SIGTERM/SIGINT do to sandboxes: "leave" them running (recorded in the
      state database; the next start re-adopts them) or "remove" them all.
    max_file_mib: largest file accepted by UploadFile (0 = no limit).
    cgroup_parent: every VMM process is moved into its own cgroup (v2)
      `<cgroup2 mount>/<cgroup_parent>/<data dir tag>/<sandbox id>`, outside the daemon's
      cgroup, so stopping or restarting the daemon's service does not kill the VMs, and
      removing a sandbox kills everything it started. A relative path; "" = off. Without a
      writable cgroup2 hierarchy (not root, read-only) VMMs stay in the daemon's cgroup.
      The VMM's `[limits]` are written there (or, where cgroup2 has no controllers, in
      per-sandbox v1 cgroups at the same relative path under each controller's mount).
    """

    on_shutdown: Literal["leave", "remove"] = "leave"
    max_file_mib: int = Field(4096, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["logfmt", "json"] = "logfmt"
    cgroup_parent: str = "arcbox-vm"

    @field_validator("cgroup_parent")
    @classmethod
    def _cgroup_parent(cls, v: str) -> str:
        if not v:
            return v
        return check_cgroup_parent(v.strip("/") or "/")  # "/arcbox-vm" is how cgroup paths are often written


class DefaultVmConfig(_Section):
    """Defaults for sandboxes whose spec leaves a field empty/zero.

    kernel/rootfs "" = the image made by `arcbox-vm image build` (built on first use).
    initrd "" = the built image's initramfs when the built kernel is used, else none.
    """

    vcpus: int = Field(DEFAULT_VCPUS, ge=1, le=32)
    memory_mib: int = Field(DEFAULT_MEMORY_MIB, ge=64, le=1 << 20)
    kernel: str = ""
    rootfs: str = ""
    initrd: str = ""
    boot_args: str = DEFAULT_BOOT_ARGS


class AgentConfig(_Section):
    """Talking to guest agents.

    hello_timeout_s: how long a booting VM gets to say HELLO before it is FAILED.
    keepalive_interval_s / keepalive_timeout_s: a live agent is pinged this often; one that
      does not answer for the timeout is declared gone: its command streams end with an
      error and the sandbox becomes FAILED (reason agent_unresponsive). Generous by
      default: under software emulation a loaded host answers slowly.
    """

    hello_timeout_s: float = Field(120.0, gt=0)
    keepalive_interval_s: float = Field(10.0, gt=0)
    keepalive_timeout_s: float = Field(60.0, gt=0)


class PoolConfig(_Section):
    """The warm pool: `size` sandboxes of the default spec kept restored and ready (0 = off).

    The daemon boots one such sandbox, checkpoints it, and keeps `size` restores of that
    checkpoint ready; `create_sandbox` with a spec the pool serves (default kernel, rootfs,
    boot arguments, vCPUs, memory, egress policy, and network `network`) takes one — its
    labels, TTL, env, user and working directory applied — and the pool refills in the
    background. Pool sandboxes are not listed and do not outlive their daemon.

    templates (`[pool.templates]`, NAME = N): N restores of template NAME's checkpoint kept
    ready for `create --template NAME` (and the E2B API's templateID); a template built
    later, or rebuilt, is picked up. Members count against `[limits]` like any sandbox,
    and a create that finds no room removes idle members (of any pool) first.
    """

    size: int = Field(0, ge=0, le=64)
    network: Literal["tap", "none"] = "tap"
    parallel: int = Field(2, ge=1, le=16, description="restores running at once while it fills")
    templates: dict[str, int] = Field(default_factory=dict, description="template name = sandboxes of it kept ready")

    @field_validator("templates")
    @classmethod
    def _template_pools(cls, v: dict[str, int]) -> dict[str, int]:
        """`[pool.templates]` NAME = N: names as `template build` takes them (a typo would
        otherwise be a pool that silently never fills), 0..64 each, 256 in all."""
        from arcbox_vm.templates.models import check_template_name

        for name, n in v.items():
            check_template_name(name)
            if not 0 <= n <= 64:
                raise ValueError(f"pool.templates.{name} must be 0..64, got {n}")
        if sum(v.values()) > 256:
            raise ValueError(f"the template pools hold {sum(v.values())} sandboxes together; at most 256")
        return v


class TemplatesConfig(_Section):
    """Template builds (`arcbox-vm template build`).

    build_egress: the most network a build's RUN steps may have — "none" (the default:
    nothing leaves the build sandbox) or "nat" (a build may then ask for it; API clients
    cannot go beyond this). max_context_mib: the largest build context a client may send.
    """

    build_egress: Literal["none", "nat"] = "none"
    max_context_mib: int = Field(256, ge=1, le=16384)


class ImagesConfig(_Section):
    """Images that API clients may boot, by name.

    dir: a directory of kernels, initrds and rootfs images; over the API a sandbox's
      kernel/initrd/rootfs is a name resolved inside it (symlinks followed, never out of
      it), never a host path. "" = `<data_dir>/named-images`. The library (in-process,
      trusted) may still pass paths.
    """

    dir: str = ""


class LimitsConfig(_Section):
    """Limits on what API clients (and guests) may make the daemon hold. Over a limit:
    RESOURCE_EXHAUSTED (counts, totals) or INVALID_ARGUMENT (one request too big).

    max_total_memory_mib: guest memory of all live sandboxes together; 0 = the host's RAM.
    vmm_overhead_mib: added to a sandbox's guest memory for its VMM cgroup's memory limit
      (QEMU's own memory, the TCG translation cache).
    pids_max: processes/threads one VMM may have (its cgroup's pids limit).
    console_log_max_bytes: the newest this many bytes of a sandbox's serial console are kept.
    max_port_mappings: forwarded ports (`-p`) one sandbox may ask for.
    max_port_connections: forwarded connections open at once per sandbox, all its ports
      together; more wait in the listen backlog until one ends.
    image_unpack_max_bytes: `image import-oci`: the archive, and the files of all its layers
      together (as their tar headers declare them, before anything is written), at most this
      many bytes — an untrusted archive cannot fill the disk.
    """

    max_sandboxes: int = Field(64, ge=1, le=100_000)
    max_total_memory_mib: int = Field(0, ge=0)
    max_memory_mib_per_sandbox: int = Field(16384, ge=64)
    max_vcpus_per_sandbox: int = Field(8, ge=1, le=32)
    max_labels: int = Field(64, ge=0)
    max_label_bytes: int = Field(1024, ge=1, description="key + value of one label")
    max_env_vars: int = Field(256, ge=0)
    max_env_bytes: int = Field(128 * 1024, ge=1, description="all of a sandbox's default env together")
    max_boot_args_bytes: int = Field(1024, ge=64)
    vmm_overhead_mib: int = Field(160, ge=0)
    pids_max: int = Field(512, ge=16)
    console_log_max_bytes: int = Field(8 << 20, ge=64 << 10)
    max_port_mappings: int = Field(32, ge=0, le=1024)
    max_port_connections: int = Field(256, ge=1, le=1024)
    image_unpack_max_bytes: int = Field(8 << 30, ge=1 << 20)


class MetricsConfig(_Section):
    """The Prometheus endpoint of the daemon (`arcbox_vm.metrics`).

    addr: "host:port" to serve /metrics on over plain HTTP, e.g. "127.0.0.1:9464"; "" = off
      (the default: the endpoint has no authentication and names every sandbox, so it is
      opened only when asked for, on an address the operator chose).
    """

    addr: str = ""

    @field_validator("addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        return check_host_port(v)
