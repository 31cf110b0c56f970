"""Named network namespaces (the `ip netns` kind, bound under /run/netns)."""

from __future__ import annotations

from pyroute2 import netns as _netns


def exists(name: str) -> bool:
    return name in _netns.listnetns()


def ensure(name: str) -> bool:
    """Create namespace `name` if missing; True if we created it."""
    if exists(name):
        return False
    _netns.create(name)
    return True


def remove(name: str) -> None:
    if exists(name):
        _netns.remove(name)


def exec_prefix(name: str) -> list[str]:
    """argv prefix that runs a program inside namespace `name` ("" = no prefix)."""
    return ["ip", "netns", "exec", name] if name else []
