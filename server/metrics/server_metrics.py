"""One server's metrics: its own registry, the engine observer, the store listener and the endpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest

from adapters_store.errors import AdapterNotFound
from adapters_store.store import AdapterStore
from server.config import ServerConfig
from server.metrics.adapter_usage import AdapterUsage
from server.metrics.collectors import ModelLabels, ServerStateCollector
from server.metrics.definitions import Metrics, method_label
from server.metrics.gateway import GatewayCollector
from server.metrics.http import MetricsServer
from server.metrics.loads import LoadMetrics
from server.metrics.observer import MetricsObserver

if TYPE_CHECKING:
    from server.app import ServingStack


class ServerMetrics:
    """Everything Prometheus sees of one server.

    Its own CollectorRegistry (not prometheus_client's global one), so several servers can live in one
    process. Order of use: `loads` goes to the adapter store as it is built, `attach(stack)` once the
    stack exists, `serve()` to open the endpoint, then `stack.engine.set_observer(self.observer)`.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = Metrics.create(self.registry, config.max_batch_size, config.device_adapters)
        self.usage = AdapterUsage(config.metrics_top_adapters)
        self.registry.register(self.usage)
        self.loads = LoadMetrics(self.metrics)
        self.observer: MetricsObserver | None = None
        self.server: MetricsServer | None = None

    def attach(self, stack: ServingStack) -> MetricsObserver:
        """Builds the engine observer and registers the scrape-time gauges over the stack's live objects."""
        store = stack.store
        observer = MetricsObserver(self.metrics, self.usage, lambda name: _method_of(store, name))
        loaded = stack.loaded
        model = ModelLabels(loaded.model_id, loaded.shape.architecture, str(loaded.dtype).removeprefix("torch."),
                            str(loaded.device))
        stats = stack.engine.stats
        self.registry.register(ServerStateCollector(observer.inflight, stats, store, stack.slots, model))
        self.registry.register(GatewayCollector(observer.inflight, stats, stack.slots.num_slots,
                                                self.config.metrics_vllm_compat))
        self.observer = observer
        return observer

    def serve(self) -> MetricsServer:
        """Opens the endpoint on --metrics-host (default: --host) and --metrics-port."""
        host = self.config.metrics_host or self.config.host
        try:
            self.server = MetricsServer(self.registry, host, self.config.metrics_port)
        except OSError as error:
            raise OSError(f"could not serve metrics on {host}:{self.config.metrics_port} ({error}); choose another "
                          f"--metrics-port, 0 for a free one, or -1 for none") from error
        return self.server

    def text(self) -> str:
        """What a scrape returns now (the Prometheus text format)."""
        return generate_latest(self.registry).decode()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def _method_of(store: AdapterStore, name: str) -> str:
    try:
        return method_label(store.get(name).methods)
    except AdapterNotFound:   # removed between admission and now
        return "unknown"
