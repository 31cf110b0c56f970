"""Which kernel, initrd and rootfs a sandbox boots.

Empty kernel/rootfs mean the image built by `arcbox-vm image build` (built on first use,
then cached). The built initramfs goes with the built kernel; a user kernel gets the
configured initrd or none.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from arcbox_vm.config import VmmConfig
from arcbox_vm.errors import BootFailed
from arcbox_vm.images import GuestImage, build_image, find_image
from arcbox_vm.ports import VmmDriver


class ImageResolver:
    def __init__(self, config: VmmConfig, data_dir: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        self._image: GuestImage | None = None
        self._lock = asyncio.Lock()

    async def built_image(self) -> GuestImage:
        async with self._lock:
            if self._image is None:
                image = await asyncio.to_thread(find_image, self.data_dir)
                if image is None:
                    image = await asyncio.to_thread(build_image, self.data_dir)
                self._image = image
            return self._image

    async def resolve(self, driver: VmmDriver, kernel: str, initrd: str,
                      rootfs: str) -> tuple[Path, Path | None, Path]:
        image = await self.built_image() if not kernel or not rootfs else None
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
