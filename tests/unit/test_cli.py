"""The `detector` command end to end: train, score, config check, and their failures."""

import csv
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.artifact import load_artifact, save_artifact
from detector.cli import main
from detector.model import Forecaster, ForecasterConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_features=2, hidden_size=16))
    return save_artifact(
        tmp_path_factory.mktemp("model"), model, features=["a", "b"], version="test"
    )


def write_csv(path, rows, header=("stream", "ts", "a", "b")):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def random_rows(seed, n_streams, per_stream):
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.repeat(np.arange(n_streams), per_stream))
    seen = np.zeros(n_streams, dtype=int)
    rows = []
    for stream in order:
        t = seen[stream]
        seen[stream] += 1
        a, b = rng.normal(10.0 + stream % 7, 1.0 + stream % 3, size=2)
        rows.append((f"s{stream}", 1_700_000_000 + 60 * t, f"{a:.4f}", f"{b:.4f}"))
    return rows


def read_scores(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@settings(
    max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 1000))
def test_score_is_the_same_one_by_one_and_in_big_batches(tmp_path, model_dir, capsys, seed):
    events = write_csv(tmp_path / f"events{seed}.csv", random_rows(seed, 1000, 4))
    outputs = {}
    for size in (1, 4096):
        out = tmp_path / f"scores{seed}-{size}.csv"
        code, _, _ = run(
            ["score", "--model", model_dir, "--input", events, "--output", out,
             "--batch-size", size], capsys,
        )  # fmt: skip
        assert code == 0
        outputs[size] = read_scores(out)
    assert len(outputs[1]) == len(outputs[4096]) == 4000
    one = np.array([float(r["score"]) for r in outputs[1]])
    big = np.array([float(r["score"]) for r in outputs[4096]])
    assert [r["outcome"] for r in outputs[1]] == [r["outcome"] for r in outputs[4096]]
    assert np.abs(one - big).max() <= 1e-5


def test_score_counts_add_up_and_bad_rows_get_reasons(tmp_path, model_dir, capsys):
    good = random_rows(1, 3, 40)
    bad = [
        ("s0", 1_700_100_000, "", "1.0"),  # missing value
        ("s0", 1_700_100_060, "hot", "1.0"),  # not a number
        ("s1", 1_700_100_000, "nan", "1.0"),  # NaN
        ("s1", 1_700_100_060, "inf", "1.0"),  # inf
        ("s2", "yesterday", "1.0", "1.0"),  # unparseable time
        ("", 1_700_100_000, "1.0", "1.0"),  # no stream
    ]
    events = write_csv(tmp_path / "events.csv", good + bad)
    with events.open("ab") as handle:
        handle.write(b"s2,1700100000,\xe9t\xe9,1.0\n")  # Latin-1, not UTF-8
    out, errors = tmp_path / "scores.csv", tmp_path / "errors.jsonl"
    code, stdout, stderr = run(
        ["score", "--model", model_dir, "--input", events, "--output", out, "--errors", errors],
        capsys,
    )
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["events"] == len(good) + len(bad) + 1
    assert summary["scored"] + summary["warmup"] + summary["invalid"] == summary["events"]
    assert summary["invalid"] == len(bad) + 1
    assert len(read_scores(out)) == len(good)
    reasons = [json.loads(line)["reason"] for line in errors.read_text().splitlines()]
    assert sorted(reasons) == sorted(
        ["missing_value", "bad_value", "bad_value", "bad_value", "bad_timestamp",
         "missing_stream", "bad_encoding"]
    )  # fmt: skip
    assert "invalid 7" in stderr


def test_score_refuses_new_streams_when_full(tmp_path, model_dir, capsys):
    events = write_csv(tmp_path / "events.csv", random_rows(2, 5, 3))
    config = tmp_path / "config.yaml"
    config.write_text("engine: {max_streams: 2}\n")
    out = tmp_path / "scores.csv"
    code, stdout, _ = run(
        ["score", "--config", config, "--model", model_dir, "--input", events, "--output", out],
        capsys,
    )
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0
    assert summary["invalid_reasons"] == {"streams_full": 9}
    assert summary["events"] == 15 and len(read_scores(out)) == 6


def test_score_of_an_empty_file_says_so(tmp_path, model_dir, capsys):
    events = tmp_path / "empty.jsonl"
    events.write_bytes(b"")
    code, stdout, stderr = run(
        ["score", "--model", model_dir, "--input", events, "--output", tmp_path / "o.csv"], capsys
    )
    assert code == 0 and "no events" in stderr
    assert json.loads(stdout)["events"] == 0


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: (d / "manifest.json").unlink(), "not a model artifact"),
        (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "sha256"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "malformed manifest"),
    ],
)
def test_a_broken_model_directory_is_one_clear_error(
    tmp_path, model_dir, capsys, break_it, message
):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in model_dir.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    break_it(broken)
    events = write_csv(tmp_path / "events.csv", random_rows(3, 2, 2))
    code, _, stderr = run(
        ["score", "--model", broken, "--input", events, "--output", tmp_path / "o.csv"], capsys
    )
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1


def test_a_csv_without_a_feature_column_is_one_clear_error(tmp_path, model_dir, capsys):
    events = write_csv(tmp_path / "events.csv", [("s", 1, 2.0)], header=("stream", "ts", "a"))
    code, _, stderr = run(
        ["score", "--model", model_dir, "--input", events, "--output", tmp_path / "o.csv"], capsys
    )
    assert code == 2 and "lacks column(s) b" in stderr


def test_config_check_prints_the_config_or_every_error(tmp_path, capsys):
    code, stdout, _ = run(["config", "check", "config.yaml"], capsys)
    assert code == 0 and "bootstrap_servers" in stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("scoring: {threshold: 2}\nengine: {max_stream: 5}\n")
    code, _, stderr = run(["config", "check", bad], capsys)
    assert code == 2
    assert "scoring.threshold" in stderr and "engine.max_stream" in stderr


def test_shipped_config_yaml_shows_every_default():
    from detector.config import Config, load_config

    assert load_config("config.yaml", environ={}) == Config()


def test_train_writes_a_verified_artifact_with_calibration(tmp_path, capsys):
    history = write_csv(tmp_path / "history.csv", random_rows(4, 6, 150))
    out = tmp_path / "model"
    code, _, stderr = run(
        ["train", "--input", history, "--output", out, "--features", "a,b", "--epochs", "2",
         "--seed", "3"], capsys,
    )  # fmt: skip
    assert code == 0, stderr
    artifact = load_artifact(out)
    assert artifact.features == ["a", "b"]
    manifest = artifact.manifest
    assert manifest["training"]["streams"] == 6 and manifest["training"]["events"] == 900
    assert manifest["metrics"]["epochs_run"] <= 2
    assert np.isfinite(manifest["metrics"]["val_nll"])
    assert artifact.calibration.var > 0 and len(artifact.calibration.quantiles) == 5
    again = tmp_path / "again"
    run(["train", "--input", history, "--output", again, "--features", "a,b", "--epochs", "2",
         "--seed", "3"], capsys)  # fmt: skip
    assert load_artifact(again).manifest["weights"]["sha256"] == manifest["weights"]["sha256"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_train_without_features_takes_every_numeric_field(tmp_path, capsys, suffix):
    rows = random_rows(6, 3, 120)
    history = tmp_path / f"history{suffix}"
    if suffix == ".csv":
        write_csv(history, rows)
    else:
        history.write_text(
            "".join(
                json.dumps({"stream": s, "ts": int(t), "values": {"a": float(a), "b": float(b)}})
                + "\n"
                for s, t, a, b in rows
            )
        )
    out = tmp_path / "model"
    code, _, stderr = run(["train", "--input", history, "--output", out, "--epochs", "1"], capsys)
    assert code == 0, stderr
    assert load_artifact(out).features == ["a", "b"]


def test_generated_labelled_files_evaluate_end_to_end_in_csv_mode(tmp_path, capsys):
    files = tmp_path / "files"
    code, _, err = run(
        ["generate", "--streams", "3", "--steps", "600", "--seed", "3", "--labelled-files",
         "--output", files], capsys,
    )  # fmt: skip
    assert code == 0 and "3 files" in err
    first = (files / "sensor-0.csv").read_text().splitlines()
    assert first[0] == "timestamp,temperature,pressure,vibration,power,label"
    assert len(first) == 601 and {line.rsplit(",", 1)[1] for line in first[1:]} <= {"0", "1"}
    code, out, _ = run(
        ["evaluate", "csv", files, "--time-col", "timestamp", "--label-col", "label",
         "--train-rows", "200", "--output", tmp_path / "report"], capsys,
    )  # fmt: skip
    assert code == 0 and "overall" in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["files"] == 3 and report["evaluated"] == 3 * 400
    assert report["positives"] > 0
