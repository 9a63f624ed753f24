"""A real Prometheus scrapes the worker's /metrics endpoint and answers PromQL about it."""

from __future__ import annotations

import pytest

from detector import health
from detector.metrics import Metrics
from tests.integration.prometheus import PROMETHEUS, query, run_prometheus, wait_for

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is not installed")


def test_prometheus_scrapes_the_event_counter(tmp_path):
    metrics = Metrics()
    for _ in range(7):
        metrics.events.labels(outcome="scored").inc()
    server = health.start("127.0.0.1", 0, registry=metrics.registry)
    try:
        with run_prometheus([f"127.0.0.1:{server.port}"], tmp_path) as prometheus:
            result = wait_for(
                prometheus, 'detector_events_total{outcome="scored"}', lambda r: r, timeout=20
            )
            assert [float(series["value"][1]) for series in result] == [7.0]
            assert result[0]["metric"]["job"] == "detector"
            up = query(prometheus, "up")
            assert [series["value"][1] for series in up] == ["1"]
            # The histograms arrive whole: every bucket of the score histogram is a series.
            buckets = query(prometheus, "detector_anomaly_score_bucket")
            assert len(buckets) == 8
    finally:
        server.stop()
