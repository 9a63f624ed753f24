"""Every Prometheus metric of the worker, built against an injected registry.

`Metrics()` registers everything in a fresh `CollectorRegistry` (pass `registry=` to share one,
e.g. `prometheus_client.REGISTRY`), so tests never see each other's counts. `observe_step`
accounts for a whole micro-batch at once:

>>> import numpy as np
>>> from detector.engine import REJECTED, SCORED, WARMUP, StepResult
>>> metrics = Metrics()
>>> result = StepResult(
...     outcome=np.array([SCORED, SCORED, WARMUP, REJECTED], dtype=np.int8),
...     score=np.array([0.3, 0.99995, 0.0, 0.0], dtype=np.float32),
...     is_alert=np.array([False, True, False, False]),
...     probability=np.array([0.3, 0.99995, 0.0, 0.0]),
...     details=np.zeros((4, 3), dtype=np.float32), n_features=1)
>>> metrics.observe_step(result, batch_ts=np.full(4, 100.0), now=100.5,
...                      invalid_reasons={"bad_json": 2})
>>> value = metrics.registry.get_sample_value
>>> [value("detector_events_total", {"outcome": o}) for o in ("scored", "warmup", "invalid")]
[2.0, 1.0, 3.0]
>>> value("detector_alerts_total"), value("detector_dead_letters_total", {"reason": "streams_full"})
(1.0, 1.0)
>>> value("detector_anomaly_score_bucket", {"le": "0.5"}), value("detector_anomaly_score_count")
(1.0, 2.0)
>>> metrics.set_model("sensors/v2")
>>> value("detector_model_info", {"version": "sensors/v2"})
1.0
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from detector.engine import REJECTED, SCORED, WARMUP, StepResult
from detector.events import REASONS

EVENT_OUTCOMES = ("scored", "warmup", "invalid")  # label values of detector_events_total
RESULTS = ("success", "failure")  # label values of the reload and checkpoint counters

SCORE_BUCKETS = (0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999, 1.0)
BATCH_DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
EVENT_LAG_BUCKETS = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = tuple(float(2**k) for k in range(15))  # 1, 2, 4, ..., 16384


class BatchHistogram(Collector):
    """A histogram that takes a whole numpy array per call; exposes a standard histogram family.

    Why not `prometheus_client.Histogram`: its `observe` is one Python call, one lock and a
    linear bucket search per value, about 1.5 µs, so 4096 scores cost ~6 ms per batch, more than
    the engine spends scoring them. Its bucket counters are private (`_buckets`), so adding a
    numpy bucket count to them would rest on internals. This collector keeps the per-bucket
    counts in a numpy array, adds `np.bincount(np.searchsorted(...))` of each batch under one
    lock (~30 µs for 4096 values), and yields a `HistogramMetricFamily` on scrape: only the
    public Collector API, and the same exposition (`_bucket{le}`, `_sum`, `_count`).

    Bucket semantics match Prometheus: a value lands in every bucket whose `le` bound is >= it.
    NaN values are skipped (they belong to no bucket and would poison `_sum`).

    >>> registry = CollectorRegistry()
    >>> h = BatchHistogram("demo_seconds", "Demo.", (0.1, 1.0), registry=registry)
    >>> h.observe_many(np.array([0.05, 0.1, 0.5, 7.0, np.nan]))
    >>> bucket = lambda le: registry.get_sample_value("demo_seconds_bucket", {"le": le})
    >>> [bucket("0.1"), bucket("1.0"), bucket("+Inf")]
    [2.0, 3.0, 4.0]
    >>> registry.get_sample_value("demo_seconds_sum")
    7.65
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry | None = None,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds and bounds[-1] == math.inf:
            bounds = bounds[:-1]
        if not bounds or any(math.isnan(b) for b in bounds):
            raise ValueError(f"{name}: histogram needs at least one finite bucket bound")
        if any(lo >= hi for lo, hi in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"{name}: buckets not in strictly increasing order: {bounds}")
        self.name = name
        self.documentation = documentation
        self._upper = np.asarray(bounds, dtype=np.float64)
        self._labels = [floatToGoString(b) for b in bounds] + ["+Inf"]
        self._counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # per bucket, not cumulative
        self._sum = 0.0
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def observe(self, amount: float) -> None:
        """One value, like `prometheus_client.Histogram.observe`."""
        if math.isnan(amount):
            return
        index = int(np.searchsorted(self._upper, amount, side="left"))
        with self._lock:
            self._counts[index] += 1
            self._sum += float(amount)

    def observe_many(self, values: np.ndarray) -> None:
        """Every value of an array, at numpy speed."""
        v = np.asarray(values, dtype=np.float64).ravel()
        nan = np.isnan(v)
        if nan.any():
            v = v[~nan]
        if v.size == 0:
            return
        counts = np.bincount(
            np.searchsorted(self._upper, v, side="left"), minlength=len(self._counts)
        )
        total = float(v.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            counts, total = self._counts.copy(), self._sum
        cumulative = np.cumsum(counts).astype(np.float64).tolist()
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], list(zip(self._labels, cumulative, strict=True)), total)
        return [family]


class Metrics:
    """The worker's metrics (DESIGN.md, "Metrics"), registered in `registry` (None = a fresh one).

    The worker calls `observe_step` once per loop iteration, even for an empty poll (it sets
    `detector_last_batch_timestamp_seconds`, which the DetectorStuck alert watches), times the
    batch into `batch_duration`, and uses the gauges and helpers below for the rest.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self.events = Counter(
            "detector_events_total",
            "Input records by outcome: scored, warmup (stream still learning) or invalid.",
            ["outcome"],
            registry=r,
        )
        self.alerts = Counter("detector_alerts_total", "Alerts raised.", registry=r)
        self.dead_letters = Counter(
            "detector_dead_letters_total",
            "Records routed to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.anomaly_score = BatchHistogram(
            "detector_anomaly_score",
            "Anomaly probability of each scored event.",
            SCORE_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "detector_batch_duration_seconds",
            "Wall time to process one micro-batch, decode to sinks.",
            buckets=BATCH_DURATION_BUCKETS,
            registry=r,
        )
        self.event_lag = BatchHistogram(
            "detector_event_lag_seconds",
            "Delay from an event's own timestamp to its scoring.",
            EVENT_LAG_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "detector_batch_size",
            "Records per micro-batch (valid and invalid).",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge(
            "detector_active_streams", "Streams holding state in the engine.", registry=r
        )
        self.evictions = Counter(
            "detector_stream_evictions_total", "Idle streams evicted from the engine.", registry=r
        )
        self.consumer_lag = Gauge(
            "detector_consumer_lag",
            "Records between the committed offset and the end of each assigned partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.model_info = Gauge(
            "detector_model_info",
            "The loaded model artifact: 1 for its version.",
            ["version"],
            registry=r,
        )
        self.model_reloads = Counter(
            "detector_model_reloads_total",
            "Model reload attempts by result.",
            ["result"],
            registry=r,
        )
        self.last_batch_timestamp = Gauge(
            "detector_last_batch_timestamp_seconds",
            "Unix time the loop last finished a batch (an empty poll counts); start time before.",
            registry=r,
        )
        self.checkpoints = Counter(
            "detector_checkpoints_total", "State checkpoints by result.", ["result"], registry=r
        )

        # Children resolved once: labels() costs a dict lookup and a lock per call.
        self._outcome = {name: self.events.labels(outcome=name) for name in EVENT_OUTCOMES}
        self._reason = {name: self.dead_letters.labels(reason=name) for name in REASONS}
        for result in RESULTS:
            self.model_reloads.labels(result=result)
            self.checkpoints.labels(result=result)
        self.last_batch_timestamp.set(time.time())
        self._evictions_seen = 0

    # ---- per batch ------------------------------------------------------------------------

    def observe_step(
        self,
        result: StepResult,
        batch_ts: np.ndarray,
        now: float,
        invalid_reasons: Mapping[str, int] | None = None,
    ) -> None:
        """Account for one micro-batch: events by outcome, alerts, dead letters, scores, lag, size.

        `result` and `batch_ts` (event time, epoch seconds) have one row per event given to the
        engine; `now` is the wall time (epoch seconds) the batch was scored. `invalid_reasons`
        counts the batch's invalid records by reason (a `collections.Counter` of the dead letters'
        reasons). Rows the engine refused (REJECTED: max_streams full) are invalid with reason
        `streams_full`; whether or not the caller already counted them in `invalid_reasons` (as
        `replay.replay` does), they are counted once: the larger of the two numbers is used.
        """
        outcome = result.outcome
        n = len(outcome)
        by_outcome = np.bincount(outcome, minlength=3) if n else np.zeros(3, dtype=np.int64)
        scored, warmup, rejected = (int(by_outcome[c]) for c in (SCORED, WARMUP, REJECTED))

        reasons = {reason: int(count) for reason, count in (invalid_reasons or {}).items() if count}
        if rejected > reasons.get("streams_full", 0):
            reasons["streams_full"] = rejected
        invalid = sum(reasons.values())

        if scored:
            self._outcome["scored"].inc(scored)
            self.anomaly_score.observe_many(result.score[outcome == SCORED])
        if warmup:
            self._outcome["warmup"].inc(warmup)
        if invalid:
            self._outcome["invalid"].inc(invalid)
            for reason, count in reasons.items():
                self._dead_letter(reason).inc(count)
        alerts = int(np.count_nonzero(result.is_alert))
        if alerts:
            self.alerts.inc(alerts)
        kept = n - rejected
        if kept:
            ts = np.asarray(batch_ts, dtype=np.float64)
            if rejected:
                ts = ts[outcome != REJECTED]
            # Clock skew can put an event in the future: that is no lag, not a negative one.
            self.event_lag.observe_many(np.maximum(now - ts, 0.0))
        records = kept + invalid
        if records:
            self.batch_size.observe(records)
        self.last_batch_timestamp.set(now)

    def _dead_letter(self, reason: str) -> Counter:
        child = self._reason.get(reason)
        if child is None:  # keep the label set fixed: an unexpected reason is "other"
            child = self._reason.setdefault("other", self.dead_letters.labels(reason="other"))
        return child

    # ---- state of the worker ----------------------------------------------------------------

    def observe_engine(self, active_streams: int, evictions_total: int) -> None:
        """Mirror the engine's `active_streams` and cumulative `evictions` count.

        The counter grows by the difference since the last call; a smaller total (a new engine
        after a model reload) starts a new baseline instead of going backwards.
        """
        self.active_streams.set(active_streams)
        if evictions_total > self._evictions_seen:
            self.evictions.inc(evictions_total - self._evictions_seen)
        self._evictions_seen = evictions_total

    def set_model(self, version: str) -> None:
        """Mark `version` as the loaded model, removing the previous version's series."""
        self.model_info.clear()
        self.model_info.labels(version=version).set(1)

    def set_consumer_lag(self, topic: str, partition: int, lag: float) -> None:
        self.consumer_lag.labels(topic=topic, partition=str(partition)).set(lag)

    def forget_partitions(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Drop the lag series of revoked partitions, so another worker's report is the only one."""
        for topic, partition in partitions:
            try:
                self.consumer_lag.remove(topic, str(partition))
            except KeyError:
                pass

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format, as /metrics serves it."""
        return generate_latest(self.registry)
