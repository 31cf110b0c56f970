"""Unit tests for the guest image builder (no network, no VM).

ext4 tests use mke2fs/debugfs from e2fsprogs on tiny images made with `mke2fs -d`.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from arcbox_vm.agent import bundle
from arcbox_vm.errors import ImageError, MissingToolError
from arcbox_vm.images import apt, builder, cache, cpio, guestpath, initramfs, inject, kernel, rootfs, tools
from arcbox_vm.images.apt import AptPackage

PKG = AptPackage(name="linux-image-6.1.0-56-cloud-amd64", version="6.1.192-2", arch="amd64")

needs_e2fsprogs = pytest.mark.skipif(not (tools.find("mke2fs") and tools.find("debugfs")),
                                     reason="e2fsprogs (mke2fs, debugfs) not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (file ownership)")


# ---- helpers --------------------------------------------------------------------------------

def make_ext4(tmp_path: Path, build_tree, name: str = "img.ext4", size: str = "16M") -> Path:
    tree = tmp_path / f"tree-{name}"
    tree.mkdir()
    build_tree(tree)
    img = tmp_path / name
    subprocess.run([tools.require("mke2fs"), "-q", "-F", "-t", "ext4", "-d", str(tree), str(img), size],
                   check=True, capture_output=True)
    return img


def debian_like_tree(tree: Path, python: bool = True) -> None:
    """Merged /usr like a Debian root: /sbin -> usr/sbin, /lib -> usr/lib."""
    for d in ("usr/bin", "usr/sbin", "usr/lib", "etc"):
        (tree / d).mkdir(parents=True)
    (tree / "sbin").symlink_to("usr/sbin")
    (tree / "bin").symlink_to("usr/bin")
    (tree / "lib").symlink_to("usr/lib")
    if python:
        (tree / "usr/bin/python3.11").write_bytes(b"\x7fELF fake python")
        (tree / "usr/bin/python3").symlink_to("python3.11")


def debugfs_cat(img: Path, path: str) -> bytes:
    return subprocess.run([tools.require("debugfs"), "-R", f"cat {path}", str(img)], check=True,
                          capture_output=True).stdout


def debugfs_mode(img: Path, path: str) -> int:
    out = subprocess.run([tools.require("debugfs"), "-R", f"stat {path}", str(img)], check=True,
                         capture_output=True, text=True).stdout
    return int(re.search(r"Mode:\s+(\d+)", out).group(1), 8)


def fsck_clean(img: Path) -> bool:
    return subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True,
                          env=dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")).returncode == 0


@pytest.fixture
def no_tools(monkeypatch, tmp_path):
    """A $PATH with nothing on it (and no fallback directories)."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(tools, "EXTRA_DIRS", ())
    monkeypatch.setattr(tools, "BUSYBOX_PATHS", ())
    return empty


# ---- tools ------------------------------------------------------------------------------------

def test_missing_tool_names_tool_and_package(no_tools):
    for tool, package in [("mmdebstrap", "mmdebstrap"), ("mke2fs", "e2fsprogs"), ("debugfs", "e2fsprogs"),
                          ("lz4", "lz4"), ("depmod", "kmod"), ("dpkg", "dpkg"), ("apt-get", "apt")]:
        with pytest.raises(MissingToolError) as ei:
            tools.require(tool)
        assert ei.value.tool == tool and ei.value.package == package
        assert f"apt-get install -y {package}" in str(ei.value)


def test_missing_static_busybox(no_tools):
    with pytest.raises(MissingToolError) as ei:
        tools.static_busybox()
    assert ei.value.package == "busybox-static"


def test_found_tool_is_absolute(monkeypatch, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "lz4").write_text("#!/bin/sh\n")
    (fake / "lz4").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    monkeypatch.setattr(tools, "EXTRA_DIRS", ())
    assert tools.require("lz4") == str(fake / "lz4")


def _elf(interp: bool) -> bytes:
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    ptype = 3 if interp else 1
    return header + struct.pack("<IIQQQQQQ", ptype, 0, 0, 0, 0, 0, 0, 0)


def test_static_elf_detection(tmp_path):
    (tmp_path / "static").write_bytes(_elf(False))
    (tmp_path / "dynamic").write_bytes(_elf(True))
    (tmp_path / "script").write_text("#!/bin/sh\n")
    assert tools.is_static_elf(tmp_path / "static")
    assert not tools.is_static_elf(tmp_path / "dynamic")
    assert not tools.is_static_elf(tmp_path / "script")


# ---- apt --------------------------------------------------------------------------------------

def test_concrete_kernel_dependency():
    dep = apt.concrete_kernel_dependency("linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)", "linux-image-cloud-amd64")
    assert dep == ("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")
    dep = apt.concrete_kernel_dependency("initramfs-tools | linux-initramfs-tool, linux-image-6.12.9-cloud-amd64",
                                         "linux-image-cloud-amd64")
    assert dep == ("linux-image-6.12.9-cloud-amd64", None)
    assert apt.concrete_kernel_dependency("libc6 (>= 2.34)", "linux-image-cloud-amd64") is None


def test_deb_filename_encodes_epoch():
    assert AptPackage("foo", "1:2.0-1", "amd64").deb_filename == "foo_1%3a2.0-1_amd64.deb"


def test_download_failure_reports_apt_stderr(monkeypatch, tmp_path):
    monkeypatch.setattr(tools, "require", lambda tool, why="": f"/usr/bin/{tool}")
    failed = subprocess.CompletedProcess([], 100, "", "E: Failed to fetch http://mirror/x.deb  404  Not Found")
    monkeypatch.setattr(apt, "_run", lambda *a, **k: failed)
    with pytest.raises(ImageError) as ei:
        apt.download(PKG, tmp_path / "debs")
    assert "apt-get download linux-image-6.1.0-56-cloud-amd64=6.1.192-2 failed" in str(ei.value)
    assert "404  Not Found" in str(ei.value)


def test_resolve_unknown_meta_package_is_clear(monkeypatch):
    monkeypatch.setattr(apt, "apt_show", lambda name: None)
    with pytest.raises(ImageError, match="apt-get update"):
        apt.resolve_kernel_package(allow_update=False)


def test_parse_sources_both_formats():
    deb822 = """Types: deb deb-src
# comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://other.example/x
Suites: nodistro
Components: main
Enabled: no
"""
    entries = apt.parse_sources(deb822, deb822=True)
    assert entries == [apt.SourceEntry("http://mirror.example/debian", ("bookworm", "bookworm-updates"),
                                       ("main", "contrib"))]
    one_line = "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n# deb http://x y z\n"
    assert apt.parse_sources(one_line, deb822=False) == [
        apt.SourceEntry("http://m.example/debian", ("bookworm",), ("main",))]


def _fake_etc(tmp_path: Path, codename: str, os_id: str = "debian") -> tuple[Path, Path]:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(
        f"Types: deb\nURIs: http://mirror.example/debian\nSuites: {codename} {codename}-updates\nComponents: main\n\n"
        f"Types: deb\nURIs: http://mirror.example/debian-security\nSuites: {codename}-security\nComponents: main\n")
    (etc / "sources.list.d" / "vendor.list").write_text(f"deb http://vendor.example/apt cloud-sdk-{codename} main\n")
    (etc / "sources.list.d" / "old.list.disabled").write_text(f"deb http://x.example {codename} main\n")
    osr = tmp_path / "os-release"
    osr.write_text(f'ID={os_id}\nVERSION_CODENAME={codename}\n')
    return etc, osr


def test_mmdebstrap_mirrors_same_suite_uses_host_sources_files(tmp_path):
    etc, osr = _fake_etc(tmp_path, "bookworm")
    assert apt.mmdebstrap_mirrors("bookworm", etc, osr) == [str(etc / "sources.list.d" / "debian.sources")]


def test_mmdebstrap_mirrors_other_debian_release_rewrites_suite(tmp_path):
    etc, osr = _fake_etc(tmp_path, "trixie")
    assert apt.mmdebstrap_mirrors("bookworm", etc, osr) == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://mirror.example/debian-security bookworm-security main",
    ]


def test_mmdebstrap_mirrors_non_debian_host_uses_mmdebstrap_default(tmp_path):
    etc, osr = _fake_etc(tmp_path, "jammy", os_id="ubuntu")
    assert apt.mmdebstrap_mirrors("bookworm", etc, osr) == []


# ---- kernel -----------------------------------------------------------------------------------

def fake_bzimage(payload: bytes, size: int) -> bytes:
    """A minimal bzImage: setup header (boot protocol 2.15) + compressed payload + size trailer."""
    setup_sects = 1
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, 0x020F)
    offset = 16
    body = bytes(offset) + payload + struct.pack("<I", size)
    struct.pack_into("<II", head, 0x248, offset, len(payload) + 4)
    return bytes(head) + body + b"\0" * 100


FAKE_VMLINUX = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HH", 2, 0x3E) + os.urandom(4000)


def test_extract_vmlinux_gzip(tmp_path):
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(fake_bzimage(gzip.compress(FAKE_VMLINUX), len(FAKE_VMLINUX)))
    assert kernel.extract_vmlinux(bz, tmp_path / "vmlinux") == "gzip"
    assert (tmp_path / "vmlinux").read_bytes() == FAKE_VMLINUX


@pytest.mark.skipif(not tools.find("lz4"), reason="lz4 not installed")
def test_extract_vmlinux_lz4_legacy(tmp_path):
    raw = tmp_path / "raw"
    raw.write_bytes(FAKE_VMLINUX)
    subprocess.run([tools.require("lz4"), "-l", "-q", "-f", str(raw), str(tmp_path / "raw.lz4")], check=True)
    payload = (tmp_path / "raw.lz4").read_bytes()
    assert payload[:4] == b"\x02\x21\x4c\x18"
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(fake_bzimage(payload, len(FAKE_VMLINUX)))
    assert kernel.extract_vmlinux(bz, tmp_path / "vmlinux") == "lz4"
    assert (tmp_path / "vmlinux").read_bytes() == FAKE_VMLINUX


def test_extract_vmlinux_rejects_non_elf_and_wrong_size(tmp_path):
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(fake_bzimage(gzip.compress(b"not an elf" * 100), 1000))
    with pytest.raises(ImageError, match="not an x86-64 ELF"):
        kernel.extract_vmlinux(bz, tmp_path / "vmlinux")
    bz.write_bytes(fake_bzimage(gzip.compress(FAKE_VMLINUX), len(FAKE_VMLINUX) + 1))
    with pytest.raises(ImageError, match="header says"):
        kernel.extract_vmlinux(bz, tmp_path / "vmlinux")
    assert not (tmp_path / "vmlinux").exists()


def test_release_from_package():
    assert kernel.release_from_package("linux-image-6.1.0-56-cloud-amd64") == "6.1.0-56-cloud-amd64"
    with pytest.raises(ImageError):
        kernel.release_from_package("linux-headers-6.1")


# ---- initramfs --------------------------------------------------------------------------------

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko \
kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
""".replace("\\\n", "")


def test_module_load_order_puts_dependencies_first():
    table = initramfs.parse_modules_dep(MODULES_DEP)
    assert table["virtio_blk"].path == "kernel/drivers/block/virtio_blk.ko.xz"
    order = [m.name for m in initramfs.load_order(initramfs.MODULES, table)]
    assert sorted(order) == sorted(initramfs.MODULES)
    for m in order:
        for dep in table[m].deps:
            assert order.index(dep) < order.index(m), (dep, m)
    assert order[:2] == ["virtio", "virtio_ring"]  # virtio_ring needs virtio in this table


def test_module_load_order_skips_builtin_and_rejects_unknown():
    table = initramfs.parse_modules_dep(MODULES_DEP)
    del table["virtio_mmio"]
    order = [m.name for m in initramfs.load_order(["virtio_mmio", "virtio_blk"], table, {"virtio_mmio"})]
    assert order == ["virtio", "virtio_ring", "virtio_blk"]
    with pytest.raises(ImageError, match="virtio_mmio"):
        initramfs.load_order(["virtio_mmio"], table, set())


def test_module_dependency_cycle_is_an_error():
    table = initramfs.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(ImageError, match="cycle"):
        initramfs.load_order(["a"], table)


def test_compressed_modules_are_decompressed(tmp_path):
    import lzma

    (tmp_path / "m.ko.xz").write_bytes(lzma.compress(b"module-bytes"))
    (tmp_path / "n.ko.gz").write_bytes(gzip.compress(b"gz-module"))
    (tmp_path / "o.ko").write_bytes(b"plain")
    assert initramfs.module_bytes(tmp_path / "m.ko.xz") == b"module-bytes"
    assert initramfs.module_bytes(tmp_path / "n.ko.gz") == b"gz-module"
    assert initramfs.module_bytes(tmp_path / "o.ko") == b"plain"
    assert initramfs.module_name("kernel/net/vmw_vsock/vsock.ko.zst") == "vsock"
    assert initramfs.module_name("foo-bar.ko") == "foo_bar"


def test_init_script_contract():
    script = initramfs.init_script().decode()
    assert script.startswith("#!/bin/sh\n")
    assert "root=/dev/vda" in script and "init=/sbin/vm-agent" in script and "mode=rw" in script
    assert "ro) mode=ro" in script  # `ro` on the command line wins over the rw default
    assert "mount -t devtmpfs devtmpfs /dev" in script
    assert "mount --move /dev /newroot/dev" in script
    assert 'exec switch_root /newroot "$init"' in script
    assert "insmod" in script and "2>/dev/null" in script
    assert 'die "root device $root not found"' in script
    assert "reboot -f" in script  # failures end the VM (both VMMs exit on reboot)
    # no fixed sleeps: only the short poll for the root device
    assert [line.strip() for line in script.splitlines() if line.strip().startswith("sleep")] == ["sleep 0.05"]
    res = subprocess.run(["sh", "-n"], input=script.encode(), capture_output=True)
    assert res.returncode == 0, res.stderr


def test_init_script_parses_kernel_command_line(tmp_path):
    """Run the script's command-line parsing with a stub environment (everything before insmod)."""
    script = initramfs.init_script().decode()
    parse = script[script.index("root=/dev/vda"):script.index("# Modules in dependency order")]
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 reboot=k panic=1 init=/sbin/test-init root=/dev/vdb rw ro "
                       "rootflags=noatime arcbox.rootwait=3\n")
    prog = parse.replace("/proc/cmdline", str(cmdline)) + 'echo "$root|$init|$mode|$flags|$rootwait"\n'
    out = subprocess.run(["sh", "-c", "set -f\n" + prog], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "/dev/vdb|/sbin/test-init|ro|,noatime|3"
    cmdline.write_text("console=ttyS0 root=/dev/vda rw\n")
    out = subprocess.run(["sh", "-c", "set -f\n" + prog], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "/dev/vda|/sbin/vm-agent|rw||10"


def test_cpio_roundtrip(tmp_path):
    entries = [cpio.directory("bin"), cpio.directory("dev"), cpio.chardev("dev/console", 5, 1),
               cpio.file("init", b"#!/bin/sh\n", 0o755), cpio.symlink("bin/sh", "busybox"),
               cpio.file("bin/busybox", b"x" * 1001, 0o755)]
    out = tmp_path / "initrd.img"
    size = cpio.write_newc(entries, out)
    data = out.read_bytes()
    assert size == len(data) and size % 512 == 0
    parsed = {name: (mode, body, rdev) for name, mode, body, rdev in cpio.read_newc(data)}
    assert parsed["dev/console"] == (stat.S_IFCHR | 0o600, b"", (5, 1))
    assert parsed["init"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\n", (0, 0))
    assert parsed["bin/sh"][1] == b"busybox" and stat.S_ISLNK(parsed["bin/sh"][0])
    assert parsed["bin/busybox"][1] == b"x" * 1001
    if shutil.which("cpio"):
        listing = subprocess.run(["cpio", "-it"], input=data, capture_output=True, check=True).stdout.decode()
        assert listing.split() == ["bin", "dev", "dev/console", "init", "bin/sh", "bin/busybox"]
    cpio.write_newc(entries, out)
    assert out.read_bytes() == data  # reproducible


# ---- keys, cache, find/build ------------------------------------------------------------------

def test_image_key_is_stable_and_content_based(monkeypatch):
    inputs = builder.image_inputs(PKG)
    key = builder.image_key(inputs)
    assert key == builder.image_key(builder.image_inputs(PKG)) and len(key) == 20
    assert inputs["kernel"] == {"meta": "linux-image-cloud-amd64", "package": PKG.name, "version": PKG.version,
                                "arch": "amd64"}
    assert inputs["agent"] == bundle.agent_digest()
    newer = AptPackage(PKG.name, "6.1.192-3")
    assert builder.image_key(builder.image_inputs(newer)) != key
    assert builder.image_key(builder.image_inputs(PKG, free_space=2 << 30)) != key

    monkeypatch.setattr(builder, "agent_digest", lambda: "0" * 64)
    changed = builder.image_inputs(PKG)
    assert builder.image_key(changed) != key
    # a new agent changes neither the base rootfs nor the kernel part: only the cheap final step is redone
    assert changed["base"] == inputs["base"]
    assert builder.kernel_part_key(changed) == builder.kernel_part_key(inputs)


def test_initramfs_recipe_changes_with_init_script(monkeypatch):
    before = initramfs.recipe_digest()
    monkeypatch.setattr(initramfs, "init_script", lambda: b"#!/bin/sh\necho changed\n")
    assert initramfs.recipe_digest() != before


def test_base_key_depends_on_packages_and_suite_only():
    r = rootfs.base_recipe()
    assert r["suite"] == "bookworm" and "python3" in r["packages"] and r["variant"] == "minbase"
    assert rootfs.base_key(r) == rootfs.base_key(rootfs.base_recipe())
    assert rootfs.base_key(rootfs.base_recipe(packages=("python3",))) != rootfs.base_key(r)
    assert rootfs.base_key(rootfs.base_recipe(suite="trixie")) != rootfs.base_key(r)


def fake_image(ddir: Path, key: str, agent: str = "", created: str = "2026-01-01T00:00:00+00:00",
               complete: bool = True) -> Path:
    d = cache.images_dir(ddir) / key
    d.mkdir(parents=True)
    for name in cache.FILES.values():
        if complete or name != "rootfs.ext4":
            (d / name).write_bytes(b"x")
    (d / cache.MANIFEST).write_text(json.dumps({
        "key": key, "kernel_release": "6.1.0-56-cloud-amd64", "agent_digest": agent or bundle.agent_digest(),
        "builder_version": builder.BUILDER_VERSION, "created_at": created}))
    return d


def remember_kernel(ddir: Path, fingerprint: str = "fp") -> None:
    cache.write_json_atomic(cache.cache_dir(ddir) / builder.RESOLVED_KERNEL_FILE, {
        "meta": builder.KERNEL_META, "name": PKG.name, "version": PKG.version, "arch": PKG.arch,
        "apt_fingerprint": fingerprint})


def test_find_image_uses_remembered_kernel_and_never_runs_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    assert builder.find_image(tmp_path) is None
    remember_kernel(tmp_path)
    assert builder.find_image(tmp_path) is None
    key = builder.image_key(builder.image_inputs(PKG))
    fake_image(tmp_path, "0" * 20, created="2030-01-01T00:00:00+00:00")  # newer, but not the current key
    fake_image(tmp_path, key)
    img = builder.find_image(tmp_path)
    assert img is not None and img.key == key and img.kernel_release == "6.1.0-56-cloud-amd64"
    assert img.kernel == tmp_path / "images" / key / "vmlinuz" and img.rootfs.name == "rootfs.ext4"


def test_find_image_without_remembered_kernel_takes_newest_with_current_agent(tmp_path):
    fake_image(tmp_path, "a" * 20, created="2026-01-01T00:00:00+00:00")
    fake_image(tmp_path, "b" * 20, created="2026-02-01T00:00:00+00:00")
    fake_image(tmp_path, "c" * 20, created="2026-03-01T00:00:00+00:00", agent="f" * 64)  # other agent
    fake_image(tmp_path, "d" * 20, created="2026-04-01T00:00:00+00:00", complete=False)
    (cache.images_dir(tmp_path) / ".build-eeee-1").mkdir()
    img = builder.find_image(tmp_path)
    assert img is not None and img.key == "b" * 20


def test_cached_build_returns_at_once_without_tools(tmp_path, monkeypatch, no_tools):
    monkeypatch.setattr(apt, "lists_fingerprint", lambda *a, **k: "fp")
    remember_kernel(tmp_path, "fp")
    key = builder.image_key(builder.image_inputs(PKG))
    fake_image(tmp_path, key)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    t = time.monotonic()
    img = builder.build_image(tmp_path)
    assert time.monotonic() - t < 0.5
    assert img.key == key


def test_build_without_apt_names_the_missing_tool(tmp_path, monkeypatch, no_tools):
    with pytest.raises(MissingToolError) as ei:
        builder.build_image(tmp_path)
    assert (ei.value.tool, ei.value.package) == ("apt-cache", "apt")


def test_build_names_missing_mmdebstrap_before_doing_anything(tmp_path, monkeypatch, no_tools):
    for tool in ("apt-get", "dpkg", "depmod", "lz4", "mke2fs", "dumpe2fs", "tar"):
        (no_tools / tool).write_text("#!/bin/sh\nexit 1\n")
        (no_tools / tool).chmod(0o755)
    monkeypatch.setattr(tools, "static_busybox", lambda: "/bin/busybox")
    monkeypatch.setattr(apt, "lists_fingerprint", lambda *a, **k: "fp")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    remember_kernel(tmp_path, "fp")
    with pytest.raises(MissingToolError) as ei:
        builder.build_image(tmp_path)
    assert (ei.value.tool, ei.value.package) == ("mmdebstrap", "mmdebstrap")
    assert not cache.images_dir(tmp_path).exists()  # nothing started


def test_build_needs_root(tmp_path, monkeypatch):
    monkeypatch.setattr(apt, "lists_fingerprint", lambda *a, **k: "fp")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    remember_kernel(tmp_path, "fp")
    with pytest.raises(ImageError, match="needs root"):
        builder.build_image(tmp_path)


def test_publish_is_a_rename_and_prune_keeps_newest(tmp_path):
    work = cache.new_build_dir(tmp_path, "k1")
    for name in cache.FILES.values():
        (work / name).write_bytes(b"data")
    assert cache.load_image(work) is None  # a build dir never counts as an image
    cache.write_json_atomic(work / cache.MANIFEST, {"key": "k1", "kernel_release": "r", "created_at": "2026-05"})
    final = cache.images_dir(tmp_path) / "k1"
    cache.publish(work, final)
    assert not work.exists() and cache.load_image(final) is not None
    for i, created in enumerate(["2026-01", "2026-02", "2026-03"]):
        fake_image(tmp_path, f"old{i}", created=created)
    removed = cache.prune_images(tmp_path, keep=2, protect="old0")
    assert removed == ["old1"]
    assert sorted(p.name for p in cache.images_dir(tmp_path).iterdir() if not p.name.startswith(".")) == \
        ["k1", "old0", "old2"]


def test_remove_stale_builds(tmp_path):
    stale = cache.new_build_dir(tmp_path, "x")
    (stale / "rootfs.ext4").write_bytes(b"half")
    cache.remove_stale_builds(tmp_path)
    assert not stale.exists()


# ---- rootfs -----------------------------------------------------------------------------------

def test_mmdebstrap_command(monkeypatch):
    monkeypatch.setattr(tools, "require", lambda tool, why="": tool)
    cmd = rootfs.mmdebstrap_command(Path("/x/base.tar"), rootfs.base_recipe(), ["/etc/apt/sources.list.d/d.sources"])
    assert cmd[0] == "mmdebstrap" and "--variant=minbase" in cmd and "--mode=root" in cmd
    assert "--include=iproute2,iputils-ping,procps,python3" in cmd
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in cmd and "--dpkgopt=path-exclude=/usr/share/man/*" in cmd
    assert "--dpkgopt=path-exclude=/usr/share/locale/*" in cmd
    assert cmd[-3:] == ["bookworm", "/x/base.tar", "/etc/apt/sources.list.d/d.sources"]


def test_build_base_never_reads_stdin(monkeypatch, tmp_path):
    monkeypatch.setattr(tools, "require", lambda tool, why="": tool)
    monkeypatch.setattr(apt, "mmdebstrap_mirrors", lambda suite: ["/etc/apt/sources.list.d/debian.sources"])
    seen = {}

    def fake_run(cmd, **kw):
        seen.update(kw, cmd=cmd)
        Path(cmd[-2]).write_bytes(b"tar")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(rootfs.subprocess, "run", fake_run)
    out = tmp_path / "base-x.tar"
    assert rootfs.build_base(out, rootfs.base_recipe(), tmp_path / "tmp") == ["/etc/apt/sources.list.d/debian.sources"]
    assert seen["stdin"] is subprocess.DEVNULL
    assert seen["cmd"][-1] == "/etc/apt/sources.list.d/debian.sources"
    assert seen["env"]["TMPDIR"] == str(tmp_path / "tmp")
    assert out.read_bytes() == b"tar"


def test_build_base_failure_shows_mmdebstrap_output(monkeypatch, tmp_path):
    monkeypatch.setattr(tools, "require", lambda tool, why="": tool)
    monkeypatch.setattr(apt, "mmdebstrap_mirrors", lambda suite: [])
    monkeypatch.setattr(rootfs.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "E: apt-get update failed"))
    with pytest.raises(ImageError, match="apt-get update failed"):
        rootfs.build_base(tmp_path / "b.tar", rootfs.base_recipe(), tmp_path / "tmp")
    assert not (tmp_path / "b.tar").exists()


def base_tree(tree: Path) -> None:
    debian_like_tree(tree)
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tree / "etc/group").write_text("root:x:0:\n")
    (tree / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (tree / "etc/gshadow").write_text("root:*::\n")
    (tree / "etc/skel").mkdir()
    (tree / "etc/skel/.bashrc").write_text("# bashrc\n")
    (tree / "etc/resolv.conf").symlink_to("/run/systemd/resolve/stub-resolv.conf")
    (tree / "usr/bin/bash").write_bytes(b"not really bash")  # /bin/bash through the merged-/usr symlink


@needs_root
def test_populate_tree(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    base_tree(tree)
    rootfs.populate(tree)
    rootfs.populate(tree)  # idempotent
    files = bundle.agent_files()
    agent = tree / "usr/sbin/vm-agent"  # through the merged-/usr symlink, inside the tree
    assert agent.read_bytes() == files["/sbin/vm-agent"][0] and stat.S_IMODE(agent.stat().st_mode) == 0o755
    for guest, (data, mode) in files.items():
        real = tree / guest.lstrip("/")
        assert real.read_bytes() == data and stat.S_IMODE(real.stat().st_mode) == mode
    assert (tree / "etc/passwd").read_text().count("sandbox:x:1000:1000:") == 1
    assert "sandbox:x:1000:" in (tree / "etc/group").read_text()
    assert [ln.split(":")[:2] for ln in (tree / "etc/shadow").read_text().splitlines()[-2:]] == [["sandbox", "!"], ["user", "!"]]
    home = tree / "home/sandbox"
    assert (home.stat().st_uid, home.stat().st_gid) == (1000, 1000)
    assert (home / ".bashrc").read_text() == "# bashrc\n" and (home / ".bashrc").stat().st_uid == 1000
    assert (tree / "etc/passwd").read_text().count("user:x:1001:1001:arcbox user:/home/user:/bin/bash") == 1
    assert (tree / "home/user").stat().st_uid == 1001, "E2B's base image has a `user` account"
    assert (tree / "etc/hostname").read_text() == "arcbox\n"
    resolv = tree / "etc/resolv.conf"
    assert not resolv.is_symlink() and resolv.read_bytes() == b""


@needs_root
def test_writes_never_escape_the_tree_through_absolute_symlinks(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "usr/lib2").mkdir(parents=True)
    (tree / "usr/lib").symlink_to("/usr/lib2")  # absolute: must mean <tree>/usr/lib2
    rootfs.write_file(tree, "/usr/lib/arcbox-test/x.py", b"hi")
    assert (tree / "usr/lib2/arcbox-test/x.py").read_bytes() == b"hi"
    assert not Path("/usr/lib2/arcbox-test").exists()


def test_guestpath_resolution():
    fs = {"/sbin": ("symlink", "usr/sbin"), "/usr": ("dir", ""), "/usr/sbin": ("dir", ""),
          "/usr/bin": ("dir", ""), "/usr/bin/python3": ("symlink", "python3.11"),
          "/usr/bin/python3.11": ("file", ""), "/loop": ("symlink", "/loop"), "/etc": ("file", "")}
    lookup = fs.get
    assert guestpath.resolve_dir("/sbin", lookup) == (["usr", "sbin"], [])
    assert guestpath.resolve_dir("/usr/lib/arcbox-vm-agent/x", lookup) == (["usr"], ["lib", "arcbox-vm-agent", "x"])
    assert guestpath.resolve_file("/usr/bin/python3", lookup) == "/usr/bin/python3.11"
    assert guestpath.resolve_file("/usr/bin/python4", lookup) is None
    with pytest.raises(ImageError, match="symbolic links"):
        guestpath.resolve_dir("/loop/x", lookup)
    with pytest.raises(ImageError, match="not a directory"):
        guestpath.resolve_dir("/etc/x", lookup)


@needs_e2fsprogs
def test_make_ext4_has_requested_free_space(tmp_path):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("arcbox\n")
    (tree / "big").write_bytes(os.urandom(3 << 20))
    img = tmp_path / "rootfs.ext4"
    size, free = rootfs.make_ext4(tree, img, free_space=64 << 20)
    assert free >= 62 << 20 and size == img.stat().st_size
    assert img.stat().st_blocks * 512 < size  # sparse
    assert debugfs_cat(img, "/etc/hostname") == b"arcbox\n"
    label = subprocess.run([tools.require("dumpe2fs"), "-h", str(img)], capture_output=True, text=True).stdout
    assert "Filesystem volume name:   arcbox-root" in label


# ---- inject -----------------------------------------------------------------------------------

@needs_e2fsprogs
def test_inject_agent_into_merged_usr_image_is_idempotent(tmp_path):
    def tree(t: Path) -> None:
        debian_like_tree(t)
        (t / "usr/sbin/vm-agent").write_text("#!/bin/sh\nold agent\n")  # replaced
    img = make_ext4(tmp_path, tree)
    files = bundle.agent_files()
    for _ in range(2):
        assert inject.inject_agent(img) == []
        assert debugfs_cat(img, "/sbin/vm-agent") == files["/sbin/vm-agent"][0]
        assert debugfs_mode(img, "/usr/sbin/vm-agent") == 0o755
        for guest, (data, mode) in files.items():
            assert debugfs_cat(img, guest) == data
            assert debugfs_mode(img, guest) & 0o7777 == mode
        assert fsck_clean(img)
    # /sbin is still the merged-/usr symlink
    out = subprocess.run([tools.require("debugfs"), "-R", "stat /sbin", str(img)], capture_output=True, text=True)
    assert "Type: symlink" in out.stdout


@needs_e2fsprogs
def test_inject_into_plain_image_creates_directories(tmp_path):
    img = make_ext4(tmp_path, lambda t: (t / "etc").mkdir())
    warnings = inject.inject_agent(img)
    assert len(warnings) == 1 and "/usr/bin/python3" in warnings[0]
    assert debugfs_cat(img, "/sbin/vm-agent").startswith(b"#!/usr/bin/python3 -S")
    assert debugfs_cat(img, "/usr/lib/arcbox-vm-agent/arcbox_vm/__init__.py") == b""
    assert fsck_clean(img)


@needs_e2fsprogs
def test_inject_follows_absolute_symlinks_inside_the_image(tmp_path):
    def tree(t: Path) -> None:
        debian_like_tree(t)
        (t / "usr/lib").rmdir()
        (t / "opt/lib").mkdir(parents=True)
        (t / "usr/lib").symlink_to("/opt/lib")
    img = make_ext4(tmp_path, tree)
    inject.write_files(img, {"/usr/lib/arcbox-vm-agent/x.py": (b"x = 1\n", 0o644)})
    assert debugfs_cat(img, "/opt/lib/arcbox-vm-agent/x.py") == b"x = 1\n"


def test_inject_rejects_non_ext4(tmp_path):
    junk = tmp_path / "disk.img"
    junk.write_bytes(b"\0" * 510 + b"\x55\xaa" + b"\0" * 4096)
    with pytest.raises(ImageError, match="not an ext4 filesystem image.*partitioned"):
        inject.inject_agent(junk)
    with pytest.raises(ImageError, match="no such file"):
        inject.inject_agent(tmp_path / "missing.ext4")
    with pytest.raises(ImageError, match="not a regular file"):
        inject.inject_agent(tmp_path)


@needs_e2fsprogs
def test_inject_refuses_unclean_journal(tmp_path):
    img = make_ext4(tmp_path, debian_like_tree)
    with open(img, "r+b") as f:
        f.seek(1024 + 0x60)
        incompat, = struct.unpack("<I", f.read(4))
        f.seek(1024 + 0x60)
        f.write(struct.pack("<I", incompat | 0x4))
    with pytest.raises(ImageError, match="e2fsck"):
        inject.inject_agent(img)


def test_inject_without_debugfs_names_e2fsprogs(tmp_path, no_tools):
    img = tmp_path / "x.ext4"
    data = bytearray(4096)
    struct.pack_into("<H", data, 1024 + 0x38, inject.EXT_MAGIC)
    img.write_bytes(bytes(data))
    with pytest.raises(MissingToolError) as ei:
        inject.inject_agent(img)
    assert ei.value.package == "e2fsprogs"


# ---- CLI --------------------------------------------------------------------------------------

def test_cli_inject_agent_error_is_one_line_exit_1(tmp_path):
    from arcbox_vm.cli.image import image_app

    bad = tmp_path / "bad.ext4"
    bad.write_bytes(b"x" * 8192)
    res = CliRunner().invoke(image_app, ["inject-agent", str(bad)])
    assert res.exit_code == 1
    assert "error:" in res.output and "not an ext4 filesystem image" in res.output
    assert "Traceback" not in res.output


@needs_e2fsprogs
def test_cli_inject_agent_ok(tmp_path):
    from arcbox_vm.cli.image import image_app

    img = make_ext4(tmp_path, debian_like_tree)
    res = CliRunner().invoke(image_app, ["inject-agent", str(img)])
    assert res.exit_code == 0, res.output
    assert "agent injected into" in res.output


def test_cli_build_error_exit_1(tmp_path, no_tools):
    from arcbox_vm.cli.image import image_app

    res = CliRunner().invoke(image_app, ["build", "--data-dir", str(tmp_path)])
    assert res.exit_code == 1
    assert "apt-get install -y apt" in res.output and "Traceback" not in res.output


def test_cli_parse_size():
    from arcbox_vm.cli.image import parse_size

    assert parse_size("1G") == 1 << 30 and parse_size("512M") == 512 << 20 and parse_size("1.5GiB") == 3 << 29
    assert parse_size("4096") == 4096


@needs_e2fsprogs
def test_inject_refuses_an_image_locked_by_a_running_vm(tmp_path):
    """QEMU holds OFD locks on its disks; writing under a running guest would corrupt it."""
    import fcntl

    img = make_ext4(tmp_path, debian_like_tree)
    code = ("import fcntl, struct, sys, time\n"
            f"f = open({str(img)!r}, 'rb')\n"
            "fcntl.fcntl(f, fcntl.F_OFD_SETLK, struct.pack('@hhqqi4x', fcntl.F_RDLCK, 0, 100, 1, 0))\n"
            "print('locked', flush=True)\n"
            "time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert hasattr(fcntl, "F_OFD_GETLK")
        with pytest.raises(ImageError, match="in use"):
            inject.inject_agent(img)
    finally:
        holder.kill()
        holder.wait()
    assert inject.inject_agent(img) == []


def test_cached_image_stays_usable_when_apt_cannot_resolve(tmp_path, monkeypatch, no_tools):
    """apt lists changed (fingerprint differs) but apt is unusable: the remembered kernel is used."""
    monkeypatch.setattr(apt, "lists_fingerprint", lambda *a, **k: "new-fingerprint")
    remember_kernel(tmp_path, "old-fingerprint")
    key = builder.image_key(builder.image_inputs(PKG))
    fake_image(tmp_path, key)
    messages: list[str] = []
    img = builder.build_image(tmp_path, messages.append)
    assert img.key == key
    assert any("from the last build" in m for m in messages), messages
