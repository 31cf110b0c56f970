"""API clients name images; they never hand the root daemon a host path."""

from __future__ import annotations

import os

import pytest

from arcbox_vm import SandboxManager, SandboxSpec, VmmConfig
from arcbox_vm.errors import InvalidArgument
from arcbox_vm.manager.images import named_image


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "named"
    (d / "kernels").mkdir(parents=True)
    (d / "vmlinuz-6.1").write_bytes(b"k")
    (d / "kernels" / "old").write_bytes(b"k")
    (d / "link-in").symlink_to(d / "vmlinuz-6.1")
    (d / "link-out").symlink_to("/etc/passwd")
    (d / "dir-out").symlink_to("/etc")
    return d


def test_names_resolve_inside_the_directory(images):
    assert named_image(images, "", "kernel") == ""
    assert named_image(images, "vmlinuz-6.1", "kernel") == os.path.realpath(images / "vmlinuz-6.1")
    assert named_image(images, "kernels/old", "kernel") == os.path.realpath(images / "kernels" / "old")
    assert named_image(images, "link-in", "kernel") == os.path.realpath(images / "vmlinuz-6.1")


@pytest.mark.parametrize("name", ["/etc/shadow", "/proc/kcore", "../x", "kernels/../../x", "a//b", ".", "..",
                                  "link-out", "dir-out/passwd", "kernels", "missing", "x\x00y", "x\ny",
                                  "k" * 300])
def test_paths_and_escapes_are_refused(images, name):
    with pytest.raises(InvalidArgument):
        named_image(images, name, "kernel")


def test_the_manager_resolves_an_untrusted_spec_before_anything_is_made(tmp_path, images):
    mgr = SandboxManager(VmmConfig(backend="qemu", data_dir=tmp_path / "data", images={"dir": str(images)}))
    spec = mgr.resolve_image_names(SandboxSpec(kernel="vmlinuz-6.1", rootfs="kernels/old"))
    assert spec.kernel == os.path.realpath(images / "vmlinuz-6.1") and spec.initrd == ""
    with pytest.raises(InvalidArgument, match="not a path"):
        mgr.resolve_image_names(SandboxSpec(initrd="/etc/shadow"))
    assert not (tmp_path / "data").exists(), "refused before the data dir was even touched"


def test_the_default_images_dir_is_under_the_data_dir(tmp_path):
    assert VmmConfig(data_dir=tmp_path).named_images_dir == tmp_path / "named-images"
