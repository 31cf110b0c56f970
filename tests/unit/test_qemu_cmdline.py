"""QEMU command line and kernel arguments (pure functions): every file QEMU uses but its
agent socket is a descriptor we pass; `-sandbox` unless `[qemu] sandbox = false`."""

from __future__ import annotations

from pathlib import Path

from arcbox_vm.ports import AgentEndpoint, MachineSpec
from arcbox_vm.vmm.qemu.cmdline import PassedFiles, kernel_cmdline, qemu_argv
from arcbox_vm.config.qemu import SANDBOX_OPTIONS, QemuConfig
from arcbox_vm.vmm.qemu.driver import QemuDriver


def spec(**kw) -> MachineSpec:
    base = dict(sandbox_id="sb1", workdir=Path("/w"), kernel=Path("/k"), rootfs=Path("/w/rootfs.ext4"),
                boot_args="console=ttyS0 init=/sbin/vm-agent", initrd=Path("/i"), vcpus=1,
                memory_mib=256)
    base.update(kw)
    return MachineSpec(**base)


EP = AgentEndpoint(Path("/w/agent.sock"), "arcbox.channel=serial:arcbox.agent.0")
FILES = PassedFiles(kernel=10, disk_rw=11, disk_ro=12, console=13, initrd=14)


def test_tcg_gets_tsc_args_and_kvm_does_not():
    tcg = kernel_cmdline(spec(), EP, "tcg", QemuConfig())
    kvm = kernel_cmdline(spec(), EP, "kvm", QemuConfig())
    assert "tsc_early_khz=2000000 tsc=reliable" in tcg
    assert "tsc_early_khz" not in kvm
    for line in (tcg, kvm):
        assert line.startswith("console=ttyS0 init=/sbin/vm-agent")
        assert line.endswith("arcbox.channel=serial:arcbox.agent.0")
        assert "reboot=t" in line and "panic=-1" in line


def test_argv_has_agent_chardev_as_client_and_no_reboot():
    argv = qemu_argv(spec(), EP, "tcg", QemuConfig(), Path("/w/console.log"), FILES)
    joined = " ".join(argv)
    assert "-no-reboot" in argv
    assert "socket,id=agent,path=/w/agent.sock,reconnect=1" in argv
    assert "server" not in joined  # we listen, QEMU connects
    assert "virtserialport,chardev=agent,name=arcbox.agent.0" in argv
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=64"
    assert argv[argv.index("-serial") + 1] == "chardev:console"
    assert "file,id=console,path=/dev/fdset/2,append=on" in argv, "O_APPEND: the manager truncates it to cap it"
    assert "-netdev" not in argv


def test_files_are_descriptors_named_on_the_command_line():
    argv = qemu_argv(spec(rootfs=Path("/w,x/rootfs.ext4")), EP, "tcg", QemuConfig(), Path("/w/console.log"), FILES)
    add_fd = [argv[i + 1] for i, a in enumerate(argv) if a == "-add-fd"]
    assert add_fd == ["fd=11,set=1,opaque=/w,,x/rootfs.ext4", "fd=12,set=1,opaque=/w,,x/rootfs.ext4",
                      "fd=13,set=2,opaque=/w/console.log"], "the disk read-write and read-only; the console"
    drive = argv[argv.index("-drive") + 1]
    assert drive.startswith("id=root,file=/dev/fdset/1,format=raw,") and drive.endswith(",file.locking=off")
    assert argv[argv.index("-kernel") + 1] == "/proc/self/fd/10"
    assert argv[argv.index("-initrd") + 1] == "/proc/self/fd/14"
    assert FILES.all() == (10, 11, 12, 13, 14)
    assert "/w" in " ".join(argv), "the workdir is still on the command line (start-up finds leftovers by it)"


def test_sandbox_on_by_default_and_off_when_configured():
    on = qemu_argv(spec(), EP, "tcg", QemuConfig(), Path("/c"), FILES)
    assert on[on.index("-sandbox") + 1] == SANDBOX_OPTIONS == \
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    assert "-runas" not in on, "QEMU starts unprivileged: -runas dies under elevateprivileges=deny"
    assert "-sandbox" not in qemu_argv(spec(), EP, "tcg", QemuConfig(sandbox=False), Path("/c"), FILES)


def test_tap_and_q35():
    files = PassedFiles(kernel=3, disk_rw=4, disk_ro=5, console=6, tap=7)
    argv = qemu_argv(spec(tap_name="tap0", guest_mac="06:00:ac:10:00:02", initrd=None), EP, "kvm",
                     QemuConfig(machine="q35"), Path("/c"), files)
    assert "tap,id=net0,fd=7" in argv, "the TAP is a descriptor: QEMU never opens /dev/net/tun"
    assert "ifname" not in " ".join(argv) and "-initrd" not in argv
    assert "virtio-net-pci,netdev=net0,mac=06:00:ac:10:00:02" in argv
    assert argv[argv.index("-cpu") + 1] == "host"
    assert files.all() == (3, 4, 5, 6, 7)


def test_driver_picks_bzimage_and_probes_accel():
    d = QemuDriver(QemuConfig(accel="tcg"))
    assert d.kernel_for(Path("/bz"), Path("/elf")) == Path("/bz")
    assert d.accel() == "tcg"
    assert d.agent_endpoint(Path("/w")).listen_path == Path("/w/agent.sock")


def test_snapshot_options_memory_monitor_and_incoming():
    from arcbox_vm.vmm.qemu.cmdline import MemoryFile, fd_of, memory_from_argv

    files = PassedFiles(kernel=3, disk_rw=4, disk_ro=5, console=6, memory=8, qmp=9)
    argv = qemu_argv(spec(), EP, "tcg", QemuConfig(), Path("/c"), files, memory=MemoryFile(Path("/m/mem"), True),
                     incoming=True)
    assert argv[argv.index("-machine") + 1] == "microvm,memory-backend=ram"
    obj = argv[argv.index("-object") + 1]
    assert obj == "memory-backend-file,id=ram,size=256M,mem-path=/proc/self/fd/8,share=on,prealloc=off"
    assert "socket,id=qmp,fd=9,server=on,wait=off" in argv and "chardev=qmp,mode=control" in argv, \
        "the monitor listens on a socket we bound: QEMU writes nothing in the socket directory"
    assert argv[-2:] == ["-incoming", "defer"]
    found = memory_from_argv(argv)
    assert found == MemoryFile(Path("/proc/self/fd/8"), True) and fd_of(found.path) == 8
    assert fd_of(Path("/m/mem")) is None and memory_from_argv(argv[:10]) is None
    assert set(files.all()) == {3, 4, 5, 6, 8, 9}
