"""Which kernel, initrd and rootfs a sandbox boots.

Empty kernel/rootfs mean the image built by `arcbox-vm image build` (built on first use,
then cached, by the image store). The built initramfs goes with the built kernel; a user
kernel gets the configured initrd or none.
"""

from __future__ import annotations

from pathlib import Path

from arcbox_vm.errors import BootFailed
from arcbox_vm.ports import ImageStore, VmmDriver


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
