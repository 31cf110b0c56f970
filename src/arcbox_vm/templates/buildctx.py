"""The build context: packed by the client (.dockerignore honoured), unpacked by the daemon.

API clients never name host paths, so the CLI sends the context as a tar stream. The
daemon unpacks it into a private temporary directory with tarfile's `data` filter
(no absolute names, no `..`, no links out of the directory, no devices, no setuid bits)
after checking the total size and member count — a hostile tar is refused whole, before
anything is written. COPY then packs what it selects into a tar of guest paths
(`copy_archive`) whose digest is the content part of that step's cache key.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from arcbox_vm.templates.models import MAX_CONTEXT_BYTES

MAX_MEMBERS = 100_000
IGNORE_FILE = ".dockerignore"


class ContextError(ValueError):
    """The build context is too big, or a tar that must not be unpacked."""


# -- .dockerignore ------------------------------------------------------------------------


@dataclass(frozen=True)
class IgnoreRule:
    regex: re.Pattern[str]
    negate: bool


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match plus `**` (any number of directories), as Docker reads them."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end]
                out.append("[" + ("^" + body[1:] if body.startswith("^") or body.startswith("!") else body) + "]")
                i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def parse_dockerignore(text: str) -> list[IgnoreRule]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:].strip()
        line = posixpath.normpath(line.lstrip("/")) if line.strip("/") else ""
        if not line or line == ".":
            continue
        rules.append(IgnoreRule(_pattern_regex(line), negate))
    return rules


def is_ignored(rel: str, rules: list[IgnoreRule]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for rule in rules:
        if any(rule.regex.match(c) for c in candidates):
            ignored = not rule.negate
    return ignored


# -- packing (the client) -----------------------------------------------------------------


def _reset(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """No host owner names or ids in the archive: the context's files are root's in the guest."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack_context(directory: Path, limit: int = MAX_CONTEXT_BYTES) -> bytes:
    """The context directory as an uncompressed tar: regular files, directories and
    symlinks (as links, never followed), minus what .dockerignore excludes. ContextError
    when the files add up to more than `limit` bytes."""
    root = Path(directory)
    if not root.is_dir():
        raise ContextError(f"the build context {root} is not a directory")
    ignore = root / IGNORE_FILE
    rules = parse_dockerignore(ignore.read_text()) if ignore.is_file() else []
    has_negations = any(r.negate for r in rules)
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            rel_dir = "" if rel_dir == "." else rel_dir
            keep_dirs = []
            for d in dirnames:
                rel = posixpath.join(rel_dir, d) if rel_dir else d
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    filenames.append(d)  # a symlink to a directory: archived as a link
                    continue
                if is_ignored(rel, rules):
                    if has_negations:
                        keep_dirs.append(d)  # something below may be re-included
                    continue
                keep_dirs.append(d)
                tf.add(full, arcname=rel, recursive=False, filter=_reset)
            dirnames[:] = keep_dirs
            for f in sorted(filenames):
                rel = posixpath.join(rel_dir, f) if rel_dir else f
                full = os.path.join(dirpath, f)
                st = os.lstat(full)
                if is_ignored(rel, rules) or not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    continue
                total += st.st_size
                if total > limit:
                    raise ContextError(f"the build context {root} is larger than {limit >> 20} MiB "
                                       "(exclude files with a .dockerignore)")
                tf.add(full, arcname=rel, recursive=False, filter=_reset)
    return buf.getvalue()


# -- unpacking (the daemon) ---------------------------------------------------------------


def unpack_context(data: bytes, dest: Path, limit: int = MAX_CONTEXT_BYTES) -> None:
    """Unpack a client's context tar into the empty private directory `dest`. The whole tar
    is checked before anything is written: its size, member count and every name; then
    tarfile's `data` filter refuses links out of `dest`, devices and the like."""
    if len(data) > limit + (limit >> 4) + (1 << 20):
        raise ContextError(f"the build context is larger than {limit >> 20} MiB")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            members = tf.getmembers()
            if len(members) > MAX_MEMBERS:
                raise ContextError(f"the build context has more than {MAX_MEMBERS} entries")
            total = 0
            for m in members:
                name = m.name
                if name.startswith("/") or "\0" in name or ".." in name.split("/"):
                    raise ContextError(f"the build context holds {name!r}: names must be relative and stay inside it")
                if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
                    raise ContextError(f"the build context holds {name!r}, which is not a file, directory or link")
                total += max(0, m.size)
                if total > limit:
                    raise ContextError(f"the build context is larger than {limit >> 20} MiB")
            tf.extractall(dest, members=members, filter="data")
    except tarfile.FilterError as exc:
        raise ContextError(f"the build context was refused: {exc}") from None
    except tarfile.TarError as exc:
        raise ContextError(f"the build context is not a valid tar: {exc}") from None


# -- COPY ---------------------------------------------------------------------------------


def _sources(root: Path, pattern: str) -> list[Path]:
    """What a COPY source names in the context: a path or a glob, never outside it."""
    rel = posixpath.normpath(pattern.lstrip("/")) if pattern.strip("/") else "."
    if rel == ".." or rel.startswith("../"):
        raise ContextError(f"COPY {pattern}: outside the build context")
    if any(ch in rel for ch in "*?["):
        matches = sorted(p for p in root.glob(rel))
    else:
        p = root / rel
        matches = [p] if os.path.lexists(p) else []
    real_root = os.path.realpath(root)
    for m in matches:
        parent = os.path.realpath(m.parent)  # the match itself may be a symlink: archived as one
        if os.path.commonpath([real_root, parent]) != real_root:
            raise ContextError(f"COPY {pattern}: outside the build context")
    if not matches:
        raise ContextError(f"COPY {pattern}: no such file in the build context (or excluded by .dockerignore)")
    return matches


def copy_archive(root: Path, sources: tuple[str, ...], dest: str) -> tuple[bytes, str, list[str]]:
    """(a tar of guest paths, its content digest, the top-level guest paths it writes).

    Docker's COPY: a directory's contents go into dest; a file goes to dest, or into it
    when dest ends with '/' or there are several sources. `dest` is absolute (the caller
    resolved it against WORKDIR). The digest covers names, types, modes and contents only
    (not times or owners), so an unchanged file re-sent by a client hits the cache."""
    matches = [m for s in sources for m in _sources(root, s)]
    into_dir = dest.endswith("/") or len(matches) > 1
    dest = posixpath.normpath(dest)
    entries: list[tuple[str, Path]] = []
    tops: list[str] = []
    for m in matches:
        if m.is_dir() and not m.is_symlink():
            tops.append(dest)
            for dirpath, dirnames, filenames in os.walk(m):
                dirnames.sort()
                rel = os.path.relpath(dirpath, m)
                base = dest if rel == "." else posixpath.join(dest, rel)
                if rel != ".":
                    entries.append((base, Path(dirpath)))
                for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
                    entries.append((posixpath.join(base, name), Path(dirpath) / name))
        else:
            target = posixpath.join(dest, m.name) if into_dir or dest == "/" else dest
            tops.append(target)
            entries.append((target, m))
    digest = hashlib.sha256()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for guest, host in sorted(entries):
            info = _reset(tf.gettarinfo(str(host), arcname=guest.lstrip("/") or "."))
            digest.update(f"{guest}\0{info.type!r}\0{info.mode:o}\0{info.size}\0{info.linkname}\0".encode())
            if info.isreg():
                with open(host, "rb") as f:
                    content = f.read()
                digest.update(hashlib.sha256(content).digest())
                tf.addfile(info, io.BytesIO(content))
            else:
                tf.addfile(info)
    return buf.getvalue(), digest.hexdigest(), sorted(set(tops))


def context_file(root: Path, name: str) -> Path | None:
    """A regular file of the unpacked context named by a relative path (FROM oci-archive:),
    never a symlink or anything outside it; None when there is none."""
    rel = posixpath.normpath(name.lstrip("/")) if name.strip("/") else ""
    if not rel or rel == ".." or rel.startswith("../"):
        return None
    p = root / rel
    real_root = os.path.realpath(root)
    if p.is_symlink() or not p.is_file() or os.path.commonpath([real_root, os.path.realpath(p)]) != real_root:
        return None
    return p


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
