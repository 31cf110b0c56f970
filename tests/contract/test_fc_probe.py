"""`firecracker_usable`: clear reasons, checked in order (binary, /dev/kvm, KVM ioctls, kvm_pvm)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
from fake_firecracker import FAKE_FIRECRACKER

from arcbox_vm.vmm.firecracker import firecracker_usable
from arcbox_vm.vmm.firecracker.probe import kernel_is_pvm_guest, kvm_usable


def test_reason_on_this_machine() -> None:
    """The default binary: here it does not exist, elsewhere the answer must still be explained."""
    ok, reason = firecracker_usable()
    assert reason
    if not Path("/usr/bin/firecracker").exists():
        assert not ok
        assert "/usr/bin/firecracker" in reason and "does not exist" in reason


def test_missing_binary_on_path() -> None:
    ok, reason = firecracker_usable("no-such-firecracker-binary")
    assert not ok and "was not found on PATH" in reason


def test_not_executable(tmp_path) -> None:
    f = tmp_path / "firecracker"
    f.write_text("#!/bin/sh\n")
    f.chmod(0o644)
    ok, reason = firecracker_usable(f)
    assert not ok and "not an executable" in reason


def test_binary_that_is_not_firecracker(tmp_path) -> None:
    f = tmp_path / "firecracker"
    f.write_text("#!/bin/sh\necho nope; exit 3\n")
    f.chmod(0o755)
    ok, reason = firecracker_usable(f)
    assert not ok and "--version' failed (exit 3)" in reason


def test_kvm_checks_with_a_working_binary(fake_env, tmp_path) -> None:
    ok, reason = firecracker_usable(FAKE_FIRECRACKER, kvm_device=tmp_path / "kvm")
    assert not ok and "does not exist: KVM is not available" in reason
    not_kvm = tmp_path / "notkvm"
    not_kvm.write_bytes(b"")
    ok, reason = firecracker_usable(FAKE_FIRECRACKER, kvm_device=not_kvm)
    assert not ok and "KVM_GET_API_VERSION" in reason


def test_kvm_on_this_machine(fake_env, tmp_path) -> None:
    dev_ok, dev_reason = kvm_usable()
    ok, reason = firecracker_usable(FAKE_FIRECRACKER)
    if not dev_ok:
        assert not ok and reason == dev_reason
    elif Path("/sys/module/kvm_pvm").exists():
        assert not ok and "kvm_pvm" in reason and "PVM-enabled guest kernel" in reason
    else:
        assert ok and "Firecracker v1.16.1" in reason


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="/dev/kvm is not usable read-write here")
def test_pvm_host_logic(fake_env, tmp_path) -> None:
    sysmod = tmp_path / "module"
    (sysmod / "kvm_pvm").mkdir(parents=True)
    ok, reason = firecracker_usable(FAKE_FIRECRACKER, sys_module_dir=sysmod)
    assert not ok and "kvm_pvm" in reason
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"ELF" + b"IKCFG_ST" + gzip.compress(b"CONFIG_X86_64=y\n") + b"IKCFG_ED")
    ok, reason = firecracker_usable(FAKE_FIRECRACKER, kernel=kernel, sys_module_dir=sysmod)
    assert not ok and "is not PVM-enabled" in reason
    kernel.write_bytes(b"ELF" + b"IKCFG_ST" + gzip.compress(b"CONFIG_PVM_GUEST=y\nCONFIG_X86_PIE=y\n") + b"IKCFG_ED")
    ok, reason = firecracker_usable(FAKE_FIRECRACKER, kernel=kernel, sys_module_dir=sysmod)
    if kvm_usable()[0]:
        assert ok, reason
    ok, reason = firecracker_usable(FAKE_FIRECRACKER, sys_module_dir=tmp_path / "empty")
    assert ok == kvm_usable()[0]


def test_kernel_is_pvm_guest(tmp_path) -> None:
    k = tmp_path / "vmlinux"
    k.write_bytes(b"no config here")
    assert kernel_is_pvm_guest(k) is None
    (tmp_path / "vmlinux.config").write_text("CONFIG_PVM_GUEST=y\n")
    assert kernel_is_pvm_guest(k) is True
    (tmp_path / "vmlinux.config").write_text("# CONFIG_PVM_GUEST is not set\n")
    assert kernel_is_pvm_guest(k) is False
