"""Pure logic: capping, statement deltas, redaction, log formats, rendering."""

from __future__ import annotations

import json
import logging

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter import metrics as m
from exporter.core.cardinality import OTHER, CappedCounters
from exporter.core.deltas import CumulativeDeltas
from exporter.core.render import Renderer
from exporter.core.selfmetrics import SelfMetrics
from exporter.core.store import Store
from exporter.logs import JsonFormatter, LogfmtFormatter, kv
from exporter.metrics import HistogramValue, Sample
from exporter.redaction import RedactingFilter, redact, register


def test_capped_counters_keep_top_k_and_fold_the_rest_into_other():
    c = CappedCounters(cap=2)
    for key, delta in (("a", 10), ("b", 5), ("c", 1), ("d", 1)):
        c.add(key, delta)
    c.commit()
    got = dict(c.items())
    assert set(got) == {"a", "b", OTHER}
    assert got[OTHER] == [2.0]
    assert sum(v[0] for v in got.values()) == 17


def test_capped_counters_never_go_backwards_when_the_ranking_changes():
    c = CappedCounters(cap=1)
    seen: dict[object, float] = {}
    for round_ in range(30):
        # "a" is busy first, then "b" takes over
        c.add("a", 5 if round_ < 10 else 0.1)
        c.add("b", 0.1 if round_ < 10 else 5)
        c.commit()
        for key, (value,) in c.items():
            assert value >= seen.get(key, 0.0), (round_, key)
            seen[key] = value
    assert len(c.items()) <= 2  # the cap plus other


def test_capped_counters_with_several_fields_rank_by_the_chosen_one():
    c = CappedCounters(cap=1, fields=2, rank_field=1)
    c.add("many_cheap_calls", 1000, 0.1)
    c.add("one_slow_call", 1, 50.0)
    c.commit()
    assert dict(c.items())["one_slow_call"] == [1.0, 50.0]


def test_statement_deltas_handle_resets_and_first_sight():
    d = CumulativeDeltas()
    assert d.update(("db", 1), (10.0, 2.0)) == (10.0, 2.0)  # first sight: all of it
    assert d.update(("db", 1), (15.0, 3.0)) == (5.0, 1.0)
    assert d.update(("db", 1), (4.0, 0.5)) == (4.0, 0.5)  # reset: the new values are growth


def test_redact_masks_registered_secrets_and_url_passwords():
    register("s3cr3t-token-value")
    assert "s3cr3t" not in redact("auth failed with s3cr3t-token-value")
    assert redact("postgresql://u:hunter2@h/db") == "postgresql://u:***@h/db"
    assert "hunter2" not in redact("connect password=hunter2 host=h")


def _record(msg: str, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("pgpressure.test", logging.WARNING, __file__, 1, msg, None, None)
    record.fields = kv(**fields)["fields"]
    RedactingFilter().filter(record)
    return record


def test_logfmt_and_json_formats_quote_and_redact():
    register("pw-canary-123")
    line = LogfmtFormatter().format(_record("source failed", err="bad pw-canary-123", n=2))
    assert 'msg="source failed"' in line and "level=warn" in line
    assert 'err="bad ***"' in line and "n=2" in line
    doc = json.loads(JsonFormatter().format(_record("x", err="pw-canary-123")))
    assert doc["err"] == "***" and doc["level"] == "warn"


def test_a_forged_line_break_stays_inside_one_logfmt_line():
    line = LogfmtFormatter().format(_record("x", err="a\rlevel=error msg=forged\nb"))
    assert "\n" not in line and "\r" not in line
    assert 'err="a\\rlevel=error msg=forged\\nb"' in line


def test_redacting_filter_never_raises_on_a_library_s_bad_format_args():
    register("pw-canary-456")
    args = ("pw-canary-456",)  # one argument for two placeholders
    record = logging.LogRecord("lib", logging.WARNING, __file__, 1, "%s %s", args, None)
    assert RedactingFilter().filter(record)  # getMessage() raises TypeError here
    assert "pw-canary-456" not in record.getMessage()


def test_own_series_are_rendered_and_a_refused_connection_shows_at_the_next_scrape():
    store = Store()
    store.health(("activity", "a")).up = True
    own = SelfMetrics(store)
    renderer = Renderer(store, own.samples)

    def values() -> dict[tuple[str, tuple], float]:
        text = renderer.render().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    first = values()
    assert first[("pgpressure_source_up", (("source", "activity"), ("target", "a")))] == 1.0
    assert first[("pgpressure_http_connections_refused_total", ())] == 0.0  # there from 0
    own.connection_refused()
    own.connection_refused()
    assert values()[("pgpressure_http_connections_refused_total", ())] == 2.0


def test_renderer_merges_targets_and_renders_histograms_and_caches():
    store = Store()
    store.publish(("activity", "a"), [Sample(m.ACTIVITY_SAMPLES, (), 3.0)], (("target", "a"),))
    store.publish(("activity", "b"), [Sample(m.ACTIVITY_SAMPLES, (), 4.0)], (("target", "b"),))
    hist = HistogramValue(((0.1, 1.0), (1.0, 3.0), (float("inf"), 4.0)), 2.5, 4.0)
    store.publish(("apps", ""), [Sample(m.POOL_WAIT_SECONDS, ("shop", "default"), hist)])
    renderer = Renderer(store)
    text = renderer.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["pg_activity_samples"].samples
    assert sorted((s.labels["target"], s.value) for s in samples) == [("a", 3.0), ("b", 4.0)]
    buckets = [
        s for s in families["sqlalchemy_pool_wait_seconds"].samples if s.name.endswith("_bucket")
    ]
    assert [(s.labels["le"], s.value) for s in buckets] == [
        ("0.1", 1.0),
        ("1.0", 3.0),
        ("+Inf", 4.0),
    ]
    assert renderer.render() is renderer.render()  # cached while the store is unchanged
    store.touch()
    assert renderer.render() == text.encode()  # re-rendered, same content


def test_openmetrics_has_the_same_samples_as_the_text_format():
    """Prometheus asks for OpenMetrics first: the fast path must be valid OpenMetrics (the
    strict client_python parser) with exactly the samples of the text format."""
    store = Store()
    hostile = 'say "hi"\\ \n naïve'
    store.publish(
        ("activity", "a"),
        [
            Sample(m.ACTIVITY_SAMPLES, (), 3.0),
            Sample(m.ACTIVE_SESSION_SECONDS, ("db", "CPU", "CPU"), 1.5),
            Sample(m.SESSIONS, ("db", hostile), 2.0),
        ],
        (("target", "a"),),
    )
    hist = HistogramValue(((0.1, 1.0), (1.0, 3.0), (float("inf"), 4.0)), 2.5, 4.0)
    store.publish(("apps", ""), [Sample(m.POOL_WAIT_SECONDS, ("shop", "default"), hist)])
    renderer = Renderer(store)
    om = renderer.render(openmetrics=True).decode()
    assert om.endswith("# EOF\n")

    def samples(families):
        return sorted(
            (s.name, tuple(sorted(s.labels.items())), s.value) for f in families for s in f.samples
        )

    om_families = list(openmetrics_families(om))
    text_families = list(text_string_to_metric_families(renderer.render().decode()))
    assert samples(om_families) == samples(text_families)
    kinds = {f.name: f.type for f in om_families}
    assert kinds["pg_activity_samples"] == "counter"
    assert kinds["sqlalchemy_pool_wait_seconds"] == "histogram"
    assert any(s.labels.get("state") == hostile for f in om_families for s in f.samples)
