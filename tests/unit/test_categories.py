"""Categorical attrs: a value new to a stream is evidence, in proportion to how rarely the stream
(and the streams training saw) show new values."""

import math

import numpy as np
import orjson
import pytest
import torch

from detector.config import load_config
from detector.engine import Engine
from detector.errors import InputError
from detector.events import EventBatch
from detector.kafka_io import alert_record
from detector.model import Forecaster, ForecasterConfig
from detector.scoring import SKETCH_SLOTS, Calibration, Scorer, Scores
from detector.train import (
    History,
    StreamHistory,
    forecaster_config,
    new_value_rates,
    value_streams,
)


def engine(new_value_rate: float, streams_per_value: dict[int, int] | None = None) -> Engine:
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_features=1, hidden_size=8, n_attrs=1, attr_buckets=64))
    calibration = Calibration(
        new_value_rates=(new_value_rate,),
        value_streams=(tuple(sorted((streams_per_value or {}).items())),),
        attr_buckets=64,
    )
    return Engine(model.eval(), scorer=Scorer(0.9999, calibration=calibration))


def history(categories: np.ndarray, seed: int = 0) -> EventBatch:
    n = len(categories)
    amounts = np.random.default_rng(seed).normal(100.0, 5.0, (n, 1)).astype(np.float32)
    return EventBatch(["acct"] * n, np.arange(n, dtype=np.float64), amounts, categories[:, None])


def verdict(eng: Engine, category: int, t: float = 1e6):
    one = EventBatch(
        ["acct"], np.array([t]), np.array([[100.0]], np.float32), np.array([[category]])
    )
    return eng.step_many(one)


def habitual(n: int = 300) -> np.ndarray:
    return np.random.default_rng(1).choice([3, 5, 8], size=n, p=[0.5, 0.3, 0.2])


def test_a_category_new_to_a_stream_of_habits_alerts_and_takes_the_blame():
    eng = engine(new_value_rate=1e-5)
    eng.step_many(history(habitual()))
    result = verdict(eng, category=40)  # an ordinary amount in a never-used category
    assert result.is_alert[0]
    assert result.probability[0] > 0.9999
    amount_share, category_share = result.contributions[0]
    assert category_share > amount_share
    assert amount_share + category_share == pytest.approx(1.0, abs=1e-5)


def test_a_second_unusual_category_is_as_unusual_as_the_first():
    # Good-Turing reads a value seen once as a sign that new values come: an anomaly's value
    # must not be one, or the first unusual purchase would cover the next.
    eng = engine(new_value_rate=1e-5)
    eng.step_many(history(habitual()))
    first = verdict(eng, category=40, t=1e6)
    second = verdict(eng, category=41, t=1e6 + 1)
    assert first.is_alert[0] and second.is_alert[0]
    assert second.probability[0] > 0.9999


def test_a_value_news_on_its_own_is_no_singleton_even_where_it_did_not_alert():
    # Two attrs: the category's evidence is halved for the Bonferroni step, so a first new
    # category at ~7e-5 alone stays under the alert level. It must still not become the
    # Good-Turing singleton that makes the next new category look ordinary.
    torch.manual_seed(0)
    config = ForecasterConfig(n_features=1, hidden_size=8, n_attrs=2, attr_buckets=64)
    calibration = Calibration(new_value_rates=(1.1e-3, 1.1e-3))
    eng = Engine(Forecaster(config).eval(), scorer=Scorer(0.9999, calibration=calibration))
    past = history(habitual())
    past.attrs = np.column_stack([past.attrs[:, 0], np.full(len(past), 9)])
    eng.step_many(past)

    def purchase(category: int, t: float, amount: float):  # amounts differ: no stuck run
        one = EventBatch(["acct"], np.array([t]), np.array([[amount]], np.float32),
                         np.array([[category, 9]]))  # fmt: skip
        return eng.step_many(one)

    first, second = purchase(40, 300.0, 101.0), purchase(41, 301.0, 99.0)
    assert not first.is_alert[0] and first.probability[0] > 0.9995
    tails = 1.0 - first.probability[0], 1.0 - second.probability[0]
    assert tails[1] < 2.0 * tails[0]


def test_a_habitual_category_is_unremarkable():
    eng = engine(new_value_rate=1e-5)
    eng.step_many(history(habitual()))
    result = verdict(eng, category=8)  # the least used of the three
    assert not result.is_alert[0]
    assert result.probability[0] < 0.99


def test_where_new_values_are_the_rule_one_more_is_not_news():
    eng = engine(new_value_rate=1e-5)
    eng.step_many(history(np.arange(300) % 64))  # a merchant id that is new most of the time
    assert verdict(eng, category=7).probability[0] < 0.99


def test_training_measures_how_often_warmed_up_streams_show_new_values():
    attrs = np.array([1, 2, 1, 2, 1, 2, 3, 1, 2, 4])[:, None]  # after warm-up 4: 3 and 4 are new
    streams = [StreamHistory("a", np.zeros((10, 1), np.float32), attrs)]
    (rate,) = new_value_rates(History(streams, ["x"], ["kind"], 10, 0), warmup=4)
    assert rate == pytest.approx((2 + 0.5) / (6 + 1))


def test_a_first_value_rare_among_the_trained_streams_is_stronger_news_than_a_common_one():
    # 3, 5 and 8 are this stream's habits; of the values it never showed, training's streams
    # showed 40 often and 41 once.
    adopted = {3: 30, 5: 20, 8: 10, 40: 50, 41: 1, 42: 1}
    q = {}
    for value in (40, 41):
        eng = engine(new_value_rate=1e-3, streams_per_value=adopted)
        eng.step_many(history(habitual()))
        q[value] = -np.log10(1.0 - verdict(eng, category=value).probability[0])
    assert q[41] > q[40] + 1.0
    # Without training's counts, both are simply new.
    plain = []
    for value in (40, 41):
        eng = engine(new_value_rate=1e-3)
        eng.step_many(history(habitual()))
        plain.append(verdict(eng, category=value).probability[0])
    assert plain[0] == pytest.approx(plain[1], abs=1e-12)


def test_commonness_is_the_share_of_values_at_most_as_common():
    # Two values shown by one stream each (Good-Turing: the unseen mass is 1 + 2 = 3), one by
    # three: a total of 3 + 1 + 1 + 3 = 8.
    calibration = Calibration(value_streams=(((0, 1), (2, 3), (5, 1)),), attr_buckets=8)
    table = calibration.value_commonness(0)
    assert table.shape == (2, 9)
    np.testing.assert_allclose(table[0, [0, 2, 5]], [1 / 8, 3 / 8, 1 / 8])
    np.testing.assert_allclose(table[1, [0, 2, 5]], [5 / 8, 1.0, 5 / 8])
    unseen = [1, 3, 4, 6, 7, 8]  # 8: beyond the buckets
    np.testing.assert_allclose(table[0, unseen], 3 / 8 / 6)
    np.testing.assert_allclose(table[1, unseen], 3 / 8)


def test_training_counts_the_streams_that_show_each_value():
    def stream(name, kinds):
        return StreamHistory(name, np.zeros((len(kinds), 1), np.float32), np.array(kinds)[:, None])

    streams = [stream("a", [1, 1, 2]), stream("b", [2, 3]), stream("c", [2, 2, 2])]
    assert value_streams(History(streams, ["x"], ["kind"], 8, 0)) == (((1, 1), (2, 3), (3, 1)),)


def test_log_features_must_be_features():
    config = load_config(None)
    model = config.model.model_copy(update={"log_features": ["amout"]})
    with pytest.raises(InputError, match=r"model\.log_features: \['amout'\]"):
        forecaster_config(config.model_copy(update={"model": model}), ["amount"], [])


def test_a_log_scale_feature_is_forecast_in_its_own_units():
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_features=2, hidden_size=8, log_scale=(0,))).eval()
    with torch.no_grad():  # a forecaster that predicts "the stream's usual level"
        for p in model.parameters():
            p.zero_()
    eng = Engine(model, scorer=Scorer(0.9999, warmup_events=5))
    n = 200
    values = np.column_stack([np.full(n, 1000.0), np.full(n, 1000.0)]).astype(np.float32)
    values[::2] *= 1.01
    result = eng.step_many(
        EventBatch(["s"] * n, np.arange(n, dtype=np.float64), values, np.zeros((n, 0), np.int64))
    )
    # The level of the log of the values is 1000 on both scales, give or take the wobble.
    assert result.expected[-1, 0] == pytest.approx(1005.0, rel=0.01)
    assert result.expected[-1, 1] == pytest.approx(1005.0, rel=0.01)


def test_an_alert_shows_the_attrs_observed_and_their_share_of_the_blame():
    record = orjson.loads(
        alert_record(
            topic="tx", partition=0, offset=9, stream="acct-7", ts=0.0, score=0.99999,
            threshold=0.9999, error=1.2, features=["amount"], observed=[42.0], expected=[40.0],
            contributions=[0.2, 0.8, 0.0], model_version="v1", detected_at=0.0,
            attrs=["category", "channel"], observed_attrs=["jewelry", "online"],
        )
    )  # fmt: skip
    assert record["observed"] == {"amount": 42.0, "category": "jewelry", "channel": "online"}
    assert record["expected"] == {"amount": 40.0}
    assert record["contributions"] == {"amount": 0.2, "category": 0.8, "channel": 0.0}


def test_an_amount_normal_for_the_stream_but_not_for_its_category_alerts_on_the_amount():
    eng = engine(new_value_rate=1e-2)
    rng = np.random.default_rng(2)
    categories = habitual()
    prices = np.where(categories == 3, 100.0, 10.0)  # category 3 costs ten times the others
    amounts = (prices * rng.lognormal(0.0, 0.1, len(categories)))[:, None].astype(np.float32)
    eng.step_many(
        EventBatch(["acct"] * len(categories), np.arange(300.0), amounts, categories[:, None])
    )
    usual = verdict(eng, category=3, t=300.0)  # 100 where 100 is the rule
    unusual = verdict(eng, category=8, t=301.0)  # 100 where 10 is the rule
    assert not usual.is_alert[0] and usual.probability[0] < 0.99
    assert unusual.is_alert[0] and unusual.probability[0] > 0.9999
    amount_share, category_share = unusual.contributions[0]
    assert amount_share > 0.9  # the amount is what is unusual, not the (habitual) category


def test_a_value_seen_a_few_times_keeps_its_own_level_where_values_differ_widely():
    # Two habitual categories cost 40 and 160; a third was bought three times at 100, the
    # stream's mean. Its level rests on three purchases, but the stream's amounts differ far
    # more between categories (sd 60) than within one (2), so those three say more than the
    # stream's spread does: 160 in it is 30 of its own sds off. (With its level and spread
    # shrunk toward the stream's by a fixed five events' worth, 160 scored 0.9976: no alert.)
    eng = engine(new_value_rate=1e-2)
    rng = np.random.default_rng(3)
    categories = rng.choice([3, 5], size=300)
    categories[[5, 140, 240]] = 8  # the first in warm-up, where it is learned
    prices = np.select([categories == 3, categories == 5], [40.0, 160.0], 100.0)
    amounts = (prices + rng.normal(0.0, 2.0, len(categories)))[:, None].astype(np.float32)
    eng.step_many(
        EventBatch(["acct"] * len(categories), np.arange(300.0), amounts, categories[:, None])
    )

    def purchase(category: int, amount: float, t: float):
        values = np.array([[amount]], np.float32)
        return eng.step_many(EventBatch(["acct"], np.array([t]), values, np.array([[category]])))

    unusual = purchase(8, 160.0, t=300.0)
    usual = purchase(5, 160.0, t=301.0)
    assert unusual.is_alert[0] and unusual.probability[0] > 0.9999
    amount_share, category_share = unusual.contributions[0]
    assert amount_share > 0.75  # mostly the amount: the category is known, if rare
    assert not usual.is_alert[0]


def test_a_level_is_judged_two_sided_once_and_bonferroni_over_features_and_attrs():
    # One feature, one attr, a category seen a million times at 10 +- 1 in a stream whose
    # amounts are 50 +- 10: its level is its own, and 14.15 is 4.15 of its sds off. That is
    # 2 Phi(-4.15) = 3.3e-5 two-sided, with one test to correct for (the two-sidedness was
    # counted twice, as one more factor 2, and the event scored 1 - 6.6e-5).
    scorer = Scorer(threshold=0.9999)
    stats = scorer.initial_row(n_features=1, n_attrs=1)[None, :].copy()
    stats[0, :3] = 1000.0, 50.0, 100.0  # events, the stream's mean and variance
    sketch = scorer.width(1, 0)  # the attr's sketch follows the numeric statistics
    slots = SKETCH_SLOTS
    stats[0, sketch], stats[0, sketch + slots] = 5.0, 1e6  # value 5, seen a million times
    stats[0, sketch + 2 * slots], stats[0, sketch + 3 * slots] = 10.0, 1.0  # its mean, variance
    x = np.array([[14.15]], np.float32)
    forecast = np.array([[(14.15 - 50.0) / 10.0]], np.float32)  # the forecaster saw it coming
    out = Scores.empty(1, n_features=1, n_attrs=1)
    one = np.zeros(1, dtype=np.int64)
    scorer.score_wave(
        one, one, x, np.array([[5]]), np.zeros(1), forecast, np.zeros((1, 1), np.float32),
        stats, np.zeros((1, 2)), out,
    )  # fmt: skip
    expected = 2.0 * 0.5 * math.erfc(4.15 / math.sqrt(2.0))
    assert 1.0 - out.probability[0] == pytest.approx(expected, rel=0.01)
