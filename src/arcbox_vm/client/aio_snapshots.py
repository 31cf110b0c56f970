"""The snapshot calls of `AsyncClient` (SandboxSnapshotService): checkpoint, restore,
list and delete checkpoints, fork, pause, resume. Mixed into AsyncClient."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.api.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from arcbox_vm.client.convert import str_map
from arcbox_vm.client.types import Created
from arcbox_vm.models import CheckpointInfo


def _time(text: str) -> float:
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def checkpoint_from_pb(m: Any) -> CheckpointInfo:
    snapshot_id = m.snapshot_id if hasattr(m, "snapshot_id") else m.id
    return CheckpointInfo(snapshot_id=snapshot_id, name=m.name, sandbox_id=m.sandbox_id,
                          created_at=_time(m.created_at), size_bytes=m.size_bytes, in_use=getattr(m, "in_use", 0))


class SnapshotCalls:
    """Provided by AsyncClient: `_open_channel()`, `_unary()`."""

    _snap_channel: Any = None
    _snap_stub_: Any = None

    def _open_channel(self) -> Any:  # pragma: no cover - AsyncClient's
        raise NotImplementedError

    async def _unary(self, method: Any, request: Any, **kw: Any) -> Any:  # pragma: no cover - AsyncClient's
        raise NotImplementedError

    @property
    def _snap(self) -> pb_grpc.SandboxSnapshotServiceStub:
        channel = self._open_channel()
        if self._snap_stub_ is None or self._snap_channel is not channel:
            self._snap_channel, self._snap_stub_ = channel, pb_grpc.SandboxSnapshotServiceStub(channel)
        return self._snap_stub_

    async def checkpoint(self, sandbox_id: str, name: str = "") -> CheckpointInfo:
        """Save the sandbox's memory, device state and disk; it runs on."""
        reply = await self._unary(self._snap.Checkpoint, pb.CheckpointRequest(sandbox_id=sandbox_id, name=name),
                                  sandbox_id=sandbox_id)
        return checkpoint_from_pb(reply)

    async def restore(self, snapshot_id: str, *, id: str | None = None, labels: Mapping[str, str] | None = None,
                      ttl_seconds: int = 0, env: Mapping[str, str] | None = None) -> Created:
        """A new sandbox from a checkpoint; returns at once (use `wait_ready`)."""
        request = pb.RestoreRequest(id=id or "", snapshot_id=snapshot_id, labels=str_map(labels),
                                    ttl_seconds=ttl_seconds, env=str_map(env))
        reply = await self._unary(self._snap.Restore, request, sandbox_id=id or "")
        return Created(reply.id, reply.ip_address, "starting")

    async def list_checkpoints(self, sandbox_id: str | None = None) -> list[CheckpointInfo]:
        reply = await self._unary(self._snap.ListSnapshots, pb.ListSnapshotsRequest(sandbox_id=sandbox_id or ""))
        return [checkpoint_from_pb(s) for s in reply.snapshots]

    async def delete_checkpoint(self, snapshot_id: str) -> None:
        await self._unary(self._snap.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=snapshot_id))

    async def fork(self, sandbox_id: str, count: int = 1) -> list[Created]:
        """`count` running clones of the sandbox (returns once all are ready)."""
        reply = await self._unary(self._snap.Fork, pb.ForkRequest(id=sandbox_id, count=count), sandbox_id=sandbox_id)
        return [Created(c.id, c.ip_address, "ready") for c in reply.clones]

    async def pause(self, sandbox_id: str, to_disk: bool = False) -> None:
        await self._unary(self._snap.Pause, pb.PauseRequest(id=sandbox_id, to_disk=to_disk), sandbox_id=sandbox_id)

    async def resume(self, sandbox_id: str) -> None:
        await self._unary(self._snap.Resume, pb.ResumeRequest(id=sandbox_id), sandbox_id=sandbox_id)
