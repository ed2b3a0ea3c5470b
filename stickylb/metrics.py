"""Theory of operation: ``GET /_lb/metrics``, Prometheus' text format, built with prometheus-client.

A custom collector reads stickylb's own counters (``core.stats``, the pool, the admission queue)
at scrape time, so the hot path only bumps plain integers. It goes through an intermediate form,
``Samples`` (family -> labels -> value), because that form also travels: with ``--workers N``
each worker sends its samples to the supervisor once a second (``group.py``), and a scrape
answered by any worker adds the other workers' latest samples to its own. Families that describe
the shared view (up, admin state, weight) are taken from the worker that answers; the others
are summed.

prometheus-client's process and platform collectors are registered too (per worker).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .core.pool import ADMIN_STATES
from .core.stats import AFFINITY_RESULTS, STATUS_CLASSES, Histogram, cumulative

if TYPE_CHECKING:
    from .app import Balancer

CONTENT_TYPE = CONTENT_TYPE_LATEST

# name -> (type, help, label names, summed across workers)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...], bool]] = {
    "stickylb_backend_up": (
        "gauge",
        "1 when the backend passes its health checks",
        ("backend",),
        False,
    ),
    "stickylb_backend_admin_state": (
        "gauge",
        "1 for the backend's admin state (ready, drain, maint)",
        ("backend", "state"),
        False,
    ),
    "stickylb_backend_weight": (
        "gauge",
        "Effective weight (after slow start)",
        ("backend",),
        False,
    ),
    "stickylb_backend_active_connections": (
        "gauge",
        "Requests in flight and open WebSockets",
        ("backend", "kind"),
        True,
    ),
    "stickylb_backend_requests": (
        "counter",
        "Answers relayed from the backend, by status class",
        ("backend", "code"),
        True,
    ),
    "stickylb_backend_request_duration_seconds": (
        "histogram",
        "From the start of a request to the end of its answer",
        ("backend",),
        True,
    ),
    "stickylb_backend_response_bytes": (
        "counter",
        "Answer body bytes relayed from the backend",
        ("backend",),
        True,
    ),
    "stickylb_backend_retries": (
        "counter",
        "Requests retried on another backend after failing on this one",
        ("backend",),
        True,
    ),
    "stickylb_backend_passive_failures": (
        "counter",
        "Failures of live traffic (connect errors, resets, timeouts)",
        ("backend",),
        True,
    ),
    "stickylb_health_checks": ("counter", "Health checks by result", ("backend", "result"), True),
    "stickylb_backend_state_changes": (
        "counter",
        "State changes by new state (up, down, ready, drain, maint, removed)",
        ("backend", "to"),
        True,
    ),
    "stickylb_affinity": (
        "counter",
        "How clients were placed: new (no cookie), hit (kept), repinned (moved), invalid cookie",
        ("result",),
        True,
    ),
    "stickylb_affinity_placed": (
        "counter",
        "New clients (no usable cookie) by what placed them: an affinity source or the strategy",
        ("source",),
        True,
    ),
    "stickylb_affinity_learned_sessions": (
        "gauge",
        "Application sessions learned by a learnCookie source",
        (),
        True,
    ),
    "stickylb_cluster_connected": (
        "gauge",
        "1 while the cluster store (Redis) answers; only with cluster",
        (),
        False,
    ),
    "stickylb_cluster_instances": (
        "gauge",
        "Instances of the cluster seen alive, this one included; only with cluster",
        (),
        False,
    ),
    "stickylb_cluster_leader": (
        "gauge",
        "1 on the instance that holds the alerting lease; only with cluster",
        (),
        False,
    ),
    "stickylb_responses": ("counter", "The balancer's own answers, by status", ("code",), True),
    "stickylb_queue_length": ("gauge", "Requests waiting in the queue", (), True),
    "stickylb_queue_wait_seconds": ("histogram", "Time spent in the queue", (), True),
    "stickylb_websocket_messages": (
        "counter",
        "WebSocket data messages relayed",
        ("backend", "direction"),
        True,
    ),
    "stickylb_alerts": ("counter", "Alerts by channel and result", ("channel", "result"), True),
}

Labels = tuple[str, ...]
Samples = dict[str, dict[Labels, Any]]  # family -> labels -> number, or (counts, sum)


def samples(balancer: Balancer) -> Samples:
    """This process's counters, in the form that is merged and exposed."""
    out: Samples = {name: {} for name in FAMILIES}
    for backend in balancer.pool.backends:
        b, s = str(backend.id), backend.stats
        out["stickylb_backend_up"][(b,)] = 1 if backend.healthy else 0
        for state in ADMIN_STATES:
            out["stickylb_backend_admin_state"][(b, state)] = int(backend.admin_state == state)
        out["stickylb_backend_weight"][(b,)] = backend.weight
        active = out["stickylb_backend_active_connections"]
        active[(b, "http")] = backend.active - s.tunnels
        active[(b, "websocket")] = s.tunnels
        for code, count in zip(STATUS_CLASSES, s.answers, strict=True):
            out["stickylb_backend_requests"][(b, code)] = count
        out["stickylb_backend_request_duration_seconds"][(b,)] = _hist(s.durations)
        out["stickylb_backend_response_bytes"][(b,)] = s.response_bytes
        out["stickylb_backend_retries"][(b,)] = s.retries
        out["stickylb_backend_passive_failures"][(b,)] = s.passive_failures
        out["stickylb_health_checks"][(b, "pass")] = s.checks_passed
        out["stickylb_health_checks"][(b, "fail")] = s.checks_failed
        for to, count in s.changes.items():
            out["stickylb_backend_state_changes"][(b, to)] = count
        sent, received = s.ws_messages_in, s.ws_messages_out
        for tunnel in balancer.pipeline.tunnels_of(backend):
            more_in, more_out = tunnel.messages()
            sent, received = sent + more_in, received + more_out
        out["stickylb_websocket_messages"][(b, "client_to_backend")] = sent
        out["stickylb_websocket_messages"][(b, "backend_to_client")] = received
    stats = balancer.stats
    for result, count in zip(AFFINITY_RESULTS, stats.affinity, strict=True):
        out["stickylb_affinity"][(result,)] = count
    for source, count in stats.placed_by().items():
        out["stickylb_affinity_placed"][(source,)] = count
    learned = balancer.sources.learned
    out["stickylb_affinity_learned_sessions"][()] = len(learned) if learned is not None else 0
    cluster = balancer.cluster
    if cluster is not None:
        out["stickylb_cluster_connected"][()] = int(cluster.connected)
        out["stickylb_cluster_instances"][()] = 1 + len(cluster.others)
        out["stickylb_cluster_leader"][()] = int(cluster.leader)
    for status, count in stats.own_answers.items():
        out["stickylb_responses"][(str(status),)] = count
    out["stickylb_queue_length"][()] = balancer.admission.queued
    out["stickylb_queue_wait_seconds"][()] = _hist(stats.queue_wait)
    for (channel, result), count in stats.alerts.items():
        out["stickylb_alerts"][(channel, result)] = count
    return out


def _hist(histogram: Histogram) -> tuple[list[int], float]:
    return (list(histogram.counts), histogram.total)


def add(into: Samples, other: Samples) -> None:
    """Add ``other``'s summed families to ``into`` (another worker's samples)."""
    for name, values in other.items():
        family = FAMILIES.get(name)
        if family is None or not family[3]:
            continue
        target = into.setdefault(name, {})
        for labels, value in values.items():
            labels = tuple(labels)
            mine = target.get(labels)
            if isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[0], list):
                counts, total = value
                if mine is None:
                    target[labels] = (list(counts), total)
                else:
                    target[labels] = (
                        [a + b for a, b in zip(mine[0], counts, strict=False)],
                        mine[1] + total,
                    )
            else:
                target[labels] = (mine or 0) + value


def to_wire(data: Samples) -> dict[str, list[list[Any]]]:
    """JSON-ready: labels tuples become lists."""
    return {
        name: [[list(labels), value] for labels, value in values.items()]
        for name, values in data.items()
    }


def from_wire(data: dict[str, list[list[Any]]]) -> Samples:
    return {name: {tuple(labels): value for labels, value in rows} for name, rows in data.items()}


class StickylbCollector:
    """A prometheus-client collector over one balancer (and the other workers' samples)."""

    def __init__(self, balancer: Balancer) -> None:
        self._balancer = balancer

    def collect(self) -> Iterator[Metric]:
        data = samples(self._balancer)
        elsewhere = self._balancer.control.elsewhere_samples
        if elsewhere is not None:
            add(data, elsewhere())
        for name, (kind, help_text, label_names, _) in FAMILIES.items():
            values = data.get(name, {})
            if kind == "histogram":
                histogram = HistogramMetricFamily(name, help_text, labels=label_names)
                for labels, (counts, total) in values.items():
                    histogram.add_metric(list(labels), cumulative(counts), total)
                yield histogram
            elif kind == "counter":
                counter = CounterMetricFamily(name, help_text, labels=label_names)
                for labels, value in values.items():
                    counter.add_metric(list(labels), value)
                yield counter
            else:
                gauge = GaugeMetricFamily(name, help_text, labels=label_names)
                for labels, value in values.items():
                    gauge.add_metric(list(labels), value)
                yield gauge


def registry_for(balancer: Balancer) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StickylbCollector(balancer))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
