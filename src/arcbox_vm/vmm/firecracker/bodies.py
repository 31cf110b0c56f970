"""Builders for every Firecracker API request the driver can send.

Each builder returns an `ApiRequest` (method, path, JSON body) and emits only fields that
Firecracker's OpenAPI spec defines, in both the latest release (v1.16.1) and the development
head: Firecracker rejects unknown JSON keys (serde `deny_unknown_fields`), so an extra field is
a 400. Optional arguments left at `None` are omitted, so Firecracker applies its own default.
Fields that exist only in the unreleased head (metrics `emit_id`/`properties`, snapshot-load
`huge_pages`, machine-config `huge_pages: "Transparent"`) are deliberately not offered. There is
no `PATCH /machine-config` builder: the spec gives that operation the full
`MachineConfiguration` schema (vcpu_count and mem_size_mib required), so a partial update
cannot be spec-valid; send `put_machine_config` with the complete values instead.

Values are checked here against the limits the spec and Firecracker's code enforce, so a bad
value fails before a process is spawned, with a message naming the field (`BodyError`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from arcbox_vm.errors import VmmError

MAX_VCPUS = 32
MIN_GUEST_CID = 3
MAX_U32 = 2**32 - 1
MAX_U64 = 2**64 - 1
MTU_MIN, MTU_MAX = 68, 65535

_ID_RE = re.compile(r"^[A-Za-z0-9_]+$")
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")

LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"]
CacheType = Literal["Unsafe", "Writeback"]
IoEngine = Literal["Sync", "Async"]
HugePages = Literal["None", "2M"]
CpuTemplate = Literal["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"]
SnapshotType = Literal["Full", "Diff"]
MemBackendType = Literal["File", "Uffd"]
ActionType = Literal["InstanceStart", "SendCtrlAltDel", "FlushMetrics"]

_LOG_LEVELS = ("Error", "Warning", "Info", "Debug", "Trace", "Off")


class BodyError(VmmError, ValueError):
    """A value cannot be expressed as a valid Firecracker request (names the field)."""


@dataclass(frozen=True)
class ApiRequest:
    """One call to Firecracker's API: `method path` with an optional JSON body."""

    method: str
    path: str
    body: dict[str, Any] | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


# --------------------------------------------------------------------------- checks


def _check_id(field: str, value: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise BodyError(
            f"{field} must be non-empty and contain only letters, digits and '_' "
            f"(Firecracker rejects other characters, including '-'), got {value!r}"
        )
    return value


def _check_int(field: str, value: int, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BodyError(f"{field} must be an integer between {lo} and {hi}, got {value!r}")
    return value


def _check_str(field: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise BodyError(f"{field} must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise BodyError(f"{field} must not contain NUL bytes")
    return value


def _check_choice(field: str, value: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise BodyError(f"{field} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_bool(field: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise BodyError(f"{field} must be true or false, got {value!r}")
    return value


def _path_str(field: str, value: Any) -> str:
    return _check_str(field, str(value) if value is not None else value)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- rate limiters


def token_bucket(size: int, refill_time: int, one_time_burst: int | None = None) -> dict[str, Any]:
    """A token bucket: `size` tokens refilled over `refill_time` ms (0 disables the bucket)."""
    body: dict[str, Any] = {
        "size": _check_int("token_bucket.size", size, 0, MAX_U64),
        "refill_time": _check_int("token_bucket.refill_time", refill_time, 0, MAX_U64),
    }
    if one_time_burst is not None:
        body["one_time_burst"] = _check_int("token_bucket.one_time_burst", one_time_burst, 0, MAX_U64)
    return body


def rate_limiter(bandwidth: Mapping[str, Any] | None = None, ops: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A rate limiter from up to two token buckets (bytes and operations)."""
    body: dict[str, Any] = {}
    if bandwidth is not None:
        body["bandwidth"] = dict(bandwidth)
    if ops is not None:
        body["ops"] = dict(ops)
    return body


# --------------------------------------------------------------------------- pre-boot configuration


def put_logger(
    log_path: str | None = None,
    level: str | None = None,
    show_level: bool | None = None,
    show_log_origin: bool | None = None,
    module: str | None = None,
) -> ApiRequest:
    body: dict[str, Any] = {}
    if log_path is not None:
        body["log_path"] = _path_str("logger.log_path", log_path)
    if level is not None:
        body["level"] = _check_choice("logger.level", level, _LOG_LEVELS)
    if show_level is not None:
        body["show_level"] = _check_bool("logger.show_level", show_level)
    if show_log_origin is not None:
        body["show_log_origin"] = _check_bool("logger.show_log_origin", show_log_origin)
    if module is not None:
        body["module"] = _check_str("logger.module", module)
    return ApiRequest("PUT", "/logger", body)


def put_metrics(metrics_path: str) -> ApiRequest:
    return ApiRequest("PUT", "/metrics", {"metrics_path": _path_str("metrics.metrics_path", metrics_path)})


def _machine_config_body(
    vcpu_count: int | None,
    mem_size_mib: int | None,
    smt: bool | None,
    track_dirty_pages: bool | None,
    huge_pages: str | None,
    cpu_template: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if vcpu_count is not None:
        body["vcpu_count"] = _check_int("machine_config.vcpu_count", vcpu_count, 1, MAX_VCPUS)
    if mem_size_mib is not None:
        body["mem_size_mib"] = _check_int("machine_config.mem_size_mib", mem_size_mib, 1, MAX_U64 >> 20)
    if smt is not None:
        body["smt"] = _check_bool("machine_config.smt", smt)
        if smt and vcpu_count is not None and vcpu_count != 1 and vcpu_count % 2:
            raise BodyError(f"machine_config.vcpu_count must be 1 or even when smt is on, got {vcpu_count}")
    if track_dirty_pages is not None:
        body["track_dirty_pages"] = _check_bool("machine_config.track_dirty_pages", track_dirty_pages)
    if huge_pages is not None:
        body["huge_pages"] = _check_choice("machine_config.huge_pages", huge_pages, ("None", "2M"))
        if huge_pages == "2M" and mem_size_mib is not None and mem_size_mib % 2:
            raise BodyError(
                f"machine_config.mem_size_mib must be a multiple of 2 with 2M huge pages, got {mem_size_mib}"
            )
    if cpu_template is not None:
        body["cpu_template"] = _check_choice(
            "machine_config.cpu_template", cpu_template, ("C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None")
        )
    return body


def put_machine_config(
    vcpu_count: int,
    mem_size_mib: int,
    *,
    smt: bool | None = None,
    track_dirty_pages: bool | None = None,
    huge_pages: str | None = None,
    cpu_template: str | None = None,
) -> ApiRequest:
    """The whole machine configuration (omitted optional fields return to their defaults)."""
    if vcpu_count is None or mem_size_mib is None:
        raise BodyError("machine_config needs vcpu_count and mem_size_mib")
    return ApiRequest(
        "PUT",
        "/machine-config",
        _machine_config_body(vcpu_count, mem_size_mib, smt, track_dirty_pages, huge_pages, cpu_template),
    )


def put_boot_source(kernel_image_path: str, boot_args: str | None = None, initrd_path: str | None = None) -> ApiRequest:
    """Kernel (uncompressed vmlinux for released Firecracker), command line and optional initrd."""
    body: dict[str, Any] = {"kernel_image_path": _path_str("boot_source.kernel_image_path", kernel_image_path)}
    if boot_args is not None:
        if not isinstance(boot_args, str) or "\x00" in boot_args:
            raise BodyError("boot_source.boot_args must be a string without NUL bytes")
        body["boot_args"] = boot_args
    if initrd_path is not None:
        body["initrd_path"] = _path_str("boot_source.initrd_path", initrd_path)
    return ApiRequest("PUT", "/boot-source", body)


def put_drive(
    drive_id: str,
    path_on_host: str,
    *,
    is_root_device: bool,
    is_read_only: bool,
    partuuid: str | None = None,
    cache_type: str | None = None,
    io_engine: str | None = None,
    rate_limiter: Mapping[str, Any] | None = None,
) -> ApiRequest:
    """A virtio-block drive backed by a host file."""
    _check_id("drive.drive_id", drive_id)
    body: dict[str, Any] = {
        "drive_id": drive_id,
        "path_on_host": _path_str("drive.path_on_host", path_on_host),
        "is_root_device": _check_bool("drive.is_root_device", is_root_device),
        "is_read_only": _check_bool("drive.is_read_only", is_read_only),
    }
    if partuuid is not None:
        body["partuuid"] = _check_str("drive.partuuid", partuuid)
    if cache_type is not None:
        body["cache_type"] = _check_choice("drive.cache_type", cache_type, ("Unsafe", "Writeback"))
    if io_engine is not None:
        body["io_engine"] = _check_choice("drive.io_engine", io_engine, ("Sync", "Async"))
    if rate_limiter is not None:
        body["rate_limiter"] = dict(rate_limiter)
    return ApiRequest("PUT", f"/drives/{drive_id}", body)


def put_vhost_user_drive(
    drive_id: str,
    socket: str,
    *,
    is_root_device: bool,
    partuuid: str | None = None,
    cache_type: str | None = None,
) -> ApiRequest:
    """A vhost-user-block drive (no path_on_host / is_read_only / io_engine / rate_limiter)."""
    _check_id("drive.drive_id", drive_id)
    body: dict[str, Any] = {
        "drive_id": drive_id,
        "socket": _path_str("drive.socket", socket),
        "is_root_device": _check_bool("drive.is_root_device", is_root_device),
    }
    if partuuid is not None:
        body["partuuid"] = _check_str("drive.partuuid", partuuid)
    if cache_type is not None:
        body["cache_type"] = _check_choice("drive.cache_type", cache_type, ("Unsafe", "Writeback"))
    return ApiRequest("PUT", f"/drives/{drive_id}", body)


def patch_drive(
    drive_id: str, *, path_on_host: str | None = None, rate_limiter: Mapping[str, Any] | None = None
) -> ApiRequest:
    """Post-boot: point a drive at another file (size is rescanned) and/or change its limiter."""
    _check_id("drive.drive_id", drive_id)
    body: dict[str, Any] = {"drive_id": drive_id}
    if path_on_host is not None:
        body["path_on_host"] = _path_str("drive.path_on_host", path_on_host)
    if rate_limiter is not None:
        body["rate_limiter"] = dict(rate_limiter)
    return ApiRequest("PATCH", f"/drives/{drive_id}", body)


def check_mac(field: str, mac: str) -> str:
    if not isinstance(mac, str) or not _MAC_RE.match(mac):
        raise BodyError(f"{field} must look like AA:BB:CC:DD:EE:FF, got {mac!r}")
    if int(mac[:2], 16) & 1:
        raise BodyError(f"{field} must be a unicast MAC (first octet even), got {mac!r}")
    return mac


def put_network_interface(
    iface_id: str,
    host_dev_name: str,
    *,
    guest_mac: str | None = None,
    mtu: int | None = None,
    rx_rate_limiter: Mapping[str, Any] | None = None,
    tx_rate_limiter: Mapping[str, Any] | None = None,
) -> ApiRequest:
    """A virtio-net device backed by the host TAP `host_dev_name`."""
    _check_id("network_interface.iface_id", iface_id)
    _check_str("network_interface.host_dev_name", host_dev_name)
    if len(host_dev_name.encode()) > 15 or "/" in host_dev_name or " " in host_dev_name:
        raise BodyError(
            f"network_interface.host_dev_name must be a TAP device name of at most 15 bytes, got {host_dev_name!r}"
        )
    body: dict[str, Any] = {"iface_id": iface_id, "host_dev_name": host_dev_name}
    if guest_mac is not None:
        body["guest_mac"] = check_mac("network_interface.guest_mac", guest_mac)
    if mtu is not None:
        body["mtu"] = _check_int("network_interface.mtu", mtu, MTU_MIN, MTU_MAX)
    if rx_rate_limiter is not None:
        body["rx_rate_limiter"] = dict(rx_rate_limiter)
    if tx_rate_limiter is not None:
        body["tx_rate_limiter"] = dict(tx_rate_limiter)
    return ApiRequest("PUT", f"/network-interfaces/{iface_id}", body)


def patch_network_interface(
    iface_id: str,
    *,
    rx_rate_limiter: Mapping[str, Any] | None = None,
    tx_rate_limiter: Mapping[str, Any] | None = None,
) -> ApiRequest:
    """Post-boot: change a NIC's rate limiters (an omitted limiter stays as it is)."""
    _check_id("network_interface.iface_id", iface_id)
    body: dict[str, Any] = {"iface_id": iface_id}
    if rx_rate_limiter is not None:
        body["rx_rate_limiter"] = dict(rx_rate_limiter)
    if tx_rate_limiter is not None:
        body["tx_rate_limiter"] = dict(tx_rate_limiter)
    return ApiRequest("PATCH", f"/network-interfaces/{iface_id}", body)


def put_vsock(guest_cid: int, uds_path: str) -> ApiRequest:
    """The vsock device. Firecracker binds `uds_path` during this call (it must not exist)."""
    return ApiRequest(
        "PUT",
        "/vsock",
        {
            "guest_cid": _check_int("vsock.guest_cid", guest_cid, MIN_GUEST_CID, MAX_U32 - 1),
            "uds_path": _path_str("vsock.uds_path", uds_path),
        },
    )


def put_entropy(rate_limiter: Mapping[str, Any] | None = None) -> ApiRequest:
    """A virtio-rng device (guest `/dev/hwrng`)."""
    body: dict[str, Any] = {}
    if rate_limiter is not None:
        body["rate_limiter"] = dict(rate_limiter)
    return ApiRequest("PUT", "/entropy", body)


# --------------------------------------------------------------------------- actions and VM state


def instance_action(action_type: str) -> ApiRequest:
    _check_choice("action_type", action_type, ("InstanceStart", "SendCtrlAltDel", "FlushMetrics"))
    return ApiRequest("PUT", "/actions", {"action_type": action_type})


def instance_start() -> ApiRequest:
    """Boot the configured VM (pre-boot only, succeeds once)."""
    return instance_action("InstanceStart")


def send_ctrl_alt_del() -> ApiRequest:
    """Inject Ctrl+Alt+Del through the emulated i8042 (x86_64, post-boot)."""
    return instance_action("SendCtrlAltDel")


def flush_metrics() -> ApiRequest:
    """Write one metrics line now (post-boot)."""
    return instance_action("FlushMetrics")


def patch_vm_state(state: str) -> ApiRequest:
    _check_choice("vm.state", state, ("Paused", "Resumed"))
    return ApiRequest("PATCH", "/vm", {"state": state})


def pause_vm() -> ApiRequest:
    return patch_vm_state("Paused")


def resume_vm() -> ApiRequest:
    return patch_vm_state("Resumed")


# --------------------------------------------------------------------------- snapshots


def create_snapshot(snapshot_path: str, mem_file_path: str, snapshot_type: str | None = None) -> ApiRequest:
    """Write VM state and guest memory (the VM must be paused)."""
    body: dict[str, Any] = {
        "snapshot_path": _path_str("snapshot.snapshot_path", snapshot_path),
        "mem_file_path": _path_str("snapshot.mem_file_path", mem_file_path),
    }
    if snapshot_type is not None:
        body["snapshot_type"] = _check_choice("snapshot.snapshot_type", snapshot_type, ("Full", "Diff"))
    return ApiRequest("PUT", "/snapshot/create", body)


def load_snapshot(
    snapshot_path: str,
    mem_backend_path: str,
    *,
    mem_backend_type: str = "File",
    resume_vm: bool | None = None,
    track_dirty_pages: bool | None = None,
    network_overrides: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    vsock_override: str | None = None,
    clock_realtime: bool | None = None,
) -> ApiRequest:
    """Restore a snapshot into a fresh process (only logger/metrics may be configured before).

    `network_overrides` maps iface_id -> new TAP name; `vsock_override` is the new vsock
    `uds_path`. Uses `mem_backend` (the deprecated `mem_file_path` is never sent).
    """
    body: dict[str, Any] = {
        "snapshot_path": _path_str("snapshot_load.snapshot_path", snapshot_path),
        "mem_backend": {
            "backend_type": _check_choice("snapshot_load.mem_backend.backend_type", mem_backend_type, ("File", "Uffd")),
            "backend_path": _path_str("snapshot_load.mem_backend.backend_path", mem_backend_path),
        },
    }
    if resume_vm is not None:
        body["resume_vm"] = _check_bool("snapshot_load.resume_vm", resume_vm)
    if track_dirty_pages is not None:
        body["track_dirty_pages"] = _check_bool("snapshot_load.track_dirty_pages", track_dirty_pages)
    if network_overrides is not None:
        items = network_overrides.items() if isinstance(network_overrides, Mapping) else network_overrides
        overrides = []
        for iface_id, host_dev_name in items:
            _check_id("snapshot_load.network_overrides.iface_id", iface_id)
            overrides.append(
                {
                    "iface_id": iface_id,
                    "host_dev_name": _check_str("snapshot_load.network_overrides.host_dev_name", host_dev_name),
                }
            )
        body["network_overrides"] = overrides
    if vsock_override is not None:
        body["vsock_override"] = {"uds_path": _path_str("snapshot_load.vsock_override.uds_path", vsock_override)}
    if clock_realtime is not None:
        body["clock_realtime"] = _check_bool("snapshot_load.clock_realtime", clock_realtime)
    return ApiRequest("PUT", "/snapshot/load", body)
