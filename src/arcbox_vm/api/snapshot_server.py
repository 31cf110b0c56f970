"""The sandbox.v1 SandboxSnapshotService servicer: validate, convert, call the manager."""

from __future__ import annotations

import datetime
import logging
from typing import Any

import grpc

from arcbox_vm import logctx
from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.api.server import _check, _need_id, unary
from arcbox_vm.errors import InvalidArgument
from arcbox_vm.manager.sandbox_manager import SandboxManager
from arcbox_vm.models import CheckpointInfo, RestoreSandboxSpec, SandboxNetworkSpec

log = logging.getLogger(__name__)


def rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _snapshot_dir(mgr: SandboxManager, snapshot_id: str) -> str:
    return str(mgr.data_dir / "checkpoints" / snapshot_id)


def _network(request: pb.RestoreRequest) -> SandboxNetworkSpec | None:
    if not request.HasField("network"):
        return None
    n = request.network
    return SandboxNetworkSpec(mode=n.mode or "tap", egress=n.egress or None, allow_out=list(n.allow_out),
                              deny_out=list(n.deny_out))


class SnapshotServicer:
    def __init__(self, manager: SandboxManager) -> None:
        self.mgr = manager

    def _summary(self, c: CheckpointInfo) -> pb.SnapshotSummary:
        return pb.SnapshotSummary(id=c.snapshot_id, sandbox_id=c.sandbox_id, name=c.name,
                                  snapshot_dir=_snapshot_dir(self.mgr, c.snapshot_id), created_at=rfc3339(c.created_at),
                                  size_bytes=c.size_bytes, in_use=c.in_use)

    @unary
    async def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.aio.ServicerContext) -> pb.CheckpointResponse:
        _check(request)
        if not request.sandbox_id:
            raise InvalidArgument("sandbox_id is required")
        logctx.sandbox_id.set(request.sandbox_id)
        c = await self.mgr.checkpoint_sandbox(request.sandbox_id, request.name)
        return pb.CheckpointResponse(snapshot_id=c.snapshot_id, snapshot_dir=_snapshot_dir(self.mgr, c.snapshot_id),
                                     created_at=rfc3339(c.created_at), size_bytes=c.size_bytes, name=c.name,
                                     sandbox_id=c.sandbox_id)

    @unary
    async def Restore(self, request: pb.RestoreRequest, context: grpc.aio.ServicerContext) -> pb.RestoreResponse:
        _check(request)
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        spec = RestoreSandboxSpec(snapshot_id=request.snapshot_id, id=request.id or None, labels=dict(request.labels),
                                  ttl_seconds=request.ttl_seconds, env=dict(request.env), network=_network(request))
        sid, ip = await self.mgr.restore_sandbox(spec)
        logctx.sandbox_id.set(sid)
        log.info("restoring from %s (ip %s)", request.snapshot_id, ip or "none")
        return pb.RestoreResponse(id=sid, ip_address=ip)

    @unary
    async def ListSnapshots(self, request: pb.ListSnapshotsRequest,
                            context: grpc.aio.ServicerContext) -> pb.ListSnapshotsResponse:
        _check(request)
        if request.labels:
            raise InvalidArgument("checkpoints have no labels; filter by sandbox_id")
        return pb.ListSnapshotsResponse(
            snapshots=[self._summary(c) for c in self.mgr.list_checkpoints(request.sandbox_id or None)])

    @unary
    async def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest, context: grpc.aio.ServicerContext) -> pb.Empty:
        _check(request)
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        self.mgr.delete_checkpoint(request.snapshot_id)
        return pb.Empty()

    @unary
    async def Fork(self, request: pb.ForkRequest, context: grpc.aio.ServicerContext) -> pb.ForkResponse:
        clones = await self.mgr.fork_sandbox(_need_id(request), request.count or 1)
        return pb.ForkResponse(clones=[pb.RestoreResponse(id=sid, ip_address=ip) for sid, ip in clones])

    @unary
    async def Pause(self, request: pb.PauseRequest, context: grpc.aio.ServicerContext) -> pb.Empty:
        await self.mgr.pause_sandbox(_need_id(request), to_disk=request.to_disk)
        return pb.Empty()

    @unary
    async def Resume(self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext) -> pb.Empty:
        await self.mgr.resume_sandbox(_need_id(request))
        return pb.Empty()


__all__: list[Any] = ["SnapshotServicer"]
