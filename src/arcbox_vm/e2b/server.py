"""Serve the E2B API in the daemon: two HTTP servers (uvicorn) on the daemon's event
loop, over the daemon's one SandboxManager. `start_e2b` binds both addresses (errors
surface here, not in a log), `E2bServers.stop` closes them with a short grace period."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from arcbox_vm.config import VmmConfig
from arcbox_vm.e2b.context import E2bContext
from arcbox_vm.e2b.control import build_app
from arcbox_vm.e2b.envd.app import EnvdApp
from arcbox_vm.e2b.envd.http_proxy import QUIET_ABORTS
from arcbox_vm.e2b.keys import AccessTokens, ApiKeys, load_api_keys
from arcbox_vm.errors import ConfigError

log = logging.getLogger("arcbox_vm.e2b")

GRACE_S = 5.0
MAX_CONNECTIONS = 1024  # per server; more are answered 503


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(addr: str, what: str) -> socket.socket:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"e2b.{what}: cannot listen on {addr}: {exc.strerror}") from None
    sock.listen(256)
    sock.setblocking(False)
    return sock


class E2bServers:
    def __init__(self, envd: EnvdApp) -> None:
        self.envd = envd
        self._servers: list[tuple[uvicorn.Server, asyncio.Task]] = []
        self.addresses: dict[str, str] = {}

    async def _serve(self, app: Any, sock: socket.socket, cfg: VmmConfig, name: str) -> None:
        e = cfg.e2b
        tls = {"ssl_certfile": e.tls_cert, "ssl_keyfile": e.tls_key} if e.tls_cert else {}
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, server_header=False,
                                timeout_graceful_shutdown=int(GRACE_S), limit_concurrency=MAX_CONNECTIONS,
                                http="h11", ws="none", **tls)  # type: ignore[arg-type]
        server = _EmbeddedServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name=f"e2b-{name}")
        self._servers.append((server, task))
        while not server.started:
            if task.done():
                exc = task.exception()
                raise ConfigError(f"the E2B {name} server did not start: {exc!r}")
            await asyncio.sleep(0.01)
        host, port = sock.getsockname()[:2]
        self.addresses[name] = f"{'https' if tls else 'http'}://{host}:{port}"
        log.info("serving the E2B %s on %s", name, self.addresses[name])

    async def stop(self) -> None:
        for server, _ in self._servers:
            server.should_exit = True
        for _, task in self._servers:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, GRACE_S + 5)
        self._servers.clear()
        await self.envd.close()


async def start_e2b(cfg: VmmConfig, manager: Any) -> E2bServers:
    """Bind and serve the control plane (e2b.api_addr) and the in-sandbox API
    (e2b.sandbox_addr) over `manager`."""
    e = cfg.e2b
    if e.needs_tls and not (e.tls_cert and e.tls_key):
        raise ConfigError("e2b: api_addr/sandbox_addr outside loopback need TLS (e2b.tls_cert and e2b.tls_key)")
    for f in (e.tls_cert, e.tls_key):
        if f and not Path(f).is_file():
            raise ConfigError(f"e2b: TLS file {f} does not exist")
    ctx = E2bContext(manager=manager, config=e, api_keys=ApiKeys(load_api_keys(e)),
                     tokens=AccessTokens.from_data_dir(cfg.data_dir), network_mode=e.network,
                     default_egress=cfg.network.default_egress,
                     max_file_bytes=cfg.daemon.max_file_mib << 20)
    envd = EnvdApp(ctx)
    logging.getLogger("uvicorn.error").addFilter(QUIET_ABORTS)  # once: the same filter is added only once
    servers = E2bServers(envd)
    api_sock = _bind(e.api_addr, "api_addr")
    try:
        sandbox_sock = _bind(e.sandbox_addr, "sandbox_addr")
    except BaseException:
        api_sock.close()
        raise
    try:
        await servers._serve(build_app(ctx), api_sock, cfg, "control plane")
        await servers._serve(envd, sandbox_sock, cfg, "in-sandbox API")
    except BaseException:
        await servers.stop()
        raise
    return servers
