"""Prometheus metrics: engine and store events, scrape-time gauges, the /metrics endpoint (docs/metrics.md)."""

from server.metrics.server_metrics import ServerMetrics

__all__ = ["ServerMetrics"]
