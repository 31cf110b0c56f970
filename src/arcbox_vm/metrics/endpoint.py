"""The HTTP endpoint Prometheus scrapes: prometheus_client's own server, in a thread.

Plain HTTP without authentication, serving the registry at any path (conventionally
/metrics): bind it to loopback or a management network ([metrics] addr).
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, start_http_server

from arcbox_vm.errors import ConfigError

log = logging.getLogger(__name__)


def split_addr(addr: str) -> tuple[str, int]:
    """"127.0.0.1:9464" / "[::1]:9464" → (host, port)."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsEndpoint:
    """A running endpoint; `close()` stops it."""

    def __init__(self, addr: str, registry: CollectorRegistry) -> None:
        host, port = split_addr(addr)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ConfigError(f"metrics.addr: cannot listen on {addr}: {exc.strerror or exc}") from None
        self.host, self.port = host, self._server.server_port
        self._closed = threading.Event()
        log.info("serving Prometheus metrics on http://%s/metrics", addr)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
