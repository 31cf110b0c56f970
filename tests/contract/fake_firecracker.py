"""A fake Firecracker for contract tests: the real API contract, no VM.

`FakeFirecracker` is a small asyncio HTTP/1.1 server on a Unix socket (keep-alive,
Content-Length bodies) that behaves like Firecracker's API where the driver can tell:

* every request body is validated against the vendored OpenAPI specs (HEAD and v1.16.1,
  both must accept it), with unknown fields rejected (serde ``deny_unknown_fields``);
* path ids must be ``[A-Za-z0-9_]+`` and equal the id in the body;
* phase rules: pre-boot-only calls after InstanceStart and post-boot-only calls before it
  get 400 ``fault_message``; InstanceStart twice is a 400; ``PUT /metrics`` only once;
* files are opened "at request time" (kernel, initrd, drives) and ``PUT /vsock`` binds
  ``uds_path`` (EADDRINUSE if it exists), like the real VMM;
* errors use the real shapes: ``{"fault_message": ...}`` from the VMM layer,
  ``{"error": ...}`` from the HTTP layer (payload over the limit);
* any request can be made to fail on demand (`fail()`), with either error shape or a
  non-JSON body.

On InstanceStart a tiny "guest" can dial ``<uds_path>_<port>`` (port from
``arcbox.channel=vsock:<port>`` in the boot args) and send an agent HELLO frame, and
SendCtrlAltDel makes the process exit 0 the way ``reboot=k`` does.

`cli_main()` is the fake ``firecracker`` executable (tests/contract/bin/firecracker): it
parses the real CLI flags with the real parser's rules (unknown/duplicate flag -> exit 153)
and serves the fake API. `jailer_main()` is the fake ``jailer``. Test knobs come from
``FAKE_FC_*`` environment variables (see `cli_main`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from fc_spec import SPEC_FILES, UnknownRoute, load_spec

FAKE_FIRECRACKER = HERE / "bin" / "firecracker"  # executable fake `firecracker` (runs cli_main)
FAKE_JAILER = HERE / "bin" / "jailer"  # executable fake `jailer` (runs jailer_main)

FAKE_VERSION = "1.16.1"
DEFAULT_MAX_PAYLOAD = 51200
ID_RE = re.compile(r"^[A-Za-z0-9_]+$")
INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")

NOT_BEFORE = "The requested operation is not supported before starting the microVM."
NOT_AFTER = "The requested operation is not supported after starting the microVM."

# (METHOD, template) -> phase. "pre" = only before boot, "post" = only after.
PHASES: dict[tuple[str, str], str] = {
    ("PUT", "/boot-source"): "pre",
    ("PUT", "/machine-config"): "pre",
    ("PATCH", "/machine-config"): "pre",
    ("PUT", "/cpu-config"): "pre",
    ("PUT", "/vsock"): "pre",
    ("PUT", "/entropy"): "pre",
    ("PUT", "/balloon"): "pre",
    ("PUT", "/logger"): "pre",
    ("PUT", "/metrics"): "pre",
    ("PUT", "/serial"): "pre",
    ("PUT", "/mmds/config"): "pre",
    ("PUT", "/hotplug/memory"): "pre",
    ("PUT", "/snapshot/load"): "pre",
    ("PATCH", "/drives/{drive_id}"): "post",
    ("PATCH", "/network-interfaces/{iface_id}"): "post",
    ("PATCH", "/pmem/{id}"): "post",
    ("PATCH", "/balloon"): "post",
    ("GET", "/balloon/statistics"): "post",
    ("PATCH", "/balloon/statistics"): "post",
    ("PATCH", "/balloon/hinting/start"): "post",
    ("GET", "/balloon/hinting/status"): "post",
    ("PATCH", "/balloon/hinting/stop"): "post",
    ("PATCH", "/hotplug/memory"): "post",
    ("GET", "/hotplug/memory"): "post",
    ("PATCH", "/vm"): "post",
    ("PUT", "/snapshot/create"): "post",
}
HOTPLUG = {("PUT", "/drives/{drive_id}"), ("PUT", "/network-interfaces/{iface_id}"), ("PUT", "/pmem/{id}")}
ID_FIELDS = {"drive_id": "drive_id", "iface_id": "iface_id", "id": "id"}
PATHS_OPENED = {  # body fields Firecracker opens at request time
    "/boot-source": ("kernel_image_path", "initrd_path"),
    "/drives/{drive_id}": ("path_on_host",),
    "/pmem/{id}": ("path_on_host",),
}
STATUS_TEXT = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    413: "Payload Too Large",
    500: "Internal Server Error",
}


class ApiFault(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Failure:
    method: str
    path: str  # concrete path, or a template such as "/drives/{drive_id}"
    status: int = 400
    shape: str = "fault_message"  # "fault_message" | "error" | "text" | "empty"
    message: str = "injected failure"
    times: int = 1

    def body(self) -> bytes:
        if self.shape == "fault_message":
            return json.dumps({"fault_message": self.message}).encode()
        if self.shape == "error":
            return json.dumps({"error": self.message}).encode()
        if self.shape == "empty":
            return b""
        return self.message.encode()


@dataclass
class Recorded:
    method: str
    path: str
    template: str | None
    body: Any
    status: int
    response: Any
    spec_errors: dict[str, list[str]] = field(default_factory=dict)
    time: float = field(default_factory=time.monotonic)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "template": self.template,
            "body": self.body,
            "status": self.status,
            "response": self.response,
            "spec_errors": self.spec_errors,
        }


def hello_frame(payload: dict[str, Any] | None = None) -> bytes:
    """An agent HELLO frame (header ">2sBBII": magic, type 0x01, flags, channel 0, length)."""
    data = json.dumps(
        payload
        or {"proto": 1, "agent_version": "fake", "kernel": "fake-guest", "hostname": "fake", "pid": 1, "features": []}
    ).encode()
    return struct.pack(">2sBBII", b"AV", 0x01, 0, 0, len(data)) + data


class FakeFirecracker:
    """The fake API server. `root` emulates the jail (paths are resolved inside it)."""

    def __init__(
        self,
        socket_path: Path | str,
        *,
        root: Path | str | None = None,
        versions: tuple[str, ...] = tuple(SPEC_FILES),
        instance_id: str = "anonymous-instance",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        metrics_initialized: bool = False,
        enable_pci: bool = False,
        guest: bool = True,
        log: Callable[[str], None] | None = None,
        console: Callable[[str], None] | None = None,
        on_exit: Callable[[int], None] | None = None,
        record: Callable[[Recorded], None] | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.root = Path(root) if root is not None else None
        self.versions = versions
        self.specs = [load_spec(v) for v in versions]
        self.instance_id = instance_id
        self.max_payload = max_payload
        self.enable_pci = enable_pci
        self.guest = guest
        self._log = log or (lambda line: None)
        self._console = console or (lambda line: None)
        self._on_exit = on_exit
        self._record = record
        self.requests: list[Recorded] = []
        self.failures: list[Failure] = []
        self.started = False
        self.paused = False
        self.metrics_initialized = metrics_initialized
        self.configured: dict[str, Any] = {}
        self.drives: dict[str, dict[str, Any]] = {}
        self.ifaces: dict[str, dict[str, Any]] = {}
        self.machine: dict[str, Any] = {
            "vcpu_count": 1,
            "mem_size_mib": 128,
            "smt": False,
            "track_dirty_pages": False,
            "huge_pages": "None",
        }
        self.mmds: dict[str, Any] = {}
        self.vsock_sock: socket.socket | None = None
        self.vsock_path: Path | None = None
        self.guest_connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.guest_error: str | None = None
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.socket_path.exists():
            raise FileExistsError(
                f"Failed to open the API socket at: {self.socket_path}. Check that it is not already used."
            )
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)
        for task in list(self._tasks):
            task.cancel()
        for _, writer in self.guest_connections:
            writer.close()
        if self.vsock_sock is not None:
            self.vsock_sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def fail(
        self,
        method: str,
        path: str,
        *,
        status: int = 400,
        shape: str = "fault_message",
        message: str = "injected failure",
        times: int = 1,
    ) -> None:
        """Make the next `times` requests `method path` fail with the given error shape."""
        self.failures.append(Failure(method.upper(), path, status, shape, message, times))

    def host_path(self, path: str) -> Path:
        """Where a path given to Firecracker lives on the host (inside the jail if any)."""
        if self.root is None:
            return Path(path)
        return self.root / path.lstrip("/")

    def log(self, level: str, thread: str, message: str) -> None:
        ts = datetime.datetime.now().isoformat(timespec="microseconds")
        self._log(f"{ts} [{self.instance_id}:{thread}:{level}] {message}")

    # ------------------------------------------------------------------ HTTP

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                if line in (b"\r\n", b"\n"):
                    continue
                try:
                    method, target, version = line.decode("latin-1").strip().split(" ")
                except ValueError:
                    await self._respond(writer, 400, {"error": "Invalid HTTP request line."}, close=True)
                    break
                if version not in ("HTTP/1.0", "HTTP/1.1"):
                    await self._respond(writer, 400, {"error": "Unsupported HTTP version."}, close=True)
                    break
                headers: dict[str, str] = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                if headers.get("transfer-encoding", "identity").lower() not in ("identity",):
                    await self._respond(writer, 400, {"error": "Unsupported transfer encoding."}, close=True)
                    break
                try:
                    length = int(headers.get("content-length", "0"))
                except ValueError:
                    await self._respond(writer, 400, {"error": "Invalid value for Content-Length."}, close=True)
                    break
                if length > self.max_payload:
                    await self._respond(
                        writer,
                        400,
                        {
                            "error": (
                                f"Request payload with size {length} is larger than the limit of {self.max_payload} "
                                "allowed by server.\nAll previous unanswered requests will be dropped."
                            )
                        },
                        close=True,
                    )
                    break
                raw = await reader.readexactly(length) if length else b""
                status, payload = await self.handle(method.upper(), target, raw)
                await self._respond(writer, status, payload)
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _respond(self, writer: asyncio.StreamWriter, status: int, payload: Any, close: bool = False) -> None:
        head = [
            f"HTTP/1.1 {status} {STATUS_TEXT.get(status, '')}",
            "Server: Firecracker API",
            "Connection: " + ("close" if close else "keep-alive"),
        ]
        if isinstance(payload, (bytes, bytearray)):
            data = bytes(payload)
            ctype = "text/plain"
        elif payload is None:
            data = b""
            ctype = None
        else:
            data = json.dumps(payload).encode()
            ctype = "application/json"
        if status != 204:
            if ctype:
                head.append(f"Content-Type: {ctype}")
            head.append(f"Content-Length: {len(data)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (data if status != 204 else b""))
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    # ------------------------------------------------------------------ request handling

    async def handle(self, method: str, target: str, raw: bytes) -> tuple[int, Any]:
        path = target.split("?", 1)[0]
        body: Any = None
        rec = Recorded(method, path, None, None, 0, None)
        try:
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    rec.body = raw.decode("utf-8", "replace")
                    raise ApiFault(f"An error occurred when deserializing the json body of a request: {exc}.")
            rec.body = body
            self.log(
                "INFO",
                "fc_api",
                f'The API server received a {method.capitalize()} request on "{path}"'
                + (f" with body {raw.decode('utf-8', 'replace')!r}." if raw else "."),
            )
            failure = self._take_failure(method, path)
            if failure is not None:
                rec.status = failure.status
                rec.response = failure.body().decode("utf-8", "replace")
                return failure.status, (
                    failure.body() if failure.shape in ("text", "empty") else json.loads(failure.body())
                )
            if method == "GET" and raw:
                raise ApiFault("GET request cannot have a body.")
            try:
                route = self.specs[0].route(method, path)
            except UnknownRoute:
                raise ApiFault(f"Invalid request method and/or path: {method} {path}.") from None
            rec.template = route.template
            for name, value in route.params.items():
                if not ID_RE.match(value):
                    raise ApiFault("API Resource IDs can only contain alphanumeric characters and underscores.")
            if (
                method in ("PUT", "PATCH")
                and body is None
                and route.template not in ("/balloon/hinting/start", "/balloon/hinting/stop")
            ):
                raise ApiFault(f"Empty {method} request.")
            for name, value in route.params.items():
                if isinstance(body, dict) and body.get(ID_FIELDS.get(name, name)) != value:
                    raise ApiFault("The id from the path does not match the id from the body!")
            errors: dict[str, list[str]] = {}
            for spec in self.specs:
                problems = spec.validate(method, path, body)
                if problems:
                    errors[spec.name] = problems
            rec.spec_errors = errors
            if errors:
                detail = "; ".join(f"{name}: {', '.join(p)}" for name, p in errors.items())
                raise ApiFault(f"An error occurred when deserializing the json body of a request: {detail}")
            phase = PHASES.get((method, route.template))
            if phase == "pre" and self.started:
                raise ApiFault(NOT_AFTER)
            if phase == "post" and not self.started:
                raise ApiFault(NOT_BEFORE)
            if (method, route.template) in HOTPLUG and self.started and not self.enable_pci:
                raise ApiFault(NOT_AFTER)
            status, response = await self._apply(method, route.template, route.params, body)
            rec.status, rec.response = status, response
            return status, response
        except ApiFault as fault:
            rec.status, rec.response = fault.status, {"fault_message": str(fault)}
            self.log("ERROR", "fc_api", f"Received Error. Status code: {fault.status}. Message: {fault}")
            return fault.status, {"fault_message": str(fault)}
        finally:
            self.requests.append(rec)
            if self._record is not None:
                self._record(rec)

    def _take_failure(self, method: str, path: str) -> Failure | None:
        for failure in self.failures:
            if failure.method != method or failure.times <= 0:
                continue
            if failure.path == path or (
                ("{" in failure.path)
                and self.specs[0].has_route(method, path)
                and self.specs[0].route(method, path).template == failure.path
            ):
                failure.times -= 1
                return failure
        return None

    def _check_file(self, what: str, path: str, writable: bool = False) -> None:
        host = self.host_path(path)
        try:
            with open(host, "r+b" if writable else "rb"):
                pass
        except OSError as exc:
            raise ApiFault(f"The {what} file cannot be opened: {exc.strerror} (os error {exc.errno})") from None

    def _open_append(self, what: str, path: str) -> None:
        try:
            open(self.host_path(path), "a").close()  # O_CREAT | O_APPEND, like Firecracker
        except OSError as exc:
            raise ApiFault(
                f"Cannot initialize the {what}: Failed to open target file: {exc.strerror} (os error {exc.errno})"
            ) from None

    async def _apply(self, method: str, template: str, params: dict[str, str], body: Any) -> tuple[int, Any]:
        key = (method, template)
        if key == ("GET", "/"):
            state = "Not started" if not self.started else ("Paused" if self.paused else "Running")
            return 200, {"app_name": "Firecracker", "id": self.instance_id, "state": state, "vmm_version": FAKE_VERSION}
        if key == ("GET", "/version"):
            return 200, {"firecracker_version": FAKE_VERSION}
        if key == ("GET", "/machine-config"):
            return 200, self.machine
        if key == ("GET", "/vm/config"):
            return 200, self.vm_config()
        if key == ("GET", "/mmds"):
            return 200, self.mmds
        if key == ("PUT", "/logger"):
            if "log_path" in body:
                self._open_append("logger", body["log_path"])
                reopen = getattr(self._log, "reopen", None)
                if reopen is not None:
                    reopen(self.host_path(body["log_path"]))
            self.configured["logger"] = body
            return 204, None
        if key == ("PUT", "/metrics"):
            if self.metrics_initialized:
                raise ApiFault("Reinitialization of metrics not allowed.")
            self._open_append("metrics", body["metrics_path"])
            self.metrics_initialized = True
            self.configured["metrics"] = body
            return 204, None
        if key in (("PUT", "/machine-config"), ("PATCH", "/machine-config")):
            new = dict(
                self.machine if method == "PATCH" else {"smt": False, "track_dirty_pages": False, "huge_pages": "None"}
            )
            new.update(body)
            if method == "PUT" and not {"vcpu_count", "mem_size_mib"} <= set(body):
                raise ApiFault("Missing mandatory field: vcpu_count / mem_size_mib.")
            if new.get("smt") and new["vcpu_count"] > 1 and new["vcpu_count"] % 2:
                raise ApiFault(
                    "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled."
                )
            if new.get("huge_pages") == "2M" and new["mem_size_mib"] % 2:
                raise ApiFault("The memory size (MiB) is either 0, or not a multiple of the configured page size.")
            if new["mem_size_mib"] == 0:
                raise ApiFault("The memory size (MiB) is either 0, or not a multiple of the configured page size.")
            self.machine = new
            self.configured["machine-config"] = new
            return 204, None
        if key == ("PUT", "/boot-source"):
            self._check_file("kernel", body["kernel_image_path"])
            if "initrd_path" in body:
                self._check_file("initrd", body["initrd_path"])
            self.configured["boot-source"] = body
            return 204, None
        if key == ("PUT", "/drives/{drive_id}"):
            if ("socket" in body) == ("path_on_host" in body):
                raise ApiFault("Unable to create the block device: exactly one of path_on_host or socket is needed.")
            if "path_on_host" in body:
                self._check_file("block device", body["path_on_host"], writable=not body.get("is_read_only", False))
            if body["is_root_device"] and any(
                d["is_root_device"] for i, d in self.drives.items() if i != params["drive_id"]
            ):
                raise ApiFault("A root block device already exists!")
            self.drives[params["drive_id"]] = body
            return 204, None
        if key == ("PATCH", "/drives/{drive_id}"):
            if params["drive_id"] not in self.drives:
                raise ApiFault(f"Unable to patch the block device: Invalid block device ID: {params['drive_id']}.")
            if "path_on_host" in body:
                self._check_file("block device", body["path_on_host"])
            return 204, None
        if key == ("PUT", "/network-interfaces/{iface_id}"):
            mac = body.get("guest_mac")
            if mac is not None and not re.match(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$", mac):
                raise ApiFault(f"Invalid MAC address: {mac}")
            if any(
                i["host_dev_name"] == body["host_dev_name"] for k, i in self.ifaces.items() if k != params["iface_id"]
            ):
                raise ApiFault("The host device name is already in use.")
            self.ifaces[params["iface_id"]] = body
            return 204, None
        if key == ("PATCH", "/network-interfaces/{iface_id}"):
            if params["iface_id"] not in self.ifaces:
                raise ApiFault(f"Invalid interface ID - not found: {params['iface_id']}")
            return 204, None
        if key == ("PUT", "/vsock"):
            self._bind_vsock(body["uds_path"])
            self.configured["vsock"] = body
            return 204, None
        if key == ("PUT", "/mmds/config"):
            for iface in body["network_interfaces"]:
                if iface not in self.ifaces:
                    raise ApiFault(
                        f"The list of network interface IDs provided contains at least one ID that does "
                        f"not correspond to any existing network interface: {iface}"
                    )
            self.configured["mmds-config"] = body
            return 204, None
        if key in (("PUT", "/mmds"), ("PATCH", "/mmds")):
            if method == "PUT":
                self.mmds = body
            else:
                self.mmds.update(body)
            return 204, None
        if key == ("PUT", "/actions"):
            return await self._action(body["action_type"])
        if key == ("PATCH", "/vm"):
            self.paused = body["state"] == "Paused"
            return 204, None
        if key == ("PUT", "/snapshot/create"):
            if not self.paused:
                raise ApiFault("Cannot save the microVM state: the microVM is not paused.")
            self.host_path(body["snapshot_path"]).write_bytes(b"fake-vmstate")
            self.host_path(body["mem_file_path"]).write_bytes(b"\0" * 16)
            return 204, None
        if key == ("PUT", "/snapshot/load"):
            if set(self.configured) - {"logger", "metrics"} or self.drives or self.ifaces:
                raise ApiFault("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
            if ("mem_backend" in body) == ("mem_file_path" in body):
                raise ApiFault("Exactly one of mem_backend or mem_file_path must be specified.")
            self._check_file("snapshot", body["snapshot_path"])
            if "vsock_override" in body:
                self._bind_vsock(body["vsock_override"]["uds_path"])
            self.started = True
            self.paused = not body.get("resume_vm", False)
            return 204, None
        # Everything else the spec allows (balloon, entropy, serial, cpu-config, pmem, hotplug):
        self.configured[template.strip("/")] = body
        return 204, None

    def _bind_vsock(self, uds_path: str) -> None:
        host = self.host_path(uds_path)
        if self.vsock_sock is not None and self.vsock_path is not None:  # a second PUT rebinds
            self.vsock_sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.vsock_path.unlink()
            self.vsock_sock = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(host))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            name = {98: "AddrInUse", 2: "NotFound", 13: "PermissionDenied"}.get(exc.errno or 0, "Other")
            raise ApiFault(
                f"Cannot create backend for vsock device: UnixBind(Os {{ code: {exc.errno}, kind: {name}, "
                f'message: "{exc.strerror}" }})'
            ) from None
        self.vsock_sock, self.vsock_path = sock, host

    async def _action(self, action: str) -> tuple[int, Any]:
        if action == "InstanceStart":
            if self.started:
                raise ApiFault(NOT_AFTER)
            if "boot-source" not in self.configured:
                raise ApiFault("Cannot start microvm without kernel configuration.")
            self.started = True
            self.log("INFO", "main", "Successfully started microvm")
            self._spawn(self._boot_guest())
            return 204, None
        if not self.started:
            raise ApiFault(NOT_BEFORE)
        if action == "FlushMetrics":
            path = self.configured.get("metrics", {}).get("metrics_path")
            if path is None:
                raise ApiFault("Failed to flush metrics: the metrics system is not initialized.")
            with open(self.host_path(path), "a") as f:
                f.write(json.dumps({"utc_timestamp_ms": int(time.time() * 1000)}) + "\n")
            return 204, None
        # SendCtrlAltDel: the guest reboots; with reboot=k Firecracker exits 0.
        self._console("reboot: Restarting system")
        if self._on_exit is not None:
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, self._on_exit, 0)
        return 204, None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _boot_guest(self) -> None:
        args = self.configured["boot-source"].get("boot_args", "")
        if "console=ttyS0" in args.split():
            self._console(f"Linux version 6.1.0-fake (fake-firecracker) boot args: {args}")
        m = re.search(r"(?:^|\s)arcbox\.channel=vsock:(\d+)(?:\s|$)", args)
        if not self.guest or m is None or self.vsock_path is None:
            return
        target = f"{self.vsock_path}_{m.group(1)}"
        for _ in range(100):  # the agent retries while the host is not listening yet
            try:
                reader, writer = await asyncio.open_unix_connection(target)
            except OSError as exc:
                self.guest_error = f"{target}: {exc}"
                await asyncio.sleep(0.05)
                continue
            writer.write(hello_frame())
            await writer.drain()
            self.guest_connections.append((reader, writer))
            self.guest_error = None
            self._console("arcbox agent: connected to host, sent HELLO")
            return

    def vm_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "drives": list(self.drives.values()),
            "machine-config": self.machine,
            "network-interfaces": list(self.ifaces.values()),
        }
        for key in ("boot-source", "logger", "metrics", "vsock", "entropy", "balloon", "mmds-config"):
            if key in self.configured:
                cfg[key] = self.configured[key]
        return cfg


# ============================================================================ CLI: fake firecracker

FC_FLAGS: dict[str, bool] = {  # name -> takes a value (src/firecracker/src/main.rs)
    "api-sock": True,
    "id": True,
    "seccomp-filter": True,
    "no-seccomp": False,
    "start-time-us": True,
    "start-time-cpu-us": True,
    "parent-cpu-time-us": True,
    "config-file": True,
    "metadata": True,
    "no-api": False,
    "log-path": True,
    "level": True,
    "module": True,
    "show-level": False,
    "show-log-origin": False,
    "metrics-path": True,
    "boot-timer": False,
    "version": False,
    "snapshot-version": False,
    "describe-snapshot": True,
    "http-api-max-payload-size": True,
    "mmds-size-limit": True,
    "enable-pci": False,
}
FC_FORBIDS = {"seccomp-filter": "no-seccomp", "no-seccomp": "seccomp-filter"}
FC_REQUIRES = {"no-api": "config-file"}
LOG_LEVELS = {"off", "trace", "debug", "info", "warn", "warning", "error"}

EXIT_GENERIC = 1
EXIT_BAD_CONFIGURATION = 152
EXIT_ARG_PARSING = 153


class ArgError(Exception):
    pass


def parse_args(
    argv: list[str], flags: dict[str, bool], multi: frozenset[str] = frozenset(), required: tuple[str, ...] = ()
) -> tuple[dict[str, Any], list[str]]:
    """Firecracker's utils::arg_parser rules: `--name value` or `--name=value`, `--` ends options,
    unknown or duplicate arguments and missing values are errors."""
    extra: list[str] = []
    if "--" in argv:
        idx = argv.index("--")
        argv, extra = argv[:idx], argv[idx + 1 :]
    if "--help" in argv:
        return {"help": True}, extra
    if "--version" in argv:
        return {"version": True}, extra
    values: dict[str, Any] = {}
    it = iter(argv)
    for arg in it:
        if not arg.startswith("--"):
            raise ArgError(f"Found argument '{arg}' which wasn't expected, or isn't valid in this context.")
        name, eq, inline = arg[2:].partition("=")
        if name not in flags:
            raise ArgError(f"Found argument '{name}' which wasn't expected, or isn't valid in this context.")
        if name in values and name not in multi:
            raise ArgError(f"The argument '{name}' was provided more than once.")
        if flags[name]:
            if eq:
                value = inline
            else:
                value = next(it, None)
                if value is None or value.startswith("--"):
                    raise ArgError(f"The argument '{name}' requires a value, but none was supplied.")
            if name in multi:
                values.setdefault(name, []).append(value)
            else:
                values[name] = value
        else:
            if eq:
                raise ArgError(f"The argument '{name}' does not take a value.")
            values[name] = True
    for name, other in FC_FORBIDS.items() if flags is FC_FLAGS else ():
        if name in values and other in values:
            raise ArgError(f"Argument '{other}' cannot be used together with argument '{name}'.")
    for name, other in FC_REQUIRES.items() if flags is FC_FLAGS else ():
        if name in values and other not in values:
            raise ArgError(f"Argument '{other}' required, but not found.")
    for name in required:
        if name not in values:
            raise ArgError(f"Argument '{name}' required, but not found.")
    return values, extra


class _LineFile:
    def __init__(self, path: Path | None) -> None:
        self.f = open(path, "a", buffering=1) if path is not None else None  # noqa: SIM115

    def __call__(self, line: str) -> None:
        if self.f is not None:
            self.f.write(line + "\n")

    def reopen(self, path: Path) -> None:
        """Like Firecracker's logger update: O_CREAT|O_RDWR, no O_APPEND -> writes from offset 0."""
        if self.f is not None:
            self.f.close()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, 0o644)
        self.f = open(fd, "w", buffering=1)  # noqa: SIM115


def cli_main(argv: list[str]) -> int:
    """The fake `firecracker` process.

    Test knobs (environment): FAKE_FC_ROOT (jail root: paths are resolved inside it; set by
    the fake jailer), FAKE_FC_RECORD (append every request as a JSON line to this file),
    FAKE_FC_FAIL (JSON list of `Failure` fields), FAKE_FC_EXIT_AT_START (exit with this code
    right after start-up, before the API socket exists), FAKE_FC_STARTUP_DELAY (seconds
    before binding the API socket), FAKE_FC_NO_GUEST=1 (no simulated guest dial-in),
    FAKE_FC_DIE_ON ("METHOD /path": exit 9 when that request arrives, without answering),
    FAKE_FC_ARGV_FILE (write the argv as JSON to this file).
    """
    if os.environ.get("FAKE_FC_ARGV_FILE"):
        Path(os.environ["FAKE_FC_ARGV_FILE"]).write_text(json.dumps(argv))
    try:
        args, _extra = parse_args(argv[1:], FC_FLAGS)
    except ArgError as exc:
        print(f"Error: Arguments parsing error: {exc} \n\nFor more information try --help.", file=sys.stderr)
        return EXIT_ARG_PARSING
    if args.get("help"):
        print(f"Firecracker v{FAKE_VERSION}\n\n--api-sock <api-sock>: Path to unix domain socket used by the API.")
        return 0
    if args.get("version"):
        print(f"Firecracker v{FAKE_VERSION}\n")
        return 0
    if args.get("snapshot-version"):
        print("v10.0.0")
        return 0
    instance_id = args.get("id", "anonymous-instance")
    if not INSTANCE_ID_RE.match(instance_id):
        print(f"thread 'main' panicked: Invalid instance ID: {instance_id!r}", file=sys.stderr)
        sys.stderr.flush()
        os.abort()
    root = Path(os.environ["FAKE_FC_ROOT"]) if os.environ.get("FAKE_FC_ROOT") else None

    def host(p: str) -> Path:
        return (root / p.lstrip("/")) if root is not None else Path(p)

    level = args.get("level")
    if level is not None and level.lower() not in LOG_LEVELS:
        print(f"Error: InvalidLogLevel: Invalid value for logger level: {level}.", file=sys.stderr)
        return EXIT_BAD_CONFIGURATION
    log_file = _LineFile(host(args["log-path"]) if "log-path" in args else None)

    def log(level_name: str, msg: str) -> None:
        ts = datetime.datetime.now().isoformat(timespec="microseconds")
        log_file(f"{ts} [{instance_id}:main:{level_name}] {msg}")

    log("INFO", f"Running Firecracker v{FAKE_VERSION}")
    exit_at_start = os.environ.get("FAKE_FC_EXIT_AT_START")
    if exit_at_start:
        log("ERROR", f"simulated start-up failure. exit_code={exit_at_start}")
        print("Error: simulated start-up failure", file=sys.stderr)
        return int(exit_at_start)
    metrics_initialized = False
    if "metrics-path" in args:
        host(args["metrics-path"]).touch()
        metrics_initialized = True
    if "seccomp-filter" in args and not host(args["seccomp-filter"]).is_file():
        print(
            f"Error: Seccomp error: Filter load error: {args['seccomp-filter']}: No such file or directory",
            file=sys.stderr,
        )
        log("ERROR", "Firecracker exiting with error. exit_code=1")
        return EXIT_GENERIC
    for name in (
        "http-api-max-payload-size",
        "mmds-size-limit",
        "start-time-us",
        "start-time-cpu-us",
        "parent-cpu-time-us",
    ):
        if name in args:
            try:
                if int(args[name]) < 0:
                    raise ValueError
            except ValueError:
                print(f"thread 'main' panicked: '{name}' parameter expected to be of 'usize' type.", file=sys.stderr)
                sys.stderr.flush()
                os.abort()
    max_payload = int(args.get("http-api-max-payload-size", DEFAULT_MAX_PAYLOAD))
    api_sock = host(args.get("api-sock", "/run/firecracker.socket"))
    record_path = os.environ.get("FAKE_FC_RECORD")
    record_file = open(record_path, "a", buffering=1) if record_path else None
    failures = json.loads(os.environ.get("FAKE_FC_FAIL") or "[]")
    delay = float(os.environ.get("FAKE_FC_STARTUP_DELAY") or 0)
    exit_code: dict[str, int] = {}

    async def run() -> int:
        done = asyncio.Event()

        def on_exit(code: int) -> None:
            exit_code["code"] = code
            done.set()

        def record(rec: Recorded) -> None:
            if record_file is not None:
                record_file.write(json.dumps({**rec.to_json(), "pid": os.getpid()}) + "\n")

        def console(line: str) -> None:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

        die_on = os.environ.get("FAKE_FC_DIE_ON")  # "PUT /vsock": exit 9 on that request, no answer

        def record(rec: Recorded, _record=record) -> None:
            _record(rec)
            if die_on and f"{rec.method} {rec.path}" == die_on:
                log("ERROR", "simulated crash. exit_code=9")
                os._exit(9)

        fake = FakeFirecracker(
            api_sock,
            root=root,
            instance_id=instance_id,
            max_payload=max_payload,
            metrics_initialized=metrics_initialized,
            enable_pci=bool(args.get("enable-pci")),
            guest=not os.environ.get("FAKE_FC_NO_GUEST"),
            log=log_file,
            console=console,
            on_exit=on_exit,
            record=record,
        )
        for f in failures:
            fake.fail(**f)
        if delay:
            await asyncio.sleep(delay)
        if "config-file" in args:
            try:
                config = json.loads(host(args["config-file"]).read_text())
                await _apply_config_file(fake, config)
            except (OSError, ValueError, ApiFault) as exc:
                log("ERROR", f"Configuration for VMM from one single json failed: {exc}")
                return EXIT_BAD_CONFIGURATION
        if args.get("no-api"):
            await done.wait()
            return exit_code.get("code", 0)
        try:
            await fake.start()
        except OSError as exc:
            log("ERROR", f"Failed to open the API socket at: {api_sock}. Check that it is not already used. ({exc})")
            print(
                f"Error: RunWithApi: Failed to open the API socket at: {api_sock}. Check that it is not already used.",
                file=sys.stderr,
            )
            return EXIT_GENERIC
        try:
            await done.wait()
        finally:
            await fake.stop()
        return exit_code.get("code", 0)

    code = asyncio.run(run())
    log("INFO", f"Firecracker exiting {'successfully' if code == 0 else 'with error'}. exit_code={code}")
    return code


async def _apply_config_file(fake: FakeFirecracker, config: dict[str, Any]) -> None:
    if "boot-source" not in config or "drives" not in config:
        raise ApiFault("missing field `boot-source` or `drives`")
    order = [
        ("logger", "/logger"),
        ("metrics", "/metrics"),
        ("machine-config", "/machine-config"),
        ("boot-source", "/boot-source"),
    ]
    for key, path in order:
        if config.get(key) is not None:
            status, resp = await fake.handle("PUT", path, json.dumps(config[key]).encode())
            if status >= 300:
                raise ApiFault(str(resp))
    for drive in config["drives"]:
        status, resp = await fake.handle("PUT", f"/drives/{drive.get('drive_id')}", json.dumps(drive).encode())
        if status >= 300:
            raise ApiFault(str(resp))
    for iface in config.get("network-interfaces") or []:
        status, resp = await fake.handle(
            "PUT", f"/network-interfaces/{iface.get('iface_id')}", json.dumps(iface).encode()
        )
        if status >= 300:
            raise ApiFault(str(resp))
    for key, path in (
        ("vsock", "/vsock"),
        ("entropy", "/entropy"),
        ("balloon", "/balloon"),
        ("mmds-config", "/mmds/config"),
    ):
        if config.get(key) is not None:
            status, resp = await fake.handle("PUT", path, json.dumps(config[key]).encode())
            if status >= 300:
                raise ApiFault(str(resp))
    status, resp = await fake.handle("PUT", "/actions", b'{"action_type":"InstanceStart"}')
    if status >= 300:
        raise ApiFault(str(resp))


# ============================================================================ CLI: fake jailer

JAILER_FLAGS: dict[str, bool] = {  # src/jailer/src/main.rs
    "id": True,
    "exec-file": True,
    "uid": True,
    "gid": True,
    "chroot-base-dir": True,
    "netns": True,
    "daemonize": False,
    "new-pid-ns": False,
    "cgroup": True,
    "resource-limit": True,
    "cgroup-version": True,
    "parent-cgroup": True,
    "version": False,
}


def jailer_main(argv: list[str]) -> int:
    """The fake `jailer`: checks its flags like the real one, builds the jail layout
    (<base>/<exec name>/<id>/root with dev/, dev/net/, run/, the copied exec file and the pid
    file) and execs the copied fake firecracker with FAKE_FC_ROOT pointing at the jail, so
    jail-relative paths resolve as they would after chroot. No real chroot/setuid; of cgroups
    only the v2 join of an existing --parent-cgroup (with no --cgroup values) is real."""
    if os.environ.get("FAKE_JAILER_ARGV_FILE"):
        Path(os.environ["FAKE_JAILER_ARGV_FILE"]).write_text(json.dumps(argv))
    try:
        args, extra = parse_args(
            argv[1:],
            JAILER_FLAGS,
            multi=frozenset({"cgroup", "resource-limit"}),
            required=("id", "exec-file", "uid", "gid"),
        )
    except ArgError as exc:
        print(f"Arguments parsing error: {exc} \n\nFor more information try --help.")
        return 1
    if args.get("version"):
        print(f"Jailer v{FAKE_VERSION}")
        return 0

    def fail(msg: str) -> int:
        print(f"Jailer error: {msg}", file=sys.stderr)
        return 1

    jid = args["id"]
    if not INSTANCE_ID_RE.match(jid):
        return fail(f"Invalid instance ID: {jid}")
    exec_file = Path(args["exec-file"])
    try:
        exec_file = exec_file.resolve(strict=True)
    except OSError as exc:
        return fail(f"Failed to canonicalize path {args['exec-file']}: {exc}")
    if not exec_file.is_file():
        return fail(f"{exec_file} is not a file")
    if "firecracker" not in exec_file.name:
        return fail(
            f'Invalid filename. The filename of `--exec-file` option must contain "firecracker": {exec_file.name}'
        )
    base = Path(args.get("chroot-base-dir", "/srv/jailer"))
    try:
        base = base.resolve(strict=True)
    except OSError as exc:
        return fail(f"Failed to canonicalize path {args.get('chroot-base-dir', '/srv/jailer')}: {exc}")
    if not base.is_dir():
        return fail(f"{base} is not a directory")
    for name in ("uid", "gid"):
        if not args[name].isdigit() or int(args[name]) >= 2**32:
            return fail(f"Invalid {name}: {args[name]}")
    version = args.get("cgroup-version", "1")
    if version not in ("1", "2"):
        return fail(f"{version} is an invalid cgroup version specifier")
    parent = args.get("parent-cgroup")
    if parent is not None and (parent.startswith("/") or any(p in (".", "..") for p in parent.split("/"))):
        return fail("Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'")
    for cg in args.get("cgroup", []):
        parts = cg.split("=")
        if len(parts) != 2 or not parts[1]:
            return fail(f"Invalid format for cgroups: {cg}")
    for limit in args.get("resource-limit", []):
        name, sep, value = limit.partition("=")
        if not sep:
            return fail(f"Invalid format for resources limits: {limit}")
        if not value.isdigit():
            return fail(f"Invalid limit value for resource: {value}")
        if name not in ("fsize", "no-file"):
            return fail(f"Invalid resource argument: {name}")
    if "netns" in args and not Path(args["netns"]).exists():
        return fail(f"Failed to open file {args['netns']}: No such file or directory (os error 2)")
    if args.get("cgroup") and not os.environ.get("FAKE_JAILER_ALLOW_CGROUPS"):
        return fail("cgroups are not emulated by the fake jailer (set FAKE_JAILER_ALLOW_CGROUPS=1)")
    if version == "2" and not args.get("cgroup") and parent is not None:
        # like the real jailer (env.rs): v2, no --cgroup values, an existing --parent-cgroup:
        # it moves itself into that cgroup, before Firecracker is started
        unified = next((line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                        if line.split()[2:3] == ["cgroup2"]), None)
        if unified is None:
            return fail("cgroupsv2 hierarchy missing")
        target = Path(unified) / parent
        if target.exists():
            try:
                (target / "cgroup.procs").write_text(str(os.getpid()))
            except OSError as exc:
                return fail(f"Failed to write to cgroup file: {exc}")

    uid, gid = int(args["uid"]), int(args["gid"])
    chroot = base / exec_file.name / jid / "root"
    chroot.mkdir(parents=True, exist_ok=True)
    jailed_exec = chroot / exec_file.name
    shutil.copyfile(exec_file, jailed_exec)
    os.chmod(jailed_exec, 0o755)
    for d in ("dev", "dev/net", "run"):
        (chroot / d).mkdir(exist_ok=True)
        os.chmod(chroot / d, 0o700)
    for node in ("dev/net/tun", "dev/kvm"):  # mknod: fails if the node already exists
        try:
            os.close(os.open(chroot / node, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return fail(f"Failed to create /{node} via mknod inside the jail: File exists (os error 17)")
    os.chmod(chroot, 0o700)
    if os.geteuid() == 0:
        for p in (
            chroot,
            chroot / "dev",
            chroot / "dev/net",
            chroot / "run",
            chroot / "dev/kvm",
            chroot / "dev/net/tun",
        ):
            os.chown(p, uid, gid)
    pid_file = chroot / f"{exec_file.name}.pid"
    now_us = str(int(time.time() * 1e6))
    fc_argv = [
        str(jailed_exec),
        "--id",
        jid,
        "--start-time-us",
        now_us,
        "--start-time-cpu-us",
        "0",
        "--parent-cpu-time-us",
        "0",
        *extra,
    ]
    env = dict(os.environ, FAKE_FC_ROOT=str(chroot), FAKE_FC_HOME=str(HERE))
    if args.get("new-pid-ns"):
        import subprocess

        child = subprocess.Popen(fc_argv, env=env, cwd=str(chroot), start_new_session=True)
        try:
            with open(pid_file, "x") as f:
                f.write(str(child.pid))
        except FileExistsError:
            child.kill()
            return fail(f"Failed to open file {pid_file}: File exists (os error 17)")
        return 0
    try:
        with open(pid_file, "x") as f:
            f.write(str(os.getpid()))
    except FileExistsError:
        return fail(f"Failed to open file {pid_file}: File exists (os error 17)")
    os.chdir(chroot)
    os.execve(str(jailed_exec), fc_argv, env)
    return 1  # not reached


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main(sys.argv))
