"""Confining QEMU (`[qemu] sandbox`, vmm/qemu/confine.py) without booting a VM: a host
that cannot confine it fails the boot with a message saying how to fix it — never an
unconfined QEMU; the access a confined QEMU needs (kernel/initrd modes, directories above
its socket, /dev/kvm); the socket directory given to its group and taken back; an agent
listener gives its socket its directory's group (a restarted daemon's too)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from arcbox_vm.agent.host import AgentListener
from arcbox_vm.config.qemu import QemuConfig
from arcbox_vm.errors import VmmError
from arcbox_vm.ports import AgentEndpoint, MachineSpec
from arcbox_vm.vmm.qemu import confine
from arcbox_vm.vmm.qemu.driver import QemuDriver
from arcbox_vm.vmm.users import VmmUsers


def spec(d: Path, **kw) -> MachineSpec:
    (d / "k").write_bytes(b"kernel")
    (d / "rootfs.ext4").write_bytes(b"\0" * 4096)
    base = {"sandbox_id": "sb1", "workdir": d, "kernel": d / "k", "rootfs": d / "rootfs.ext4", "boot_args": "",
            "vcpus": 1, "memory_mib": 128}
    base.update(kw)
    return MachineSpec(**base)


def fake_qemu(d: Path, script: str) -> str:
    path = d / "qemu"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def driver(tmp_path: Path, binary: str, **kw) -> QemuDriver:
    return QemuDriver(QemuConfig(binary=binary, accel="tcg", **kw), users=VmmUsers(5000, 5009, tmp_path / "claims"))


def test_a_daemon_that_is_not_root_cannot_confine_qemu(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    d = driver(tmp_path, fake_qemu(tmp_path, "exit 0\n"))
    ep = d.agent_endpoint(tmp_path)
    with pytest.raises(VmmError, match=r"only a root daemon.*uid 1000.*\[qemu\] sandbox = false"):
        asyncio.run(d.launch(spec(tmp_path), ep))
    assert not (tmp_path / "claims").exists(), "nothing was claimed"


def test_a_qemu_without_seccomp_is_refused_not_run_unconfined(tmp_path):
    binary = fake_qemu(tmp_path, 'echo "-sandbox is not supported by this QEMU binary" >&2; exit 1\n')
    d = driver(tmp_path, binary)
    with pytest.raises(VmmError, match=r"cannot confine itself.*not supported by this QEMU binary.*sandbox = false"):
        asyncio.run(d.launch(spec(tmp_path), d.agent_endpoint(tmp_path)))
    assert not (tmp_path / "vmm.log").exists(), "QEMU was never started for the VM"


def test_the_seccomp_check_runs_once_per_binary(tmp_path):
    calls = tmp_path / "calls"
    d = driver(tmp_path, fake_qemu(tmp_path, f'echo "$*" >> {calls}\nexit 0\n'))

    async def twice() -> None:
        await d.check_sandbox(d.binary())
        await d.check_sandbox(d.binary())

    asyncio.run(twice())
    lines = calls.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,"
                                                   "resourcecontrol=deny") and lines[0].endswith("-device help")


def test_kvm_needs_a_group_or_world_accessible_device(tmp_path):
    dev = tmp_path / "kvm"
    dev.write_text("")
    assert confine.kvm_groups("tcg", dev) == ()
    dev.chmod(0o666)
    assert confine.kvm_groups("kvm", dev) == ()
    dev.chmod(0o660)
    assert confine.kvm_groups("kvm", dev) == (dev.stat().st_gid,), "the device's group, and no other"
    dev.chmod(0o600)
    with pytest.raises(VmmError, match=r"cannot open .*kvm \(mode 0600.*chmod 0660.*accel"):
        confine.kvm_groups("kvm", dev)
    assert confine.confinement(5001, "tcg") == confine.Confinement(uid=5001, gid=5001, groups=(), new_netns=True)


@pytest.fixture
def public_dir():
    """A directory every user may pass through (pytest's own tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="arcbox-t-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_access_checks_name_the_file_and_the_fix(public_dir):
    d = public_dir / "pub"
    d.mkdir()
    d.chmod(0o755)
    s = spec(d, initrd=d / "k")
    ep = AgentEndpoint(d / "sock" / "agent.sock", "")
    (d / "k").chmod(0o644)
    confine.check_access(5001, s, ep)
    (d / "k").chmod(0o600)
    with pytest.raises(VmmError, match=r"reads the kernel .*0600.*chmod a\+r"):
        confine.check_access(5001, s, ep)
    (d / "k").chmod(0o644)
    d.chmod(0o700)
    with pytest.raises(VmmError, match=rf"agent socket in {d}/sock, but {d} \(mode 0700\).*chmod o\+x {d}"):
        confine.check_access(5001, s, ep)
    os.chown(d, -1, 5001)
    d.chmod(0o710)
    confine.check_access(5001, s, ep)  # its group may pass


def test_the_socket_dir_is_given_to_the_vmms_group_and_taken_back(tmp_path):
    sockdir = tmp_path / "s"
    sockdir.mkdir(mode=0o700)
    sock = sockdir / "agent.sock"
    sock.write_text("")
    confine.give_socket(sockdir, sock, 5007)
    st = sockdir.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (os.getuid(), 5007, 0o710)
    assert (sock.stat().st_gid, stat.S_IMODE(sock.stat().st_mode)) == (5007, 0o660)
    confine.take_back(sockdir)
    st = sockdir.stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (os.getegid(), 0o700)
    confine.take_back(tmp_path / "gone")  # nothing to do


@pytest.mark.parametrize("group", [None, 5007], ids=["own-dir", "vmm-group-dir"])
def test_an_agent_listener_gives_its_socket_the_directorys_group(tmp_path, group):
    sockdir = tmp_path / "s"
    sockdir.mkdir(mode=0o700)
    if group is not None:
        os.chown(sockdir, -1, group)

    async def bind() -> os.stat_result:
        listener = AgentListener(sockdir / "agent.sock")
        await listener.start()
        try:
            return (sockdir / "agent.sock").stat()
        finally:
            await listener.close()

    st = asyncio.run(bind())
    if group is None:
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (os.getegid(), 0o600)
    else:  # a daemon restart binds again in a confined QEMU's directory: it can reconnect
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (group, 0o660)
