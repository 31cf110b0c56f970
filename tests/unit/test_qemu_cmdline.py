"""QEMU command line and kernel arguments (pure functions)."""

from __future__ import annotations

from pathlib import Path

from arcbox_vm.ports import AgentEndpoint, MachineSpec
from arcbox_vm.vmm.qemu.cmdline import kernel_cmdline, qemu_argv
from arcbox_vm.config.qemu import QemuConfig
from arcbox_vm.vmm.qemu.driver import QemuDriver


def spec(**kw) -> MachineSpec:
    base = dict(sandbox_id="sb1", workdir=Path("/w"), kernel=Path("/k"), rootfs=Path("/w/rootfs.ext4"),
                boot_args="console=ttyS0 init=/sbin/vm-agent", initrd=Path("/i"), vcpus=1,
                memory_mib=256)
    base.update(kw)
    return MachineSpec(**base)


EP = AgentEndpoint(Path("/w/agent.sock"), "arcbox.channel=serial:arcbox.agent.0")


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
    argv = qemu_argv(spec(), EP, "tcg", QemuConfig(), Path("/w/console.log"))
    joined = " ".join(argv)
    assert "-no-reboot" in argv
    assert "socket,id=agent,path=/w/agent.sock,reconnect=1" in argv
    assert "server" not in joined  # we listen, QEMU connects
    assert "virtserialport,chardev=agent,name=arcbox.agent.0" in argv
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=64"
    assert argv[argv.index("-serial") + 1] == "chardev:console"
    assert "file,id=console,path=/w/console.log,append=on" in argv, "O_APPEND: the manager truncates it to cap it"
    assert argv[argv.index("-initrd") + 1] == "/i"
    assert "-netdev" not in argv


def test_tap_and_q35():
    argv = qemu_argv(spec(tap_name="tap0", guest_mac="06:00:ac:10:00:02"), EP, "kvm",
                     QemuConfig(machine="q35"), Path("/c"))
    assert "tap,id=net0,ifname=tap0,script=no,downscript=no" in argv
    assert "virtio-net-pci,netdev=net0,mac=06:00:ac:10:00:02" in argv
    assert argv[argv.index("-cpu") + 1] == "host"


def test_driver_picks_bzimage_and_probes_accel():
    d = QemuDriver(QemuConfig(accel="tcg"))
    assert d.kernel_for(Path("/bz"), Path("/elf")) == Path("/bz")
    assert d.accel() == "tcg"
    assert d.agent_endpoint(Path("/w")).listen_path == Path("/w/agent.sock")
