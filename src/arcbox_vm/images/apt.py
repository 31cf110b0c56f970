"""The apt side of the builder: resolve and download Debian packages, find the host's sources.

Nothing here writes to the system except `apt-get update` (only when the package lists are
missing, and only as root) and the downloaded .deb files in the builder's own cache.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from arcbox_vm.errors import ImageError
from arcbox_vm.images import tools

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
APT_LISTS_DIR = Path("/var/lib/apt/lists")
APT_ETC_DIR = Path("/etc/apt")
OS_RELEASE = Path("/etc/os-release")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class AptPackage:
    """One concrete version of a Debian binary package."""

    name: str
    version: str
    arch: str = "amd64"
    sha256: str = ""  # from the package index when known; verified after download
    size: int = 0

    @property
    def deb_filename(self) -> str:
        """The file name apt-get download gives it (an epoch's ':' is written %3a)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(LC_ALL="C", LANG="C", DEBIAN_FRONTEND="noninteractive")
    return env


def _run(args: list[str], cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _fields(stanza: str) -> dict[str, str]:
    """Parse one deb822 stanza (continuation lines are joined)."""
    out: dict[str, str] = {}
    key = None
    for line in stanza.splitlines():
        if line[:1] in (" ", "\t") and key:
            out[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            out[key] = value.strip()
    return out


def apt_show(name: str) -> dict[str, str] | None:
    """`apt-cache show --no-all-versions NAME` (the candidate version) as fields, or None if unknown."""
    res = _run([tools.require("apt-cache"), "show", "--no-all-versions", name])
    if res.returncode != 0 or not res.stdout.strip():
        return None
    return _fields(res.stdout.strip().split("\n\n")[0])


def concrete_kernel_dependency(depends: str, meta: str) -> tuple[str, str | None] | None:
    """From a meta package's Depends field, the `linux-image-<release>` it pulls in and the pinned version.

    `linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)` -> ("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2").
    """
    for dep in depends.split(","):
        first = dep.split("|")[0].strip()
        m = re.match(r"^(linux-image-[A-Za-z0-9.+-]+)(?::\w+)?\s*(?:\(\s*(=|>=|<=|>>|<<)\s*([^)\s]+)\s*\))?$", first)
        if m and m.group(1) != meta:
            return m.group(1), (m.group(3) if m.group(2) == "=" else None)
    return None


def apt_update(progress: Progress | None = None) -> None:
    if progress:
        progress("updating apt package lists (apt-get update)")
    res = _run([tools.require("apt-get"), "update", "-q"], timeout=900)
    if res.returncode != 0:
        raise ImageError(f"apt-get update failed (exit {res.returncode}):\n{res.stderr.strip()}")


def resolve_kernel_package(meta: str = KERNEL_META_PACKAGE, progress: Progress | None = None,
                           allow_update: bool = True) -> AptPackage:
    """The concrete kernel package (name, candidate version) that `meta` currently depends on."""
    fields = apt_show(meta)
    if fields is None and allow_update and os.geteuid() == 0:
        apt_update(progress)
        fields = apt_show(meta)
    if fields is None:
        raise ImageError(
            f"apt does not know the package {meta!r}; run 'apt-get update' (as root) and check that "
            "the Debian main archive is in the apt sources")
    dep = concrete_kernel_dependency(fields.get("Depends", ""), meta)
    if dep is None:
        raise ImageError(f"{meta!r} does not depend on a linux-image-<release> package "
                         f"(Depends: {fields.get('Depends', '')!r})")
    name, pinned = dep
    info = apt_show(f"{name}={pinned}" if pinned else name)
    if info is None:
        raise ImageError(f"apt does not know {name}{'=' + pinned if pinned else ''} (needed by {meta}); "
                         "run 'apt-get update'")
    return AptPackage(name=name, version=info.get("Version", pinned or ""), arch=info.get("Architecture", "amd64"),
                      sha256=info.get("SHA256", ""), size=int(info.get("Size", "0") or 0))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def deb_is_valid(path: Path, pkg: AptPackage) -> bool:
    """A cached .deb matches the index's size and SHA256 (when the index gave them)."""
    if not path.is_file():
        return False
    if pkg.size and path.stat().st_size != pkg.size:
        return False
    return not pkg.sha256 or _sha256(path) == pkg.sha256


def download(pkg: AptPackage, dest_dir: Path) -> Path:
    """`apt-get download NAME=VERSION` into dest_dir (reusing a verified earlier download)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / pkg.deb_filename
    if deb_is_valid(final, pkg):
        return final
    apt_get = tools.require("apt-get")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest_dir) as tmp:
        args = [apt_get, "download", "-q"]
        if os.geteuid() == 0:
            # root: apt would drop to the _apt user, which cannot write our private temp dir
            args += ["-o", "APT::Sandbox::User=root"]
        res = _run(args + [f"{pkg.name}={pkg.version}"], cwd=Path(tmp))
        debs = sorted(Path(tmp).glob("*.deb"))
        if res.returncode != 0 or len(debs) != 1:
            raise ImageError(f"apt-get download {pkg.name}={pkg.version} failed (exit {res.returncode}):\n"
                             f"{(res.stderr or res.stdout).strip()}")
        if not deb_is_valid(debs[0], pkg):
            raise ImageError(f"downloaded {debs[0].name} does not match the package index (size/SHA256); "
                             "run 'apt-get update' and try again")
        os.replace(debs[0], final)
    return final


def lists_fingerprint(lists_dir: Path = APT_LISTS_DIR, etc_dir: Path = APT_ETC_DIR) -> str:
    """Changes whenever `apt-get update` (or a sources change) could change what apt resolves."""
    h = hashlib.sha256()
    for d in (lists_dir, etc_dir, etc_dir / "sources.list.d", etc_dir / "preferences.d"):
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name in ("lock", "partial", "auxfiles") or not e.is_file():
                continue
            st = e.stat()
            h.update(f"{d}/{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


# ---- host apt sources, for mmdebstrap -------------------------------------------------------

def os_release(path: Path = OS_RELEASE) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip().strip('"').strip("'")
    return out


@dataclass(frozen=True)
class SourceEntry:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_sources(text: str, deb822: bool) -> list[SourceEntry]:
    """Enabled binary (`deb`) entries of a sources.list (one-line) or .sources (deb822) file."""
    entries: list[SourceEntry] = []
    if deb822:
        body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        for stanza in re.split(r"\n\s*\n", body):
            f = _fields(stanza)
            if not f or f.get("Enabled", "yes").lower() == "no" or "deb" not in f.get("Types", "").split():
                continue
            for uri in f.get("URIs", "").split():
                entries.append(SourceEntry(uri, tuple(f.get("Suites", "").split()),
                                           tuple(f.get("Components", "").split())))
        return entries
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        rest = line[4:].strip()
        if rest.startswith("["):
            rest = rest.split("]", 1)[1].strip() if "]" in rest else ""
        parts = rest.split()
        if len(parts) >= 2:
            entries.append(SourceEntry(parts[0], (parts[1],), tuple(parts[2:])))
    return entries


def _is_for_suite(suite_name: str, suite: str) -> bool:
    return suite_name == suite or suite_name.startswith((suite + "-", suite + "/"))


def source_files(etc_dir: Path = APT_ETC_DIR) -> list[Path]:
    files = [etc_dir / "sources.list"]
    d = etc_dir / "sources.list.d"
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    return [p for p in files if p.is_file()]


def mmdebstrap_mirrors(suite: str, etc_dir: Path = APT_ETC_DIR,
                       os_release_path: Path = OS_RELEASE) -> list[str]:
    """Mirror arguments for `mmdebstrap SUITE TARGET <mirrors...>`.

    Same Debian release on the host: the host's own sources files (only those with an entry for
    SUITE, so third-party repositories stay out). Another Debian release: the host's Debian mirrors
    rewritten to SUITE. Anything else: [] (mmdebstrap's built-in default; stdin is never used).
    """
    rel = os_release(os_release_path)
    files = source_files(etc_dir)
    parsed = {p: parse_sources(p.read_text(errors="replace"), p.suffix == ".sources") for p in files}
    if rel.get("VERSION_CODENAME") == suite:
        chosen = [str(p) for p, ents in parsed.items()
                  if any(_is_for_suite(s, suite) for e in ents for s in e.suites)]
        if chosen:
            return chosen
    if rel.get("ID") == "debian" and rel.get("VERSION_CODENAME"):
        host = rel["VERSION_CODENAME"]
        lines: list[str] = []
        for ents in parsed.values():
            for e in ents:
                for s in e.suites:
                    if not _is_for_suite(s, host):
                        continue
                    new_suite = suite + s[len(host):]
                    comps = " ".join(c for c in e.components if c in ("main", "contrib", "non-free",
                                                                        "non-free-firmware")) or "main"
                    line = f"deb {e.uri} {new_suite} {comps}"
                    if line not in lines:
                        lines.append(line)
        if any(ln.split()[2] == suite for ln in lines):
            return lines
    return []


def host_package_version(name: str) -> str | None:
    """Installed version of a host package (for the manifest), or None."""
    q = shutil.which("dpkg-query") or tools.find("dpkg-query")
    if not q:
        return None
    res = _run([q, "-W", "-f=${Version}", name], timeout=30)
    return (res.stdout.strip() or None) if res.returncode == 0 else None
