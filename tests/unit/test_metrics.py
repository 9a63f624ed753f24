"""detector.metrics against a fresh CollectorRegistry, read back through get_sample_value."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from detector.engine import REJECTED, SCORED, WARMUP, StepResult
from detector.events import REASONS
from detector.metrics import (
    EVENT_LAG_BUCKETS,
    SCORE_BUCKETS,
    BatchHistogram,
    Metrics,
)


def make_result(outcome: list[int] | np.ndarray, score=None, alert=None) -> StepResult:
    outcome = np.asarray(outcome, dtype=np.int8)
    n = len(outcome)
    return StepResult(
        outcome=outcome,
        score=np.zeros(n, np.float32) if score is None else np.asarray(score, np.float32),
        is_alert=np.zeros(n, bool) if alert is None else np.asarray(alert, bool),
        probability=np.zeros(n),
        details=np.zeros((n, 5), np.float32),
        n_features=2,
    )


def random_batch(n: int, seed: int = 0) -> tuple[StepResult, np.ndarray]:
    rng = np.random.default_rng(seed)
    outcome = rng.choice([SCORED, WARMUP, REJECTED], size=n, p=[0.8, 0.15, 0.05])
    # Scores piled up near 1, where the buckets are, plus exact bucket bounds.
    score = 1.0 - rng.power(0.3, size=n) ** 8
    exact = [0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999, 1.0, 0.0]
    score[: min(n, 8)] = exact[: min(n, 8)]
    score = np.where(outcome == SCORED, score, 0.0)
    alert = (score >= 0.9999) & (outcome == SCORED)
    ts = 1_000_000.0 - rng.exponential(30.0, size=n)
    return make_result(outcome, score, alert), ts


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def cumulative_counts(values: np.ndarray, bounds) -> list[float]:
    """What Prometheus means by le buckets, computed without the code under test."""
    values = np.asarray(values, np.float64)
    return [float(np.sum(values <= b)) for b in bounds] + [float(len(values))]


def test_everything_starts_at_zero_with_fixed_label_sets():
    metrics = Metrics()
    for outcome in ("scored", "warmup", "invalid"):
        assert value(metrics, "detector_events_total", outcome=outcome) == 0.0
    for reason in REASONS:
        assert value(metrics, "detector_dead_letters_total", reason=reason) == 0.0
    for result in ("success", "failure"):
        assert value(metrics, "detector_model_reloads_total", result=result) == 0.0
        assert value(metrics, "detector_checkpoints_total", result=result) == 0.0
    assert value(metrics, "detector_alerts_total") == 0.0
    assert value(metrics, "detector_anomaly_score_count") == 0.0
    assert value(metrics, "detector_anomaly_score_bucket", le="+Inf") == 0.0
    assert value(metrics, "detector_stream_evictions_total") == 0.0
    assert abs(value(metrics, "detector_last_batch_timestamp_seconds") - time.time()) < 60


def test_registries_are_independent_and_injectable():
    shared = CollectorRegistry()
    Metrics(shared).events.labels(outcome="scored").inc(3)
    assert shared.get_sample_value("detector_events_total", {"outcome": "scored"}) == 3.0
    assert value(Metrics(), "detector_events_total", outcome="scored") == 0.0
    with pytest.raises(ValueError, match="Duplicated"):
        Metrics(shared)  # same names twice in one registry fail at construction


def test_observe_step_counts_outcomes_alerts_and_dead_letters():
    metrics = Metrics()
    result = make_result(
        [SCORED, SCORED, SCORED, WARMUP, WARMUP, REJECTED],
        score=[0.2, 0.99995, 0.999999, 0, 0, 0],
        alert=[False, True, True, False, False, False],
    )
    metrics.observe_step(result, np.full(6, 50.0), now=60.0, invalid_reasons=Counter(bad_json=2))
    assert value(metrics, "detector_events_total", outcome="scored") == 3.0
    assert value(metrics, "detector_events_total", outcome="warmup") == 2.0
    assert value(metrics, "detector_events_total", outcome="invalid") == 3.0
    assert value(metrics, "detector_alerts_total") == 2.0
    assert value(metrics, "detector_dead_letters_total", reason="bad_json") == 2.0
    assert value(metrics, "detector_dead_letters_total", reason="streams_full") == 1.0
    assert value(metrics, "detector_dead_letters_total", reason="bad_value") == 0.0
    assert value(metrics, "detector_anomaly_score_count") == 3.0  # scored rows only
    assert value(metrics, "detector_event_lag_seconds_count") == 5.0  # every non-rejected row
    assert value(metrics, "detector_event_lag_seconds_sum") == pytest.approx(50.0)
    assert value(metrics, "detector_batch_size_sum") == 8.0  # 5 events + 3 invalid records
    assert value(metrics, "detector_batch_size_count") == 1.0
    assert value(metrics, "detector_last_batch_timestamp_seconds") == 60.0


def test_refused_rows_are_counted_once_whether_or_not_the_caller_counted_them():
    result = make_result([SCORED, REJECTED, REJECTED])
    for reasons in ({}, {"streams_full": 2}):
        metrics = Metrics()
        metrics.observe_step(result, np.zeros(3), now=1.0, invalid_reasons=reasons)
        assert value(metrics, "detector_dead_letters_total", reason="streams_full") == 2.0
        assert value(metrics, "detector_events_total", outcome="invalid") == 2.0


def test_unknown_reason_becomes_other_and_empty_batches_only_stamp_the_time():
    metrics = Metrics()
    metrics.observe_step(make_result([]), np.zeros(0), now=5.0, invalid_reasons={"weird": 1})
    assert value(metrics, "detector_dead_letters_total", reason="other") == 1.0
    assert value(metrics, "detector_dead_letters_total", reason="weird") is None
    metrics.observe_step(make_result([]), np.zeros(0), now=7.0, invalid_reasons=None)
    assert value(metrics, "detector_batch_size_count") == 1.0  # the one with an invalid record
    assert value(metrics, "detector_last_batch_timestamp_seconds") == 7.0


def test_future_event_times_count_as_zero_lag():
    metrics = Metrics()
    metrics.observe_step(make_result([WARMUP, WARMUP]), np.array([10.0, 30.0]), now=20.0)
    assert value(metrics, "detector_event_lag_seconds_sum") == 10.0
    assert value(metrics, "detector_event_lag_seconds_bucket", le="0.001") == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_buckets_equal_numpy_counts(seed):
    metrics = Metrics()
    batches = [random_batch(n, seed * 10 + i) for i, n in enumerate((4096, 1, 777))]
    now = 1_000_000.0
    for result, ts in batches:
        metrics.observe_step(result, ts, now=now)
    scores = np.concatenate([r.score[r.outcome == SCORED] for r, _ in batches])
    lags = np.concatenate([np.maximum(now - ts[r.outcome != REJECTED], 0) for r, ts in batches])

    for name, values, bounds in (
        ("detector_anomaly_score", scores, SCORE_BUCKETS),
        ("detector_event_lag_seconds", lags, EVENT_LAG_BUCKETS),
    ):
        les = [metrics.registry.get_sample_value(f"{name}_bucket", {"le": str(b)}) for b in bounds]
        les.append(value(metrics, f"{name}_bucket", le="+Inf"))
        assert les == cumulative_counts(values, bounds), name
        assert value(metrics, f"{name}_count") == float(len(values))
        assert value(metrics, f"{name}_sum") == pytest.approx(
            float(values.astype(np.float64).sum())
        )


def test_batch_histogram_matches_prometheus_client_histogram():
    """The fast collector exposes exactly what the stock Histogram would."""
    from prometheus_client import Histogram, generate_latest

    values = np.random.default_rng(3).exponential(0.5, size=500)
    values[:3] = [0.1, 1.0, 0.0]
    fast, stock = CollectorRegistry(), CollectorRegistry()
    BatchHistogram("x_seconds", "X.", (0.1, 0.5, 1.0, 2.5), registry=fast).observe_many(values)
    reference = Histogram("x_seconds", "X.", buckets=(0.1, 0.5, 1.0, 2.5), registry=stock)
    for v in values.tolist():
        reference.observe(v)

    def lines(registry):
        text = generate_latest(registry).decode()
        return [line for line in text.splitlines() if "_created" not in line and "_sum" not in line]

    assert lines(fast) == lines(stock)
    assert fast.get_sample_value("x_seconds_sum") == pytest.approx(
        stock.get_sample_value("x_seconds_sum")
    )


def test_batch_histogram_rejects_bad_buckets():
    with pytest.raises(ValueError, match="increasing"):
        BatchHistogram("y", "Y.", (1.0, 0.5))
    with pytest.raises(ValueError, match="finite"):
        BatchHistogram("y", "Y.", ())


def test_observe_step_is_cheap_for_a_4096_event_batch():
    metrics = Metrics()
    result, ts = random_batch(4096)
    reasons = Counter(bad_json=3, bad_value=1)
    for _ in range(20):
        metrics.observe_step(result, ts, now=1_000_000.0, invalid_reasons=reasons)
    rounds = 200
    started = time.perf_counter()
    for _ in range(rounds):
        metrics.observe_step(result, ts, now=1_000_000.0, invalid_reasons=reasons)
    per_call = (time.perf_counter() - started) / rounds
    # ~0.25 ms on a laptop-class core; the bound leaves room for a loaded CI machine.
    assert per_call < 2e-3, f"observe_step took {per_call * 1e3:.2f} ms for 4096 events"


def test_model_info_switching_versions_leaves_one_series():
    metrics = Metrics()
    for version in ("sensors/v1", "sensors/v2", "sensors/v2", "sensors/v3"):
        metrics.set_model(version)
    series = [
        sample
        for family in metrics.registry.collect()
        if family.name == "detector_model_info"
        for sample in family.samples
    ]
    assert [(s.labels, s.value) for s in series] == [({"version": "sensors/v3"}, 1.0)]


def test_engine_mirror_and_consumer_lag_helpers():
    metrics = Metrics()
    metrics.observe_engine(active_streams=10, evictions_total=3)
    metrics.observe_engine(active_streams=12, evictions_total=5)
    metrics.observe_engine(active_streams=2, evictions_total=1)  # a new engine: new baseline
    metrics.observe_engine(active_streams=2, evictions_total=2)
    assert value(metrics, "detector_active_streams") == 2.0
    assert value(metrics, "detector_stream_evictions_total") == 6.0

    metrics.set_consumer_lag("events", 0, 120)
    metrics.set_consumer_lag("events", 1, 7)
    metrics.forget_partitions([("events", 0), ("events", 9)])
    assert value(metrics, "detector_consumer_lag", topic="events", partition="0") is None
    assert value(metrics, "detector_consumer_lag", topic="events", partition="1") == 7.0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_exposition_passes_promtool_check_metrics():
    metrics = Metrics()
    result, ts = random_batch(256)
    metrics.observe_step(result, ts, now=1_000_000.0, invalid_reasons={"bad_json": 1})
    metrics.set_model("sensors/v1")
    metrics.set_consumer_lag("events", 0, 5)
    metrics.batch_duration.observe(0.01)
    done = subprocess.run(
        ["promtool", "check", "metrics"],
        input=metrics.exposition(),
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert done.stdout.strip() == b"" and done.stderr.strip() == b"", "lint warnings"
