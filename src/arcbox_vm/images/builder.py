"""Build a guest image (kernel + vmlinux + initramfs + rootfs) or find the cached one.

The image key hashes everything that decides the image's bytes: the concrete kernel package
(name + version), the initramfs recipe (/init script, module list, applets), the base rootfs
recipe (suite, packages, dpkg filters), the final rootfs settings, the agent digest and the
builder version. The kernel version comes from apt; it is remembered in the cache together
with a fingerprint of apt's package lists, so a cached `build_image` runs no apt command and
`find_image` never does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from arcbox_vm import paths
from arcbox_vm.agent.bundle import agent_digest
from arcbox_vm.errors import ImageError
from arcbox_vm.images import apt, cache, initramfs, kernel, rootfs, tools
from arcbox_vm.images.cache import GuestImage

# Bump when the build code changes what ends up in an image (layout, files written, options):
# the version is part of every image key.
BUILDER_VERSION = 2  # 2: agent byte-compiled in the rootfs
KERNEL_META = apt.KERNEL_META_PACKAGE
RESOLVED_KERNEL_FILE = "kernel-package.json"
KEEP_IMAGES = 3  # older images (e.g. with a previous agent) are deleted after a build

Progress = Callable[[str], None]


def _data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    return Path(data_dir) if data_dir is not None else paths.data_dir()


def rootfs_settings(free_space: int = rootfs.DEFAULT_FREE_SPACE) -> dict[str, Any]:
    return {"free_space": int(free_space), "hostname": rootfs.HOSTNAME, "label": rootfs.LABEL,
            "users": [f"{u}:{uid}:{gid}:{home}" for u, uid, gid, home in rootfs.USERS]}


def image_inputs(pkg: apt.AptPackage, free_space: int = rootfs.DEFAULT_FREE_SPACE) -> dict[str, Any]:
    """Everything the image key is computed from."""
    return {
        "builder": BUILDER_VERSION,
        "kernel": {"meta": KERNEL_META, "package": pkg.name, "version": pkg.version, "arch": pkg.arch},
        "initramfs": initramfs.recipe_digest(),
        "base": rootfs.base_key(rootfs.base_recipe()),
        "rootfs": rootfs_settings(free_space),
        "agent": agent_digest(),
    }


def image_key(inputs: dict[str, Any]) -> str:
    return cache.digest(inputs, 20)


def kernel_part_key(inputs: dict[str, Any]) -> str:
    """Key of the kernel-side files (vmlinuz, vmlinux, initrd.img), shared by images that differ elsewhere."""
    return cache.digest({k: inputs[k] for k in ("builder", "kernel", "initramfs")}, 20)


# ---- kernel package resolution (cached) ------------------------------------------------------

def _pkg_from_json(d: dict[str, Any] | None) -> apt.AptPackage | None:
    if not d or d.get("meta") != KERNEL_META or not d.get("name") or not d.get("version"):
        return None
    return apt.AptPackage(name=d["name"], version=d["version"], arch=d.get("arch", "amd64"),
                          sha256=d.get("sha256", ""), size=int(d.get("size", 0)))


def cached_kernel_package(data_dir: Path) -> tuple[apt.AptPackage | None, str]:
    """The kernel package resolved by an earlier build, and apt's list fingerprint at that time."""
    d = cache.read_json(cache.cache_dir(data_dir) / RESOLVED_KERNEL_FILE)
    return _pkg_from_json(d), str((d or {}).get("apt_fingerprint", ""))


def resolve_kernel(data_dir: Path, progress: Progress) -> apt.AptPackage:
    """The current kernel package: from the cache while apt's lists are unchanged, else from apt-cache.

    If apt cannot answer (lists deleted, apt missing) the package remembered from the last build is
    used, so a cached image stays usable offline.
    """
    remembered, fingerprint = cached_kernel_package(data_dir)
    if remembered and fingerprint == apt.lists_fingerprint():
        return remembered
    progress(f"resolving {KERNEL_META} (apt-cache)")
    try:
        pkg = apt.resolve_kernel_package(KERNEL_META, progress, allow_update=remembered is None)
    except ImageError as e:
        if remembered is None:
            raise
        reason = str(e).splitlines()[0]
        progress(f"apt could not resolve {KERNEL_META} ({reason}); "
                 f"using {remembered.name} {remembered.version} from the last build")
        return remembered
    with contextlib.suppress(OSError):  # read-only data dir: resolve again next time
        cache.write_json_atomic(cache.cache_dir(data_dir) / RESOLVED_KERNEL_FILE, {
            "meta": KERNEL_META, "name": pkg.name, "version": pkg.version, "arch": pkg.arch,
            "sha256": pkg.sha256, "size": pkg.size, "apt_fingerprint": apt.lists_fingerprint(),
            "resolved_at": _now()})
    return pkg


# ---- public API ------------------------------------------------------------------------------

def find_image(data_dir: str | os.PathLike[str] | None = None) -> GuestImage | None:
    """The image for the current key if it is built, else None. Never builds, never runs apt.

    Without a remembered kernel version (no build has run in this data dir), the newest
    complete image made by this builder version with the current agent is returned.
    """
    ddir = _data_dir(data_dir)
    pkg, _ = cached_kernel_package(ddir)
    if pkg is not None:
        return cache.load_image(cache.images_dir(ddir) / image_key(image_inputs(pkg)))
    current = agent_digest()
    for img, manifest in cache.list_images(ddir):
        if manifest.get("agent_digest") == current and manifest.get("builder_version") == BUILDER_VERSION:
            return img
    return None


def build_image(data_dir: str | os.PathLike[str] | None = None, progress: Progress | None = None, *,
                force: bool = False, refresh_base: bool = False,
                free_space: int = rootfs.DEFAULT_FREE_SPACE) -> GuestImage:
    """Build the guest image into `<data_dir>/images/<key>/`, or return it if already built.

    `progress(str)` gets a message at the start of every stage. `force` rebuilds the image
    (reusing the verified kernel .deb and the cached rootfs base); `refresh_base` also re-runs
    mmdebstrap (newer Debian packages). `free_space` is the free space in rootfs.ext4 (bytes).
    """
    ddir = _data_dir(data_dir)
    report: Progress = progress or (lambda _msg: None)
    force = force or refresh_base
    pkg = resolve_kernel(ddir, report)
    inputs = image_inputs(pkg, free_space)
    key = image_key(inputs)
    final = cache.images_dir(ddir) / key
    if not force and (img := cache.load_image(final)):
        return img

    _check_can_build()
    base_recipe = rootfs.base_recipe()
    base_tar = cache.cache_dir(ddir) / "base" / f"base-{inputs['base']}.tar"
    if refresh_base or not base_tar.is_file():
        tools.require("mmdebstrap", "to build the guest root filesystem from Debian packages")
    with cache.build_lock(ddir, on_wait=lambda: report("waiting for another image build to finish")):
        if not force and (img := cache.load_image(final)):
            return img  # built by whoever held the lock
        cache.remove_stale_builds(ddir)
        work = cache.new_build_dir(ddir, key)
        try:
            manifest = _build(ddir, work, pkg, inputs, key, base_tar, base_recipe, force, refresh_base,
                              free_space, report)
            cache.write_json_atomic(work / cache.MANIFEST, manifest)
            cache.publish(work, final, replace=force)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        cache.prune_images(ddir, KEEP_IMAGES, protect=key)
    img = cache.load_image(final)
    if img is None:  # pragma: no cover - publish guarantees it
        raise ImageError(f"image {key} vanished right after it was built")
    return img


def _check_can_build() -> None:
    if os.geteuid() != 0:
        raise ImageError("building the guest image needs root (mmdebstrap, and files owned by root "
                         "in the rootfs); run 'arcbox-vm image build' as root")
    tools.require_all("apt-get", "dpkg", "depmod", "lz4", "mke2fs", "dumpe2fs", "tar",
                      why="needed to build the guest image")
    tools.static_busybox()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _reusable_kernel_files(ddir: Path, part: str) -> GuestImage | None:
    for img, manifest in cache.list_images(ddir):
        if manifest.get("parts", {}).get("kernel") == part:
            return img
    return None


def _build(ddir: Path, work: Path, pkg: apt.AptPackage, inputs: dict[str, Any], key: str, base_tar: Path,
           base_recipe: dict[str, Any], force: bool, refresh_base: bool, free_space: int,
           report: Progress) -> dict[str, Any]:
    timings: dict[str, float] = {}
    release = kernel.release_from_package(pkg.name)
    kpart = kernel_part_key(inputs)
    manifest: dict[str, Any] = {
        "key": key, "builder_version": BUILDER_VERSION, "kernel_release": release,
        "kernel_package": pkg.name, "kernel_version": pkg.version, "agent_digest": inputs["agent"],
        "parts": {"kernel": kpart, "base": inputs["base"]}, "inputs": inputs,
        "host": {p: apt.host_package_version(p) for p in ("busybox-static", "mmdebstrap", "e2fsprogs")},
    }

    t = time.monotonic()
    donor = None if force else _reusable_kernel_files(ddir, kpart)
    if donor is not None:
        report(f"reusing kernel {release} and initramfs from image {donor.key}")
        for attr in ("kernel", "vmlinux", "initrd"):
            cache.link_or_copy(getattr(donor, attr), work / cache.FILES[attr])
        donor_manifest = donor.manifest()
        manifest["initramfs_modules"] = donor_manifest.get("initramfs_modules", [])
        manifest["vmlinux_compression"] = donor_manifest.get("vmlinux_compression")
        timings["kernel"] = time.monotonic() - t
    else:
        debs = cache.cache_dir(ddir) / "debs"
        if apt.deb_is_valid(debs / pkg.deb_filename, pkg):
            report(f"using downloaded kernel package {pkg.deb_filename}")
        else:
            mb = f", {pkg.size / 1e6:.0f} MB" if pkg.size else ""
            report(f"downloading kernel {release} ({pkg.name} {pkg.version}{mb})")
        deb = apt.download(pkg, debs)
        timings["kernel_download"] = time.monotonic() - t

        t = time.monotonic()
        report(f"unpacking kernel {release} and extracting the uncompressed vmlinux")
        kdir = work / "kernel-pkg"
        kern = kernel.unpack_deb(deb, kdir, release)
        shutil.copyfile(kern.vmlinuz, work / cache.FILES["kernel"])
        manifest["vmlinux_compression"] = kernel.extract_vmlinux(kern.vmlinuz, work / cache.FILES["vmlinux"])
        timings["kernel_extract"] = time.monotonic() - t

        t = time.monotonic()
        report(f"building initramfs (static busybox + {len(initramfs.MODULES)} virtio modules)")
        info = initramfs.build_initramfs(kern, work / cache.FILES["initrd"])
        manifest["initramfs_modules"] = list(info.modules)
        shutil.rmtree(kdir, ignore_errors=True)
        timings["initramfs"] = time.monotonic() - t

    t = time.monotonic()
    if refresh_base or not base_tar.is_file():
        report(f"building rootfs base (mmdebstrap {base_recipe['suite']} + "
               f"{', '.join(base_recipe['packages'])}, ~45 s)")
        base_tar.parent.mkdir(parents=True, exist_ok=True)
        mirrors = rootfs.build_base(base_tar, base_recipe, cache.cache_dir(ddir) / "tmp")
        cache.write_json_atomic(base_tar.with_suffix(".json"), {
            "recipe": base_recipe, "mirrors": mirrors, "created_at": _now(),
            "seconds": round(time.monotonic() - t, 1), "size": base_tar.stat().st_size})
        timings["rootfs_base"] = time.monotonic() - t
    else:
        report(f"using cached rootfs base {base_tar.name}")
    base_info = cache.read_json(base_tar.with_suffix(".json")) or {}
    manifest["base"] = {"file": str(base_tar), "created_at": base_info.get("created_at"),
                        "mirrors": base_info.get("mirrors")}

    t = time.monotonic()
    report(f"building rootfs.ext4 (base + agent, {free_space / (1 << 30):.2g} GiB free)")
    rinfo = rootfs.build_rootfs(base_tar, work / cache.FILES["rootfs"], work, free_space)
    timings["rootfs_ext4"] = time.monotonic() - t

    files = {}
    for name in cache.FILES.values():
        st = (work / name).stat()
        files[name] = {"size": st.st_size, "allocated": st.st_blocks * 512}
    manifest.update(created_at=_now(), files=files, rootfs_free_bytes=rinfo.free,
                    timings={k: round(v, 2) for k, v in timings.items()})
    return manifest
