"""deploy/: YAML parses, Prometheus accepts the config and rules, and every PromQL expression in
the rules and the Grafana dashboard names only series that detector.metrics exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from detector.config import MetricsConfig, load_config
from detector.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "detector-dashboard.json"
K8S = DEPLOY / "k8s"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool")

# The series each metric type puts on the wire (classic histograms: no bare-name series).
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def load(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def k8s_objects() -> dict[str, dict]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                objects[doc["kind"]] = doc
    return objects


def exposed_series() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        for suffix in SERIES_SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return names


def referenced_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: detector_* series and recording rules (with ':')."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and strings
    expr = re.sub(r"\{[^{}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    tokens = re.findall(r"(?<![\w$:])[A-Za-z_:][A-Za-z0-9_:]*", expr)
    return {t for t in tokens if t.startswith("detector_") or ":" in t}


def rules() -> Iterator[dict]:
    for group in load(PROMETHEUS / "rules.yml")["groups"]:
        yield from group["rules"]


def dashboard_exprs(node) -> Iterator[str]:
    """Every query string in the dashboard: panel targets and templating variables."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str) and "(" in value:
                yield value
            else:
                yield from dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


# ---- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path):
    documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert documents and all(doc is not None for doc in documents)


def test_the_expected_files_exist():
    assert len(yaml_files()) >= 10
    for name in ("prometheus/prometheus.yml", "prometheus/rules.yml", "compose.yaml"):
        assert (DEPLOY / name).is_file(), name
    assert json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]


# ---- promtool -----------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )


@needs_promtool
def test_promtool_accepts_rules_and_config():
    for args in (("check", "rules", "rules.yml"), ("check", "config", "prometheus.yml")):
        done = promtool(*args)
        assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_alerting_rules_fire_as_their_unit_tests_say():
    done = promtool("test", "rules", "rules.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_required_alerts_and_recordings_exist():
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert {
        "DetectorDown",
        "DetectorStuck",
        "HighInvalidRate",
        "ConsumerLagHigh",
        "AlertStorm",
        "ModelReloadFailed",
    } <= alerts
    records = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    assert any("detector_events_total" in e and "outcome" in e for e in records.values())
    assert any(
        "0.99" in e and "detector_batch_duration_seconds_bucket" in e for e in records.values()
    )


# ---- every metric a query names exists -----------------------------------------------------


def test_referenced_names_parser():
    expr = (
        'sum by (job, le) (rate(detector_batch_duration_seconds_bucket{job=~"$job",'
        'instance="detector_fake"}[$__rate_interval])) / ignoring(outcome) '
        "job_outcome:detector_events:rate5m"
    )
    assert referenced_names(expr) == {
        "detector_batch_duration_seconds_bucket",
        "job_outcome:detector_events:rate5m",
    }


def test_rules_reference_only_exposed_metrics():
    exposed = exposed_series()
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = set().union(*(referenced_names(rule["expr"]) for rule in rules()))
    assert used, "no detector metric found in the rules"
    unknown = {n for n in used if n not in exposed and n not in recorded}
    assert not unknown, f"rules name series that detector.metrics does not expose: {unknown}"


def test_dashboard_references_only_exposed_metrics():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exposed = exposed_series()
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = set().union(*(referenced_names(e) for e in dashboard_exprs(dashboard)))
    unknown = {n for n in used if n not in exposed and n not in recorded}
    assert not unknown, f"dashboard names series that detector.metrics does not expose: {unknown}"
    # The panels the brief asks for are all there, so every metric family is on screen.
    for family in (
        "detector_events_total",
        "detector_alerts_total",
        "detector_dead_letters_total",
        "detector_anomaly_score_bucket",
        "detector_batch_duration_seconds_bucket",
        "detector_event_lag_seconds_bucket",
        "detector_active_streams",
        "detector_consumer_lag",
        "detector_model_info",
    ):
        assert family in used, family


def test_dashboard_panels_are_well_formed():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "detector"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


def test_grafana_provisioning_matches_the_dashboard():
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasource = load(provisioning / "datasources" / "prometheus.yaml")["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variable = dashboard["templating"]["list"][0]
    assert variable["current"]["value"] == datasource["uid"]
    provider = load(provisioning / "dashboards" / "detector.yaml")["providers"][0]
    compose = load(DEPLOY / "compose.yaml")
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(
        m.endswith(provider["options"]["path"] + "/detector-dashboard.json:ro") for m in mounts
    )


# ---- compose and kubernetes -----------------------------------------------------------------


def test_prometheus_scrapes_the_worker_port():
    config = load(PROMETHEUS / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "detector"  # the alerting rules select up{job="detector"}
    assert job["static_configs"][0]["targets"] == [f"detector:{MetricsConfig().port}"]
    assert config["rule_files"] == ["rules.yml"]


def test_compose_services_and_mounted_files_exist():
    compose = load(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"kafka", "detector", "prometheus", "grafana"} <= set(services)
    assert (DEPLOY / services["detector"]["build"]["context"] / "Dockerfile").is_file()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), volume
    env = services["detector"]["environment"]
    config = load_config(ROOT / "config.yaml", environ=env)
    assert config.kafka.bootstrap_servers == ["kafka:9092"]


def test_k8s_deployment_probes_env_and_shutdown(tmp_path: Path):
    objects = k8s_objects()
    assert {"Deployment", "ConfigMap", "Service", "PodDisruptionBudget"} <= set(objects)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 60
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "DETECTOR__KAFKA__BOOTSTRAP_SERVERS" in env
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in pod["volumes"]}
    assert set(mounts) <= volumes

    # The ConfigMap's config.yaml plus the Deployment's env is a valid configuration, whose
    # checkpoint directory is the state volume and whose port the probes use.
    assert mounts["config"] == "/etc/detector"
    assert container["args"][-1] == "/etc/detector/config.yaml"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(objects["ConfigMap"]["data"]["config.yaml"], encoding="utf-8")
    config = load_config(config_file, environ=env)
    assert str(config.checkpoint.dir) == mounts["state"]
    assert container["ports"][0]["containerPort"] == config.metrics.port == 9108
    assert len(config.kafka.bootstrap_servers) >= 1


def test_k8s_service_and_budget_select_the_pods():
    objects = k8s_objects()
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = objects["Service"]
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "9108"
    assert service["spec"]["ports"][0]["port"] == 9108
    for selector in (
        service["spec"]["selector"],
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        objects["Deployment"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
