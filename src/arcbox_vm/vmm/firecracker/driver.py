"""`FirecrackerDriver`: the `VmmDriver` that boots a `MachineSpec` under Firecracker.

Launch sequence (every step pre-boot, so any order among them is accepted by Firecracker;
this one puts logging first so the rest is logged, and InstanceStart last):

    PUT /logger, PUT /metrics, PUT /machine-config, PUT /boot-source, PUT /drives/rootfs,
    [PUT /network-interfaces/eth0], PUT /vsock, [PUT /entropy], PUT /actions InstanceStart

The guest agent dials the host over vsock (CID 2, port 52); Firecracker forwards that
connection to `<uds_path>_52`, which is the endpoint's `listen_path` (inside the jail in
jailer mode). Everything the driver creates is removed again on a failed launch and by
`FirecrackerProcess.cleanup()`.

Cgroups: with `cgroups` enabled each VMM is moved into its sandbox's cgroup right after it
is spawned. Under the jailer the jailer joins that cgroup itself (`--cgroup-version 2
--parent-cgroup <it>`) before it starts Firecracker, so a `--new-pid-ns` child is born
inside it; the pid is written again once known (a no-op there, the fallback for a jailer
that does not join). When `firecracker.jailer` sets cgroups of its own, those win and the
sandbox cgroup is not used: the jailer would move Firecracker out of it into the cgroup
its limits are written to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from arcbox_vm.agent.protocol import CHANNEL_CMDLINE_KEY, VSOCK_PORT
from arcbox_vm.errors import BootFailed, FirecrackerApiError, VmmError
from arcbox_vm.ports import AdoptSpec, AgentEndpoint, MachineSpec
from arcbox_vm.vmm.adopted import AdoptedProcess, process_start_time
from arcbox_vm.vmm.cgroup import SandboxCgroup, SandboxCgroups

from . import bodies
from .api import DEFAULT_REQUEST_TIMEOUT, FirecrackerApi
from .bodies import ApiRequest
from arcbox_vm.config.firecracker import FirecrackerConfig
from .process import (
    JAIL_INITRD,
    JAIL_KERNEL,
    JAIL_ROOTFS,
    JAIL_SECCOMP,
    Layout,
    ProcessHandle,
    cgroup_dirs,
    create_empty_file,
    describe_exit,
    diagnostics,
    firecracker_argv,
    instance_id,
    jailer_argv,
    jailer_netns,
    jailer_sets_cgroups,
    layout_for,
    resolve_binary,
    stage_file,
    start,
    unlink_quiet,
    wait_for_api_socket,
    wait_for_pid_file,
)

log = logging.getLogger(__name__)

GUEST_CID = 3
ROOT_DRIVE_ID = "rootfs"
NET_IFACE_ID = "eth0"
CMDLINE_MAX = 2048  # x86_64 CMDLINE_MAX_SIZE, including the terminating NUL
# What Firecracker appends to boot_args itself: " pci=off", " root=/dev/vda rw" and one
# " virtio_mmio.device=4K@0xc000N000:<irq>" per MMIO device (about 36 bytes each).
_FC_FIXED_SUFFIX = len(" pci=off") + len(" root=/dev/vda rw")
_FC_PER_DEVICE = 40
_EXIT_CODE_RE = re.compile(rb"exit_code=(\d+)")
_ROOT_ARG_RE = re.compile(r"(^|\s)root=")


def compose_boot_args(spec: MachineSpec, endpoint: AgentEndpoint) -> str:
    """`spec.boot_args` + `spec.extra_boot_args` + the endpoint's argument, space-separated."""
    parts = [spec.boot_args, *spec.extra_boot_args, endpoint.boot_arg]
    return " ".join(p.strip() for p in parts if p and p.strip())


def check_cmdline_length(boot_args: str, devices: int) -> None:
    """Raise VmmError if the final command line (with Firecracker's additions) exceeds 2048 bytes."""
    ours = len(boot_args.encode())
    reserve = _FC_FIXED_SUFFIX + _FC_PER_DEVICE * devices
    if ours + reserve + 1 > CMDLINE_MAX:
        raise VmmError(
            f"the kernel command line is {ours} bytes; with the ~{reserve} bytes Firecracker appends "
            f"(pci=off, root=, virtio_mmio entries for {devices} devices) it would exceed the "
            f"{CMDLINE_MAX}-byte x86 limit; shorten boot_args / extra_boot_args by at least "
            f"{ours + reserve + 1 - CMDLINE_MAX} bytes"
        )


def _exit_code_from_log(path: Path) -> int | None:
    """Firecracker logs `exit_code=N` when it ends; used when the VMM is not our child."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            matches = _EXIT_CODE_RE.findall(f.read())
    except OSError:
        return None
    return int(matches[-1]) if matches else None


class FirecrackerProcess:
    """A running Firecracker VM (implements `arcbox_vm.ports.VmmProcess`)."""

    def __init__(
        self,
        handle: ProcessHandle,
        api: FirecrackerApi,
        layout: Layout,
        config: FirecrackerConfig,
        cgroup: SandboxCgroup | None = None,
    ) -> None:
        self._handle = handle
        self._api = api
        self.layout = layout
        self._config = config
        self.cgroup = cgroup
        self._cleaned = False
        self._exited: asyncio.Future[int] | None = None
        self._start_time: int | None = None

    @property
    def pid(self) -> int:
        return self._handle.pid

    @property
    def returncode(self) -> int | None:
        return self._handle.returncode

    @property
    def start_time(self) -> int | None:
        if self._start_time is None:
            self._start_time = process_start_time(self.pid)
        return self._start_time

    @property
    def console_log(self) -> Path:
        return self.layout.console_log

    @property
    def api(self) -> FirecrackerApi:
        """The API client, for post-boot calls (pause/resume, snapshots, rate limiters)."""
        return self._api

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves with the exit status when the VMM ends (for racing against boot waits)."""
        if self._exited is None:
            self._exited = asyncio.ensure_future(self._handle.wait())
        return self._exited

    def describe_exit(self) -> str:
        """ "Firecracker exited with ..." plus the end of its log and console, for error messages."""
        return f"Firecracker (pid {self.pid}) {describe_exit(self.returncode)}" + diagnostics(
            self.layout.log, self.layout.console_log
        )

    async def send(self, request: ApiRequest) -> object:
        return await self._api.send(request)

    async def wait(self) -> int:
        return await self._handle.wait()

    async def request_stop(self) -> None:
        """Send Ctrl+Alt+Del; the guest reboots and (with reboot=k) Firecracker exits. Best effort."""
        if self.returncode is not None:
            return
        try:
            await self._api.send(bodies.send_ctrl_alt_del())
        except VmmError as exc:
            log.info("SendCtrlAltDel to Firecracker pid %s failed (ignored): %s", self.pid, exc)

    async def kill(self) -> None:
        await self._handle.kill()

    async def cleanup(self) -> None:
        """Remove sockets, log/metrics/console files, the jail and the sandbox's cgroup;
        kills the VMM if still running."""
        if self._cleaned:
            return
        if self.returncode is None:
            await self.kill()
        if self._exited is not None and not self._exited.done():
            self._exited.cancel()
        await self._api.aclose()
        _discard(self.layout, self._config, keep=None)
        if self.cgroup is not None:
            await self.cgroup.remove()
        self._cleaned = True


def _discard(layout: Layout, config: FirecrackerConfig, keep: Path | None) -> None:
    """Delete what the driver made for one VM. `keep` (the agent listen socket) survives."""
    unlink_quiet(layout.console_log)
    if layout.jail_root is None:
        for path in (layout.api_socket, layout.vsock_uds, layout.log, layout.metrics):
            unlink_quiet(path)
        return
    jail_dir = layout.jail_dir
    assert jail_dir is not None
    if keep is not None and keep.parent == layout.jail_root and keep.exists():
        _clear_jail(layout.jail_root, keep_name=keep.name)
    else:
        shutil.rmtree(jail_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            jail_dir.parent.rmdir()  # <base>/<exec name>, if no other jail is left
    assert layout.jail_id is not None
    for cg in cgroup_dirs(config, layout.jail_id):
        with contextlib.suppress(OSError):
            cg.rmdir()


def _clear_jail(root: Path, keep_name: str | None) -> None:
    """Empty a jail root except `keep_name` (stale files would break the jailer: mknod, pid file)."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name == keep_name:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            unlink_quiet(entry)


class FirecrackerDriver:
    """Boots VMs with Firecracker (directly, or under the jailer when `config.jailer` is set)."""

    name = "firecracker"

    def __init__(
        self,
        config: FirecrackerConfig | None = None,
        *,
        guest_cid: int = GUEST_CID,
        vsock_port: int = VSOCK_PORT,
        entropy: bool = True,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        die_with_parent: bool = False,
        cgroups: SandboxCgroups | None = None,
    ) -> None:
        self.config = config or FirecrackerConfig()
        self.die_with_parent = die_with_parent
        self.cgroups = cgroups or SandboxCgroups.off()  # where each VMM is moved right after spawn
        self.guest_cid = guest_cid
        self.vsock_port = vsock_port
        self.entropy = entropy
        self.request_timeout = request_timeout

    # ------------------------------------------------------------------ VmmDriver

    def agent_endpoint(self, workdir: Path) -> AgentEndpoint:
        """`<vsock uds_path>_<port>`; in jailer mode inside the jail root (created here)."""
        layout = layout_for(self.config, workdir)
        if layout.jail_root is not None:
            layout.jail_root.mkdir(parents=True, exist_ok=True)
        return AgentEndpoint(
            listen_path=Path(f"{layout.vsock_uds}_{self.vsock_port}"),
            boot_arg=f"{CHANNEL_CMDLINE_KEY}=vsock:{self.vsock_port}",
        )

    def kernel_for(self, bzimage: Path, vmlinux: Path) -> Path:
        """Released Firecracker boots only an uncompressed ELF vmlinux."""
        return vmlinux

    async def adopt(self, spec: AdoptSpec) -> AdoptedProcess:
        """A Firecracker an earlier daemon started: watched through a pidfd; cleaning it up
        removes its sockets, files, jail and cgroup like a launched one's."""
        layout = layout_for(self.config, spec.sockdir, spec.workdir)
        return AdoptedProcess(spec.pid, spec.start_time, layout.console_log, "Firecracker",
                              cgroup=self.cgroups.sandbox(spec.sandbox_id),
                              remove_files=lambda: _discard(layout, self.config, keep=None))

    async def launch(self, spec: MachineSpec, endpoint: AgentEndpoint) -> FirecrackerProcess:
        cfg = self.config
        layout = layout_for(cfg, spec.socket_dir, spec.workdir)
        uds_host = self._vsock_uds(endpoint, layout)
        self._check_inputs(spec)
        fc_binary = resolve_binary(cfg.binary, "firecracker")
        jailer_binary = resolve_binary(cfg.jailer.binary, "jailer") if cfg.jailer is not None else None
        requests = self.plan_requests(spec, endpoint, layout=layout)  # validates before spawning
        netns = getattr(spec, "netns", "")  # named network namespace the VMM must run in
        if cfg.jailer is not None:
            jailer_netns(cfg, netns)  # conflicting namespaces fail before anything is created

        handle: ProcessHandle | None = None
        api: FirecrackerApi | None = None
        keep = endpoint.listen_path if layout.jailed else None
        cgroup = None if jailer_sets_cgroups(cfg) else self.cgroups.sandbox(spec.sandbox_id)

        def diag() -> str:
            return diagnostics(layout.log, layout.console_log)

        try:
            self._prepare_files(spec, layout, uds_host, endpoint)
            if cfg.jailer is None:
                argv = firecracker_argv(cfg, layout, instance_id(spec.sandbox_id), binary=fc_binary, netns_name=netns)
            else:
                if cgroup is not None and not cgroup.create():
                    cgroup = None
                argv = jailer_argv(
                    cfg, layout, jailer_binary=jailer_binary, firecracker_binary=fc_binary, netns_name=netns,
                    join_cgroup=cgroup.relative if cgroup is not None else None,
                )
            log.debug("starting %s", " ".join(argv))
            child = await start(argv, layout.console_log, die_with_parent=self.die_with_parent)
            if cfg.jailer is not None and cfg.jailer.new_pid_ns:
                handle = ProcessHandle(pid=child.pid, child=child)  # the jailer, until it hands over
                pid_file = layout.jail_file(f"{fc_binary.name}.pid")
                pid = await wait_for_pid_file(pid_file, child, cfg.api_socket_timeout, diag)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(child.wait(), cfg.api_socket_timeout)
                handle = ProcessHandle(pid=pid, exit_hint=lambda: _exit_code_from_log(layout.log))
            else:
                handle = ProcessHandle(pid=child.pid, child=child)
            if cgroup is not None and not cgroup.place(handle.pid) and cfg.jailer is None:
                cgroup = None  # logged; the VM runs on in our cgroup (a jailer may have joined it)
            await wait_for_api_socket(layout.api_socket, handle, cfg.api_socket_timeout, diag)
            api = FirecrackerApi(layout.api_socket, timeout=self.request_timeout)
            for request in requests:
                await self._send_during_boot(api, request, handle, diag)
        except BaseException as exc:
            details = diag()
            await self._abort(handle, api, layout, keep)
            if cgroup is not None:
                await cgroup.remove()
            if isinstance(exc, VmmError):
                if details and details not in str(exc):
                    exc.add_note(details.strip())
                raise
            if isinstance(exc, OSError):
                raise VmmError(f"could not launch Firecracker for {spec.sandbox_id}: {exc}{details}") from exc
            raise
        return FirecrackerProcess(handle, api, layout, cfg, cgroup)

    # ------------------------------------------------------------------ helpers (public for tests/tools)

    def plan_requests(
        self, spec: MachineSpec, endpoint: AgentEndpoint, *, layout: Layout | None = None
    ) -> list[ApiRequest]:
        """The exact API calls `launch` makes, in order (raises BodyError/VmmError on bad input)."""
        cfg = self.config
        layout = layout or layout_for(cfg, spec.socket_dir, spec.workdir)
        uds_host = self._vsock_uds(endpoint, layout)
        boot_args = compose_boot_args(spec, endpoint)
        devices = 1 + (1 if spec.tap_name else 0) + 1 + (1 if self.entropy else 0)
        check_cmdline_length(boot_args, devices)
        if _ROOT_ARG_RE.search(boot_args):
            log.warning("boot_args contain root=; Firecracker appends its own root=/dev/vda rw as well")
        if layout.jailed:
            kernel = "/" + JAIL_KERNEL
            initrd = "/" + JAIL_INITRD if spec.initrd is not None else None
            rootfs = "/" + JAIL_ROOTFS
        else:
            kernel = str(Path(spec.kernel).absolute())
            initrd = str(Path(spec.initrd).absolute()) if spec.initrd is not None else None
            rootfs = str(Path(spec.rootfs).absolute())
        requests = [
            # The log file itself is set with --log-path (so start-up errors are logged too).
            # It is not repeated here: Firecracker re-opens log_path without O_APPEND and would
            # overwrite the start-up lines. `level` is always re-sent when configured, because an
            # update without it resets the level to the default.
            bodies.put_logger(level=cfg.log_level, show_level=True, show_log_origin=False),
            bodies.put_metrics(layout.fc_path(layout.metrics)),
            bodies.put_machine_config(spec.vcpus, spec.memory_mib),
            bodies.put_boot_source(kernel, boot_args=boot_args, initrd_path=initrd),
            bodies.put_drive(ROOT_DRIVE_ID, rootfs, is_root_device=True, is_read_only=False),
        ]
        if spec.tap_name:
            requests.append(bodies.put_network_interface(NET_IFACE_ID, spec.tap_name, guest_mac=spec.guest_mac))
        requests.append(bodies.put_vsock(self.guest_cid, layout.fc_path(uds_host)))
        if self.entropy:
            requests.append(bodies.put_entropy())
        requests.append(bodies.instance_start())
        return requests

    def _vsock_uds(self, endpoint: AgentEndpoint, layout: Layout) -> Path:
        """The vsock `uds_path` (host view) that makes Firecracker dial `endpoint.listen_path`."""
        suffix = f"_{self.vsock_port}"
        listen = str(endpoint.listen_path)
        if not listen.endswith(suffix) or len(listen) == len(suffix):
            raise VmmError(
                f"agent endpoint {listen} does not end in '{suffix}'; Firecracker forwards guest "
                "vsock connections to <uds_path>_<port>; use FirecrackerDriver.agent_endpoint()"
            )
        uds = Path(listen[: -len(suffix)])
        if layout.jail_root is not None:
            layout.fc_path(uds)  # raises if outside the jail
        return uds

    @staticmethod
    def _check_inputs(spec: MachineSpec) -> None:
        for what, path in (("kernel", spec.kernel), ("rootfs", spec.rootfs), ("initrd", spec.initrd)):
            if path is None:
                continue
            if not Path(path).is_file():
                raise VmmError(f"the {what} {path} does not exist or is not a file")
            if not os.access(path, os.R_OK):
                raise VmmError(f"the {what} {path} is not readable")
        if not os.access(spec.rootfs, os.W_OK):
            raise VmmError(f"the rootfs {spec.rootfs} is not writable (it is attached read-write)")

    def _prepare_files(self, spec: MachineSpec, layout: Layout, uds_host: Path, endpoint: AgentEndpoint) -> None:
        cfg = self.config
        layout.workdir.mkdir(parents=True, exist_ok=True)
        if cfg.jailer is None:
            # Firecracker refuses to start if its API socket exists and PUT /vsock fails if
            # uds_path exists: remove what a previous run may have left.
            unlink_quiet(layout.api_socket)
            unlink_quiet(uds_host)
            create_empty_file(layout.log)
            create_empty_file(layout.metrics)
            return
        uid, gid = cfg.jailer.uid, cfg.jailer.gid
        root = layout.jail_root
        assert root is not None
        root.mkdir(parents=True, exist_ok=True)
        listen = Path(endpoint.listen_path)
        _clear_jail(root, keep_name=listen.name if listen.parent == root else None)
        unlink_quiet(uds_host)
        stage_file(Path(spec.kernel), layout.jail_file(JAIL_KERNEL), uid=uid, gid=gid, writable=False)
        if spec.initrd is not None:
            stage_file(Path(spec.initrd), layout.jail_file(JAIL_INITRD), uid=uid, gid=gid, writable=False)
        stage_file(Path(spec.rootfs), layout.jail_file(JAIL_ROOTFS), uid=uid, gid=gid, writable=True)
        if cfg.seccomp_filter is not None:
            stage_file(cfg.seccomp_filter, layout.jail_file(JAIL_SECCOMP), uid=uid, gid=gid, writable=False)
        create_empty_file(layout.log, uid, gid)
        create_empty_file(layout.metrics, uid, gid)
        if listen.exists():
            try:  # connecting to a Unix socket needs write permission for the jailed user
                os.chown(listen, uid, gid)
            except OSError as exc:
                log.warning("could not chown agent socket %s to %s:%s: %s", listen, uid, gid, exc)

    @staticmethod
    async def _send_during_boot(
        api: FirecrackerApi, request: ApiRequest, handle: ProcessHandle, diag: Callable[[], str]
    ) -> None:
        try:
            await api.send(request)
        except FirecrackerApiError:
            raise
        except VmmError as exc:  # transport failure: did the VMM die?
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(handle.wait(), 0.5)
            if handle.returncode is not None:
                raise BootFailed(
                    f"Firecracker (pid {handle.pid}) {describe_exit(handle.returncode)} during {request}{diag()}"
                ) from exc
            raise

    async def _abort(
        self, handle: ProcessHandle | None, api: FirecrackerApi | None, layout: Layout, keep: Path | None
    ) -> None:
        if handle is not None:
            with contextlib.suppress(Exception):
                await handle.kill()
        if api is not None:
            with contextlib.suppress(Exception):
                await api.aclose()
        _discard(layout, self.config, keep)
