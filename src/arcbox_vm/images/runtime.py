"""A private Python runtime for the guest agent, for images that have no python3 of their own.

Busybox-only, Alpine (musl) and distroless images cannot run `/sbin/vm-agent` (a Python
script). So the agent brings its interpreter, under a prefix no image uses:

    /.arcbox/runtime/bin/python3              the host's system python3 binary
    /.arcbox/runtime/lib/ld-linux-x86-64.so.2 its dynamic loader, and every shared library
    /.arcbox/runtime/lib/lib*.so*             the binary and its extension modules need (ldd)
    /.arcbox/runtime/lib/python3.X/...        the stdlib modules the agent can import

and the initramfs `/init` starts it through its own loader —
`/.arcbox/runtime/lib/ld-linux-x86-64.so.2 --library-path /.arcbox/runtime/lib
/.arcbox/runtime/bin/python3 -I -S /sbin/vm-agent` — so the image's libc (glibc, musl or
none) never matters and no environment variable is set: `--library-path` applies to the
agent process only, `-I` makes it ignore PYTHON* variables, and the commands it starts get
an environment built from scratch (agent/guest/spawn.py), so nothing leaks into them.
Python finds its stdlib from the binary's location (the `lib/python3.X/os.py` landmark).

The modules are the agent's import closure (`modulefinder`, run by that same interpreter)
minus packages it never loads at run time (tests, lib2to3, pydoc data, ...), byte-compiled
by that interpreter (unchecked-hash .pyc: no compiling at boot under software emulation).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from arcbox_vm.agent.bundle import GUEST_LIB_DIR, LAUNCHER_PATH, agent_files
from arcbox_vm.errors import ImageError
from arcbox_vm.images import tools

PREFIX = "/.arcbox/runtime"
PYTHON = f"{PREFIX}/bin/python3"
LIB_DIR = f"{PREFIX}/lib"
LOADER = f"{LIB_DIR}/ld-linux-x86-64.so.2"
# The agent as /init starts it when the runtime is there (assets/init says the same).
AGENT_ARGV: tuple[str, ...] = (LOADER, "--library-path", LIB_DIR, PYTHON, "-I", "-S", LAUNCHER_PATH)
# The system interpreter (not a virtualenv's or pyenv's: its stdlib and libraries are where
# the distribution put them, and its bytecode is what we compile with).
SOURCE_PYTHONS: tuple[str, ...] = ("/usr/bin/python3",)
# Never loaded by the agent, only reached through optional or lazy imports in the stdlib
# (ssl, hashlib's OpenSSL backend and readline alone would bring 6 MB of libraries; hashlib
# falls back to its built-in hashes, decimal uses _decimal).
EXCLUDED: tuple[str, ...] = ("test", "unittest", "lib2to3", "pydoc_data", "distutils", "idlelib", "tkinter",
                             "ensurepip", "turtledemo", "pydoc", "doctest", "pdb", "_pydecimal", "ssl", "_ssl",
                             "_hashlib", "readline")

# Run by the source interpreter: its stdlib location, version and the agent's import closure.
_FIND_SCRIPT = r"""
import json, modulefinder, sys, sysconfig
std = sysconfig.get_paths()["stdlib"]
dyn = std + "/lib-dynload"
mf = modulefinder.ModuleFinder(path=[sys.argv[1], std, dyn])
mf.import_hook("arcbox_vm.agent.guest.main")
for name in ("encodings", "encodings.aliases", "encodings.utf_8", "encodings.ascii", "encodings.latin_1",
             "encodings.idna", "codecs", "io", "abc", "site", "os", "stat", "posixpath", "genericpath",
             "tarfile", "pwd", "grp"):  # + a template COPY's unpacking in images without tar
    mf.import_hook(name)
files = sorted({m.__file__ for m in mf.modules.values() if m.__file__ and m.__file__.startswith(std + "/")})
print(json.dumps({"stdlib": std, "version": "%d.%d" % sys.version_info[:2], "files": files}))
"""

# Run by the source interpreter: byte-compile [(source, pyc, name in tracebacks)].
_COMPILE_SCRIPT = r"""
import json, py_compile, sys
for src, cfile, dfile in json.load(sys.stdin):
    py_compile.compile(src, cfile=cfile, dfile=dfile, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


@dataclass(frozen=True)
class RuntimeInfo:
    python: str  # the source interpreter
    version: str  # "3.11"
    files: int
    size: int  # bytes written under PREFIX


def source_python() -> str:
    for p in SOURCE_PYTHONS:
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return os.path.realpath(p)
    found = tools.find("python3")
    if found is None:
        raise ImageError("no system python3 on the host to take the guest agent's runtime from "
                         "(install the python3 package)")
    return os.path.realpath(found)


_LDD_LIB = re.compile(r"^\s*(\S+)\s+=>\s+(/\S+)\s+\(0x[0-9a-f]+\)\s*$")
_LDD_LOADER = re.compile(r"^\s*(/\S*ld-linux\S*)\s+\(0x[0-9a-f]+\)\s*$")


def parse_ldd(text: str) -> tuple[dict[str, str], str | None]:
    """({soname: host path}, the loader's path) from `ldd` output."""
    libs: dict[str, str] = {}
    loader = None
    for line in text.splitlines():
        if m := _LDD_LIB.match(line):
            libs[m.group(1)] = m.group(2)
        elif m := _LDD_LOADER.match(line):
            loader = m.group(1)
    return libs, loader


def shared_libraries(binaries: list[str]) -> tuple[dict[str, str], str]:
    """Every shared library the binaries load (ldd resolves the whole tree) and the loader."""
    ldd = tools.require("ldd", "to find the agent runtime's shared libraries")
    libs: dict[str, str] = {}
    loader = None
    for b in binaries:
        res = subprocess.run([ldd, b], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise ImageError(f"ldd {b} failed: {res.stderr.strip() or res.stdout.strip()}")
        found, ld = parse_ldd(res.stdout)
        libs.update(found)
        loader = loader or ld
    if loader is None:
        raise ImageError(f"ldd found no dynamic loader for {binaries[0]} (only x86-64 glibc builds are supported)")
    return libs, loader


def _excluded(rel: str) -> bool:
    """`rel` (a path under the stdlib) is in EXCLUDED: its top-level package or module, or an
    extension module of that name (`lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so`)."""
    top = rel.split("/", 1)[0]
    if top == "lib-dynload":
        top = rel.split("/", 1)[1]
    top = top.split(".", 1)[0]
    return top in EXCLUDED or top.startswith(("_test", "_xxtest"))


def _copy(src: str | Path, dest: Path, mode: int) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    shutil.copyfile(src, dest, follow_symlinks=True)
    os.chmod(dest, mode)
    return dest.stat().st_size


def stdlib_modules(py: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(stdlib dir, "3.X", [(file, path relative to the stdlib)]) the agent can import on `py`.

    modulefinder runs on the agent's files as a guest has them (agent_files(), written to a
    temporary directory: the host package's own __init__ would pull in the daemon's imports).
    """
    with tempfile.TemporaryDirectory(prefix="arcbox-agent-") as tmp:
        for guest, (data, _mode) in agent_files().items():
            if guest.startswith(GUEST_LIB_DIR + "/"):
                dest = Path(tmp) / guest[len(GUEST_LIB_DIR) + 1:]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
        res = subprocess.run([py, "-I", "-S", "-c", _FIND_SCRIPT, tmp], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise ImageError(f"{py} could not list the agent's modules: {res.stderr.strip()[-2000:]}")
    found = json.loads(res.stdout)
    std = found["stdlib"]
    modules = [(f, os.path.relpath(f, std)) for f in found["files"]]
    return std, found["version"], [(f, rel) for f, rel in modules if not _excluded(rel)]


def install_runtime(tree: Path, agent_paths: dict[str, Path] | None = None, python: str | None = None) -> RuntimeInfo:
    """Put the runtime under `tree`/.arcbox/runtime and byte-compile the agent for it.

    `tree` is an unpacked, untrusted image: whatever it has at /.arcbox (a symlink out of the
    tree, a file) is removed first, and everything below is made here, so no write follows a
    link of the image's. `agent_paths` maps the agent's guest paths to where
    `rootfs.write_file` put them (resolved inside the tree: never `tree / guest path`, which
    would follow the image's absolute symlinks on the host).
    """
    py = python or source_python()
    std, version, modules = stdlib_modules(py)

    top = tree / ".arcbox"
    if top.is_symlink() or top.exists():
        if top.is_dir() and not top.is_symlink():
            shutil.rmtree(top)
        else:
            top.unlink()
    root = tree / PREFIX.lstrip("/")
    root.mkdir(parents=True, mode=0o755)
    for d in (top, root):
        os.chmod(d, 0o755)
    size = _copy(py, root / "bin" / "python3", 0o755)
    count = 1
    extensions = [f for f, rel in modules if rel.endswith(".so")]
    libs, loader = shared_libraries([py] + extensions)
    size += _copy(loader, tree / LOADER.lstrip("/"), 0o755)
    for soname, path in sorted(libs.items()):
        size += _copy(path, root / "lib" / soname, 0o755)
    count += 1 + len(libs)
    pydir = root / "lib" / f"python{version}"
    to_compile: list[tuple[str, str, str]] = []
    cache_tag = f"cpython-{version.replace('.', '')}"
    for src, rel in modules:
        dest = pydir / rel
        size += _copy(src, dest, 0o755 if rel.endswith(".so") else 0o644)
        count += 1
        if rel.endswith(".py"):
            pyc = dest.parent / "__pycache__" / f"{dest.stem}.{cache_tag}.pyc"
            to_compile.append((str(dest), str(pyc), f"{PREFIX}/lib/python{version}/{rel}"))
    for guest, host in (agent_paths or {}).items():
        if guest.endswith(".py"):
            to_compile.append((str(host), str(host.parent / "__pycache__" / f"{host.stem}.{cache_tag}.pyc"), guest))
    for _src, pyc, _d in to_compile:
        Path(pyc).parent.mkdir(exist_ok=True, mode=0o755)
    res = subprocess.run([py, "-I", "-S", "-c", _COMPILE_SCRIPT], input=json.dumps(to_compile),
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise ImageError(f"byte-compiling the agent runtime failed: {res.stderr.strip()[-2000:]}")
    for _src, pyc, _d in to_compile:
        if pyc.startswith(str(root)):
            size += os.path.getsize(pyc)
            count += 1
    return RuntimeInfo(python=py, version=version, files=count, size=size)
