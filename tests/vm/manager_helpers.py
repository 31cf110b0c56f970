"""Helpers for SandboxManager tests on real VMs (config per backend, events, namespaces)."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from pathlib import Path

from arcbox_vm import DefaultVmConfig, FirecrackerConfig, GrpcConfig, NetworkConfig, QemuConfig, VmmConfig
from arcbox_vm.images import GuestImage
from arcbox_vm.vmm.cgroup import find_cgroup2_mount

BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off init=/sbin/vm-agent"


def make_config(backend: str, image: GuestImage, data_dir: Path, *, cidr: str = "172.99.0.0/24",
                netns: str = "", nat: bool = False, dns: list[str] | None = None,
                network: dict | None = None) -> VmmConfig:
    """The seed's try_config(), for either backend; `network` adds [network] settings
    (host_allow, blocked_except, default_egress, ...)."""
    net = ipaddress_gateway(cidr)
    if backend == "firecracker":
        fc = FirecrackerConfig(binary=os.environ["FC_BINARY"], data_dir=str(data_dir), log_level="Error",
                               no_seccomp=True, socket_timeout_secs=15)
        defaults = DefaultVmConfig(vcpus=1, memory_mib=256, kernel=os.environ["FC_KERNEL"],
                                   rootfs=os.environ["FC_ROOTFS"], boot_args=BOOT_ARGS)
    else:
        fc = FirecrackerConfig(data_dir=str(data_dir))
        defaults = DefaultVmConfig(vcpus=1, memory_mib=256, kernel=str(image.kernel), initrd=str(image.initrd),
                                   rootfs=str(image.rootfs), boot_args=BOOT_ARGS)
    return VmmConfig(
        backend=backend, firecracker=fc, qemu=QemuConfig(),
        network=NetworkConfig(cidr=cidr, gateway=net, dns=dns or [], netns=netns, nat=nat, **(network or {})),
        grpc=GrpcConfig(unix_socket="/dev/null", tcp_addr=""), defaults=defaults,
    )


def ipaddress_gateway(cidr: str) -> str:
    import ipaddress

    return str(next(ipaddress.IPv4Network(cidr).hosts()))


async def wait_for_event(sub, sandbox_id: str, action: str, timeout: float = 180) -> bool:
    """The seed's wait_for_event: True when `action` arrives for the id, False on failed/timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            ev = await sub.recv(timeout=max(0.01, deadline - loop.time()))
        except asyncio.TimeoutError:
            return False
        if ev.sandbox_id == sandbox_id:
            if ev.action == action:
                return True
            if ev.action == "failed":
                print(f"sandbox {sandbox_id} failed: {ev.attributes}")
                return False


def fresh_netns_name() -> str:
    return f"arcbox-t-{secrets.token_hex(3)}"


def iface_exists(name: str, netns: str = "") -> bool:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run(prefix + ["ip", "link", "show", name], capture_output=True).returncode == 0


def netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sandbox_cgroups() -> set[str]:
    """Sandbox cgroups (`<parent>/<tag>/<sandbox id>`) under every arcbox-vm* parent cgroup."""
    mount = find_cgroup2_mount()
    if mount is None:
        return set()
    return {str(p.relative_to(mount.path)) for p in mount.path.glob("arcbox-vm*/*/*") if p.is_dir()}
