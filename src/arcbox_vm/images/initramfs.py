"""The initramfs: static busybox, the virtio modules (in dependency order) and `/init`.

Debian's cloud kernel has virtio, virtio_blk, virtio_console, virtio_net and vsock as modules,
so something has to load them before the root disk can be mounted; this is that something.
The load order comes from `modules.dep` (made with `depmod -b`, the .deb ships none).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import subprocess
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from arcbox_vm.errors import ImageError
from arcbox_vm.images import cpio, tools
from arcbox_vm.images.kernel import ExtractedKernel

# What the guest needs: virtio core + the MMIO (microvm, Firecracker) and PCI (q35) transports,
# block, console (virtio-serial), net, vsock. Dependencies are added and ordered automatically.
MODULES: tuple[str, ...] = (
    "virtio_ring", "virtio", "virtio_mmio",
    "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
    "virtio_blk", "virtio_console",
    "failover", "net_failover", "virtio_net",
    "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
)

# busybox applets /init uses (plus a few for debugging with init=/bin/sh)
APPLETS: tuple[str, ...] = (
    "sh", "mount", "umount", "insmod", "cat", "echo", "sleep", "switch_root", "reboot", "poweroff",
    "findfs", "mkdir", "ls", "dmesg", "ip",
)

LOAD_ORDER_FILE = "lib/modules/load-order"
_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


def init_script() -> bytes:
    """The `/init` shell script (shipped as package data)."""
    return resources.files("arcbox_vm.images").joinpath("assets/init").read_bytes()


def recipe_digest() -> str:
    """Hash of everything that defines the initramfs apart from the kernel and busybox."""
    h = hashlib.sha256(init_script())
    h.update("\0".join(MODULES).encode() + b"\0" + "\0".join(APPLETS).encode())
    return h.hexdigest()


def module_name(path: str) -> str:
    """`kernel/drivers/block/virtio_blk.ko.xz` -> `virtio_blk` (dashes normalised to underscores)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    path: str  # relative to the module directory
    deps: tuple[str, ...]


def parse_modules_dep(text: str) -> dict[str, ModuleInfo]:
    table: dict[str, ModuleInfo] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        path = path.strip()
        name = module_name(path)
        table[name] = ModuleInfo(name, path, tuple(module_name(d) for d in rest.split()))
    return table


def parse_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def load_order(wanted: tuple[str, ...] | list[str], table: dict[str, ModuleInfo],
               builtin: set[str] = frozenset()) -> list[ModuleInfo]:  # type: ignore[assignment]
    """Modules to insmod, dependencies first; built-in ones are left out, unknown ones are an error."""
    order: list[ModuleInfo] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise ImageError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in table:
            if name in builtin:
                done.add(name)
                return
            raise ImageError(f"kernel module {name!r} is neither in modules.dep nor built in")
        for dep in table[name].deps:
            visit(dep, chain + (name,))
        done.add(name)
        order.append(table[name])

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def run_depmod(kernel: ExtractedKernel) -> Path:
    """`depmod -b` on the unpacked kernel; returns the path of the generated modules.dep."""
    depmod = tools.require("depmod", "to compute the kernel module load order")
    base = kernel.root
    if kernel.modules_dir != base / "lib" / "modules" / kernel.release:
        # depmod -b BASE looks in BASE/lib/modules/RELEASE; point a private base at the tree
        base = kernel.root / ".depmod-base"
        (base / "lib" / "modules").mkdir(parents=True, exist_ok=True)
        link = base / "lib" / "modules" / kernel.release
        if not link.exists():
            link.symlink_to(kernel.modules_dir.resolve())
    res = subprocess.run([depmod, "-b", str(base), kernel.release], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=False)
    dep = kernel.modules_dir / "modules.dep"
    if res.returncode != 0 or not dep.is_file():
        raise ImageError(f"depmod -b failed (exit {res.returncode}): {res.stderr.strip()}")
    return dep


def module_bytes(path: Path) -> bytes:
    """A module's uncompressed contents (busybox insmod loads only plain .ko files)."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    if name.endswith(".ko.zst"):
        zstd = tools.require("zstd", "the kernel ships zstd-compressed modules")
        res = subprocess.run([zstd, "-dc"], input=data, capture_output=True, check=False)
        if res.returncode != 0:
            raise ImageError(f"zstd -dc {name} failed: {res.stderr.decode(errors='replace').strip()}")
        return res.stdout
    return data


@dataclass(frozen=True)
class InitramfsInfo:
    modules: tuple[str, ...]  # in load order
    size: int


def build_initramfs(kernel: ExtractedKernel, out: Path, busybox: str | None = None,
                    modules: tuple[str, ...] = MODULES) -> InitramfsInfo:
    """Write the initramfs (uncompressed newc cpio) for `kernel` to `out`."""
    busybox = busybox or tools.static_busybox()
    dep = run_depmod(kernel)
    builtin_file = kernel.modules_dir / "modules.builtin"
    builtin = parse_builtin(builtin_file.read_text()) if builtin_file.is_file() else set()
    order = load_order(modules, parse_modules_dep(dep.read_text()), builtin)

    entries = [cpio.directory(d) for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules")]
    entries += [cpio.chardev("dev/console", 5, 1), cpio.chardev("dev/null", 1, 3, 0o666)]
    entries.append(cpio.file("init", init_script(), 0o755))
    entries.append(cpio.file("bin/busybox", Path(busybox).read_bytes(), 0o755))
    entries += [cpio.symlink(f"bin/{a}", "busybox") for a in APPLETS]
    names = []
    for m in order:
        fname = f"{m.name}.ko"
        entries.append(cpio.file(f"lib/modules/{fname}", module_bytes(kernel.modules_dir / m.path)))
        names.append(fname)
    entries.append(cpio.file(LOAD_ORDER_FILE, ("\n".join(names) + "\n").encode()))
    tmp = out.with_name(out.name + ".part")
    size = cpio.write_newc(entries, tmp)
    os.replace(tmp, out)
    return InitramfsInfo(modules=tuple(m.name for m in order), size=size)
