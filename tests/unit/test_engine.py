import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector import engine as engine_module
from detector.engine import REJECTED, SCORED, WARMUP, Engine
from detector.events import EventBatch
from detector.fused_wave import SMALL_WAVE
from detector.model import Forecaster, ForecasterConfig
from detector.scoring import Scorer


def make_model(cell: str = "gru", n_features: int = 2, n_attrs: int = 0, layers: int = 1):
    torch.manual_seed(0)
    config = ForecasterConfig(
        n_features=n_features,
        cell=cell,
        hidden_size=16,
        num_layers=layers,
        n_attrs=n_attrs,
        attr_buckets=32,
    )
    return Forecaster(config).eval()


def make_batch(streams, ts, values, attrs=None) -> EventBatch:
    values = np.asarray(values, dtype=np.float32)
    n = len(streams)
    attrs = np.zeros((n, 0), dtype=np.int64) if attrs is None else np.asarray(attrs, np.int64)
    return EventBatch(list(streams), np.asarray(ts, dtype=np.float64), values, attrs)


def random_events(seed: int, n_events: int, n_streams: int, n_features: int = 2, n_attrs: int = 0):
    rng = np.random.default_rng(seed)
    streams = [f"s{i}" for i in rng.integers(0, n_streams, n_events)]
    ts = np.arange(n_events, dtype=np.float64)
    scale = rng.uniform(0.1, 100.0, size=n_features)
    values = rng.standard_normal((n_events, n_features)) * scale + 10.0
    spikes = rng.random(n_events) < 0.02
    values[spikes] *= 8.0
    attrs = rng.integers(0, 32, (n_events, n_attrs))
    return make_batch(streams, ts, values, attrs)


def run_in_batches(engine: Engine, batch: EventBatch, size: int):
    parts = []
    for start in range(0, len(batch), size):
        parts.append(engine.step_many(batch.take(np.arange(start, min(start + size, len(batch))))))
    return {
        name: np.concatenate([getattr(p, name) for p in parts])
        for name in ("outcome", "score", "is_alert", "error", "expected")
    }


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    n_streams=st.integers(1, 60),
    batch_size=st.integers(1, 97),
    cell=st.sampled_from(["gru", "lstm", "rnn"]),
)
def test_scores_do_not_depend_on_how_events_are_batched(seed, n_streams, batch_size, cell):
    events = random_events(seed, 400, n_streams, n_attrs=1)
    model = make_model(cell, n_attrs=1, layers=2)
    one_by_one = run_in_batches(Engine(model, scorer=Scorer(0.9999, warmup_events=5)), events, 1)
    batched = run_in_batches(
        Engine(model, scorer=Scorer(0.9999, warmup_events=5)), events, batch_size
    )
    everything = run_in_batches(
        Engine(model, scorer=Scorer(0.9999, warmup_events=5)), events, len(events)
    )
    for other in (batched, everything):
        np.testing.assert_array_equal(one_by_one["outcome"], other["outcome"])
        np.testing.assert_allclose(one_by_one["score"], other["score"], atol=1e-5)
        np.testing.assert_allclose(one_by_one["error"], other["error"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(one_by_one["expected"], other["expected"], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("layers, n_attrs", [(1, 0), (2, 1)])
def test_a_small_wave_in_one_compiled_call_scores_as_the_batched_path_does(
    monkeypatch, layers, n_attrs
):
    events = random_events(3, 600, 40, n_attrs=n_attrs)
    model = make_model(n_attrs=n_attrs, layers=layers)

    def run(small_wave: int):
        monkeypatch.setattr(engine_module, "SMALL_WAVE", small_wave)
        engine = Engine(model, scorer=Scorer(0.9999, warmup_events=5))
        return run_in_batches(engine, events, 50), engine.snapshot()

    compiled, compiled_state = run(SMALL_WAVE)  # every wave has at most 40 events
    batched, batched_state = run(0)
    np.testing.assert_array_equal(compiled["outcome"], batched["outcome"])
    assert (compiled["outcome"] == SCORED).mean() > 0.5
    np.testing.assert_allclose(compiled["score"], batched["score"], atol=1e-6)
    np.testing.assert_allclose(compiled["expected"], batched["expected"], rtol=1e-5, atol=1e-4)
    assert compiled_state.streams == batched_state.streams
    np.testing.assert_allclose(compiled_state.rows32, batched_state.rows32, rtol=1e-4, atol=1e-5)


def test_warmup_then_scored_per_stream():
    engine = Engine(make_model(), scorer=Scorer(0.9999, warmup_events=3))
    batch = make_batch(["a"] * 5 + ["b"], range(6), [[1.0, 2.0]] * 6)
    result = engine.step_many(batch)
    assert result.outcome.tolist() == [WARMUP] * 3 + [SCORED] * 2 + [WARMUP]
    assert (result.score[result.outcome == WARMUP] == 0).all()
    assert not result.is_alert[:3].any()


def test_warming_up_the_kernels_leaves_the_engine_as_it_was():
    def engine() -> Engine:
        return Engine(make_model(n_attrs=1), scorer=Scorer(0.9999, warmup_events=3))

    first = make_batch(["a"] * 5, range(5), [[1.0, 2.0]] * 5, attrs=[[3]] * 5)
    then = make_batch(["a", "b"] * 2, range(5, 9), [[1.5, 2.5]] * 4, attrs=[[3]] * 4)
    warmed, plain = engine(), engine()
    warmed.step_many(first)
    plain.step_many(first)
    assert warmed.warm_up() >= 0.0
    assert warmed.active_streams == 1 and "warm-up" not in warmed._table
    assert np.array_equal(warmed.step_many(then).score, plain.step_many(then).score)
    assert torch.equal(warmed.snapshot().rows32, plain.snapshot().rows32)


def test_after_the_warm_up_no_batch_needs_another_compiled_kernel():
    from detector.fused_gru import _gates
    from detector.fused_head import _head
    from detector.fused_wave import _step_wave
    from detector.scoring import _score_wave

    kernels = (_score_wave, _gates, _head, _step_wave)

    model = Forecaster(
        ForecasterConfig(n_features=2, hidden_size=8, n_attrs=1, attr_buckets=16, log_scale=(0,))
    ).eval()
    for novelty_window in (1.0, 200.0):  # an int or a float novelty block were two kernels
        engine = Engine(model, scorer=Scorer(0.9999, novelty_window=novelty_window))
        engine.warm_up()
        compiled = [len(kernel.signatures) for kernel in kernels]
        many = [f"s{i}" for i in range(SMALL_WAVE + 1)]  # a large wave, then a small one
        for streams in (["a"], ["a", "b"], ["a", "b", "a", "c", "a"], many + many[:3]):
            n = len(streams)
            engine.step_many(make_batch(streams, range(n), np.ones((n, 2)), attrs=np.zeros((n, 1))))
        assert [len(kernel.signatures) for kernel in kernels] == compiled


def test_a_spike_after_a_steady_history_alerts_and_blames_its_feature():
    engine = Engine(make_model(), scorer=Scorer(0.9999, warmup_events=20))
    rng = np.random.default_rng(1)
    normal = 10.0 + 0.1 * rng.standard_normal((200, 2))
    engine.step_many(make_batch(["a"] * 200, np.arange(200.0), normal))
    result = engine.step_many(make_batch(["a"], [200.0], [[10.0, 25.0]]))
    assert result.is_alert[0]
    assert result.score[0] > 0.9999
    assert result.contributions[0, 1] > 0.9
    normal_result = engine.step_many(make_batch(["a"], [201.0], [[10.0, 10.0]]))
    assert normal_result.score[0] < result.score[0]


def test_cooldown_suppresses_repeated_alerts_in_event_time():
    no_novelty = Scorer(0.9999, novelty_window=1.0, warmup_events=20, cooldown_seconds=10.0)
    engine = Engine(make_model(), scorer=no_novelty)
    rng = np.random.default_rng(2)
    normal = 10.0 + 0.1 * rng.standard_normal((200, 2))
    engine.step_many(make_batch(["a"] * 200, np.arange(200.0), normal))
    spikes = engine.step_many(make_batch(["a"] * 3, [200.0, 205.0, 211.0], [[10.0, 40.0]] * 3))
    assert spikes.score.min() > 0.9999
    assert spikes.is_alert.tolist() == [True, False, True]


def test_only_news_scores_high_an_ongoing_anomaly_does_not_page_every_event():
    engine = Engine(make_model(), scorer=Scorer(0.9999, novelty_window=20.0, warmup_events=20))
    rng = np.random.default_rng(2)
    normal = 10.0 + 0.1 * rng.standard_normal((300, 2))
    engine.step_many(make_batch(["a"] * 200, np.arange(200.0), normal[:200]))
    spike = [[10.0, 11.1]]  # ~11 sd: improbable, yet below the z cap (Z_MAX): worse can follow
    first = engine.step_many(make_batch(["a"], [200.0], spike))
    again = engine.step_many(make_batch(["a"], [201.0], spike))
    assert first.is_alert[0] and not again.is_alert[0]
    assert again.probability[0] > 0.999 > again.score[0]  # still improbable, but not news
    bigger = engine.step_many(make_batch(["a"], [202.0], [[10.0, 40.0]]))
    assert bigger.is_alert[0]
    engine.step_many(make_batch(["a"] * 97, np.arange(203.0, 300.0), normal[203:]))
    later = engine.step_many(make_batch(["a"], [300.0], spike))
    # ~100 events on, the same surprise is news again (how probable it now is, the stream's
    # tail statistics say: they have learned from the earlier spikes).
    assert later.score[0] == later.probability[0] > 0.99


def test_capacity_grows_by_doubling_and_keeps_state():
    engine = Engine(make_model(), scorer=Scorer(0.9999, warmup_events=2), initial_capacity=4)
    first = make_batch(["a", "a", "a"], [0.0, 1.0, 2.0], [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    engine.step_many(first)
    before = engine.snapshot(["a"])
    engine.step_many(make_batch([f"n{i}" for i in range(10)], [3.0] * 10, [[1.0, 1.0]] * 10))
    assert engine.capacity == 16
    assert engine.active_streams == 11
    after = engine.snapshot(["a"])
    assert torch.equal(before.rows32, after.rows32)


def test_full_engine_refuses_new_streams_unless_idle_ones_can_go():
    engine = Engine(
        make_model(),
        scorer=Scorer(0.9999, warmup_events=1),
        max_streams=2,
        stream_ttl_seconds=100.0,
    )
    engine.step_many(make_batch(["a", "b"], [0.0, 50.0], [[1.0, 1.0]] * 2))
    refused = engine.step_many(make_batch(["c"], [60.0], [[1.0, 1.0]]))
    assert refused.outcome.tolist() == [REJECTED]
    assert engine.active_streams == 2 and engine.evictions == 0
    # At t=120 stream a has been idle 120 s > TTL: it goes, c comes in.
    admitted = engine.step_many(make_batch(["c"], [120.0], [[1.0, 1.0]]))
    assert admitted.outcome.tolist() == [WARMUP]
    assert engine.evictions == 1
    assert sorted(engine.snapshot().streams) == ["b", "c"]


def test_a_stream_in_the_current_batch_is_never_evicted_for_a_newcomer():
    engine = Engine(
        make_model(), scorer=Scorer(0.9999, warmup_events=1), max_streams=1, stream_ttl_seconds=10.0
    )
    engine.step_many(make_batch(["a"], [0.0], [[1.0, 1.0]]))
    result = engine.step_many(make_batch(["a", "b"], [100.0, 100.0], [[1.0, 1.0]] * 2))
    assert result.outcome.tolist() == [SCORED, REJECTED]


def test_snapshot_restore_continues_exactly_where_it_left_off():
    events = random_events(3, 300, 5)
    model = make_model()
    reference = Engine(model, scorer=Scorer(0.9999, warmup_events=5))
    expected = run_in_batches(reference, events, 50)

    first = Engine(model, scorer=Scorer(0.9999, warmup_events=5))
    head = run_in_batches(first, events.take(np.arange(150)), 50)
    second = Engine(model, scorer=Scorer(0.9999, warmup_events=5))
    second.restore(first.snapshot())
    tail = run_in_batches(second, events.take(np.arange(150, 300)), 50)
    np.testing.assert_allclose(
        np.concatenate([head["score"], tail["score"]]), expected["score"], atol=1e-6
    )


def test_restore_refuses_a_snapshot_of_another_layout():
    engine = Engine(make_model(n_features=2))
    engine.step_many(make_batch(["a"], [0.0], [[1.0, 1.0]]))
    other = Engine(make_model(n_features=3))
    with pytest.raises(ValueError, match="another model layout"):
        other.restore(engine.snapshot())


def test_forget_frees_slots_for_reuse():
    engine = Engine(make_model(), scorer=Scorer(0.9999, warmup_events=1), initial_capacity=2)
    engine.step_many(make_batch(["a", "b"], [0.0, 0.0], [[1.0, 1.0]] * 2))
    engine.forget(["a"])
    engine.step_many(make_batch(["c"], [1.0], [[1.0, 1.0]]))
    assert engine.capacity == 2 and engine.active_streams == 2


def test_constant_stream_then_change_stays_finite():
    engine = Engine(make_model(), scorer=Scorer(0.9999, warmup_events=5))
    engine.step_many(make_batch(["a"] * 50, np.arange(50.0), [[5.0, 5.0]] * 50))
    result = engine.step_many(make_batch(["a"], [50.0], [[6.0, 5.0]]))
    assert math.isfinite(float(result.score[0])) and math.isfinite(float(result.error[0]))
    assert result.score[0] > 0.9999


def test_a_stuck_sensor_is_flagged_and_blamed_but_a_quantised_one_is_not():
    engine = Engine(make_model(), scorer=Scorer(0.9999, warmup_events=20))
    rng = np.random.default_rng(5)
    noisy = 10.0 + rng.standard_normal((400, 2))
    noisy[:, 1] = np.round(noisy[:, 1])  # feature 1 repeats often: runs are normal for it
    engine.step_many(make_batch(["a"] * 400, np.arange(400.0), noisy))
    stuck = np.column_stack([np.full(30, noisy[-1, 0]), 10.0 + rng.standard_normal(30)])
    result = engine.step_many(make_batch(["a"] * 30, np.arange(400.0, 430.0), stuck))
    assert result.probability[-1] > 0.9999
    assert result.contributions[-1, 0] > 0.99  # the stuck feature is to blame
    assert result.is_alert.sum() == 1  # one stuck sensor, one alert

    quantised = Engine(make_model(), scorer=Scorer(0.9999, warmup_events=20))
    steps = np.column_stack([np.round(noisy[:, 1]), np.round(noisy[:, 1])])
    quantised.step_many(make_batch(["q"] * 400, np.arange(400.0), steps))
    flat = quantised.step_many(make_batch(["q"] * 5, np.arange(400.0, 405.0), [[10.0, 10.0]] * 5))
    assert flat.probability.max() < 0.9999
