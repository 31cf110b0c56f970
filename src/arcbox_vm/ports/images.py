"""The image port: the guest image a sandbox boots when its spec names none."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class BootImage(Protocol):
    kernel: Path  # bzImage (QEMU)
    vmlinux: Path  # uncompressed ELF (Firecracker)
    initrd: Path
    rootfs: Path


class ImageStore(Protocol):
    async def default_image(self) -> BootImage:
        """The built guest image (built on first use, then cached)."""
