import numpy as np
import pytest
import torch

from detector.engine import Engine, Snapshot
from detector.errors import SnapshotError
from detector.events import EventBatch
from detector.model import Forecaster, ForecasterConfig
from detector.scoring import Scorer
from detector.snapshot import load_snapshot, restore_engine, save_engine, save_snapshot

SHA = "0" * 64


def make_model(hidden: int = 16, n_features: int = 2) -> Forecaster:
    torch.manual_seed(0)
    return Forecaster(ForecasterConfig(n_features=n_features, hidden_size=hidden)).eval()


def events(seed: int, n: int, streams: list[str], start: float = 0.0) -> EventBatch:
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(streams), n)
    values = (10.0 + rng.standard_normal((n, 2))).astype(np.float32)
    values[rng.random(n) < 0.03] *= 6.0
    return EventBatch(
        [streams[i] for i in pick],
        start + np.arange(n, dtype=np.float64),
        values,
        np.zeros((n, 0), dtype=np.int64),
    )


STREAMS = ["pump-1", "ünï/çødé \n\t\"'", "", "a" * 300, "😀", "x\x00y"]


def test_round_trip_continues_scores_identically(tmp_path):
    model = make_model()
    reference = Engine(model, scorer=Scorer(0.9999, warmup_events=5))
    reference.step_many(events(1, 400, STREAMS))
    path = tmp_path / "ckpt" / "state.safetensors"
    saved = save_engine(path, reference, model_sha256=SHA, extra={"offsets": "{}"})
    assert saved.streams == len(STREAMS) and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    restored = Engine(model, scorer=Scorer(0.9999, warmup_events=5))
    loaded = restore_engine(path, restored, model_sha256=SHA)
    assert sorted(loaded.snapshot.streams) == sorted(STREAMS)
    assert loaded.metadata["offsets"] == "{}"
    later = events(2, 300, STREAMS, start=1000.0)
    expected = reference.step_many(later)
    actual = restored.step_many(later)
    np.testing.assert_array_equal(expected.outcome, actual.outcome)
    np.testing.assert_array_equal(expected.score, actual.score)
    np.testing.assert_array_equal(expected.is_alert, actual.is_alert)


def test_subset_of_streams(tmp_path):
    model = make_model()
    engine = Engine(model, scorer=Scorer(0.9999, warmup_events=5))
    engine.step_many(events(1, 200, STREAMS))
    path = tmp_path / "state.safetensors"
    save_engine(path, engine, model_sha256=SHA, streams=["pump-1", "😀", "not-held"])
    assert load_snapshot(path, model_sha256=SHA, width32=engine.width32).snapshot.streams == [
        "pump-1",
        "😀",
    ]
    other = Engine(model, scorer=Scorer(0.9999, warmup_events=5))
    restore_engine(path, other, model_sha256=SHA, streams=["😀"])
    assert other.snapshot().streams == ["😀"]
    assert torch.equal(other.snapshot().rows32, engine.snapshot(["😀"]).rows32)


def test_skip_held_keeps_live_state(tmp_path):
    model = make_model()
    engine = Engine(model, scorer=Scorer(0.9999, warmup_events=5))
    engine.step_many(events(1, 100, ["a", "b"]))
    path = tmp_path / "state.safetensors"
    save_engine(path, engine, model_sha256=SHA)
    engine.step_many(events(2, 100, ["a"], start=500.0))
    live = engine.snapshot(["a"]).rows32.clone()
    restore_engine(path, engine, model_sha256=SHA, skip_held=True)
    assert torch.equal(engine.snapshot(["a"]).rows32, live)


def test_empty_snapshot(tmp_path):
    engine = Engine(make_model())
    path = tmp_path / "state.safetensors"
    save_engine(path, engine, model_sha256=SHA)
    loaded = restore_engine(path, engine, model_sha256=SHA)
    assert loaded.snapshot.streams == [] and engine.active_streams == 0


def test_missing_file(tmp_path):
    with pytest.raises(SnapshotError, match="no checkpoint file"):
        load_snapshot(tmp_path / "nope.safetensors", model_sha256=SHA, width32=10)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file(tmp_path, damage):
    engine = Engine(make_model())
    engine.step_many(events(1, 50, STREAMS))
    path = tmp_path / "state.safetensors"
    save_engine(path, engine, model_sha256=SHA)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 100)
    else:
        path.write_bytes(b"")
    with pytest.raises(SnapshotError, match="corrupt"):
        load_snapshot(path, model_sha256=SHA, width32=engine.width32)


def test_inconsistent_tensors_are_corrupt(tmp_path):
    path = tmp_path / "state.safetensors"
    bad = Snapshot(["a", "b"], torch.zeros(1, 4), torch.zeros(1, 3, dtype=torch.float64))
    save_snapshot(path, bad, model_sha256=SHA)
    with pytest.raises(SnapshotError, match="corrupt"):
        load_snapshot(path, model_sha256=SHA, width32=4)


def test_mismatched_model_hash(tmp_path):
    engine = Engine(make_model())
    engine.step_many(events(1, 50, STREAMS))
    path = tmp_path / "state.safetensors"
    save_engine(path, engine, model_sha256=SHA)
    with pytest.raises(SnapshotError, match="model differs"):
        restore_engine(path, Engine(make_model()), model_sha256="1" * 64)


def test_mismatched_layout(tmp_path):
    engine = Engine(make_model(hidden=16))
    engine.step_many(events(1, 50, STREAMS))
    path = tmp_path / "state.safetensors"
    save_engine(path, engine, model_sha256=SHA)
    with pytest.raises(SnapshotError, match="another model layout"):
        restore_engine(path, Engine(make_model(hidden=8)), model_sha256=SHA)


def test_save_replaces_atomically(tmp_path):
    engine = Engine(make_model())
    path = tmp_path / "state.safetensors"
    engine.step_many(events(1, 50, ["a"]))
    save_engine(path, engine, model_sha256=SHA)
    engine.step_many(events(2, 50, ["b"], start=100.0))
    save_engine(path, engine, model_sha256=SHA)
    names = load_snapshot(path, model_sha256=SHA, width32=engine.width32).snapshot.streams
    assert sorted(names) == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]
