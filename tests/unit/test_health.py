"""detector.health over real HTTP on 127.0.0.1, port 0 (loopback only: no broker, no network)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from detector.health import Health, HealthServer, start
from detector.metrics import Metrics


def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def health() -> Health:
    return Health(stuck_after_seconds=0.5)


@pytest.fixture
def server(metrics: Metrics, health: Health) -> Iterator[HealthServer]:
    running = start("127.0.0.1", 0, registry=metrics.registry, health=health)
    yield running
    running.stop()


def test_port_zero_binds_a_free_port(server: HealthServer):
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


def test_metrics_serves_the_registry(server: HealthServer, metrics: Metrics):
    metrics.events.labels(outcome="scored").inc(7)
    status, content_type, body = get(f"{server.url}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert 'detector_events_total{outcome="scored"} 7.0' in body
    assert "# TYPE detector_anomaly_score histogram" in body


def test_metrics_honours_openmetrics_accept(server: HealthServer):
    status, content_type, body = get(
        f"{server.url}/metrics", accept="application/openmetrics-text; version=1.0.0"
    )
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


def test_healthz_ok_then_stuck_then_problem(server: HealthServer, health: Health):
    health.beat()
    assert get(f"{server.url}/healthz")[::2] == (200, "ok\n")

    time.sleep(0.7)  # longer than stuck_after_seconds=0.5 without a beat
    status, _, body = get(f"{server.url}/healthz")
    assert status == 503
    assert body.startswith("loop stuck for ")

    health.beat()
    assert get(f"{server.url}/healthz")[0] == 200

    health.set_problem("broker unreachable since 2026-11-24T10:02:11Z")
    assert get(f"{server.url}/healthz")[::2] == (
        503,
        "broker unreachable since 2026-11-24T10:02:11Z\n",
    )
    health.clear_problem()
    health.beat()
    assert get(f"{server.url}/healthz")[0] == 200


def test_readyz_lists_missing_conditions_until_all_hold(server: HealthServer, health: Health):
    status, _, body = get(f"{server.url}/readyz")
    assert status == 503
    assert "model_loaded" in body and "partitions_assigned" in body

    health.model_loaded = True
    status, _, body = get(f"{server.url}/readyz")
    assert status == 503
    assert "partitions_assigned" in body and "model_loaded" not in body

    health.partitions_assigned = True
    assert get(f"{server.url}/readyz")[::2] == (200, "ready\n")

    health.partitions_assigned = False  # revoked everything in a rebalance
    assert get(f"{server.url}/readyz")[0] == 503


def test_unknown_path_is_404_and_head_has_no_body(server: HealthServer):
    assert get(f"{server.url}/nope")[0] == 404
    request = urllib.request.Request(f"{server.url}/healthz", method="HEAD")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
        assert response.read() == b""


def test_stop_releases_the_port_and_is_idempotent(metrics: Metrics):
    server = start("127.0.0.1", 0, registry=metrics.registry)
    port = server.port
    server.stop()
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    # The same port can be bound again right away.
    again = start("127.0.0.1", port, registry=metrics.registry)
    again.stop()


def test_health_rejects_unknown_conditions_and_bad_limits():
    health = Health(conditions=("model_loaded",))
    with pytest.raises(KeyError, match="partitions"):
        health.set_condition("partitions", True)
    health.model_loaded = True
    assert health.ready
    with pytest.raises(ValueError):
        Health(stuck_after_seconds=0)
