"""Prometheus metrics: one registry per process, `cairn_`-prefixed factories, a /metrics server.

Metrics are declared where they are measured, usually at module level:

    OPS = metrics.histogram("fuse_op_seconds", "FUSE operation latency", ["op"])

Asking twice for the same name returns the same metric, so a module imported twice (or two
modules sharing a metric) never hits prometheus_client's duplicate-registration error; asking
for the same name with another type or other labels is a programming error and raises.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from cairn.errors import ConfigError

__all__ = [
    "LATENCY_BUCKETS",
    "PREFIX",
    "REGISTRY",
    "MetricsServer",
    "counter",
    "exposition",
    "gauge",
    "histogram",
    "parse_addr",
    "start_metrics_server",
]

PREFIX = "cairn_"
# Seconds, from a cached metadata lookup (~100us) to a slow object-store upload (~1 min).
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

# Our own registry rather than prometheus_client's global one, so libraries that register
# there cannot collide with Cairn's names; the process/platform/gc collectors are added by hand.
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

_metrics: dict[str, tuple[type, tuple[str, ...], Any]] = {}
_lock = threading.Lock()


def _full_name(name: str, kind: type) -> str:
    name = name if name.startswith(PREFIX) else PREFIX + name
    if kind is Counter and name.endswith("_total"):
        name = name[: -len("_total")]  # prometheus_client adds it back on exposition
    return name


def _get_or_create(
    kind: type, name: str, documentation: str, labels: Sequence[str], **options
) -> Any:
    full = _full_name(name, kind)
    labels = tuple(labels)
    with _lock:
        known = _metrics.get(full)
        if known is not None:
            known_kind, known_labels, metric = known
            if known_kind is not kind or known_labels != labels:
                raise ValueError(
                    f"metric {full} already exists as {known_kind.__name__} "
                    f"with labels {list(known_labels)}"
                )
            return metric
        metric = kind(full, documentation, labels, registry=REGISTRY, **options)
        _metrics[full] = (kind, labels, metric)
        return metric


def counter(name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
    """A counter named cairn_<name> (exposed with a _total suffix)."""
    return _get_or_create(Counter, name, documentation, labels)


def gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
    """A gauge named cairn_<name>."""
    return _get_or_create(Gauge, name, documentation, labels)


class HistogramChild:
    """One label set of a Histogram: `observe` is a bisect and three additions, no lock.

    Histograms are observed on every FUSE request, where prometheus_client's own (a lock
    and a cumulative walk per observation) cost several percent of a request's CPU. A scrape
    from the /metrics thread may see an observation half-counted; the next one sees it whole.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class Histogram:
    """A labelled latency histogram exposed in Prometheus' format (`le` buckets, _sum,
    _count); `labels(*values)` returns the HistogramChild to observe."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], *,
                 registry: CollectorRegistry, buckets: Sequence[float]) -> None:  # fmt: skip
        self.name = name
        self.documentation = documentation
        self.label_names = tuple(labels)
        self.bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))
        self.children: dict[tuple[str, ...], HistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str, **named: str) -> HistogramChild:
        if named:
            if values or set(named) != set(self.label_names):
                raise ValueError(f"{self.name} takes labels {list(self.label_names)}")
            values = tuple(named[n] for n in self.label_names)
        key = tuple(str(v) for v in values)
        if len(key) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {list(self.label_names)}")
        child = self.children.get(key)
        if child is None:
            child = self.children.setdefault(key, HistogramChild(self.bounds))
        return child

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)
        for key, child in list(self.children.items()):
            running, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), list(child.counts), strict=True):
                running += count
                buckets.append((_bound_text(bound), running))
            family.add_metric(list(key), buckets, child.sum)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def histogram(
    name: str,
    documentation: str,
    labels: Sequence[str] = (),
    buckets: Sequence[float] = LATENCY_BUCKETS,
) -> Histogram:
    """A histogram named cairn_<name>; latency buckets in seconds unless told otherwise."""
    return _get_or_create(Histogram, name, documentation, labels, buckets=tuple(buckets))


def exposition() -> bytes:
    """The registry in Prometheus text format, as /metrics serves it."""
    return generate_latest(REGISTRY)


@dataclass
class MetricsServer:
    """A running /metrics endpoint; `stop` closes its socket and joins its thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def host(self) -> str:
        return self.server.server_address[0]

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def parse_addr(addr: str) -> tuple[str, int]:
    """ "host:port", ":port" (all interfaces) or "[v6]:port" -> (host, port)."""
    host, sep, port = addr.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"metrics address {addr!r}: expected host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def start_metrics_server(addr: str | None) -> MetricsServer | None:
    """Serves /metrics on addr ("host:port"; port 0 picks a free one) from a daemon thread.

    An empty addr means metrics are off: returns None.
    """
    if not addr or not addr.strip():
        return None
    host, port = parse_addr(addr)
    try:
        server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as error:
        raise ConfigError(f"metrics address {addr!r}: {error.strerror or error}") from None
    return MetricsServer(server, thread)
