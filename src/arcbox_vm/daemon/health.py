"""The standard gRPC health checking service (grpc.health.v1) on the daemon's sockets.

Two service names answer: "" (the daemon as a whole) and "sandbox.v1.SandboxService".
NOT_SERVING until the manager has started (adopted surviving VMs, cleaned up), SERVING
from then on, NOT_SERVING for good once shutdown begins (Watch streams see the change).
`arcbox-vm health --wait` (the systemd unit's readiness check) and any gRPC health probe
ask it; over TCP it needs no bearer token (it tells nothing but the status).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from arcbox_vm.api.registration import SERVICE

SERVICES = ("", SERVICE)
# Methods a bearer token is not required for (see api/auth.py).
OPEN_METHOD_PREFIX = "/grpc.health.v1.Health/"


class DaemonHealth:
    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def starting(self) -> None:
        for name in SERVICES:
            await self.servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def serving(self) -> None:
        for name in SERVICES:
            await self.servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def shutting_down(self) -> None:
        """NOT_SERVING from now on (later `serving()` calls are ignored)."""
        await self.servicer.enter_graceful_shutdown()
