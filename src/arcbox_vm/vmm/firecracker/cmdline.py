"""Firecracker's and the jailer's command lines (pure functions of the config and `Layout`).

Direct mode: `firecracker --api-sock S --id ID --log-path L [flags]`, prefixed with
`ip netns exec <name>` for a VM in a named network namespace (it execs in place: the pid
stays Firecracker's). Jailer mode: `jailer --id --exec-file --uid --gid [opts] -- [flags]`
with every path as Firecracker sees it inside the jail.
"""

from __future__ import annotations

from pathlib import Path

from arcbox_vm.config.firecracker import DEFAULT_CHROOT_BASE_DIR, FirecrackerConfig
from arcbox_vm.errors import VmmError
from arcbox_vm.network.netns import exec_prefix

from .layout import JAIL_API_SOCKET, JAIL_SECCOMP, Layout


def firecracker_options(config: FirecrackerConfig, *, log_path: str | None, seccomp_filter: str | None) -> list[str]:
    """Firecracker flags that come from the config (shared by direct and jailer mode)."""
    args: list[str] = []
    if log_path is not None:
        args += ["--log-path", log_path]
    if config.log_level is not None:
        args += ["--level", config.log_level]
    if config.no_seccomp:
        args.append("--no-seccomp")
    elif seccomp_filter is not None:
        args += ["--seccomp-filter", seccomp_filter]
    if config.http_api_max_payload_size is not None:
        args += ["--http-api-max-payload-size", str(config.http_api_max_payload_size)]
    if config.mmds_size_limit is not None:
        args += ["--mmds-size-limit", str(config.mmds_size_limit)]
    return args


def firecracker_argv(
    config: FirecrackerConfig, layout: Layout, vm_id: str, binary: Path | None = None, netns_name: str = ""
) -> list[str]:
    """`firecracker --api-sock S --id ID --log-path L [--level] [--no-seccomp|--seccomp-filter] ...`.

    With `netns_name` the command is prefixed so it runs in that named network namespace
    (`ip netns exec <name>`, which execs in place: the pid stays Firecracker's).
    """
    seccomp = str(config.seccomp_filter) if config.seccomp_filter is not None else None
    return [
        *exec_prefix(netns_name),
        str(binary or config.binary),
        "--api-sock",
        str(layout.api_socket),
        "--id",
        vm_id,
        *firecracker_options(config, log_path=str(layout.log), seccomp_filter=seccomp),
    ]


NETNS_DIR = Path("/run/netns")  # where `ip netns` binds named namespaces


def jailer_netns(config: FirecrackerConfig, netns_name: str = "") -> Path | None:
    """The `--netns` path: the spec's named namespace, else `jailer.netns`; both must agree."""
    configured = config.jailer.netns if config.jailer is not None else None
    if not netns_name:
        return configured
    wanted = NETNS_DIR / netns_name
    if configured is not None and configured != wanted:
        raise VmmError(
            f"the VM must run in network namespace '{netns_name}' ({wanted}) but firecracker.jailer.netns "
            f"is {configured}; unset firecracker.jailer.netns or make them agree"
        )
    return wanted


def jailer_argv(
    config: FirecrackerConfig,
    layout: Layout,
    *,
    jailer_binary: Path | None = None,
    firecracker_binary: Path | None = None,
    netns_name: str = "",
    join_cgroup: str | None = None,
    uid: int | None = None,
    gid: int | None = None,
) -> list[str]:
    """`jailer --id --exec-file --uid --gid [opts] -- --api-sock /run/firecracker.socket [fc opts]`.

    `uid`/`gid`: the VM's own (claimed per VM) when `firecracker.jailer` sets none.

    The jailer passes `--id` to Firecracker itself, so it is not repeated after `--`
    (Firecracker rejects duplicate arguments). `netns_name` (a named namespace, from
    `MachineSpec.netns`) becomes `--netns /run/netns/<name>`. `join_cgroup` (the sandbox's
    cgroup, relative to the cgroup2 mount; only when the jailer config sets no cgroups of
    its own) becomes `--cgroup-version 2 --parent-cgroup <it>`: with no `--cgroup` values the
    jailer then moves itself into that existing cgroup before it starts Firecracker.
    """
    jailer = config.jailer
    assert jailer is not None and layout.jail_id is not None
    uid = jailer.uid if uid is None else uid
    gid = jailer.gid if gid is None else gid
    if uid is None or gid is None:
        raise VmmError("the jailer needs a uid and gid: firecracker.jailer sets none and none was claimed")
    argv = [
        str(jailer_binary or jailer.binary),
        "--id",
        layout.jail_id,
        "--exec-file",
        str(firecracker_binary or config.binary),
        "--uid",
        str(uid),
        "--gid",
        str(gid),
    ]
    if jailer.chroot_base_dir != DEFAULT_CHROOT_BASE_DIR:
        argv += ["--chroot-base-dir", str(jailer.chroot_base_dir)]
    netns = jailer_netns(config, netns_name)
    if netns is not None:
        argv += ["--netns", str(netns)]
    if jailer.new_pid_ns:
        argv.append("--new-pid-ns")
    if join_cgroup is not None:
        if jailer_sets_cgroups(config):
            raise VmmError("firecracker.jailer sets its own cgroups; the jailer cannot also join the sandbox's")
        argv += ["--cgroup-version", "2", "--parent-cgroup", join_cgroup]
    if jailer.cgroup_version is not None:
        argv += ["--cgroup-version", jailer.cgroup_version]
    if jailer.parent_cgroup is not None:
        argv += ["--parent-cgroup", jailer.parent_cgroup]
    for cg in jailer.cgroups:
        argv += ["--cgroup", cg]
    for limit in jailer.resource_limits:
        argv += ["--resource-limit", limit]
    seccomp = "/" + JAIL_SECCOMP if config.seccomp_filter is not None else None
    argv += [
        "--",
        "--api-sock",
        JAIL_API_SOCKET,
        *firecracker_options(config, log_path=layout.fc_path(layout.log), seccomp_filter=seccomp),
    ]
    return argv


def jailer_sets_cgroups(config: FirecrackerConfig) -> bool:
    """Whether `firecracker.jailer` places Firecracker in cgroups of its own choosing (then
    the sandbox cgroups of `daemon.cgroup_parent` are not used for it: its limits live there)."""
    jailer = config.jailer
    return jailer is not None and (jailer.cgroup_version is not None or jailer.parent_cgroup is not None
                                   or bool(jailer.cgroups))
