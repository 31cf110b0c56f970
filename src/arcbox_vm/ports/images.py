"""The image port: the guest image a sandbox boots when its spec names none."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from arcbox_vm.image_config import OciImageConfig


class BootImage(Protocol):
    kernel: Path  # bzImage (QEMU)
    vmlinux: Path  # uncompressed ELF (Firecracker)
    initrd: Path
    rootfs: Path


class ImageStore(Protocol):
    async def default_image(self) -> BootImage:
        """The built guest image (built on first use, then cached)."""


# An OCI / docker-save archive → a bootable ext4 (`out_image`, `disk_size` bytes or None =
# its files + 1 GiB) and the image's run settings. Blocking (skopeo, umoci, mke2fs): call it
# in a thread. Used by templates built FROM oci-archive:PATH.
OciImporter = Callable[[Path, Path, "int | None"], OciImageConfig]
