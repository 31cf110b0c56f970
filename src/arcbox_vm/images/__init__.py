"""Guest images: Debian's cloud kernel, a busybox initramfs and an ext4 rootfs with the agent.

    build_image(data_dir, progress=None) -> GuestImage   build, or return the cached image
    find_image(data_dir) -> GuestImage | None            never builds, never runs apt
    inject_agent(rootfs_path) -> list[str]               agent into an existing ext4 (warnings)
    build_rootfs_from_oci(archive, out_image, disk_size) -> OciImageConfig
                                                         docker save / OCI archive -> bootable ext4
    unpack_oci_archive(archive, dest_dir) -> OciImageConfig   the archive's layers into a directory
    rootfs_from_dir(tree, out_image, size) -> RootfsInfo      a directory -> ext4 (mke2fs -d)

Modules: tools (host tools), apt (resolve/download packages), kernel (unpack, vmlinux),
initramfs (+ assets/init, cpio), rootfs (mmdebstrap base, final ext4), inject (debugfs),
guestpath (symlink-safe guest paths), cache (keys, atomic publish), builder (the pipeline),
oci (archives -> trees: skopeo, umoci), runtime (the agent's private Python runtime),
oci_rootfs (imported images made bootable). An image's settings sidecar is
arcbox_vm.image_config (pure: the manager reads it).
"""

from arcbox_vm.image_config import OciImageConfig, image_defaults
from arcbox_vm.images.builder import build_image, find_image, image_inputs, image_key
from arcbox_vm.images.cache import GuestImage
from arcbox_vm.images.inject import inject_agent
from arcbox_vm.images.oci import unpack_oci_archive
from arcbox_vm.images.oci_rootfs import build_rootfs_from_oci, rootfs_from_dir

__all__ = ["GuestImage", "OciImageConfig", "build_image", "build_rootfs_from_oci", "find_image", "image_defaults",
           "image_inputs", "image_key", "inject_agent", "rootfs_from_dir", "unpack_oci_archive"]
