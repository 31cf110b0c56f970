"""Jailer mode: argv, chroot staging, jail-relative API paths, cleanup (fake jailer + fake firecracker)."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest
from fake_firecracker import FAKE_FIRECRACKER, FAKE_JAILER
from fc_spec import validate_all

from arcbox_vm.agent.protocol import FrameDecoder, MsgType
from arcbox_vm.errors import FirecrackerApiError, VmmError
from arcbox_vm.ports import MachineSpec
from arcbox_vm.vmm.firecracker import FirecrackerConfig, FirecrackerDriver, JailerConfig
from arcbox_vm.vmm.firecracker.cmdline import jailer_argv
from arcbox_vm.vmm.firecracker.layout import jail_id, layout_for
from arcbox_vm.vmm.firecracker.staging import cgroup_dirs, stage_file
from arcbox_vm.vmm.procfs import pid_alive

BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"


def jail_cfg(base: Path, **jailer_kw) -> FirecrackerConfig:
    jailer = dict(binary=FAKE_JAILER, uid=os.getuid(), gid=os.getgid(), chroot_base_dir=base)
    jailer.update(jailer_kw)
    return FirecrackerConfig(binary=FAKE_FIRECRACKER, jailer=JailerConfig(**jailer), socket_timeout_secs=10)


def make_spec(files, **kw) -> MachineSpec:
    args = dict(
        sandbox_id="sb-1",
        workdir=files.workdir,
        kernel=files.kernel,
        rootfs=files.rootfs,
        initrd=files.initrd,
        boot_args=BOOT_ARGS,
        vcpus=1,
        memory_mib=256,
    )
    args.update(kw)
    return MachineSpec(**args)


def test_jailer_argv_full() -> None:
    cfg = FirecrackerConfig(
        binary="/usr/local/bin/firecracker",
        log_level="Debug",
        no_seccomp=True,
        http_api_max_payload_size=100000,
        mmds_size_limit=2048,
        jailer=JailerConfig(
            binary="/usr/local/bin/jailer",
            uid=123,
            gid=456,
            chroot_base_dir="/var/jail",
            netns="/var/run/netns/fc0",
            new_pid_ns=True,
            cgroup_version=2,
            parent_cgroup="arcbox",
            cgroups=["cpu.max=50000 100000"],
            resource_limits=["no-file=4096", "fsize=1073741824"],
        ),
    )
    workdir = Path("/var/lib/arcbox-vm/sandboxes/sb-1")
    layout = layout_for(cfg, workdir)
    jid = jail_id(workdir)
    assert layout.jail_root == Path("/var/jail/firecracker") / jid / "root"
    argv = jailer_argv(cfg, layout)
    assert argv == [
        "/usr/local/bin/jailer",
        "--id",
        jid,
        "--exec-file",
        "/usr/local/bin/firecracker",
        "--uid",
        "123",
        "--gid",
        "456",
        "--chroot-base-dir",
        "/var/jail",
        "--netns",
        "/var/run/netns/fc0",
        "--new-pid-ns",
        "--cgroup-version",
        "2",
        "--parent-cgroup",
        "arcbox",
        "--cgroup",
        "cpu.max=50000 100000",
        "--resource-limit",
        "no-file=4096",
        "--resource-limit",
        "fsize=1073741824",
        "--",
        "--api-sock",
        "/run/firecracker.socket",
        "--log-path",
        "/firecracker.log",
        "--level",
        "Debug",
        "--no-seccomp",
        "--http-api-max-payload-size",
        "100000",
        "--mmds-size-limit",
        "2048",
    ]
    assert "--id" not in argv[argv.index("--") :]  # the jailer passes --id itself


def test_jailer_argv_minimal_defaults() -> None:
    cfg = FirecrackerConfig(jailer=JailerConfig(uid=1000, gid=1000))
    layout = layout_for(cfg, Path("/w/sb"))
    argv = jailer_argv(cfg, layout)
    assert argv[:9] == [
        "/usr/bin/jailer",
        "--id",
        jail_id(Path("/w/sb")),
        "--exec-file",
        "/usr/bin/firecracker",
        "--uid",
        "1000",
        "--gid",
        "1000",
    ]
    assert "--chroot-base-dir" not in argv  # only passed when it differs from /srv/jailer
    assert argv[9:] == ["--", "--api-sock", "/run/firecracker.socket", "--log-path", "/firecracker.log"]
    assert layout.jail_root.parent.parent == Path("/srv/jailer/firecracker")


def test_jailer_netns_from_machine_spec() -> None:
    cfg = FirecrackerConfig(jailer=JailerConfig(uid=1, gid=1))
    layout = layout_for(cfg, Path("/w/sb"))
    argv = jailer_argv(cfg, layout, netns_name="arcbox-sb1")
    assert argv[argv.index("--netns") + 1] == "/run/netns/arcbox-sb1"
    clash = FirecrackerConfig(jailer=JailerConfig(uid=1, gid=1, netns="/run/netns/other"))
    with pytest.raises(VmmError, match="network namespace"):
        jailer_argv(clash, layout_for(clash, Path("/w/sb")), netns_name="arcbox-sb1")


def test_jail_id_is_valid_stable_and_unique() -> None:
    a = jail_id(Path("/data/sandboxes/My_Sandbox.1"))
    assert a == jail_id(Path("/data/sandboxes/My_Sandbox.1"))
    assert a != jail_id(Path("/other/sandboxes/My_Sandbox.1"))
    assert a.startswith("My-Sandbox-1-")
    long = jail_id(Path("/d/" + "x" * 200))
    assert len(long) <= 64
    import re

    assert re.fullmatch(r"[A-Za-z0-9-]{1,64}", long) and re.fullmatch(r"[A-Za-z0-9-]{1,64}", a)


def test_stage_file_links_and_chowns(short_dir) -> None:
    src = short_dir / "rootfs.ext4"
    src.write_bytes(b"disk")
    dst = short_dir / "jail-rootfs"
    assert stage_file(src, dst, uid=os.getuid(), gid=os.getgid(), writable=True) == "link"
    assert os.stat(dst).st_ino == os.stat(src).st_ino
    # re-staging replaces a stale file
    assert stage_file(src, dst, uid=os.getuid(), gid=os.getgid(), writable=True) == "link"


def test_stage_file_copies_across_filesystems(short_dir, monkeypatch) -> None:
    src = short_dir / "vmlinux"
    src.write_bytes(b"kernel")
    src.chmod(0o644)

    def exdev(*a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", exdev)
    dst = short_dir / "jail-vmlinux"
    assert stage_file(src, dst, uid=os.getuid(), gid=os.getgid(), writable=False) == "copy"
    assert dst.read_bytes() == b"kernel" and os.stat(dst).st_ino != os.stat(src).st_ino


def test_stage_file_copies_private_readonly_files(short_dir) -> None:
    """A kernel the jailed user could not read through a link is copied (the shared image keeps its owner)."""
    src = short_dir / "vmlinux"
    src.write_bytes(b"kernel")
    src.chmod(0o600)
    dst = short_dir / "jail-vmlinux"
    assert stage_file(src, dst, uid=os.getuid(), gid=os.getgid(), writable=False) == "copy"
    assert oct(os.stat(dst).st_mode & 0o777) == "0o400"


def test_cgroup_dirs(tmp_path) -> None:
    """The jailer's per-VM cgroups, found with the shared mountinfo parser: the cgroup2
    mount for v2; for v1 the hierarchy of each controller named in `--cgroup`."""
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "30 25 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755\n"
        "31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
        "32 30 0:28 / /cg/cpu rw,nosuid shared:10 - cgroup cgroup rw,cpu,cpuacct\n"
        "33 30 0:29 / /cg/my\\040cpuset rw,nosuid shared:11 - cgroup cgroup rw,cpuset\n"
        "34 30 0:30 / /cg/systemd rw,nosuid shared:12 - cgroup cgroup rw,xattr,name=systemd\n"
    )
    cfg = FirecrackerConfig(jailer=JailerConfig(uid=1, gid=1, cgroup_version="2", cgroups=["memory.max=1G"]))
    assert cgroup_dirs(cfg, "vm-1", mountinfo) == [Path("/sys/fs/cgroup/unified/firecracker/vm-1")]
    cfg1 = FirecrackerConfig(jailer=JailerConfig(uid=1, gid=1, parent_cgroup="a/b",
                                                 cgroups=["cpu.shares=2", "cpuacct.x=1", "cpuset.cpus=0"]))
    assert cgroup_dirs(cfg1, "vm-1", mountinfo) == [Path("/cg/cpu/a/b/vm-1"), Path("/cg/my cpuset/a/b/vm-1")]
    cfg_missing = FirecrackerConfig(jailer=JailerConfig(uid=1, gid=1, cgroups=["memory.limit_in_bytes=1"]))
    assert cgroup_dirs(cfg_missing, "vm-1", mountinfo) == []  # no v1 memory hierarchy here
    assert cgroup_dirs(FirecrackerConfig(jailer=JailerConfig(uid=1, gid=1)), "vm-1", mountinfo) == []


async def test_launch_under_jailer(fake_env, vm_files, short_dir, agent_sink_factory) -> None:
    base = short_dir / "jail"
    base.mkdir()
    d = FirecrackerDriver(jail_cfg(base, resource_limits=["no-file=2048"]))
    ep = d.agent_endpoint(vm_files.workdir)
    jail_root = layout_for(d.config, vm_files.workdir).jail_root
    assert ep.listen_path == jail_root / "v.sock_52"
    assert jail_root.is_dir()  # created so the caller can bind the endpoint inside it
    sink = await agent_sink_factory(ep.listen_path)
    proc = await d.launch(make_spec(vm_files), ep)
    try:
        reqs = fake_env.requests()
        assert [f"{r['method']} {r['path']}" for r in reqs] == [
            "PUT /logger",
            "PUT /metrics",
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/rootfs",
            "PUT /vsock",
            "PUT /entropy",
            "PUT /actions",
        ]
        for r in reqs:
            assert r["status"] == 204 and validate_all(r["method"], r["path"], r["body"]) == {}
        bodies = {r["path"]: r["body"] for r in reqs}
        # every path Firecracker gets is relative to the jail root
        assert bodies["/boot-source"]["kernel_image_path"] == "/vmlinux"
        assert bodies["/boot-source"]["initrd_path"] == "/initrd"
        assert bodies["/drives/rootfs"]["path_on_host"] == "/rootfs"
        assert bodies["/vsock"]["uds_path"] == "/v.sock"
        assert "log_path" not in bodies["/logger"]  # set once, with --log-path /firecracker.log
        assert bodies["/metrics"]["metrics_path"] == "/firecracker.metrics"
        # staged by hard link (same filesystem); rootfs owned by the jailed uid
        assert os.stat(jail_root / "rootfs").st_ino == os.stat(vm_files.rootfs).st_ino
        assert os.stat(jail_root / "rootfs").st_uid == os.getuid()
        assert os.stat(jail_root / "vmlinux").st_ino == os.stat(vm_files.kernel).st_ino
        assert (jail_root / "run" / "firecracker.socket").exists()
        assert int((jail_root / "firecracker.pid").read_text()) == proc.pid
        jargv = fake_env.jailer_argv()
        assert jargv[jargv.index("--") :] == [
            "--",
            "--api-sock",
            "/run/firecracker.socket",
            "--log-path",
            "/firecracker.log",
        ]
        assert ["--resource-limit", "no-file=2048"] == jargv[jargv.index("--resource-limit") :][:2]
        fargv = fake_env.argv()
        assert fargv[1:3] == ["--id", jail_id(vm_files.workdir)]
        # the guest's vsock dial-in reached the endpoint inside the jail
        await asyncio.wait_for(sink.got_data.wait(), 5)
        assert FrameDecoder().feed(bytes(sink.data))[0].type == MsgType.HELLO
        assert proc.console_log == vm_files.workdir / "console.log"
    finally:
        await proc.kill()
        await proc.cleanup()
    assert not jail_root.parent.exists()  # <base>/firecracker/<id> removed
    assert vm_files.rootfs.read_bytes() == b"\0" * 4096  # the source disk itself is untouched
    assert list(vm_files.workdir.iterdir()) == []


async def test_launch_under_jailer_new_pid_ns(fake_env, vm_files, short_dir, agent_sink_factory) -> None:
    base = short_dir / "jail"
    base.mkdir()
    d = FirecrackerDriver(jail_cfg(base, new_pid_ns=True))
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    proc = await d.launch(make_spec(vm_files), ep)
    try:
        assert fake_env.requests()[-1]["body"] == {"action_type": "InstanceStart"}
        assert fake_env.requests()[-1]["pid"] == proc.pid  # tracked through the pid file
        assert proc.returncode is None
        await proc.request_stop()
        assert await asyncio.wait_for(proc.wait(), 5) == 0  # exit status read from the log
    finally:
        await proc.kill()
        await proc.cleanup()
    assert not pid_alive(proc.pid)


async def test_new_pid_ns_kill(fake_env, vm_files, short_dir, agent_sink_factory) -> None:
    base = short_dir / "jail"
    base.mkdir()
    d = FirecrackerDriver(jail_cfg(base, new_pid_ns=True))
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    proc = await d.launch(make_spec(vm_files), ep)
    await proc.kill()
    assert proc.returncode == -9
    assert not pid_alive(proc.pid)
    await proc.cleanup()


async def test_stale_jail_is_cleared(fake_env, vm_files, short_dir, agent_sink_factory) -> None:
    """Leftovers of a crashed run (device nodes, pid file, sockets) would make the jailer fail."""
    base = short_dir / "jail"
    base.mkdir()
    d = FirecrackerDriver(jail_cfg(base))
    ep = d.agent_endpoint(vm_files.workdir)
    root = layout_for(d.config, vm_files.workdir).jail_root
    (root / "dev" / "net").mkdir(parents=True)
    (root / "dev" / "kvm").write_bytes(b"")
    (root / "firecracker.pid").write_text("1")
    (root / "v.sock").write_bytes(b"")
    await agent_sink_factory(ep.listen_path)
    proc = await d.launch(make_spec(vm_files), ep)
    await proc.kill()
    await proc.cleanup()


async def test_failed_launch_under_jailer_keeps_only_the_endpoint(
    fake_env, vm_files, short_dir, agent_sink_factory
) -> None:
    base = short_dir / "jail"
    base.mkdir()
    fake_env.fail("PUT", "/actions", shape="fault_message", message="Cannot start microvm: injected")
    d = FirecrackerDriver(jail_cfg(base))
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    with pytest.raises(FirecrackerApiError, match="Cannot start microvm: injected"):
        await d.launch(make_spec(vm_files), ep)
    root = layout_for(d.config, vm_files.workdir).jail_root
    assert sorted(p.name for p in root.iterdir()) == ["v.sock_52"]
    assert list(vm_files.workdir.iterdir()) == []
    assert not pid_alive(fake_env.requests()[-1]["pid"])


async def test_jailer_rejects_exec_file_without_firecracker_in_name(fake_env, short_dir) -> None:
    with pytest.raises(ValueError, match="must contain 'firecracker'"):
        FirecrackerConfig(binary="/usr/bin/fc", jailer=JailerConfig(uid=1, gid=1))


# ---------------------------------------------------------------- the jailer by default


@pytest.fixture
def installed_jailer(monkeypatch, short_dir):
    """A host where the jailer is installed (the fake one) and jails go under `short_dir`."""
    from arcbox_vm.vmm.firecracker import layout

    base = short_dir / "jail"
    base.mkdir()
    monkeypatch.setattr(layout, "DEFAULT_JAILER_BINARY", Path(FAKE_JAILER))
    monkeypatch.setattr(layout, "DEFAULT_CHROOT_BASE_DIR", base)
    return base


async def test_the_jailer_is_used_by_default_with_a_uid_per_vm(fake_env, vm_files, short_dir, installed_jailer,
                                                               agent_sink_factory, monkeypatch, tmp_path) -> None:
    from arcbox_vm.vmm import tun
    from arcbox_vm.vmm.users import VmmUsers

    owners: list[tuple] = []

    async def set_owner(netns, name, uid, gid):  # the TAP itself is not faked
        owners.append((netns, name, uid, gid))

    monkeypatch.setattr(tun, "set_owner", set_owner)
    users = VmmUsers(7000, 7009, tmp_path / "claims")
    d = FirecrackerDriver(FirecrackerConfig(binary=FAKE_FIRECRACKER, socket_timeout_secs=10), users=users)
    assert d.config.jailer is not None and d.config.jailer.uid is None, "found, not configured"
    assert not d.config.no_seccomp
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    proc = await d.launch(make_spec(vm_files, tap_name="tap0", guest_mac="06:00:ac:10:00:02"), ep)
    jail_root = layout_for(d.config, vm_files.workdir).jail_root
    try:
        jargv = fake_env.jailer_argv()
        assert jargv[jargv.index("--uid") + 1] == jargv[jargv.index("--gid") + 1] == "7000"
        assert jail_root.is_relative_to(installed_jailer)
        assert os.stat(jail_root / "rootfs").st_uid == 7000 == os.stat(jail_root / "rootfs").st_gid
        assert "--no-seccomp" not in fake_env.argv(), "Firecracker's seccomp filter stays on"
        assert owners == [("", "tap0", 7000, 7000)], "its TAP is given to its uid"
        assert users.uid_of(vm_files.workdir) == 7000
        # an adopting daemon finds the claim by the VM's socket directory and gives it back
        from arcbox_vm.ports import AdoptSpec

        adopted = await d.adopt(AdoptSpec("sb-1", vm_files.workdir, vm_files.workdir, proc.pid, proc.start_time))
        await adopted.kill()
        await adopted.cleanup()
        assert users.uid_of(vm_files.workdir) is None
    finally:
        await proc.kill()
        await proc.cleanup()
    assert not jail_root.exists()


def test_without_the_jailer_binary_firecracker_runs_directly_and_says_so(monkeypatch, tmp_path, caplog) -> None:
    import logging

    from arcbox_vm.vmm.firecracker import layout

    monkeypatch.setattr(layout, "DEFAULT_JAILER_BINARY", tmp_path / "no-jailer")
    with caplog.at_level(logging.WARNING, logger="arcbox_vm.vmm.firecracker.layout"):
        assert FirecrackerDriver(FirecrackerConfig(binary=FAKE_FIRECRACKER)).config.jailer is None
    assert "without the jailer (there is no jailer at" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="arcbox_vm.vmm.firecracker.layout"):
        never = FirecrackerDriver(FirecrackerConfig(binary=FAKE_FIRECRACKER, use_jailer="never"))
    assert never.config.jailer is None and caplog.text == "", "said so in the config: nothing to warn about"
    always = FirecrackerDriver(FirecrackerConfig(binary=FAKE_FIRECRACKER, use_jailer="always"))
    assert always.config.jailer is not None and always.config.jailer.binary == tmp_path / "no-jailer"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(layout, "DEFAULT_JAILER_BINARY", Path(FAKE_JAILER))
    assert FirecrackerDriver(FirecrackerConfig(binary=FAKE_FIRECRACKER)).config.jailer is None, "not root"


def test_a_configured_jailer_keeps_its_uid() -> None:
    cfg = jail_cfg(Path("/srv/j"), uid=123, gid=456)
    layout = layout_for(cfg, Path("/run/arcbox-vm/w"))
    argv = jailer_argv(cfg, layout)
    assert argv[argv.index("--uid") + 1] == "123" and argv[argv.index("--gid") + 1] == "456"
    per_vm = jail_cfg(Path("/srv/j"), uid=None, gid=None)
    with pytest.raises(VmmError, match="needs a uid and gid"):
        jailer_argv(per_vm, layout)
    argv = jailer_argv(per_vm, layout, uid=7001, gid=7001)
    assert argv[argv.index("--uid") + 1] == "7001"
