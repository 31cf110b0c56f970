"""Where arcbox-vm keeps its files on the host."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = Path("/var/lib/arcbox-vm")


def data_dir() -> Path:
    """`$ARCBOX_VM_DATA_DIR` if set, else /var/lib/arcbox-vm (images, sandboxes, state)."""
    env = os.environ.get("ARCBOX_VM_DATA_DIR")
    return Path(env) if env else DEFAULT_DATA_DIR
