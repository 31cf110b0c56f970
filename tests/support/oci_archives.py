"""Making OCI image archives in tests, from local files (no registry, no docker).

A layer is a list of `Entry`s; `docker_archive` writes what `docker save` writes
(manifest.json + one tar per layer + the config), `oci_archive` an OCI image layout tarball
(oci-layout, index.json, blobs/sha256/...; layers gzip-compressed).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Entry:
    name: str
    kind: str = "file"  # file | dir | symlink | hardlink | chardev | fifo
    data: bytes = b""
    mode: int = 0o644
    link: str = ""
    uid: int = 0
    gid: int = 0
    size: int | None = None  # a header claiming more than `data` (size bombs; data is zeros)


def layer_tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.mode, ti.uid, ti.gid, ti.mtime = e.mode, e.uid, e.gid, 1700000000
            if e.kind == "file":
                if e.size is not None:
                    ti.size = e.size
                    tf.addfile(ti, _Zeros(e.size))
                    continue
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                       "chardev": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[e.kind]
            ti.linkname = e.link
            if e.kind == "chardev":
                ti.devmajor, ti.devminor = 1, 3
            tf.addfile(ti)
    return buf.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def image_config(layers: list[bytes], env: list[str] | None = None, workdir: str = "", user: str = "",
                 entrypoint: list[str] | None = None, cmd: list[str] | None = None) -> bytes:
    cfg: dict = {"Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    if workdir:
        cfg["WorkingDir"] = workdir
    if user:
        cfg["User"] = user
    if entrypoint is not None:
        cfg["Entrypoint"] = entrypoint
    if cmd is not None:
        cfg["Cmd"] = cmd
    return json.dumps({"architecture": "amd64", "os": "linux", "config": cfg,
                       "rootfs": {"type": "layers",
                                  "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]}}).encode()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o644, 1700000000
    tf.addfile(ti, io.BytesIO(data))


def docker_archive(path: Path, layers: list[list[Entry]], **config) -> Path:  # noqa: ANN003
    tars = [layer_tar(entries) for entries in layers]
    cfg = image_config(tars, **config)
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    names = [f"{hashlib.sha256(t).hexdigest()}/layer.tar" for t in tars]
    with tarfile.open(path, "w") as tf:
        for name, t in zip(names, tars):
            _add(tf, name, t)
        _add(tf, cfg_name, cfg)
        _add(tf, "manifest.json", json.dumps([{"Config": cfg_name, "RepoTags": ["test:latest"],
                                               "Layers": names}]).encode())
    return path


def oci_archive(path: Path, layers: list[list[Entry]], **config) -> Path:  # noqa: ANN003
    tars = [layer_tar(entries) for entries in layers]
    gz = [gzip.compress(t, mtime=0) for t in tars]
    cfg = image_config(tars, **config)
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(cfg, "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(g, "application/vnd.oci.image.layer.v1.tar+gzip") for g in gz]}).encode()
    index = {"schemaVersion": 2, "manifests": [
        {**blob(manifest, "application/vnd.oci.image.manifest.v1+json"),
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
    with tarfile.open(path, "w") as tf:
        _add(tf, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(tf, "index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            _add(tf, f"blobs/sha256/{digest[7:]}", data)
    return path


def busybox_layer(busybox: str, applets: tuple[str, ...] = ("sh", "ls", "cat", "env", "uname", "echo", "id",
                                                            "pwd", "mkdir", "rm", "sleep")) -> list[Entry]:
    """A root with only a static busybox: /bin/busybox and applet symlinks, /etc/passwd, no python3."""
    data = Path(busybox).read_bytes()
    entries = [Entry("bin", "dir", mode=0o755), Entry("bin/busybox", data=data, mode=0o755),
               Entry("etc", "dir", mode=0o755),
               Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"),
               Entry("etc/group", data=b"root:x:0:\napp:x:1000:\n"),
               Entry("home", "dir", mode=0o755), Entry("home/app", "dir", mode=0o755, uid=1000, gid=1000),
               Entry("srv", "dir", mode=0o755), Entry("srv/work", "dir", mode=0o777)]
    entries += [Entry(f"bin/{a}", "symlink", link="busybox") for a in applets]
    return entries


def file_tree_size(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
