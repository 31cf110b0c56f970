"""The guest root filesystem: a Debian base tarball (mmdebstrap) and the final ext4 with the agent.

The base (Debian minbase + python3, bash and a few tools) is slow to make (~45 s, network) and is
cached as a tarball keyed by its recipe; the final image (base + agent + user + a few /etc
files, packed with `mke2fs -d`, no mount or loop device) is quick and is redone whenever the
agent changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from arcbox_vm.agent.bundle import agent_files
from arcbox_vm.errors import ImageError
from arcbox_vm.images import apt, guestpath, tools

SUITE = "bookworm"
VARIANT = "minbase"
# python3 for the agent; procps (ps, pkill), iproute2 and iputils-ping for the sandboxed programs
# and network checks. coreutils, bash, etc. come with minbase.
PACKAGES: tuple[str, ...] = ("python3", "procps", "iproute2", "iputils-ping")
# dpkg filters (later rules win): no docs, man pages, info or translations; keep licences.
DPKG_OPTIONS: tuple[str, ...] = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/lintian/*",
)
APT_OPTIONS: tuple[str, ...] = ('APT::Install-Recommends "false"',)
BASE_RECIPE_VERSION = 1

HOSTNAME = "arcbox"
LABEL = "arcbox-root"
USER, UID, GID, HOME = "sandbox", 1000, 1000, "/home/sandbox"
# The account E2B's base image has (its SDK runs commands and files as "user" by default)
E2B_USER, E2B_UID, E2B_GID, E2B_HOME = "user", 1001, 1001, "/home/user"
USERS: tuple[tuple[str, int, int, str], ...] = ((USER, UID, GID, HOME), (E2B_USER, E2B_UID, E2B_GID, E2B_HOME))
DEFAULT_FREE_SPACE = 1 << 30  # bytes of free space in the final ext4

Progress = Callable[[str], None]


def base_recipe(suite: str = SUITE, packages: tuple[str, ...] = PACKAGES) -> dict[str, object]:
    """Everything that decides the base tarball's contents (apart from the archive's state)."""
    return {"version": BASE_RECIPE_VERSION, "suite": suite, "variant": VARIANT,
            "packages": sorted(packages), "dpkg": list(DPKG_OPTIONS), "apt": list(APT_OPTIONS)}


def base_key(recipe: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def mmdebstrap_command(out_tar: Path, recipe: dict[str, object], mirrors: list[str]) -> list[str]:
    cmd = [tools.require("mmdebstrap", "to build the guest root filesystem from Debian packages"),
           "--mode=root", f"--variant={recipe['variant']}", "--format=tar",
           "--include=" + ",".join(recipe["packages"])]  # type: ignore[arg-type]
    cmd += [f"--dpkgopt={o}" for o in recipe["dpkg"]]  # type: ignore[union-attr]
    cmd += [f"--aptopt={o}" for o in recipe["apt"]]  # type: ignore[union-attr]
    return cmd + [str(recipe["suite"]), str(out_tar)] + mirrors


def build_base(out_tar: Path, recipe: dict[str, object], tmp_dir: Path) -> list[str]:
    """Run mmdebstrap to write the base tarball to `out_tar` atomically; returns the mirrors used."""
    mirrors = apt.mmdebstrap_mirrors(str(recipe["suite"]))
    part = out_tar.with_name(out_tar.stem + f".part{os.getpid()}.tar")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp_dir), LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    # stdin is /dev/null: mmdebstrap must never wait for a sources.list on standard input
    res = subprocess.run(mmdebstrap_command(part, recipe, mirrors), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0 or not part.is_file():
        part.unlink(missing_ok=True)
        tail = "\n".join(res.stderr.strip().splitlines()[-25:])
        raise ImageError(f"mmdebstrap failed (exit {res.returncode}); its last messages:\n{tail}")
    os.replace(part, out_tar)
    return mirrors


# ---- the final tree ---------------------------------------------------------------------------

def _guest_target(tree: Path, guest: str) -> Path:
    """Host path for writing guest file `guest` in `tree`, creating parents (symlinks followed in-tree)."""
    parent, name = guest.rsplit("/", 1)
    real, missing = guestpath.resolve_dir(parent or "/", guestpath.tree_lookup(tree))
    d = tree.joinpath(*real) if real else tree
    for comp in missing:
        d = d / comp
        d.mkdir(mode=0o755)
        os.chmod(d, 0o755)
    return d / name


def write_file(tree: Path, guest: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Path:
    """Replace guest file `guest` in the unpacked tree (never writes through a symlink)."""
    target = _guest_target(tree, guest)
    if target.is_symlink() or target.exists():
        if target.is_dir() and not target.is_symlink():
            raise ImageError(f"{guest} is a directory in the guest tree")
        target.unlink()
    with open(target, "xb") as f:
        f.write(data)
    os.chown(target, uid, gid)
    os.chmod(target, mode)
    return target


def _append_line(tree: Path, guest: str, line: str) -> None:
    target = _guest_target(tree, guest)
    if target.is_symlink():
        raise ImageError(f"{guest} is a symlink in the base; refusing to edit it")
    text = target.read_text() if target.exists() else ""
    name = line.split(":", 1)[0]
    if any(existing.split(":", 1)[0] == name for existing in text.splitlines()):
        return
    if text and not text.endswith("\n"):
        text += "\n"
    st = target.stat() if target.exists() else None
    target.write_text(text + line + "\n")
    if st:
        os.chown(target, st.st_uid, st.st_gid)
        os.chmod(target, stat.S_IMODE(st.st_mode))
    else:
        os.chmod(target, 0o640 if "shadow" in target.name else 0o644)


def add_user(tree: Path, user: str = USER, uid: int = UID, gid: int = GID, home: str = HOME) -> None:
    """An unprivileged user (by default `sandbox`, uid/gid 1000, home /home/sandbox), locked
    password, login shell /bin/bash, its home from /etc/skel."""
    passwd = _guest_target(tree, "/etc/passwd")
    for line in (passwd.read_text() if passwd.exists() else "").splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[2] == str(uid) and fields[0] != user:
            raise ImageError(f"uid {uid} is already taken by {fields[0]!r} in the base image")
    _append_line(tree, "/etc/passwd", f"{user}:x:{uid}:{gid}:arcbox {user}:{home}:/bin/bash")
    _append_line(tree, "/etc/group", f"{user}:x:{gid}:")
    _append_line(tree, "/etc/shadow", f"{user}:!::0:99999:7:::")
    _append_line(tree, "/etc/gshadow", f"{user}:!::")
    home_dir = _guest_target(tree, home)
    home_dir.mkdir(mode=0o755, exist_ok=True)
    os.chown(home_dir, uid, gid)
    os.chmod(home_dir, 0o755)
    skel = tree / "etc" / "skel"
    if skel.is_dir() and not skel.is_symlink():
        for src in skel.iterdir():
            if src.is_file() and not src.is_symlink():
                write_file(tree, f"{home}/{src.name}", src.read_bytes(), 0o644, uid, gid)


def populate(tree: Path, hostname: str = HOSTNAME) -> None:
    """Agent files, the users (`sandbox`, and E2B's `user`), hostname, hosts and an empty resolv.conf."""
    for guest, (data, mode) in agent_files().items():
        write_file(tree, guest, data, mode)
    for user, uid, gid, home in USERS:
        add_user(tree, user, uid, gid, home)
    if guestpath.resolve_file("/bin/bash", guestpath.tree_lookup(tree)) is None:
        raise ImageError("the base root filesystem has no /bin/bash (E2B's SDK runs commands with it)")
    write_file(tree, "/etc/hostname", f"{hostname}\n".encode())
    write_file(tree, "/etc/hosts", (f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"
                                    "::1\tlocalhost ip6-localhost ip6-loopback\n").encode())
    write_file(tree, "/etc/resolv.conf", b"")  # the agent fills it from arcbox.dns=
    if guestpath.resolve_file("/usr/bin/python3", guestpath.tree_lookup(tree)) is None:
        raise ImageError("the base root filesystem has no /usr/bin/python3 (the agent needs it)")
    precompile_agent(tree)


def precompile_agent(tree: Path) -> int:
    """Byte-compile the agent for the guest's Python, so a guest never compiles it at boot.

    Under software emulation compiling the agent costs a noticeable part of the boot. Only
    done when the guest's python3 is the host interpreter's minor version (same bytecode
    magic); the .pyc files are hash-based and unchecked, so file times do not matter.
    """
    import py_compile
    import sys

    target = os.readlink(tree / "usr/bin/python3") if (tree / "usr/bin/python3").is_symlink() else ""
    if target.rsplit("/", 1)[-1] != f"python{sys.version_info.major}.{sys.version_info.minor}":
        return 0
    count = 0
    for guest in agent_files():
        if not guest.endswith(".py"):
            continue
        src = _guest_target(tree, guest)
        cache = src.parent / "__pycache__" / f"{src.stem}.{sys.implementation.cache_tag}.pyc"
        py_compile.compile(str(src), cfile=str(cache), dfile=guest, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        count += 1
    return count


def unpack(base_tar: Path, tree: Path) -> None:
    tar = tools.require("tar")
    tree.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([tar, "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(base_tar),
                          "-C", str(tree)], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise ImageError(f"unpacking {base_tar.name} failed: {res.stderr.strip()}")
    os.chown(tree, 0, 0)
    os.chmod(tree, 0o755)


def tree_usage(tree: Path) -> tuple[int, int]:
    """(bytes the files need in 4 KiB blocks, number of inodes)."""
    total = 0
    inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(tree):
        inodes += 1
        total += 4096
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            if stat.S_ISREG(st.st_mode) or (stat.S_ISLNK(st.st_mode) and st.st_size >= 60):
                total += (st.st_size + 4095) // 4096 * 4096
    return total, inodes


def free_bytes(image: Path) -> tuple[int, int]:
    """(free bytes, total bytes) of an ext4 image, from its superblock (dumpe2fs -h)."""
    res = subprocess.run([tools.require("dumpe2fs"), "-h", str(image)], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=False)
    vals = dict(re.findall(r"^(Free blocks|Block count|Block size):\s+(\d+)", res.stdout, re.M))
    if res.returncode != 0 or len(vals) != 3:
        raise ImageError(f"dumpe2fs -h {image.name} failed: {res.stderr.strip()}")
    bs = int(vals["Block size"])
    return int(vals["Free blocks"]) * bs, int(vals["Block count"]) * bs


def make_ext4(tree: Path, out: Path, free_space: int = DEFAULT_FREE_SPACE, label: str = LABEL) -> tuple[int, int]:
    """`mke2fs -d` the tree into a sparse ext4 image with about `free_space` bytes free.

    Returns (image size, free bytes).
    """
    mke2fs = tools.require("mke2fs", "to build the ext4 root filesystem")
    used, _ = tree_usage(tree)
    mib = 1 << 20
    size = used * 106 // 100 + free_space + 80 * mib  # + inode tables, journal, directories
    for _ in range(3):
        size = (size + mib - 1) // mib * mib
        out.unlink(missing_ok=True)
        res = subprocess.run([mke2fs, "-q", "-F", "-t", "ext4", "-m", "0", "-L", label, "-d", str(tree),
                              str(out), f"{size // 1024}k"], stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, check=False)
        if res.returncode != 0:
            raise ImageError(f"mke2fs failed (exit {res.returncode}): {(res.stderr or res.stdout).strip()}")
        free, _total = free_bytes(out)
        if free >= free_space * 98 // 100:
            return size, free
        size += free_space - free + 16 * mib
    return size, free


@dataclass(frozen=True)
class RootfsInfo:
    size: int
    free: int


def build_rootfs(base_tar: Path, out: Path, work: Path, free_space: int = DEFAULT_FREE_SPACE,
                 hostname: str = HOSTNAME) -> RootfsInfo:
    """Unpack the base into `work`, add the agent and friends, and pack it as ext4 at `out`."""
    tree = work / "tree"
    try:
        unpack(base_tar, tree)
        populate(tree, hostname)
        size, free = make_ext4(tree, out, free_space)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return RootfsInfo(size=size, free=free)
