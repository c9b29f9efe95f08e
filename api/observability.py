"""Request ids in the logs and Prometheus metrics (requests, latency, jobs by state, uploads)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.jobs.state import StateStore

request_id_var: ContextVar[str] = ContextVar("gradleak_request_id", default="-")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every log record (`-` outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())


class _JobsByState(Collector):
    def __init__(self, state: Callable[[], StateStore | None]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("gradleak_jobs", "Jobs in the state store, by state", labels=["state"])
        state = self._state()
        if state is not None:
            for status, count in state.count_by_status().items():
                family.add_metric([status.value], count)
        yield family


class Metrics:
    """One registry per app, so that several apps (tests) never share or clash on series."""

    def __init__(self, state: Callable[[], StateStore | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gradleak_http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gradleak_http_request_duration_seconds",
            "HTTP request latency by method and route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.jobs_submitted = Counter("gradleak_jobs_submitted", "Jobs created", registry=self.registry)
        self.uploads = Counter(
            "gradleak_uploads", "Uploads stored, by kind", ["kind"], registry=self.registry
        )
        self.upload_bytes = Counter(
            "gradleak_upload_bytes", "Bytes of uploads stored, by kind", ["kind"], registry=self.registry
        )
        self.registry.register(_JobsByState(state))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
