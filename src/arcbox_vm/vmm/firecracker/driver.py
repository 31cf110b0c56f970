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
from collections.abc import Callable
from pathlib import Path

from arcbox_vm.agent.protocol import CHANNEL_CMDLINE_KEY, VSOCK_PORT
from arcbox_vm.config.firecracker import FirecrackerConfig
from arcbox_vm.config.qemu import DEFAULT_UID_RANGE, parse_uid_range
from arcbox_vm.errors import BootFailed, FirecrackerApiError, VmmError
from arcbox_vm.ports import AdoptSpec, AgentEndpoint, MachineSpec, MemoryUse, VmSnapshot
from arcbox_vm.vmm import tun
from arcbox_vm.vmm.cgroup import SandboxCgroups
from arcbox_vm.vmm.process import TrackedProcess
from arcbox_vm.vmm.users import VmmUsers

from . import bodies, snapshots
from .api import DEFAULT_REQUEST_TIMEOUT, FirecrackerApi
from .bodies import ApiRequest
from .cmdline import firecracker_argv, jailer_argv, jailer_netns, jailer_sets_cgroups
from .layout import (
    JAIL_INITRD,
    JAIL_KERNEL,
    JAIL_ROOTFS,
    JAIL_SECCOMP,
    Layout,
    instance_id,
    layout_for,
    resolve_binary,
    with_jailer,
)
from .process import FirecrackerProcess, diagnostics, exit_code_from_log
from .staging import clear_jail, create_empty_file, discard, stage_file, unlink_quiet
from .waits import wait_for_api_socket, wait_for_pid_file

log = logging.getLogger(__name__)

GUEST_CID = 3
ROOT_DRIVE_ID = "rootfs"
NET_IFACE_ID = "eth0"
CMDLINE_MAX = 2048  # x86_64 CMDLINE_MAX_SIZE, including the terminating NUL
# What Firecracker appends to boot_args itself: " pci=off", " root=/dev/vda rw" and one
# " virtio_mmio.device=4K@0xc000N000:<irq>" per MMIO device (about 36 bytes each).
_FC_FIXED_SUFFIX = len(" pci=off") + len(" root=/dev/vda rw")
_FC_PER_DEVICE = 40
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


class FirecrackerDriver:
    """Boots VMs with Firecracker: under the jailer (configured, or found: `use_jailer`), or directly."""

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
        users: VmmUsers | None = None,
    ) -> None:
        self.config = with_jailer(config or FirecrackerConfig())
        jailer = self.config.jailer
        # also without a jailer: VMs a jailing earlier daemon started give their uids back
        self.users = users or VmmUsers(*parse_uid_range(jailer.uid_range if jailer is not None else DEFAULT_UID_RANGE))
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
            assert layout.jail_dir is not None
            os.chmod(layout.jail_dir, 0o700)  # no other user passes into a jail (Firecracker is chrooted below)
        return AgentEndpoint(
            listen_path=Path(f"{layout.vsock_uds}_{self.vsock_port}"),
            boot_arg=f"{CHANNEL_CMDLINE_KEY}=vsock:{self.vsock_port}",
        )

    def kernel_for(self, bzimage: Path, vmlinux: Path) -> Path:
        """Released Firecracker boots only an uncompressed ELF vmlinux."""
        return vmlinux

    async def adopt(self, spec: AdoptSpec) -> FirecrackerProcess:
        """A Firecracker an earlier daemon started (pid + start time), watched through a pidfd;
        already exited if it is gone. Its API socket still works, and cleaning it up removes
        its sockets, files, jail and cgroup exactly like a launched one's."""
        cfg = self.config
        layout = layout_for(cfg, spec.sockdir, spec.workdir)
        handle = TrackedProcess.watch(spec.pid, name="Firecracker", log_path=layout.console_log,
                                      start_time=spec.start_time, exit_status=lambda: exit_code_from_log(layout.log))
        cgroup = None if jailer_sets_cgroups(cfg) else self.cgroups.sandbox(spec.sandbox_id)
        api = FirecrackerApi(layout.api_socket, timeout=self.request_timeout)
        return FirecrackerProcess(handle, api, layout, cfg, cgroup, users=self.users, owner=spec.sockdir)

    async def launch(self, spec: MachineSpec, endpoint: AgentEndpoint) -> FirecrackerProcess:
        layout = layout_for(self.config, spec.socket_dir, spec.workdir)
        self._check_inputs(spec)
        requests = self.plan_requests(spec, endpoint, layout=layout)  # validates before spawning
        return await self._start(spec, endpoint, layout, requests)

    def snapshot_support(self) -> str | None:
        return snapshots.restore_support(self.config)

    async def restore(self, spec: MachineSpec, endpoint: AgentEndpoint, snapshot: VmSnapshot,
                      memory: MemoryUse = "cow") -> FirecrackerProcess:
        """A fresh jailed Firecracker loading `snapshot` (see snapshots.py); the memory file is
        always mapped copy-on-write (Firecracker's File backend), whatever `memory` says."""
        why = self.snapshot_support()
        if why:
            raise BootFailed(why)
        if snapshot.vmm != self.name or snapshot.memory is None:
            raise BootFailed(f"this snapshot was made by {snapshot.vmm}, not Firecracker")
        layout = layout_for(self.config, spec.socket_dir, spec.workdir)
        self._check_inputs(spec)
        requests = snapshots.restore_requests(self.config, layout, tap_name=spec.tap_name, iface_id=NET_IFACE_ID,
                                              vsock_uds=self._vsock_uds(endpoint, layout))
        stage = {snapshots.JAIL_STATE: snapshot.state, snapshots.JAIL_MEMORY: snapshot.memory}
        return await self._start(spec, endpoint, layout, requests, stage)

    async def _start(self, spec: MachineSpec, endpoint: AgentEndpoint, layout: Layout, requests: list[ApiRequest],
                     stage: dict[str, Path] | None = None) -> FirecrackerProcess:
        """Spawn Firecracker (under the jailer if configured), send `requests`; with `stage`,
        those files are put into the jail too (read-only)."""
        cfg = self.config
        uds_host = self._vsock_uds(endpoint, layout)
        fc_binary = resolve_binary(cfg.binary, "firecracker")
        jailer_binary = resolve_binary(cfg.jailer.binary, "jailer") if cfg.jailer is not None else None
        netns = spec.netns  # named network namespace the VMM must run in
        if cfg.jailer is not None:
            jailer_netns(cfg, netns)  # conflicting namespaces fail before anything is created

        handle: TrackedProcess | None = None
        api: FirecrackerApi | None = None
        keep = endpoint.listen_path if layout.jailed else None
        cgroup = None if jailer_sets_cgroups(cfg) else self.cgroups.sandbox(
            spec.sandbox_id, vcpus=spec.vcpus, memory_mib=spec.memory_mib)
        claimed = cfg.jailer is not None and cfg.jailer.uid is None

        def diag() -> str:
            return diagnostics(layout.log, layout.console_log)

        try:
            uid, gid = await self._jail_ids(spec)
            self._prepare_files(spec, layout, uds_host, endpoint, uid, gid)
            for name, src in (stage or {}).items():
                assert cfg.jailer is not None
                stage_file(src, layout.jail_file(name), uid=uid, gid=gid, writable=False)
            if cfg.jailer is not None and spec.tap_name:  # the jailed Firecracker opens it by name
                await tun.set_owner(netns, spec.tap_name, uid, gid)
            if cfg.jailer is None:
                argv = firecracker_argv(cfg, layout, instance_id(spec.sandbox_id), binary=fc_binary, netns_name=netns)
            else:
                if cgroup is not None and not cgroup.create():
                    cgroup = None
                argv = jailer_argv(
                    cfg, layout, jailer_binary=jailer_binary, firecracker_binary=fc_binary, netns_name=netns,
                    join_cgroup=cgroup.relative if cgroup is not None else None, uid=uid, gid=gid,
                )
            log.debug("starting %s", " ".join(argv))
            new_pid_ns = cfg.jailer is not None and cfg.jailer.new_pid_ns
            # The jailer execs Firecracker in place (same pid) unless it starts it in a new pid
            # namespace. die_with_parent survives that exec, but the jailer's switch to its uid/gid
            # clears it (the kernel does, on a credential change): under a real jailer it only
            # covers the jailer itself.
            handle = await TrackedProcess.spawn(argv, layout.console_log, name="the jailer" if new_pid_ns else "Firecracker",
                                                die_with_parent=self.die_with_parent, truncate=True)
            if new_pid_ns:
                pid = await wait_for_pid_file(layout.jail_file(f"{fc_binary.name}.pid"), handle,
                                              cfg.api_socket_timeout, diag)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(handle.wait(), cfg.api_socket_timeout)
                handle = TrackedProcess.watch(pid, name="Firecracker", log_path=layout.console_log,
                                              exit_status=lambda: exit_code_from_log(layout.log))
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
            if claimed:
                await asyncio.to_thread(self.users.release, spec.socket_dir)
            if isinstance(exc, VmmError):
                if details and details not in str(exc):
                    exc.add_note(details.strip())
                raise
            if isinstance(exc, OSError):
                raise VmmError(f"could not launch Firecracker for {spec.sandbox_id}: {exc}{details}") from exc
            raise
        return FirecrackerProcess(handle, api, layout, cfg, cgroup, users=self.users, owner=spec.socket_dir)

    async def _jail_ids(self, spec: MachineSpec) -> tuple[int, int]:
        """The uid/gid the jailer drops to: the configured ones, else one claimed for this VM
        (its socket directory owns the claim). (-1, -1) without a jailer."""
        jailer = self.config.jailer
        if jailer is None:
            return -1, -1
        if jailer.uid is not None and jailer.gid is not None:
            return jailer.uid, jailer.gid
        uid = await asyncio.to_thread(self.users.claim, spec.socket_dir)
        return uid, uid

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

    def _prepare_files(self, spec: MachineSpec, layout: Layout, uds_host: Path, endpoint: AgentEndpoint,
                       uid: int, gid: int) -> None:
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
        root = layout.jail_root
        assert root is not None
        root.mkdir(parents=True, exist_ok=True)
        listen = Path(endpoint.listen_path)
        clear_jail(root, keep_name=listen.name if listen.parent == root else None)
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
        api: FirecrackerApi, request: ApiRequest, handle: TrackedProcess, diag: Callable[[], str]
    ) -> None:
        try:
            await api.send(request)
        except FirecrackerApiError:
            raise
        except VmmError as exc:  # transport failure: did the VMM die?
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(handle.wait(), 0.5)
            if handle.returncode is not None:
                raise BootFailed(f"{handle.describe_exit()} during {request}{diag()}") from exc
            raise

    async def _abort(
        self, handle: TrackedProcess | None, api: FirecrackerApi | None, layout: Layout, keep: Path | None
    ) -> None:
        if handle is not None:
            with contextlib.suppress(Exception):
                await handle.kill()
        if api is not None:
            with contextlib.suppress(Exception):
                await api.aclose()
        discard(layout, self.config, keep)
