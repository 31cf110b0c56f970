"""Per-sandbox cgroups (vmm/cgroup.py): mount discovery, paths, "off" mode, degradation,
and one round trip on this machine's real cgroup2 hierarchy."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from arcbox_vm import ConfigError, VmmConfig
from arcbox_vm.errors import VmmError
from arcbox_vm.paths import manager_tag
from arcbox_vm.vmm import cgroup as cg
from arcbox_vm.vmm.cgroup import SandboxCgroups, find_cgroup2_mount
from arcbox_vm.vmm.firecracker import FirecrackerConfig, JailerConfig
from arcbox_vm.vmm.firecracker.cmdline import jailer_argv, jailer_sets_cgroups
from arcbox_vm.vmm.firecracker.layout import layout_for

V1_LINES = [
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755",
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu",
]


def mountinfo_line(mount: Path | str, root: str = "/", opts: str = "rw,nosuid,nodev,noexec,relatime") -> str:
    escaped = str(mount).replace("\\", "\\134").replace(" ", "\\040")
    return f"41 31 0:38 {root} {escaped} {opts} shared:9 - cgroup2 cgroup2 rw,nsdelegate"


def write_mountinfo(tmp_path: Path, *lines: str) -> Path:
    p = tmp_path / "mountinfo"
    p.write_text("\n".join([*V1_LINES, *lines]) + "\n")
    return p


def write_self_cgroup(tmp_path: Path, path: str = "/") -> Path:
    p = tmp_path / "self-cgroup"
    p.write_text(f"4:memory:/x\n0::{path}\n")
    return p


# ---------------------------------------------------------------- finding the mount

@pytest.mark.parametrize("mount", ["/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/mnt/my cgroups"])
def test_finds_the_cgroup2_mount_wherever_it_is(tmp_path, mount):
    found = find_cgroup2_mount(write_mountinfo(tmp_path, mountinfo_line(mount)))
    assert found is not None and found.path == Path(mount) and not found.read_only


def test_no_cgroup2_mount_is_none(tmp_path):
    assert find_cgroup2_mount(write_mountinfo(tmp_path)) is None
    assert find_cgroup2_mount(tmp_path / "missing") is None


def test_a_mount_of_the_whole_hierarchy_wins_over_a_bind_mounted_subtree(tmp_path):
    info = write_mountinfo(tmp_path, mountinfo_line("/srv/sub", root="/some/subtree"),
                           mountinfo_line("/sys/fs/cgroup/unified"))
    assert find_cgroup2_mount(info).path == Path("/sys/fs/cgroup/unified")


def test_read_only_mount_is_reported(tmp_path):
    found = find_cgroup2_mount(write_mountinfo(tmp_path, mountinfo_line("/sys/fs/cgroup", opts="ro,nosuid")))
    assert found is not None and found.read_only


# ---------------------------------------------------------------- a fake tree in tmp_path

@pytest.fixture(params=["sys/fs/cgroup", "sys/fs/cgroup/unified"], ids=["pure-v2", "hybrid"])
def fake_mount(request, tmp_path) -> Path:
    mount = tmp_path / request.param
    mount.mkdir(parents=True)
    return mount


def open_fake(tmp_path: Path, mount: Path, parent: str = "arcbox-vm", tag: str = "ab12",
              own: str = "/") -> SandboxCgroups:
    return SandboxCgroups.open(parent, tag, mountinfo=write_mountinfo(tmp_path, mountinfo_line(mount)),
                               self_cgroup=write_self_cgroup(tmp_path, own))


def test_paths_are_mount_parent_tag_sandbox(tmp_path, fake_mount):
    cgs = open_fake(tmp_path, fake_mount, parent="ops/arcbox-vm", tag="c0de")
    assert cgs.enabled
    assert cgs.root == fake_mount / "ops/arcbox-vm/c0de"
    assert cgs.path("sb-1") == fake_mount / "ops/arcbox-vm/c0de/sb-1"
    assert cgs.relative("sb-1") == "ops/arcbox-vm/c0de/sb-1"
    assert not cgs.root.exists(), "open() proves it may create the root but leaves no empty one behind"
    assert cgs.list() == []


def test_tag_is_the_data_dirs_so_daemons_do_not_share_a_tree(tmp_path, fake_mount):
    a = open_fake(tmp_path, fake_mount, tag=manager_tag(tmp_path / "data-a"))
    b = open_fake(tmp_path, fake_mount, tag=manager_tag(tmp_path / "data-b"))
    assert a.root != b.root and a.root.parent == b.root.parent == fake_mount / "arcbox-vm"


def test_list_and_pids_read_the_tree(tmp_path, fake_mount):
    cgs = open_fake(tmp_path, fake_mount)
    for sid in ("sb-2", "sb-1"):
        assert cgs.create(sid) == cgs.root / sid
    (cgs.root / "sb-1" / "cgroup.procs").write_text("10\n11\n")
    (cgs.root / "sb-1" / "nested").mkdir()
    (cgs.root / "sb-1" / "nested" / "cgroup.procs").write_text("12\n")
    (cgs.root / "stray-file").write_text("")
    assert cgs.list() == ["sb-1", "sb-2"]
    assert sorted(cgs.pids("sb-1")) == [10, 11, 12]
    assert cgs.pids("sb-2") == [] and cgs.pids("unknown") == []


def test_place_writes_the_pid_into_cgroup_procs(tmp_path, fake_mount):
    cgs = open_fake(tmp_path, fake_mount)
    (cgs.root / "sb-1").mkdir(parents=True)
    (cgs.root / "sb-1" / "cgroup.procs").touch()  # what the kernel would show in a new cgroup
    handle = cgs.sandbox("sb-1")
    assert handle is not None and handle.place(4242)
    assert (cgs.root / "sb-1" / "cgroup.procs").read_text() == "4242"


def test_a_failed_move_is_a_warning_and_leaves_no_cgroup(tmp_path, fake_mount, monkeypatch, caplog):
    cgs = open_fake(tmp_path, fake_mount)

    def refuse(path: Path, text: str) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(cg, "_write", refuse)
    with caplog.at_level(logging.WARNING, logger="arcbox_vm.vmm.cgroup"):
        assert cgs.place("sb-1", 4242) is False
    assert "cannot move pid 4242" in caplog.text and "stays in the daemon's cgroup" in caplog.text
    assert not (cgs.root / "sb-1").exists() and not cgs.root.exists()


def test_a_failed_mkdir_is_a_warning_not_an_error(tmp_path, fake_mount, caplog):
    cgs = open_fake(tmp_path, fake_mount)
    cgs.root.mkdir(parents=True)
    (cgs.root / "sb-1").write_text("in the way")
    with caplog.at_level(logging.WARNING, logger="arcbox_vm.vmm.cgroup"):
        assert cgs.place("sb-1", 4242) is False
    assert "cannot create cgroup" in caplog.text


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "cgroup.procs", "x\0y"])
def test_ids_that_cannot_name_a_cgroup_are_refused(tmp_path, fake_mount, bad, caplog):
    cgs = open_fake(tmp_path, fake_mount)
    with pytest.raises(ValueError):
        cgs.path(bad)
    with caplog.at_level(logging.WARNING, logger="arcbox_vm.vmm.cgroup"):
        assert cgs.sandbox(bad) is None  # a boot is never failed by it
    assert "cannot name a cgroup" in caplog.text


# ---------------------------------------------------------------- off mode

def assert_off(cgs: SandboxCgroups) -> None:
    assert not cgs.enabled and cgs.root is None
    assert cgs.sandbox("sb-1") is None and cgs.path("sb-1") is None and cgs.relative("sb-1") is None
    assert cgs.list() == [] and cgs.pids("sb-1") == [] and cgs.place("sb-1", 1) is False
    assert asyncio.run(cgs.kill("sb-1")) is True


def test_empty_parent_turns_it_off(tmp_path, fake_mount):
    cgs = open_fake(tmp_path, fake_mount, parent="")
    assert_off(cgs)
    assert not (fake_mount / "arcbox-vm").exists()


def test_off_without_a_cgroup2_mount(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="arcbox_vm.vmm.cgroup"):
        cgs = SandboxCgroups.open("arcbox-vm", "ab12", mountinfo=write_mountinfo(tmp_path))
    assert_off(cgs)
    assert len(caplog.records) == 1 and "no cgroup2 hierarchy is mounted" in caplog.text


def test_off_on_a_read_only_mount(tmp_path, fake_mount, caplog):
    info = write_mountinfo(tmp_path, mountinfo_line(fake_mount, opts="ro,relatime"))
    with caplog.at_level(logging.WARNING, logger="arcbox_vm.vmm.cgroup"):
        assert_off(SandboxCgroups.open("arcbox-vm", "ab12", mountinfo=info))
    assert "read-only" in caplog.text


def test_off_when_the_root_cannot_be_created(tmp_path, fake_mount, caplog):
    (fake_mount / "arcbox-vm").write_text("a file where the parent cgroup should be")
    with caplog.at_level(logging.WARNING, logger="arcbox_vm.vmm.cgroup"):
        assert_off(open_fake(tmp_path, fake_mount))
    assert len(caplog.records) == 1 and "cannot create" in caplog.text


def test_off_when_the_daemon_itself_runs_inside_the_root(tmp_path, fake_mount, caplog):
    with caplog.at_level(logging.WARNING, logger="arcbox_vm.vmm.cgroup"):
        assert_off(open_fake(tmp_path, fake_mount, own="/arcbox-vm/ab12/sb-x"))
    assert "the daemon itself runs inside" in caplog.text


def test_a_root_inside_the_daemons_cgroup_is_warned_about(tmp_path, fake_mount, caplog):
    with caplog.at_level(logging.WARNING, logger="arcbox_vm.vmm.cgroup"):
        cgs = open_fake(tmp_path, fake_mount, parent="svc/vms", own="/svc")
    assert cgs.enabled and "inside the daemon's own cgroup" in caplog.text


# ---------------------------------------------------------------- config and the jailer

def test_config_option_defaults_and_validation():
    assert VmmConfig().daemon.cgroup_parent == "arcbox-vm"
    assert VmmConfig.from_dict({"daemon": {"cgroup_parent": ""}}).daemon.cgroup_parent == ""
    assert VmmConfig.from_dict({"daemon": {"cgroup_parent": "/ops/vms/"}}).daemon.cgroup_parent == "ops/vms"
    for bad in ("/", "a/../b", "a b", "a//b"):
        with pytest.raises(ConfigError, match="daemon.cgroup_parent"):
            VmmConfig.from_dict({"daemon": {"cgroup_parent": bad}})


def test_the_jailer_joins_the_sandbox_cgroup_unless_it_sets_its_own():
    cfg = FirecrackerConfig(binary="/usr/bin/firecracker",
                            jailer=JailerConfig(binary="/usr/bin/jailer", uid=1, gid=1, chroot_base_dir="/srv/j"))
    layout = layout_for(cfg, Path("/run/arcbox-vm/w"))
    argv = jailer_argv(cfg, layout, join_cgroup="arcbox-vm/ab12/sb-1")
    i = argv.index("--cgroup-version")
    assert argv[i:i + 4] == ["--cgroup-version", "2", "--parent-cgroup", "arcbox-vm/ab12/sb-1"]
    assert argv.index("--cgroup-version") < argv.index("--")
    assert "--cgroup-version" not in jailer_argv(cfg, layout)
    assert not jailer_sets_cgroups(cfg)
    own = cfg.model_copy(update={"jailer": cfg.jailer.model_copy(update={"cgroups": ["cpu.max=1000 100000"]})})
    assert jailer_sets_cgroups(own)
    with pytest.raises(VmmError, match="sets its own cgroups"):
        jailer_argv(own, layout, join_cgroup="arcbox-vm/ab12/sb-1")


# ---------------------------------------------------------------- the real hierarchy

def cgroup2_line(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


@pytest.mark.parametrize("kill_file", [True, False], ids=["cgroup.kill", "sigkill-each"])
def test_real_cgroup_round_trip(kill_file, monkeypatch):
    assert os.geteuid() == 0, "the suite runs as root (VMs, TAPs); this test creates real cgroups"
    mount = find_cgroup2_mount()
    assert mount is not None, "no cgroup2 hierarchy in /proc/self/mountinfo: this machine must have one"
    parent = f"arcbox-vm-test-{secrets.token_hex(3)}"
    cgs = SandboxCgroups.open(parent, "ab12")
    assert cgs.enabled, f"cannot create cgroups under {mount.path}"
    if not kill_file:
        monkeypatch.setattr(cg, "_has_kill_file", lambda path: False)
    proc = subprocess.Popen(["sh", "-c", "read go; sleep 1000 & sleep 1000 & wait"], stdin=subprocess.PIPE,
                            start_new_session=True)
    try:
        handle = cgs.sandbox("sb-1")
        assert handle is not None and handle.place(proc.pid)
        assert cgroup2_line(proc.pid) == "/" + handle.relative
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        deadline = time.monotonic() + 10
        while len(handle.pids()) < 3 and time.monotonic() < deadline:  # its children are born inside
            time.sleep(0.02)
        assert len(handle.pids()) == 3 and proc.pid in handle.pids()
        assert cgs.list() == ["sb-1"]
        assert asyncio.run(handle.remove()) is True
        assert proc.wait(10) == -9, "everything in the cgroup was killed"
        assert not handle.path.exists() and not cgs.root.exists(), "the cgroup and the empty root are gone"
        # a pid that cannot be moved: warned, the new cgroup removed again
        assert cgs.place("sb-2", 2**22 + 12345) is False
        assert not (cgs.root / "sb-2").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for leftover in cgs.list():
            asyncio.run(cgs.kill(leftover))
        for p in (cgs.root, mount.path / parent):
            try:
                p.rmdir()
            except FileNotFoundError:
                pass
