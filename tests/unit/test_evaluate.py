"""detector evaluate: AUC, causality of the replay, and the three modes end to end (tiny model)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detector import evaluate, nab
from detector.artifact import load_artifact, save_artifact
from detector.cli import main
from detector.config import Config
from detector.model import Forecaster, ForecasterConfig
from detector.synthetic import sensor_streams

CONFIG = Config.model_validate({"scoring": {"warmup_events": 5}, "engine": {"batch_size": 64}})


def tiny_artifact(path: Path, features: list[str] | None = None):
    features = features or ["value"]
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_features=len(features), hidden_size=8))
    return load_artifact(save_artifact(path, model, features=features, version="test"))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return tiny_artifact(tmp_path_factory.mktemp("model"))


# --------------------------------------------------------------------------- AUC


def test_roc_auc_hand_cases():
    labels = np.array([1, 1, 0, 0, 0], dtype=bool)
    assert evaluate.roc_auc(np.array([0.9, 0.8, 0.3, 0.2, 0.1]), labels) == 1.0
    assert evaluate.roc_auc(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), labels) == 0.0
    assert evaluate.roc_auc(np.full(5, 0.7), labels) == 0.5
    # one positive above both negatives, one tied with one: (1 + 1 + 1 + 0.5) / 4
    auc = evaluate.roc_auc(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0], dtype=bool))
    assert auc == pytest.approx(0.875)
    assert np.isnan(evaluate.roc_auc(np.ones(3), np.zeros(3, dtype=bool)))


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(200), 1)  # many ties
    labels = rng.random(200) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert evaluate.roc_auc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))


# --------------------------------------------------------------------------- causality


def _series(n: int, seed: int, name: str) -> evaluate.Series:
    rng = np.random.default_rng(seed)
    values = np.sin(np.arange(n) / 7.0) * 10 + rng.normal(0, 1, n)
    values[n // 2] += 30
    return evaluate.Series(name, 1e9 + 60.0 * np.arange(n), values[:, None])


def test_scores_up_to_t_ignore_later_rows(artifact):
    t = 150
    files = [_series(300, 0, "a.csv"), _series(250, 1, "b.csv"), _series(200, 2, "c.csv")]
    full = evaluate.score_series(artifact, CONFIG, files)

    changed = [evaluate.Series(s.name, s.ts, s.values.copy()) for s in files]
    changed[0].values[t + 1 :] = 1e6  # a wild future for one file
    after_change = evaluate.score_series(artifact, CONFIG, changed)
    np.testing.assert_array_equal(after_change[0].score[: t + 1], full[0].score[: t + 1])
    assert not np.array_equal(after_change[0].score, full[0].score)
    for k in (1, 2):  # other streams do not notice at all
        np.testing.assert_array_equal(after_change[k].score, full[k].score)

    truncated = [evaluate.Series(s.name, s.ts[: t + 1], s.values[: t + 1]) for s in files]
    cut = evaluate.score_series(artifact, CONFIG, truncated)
    for k in range(3):
        np.testing.assert_allclose(cut[k].score, full[k].score[: t + 1], rtol=0, atol=1e-6)


def test_jobs_and_batch_size_do_not_change_scores(artifact):
    files = [_series(120, k, f"s{k}.csv") for k in range(3)]
    one = evaluate.score_series(artifact, CONFIG, files)
    small = evaluate.score_series(artifact, CONFIG, files, batch_size=7)
    for a, b in zip(one, small, strict=True):
        np.testing.assert_allclose(a.score, b.score, atol=1e-6)
        assert (a.outcome == b.outcome).all()
    assert (one[0].outcome[:5] == 1).all() and (one[0].outcome[5:] == 0).all()


def test_jobs_split_files_across_processes(artifact):
    files = [_series(80, k, f"s{k}.csv") for k in range(3)]
    one = evaluate.score_series(artifact, CONFIG, files)
    parallel = evaluate.score_series(artifact, CONFIG, files, jobs=2)  # two spawned processes
    for a, b in zip(one, parallel, strict=True):
        np.testing.assert_allclose(a.score, b.score, atol=1e-6)


def test_non_finite_rows_are_not_stepped(artifact):
    s = _series(60, 3, "nan.csv")
    s.values[30] = np.nan
    (r,) = evaluate.score_series(artifact, CONFIG, [s])
    assert r.outcome[30] == evaluate.INVALID and r.score[30] == 0.0
    assert np.isfinite(r.score).all()


# --------------------------------------------------------------------------- NAB


def make_nab(root: Path) -> None:
    rng = np.random.default_rng(0)
    labels = {}
    specs = [("catA/one.csv", 400, [(250, 270)]), ("catA/two.csv", 300, []),
             ("catB/three.csv", 500, [(200, 220), (400, 430)])]  # fmt: skip
    for name, n, windows in specs:
        values = 50 + 10 * np.sin(np.arange(n) / 12.0) + rng.normal(0, 1, n)
        for s, _ in windows:
            values[s + 3 : s + 6] += 40
        stamps = [
            np.datetime_as_string(np.datetime64("2015-01-01T00:00") + np.timedelta64(5 * i, "m"))
            .replace("T", " ") + ":00"
            for i in range(n)
        ]  # fmt: skip
        path = root / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["timestamp", "value"])
            writer.writerows(zip(stamps, values.round(3).tolist(), strict=True))
        labels[name] = [[stamps[s], stamps[e]] for s, e in windows]
    (root / "labels").mkdir()
    (root / "labels" / "combined_windows.json").write_text(json.dumps(labels))


def test_evaluate_nab_end_to_end(tmp_path, artifact):
    make_nab(tmp_path / "nab")
    out = tmp_path / "out"
    report = evaluate.evaluate_nab(tmp_path / "nab", artifact, CONFIG, output_dir=out)
    assert set(report["profiles"]) == set(nab.PROFILES)
    for profile in report["profiles"].values():
        assert profile["tp"] + profile["fn"] == 3
        assert profile["score"] is None or -1000 < profile["score"] <= 100
    assert [f["name"] for f in report["per_file"]] == [
        "catA/one.csv", "catA/two.csv", "catB/three.csv"
    ]  # fmt: skip
    assert json.loads((out / "report.json").read_text())["files"] == 3
    result = out / "detector" / "catB" / "detector_three.csv"
    with result.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["timestamp", "value", "anomaly_score", "label"]
    assert len(rows) == 500 and sum(int(r["label"]) for r in rows) == 21 + 31
    assert all(0.0 <= float(r["anomaly_score"]) <= 1.0 for r in rows)
    assert (out / "plots" / "catA" / "two.png").stat().st_size > 1000
    assert "catB/three.csv" in (out / "index.html").read_text()
    assert "reward_low_FN_rate" in evaluate.format_report(report)

    fixed = evaluate.evaluate_nab(
        tmp_path / "nab", artifact, CONFIG, profiles=["standard"], threshold=0.5, plots=False
    )
    assert list(fixed["profiles"]) == ["standard"]
    assert fixed["profiles"]["standard"]["threshold"] == 0.5


# --------------------------------------------------------------------------- CSV


def make_csv_corpus(root: Path, n: int = 300) -> None:
    rng = np.random.default_rng(5)
    for name in ("sub/first.csv", "second.csv"):
        t = np.arange(n)
        a = np.sin(t / 9.0) + rng.normal(0, 0.1, n)
        b = 100 + 5 * np.cos(t / 15.0) + rng.normal(0, 0.5, n)
        label = np.zeros(n, dtype=int)
        label[220:240] = 1
        a[220:240] += 4
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh, delimiter=";")
            writer.writerow(["datetime", "A", "B", "anomaly", "changepoint"])
            for i in range(n):
                stamp = f"2020-03-09 {10 + i // 3600:02d}:{(i // 60) % 60:02d}:{i % 60:02d}"
                writer.writerow([stamp, f"{a[i]:.4f}", f"{b[i]:.3f}", label[i], int(i == 220)])


def test_evaluate_csv_univariate_model(tmp_path, artifact):
    make_csv_corpus(tmp_path / "csv")
    out = tmp_path / "out"
    report = evaluate.evaluate_csv(
        tmp_path / "csv", artifact, CONFIG, sep=";", time_col="datetime", label_col="anomaly",
        ignore_cols=["changepoint"], train_rows=100, output_dir=out,
    )  # fmt: skip
    assert report["files"] == 2 and report["evaluated"] == 400 and report["positives"] == 40
    assert report["columns_as"] == "per_column"
    for key in ("precision", "recall", "f1", "false_alarm_rate", "missed_alarm_rate"):
        assert 0.0 <= report["overall"][key] <= 1.0
    first = next(f for f in report["per_file"] if f["name"] == "sub/first.csv")
    assert first["columns"] == ["A", "B"] and first["threshold"] >= CONFIG.scoring.threshold
    with (out / "predictions" / "sub" / "first.csv").open() as fh:
        rows = list(csv.reader(fh, delimiter=";"))
    assert rows[0] == ["datetime", "score", "anomaly"]
    assert len(rows) == 1 + 200 and rows[1][0] == "2020-03-09 10:01:40"  # row 100 as written
    assert {r[2] for r in rows[1:]} <= {"0", "1"}
    assert (out / "plots" / "sub" / "first.png").is_file()
    assert (out / "report.json").is_file() and (out / "index.html").is_file()


def test_evaluate_csv_judges_every_row_of_a_lasting_anomaly_not_only_its_onset(tmp_path, artifact):
    # A sensor stuck for 40 rows: point metrics want all of them, where an alert marks one.
    rng = np.random.default_rng(3)
    value = np.sin(np.arange(400) / 7.0) + rng.normal(0, 0.2, 400)
    value[300:340] = value[299]
    path = tmp_path / "csv" / "stuck.csv"
    path.parent.mkdir()
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["timestamp", "value", "label"])
        for i in range(400):
            writer.writerow([i * 60, f"{value[i]:.5f}", int(300 <= i < 340)])
    report = evaluate.evaluate_csv(tmp_path / "csv", artifact, CONFIG, train_rows=150, plots=False)
    (stuck,) = report["per_file"]
    assert stuck["alerts"] >= 20 and stuck["precision"] > 0.9


def test_evaluate_csv_multivariate_model_and_errors(tmp_path):
    make_csv_corpus(tmp_path / "csv", n=150)
    model = tiny_artifact(tmp_path / "model2", ["B", "A"])
    report = evaluate.evaluate_csv(
        tmp_path / "csv", model, CONFIG, sep=";", time_col="datetime", label_col="anomaly",
        ignore_cols=["changepoint"], train_rows=50, threshold=0.9,
    )  # fmt: skip
    assert report["columns_as"] == "direct" and report["evaluated"] == 200
    assert all(f["threshold"] == 0.9 for f in report["per_file"])
    wrong = tiny_artifact(tmp_path / "model3", ["A", "C"])
    with pytest.raises(evaluate.InputError, match="missing"):
        evaluate.evaluate_csv(tmp_path / "csv", wrong, CONFIG, sep=";", time_col="datetime",
                              label_col="anomaly", ignore_cols=["changepoint"])  # fmt: skip
    with pytest.raises(evaluate.InputError, match="--label-col"):
        evaluate.evaluate_csv(tmp_path / "csv", model, CONFIG, sep=";", time_col="datetime",
                              label_col="label")  # fmt: skip


# --------------------------------------------------------------------------- synthetic


def test_evaluate_synthetic_rows_per_kind(tmp_path, artifact):
    data = sensor_streams(n_streams=3, n_steps=600, seed=2)
    report = evaluate.evaluate_synthetic(artifact, CONFIG, data, output_dir=tmp_path)
    kinds = [row["kind"] for row in report["kinds"]]
    assert kinds == [*data.kinds, "all"]
    assert report["features_as"] == "per_column"  # a univariate model reads each sensor alone
    present = {label for label in data.labels if label}
    for row in report["kinds"]:
        if row["kind"] in present:
            assert row["roc_auc"] is not None and 0.0 <= row["roc_auc"] <= 1.0
    assert (tmp_path / "report.json").is_file()
    assert "ROC AUC" in evaluate.format_report(report)


def test_evaluate_synthetic_direct_model(tmp_path):
    data = sensor_streams(n_streams=2, n_steps=300, seed=4)
    model = tiny_artifact(tmp_path / "m", list(data.features))
    report = evaluate.evaluate_synthetic(model, CONFIG, data)
    assert report["features_as"] == "direct" and report["events"] == 600


# --------------------------------------------------------------------------- CLI


def test_cli_evaluate_nab_and_csv(tmp_path, artifact, capsys):
    make_nab(tmp_path / "nab")
    code = main(["evaluate", "nab", str(tmp_path / "nab"), "--model", str(artifact.path),
                 "--output", str(tmp_path / "o1"), "--no-plots",
                 "--profile", "standard"])  # fmt: skip
    assert code == 0
    assert "standard" in capsys.readouterr().out
    assert (tmp_path / "o1" / "report.json").is_file()
    make_csv_corpus(tmp_path / "csv", n=120)
    code = main(["evaluate", "csv", str(tmp_path / "csv"), "--model", str(artifact.path),
                 "--sep", ";", "--time-col", "datetime", "--label-col", "anomaly",
                 "--ignore-cols", "changepoint", "--train-rows", "40",
                 "--output", str(tmp_path / "o2")])  # fmt: skip
    assert code == 0
    assert (tmp_path / "o2" / "predictions" / "second.csv").is_file()


def test_cli_evaluate_without_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from detector import cli

    monkeypatch.setattr(cli, "DEFAULT_MODEL", tmp_path / "absent")
    monkeypatch.chdir(tmp_path)
    make_nab(tmp_path / "nab")
    assert main(["evaluate", "nab", str(tmp_path / "nab")]) == 2
    assert "no default model" in capsys.readouterr().err
