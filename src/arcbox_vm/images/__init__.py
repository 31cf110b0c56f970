"""Guest images: Debian's cloud kernel, a busybox initramfs and an ext4 rootfs with the agent.

    build_image(data_dir, progress=None) -> GuestImage   build, or return the cached image
    find_image(data_dir) -> GuestImage | None            never builds, never runs apt
    inject_agent(rootfs_path) -> list[str]               agent into an existing ext4 (warnings)

Modules: tools (host tools), apt (resolve/download packages), kernel (unpack, vmlinux),
initramfs (+ assets/init, cpio), rootfs (mmdebstrap base, final ext4), inject (debugfs),
guestpath (symlink-safe guest paths), cache (keys, atomic publish), builder (the pipeline).
"""

from arcbox_vm.images.builder import build_image, find_image, image_inputs, image_key
from arcbox_vm.images.cache import GuestImage
from arcbox_vm.images.inject import inject_agent

__all__ = ["GuestImage", "build_image", "find_image", "image_inputs", "image_key", "inject_agent"]
