"""Prometheus metrics of a `SandboxManager` (the daemon serves them at `[metrics] addr`).

    metrics = ManagerMetrics(manager).attach()          # counts from now on
    endpoint = MetricsEndpoint("127.0.0.1:9464", metrics.registry)
    ...
    endpoint.close(); metrics.detach()

Modules: instruments.py (the counters and histograms, fed by the manager's observers),
collector.py (sandboxes by state and per-sandbox CPU, memory, I/O, read at scrape time),
endpoint.py (the HTTP server). The manager knows nothing of this package: it only calls
its observers (manager/observers.py); this package uses the manager's public API.
"""

from prometheus_client import disable_created_metrics

from arcbox_vm.metrics.endpoint import MetricsEndpoint
from arcbox_vm.metrics.instruments import ManagerMetrics

__all__ = ["ManagerMetrics", "MetricsEndpoint", "serve_metrics"]


def serve_metrics(addr: str, manager, *, created_series: bool = False) -> tuple[ManagerMetrics, MetricsEndpoint]:  # noqa: ANN001
    """Attach metrics to `manager` and serve them on `addr` ("host:port"), as the daemon
    does. Without `created_series` the `*_created` samples of counters and histograms are
    left out (noise in the text format; prometheus_client's switch is process-wide)."""
    if not created_series:
        disable_created_metrics()
    metrics = ManagerMetrics(manager).attach()
    try:
        return metrics, MetricsEndpoint(addr, metrics.registry)
    except BaseException:
        metrics.detach()
        raise
