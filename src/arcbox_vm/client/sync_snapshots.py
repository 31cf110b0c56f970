"""The snapshot calls of the blocking `Client` (see AsyncClient / aio_snapshots.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from arcbox_vm.client.types import Created
from arcbox_vm.models import CheckpointInfo


class SyncSnapshotCalls:
    """Mixed into Client (which provides `_loop` and `aio`)."""

    _loop: Any
    aio: Any

    def checkpoint(self, sandbox_id: str, name: str = "") -> CheckpointInfo:
        return self._loop.run(self.aio.checkpoint(sandbox_id, name))

    def restore(self, snapshot_id: str, *, id: str | None = None, labels: Mapping[str, str] | None = None,
                ttl_seconds: int = 0, env: Mapping[str, str] | None = None) -> Created:
        return self._loop.run(self.aio.restore(snapshot_id, id=id, labels=labels, ttl_seconds=ttl_seconds, env=env))

    def list_checkpoints(self, sandbox_id: str | None = None) -> list[CheckpointInfo]:
        return self._loop.run(self.aio.list_checkpoints(sandbox_id))

    def delete_checkpoint(self, snapshot_id: str) -> None:
        self._loop.run(self.aio.delete_checkpoint(snapshot_id))

    def fork(self, sandbox_id: str, count: int = 1) -> list[Created]:
        return self._loop.run(self.aio.fork(sandbox_id, count))

    def pause(self, sandbox_id: str, to_disk: bool = False) -> None:
        self._loop.run(self.aio.pause(sandbox_id, to_disk))

    def resume(self, sandbox_id: str) -> None:
        self._loop.run(self.aio.resume(sandbox_id))
