"""Imported images made bootable (images/oci_rootfs.py, images/runtime.py), their settings
sidecar (image_config.py) as sandbox defaults, and `arcbox-vm image import-oci`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from arcbox_vm.agent.bundle import GUEST_LIB_DIR, LAUNCHER_PATH
from arcbox_vm.cli.main import app
from arcbox_vm.errors import ImageError, InvalidArgument
from arcbox_vm.image_config import OciImageConfig, image_defaults, sidecar_path, write_image_defaults
from arcbox_vm.images import initramfs, runtime, tools
from arcbox_vm.images.oci_rootfs import build_rootfs_from_oci, prepare_tree, rootfs_from_dir
from arcbox_vm.manager.images import image_run_defaults, named_image_path
from tests.support.oci_archives import Entry, busybox_layer, docker_archive, oci_archive

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="images keep file owners: needs root")
CHROOT = "/usr/sbin/chroot"


def test_init_starts_the_runtime_as_runtime_py_says() -> None:
    script = initramfs.init_script().decode()
    assert runtime.PREFIX == "/.arcbox/runtime"
    assert runtime.LOADER == f"{runtime.PREFIX}/lib/ld-linux-x86-64.so.2"
    assert 'rt=/.arcbox/runtime' in script
    assert '"$rt/lib/ld-linux-x86-64.so.2" --library-path "$rt/lib" "$rt/bin/python3" -I -S "$init"' in script
    assert runtime.AGENT_ARGV[-3:] == ("-I", "-S", LAUNCHER_PATH)
    assert "PYTHONHOME" not in script and "LD_LIBRARY_PATH" not in script


def test_parse_ldd() -> None:
    out = ("\tlinux-vdso.so.1 (0x00007ffd)\n\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f12)\n"
           "\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f34)\n"
           "\t/lib64/ld-linux-x86-64.so.2 (0x00007f56)\n")
    libs, loader = runtime.parse_ldd(out)
    assert libs == {"libm.so.6": "/lib/x86_64-linux-gnu/libm.so.6", "libz.so.1": "/lib/x86_64-linux-gnu/libz.so.1"}
    assert loader == "/lib64/ld-linux-x86-64.so.2"


def test_excluded_modules() -> None:
    assert runtime._excluded("test/support/__init__.py")
    assert runtime._excluded("lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so")
    assert runtime._excluded("lib-dynload/_testcapi.cpython-311-x86_64-linux-gnu.so")
    assert runtime._excluded("pydoc.py")
    assert not runtime._excluded("lib-dynload/_ctypes.cpython-311-x86_64-linux-gnu.so")
    assert not runtime._excluded("json/__init__.py") and not runtime._excluded("selectors.py")


@root_only
def test_the_agent_runs_on_its_runtime_in_an_image_without_python(tmp_path: Path) -> None:
    """A busybox-only tree (no python3, no libc) + prepare_tree: the agent's modules import on
    the private runtime, started the way /init starts it, with an empty environment."""
    archive = docker_archive(tmp_path / "bb.tar", [busybox_layer(tools.static_busybox(), ("ls",))])
    from arcbox_vm.images.oci import unpack_oci_archive

    tree = tmp_path / "tree"
    unpack_oci_archive(archive, tree)
    assert not (tree / "usr/bin/python3").exists() and not (tree / "lib").exists()
    info = prepare_tree(tree)
    assert info.size < 40 << 20, f"the runtime is {info.size / 1e6:.1f} MB"
    for d in ("dev", "proc", "sys", "tmp", "run"):
        assert (tree / d).is_dir()
    assert (tree / LAUNCHER_PATH.lstrip("/")).is_file()
    pycs = list((tree / GUEST_LIB_DIR.lstrip("/") / "arcbox_vm/agent/guest/__pycache__").glob("*.pyc"))
    assert pycs, "the agent is byte-compiled for the runtime"
    code = ("import sys, os; sys.path.insert(0, %r); import arcbox_vm.agent.guest.main, ctypes, json, selectors;"
            "print(sys.prefix, sorted(os.environ))" % GUEST_LIB_DIR)
    res = subprocess.run([CHROOT, str(tree), *runtime.AGENT_ARGV[:-1], "-c", code], env={},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split(" ", 1) == [runtime.PREFIX, "[]\n"]


@root_only
def test_a_hostile_arcbox_dir_in_the_image_is_replaced(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = docker_archive(tmp_path / "x.tar", [[Entry(".arcbox", "symlink", link=str(outside)),
                                                   Entry("usr", "dir", mode=0o755),
                                                   Entry("usr/lib", "symlink", link=str(outside))]])
    from arcbox_vm.images.oci import unpack_oci_archive

    tree = tmp_path / "tree"
    unpack_oci_archive(archive, tree)
    prepare_tree(tree)
    assert list(outside.iterdir()) == [], "nothing was written through the image's symlinks"
    assert (tree / ".arcbox/runtime/bin/python3").is_file() and not (tree / ".arcbox").is_symlink()


@root_only
def test_build_rootfs_from_oci_and_the_sidecar(tmp_path: Path) -> None:
    archive = oci_archive(tmp_path / "bb.tar", [busybox_layer(tools.static_busybox(), ("ls",))],
                          env=["PATH=/bin", "X=1"], workdir="/srv/work", user="app")
    out = tmp_path / "images" / "bb.ext4"
    config = build_rootfs_from_oci(archive, out, 128 << 20)
    assert out.stat().st_size == 128 << 20
    assert config == OciImageConfig(env={"PATH": "/bin", "X": "1"}, working_dir="/srv/work", user="app")
    assert image_defaults(out) == config
    assert sorted(p.name for p in out.parent.iterdir()) == ["bb.ext4", "bb.ext4.oci.json"]
    res = subprocess.run([tools.require("debugfs"), "-R", f"stat {runtime.PYTHON}", str(out)],
                         capture_output=True, text=True)
    assert "Type: regular" in res.stdout
    with pytest.raises(ImageError, match="needs at least"):
        build_rootfs_from_oci(archive, tmp_path / "images" / "small.ext4", 8 << 20)
    assert sorted(p.name for p in out.parent.iterdir()) == ["bb.ext4", "bb.ext4.oci.json"], "nothing half-made"


def test_rootfs_from_dir_too_small(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "big").write_bytes(os.urandom(1 << 20) * 1)
    with pytest.raises(ImageError, match="needs at least"):
        rootfs_from_dir(tmp_path / "t", tmp_path / "out.ext4", 2 << 20)
    assert not (tmp_path / "out.ext4").exists()


def test_sidecar_roundtrip_and_malformed(tmp_path: Path) -> None:
    rootfs = tmp_path / "r.ext4"
    rootfs.write_bytes(b"")
    assert image_defaults(rootfs) is None
    cfg = OciImageConfig(env={"A": "1"}, working_dir="/w", user="1000", entrypoint=["/e"], cmd=["c"])
    assert write_image_defaults(rootfs, cfg) == sidecar_path(rootfs)
    assert image_defaults(rootfs) == cfg
    sidecar_path(rootfs).write_text("{not json")
    with pytest.raises(ImageError, match="malformed"):
        image_defaults(rootfs)
    sidecar_path(rootfs).write_text(json.dumps({"config": {"env": ["A=1"]}}))
    with pytest.raises(ImageError, match="malformed"):
        image_defaults(rootfs)


def test_manager_takes_image_defaults_and_the_spec_wins(tmp_path: Path) -> None:
    from arcbox_vm import SandboxSpec, VmmConfig
    from arcbox_vm.manager.lifecycle import new_record

    rootfs = tmp_path / "r.ext4"
    rootfs.write_bytes(b"")
    assert image_run_defaults(str(rootfs)) == OciImageConfig() and image_run_defaults("") == OciImageConfig()
    write_image_defaults(rootfs, OciImageConfig(env={"A": "image", "B": "image"}, working_dir="/srv", user="app"))

    class Ctx:
        config = VmmConfig(data_dir=str(tmp_path))
        data_dir = tmp_path
        sandboxes: dict = {}

    sb = new_record(Ctx(), SandboxSpec(rootfs=str(rootfs), env={"B": "spec"}))
    assert (sb.env, sb.working_dir, sb.user) == ({"A": "image", "B": "spec"}, "/srv", "app")
    sb = new_record(Ctx(), SandboxSpec(rootfs=str(rootfs), working_dir="/x", user="root"))
    assert (sb.working_dir, sb.user) == ("/x", "root")


def test_named_image_path(tmp_path: Path) -> None:
    assert named_image_path(tmp_path, "a.ext4") == tmp_path.resolve() / "a.ext4"
    for bad in ("../x", "/etc/x", "", "a/../../x", "a\0b"):
        with pytest.raises(InvalidArgument):
            named_image_path(tmp_path, bad)
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(InvalidArgument, match="outside"):
        named_image_path(tmp_path, "link/passwd")


@root_only
def test_cli_import_oci(tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "bb.tar", [busybox_layer(tools.static_busybox(), ("ls",))],
                             env=["PATH=/bin"], workdir="/srv")
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n[images]\ndir = "{tmp_path / "images"}"\n')
    res = CliRunner().invoke(app, ["image", "import-oci", str(archive), "bb.ext4", "--disk-size", "96M",
                                   "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "images" / "bb.ext4").stat().st_size == 96 << 20
    assert "working_dir:    /srv" in res.output
    res = CliRunner().invoke(app, ["image", "import-oci", str(archive), "../escape.ext4", "--config", str(cfg)])
    assert res.exit_code == 1 and "not a path" in res.output
    cfg.write_text(cfg.read_text() + "[limits]\nimage_unpack_max_bytes = 1048576\n")
    res = CliRunner().invoke(app, ["image", "import-oci", str(archive), "bb2.ext4", "--config", str(cfg)])
    assert res.exit_code == 1 and "image_unpack_max_bytes" in res.output
