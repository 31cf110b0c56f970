"""OCI archives → directory trees (images/oci.py): layers, whiteouts, both archive formats,
and hostile archives (path escapes, symlinks, device nodes, size bombs). Real skopeo and
umoci; the archives are made here from bytes (tests/support/oci_archives.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from arcbox_vm.errors import ImageError
from arcbox_vm.images.oci import OciImageConfig, parse_rootless_owner, unpack_oci_archive

from tests.support.oci_archives import Entry, docker_archive, oci_archive

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking keeps owners: needs root")

BASE = [Entry("etc", "dir", mode=0o755), Entry("etc/a", data=b"a"), Entry("etc/b", data=b"b"),
        Entry("etc/keep", data=b"keep"),
        Entry("dir", "dir", mode=0o755), Entry("dir/x", data=b"x"), Entry("dir/sub", "dir", mode=0o755),
        Entry("dir/sub/y", data=b"y"),
        Entry("home", "dir", mode=0o755), Entry("home/app", "dir", mode=0o750, uid=1000, gid=1001),
        Entry("home/app/f", data=b"mine", mode=0o600, uid=1000, gid=1001),
        Entry("usr", "dir", mode=0o755), Entry("usr/bin", "dir", mode=0o755),
        Entry("usr/bin/su", data=b"#!", mode=0o4755), Entry("bin", "symlink", link="usr/bin")]
UPPER = [Entry("etc", "dir", mode=0o755), Entry("etc/.wh.a", data=b""), Entry("etc/b", data=b"b2"),
         Entry("dir", "dir", mode=0o755), Entry("dir/.wh..wh..opq", data=b""), Entry("dir/z", data=b"z")]


def tree(root: Path) -> dict[str, str]:
    """{relative path: "f:<content>" | "d" | "l:<target>"} of everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "l:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "d"
            else:
                out[rel] = "f:" + p.read_bytes().decode(errors="replace")
    return out


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".oci-")]


@pytest.mark.parametrize("make", [docker_archive, oci_archive], ids=["docker-save", "oci-layout"])
def test_layers_whiteouts_and_opaque_dirs(tmp_path: Path, make) -> None:  # noqa: ANN001
    archive = make(tmp_path / "img.tar", [BASE, UPPER], env=["PATH=/bin", "A=1=2"], workdir="/home/app",
                   user="app", entrypoint=["/bin/app"], cmd=["--serve"])
    dest = tmp_path / "root"
    config = unpack_oci_archive(archive, dest)
    t = tree(dest)
    assert "etc/a" not in t, "a whiteout removes the lower layer's file"
    assert t["etc/b"] == "f:b2" and t["etc/keep"] == "f:keep"
    assert "dir/x" not in t and "dir/sub" not in t, "an opaque directory hides the lower layer's contents"
    assert t["dir/z"] == "f:z"
    assert not any(".wh." in p for p in t), "whiteout markers are not files of the result"
    assert t["bin"] == "l:usr/bin"
    st = os.lstat(dest / "home/app/f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1001, 0o600), "owners and modes are kept"
    assert (os.lstat(dest / "home/app").st_uid, stat.S_IMODE(os.lstat(dest / "home/app").st_mode)) == (1000, 0o750)
    assert stat.S_IMODE(os.lstat(dest / "usr/bin/su").st_mode) == 0o4755, "setuid bits survive"
    assert os.listxattr(dest / "home/app/f") == [], "umoci's owner record is removed once applied"
    assert config == OciImageConfig(env={"PATH": "/bin", "A": "1=2"}, working_dir="/home/app", user="app",
                                    entrypoint=["/bin/app"], cmd=["--serve"])
    assert leftovers(tmp_path) == []


def test_both_formats_give_the_same_tree(tmp_path: Path) -> None:
    a = unpack_oci_archive(docker_archive(tmp_path / "d.tar", [BASE, UPPER]), tmp_path / "d")
    b = unpack_oci_archive(oci_archive(tmp_path / "o.tar", [BASE, UPPER]), tmp_path / "o")
    assert tree(tmp_path / "d") == tree(tmp_path / "o") and a == b


def test_device_nodes_are_never_made_on_the_host(tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "img.tar", [[Entry("dev", "dir", mode=0o755),
                                                      Entry("dev/mem", "chardev", mode=0o666),
                                                      Entry("dev/fifo", "fifo", mode=0o600)]])
    unpack_oci_archive(archive, tmp_path / "root")
    for name in ("mem",):
        st = os.lstat(tmp_path / "root/dev" / name)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0, f"/dev/{name} became a device"


def test_hostile_names_and_symlinks_stay_inside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    work = tmp_path / "work"
    work.mkdir()
    first = [Entry("../../evil-dotdot", data=b"e"), Entry(f"{outside}/evil-abs", data=b"e"),
             Entry("abs", "symlink", link=str(outside)),
             Entry("rel", "symlink", link="../../../../../../../../" + str(outside).lstrip("/")),
             Entry("victimlink", "symlink", link=str(outside / "victim"))]
    # the second layer writes through the links the first made
    second = [Entry("abs/through-abs", data=b"e"), Entry("rel/through-rel", data=b"e"),
              Entry("victimlink", data=b"overwritten")]
    archive = docker_archive(work / "img.tar", [first, second])
    dest = work / "root"
    unpack_oci_archive(archive, dest)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_text() == "untouched"
    assert not (tmp_path / "evil-dotdot").exists() and not Path("/evil-dotdot").exists()
    t = tree(dest)
    assert t["evil-dotdot"] == "f:e", "`..` is clamped to the root"
    assert t[f"{str(outside).lstrip('/')}/through-abs"] == "f:e", "an absolute symlink resolves inside the root"
    assert t["victimlink"] == "f:overwritten", "a later file replaces the link instead of writing through it"


def test_hardlink_to_a_host_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    archive = docker_archive(tmp_path / "img.tar", [[Entry("stolen", "hardlink", link=str(secret))]])
    dest = tmp_path / "root"
    with pytest.raises(ImageError):
        unpack_oci_archive(archive, dest)
    assert list(dest.iterdir()) == [] and leftovers(tmp_path) == []
    assert secret.read_text() == "host secret" and os.stat(secret).st_nlink == 1


def test_size_bomb_is_refused_before_unpacking(tmp_path: Path) -> None:
    # 64 MiB of zeros: ~64 KiB compressed, over a 16 MiB limit
    archive = oci_archive(tmp_path / "bomb.tar", [[Entry("small", data=b"s"), Entry("zeros", size=64 << 20)]])
    assert archive.stat().st_size < 1 << 20
    dest = tmp_path / "root"
    with pytest.raises(ImageError, match="image_unpack_max_bytes"):
        unpack_oci_archive(archive, dest, max_bytes=16 << 20)
    assert list(dest.iterdir()) == [] and leftovers(tmp_path) == []


def test_archive_over_the_limit_and_non_archives(tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "img.tar", [BASE])
    with pytest.raises(ImageError, match="larger than"):
        unpack_oci_archive(archive, tmp_path / "a", max_bytes=1024)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ImageError, match="not a tar archive"):
        unpack_oci_archive(junk, tmp_path / "b")
    other = docker_archive(tmp_path / "x.tar", [BASE])
    import tarfile

    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tf:
        tf.add(other, arcname="something.tar")
    with pytest.raises(ImageError, match="neither"):
        unpack_oci_archive(plain, tmp_path / "c")
    with pytest.raises(ImageError, match="no such file"):
        unpack_oci_archive(tmp_path / "missing.tar", tmp_path / "d")
    assert leftovers(tmp_path) == []


def test_a_corrupt_layer_fails_cleanly(tmp_path: Path) -> None:
    import json
    import tarfile

    good = docker_archive(tmp_path / "good.tar", [BASE])
    bad = tmp_path / "bad.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name.endswith("layer.tar"):
                data = data[:1000] + b"\xff" * 100 + data[1100:]  # digest no longer matches
            m.size = len(data)
            import io

            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(ImageError, match="skopeo"):
        unpack_oci_archive(bad, tmp_path / "root")
    assert leftovers(tmp_path) == []
    assert json  # (imported for symmetry with the other helpers)


def test_dest_must_be_empty(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "x").write_text("x")
    with pytest.raises(ImageError, match="not empty"):
        unpack_oci_archive(docker_archive(tmp_path / "i.tar", [BASE]), tmp_path / "root")


def test_rootless_owner_records() -> None:
    assert parse_rootless_owner(b"") == (0, 0)
    assert parse_rootless_owner(bytes([0x08, 0xE8, 0x07, 0x10, 0xE9, 0x07])) == (1000, 1001)
    assert parse_rootless_owner(bytes([0x10, 0x05])) == (0, 5), "an absent field is 0 (proto3)"
    noop = bytes([0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F])
    assert parse_rootless_owner(noop) == (None, 0)
    with pytest.raises(ValueError):
        parse_rootless_owner(bytes([0x08, 0x80]))


def test_config_from_oci_rejects_wrong_types() -> None:
    assert OciImageConfig.from_oci({}) == OciImageConfig()
    assert OciImageConfig.from_oci({"config": {"Env": ["NOEQUALS", "=x", "K="]}}).env == {"K": ""}
    for bad in ({"config": {"Env": "PATH=/bin"}}, {"config": {"Cmd": [1]}}, {"config": {"User": 0}},
                {"config": ["x"]}):
        with pytest.raises(ImageError):
            OciImageConfig.from_oci(bad)
