"""Can Firecracker run guests on this host? (`firecracker_usable`, used by "auto" VMM selection).

Checks, in order: the binary exists, is executable and answers `--version`; `/dev/kvm` opens
read-write; `KVM_GET_API_VERSION` is 12 and `KVM_CREATE_VM` succeeds; and KVM is not the
out-of-tree `kvm_pvm` module (which runs only PVM-enabled guest kernels) unless the guest
kernel given is PVM-enabled. Every "no" comes with the reason and what to do about it.
"""

from __future__ import annotations

import gzip
import mmap
import re
import subprocess
from pathlib import Path

from arcbox_vm.config.firecracker import DEFAULT_FIRECRACKER_BINARY
from arcbox_vm.vmm.kvm import KVM_API_VERSION, kvm_device_usable

_VERSION_RE = re.compile(r"Firecracker v?(\S+)")


def firecracker_usable(
    binary: Path | str = DEFAULT_FIRECRACKER_BINARY,
    *,
    kernel: Path | str | None = None,
    kvm_device: Path | str = "/dev/kvm",
    sys_module_dir: Path | str = "/sys/module",
    version_timeout: float = 5.0,
) -> tuple[bool, str]:
    """(usable, reason). `kernel`, if given, is the guest vmlinux (matters on PVM hosts)."""
    from arcbox_vm.errors import VmmError

    from .layout import resolve_binary  # local import: keep this module light

    try:
        path = resolve_binary(Path(binary), "firecracker")
    except VmmError as exc:
        return False, f"{exc} (Firecracker is not installed here; set firecracker.binary or use QEMU)"

    try:
        out = subprocess.run(
            [str(path), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=version_timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"'{path} --version' could not run: {exc}"
    text = (out.stdout + out.stderr).decode("utf-8", errors="replace").strip()
    match = _VERSION_RE.search(text)
    if out.returncode != 0 or match is None:
        return False, (
            f"'{path} --version' failed (exit {out.returncode}): {text[:200] or 'no output'}; "
            "this is not a working Firecracker binary for this host"
        )
    version = match.group(1)

    ok, reason = kvm_usable(kvm_device)
    if not ok:
        return False, reason

    pvm = Path(sys_module_dir) / "kvm_pvm"
    if pvm.exists():
        if kernel is None:
            return False, (
                f"KVM on this host comes from the out-of-tree kvm_pvm module ({pvm}); ordinary guest "
                "kernels do not run under it. A PVM-enabled guest kernel (CONFIG_PVM_GUEST=y) is "
                "required: pass it as kernel= to check it, or use QEMU"
            )
        verdict = kernel_is_pvm_guest(Path(kernel))
        if verdict is not True:
            why = "is not PVM-enabled" if verdict is False else "could not be confirmed as PVM-enabled"
            return False, (
                f"KVM on this host comes from the out-of-tree kvm_pvm module ({pvm}) and the guest "
                f"kernel {kernel} {why} (needs CONFIG_PVM_GUEST=y, e.g. an embedded IKCONFIG or a "
                "'<kernel>.config' next to it); use a PVM guest kernel or QEMU"
            )
    return True, f"Firecracker v{version} at {path}; {kvm_device} usable (KVM API {KVM_API_VERSION})"


def kvm_usable(kvm_device: Path | str = "/dev/kvm") -> tuple[bool, str]:
    """Open /dev/kvm read-write, check the API version and create (then drop) a VM."""
    return kvm_device_usable(kvm_device)


def kernel_is_pvm_guest(kernel: Path) -> bool | None:
    """True/False from the kernel's embedded config (IKCONFIG) or a config file beside it; None if unknown."""
    config = _embedded_config(kernel)
    if config is None:
        for candidate in (
            kernel.with_name(kernel.name + ".config"),
            kernel.with_suffix(".config"),
            kernel.parent / "config",
        ):
            try:
                config = candidate.read_bytes()
                break
            except OSError:
                continue
    if config is None:
        return None
    return re.search(rb"^CONFIG_PVM_GUEST=y$", config, re.MULTILINE) is not None


def _embedded_config(kernel: Path) -> bytes | None:
    try:
        with open(kernel, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            start = m.find(b"IKCFG_ST")
            if start < 0:
                return None
            end = m.find(b"IKCFG_ED", start)
            if end < 0:
                return None
            return gzip.decompress(m[start + 8 : end])
    except (OSError, ValueError, EOFError):
        return None
