"""The set of files that make up the guest agent inside a VM image.

Image building (`arcbox_vm.images`) and agent injection into a user's rootfs both take
their files from here, so there is one definition of what "the agent" is, and its hash
keys the image cache (a changed agent means a new image).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

GUEST_LIB_DIR = "/usr/lib/arcbox-vm-agent"
LAUNCHER_PATH = "/sbin/vm-agent"

LAUNCHER = f"""#!/usr/bin/python3 -S
# arcbox-vm guest agent (PID 1). Installed by arcbox-vm; do not edit.
import sys
sys.path.insert(0, "{GUEST_LIB_DIR}")
from arcbox_vm.agent.guest.main import main
main()
""".encode()

_AGENT_DIR = Path(__file__).resolve().parent


def agent_files() -> dict[str, tuple[bytes, int]]:
    """Map guest path -> (content, mode) for every file the agent needs in the guest."""
    files: dict[str, tuple[bytes, int]] = {
        f"{GUEST_LIB_DIR}/arcbox_vm/__init__.py": (b"", 0o644),
        f"{GUEST_LIB_DIR}/arcbox_vm/agent/__init__.py": (b"", 0o644),
        f"{GUEST_LIB_DIR}/arcbox_vm/agent/protocol.py": ((_AGENT_DIR / "protocol.py").read_bytes(), 0o644),
        LAUNCHER_PATH: (LAUNCHER, 0o755),
    }
    for src in sorted((_AGENT_DIR / "guest").glob("*.py")):
        files[f"{GUEST_LIB_DIR}/arcbox_vm/agent/guest/{src.name}"] = (src.read_bytes(), 0o644)
    return files


def agent_digest() -> str:
    """A stable hash of the agent files (paths, modes and contents)."""
    h = hashlib.sha256()
    for path, (data, mode) in sorted(agent_files().items()):
        h.update(path.encode() + b"\0" + oct(mode).encode() + b"\0")
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()
