"""The E2B view of the manager's sandboxes: which are E2B's, their template and metadata.

A sandbox made through the E2B API carries a reserved label (prefix `arcbox-e2b/`): its
template. Only such sandboxes are visible to E2B clients; their metadata is their other
labels (reserved ones are hidden). Their network options are the egress policy
(`network.py`), not labels.
"""

from __future__ import annotations

import secrets
from typing import Any

from arcbox_vm.errors import InvalidArgument, SandboxNotFound
from arcbox_vm.models import SandboxInfo, SandboxState

PREFIX = "arcbox-e2b/"
TEMPLATE = PREFIX + "template"

BASE_TEMPLATE = "base"
LIVE = (SandboxState.STARTING, SandboxState.READY, SandboxState.RUNNING)
VISIBLE = (*LIVE, SandboxState.PAUSED)  # what the control plane shows: E2B's running and paused


def new_id() -> str:
    """A sandbox id as E2B makes them: short, lowercase letters and digits."""
    return "i" + secrets.token_hex(10)


def is_e2b(labels: dict[str, str]) -> bool:
    return TEMPLATE in labels


def metadata(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if not k.startswith(PREFIX)}


def template_of(labels: dict[str, str]) -> str:
    return labels.get(TEMPLATE, BASE_TEMPLATE)


def creation_labels(template: str, meta: dict[str, str]) -> dict[str, str]:
    """The labels a new sandbox gets: its metadata plus the reserved one."""
    for key in meta:
        if key.startswith(PREFIX):
            raise InvalidArgument(f"metadata keys starting with {PREFIX!r} are reserved")
    return {**meta, TEMPLATE: template}


def get_live(manager: Any, sandbox_id: str) -> SandboxInfo:
    """The E2B sandbox `sandbox_id` if it is starting or running (what envd serves); else
    SandboxNotFound."""
    info = get_any(manager, sandbox_id)
    if info.state not in LIVE:
        raise SandboxNotFound(sandbox_id)
    return info


def get_visible(manager: Any, sandbox_id: str) -> SandboxInfo:
    """The E2B sandbox `sandbox_id` if it is running or paused (what the control plane
    shows); stopped or failed ones are gone for E2B clients: SandboxNotFound."""
    info = get_any(manager, sandbox_id)
    if info.state not in VISIBLE:
        raise SandboxNotFound(sandbox_id)
    return info


def is_paused(info: SandboxInfo) -> bool:
    return info.state == SandboxState.PAUSED


def get_any(manager: Any, sandbox_id: str) -> SandboxInfo:
    info = manager.inspect_sandbox(sandbox_id)
    if not is_e2b(info.labels):
        raise SandboxNotFound(sandbox_id)
    return info
