"""Run the daemon: one SandboxManager, served on the Unix socket and optionally TCP.

SIGTERM/SIGINT: stop accepting calls, give running streams a short grace period, cancel
the rest, then leave the sandboxes running for the next start to adopt, or remove them
(daemon.on_shutdown), and release the data dir. VMM processes run in their own session,
so even a daemon killed with SIGKILL leaves them running for the next start.

Both sockets also serve the gRPC health service (health.py): SERVING once the manager
has started, NOT_SERVING from the moment shutdown begins. With `[metrics] addr` set,
Prometheus metrics are served there over HTTP (arcbox_vm.metrics). With `[cluster]
ray_address` set, the daemon is a node of a fleet on Ray (arcbox_vm.cluster.membership).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import grpc

from arcbox_vm.api.auth import BearerTokenInterceptor, read_token, server_credentials
from arcbox_vm.api.registration import generic_handler
from arcbox_vm.api.template_server import TemplateServicer
from arcbox_vm.api.snapshot_server import SnapshotServicer
from arcbox_vm.api.server import SandboxServicer
from arcbox_vm.config import VmmConfig
from arcbox_vm.daemon.health import OPEN_METHOD_PREFIX, DaemonHealth
from arcbox_vm.errors import ConfigError
from arcbox_vm.manager.sandbox_manager import SandboxManager

log = logging.getLogger("arcbox_vm.daemon")

STREAM_GRACE_S = 5.0


def _options(cfg: VmmConfig) -> list[tuple[str, int]]:
    size = cfg.grpc.max_message_mib << 20
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000)]


def _prepare_unix_socket(path: Path) -> None:
    """Create the parent dir; remove a stale socket, refuse if a live daemon answers on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: stale
        log.info("removed stale socket %s", path)
        return
    finally:
        probe.close()
    raise ConfigError(f"another daemon is serving on {path}; stop it first or set grpc.unix_socket")


def _secure_socket(path: Path, group: str) -> None:
    os.chmod(path, 0o660)
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"grpc.socket_group: no group named {group!r}") from None
        os.chown(path, -1, gid)


async def serve(cfg: VmmConfig, *, insecure_tcp: bool = False, ready: asyncio.Event | None = None,
                manager: SandboxManager | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT — or until `stop` is set, if given (then no signal
    handlers are installed). `manager` replaces the one built from `cfg` (tests)."""
    manager = manager or SandboxManager(cfg)
    metrics = _start_metrics(cfg, manager)  # before the start: what it does is counted too
    try:
        await manager._ensure_started()
    except BaseException:
        await _stop_metrics(metrics)
        raise
    servicer = SandboxServicer(manager, max_file_bytes=cfg.daemon.max_file_mib << 20)
    handlers = (generic_handler(servicer), generic_handler(SnapshotServicer(manager), "SandboxSnapshotService"),
                generic_handler(TemplateServicer(manager), "TemplateService"))
    health = DaemonHealth()
    await health.starting()
    servers: list[grpc.aio.Server] = []
    e2b = None  # the E2B-compatible API's servers ([e2b] enabled)
    unix_path = Path(cfg.grpc.unix_socket)
    membership = None
    try:
        _prepare_unix_socket(unix_path)
        unix_server = grpc.aio.server(options=_options(cfg))
        unix_server.add_generic_rpc_handlers(handlers)
        health.add_to(unix_server)
        unix_server.add_insecure_port(f"unix:{unix_path}")
        await unix_server.start()
        servers.append(unix_server)
        _secure_socket(unix_path, cfg.grpc.socket_group)
        log.info("serving sandbox.v1 on unix:%s", unix_path)
        if cfg.grpc.tcp_addr:
            servers.append(await _start_tcp(cfg, handlers, health, insecure_tcp))
        if cfg.e2b.enabled:
            from arcbox_vm.e2b.server import start_e2b  # its dependencies load only when enabled

            e2b = await start_e2b(cfg, manager)
        await health.serving()
        membership = _join_cluster(cfg)
        if stop is None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down: no new calls; %.0f s grace for running streams", STREAM_GRACE_S)
    finally:
        await health.shutting_down()
        if membership is not None:  # first: the fleet stops sending work here
            await membership.close()
        leave = cfg.daemon.on_shutdown == "leave"
        if leave:  # streams cut short by the shutdown leave their commands running, re-attachable
            manager.keep_commands_running()
        await asyncio.gather(*(s.stop(STREAM_GRACE_S) for s in servers),
                             *([e2b.stop()] if e2b is not None else []), return_exceptions=True)
        log.info("%s sandboxes (daemon.on_shutdown=%s)", "leaving running" if leave else "removing",
                 cfg.daemon.on_shutdown)
        await manager.close(remove_sandboxes=not leave)
        with contextlib.suppress(FileNotFoundError):
            unix_path.unlink()
        await _stop_metrics(metrics)
        log.info("stopped")


def _join_cluster(cfg: VmmConfig) -> Any:
    if not cfg.cluster.enabled:
        return None
    from arcbox_vm.cluster.membership import ClusterMembership  # Ray only with [cluster]

    membership = ClusterMembership(cfg)
    membership.start()
    return membership


def _start_metrics(cfg: VmmConfig, manager: SandboxManager) -> Any:
    if not cfg.metrics.addr:
        return None
    from arcbox_vm.metrics import serve_metrics  # prometheus_client only when metrics are on

    return serve_metrics(cfg.metrics.addr, manager)


async def _stop_metrics(started: Any) -> None:
    if started is not None:
        metrics, endpoint = started
        await asyncio.to_thread(endpoint.close)
        metrics.detach()


async def _start_tcp(cfg: VmmConfig, handlers: tuple[grpc.GenericRpcHandler, ...], health: DaemonHealth,
                     insecure: bool) -> grpc.aio.Server:
    g = cfg.grpc
    token = read_token(g.token, g.token_file)
    if not insecure and not (g.tls_cert and g.tls_key and token):
        raise ConfigError("grpc.tcp_addr needs TLS (grpc.tls_cert, grpc.tls_key) and a bearer token "
                          "(grpc.token or grpc.token_file); or start with --insecure-tcp on a trusted network")
    interceptors = [BearerTokenInterceptor(token, (OPEN_METHOD_PREFIX,))] if token else []
    server = grpc.aio.server(options=_options(cfg), interceptors=interceptors)
    server.add_generic_rpc_handlers(handlers)
    health.add_to(server)
    if insecure:
        port = server.add_insecure_port(g.tcp_addr)
    else:
        port = server.add_secure_port(g.tcp_addr, server_credentials(g.tls_cert, g.tls_key))
    if port == 0:
        raise ConfigError(f"cannot listen on grpc.tcp_addr {g.tcp_addr}")
    await server.start()
    log.info("serving sandbox.v1 on tcp:%s (%s, %s)", g.tcp_addr, "plaintext" if insecure else "TLS",
             "token required" if token else "NO token")
    return server
