"""An OCI image archive (`docker save` or an OCI image layout tarball) → a directory tree.

The archive is untrusted. The work is done by two maintained tools from Debian rather than
by our own tar and whiteout code:

- `skopeo copy docker-archive:|oci-archive:ARCHIVE oci:LAYOUT` reads either format, checks
  every blob against its digest and writes a plain OCI image layout;
- `umoci raw unpack --rootless` applies the layers in order — whiteouts (`.wh.NAME`) and
  opaque directories (`.wh..wh..opq`) — resolving every path inside the root (securejoin:
  no `..`, absolute name or symlink made by an earlier layer leads out of it). Rootless mode
  never calls mknod (device nodes become empty files) and never chowns: owners other than
  root are recorded in the `user.rootlesscontainers` xattr, which we apply afterwards.

What we check ourselves, before umoci writes a byte: the sum of the layers' file sizes and
their entry count (`max_bytes`, `MAX_ENTRIES`), read from the tar headers as a stream, so a
small compressed layer that expands to terabytes is refused after reading `max_bytes` at
most. Every temporary file lives in one directory removed on success and failure alike.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Any

from arcbox_vm.errors import ImageError
from arcbox_vm.image_config import OciImageConfig
from arcbox_vm.images import tools

DEFAULT_MAX_BYTES = 8 << 30  # what `[limits] image_unpack_max_bytes` defaults to
MAX_ENTRIES = 1_000_000  # files, directories and links over all layers
MAX_JSON_BYTES = 4 << 20  # index, manifest and config blobs
LAYOUT_REF = "arcbox"
ROOTLESS_XATTR = "user.rootlesscontainers"
_NOOP_ID = 0xFFFFFFFF  # "keep the owner" in the rootlesscontainers protobuf
_TOOL_TIMEOUT_S = 1800


# ---- the archive → an OCI layout -------------------------------------------------------------

def archive_transport(archive: Path) -> str:
    """`docker-archive` (manifest.json at the top) or `oci-archive` (index.json + oci-layout)."""
    try:
        with tarfile.open(archive, "r:*") as tf:
            names = set()
            for i, member in enumerate(tf):
                names.add(member.name.lstrip("./"))
                if i > 100_000:
                    break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ImageError(f"{archive.name} is not a tar archive ({e})") from None
    if "manifest.json" in names:
        return "docker-archive"
    if "index.json" in names and "oci-layout" in names:
        return "oci-archive"
    raise ImageError(f"{archive.name} is neither a `docker save` archive (manifest.json) nor an OCI image "
                     "layout tarball (index.json + oci-layout)")


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    try:
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
                             timeout=_TOOL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise ImageError(f"{what} took longer than {_TOOL_TIMEOUT_S} s") from None
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-10:])
        raise ImageError(f"{what} failed (exit {res.returncode}): {tail}")


def to_layout(archive: Path, layout: Path, tmp: Path) -> None:
    """Convert the archive into an OCI image layout at `layout` (tag LAYOUT_REF) with skopeo."""
    skopeo = tools.require("skopeo", "to read docker-save and OCI archives")
    transport = archive_transport(archive)
    # --insecure-policy: no signature policy applies to a local file (and no policy.json is needed);
    # TMPDIR: skopeo unpacks an oci-archive into a temporary directory — ours, removed with it.
    env = dict(os.environ, TMPDIR=str(tmp))
    _run([skopeo, "--insecure-policy", "copy", "-q", f"{transport}:{archive}", f"oci:{layout}:{LAYOUT_REF}"],
         f"skopeo reading {archive.name}", env)


def _blob(layout: Path, digest: object) -> Path:
    """The blob file of a sha256 digest (anything else — a path in disguise — is refused)."""
    if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71 \
            or not all(c in "0123456789abcdef" for c in digest[7:]):
        raise ImageError(f"bad blob digest {digest!r} in the image")
    return layout / "blobs" / "sha256" / digest[7:]


def _read_blob_json(layout: Path, digest: object) -> dict[str, Any]:
    path = _blob(layout, digest)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ImageError(f"blob {digest[:19]} is larger than {MAX_JSON_BYTES} bytes")
    try:
        d = json.loads(path.read_bytes())
    except ValueError as e:
        raise ImageError(f"blob {digest[:19]} is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise ImageError(f"blob {digest[:19]} is not a JSON object")
    return d


def read_layout(layout: Path) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """(image config, [(layer blob, media type)] in order) of the layout's one image."""
    index = json.loads((layout / "index.json").read_bytes())
    manifests = index.get("manifests") or []
    if len(manifests) != 1:
        raise ImageError(f"expected one image in the layout skopeo wrote, found {len(manifests)}")
    manifest = _read_blob_json(layout, manifests[0].get("digest"))
    config = _read_blob_json(layout, (manifest.get("config") or {}).get("digest"))
    layers = []
    for desc in manifest.get("layers") or []:
        layers.append((_blob(layout, desc.get("digest")), str(desc.get("mediaType", ""))))
    return config, layers


# ---- size bound ------------------------------------------------------------------------------

def _layer_stream(blob: Path, media_type: str) -> tuple[IO[bytes], subprocess.Popen[bytes] | None]:
    """A readable stream of the layer's uncompressed tar (zstd through the zstd tool)."""
    if media_type.endswith("+zstd"):
        zstd = tools.require("zstd", "the image has zstd-compressed layers")
        proc = subprocess.Popen([zstd, "-dcq", str(blob)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        return proc.stdout, proc
    return open(blob, "rb"), None


def check_layer_sizes(layers: list[tuple[Path, str]], max_bytes: int, max_entries: int = MAX_ENTRIES) -> int:
    """Sum of the file sizes the layers declare; ImageError as soon as it passes `max_bytes`.

    Read as a stream (headers; data is skipped, so a compressed layer is decompressed only
    as far as the bound). Every layer counts fully, even what a later layer deletes: the
    bound is on the work the unpack does, not on the result.
    """
    total = entries = 0
    for blob, media_type in layers:
        stream, proc = _layer_stream(blob, media_type)
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tf:
                for member in tf:
                    entries += 1
                    total += max(member.size, 0)
                    if total > max_bytes:
                        raise ImageError(f"the image's layers hold more than {max_bytes} bytes of files "
                                         "(the limit is [limits] image_unpack_max_bytes)")
                    if entries > max_entries:
                        raise ImageError(f"the image's layers hold more than {max_entries} entries")
        except tarfile.TarError as e:
            raise ImageError(f"layer {blob.name[:12]} is not a readable tar archive ({e})") from None
        finally:
            stream.close()
            if proc is not None:
                proc.kill()
                proc.wait()
    return total


# ---- owners ----------------------------------------------------------------------------------

def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def parse_rootless_owner(data: bytes) -> tuple[int | None, int | None]:
    """The (uid, gid) of a `user.rootlesscontainers` xattr (protobuf `Resource{uint32 uid=1;
    uint32 gid=2}`; an absent field is 0, 2^32-1 means "unchanged" → None)."""
    uid = gid = 0
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        if key & 7 != 0:
            raise ValueError("unexpected field type")
        value, i = _varint(data, i)
        if key >> 3 == 1:
            uid = value
        elif key >> 3 == 2:
            gid = value
    return (None if uid == _NOOP_ID else uid), (None if gid == _NOOP_ID else gid)


def apply_rootless_owners(tree: Path) -> None:
    """chown what umoci recorded in `user.rootlesscontainers`, then drop the xattr (never
    following symlinks; symlinks themselves cannot carry user xattrs and stay root's)."""
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            try:
                data = os.getxattr(path, ROOTLESS_XATTR, follow_symlinks=False)
            except OSError:
                continue
            try:
                uid, gid = parse_rootless_owner(data)
            except ValueError:
                raise ImageError(f"unreadable owner record on {os.path.relpath(path, tree)}") from None
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=False)
            os.chmod(path, mode)  # chown clears setuid/setgid; the image's bits stay
            os.removexattr(path, ROOTLESS_XATTR, follow_symlinks=False)


# ---- the whole step --------------------------------------------------------------------------

def unpack_oci_archive(archive: Path, dest_dir: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> OciImageConfig:
    """Unpack the image in `archive` (docker save or OCI layout tarball) into the empty `dest_dir`.

    Layers are applied in order with whiteouts and opaque directories; device nodes become
    empty files; owners are kept. On failure `dest_dir` is left empty and every temporary
    file is gone. Returns the image's config.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise ImageError(f"{archive}: no such file")
    if archive.stat().st_size > max_bytes:
        raise ImageError(f"{archive.name} is larger than {max_bytes} bytes ([limits] image_unpack_max_bytes)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    if any(dest_dir.iterdir()):
        raise ImageError(f"{dest_dir} is not empty")
    umoci = tools.require("umoci", "to unpack OCI image layers")
    tmp = Path(tempfile.mkdtemp(prefix=".oci-unpack-", dir=dest_dir.parent))
    try:
        os.chmod(tmp, 0o700)
        layout = tmp / "layout"
        to_layout(archive, layout, tmp)
        config_blob, layers = read_layout(layout)
        config = OciImageConfig.from_oci(config_blob)
        check_layer_sizes(layers, max_bytes)
        rootfs = tmp / "rootfs"
        _run([umoci, "raw", "unpack", "--rootless", "--image", f"{layout}:{LAYOUT_REF}", str(rootfs)],
             f"umoci unpacking {archive.name}")
        shutil.rmtree(layout)
        apply_rootless_owners(rootfs)
        for entry in rootfs.iterdir():
            os.rename(entry, dest_dir / entry.name)
        os.chmod(dest_dir, 0o755)
        return config
    except BaseException:
        for entry in list(dest_dir.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
