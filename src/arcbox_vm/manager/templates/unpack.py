"""How a COPY step's tar is unpacked inside the build sandbox: the image's `tar` when it
has one, else Python's `tarfile` — the image's `python3`, or the guest agent's private
runtime (`/.arcbox/runtime`, which every image without a python3 gets at import) — so an
image without tar (distroless, scratch-built) can still be COPYed into.

Both keep COPY's semantics: the archive's numeric owners (root) and modes, symlinks as
links, existing directories keep their owner and mode; then `--chown` applies to the
copied paths and the tar file is removed. The archive was built by the host from a
checked context (templates/buildctx.py), but the extractor still refuses absolute names,
`..`, and anything but files, directories and links, like tarfile's `data` filter — and,
unlike it, keeps modes (group/other write, setuid as the context had them after its own
checks) and owners, as COPY must.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

# The agent's runtime in the guest, as images/runtime.py installs it (an adapter the manager
# does not import; tests/unit/test_templates.py checks the two agree).
PYTHON = "/.arcbox/runtime/bin/python3"
LIB_DIR = "/.arcbox/runtime/lib"
LOADER = f"{LIB_DIR}/ld-linux-x86-64.so.2"
# Where an image keeps tar and python3 (PATH of a usual root shell).
BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

# argv: the root ("/"; a directory in tests), the tar, the --chown value ("" = none), then
# the copied top-level paths (absolute, under the root).
SCRIPT = r"""
import grp, os, pwd, sys, tarfile
root, archive, chown = sys.argv[1:4]
tops = [os.path.join(root, t.lstrip("/")) for t in sys.argv[4:]]
kw = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
with tarfile.open(archive) as tf:
    for m in tf:
        parts = m.name.split("/")
        if m.name.startswith("/") or ".." in parts or not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
            sys.exit("COPY: refused archive member %r" % m.name)
        path = os.path.join(root, m.name)
        if m.isdir() and os.path.isdir(path) and not os.path.islink(path):
            continue  # an existing directory keeps its owner and mode
        tf.extract(m, root, numeric_owner=True, **kw)
os.unlink(archive)
if chown:
    user, _, group = chown.partition(":")
    uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
    gid = (int(group) if group.isdigit() else grp.getgrnam(group).gr_gid) if group else \
        (pwd.getpwuid(uid).pw_gid if not user.isdigit() else uid)
    for top in tops:
        os.lchown(top, uid, gid)
        for d, dirs, files in os.walk(top):
            for n in dirs + files:
                os.lchown(os.path.join(d, n), uid, gid)
"""


async def extract_argv(exists: Callable[[str], Awaitable[bool]], archive: str, chown: str,
                       tops: list[str]) -> tuple[list[str], bool]:
    """(argv unpacking `archive` at /, whether it also did the chown and the clean-up),
    by what the image has: tar, else python3, else the agent's runtime. Raises
    LookupError when it has none of them (an image the agent cannot run in)."""
    for d in BIN_DIRS:
        if await exists(f"{d}/tar"):
            return ["tar", "-xpf", archive, "-C", "/"], False  # GNU or busybox tar: numeric owners (no names)
    for d in BIN_DIRS:
        if await exists(f"{d}/python3"):
            return [f"{d}/python3", "-I", "-c", SCRIPT, "/", archive, chown, *tops], True
    if await exists(PYTHON):
        return [LOADER, "--library-path", LIB_DIR, PYTHON, "-I", "-S", "-c", SCRIPT, "/", archive, chown, *tops], True
    raise LookupError("COPY needs tar or python3 in the image (or the agent's runtime)")
