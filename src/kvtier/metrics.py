"""kvtier's metrics, declared once, exposed as Prometheus text by ``prometheus_client``.

Every metric a user needs to debug a cache is declared here: :class:`CacheMetrics` (an engine and its tiers),
:class:`IntegrationMetrics` (an engine integration) and :class:`ServerMetrics` (the cache server, registered next to
the cache's so that ``/metrics`` is one page). Names follow Prometheus conventions (``_total`` counters,
``_seconds`` / ``_bytes`` units). The server serves :meth:`Registry.render` on ``/metrics``,
:meth:`Registry.snapshot` on ``/status`` and :meth:`Registry.labeled` on ``/dashboard/data``.

The exposition is prometheus_client's: each metric is a collector that yields one ``*MetricFamily``, each
:class:`Registry` owns a ``CollectorRegistry`` of its own (never the process-wide default one: a process holds many
engines, and vLLM registers its own metrics there) and renders it with ``generate_latest``. A thin wrapper over the
values is kept rather than prometheus_client's ``Counter`` / ``Gauge`` / ``Histogram`` because it gives kvtier

- one place that declares each metric with its labels, and a ``ValueError`` naming the metric for a wrong label set;
- gauges read from callbacks when collected, labelled and summed over several sources (prometheus_client's
  ``Gauge.set_function`` takes no labels);
- values read back (``value``, ``total``, ``count``, ``snapshot``) for ``/status`` and tests, which
  prometheus_client's metrics only offer through private attributes;
- no ``_created`` series, which prometheus_client's ``Counter`` and ``Histogram`` add to every label set and only a
  process-wide switch turns off.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client import generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    Sample,
)
from prometheus_client.utils import floatToGoString

LabelValues = tuple[str, ...]

LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Metric(ABC):
    """A metric with declared labels; a prometheus_client collector of its one family."""

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labels = tuple(labels)
        self._lock = threading.Lock()  # engines update metrics from many threads

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(labels)}")
        return tuple(str(labels[name]) for name in self.labels)

    @abstractmethod
    def collect(self) -> Iterator[Metric]:
        """Yield this metric's family with its current samples (prometheus_client's collector protocol)."""

    @abstractmethod
    def totals(self) -> dict[str, float]:
        """This metric's entries in :meth:`Registry.snapshot`."""

    def samples(self) -> list[Sample]:
        """The samples the exposition shows now (for failure messages)."""
        return [sample for family in self.collect() for sample in family.samples]


class Counter(_Metric):
    def __init__(self, name: str, help_text: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        # An unlabelled counter is exposed as 0 before its first increment; a labelled one has no label values yet.
        self._values: dict[LabelValues, float] = {} if self.labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name} only goes up, got an increment of {amount}")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def values(self) -> dict[LabelValues, float]:
        with self._lock:
            return dict(self._values)

    def total(self) -> float:
        with self._lock:  # another thread may add a label set while we sum
            return sum(self._values.values())

    def collect(self) -> Iterator[Metric]:
        # The family strips the name's "_total" and its samples add it back: the exposed names stay as declared.
        family = CounterMetricFamily(self.name, self.help, labels=self.labels)
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            family.add_metric(key, value)
        yield family

    def totals(self) -> dict[str, float]:
        return {self.name: self.total()}


GaugeSource = Callable[[], dict[LabelValues, float]]


class Gauge(_Metric):
    """A gauge whose values are read from callbacks when collected (capacity, usage, queue depth). Sources
    reporting the same labels add up: several engines of one server each count their own leases."""

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._sources: list[GaugeSource] = []

    def add_source(self, source: GaugeSource) -> GaugeSource:
        """Add ``source``; return it, for :meth:`remove_source` when its owner closes."""
        with self._lock:
            self._sources.append(source)
        return source

    def remove_source(self, source: GaugeSource) -> None:
        with self._lock:
            self._sources.remove(source)

    def values(self) -> dict[LabelValues, float]:
        with self._lock:
            sources = list(self._sources)
        merged: dict[LabelValues, float] = {}
        for source in sources:
            for labels, value in source().items():
                merged[labels] = merged.get(labels, 0.0) + value
        return merged

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.help, labels=self.labels)
        for key, value in sorted(self.values().items()):
            family.add_metric(key, value)
        yield family

    def totals(self) -> dict[str, float]:
        return {self.name: sum(self.values().values())}


class Histogram(_Metric):
    def __init__(
        self, name: str, help_text: str, labels: Iterable[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS
    ) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self._le = [*map(floatToGoString, self.buckets), "+Inf"]  # the bounds as prometheus_client's own write them
        self._counts: dict[LabelValues, list[int]] = {}  # per label set: observations per bucket, not cumulative
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * len(self._le))
            counts[bisect.bisect_left(self.buckets, value)] += 1  # bounds are inclusive (le)
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        return sum(self._counts.get(self._key(labels), ()))

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        with self._lock:
            items = sorted((key, list(counts), self._sums[key]) for key, counts in self._counts.items())
        for key, counts, total in items:
            family.add_metric(key, list(zip(self._le, itertools.accumulate(counts), strict=True)), total)
        yield family

    def totals(self) -> dict[str, float]:
        with self._lock:
            return {self.name + "_count": sum(map(sum, self._counts.values()))}


M = TypeVar("M", bound=_Metric)


class Registry:
    """An ordered set of metrics, exposed through a prometheus_client registry of its own."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors = CollectorRegistry()

    def register(self, metric: M) -> M:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        self._collectors.register(metric)
        return metric

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        return generate_latest(self._collectors).decode()

    def labeled(self) -> dict[str, list[dict[str, Any]]]:
        """Every counter's and gauge's value per label set, ``{name: [{"labels": {...}, "value": x}]}``: what
        ``/metrics`` shows, as JSON for the dashboard (histograms are left out: it draws none)."""
        return {
            metric.name: [
                {"labels": dict(zip(metric.labels, key, strict=True)), "value": value}
                for key, value in sorted(metric.values().items())
            ]
            for metric in self._metrics.values()
            if isinstance(metric, Counter | Gauge)
        }

    def snapshot(self) -> dict[str, float]:
        """Counter totals and gauge sums by name, histogram observation counts as ``name_count`` (for /status)."""
        snap: dict[str, float] = {}
        for metric in self._metrics.values():
            snap.update(metric.totals())
        return snap


class CacheMetrics:
    """Every metric of the cache engine and its tiers. One instance per engine."""

    def __init__(self) -> None:
        self.registry = r = Registry()
        tier = ("tier",)
        self.lookups = _c(r, "kvtier_lookup_requests_total", "Lookup calls.")
        self.lookup_tokens = _c(r, "kvtier_lookup_tokens_total", "Tokens asked for in lookups.")
        self.lookup_hit_tokens = _c(r, "kvtier_lookup_hit_tokens_total", "Prefix tokens found by lookups.")
        self.retrieves = _c(r, "kvtier_retrieve_requests_total", "Retrieve calls.")
        self.retrieve_tokens = _c(r, "kvtier_retrieve_tokens_total", "Tokens asked for in retrieves.")
        self.hit_tokens = _c(
            r, "kvtier_retrieve_hit_tokens_total", "Tokens retrieved, by the tier they came from.", tier
        )
        self.stores = _c(r, "kvtier_store_requests_total", "Store calls.")
        self.stored_tokens = _c(r, "kvtier_stored_tokens_total", "Tokens newly stored.")
        self.store_skipped_tokens = _c(
            r, "kvtier_store_skipped_tokens_total", "Tokens not stored because already cached (dedup)."
        )
        self.store_dropped_tokens = _c(r, "kvtier_store_dropped_tokens_total", "Tokens not stored for lack of memory.")
        self.read_bytes = _c(r, "kvtier_tier_read_bytes_total", "Bytes read from a tier.", tier)
        self.write_bytes = _c(r, "kvtier_tier_write_bytes_total", "Bytes written to a tier.", tier)
        self.read_seconds = _h(r, "kvtier_tier_read_seconds", "Latency of one chunk read from a tier.", tier)
        self.write_seconds = _h(r, "kvtier_tier_write_seconds", "Latency of one chunk write to a tier.", tier)
        self.evictions = _c(r, "kvtier_evictions_total", "Chunks evicted from a tier.", tier)
        self.fetch_skipped_tokens = _c(
            r,
            "kvtier_fetch_skipped_tokens_total",
            "Cached tokens not read because recomputing was estimated faster.",
            tier,
        )
        self.promotions = _c(r, "kvtier_promotions_total", "Chunks copied up into memory after a hit in a slower tier.")
        self.errors = _c(
            r,
            "kvtier_errors_total",
            "Errors by tier and kind (corrupt, truncated, io, write_dropped, ...).",
            ("tier", "kind"),
        )
        self.lookup_seconds = _h(r, "kvtier_lookup_seconds", "Lookup latency.")
        self.store_seconds = _h(
            r, "kvtier_store_seconds", "Store latency (memory tier; slower tiers are written in the background)."
        )
        self.retrieve_seconds = _h(r, "kvtier_retrieve_seconds", "Retrieve latency.")
        self.used_bytes = _g(r, "kvtier_tier_used_bytes", "Bytes used by a tier.", tier)
        self.capacity_bytes = _g(r, "kvtier_tier_capacity_bytes", "Byte budget of a tier.", tier)
        self.chunks = _g(r, "kvtier_tier_chunks", "Chunks held by a tier.", tier)
        self.pinned_chunks = _g(r, "kvtier_pinned_chunks", "Chunks pinned by leases, per tier.", tier)
        self.queued_write_bytes = _g(
            r, "kvtier_background_write_queue_bytes", "Bytes waiting to be written to a slower tier.", tier
        )
        self.active_leases = _g(r, "kvtier_active_leases", "Lookup leases not yet released or expired.")
        self.miss_tokens = _c(
            r,
            "kvtier_miss_tokens_total",
            "Prompt tokens not served from the cache, by call (lookup, retrieve) and reason (docs/operations.md).",
            ("op", "reason"),
        )
        self.segment_stored_tokens = _c(
            r, "kvtier_segment_stored_tokens_total", "Tokens newly stored as segments (text cached by its content)."
        )
        self.segment_retrieved_tokens = _c(
            r, "kvtier_segment_retrieved_tokens_total", "Segment tokens retrieved (for blending: reused anywhere)."
        )

    def render(self) -> str:
        return self.registry.render()


class IntegrationMetrics:
    """What an engine integration (transformers, vLLM) adds: reuse per request, backend failures, verification."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = r = registry or Registry()
        self.requests = _c(r, "kvtier_integration_requests_total", "Prompts the integration looked up.")
        self.prompt_tokens = _c(r, "kvtier_integration_prompt_tokens_total", "Prompt tokens seen.")
        self.reused_tokens = _c(r, "kvtier_integration_reused_tokens_total", "Prompt tokens loaded from the cache.")
        self.computed_tokens = _c(r, "kvtier_integration_computed_tokens_total", "Prompt tokens the model computed.")
        self.backend_errors = _c(
            r,
            "kvtier_integration_backend_errors_total",
            "Cache calls that failed and became misses (server down, timeout, bad reply), by operation.",
            ("op",),
        )
        self.load_errors = _c(
            r, "kvtier_integration_load_errors_total", "Loads that delivered fewer tokens than promised."
        )
        self.verify_checks = _c(r, "kvtier_verify_checks_total", "Cache hits recomputed without the cache to compare.")
        self.verify_max_abs_diff = _g(
            r,
            "kvtier_verify_max_abs_diff",
            "Largest |cached - recomputed| seen by verification, by what (logits, kv).",
            ("what",),
        )
        self._verify_max: dict[str, float] = {}
        self.verify_max_abs_diff.add_source(lambda: {(what,): v for what, v in self._verify_max.items()})
        self.ttft_seconds = _h(r, "kvtier_integration_ttft_seconds", "Time to first token of a prompt.")
        self.handoff_timeouts = _c(
            r,
            "kvtier_integration_handoff_timeouts_total",
            "Decoder requests whose prefiller's KV did not reach the cache in time (computed instead).",
        )
        self.blended_prompts = _c(r, "kvtier_blend_prompts_total", "Prompts prefilled by blending cached segments.")
        self.blend_segments = _c(
            r,
            "kvtier_blend_segments_total",
            "Segments of prompts looked up while blending, by result (hit: found whole or in part, miss).",
            ("result",),
        )
        self.recomputed_tokens = _c(
            r, "kvtier_blend_recomputed_tokens_total", "Loaded segment tokens recomputed by blending (selective)."
        )

    def observe_verify(self, what: str, max_abs_diff: float) -> None:
        self._verify_max[what] = max(self._verify_max.get(what, 0.0), max_abs_diff)

    def render(self) -> str:
        return self.registry.render()


def _c(r: Registry, name: str, help_text: str, labels: Iterable[str] = ()) -> Counter:
    return r.register(Counter(name, help_text, labels))


def _h(r: Registry, name: str, help_text: str, labels: Iterable[str] = ()) -> Histogram:
    return r.register(Histogram(name, help_text, labels))


def _g(r: Registry, name: str, help_text: str, labels: Iterable[str] = ()) -> Gauge:
    return r.register(Gauge(name, help_text, labels))


class ServerMetrics:
    """The cache server's own metrics, registered next to the cache's (one ``/metrics`` page)."""

    def __init__(self, registry: Registry) -> None:
        r = registry
        self.requests = _c(r, "kvtier_server_requests_total", "Requests by op and status.", ("op", "status"))
        self.request_seconds = _h(r, "kvtier_server_request_seconds", "Time to serve a request, by op.", ("op",))
        self.received_bytes = _c(r, "kvtier_server_received_bytes_total", "Bytes received on the data plane.")
        self.sent_bytes = _c(r, "kvtier_server_sent_bytes_total", "Bytes sent on the data plane.")
        self.clients = _g(r, "kvtier_server_connected_clients", "Clients seen in the last 60 seconds.")
        self.inflight = _g(r, "kvtier_server_inflight_requests", "Requests being served now.")
        self.shm_leases = _g(
            r,
            "kvtier_server_shm_leases",
            "Shared-memory leases by state: active, or stalled (a reservation past its deadline whose writer runs).",
            ("state",),
        )
