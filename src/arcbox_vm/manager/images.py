"""Which kernel, initrd and rootfs a sandbox boots.

Empty kernel/rootfs mean the image built by `arcbox-vm image build` (built on first use,
then cached, by the image store). The built initramfs goes with the built kernel; a user
kernel gets the configured initrd or none.
"""

from __future__ import annotations

import os
from pathlib import Path

from arcbox_vm.errors import BootFailed, InvalidArgument
from arcbox_vm.image_config import OciImageConfig, image_defaults
from arcbox_vm.ports import ImageStore, VmmDriver

MAX_IMAGE_NAME = 255


def named_image(directory: Path, name: str, what: str) -> str:
    """The host path of the image an API client names: a file inside `directory` (after
    resolving symlinks), never anything else. "" stays "" (the default image).

    Clients are untrusted: a path of theirs (`/etc/shadow`, `/proc/kcore`, `../x`, a
    symlink out of the directory) would make the root daemon copy or open host files."""
    if not name:
        return ""
    parts = name.split("/")
    if (len(name) > MAX_IMAGE_NAME or name.startswith("/") or "\0" in name or not name.isprintable()
            or any(p in ("", ".", "..") for p in parts)):
        raise InvalidArgument(f"{what} {name!r}: name an image in the daemon's images directory "
                              f"({directory}), not a path")
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, target]) != root or target == root:
        raise InvalidArgument(f"{what} {name!r} resolves outside the daemon's images directory ({directory})")
    if not os.path.isfile(target):
        raise InvalidArgument(f"{what} {name!r}: no such image in the daemon's images directory ({directory})")
    return target


def image_run_defaults(rootfs: str) -> OciImageConfig:
    """The env, working dir and user the rootfs's image asks for (its sidecar, written by
    `image import-oci`), empty for the built image and images without one. The spec's own
    values win over these (lifecycle.new_record merges them)."""
    if not rootfs:
        return OciImageConfig()
    return image_defaults(rootfs) or OciImageConfig()


def named_image_path(directory: Path, name: str) -> Path:
    """Where a new image called `name` goes in the images directory (the operator's
    `image import-oci`): a plain name, its parent directories inside `directory`."""
    parts = name.split("/")
    if (not name or len(name) > MAX_IMAGE_NAME or name.startswith("/") or "\0" in name or not name.isprintable()
            or any(p in ("", ".", "..") for p in parts)):
        raise InvalidArgument(f"image name {name!r}: a name inside the images directory, not a path")
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, target]) != root or target == root:
        raise InvalidArgument(f"image name {name!r} resolves outside the images directory ({directory})")
    return Path(target)


async def resolve_images(images: ImageStore, driver: VmmDriver, kernel: str, initrd: str,
                         rootfs: str) -> tuple[Path, Path | None, Path]:
    image = await images.default_image() if not kernel or not rootfs else None
    if kernel:
        k = Path(kernel)
        i = Path(initrd) if initrd else None
    else:
        assert image is not None
        k = driver.kernel_for(image.kernel, image.vmlinux)
        i = Path(initrd) if initrd else image.initrd
    r = Path(rootfs) if rootfs else image.rootfs  # type: ignore[union-attr]
    for path, what in ((k, "kernel"), (r, "rootfs")):
        if not path.is_file():
            raise BootFailed(f"the {what} {path} does not exist")
    if i is not None and not i.is_file():
        raise BootFailed(f"the initrd {i} does not exist")
    return k, i, r
