"""Metric primitives: valid Prometheus text (prometheus_client's exposition), label escaping, cumulative histogram
buckets, one registry per CacheMetrics, no lost updates under threads."""

from __future__ import annotations

import math
import re
import threading

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from kvtier.metrics import CacheMetrics, Counter, Gauge, Histogram, IntegrationMetrics, Registry, ServerMetrics


def parse(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


def test_counter_renders_and_parses():
    """A labelled counter renders one sample per label set; an unlabelled one renders 0 before use."""
    r = Registry()
    hits = r.register(Counter("demo_hits_total", "Hits.", ("tier",)))
    r.register(Counter("demo_calls_total", "Calls."))
    hits.inc(3, tier="memory")
    hits.inc(tier="memory")
    hits.inc(2.5, tier="disk")
    families = parse(r.render())
    assert families["demo_hits"].type == "counter"
    assert families["demo_hits"].documentation == "Hits."
    assert samples(families["demo_hits"]) == {
        ("demo_hits_total", (("tier", "disk"),)): 2.5,
        ("demo_hits_total", (("tier", "memory"),)): 4.0,
    }
    assert samples(families["demo_calls"]) == {("demo_calls_total", ()): 0.0}
    assert hits.value(tier="memory") == 4 and hits.total() == 6.5


def test_counter_rejects_decrease_and_bad_labels():
    """Counters only go up and take exactly their declared labels."""
    c = Counter("demo_total", "x", ("tier",))
    with pytest.raises(ValueError, match="demo_total only goes up"):
        c.inc(-1, tier="memory")
    with pytest.raises(ValueError, match=r"demo_total takes labels \('tier',\), got \(\)"):
        c.inc(1)
    with pytest.raises(ValueError, match="demo_total takes labels"):
        c.inc(1, tier="memory", kind="x")
    with pytest.raises(ValueError, match="demo_seconds takes labels"):
        Histogram("demo_seconds", "x", ("tier",)).observe(0.1, kind="x")
    assert c.total() == 0


def test_gauge_reads_sources_at_render():
    """A gauge's value comes from its callbacks each time it is collected."""
    r = Registry()
    g = r.register(Gauge("demo_used_bytes", "Used.", ("tier",)))
    state = {"memory": 10}
    g.add_source(lambda: {(t,): v for t, v in state.items()})
    g.add_source(lambda: {("disk",): 2**40})
    assert samples(parse(r.render())["demo_used_bytes"]) == {
        ("demo_used_bytes", (("tier", "disk"),)): float(2**40),
        ("demo_used_bytes", (("tier", "memory"),)): 10.0,
    }
    state["memory"] = 0.5
    fam = parse(r.render())["demo_used_bytes"]
    assert fam.type == "gauge"
    assert samples(fam)[("demo_used_bytes", (("tier", "memory"),))] == 0.5


def test_label_escaping_round_trips():
    """Backslashes, quotes and newlines in label values are escaped and parse back unchanged."""
    r = Registry()
    c = r.register(Counter("demo_errors_total", "Errors.", ("tier", "kind")))
    nasty = 'a"b\\c\nd'
    c.inc(tier=nasty, kind="plain")
    c.inc(tier="x", kind='\\"')
    text = r.render()
    assert "\n" not in text.split("demo_errors_total{", 1)[1].split("}", 1)[0]
    got = samples(parse(text)["demo_errors"])
    assert got == {
        ("demo_errors_total", (("kind", "plain"), ("tier", nasty))): 1.0,
        ("demo_errors_total", (("kind", '\\"'), ("tier", "x"))): 1.0,
    }


def test_histogram_buckets_are_cumulative():
    """Bucket counts are cumulative, le is inclusive, +Inf equals _count and _sum is the total."""
    r = Registry()
    h = r.register(Histogram("demo_seconds", "Latency.", ("tier",), buckets=(0.5, 0.1, 1.0)))
    assert h.buckets == (0.1, 0.5, 1.0)
    values = [0.05, 0.1, 0.2, 0.5, 0.7, 3.0, 10.0]
    for v in values:
        h.observe(v, tier="disk")
    h.observe(0.3, tier="memory")
    fam = parse(r.render())["demo_seconds"]
    assert fam.type == "histogram"
    got = samples(fam)

    def buckets(tier: str) -> list[tuple[float, float]]:
        return [
            (float(s.labels["le"]), s.value)
            for s in fam.samples
            if s.name == "demo_seconds_bucket" and s.labels["tier"] == tier
        ]

    assert buckets("disk") == [(0.1, 2), (0.5, 4), (1.0, 5), (math.inf, 7)]
    assert got[("demo_seconds_count", (("tier", "disk"),))] == 7
    assert got[("demo_seconds_sum", (("tier", "disk"),))] == pytest.approx(sum(values))
    assert buckets("memory") == [(0.1, 0), (0.5, 1), (1.0, 1), (math.inf, 1)]
    assert h.count(tier="disk") == 7


def test_histogram_buckets_monotonic_for_many_observations():
    """For any observations the rendered buckets never decrease and end at the count."""
    r = Registry()
    h = r.register(Histogram("demo_latency_seconds", "Latency."))
    values = [10 ** (i / 7 - 5) for i in range(60)]
    for v in values:
        h.observe(v)
    fam = parse(r.render())["demo_latency_seconds"]
    buckets = [(float(s.labels["le"]), s.value) for s in fam.samples if s.name.endswith("_bucket")]
    assert [b for b, _ in buckets] == sorted(b for b, _ in buckets) and buckets[-1][0] == math.inf
    counts = [c for _, c in buckets]
    assert counts == sorted(counts) and counts[-1] == len(values)
    for bound, count in buckets:
        assert count == sum(v <= bound for v in values)


def test_unobserved_histogram_renders_only_metadata():
    """A histogram with no observations renders HELP/TYPE and still parses."""
    r = Registry()
    r.register(Histogram("demo_idle_seconds", "Idle."))
    fam = parse(r.render())["demo_idle_seconds"]
    assert fam.type == "histogram" and fam.samples == []


def test_registry_rejects_duplicates_and_snapshots():
    """Names are unique; snapshot totals counters, gauges and histogram counts."""
    r = Registry()
    c = r.register(Counter("demo_total", "x", ("tier",)))
    with pytest.raises(ValueError):
        r.register(Counter("demo_total", "x"))
    g = r.register(Gauge("demo_gauge", "g", ("tier",)))
    g.add_source(lambda: {("a",): 1, ("b",): 2})
    h = r.register(Histogram("demo_seconds", "h"))
    c.inc(2, tier="a")
    c.inc(3, tier="b")
    h.observe(0.1)
    h.observe(0.2)
    assert r.snapshot() == {"demo_total": 5, "demo_gauge": 3, "demo_seconds_count": 2}


def test_large_and_fractional_values_render():
    """Large byte counts and fractions parse back exactly (prometheus_client writes large values with an exponent,
    as Go does, with every digit)."""
    r = Registry()
    c = r.register(Counter("demo_bytes_total", "Bytes."))
    c.inc(2**40)
    c.inc(0.125)
    assert samples(parse(r.render())["demo_bytes"])[("demo_bytes_total", ())] == 2**40 + 0.125
    c.inc(2**60)  # the 0.125 is below a float's resolution here
    assert samples(parse(r.render())["demo_bytes"])[("demo_bytes_total", ())] == 2**60 + 2**40


def test_cache_metrics_render_parses():
    """A fresh CacheMetrics renders valid text naming every declared family."""
    m = CacheMetrics()
    m.hit_tokens.inc(5, tier="memory")
    m.errors.inc(tier="disk", kind="corrupt")
    m.lookup_seconds.observe(0.001)
    families = parse(m.render())
    for name in (
        "kvtier_lookup_requests",
        "kvtier_retrieve_hit_tokens",
        "kvtier_errors",
        "kvtier_lookup_seconds",
        "kvtier_tier_used_bytes",
        "kvtier_active_leases",
    ):
        assert name in families


def declared(*owners: object) -> list[str]:
    return [m.name for owner in owners for m in vars(owner).values() if isinstance(m, Counter | Gauge | Histogram)]


def test_one_page_of_a_server_keeps_the_declared_names():
    """The cache's, the integration's and the server's metrics share one registry and render as one page that
    prometheus_client parses: one TYPE line per declared metric under its declared name (counters keep their
    ``_total``), samples under the same names, and no ``_created`` series."""
    m = CacheMetrics()
    integration = IntegrationMetrics(registry=m.registry)
    server = ServerMetrics(m.registry)
    m.lookups.inc()
    m.read_seconds.observe(0.002, tier="disk")
    integration.backend_errors.inc(op="lookup")
    server.requests.inc(op="lookup", status="ok")
    server.clients.add_source(lambda: {(): 3})
    text = m.render()
    names = declared(m, integration, server)
    assert re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE) == names
    sample_names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert {"kvtier_lookup_requests_total", "kvtier_server_requests_total", "kvtier_server_connected_clients"} <= (
        sample_names
    )
    assert {"kvtier_tier_read_seconds_bucket", "kvtier_tier_read_seconds_count"} <= sample_names
    assert not [name for name in sample_names if name.endswith("_created")]
    assert m.registry.snapshot()["kvtier_server_connected_clients"] == 3
    with pytest.raises(ValueError, match="kvtier_server_requests_total registered twice"):
        ServerMetrics(m.registry)


def test_cache_metrics_instances_do_not_share_values():
    """Each CacheMetrics has its own registry, none of them prometheus_client's process-wide default one."""
    a, b = CacheMetrics(), CacheMetrics()
    a.lookups.inc(2)
    a.hit_tokens.inc(16, tier="memory")
    assert (a.lookups.total(), b.lookups.total(), b.hit_tokens.total()) == (2, 0, 0)
    assert samples(parse(b.render())["kvtier_lookup_requests"]) == {("kvtier_lookup_requests_total", ()): 0}
    assert parse(b.render())["kvtier_retrieve_hit_tokens"].samples == []
    assert REGISTRY.get_sample_value("kvtier_lookup_requests_total") is None


def test_updates_from_many_threads_are_not_lost():
    """Engines update metrics from many threads: every increment and observation counts, new label sets included."""
    m = CacheMetrics()
    threads_n, per_thread = 8, 2000

    def work(i: int) -> None:
        for j in range(per_thread):
            m.read_bytes.inc(2, tier=f"t{j % 5}")
            m.read_seconds.observe(j / per_thread, tier=f"t{i}")
            if j % 500 == 0:  # collection runs while others update
                m.render()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.read_bytes.total() == 2 * threads_n * per_thread
    assert m.read_seconds.count(tier="t3") == per_thread
    assert m.registry.snapshot()["kvtier_tier_read_seconds_count"] == threads_n * per_thread


def test_gauge_sources_with_the_same_labels_add_up():
    """Several engines report one gauge (a server's per-model engines each count their leases): the value is
    their sum, not the last source's."""
    g = Gauge("kvtier_active_leases", "Leases.")
    g.add_source(lambda: {(): 2})
    third = g.add_source(lambda: {(): 3})
    assert g.values() == {(): 5}
    g.remove_source(third)
    assert g.values() == {(): 2}


def test_active_leases_count_every_model_of_a_server(tmp_path):
    import numpy as np

    from kvtier import KVLayout
    from kvtier.client import KVTierClient
    from servers import CHUNK, ThreadServer

    layout = KVLayout(2, 2, 16)
    server = ThreadServer(tmp_path / "disk")
    try:
        for model in ("model-a", "model-b"):
            with KVTierClient(server.url, model=model, layout=layout, chunk_size=CHUNK) as client:
                client.store(list(range(32)), np.zeros(layout.chunk_shape(32), np.float16))
                assert client.lookup(list(range(32)), pin=True).lease is not None
        metrics = server.server.service.metrics
        assert metrics.active_leases.values() == {(): 2}
        assert "kvtier_active_leases 2" in metrics.render()
    finally:
        server.stop()


def test_labeled_gives_counters_and_gauges_by_label_set():
    """The dashboard's JSON view: each counter and gauge with its label sets and values, histograms left out."""
    r = Registry()
    hits = r.register(Counter("demo_hits_total", "Hits.", ("tier",)))
    r.register(Counter("demo_calls_total", "Calls."))
    r.register(Gauge("demo_used_bytes", "Used.", ("tier",))).add_source(lambda: {("memory",): 5.0})
    r.register(Histogram("demo_seconds", "Latency.")).observe(0.1)
    hits.inc(3, tier="memory")
    hits.inc(2, tier="disk")
    assert r.labeled() == {
        "demo_hits_total": [{"labels": {"tier": "disk"}, "value": 2.0}, {"labels": {"tier": "memory"}, "value": 3.0}],
        "demo_calls_total": [{"labels": {}, "value": 0.0}],
        "demo_used_bytes": [{"labels": {"tier": "memory"}, "value": 5.0}],
    }
