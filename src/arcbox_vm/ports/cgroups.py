"""The cgroup port: the set of per-sandbox cgroups a manager owns (reconciled at start)."""

from __future__ import annotations

from typing import Protocol


class SandboxCgroupSet(Protocol):
    @property
    def enabled(self) -> bool: ...

    def list(self) -> list[str]:
        """Sandbox ids that have a cgroup under our root."""

    def pids(self, sandbox_id: str) -> list[int]: ...

    async def kill(self, sandbox_id: str) -> bool:
        """Kill everything in the sandbox's cgroup and remove it; True if it existed."""
