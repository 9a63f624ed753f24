"""The scorer's evidence channels, fed directly with an uninformative forecast (variance e^5), so
that the forecast residuals say nothing and the channel under test decides (unless a test gives
the forecast a variance of its own)."""

import math

import numpy as np
import pytest

from detector.scoring import (
    TAIL_EDGES,
    TRANSITION_BANDS,
    TRANSITION_RATE_PRIOR,
    TRANSITION_WORDS,
    WINDOW_WINSOR_Z,
    WINSOR_Z,
    Scorer,
    Scores,
    _own_tail_z,
    _transition,
    _z_of_log_tail,
    _z_of_t,
)


def feed(values, scorer: Scorer, logvar=5.0, forecast=None, stats=None) -> np.ndarray:
    """(T, 3): probability, score and alert of each event of one stream. `values` is (T,) for a
    univariate stream or (T, F); the forecast is 0 unless given (T, F), with log-variance
    `logvar` (one, or one per feature) in the stream's normalised units. The stream's
    statistics row starts new, or is `stats` (1, width), updated in place."""
    values = np.asarray(values, np.float32).reshape(len(values), -1)
    n_features = values.shape[1]
    forecast = np.zeros(values.shape, np.float32) if forecast is None else forecast
    logvars = np.broadcast_to(np.asarray(logvar, np.float32), (1, n_features))
    if stats is None:
        stats = scorer.initial_row(n_features)[None, :].copy()
    clocks = np.zeros((1, 2))
    first = np.zeros(1, np.int64)  # the event's row in its one-event batch, and its slot
    rows = []
    for t in range(len(values)):
        out = Scores.empty(1, n_features=n_features)
        scorer.score_wave(
            first,
            first,
            values[t : t + 1],
            np.zeros((1, 0), np.int64),
            np.array([float(t)]),
            np.asarray(forecast[t : t + 1], np.float32),
            logvars,
            stats,
            clocks,
            out,
        )
        rows.append((out.probability[0], out.score[0], out.alert[0]))
    return np.array(rows)


def test_a_record_far_beyond_a_stationary_range_alerts():
    rng = np.random.default_rng(0)
    steady = rng.uniform(0.0, 1.0, 500)
    out = feed(np.append(steady, 1.5), Scorer(0.9999))
    assert out[:-1, 0].max() < 0.99  # inside the range nothing is improbable
    assert out[-1, 0] > 0.9999 and out[-1, 2]


def test_a_record_among_few_values_is_not_judged_as_one():
    rng = np.random.default_rng(0)
    steady = rng.uniform(0.0, 1.0, 40)  # past warm-up, short of RECORD_MIN_EVENTS
    young, old = (
        feed(np.append(steady, 1.5), Scorer(0.9999)),
        feed(np.append(np.tile(steady, 3), 1.5), Scorer(0.9999)),
    )
    assert young[-1, 0] < 0.99 < 0.9999 < old[-1, 0]


def test_a_trending_stream_sets_records_all_the_time_and_learns_that_it_does():
    rng = np.random.default_rng(0)
    trend = np.arange(500) * 0.01 + rng.uniform(0.0, 1.0, 500)
    out = feed(np.append(trend, trend.max() + 0.1), Scorer(0.9999))
    assert out[-1, 0] < 0.9999 and not out[-1, 2]


def test_a_miss_in_a_closely_forecast_feature_is_not_averaged_away_by_a_loose_one():
    """Feature 0's forecasts claim twice its residuals' spread (squared residuals 0.25 a
    typical event), feature 1's half (4). A miss of 4 forecast sd is 64 times feature 0's
    typical squared residual and 4 times feature 1's: weighed by each feature's typical
    residual, the first alerts, the second does not. Their plain means (about 10 and 8) are
    both ordinary in a stream whose mean squared residual is 2 sd 3."""
    rng = np.random.default_rng(3)
    values = rng.normal(0.0, 1.0, (601, 2))
    logvar = np.log([4.0, 0.25])
    for feature, verdict in ((0, True), (1, False)):
        forecast = np.zeros(values.shape, np.float32)
        forecast[-1, feature] = values[-1, feature] - 4.0 * math.exp(0.5 * logvar[feature])
        out = feed(values, Scorer(0.9999), logvar, forecast)
        assert out[:-1, 2].sum() == 0
        assert bool(out[-1, 2]) is verdict, (feature, out[-1, 0])


def test_a_constant_feature_forecast_exactly_keeps_the_stream_finite():
    """Its squared residual is exactly 0 at every event, so its typical one decays toward 0 (a
    float32 denormal after ~100,000 events), and its weight toward 1e42: the first move of the
    feature, weighed so, overflowed the error and left the stream's window statistics NaN."""
    rng = np.random.default_rng(4)
    values = np.column_stack([rng.normal(0.0, 1.0, 110_200), np.full(110_200, 5.0)])
    values[110_000, 1] = 6.0  # it moves once
    scorer = Scorer(0.9999)
    stats = scorer.initial_row(2)[None, :].copy()
    out = feed(values, scorer, 0.0, stats=stats)
    assert np.isfinite(stats).all() and np.isfinite(out[:, 0]).all()
    assert out[110_000, 2]  # the first move in 110,000 events alerts
    assert out[:110_000, 2].mean() < 3e-4  # the noisy feature's events: about the nominal 1e-4
    assert out[110_001:, 2].sum() == 0


def test_the_longer_windows_see_an_extreme_event_winsorised_at_window_sizes_of_spread():
    """A jump of 8 sd (surprise ~4 against a normal ~0.86) moves window 4's average by a quarter
    of the way to the cap: normal + WINDOW_WINSOR_Z sd of window 1, more than the long
    statistics' WINSOR_Z, so that a lasting change counts in window 4 from its first event."""
    rng = np.random.default_rng(5)
    scorer = Scorer(0.9999)
    stats = scorer.initial_row(1)[None, :].copy()
    feed(rng.normal(0.0, 1.0, 600), scorer, 0.0, stats=stats)
    w = len(scorer.windows)
    normal_at, avg_at = 3, 6  # count | value mean, variance | normal surprise, two peaks | windows
    before = stats[0].astype(np.float64)
    spread = math.sqrt(before[avg_at + w])  # window 1's variance
    feed([8.0], scorer, 0.0, stats=stats)
    cap = before[normal_at] + WINDOW_WINSOR_Z * spread
    expected = before[avg_at + 1] + 0.25 * (cap - before[avg_at + 1])
    assert stats[0, avg_at + 1] == pytest.approx(expected, rel=1e-5)
    three_sd = before[avg_at + 1] + 0.25 * (
        before[normal_at] + WINSOR_Z * spread - before[avg_at + 1]
    )
    assert stats[0, avg_at + 1] > three_sd + 0.1
    assert stats[0, avg_at] > cap  # window 1 sees the event as it is


def test_a_faster_cycle_in_the_same_range_alerts_through_the_smoothed_level():
    """A cycle eight times faster stays inside the range (no record) and moves only between
    neighbouring bands (no new transition), and the uninformative forecast sees nothing; the
    smoothed level lags the faster cycle by four times as much, and its window alerts. (Before
    the smoothed level, the most probable event of the change was 0.93.)"""
    rng = np.random.default_rng(6)
    slow = np.sin(2 * np.pi * np.arange(3000) / 200) + rng.normal(0.0, 0.2, 3000)
    fast = np.sin(2 * np.pi * np.arange(100) / 25) + rng.normal(0.0, 0.2, 100)
    out = feed(np.append(slow, fast), Scorer(0.9999))
    assert out[100:3000, 2].sum() == 0
    assert out[3000:, 2].any()


def _triangle(cycles: int, drops_every: int = 0) -> np.ndarray:
    """A triangle wave 0 .. 10 .. 0 in steps of 1, which moves only between neighbouring bands
    of its range; every `drops_every`-th cycle it falls from the top straight to the bottom."""
    up, down = np.arange(0.0, 11.0), np.arange(9.0, 0.0, -1.0)
    return np.concatenate(
        [up if drops_every and c % drops_every == 0 else np.append(up, down) for c in range(cycles)]
    )


def test_a_move_between_bands_the_stream_has_never_made_alerts():
    # Both streams end falling from the top of their range to the bottom: no record, and the
    # uninformative forecast sees nothing. The one that has never made that move alerts; the
    # one that makes it every fifth cycle does not (nor does its smoothed level, which has
    # learned such falls as well).
    ending = np.append(np.arange(0.0, 11.0), 0.0)
    never = feed(np.append(_triangle(300), ending), Scorer(0.9999))
    before = feed(np.append(_triangle(300, drops_every=5), ending), Scorer(0.9999))
    assert never[:-1, 0].max() < 0.99
    assert never[-1, 0] > 0.9999 and never[-1, 2]
    assert before[-1, 0] < 0.99 and not before[-1, 2]


def test_a_new_move_is_no_news_while_the_stream_makes_new_moves_often():
    young = feed(np.append(_triangle(4), 10.0), Scorer(0.9999))  # bottom to top at event 80
    assert young[-1, 0] < 0.99


def test_each_move_is_new_once_and_as_probable_as_the_recent_rate_of_new_moves():
    rng = np.random.default_rng(0)
    values = rng.uniform(0.0, 10.0, 2000).astype(np.float32)
    row = np.zeros(TRANSITION_WORDS + 1, np.float32)
    row[-1] = TRANSITION_RATE_PRIOR
    log_p = np.array([
        _transition(row, 0, TRANSITION_WORDS, values[t - 1], values[t], 10.0, 0.0, float(t))
        for t in range(1, len(values))
    ])  # fmt: skip
    new = np.flatnonzero(log_p < 0)
    assert len(new) == TRANSITION_BANDS**2  # every move between the bands, each once
    assert new.max() < 1000
    # Random moves are new often at first: none of the first half is rarer than the prior's 1
    # in 40 (z ~ 2), and most are far more common.
    assert log_p[new[:32]].min() >= math.log(TRANSITION_RATE_PRIOR) - 1e-6
    assert np.median(log_p[new[:32]]) > math.log(0.2)
    assert row[-1] < 1e-3  # no new move for hundreds of events: new ones become improbable


def test_a_stuck_run_does_not_teach_the_stream_that_its_far_tail_is_common():
    rng = np.random.default_rng(0)
    before, after = rng.standard_normal(600), rng.standard_normal(300)
    stuck = np.full(80, before[-1])  # the sensor repeats its last value for 80 events
    spike = [6.0]
    plain = feed(np.concatenate([before, after, spike]), Scorer(0.9999), logvar=0.0)
    once_stuck = feed(np.concatenate([before, stuck, after, spike]), Scorer(0.9999), logvar=0.0)
    assert once_stuck[600:680, 2].sum() == 1  # the run alerts once
    assert once_stuck[-1, 2] and plain[-1, 2]
    # The spike is judged as it would be had the sensor never been stuck: 1 - 10^-4.85 against
    # 1 - 10^-4.98; when the run's events were counted in the own tails, 1 - 10^-4.12.
    assert -math.log10(1 - once_stuck[-1, 0]) > -math.log10(1 - plain[-1, 0]) - 0.5


def test_a_sensor_that_was_stuck_is_not_deaf_to_its_next_stuck_run():
    """A stuck run is an anomaly: its length does not become the stream's longest normal run,
    nor its repeats part of the rate. When they did, a second run of 30 events 100 events after
    one of 70 was judged against a 'longest recent run' of 63 and never alerted."""
    rng = np.random.default_rng(1)
    before, between = rng.standard_normal(600), rng.standard_normal(100)
    first = np.full(70, before[-1])
    second = np.full(30, between[-1])
    out = feed(np.concatenate([before, first, between, second]), Scorer(0.9999), logvar=0.0)
    assert out[600:670, 2].sum() == 1  # the first run alerts once
    assert out[670:770, 2].sum() == 0
    assert out[770:, 2].sum() == 1  # and so does the second


def test_own_tails_follow_how_often_the_stream_really_goes_that_far():
    counts = np.zeros(len(TAIL_EDGES) + 1)
    counts[-1] = 10_000  # events counted
    never = _own_tail_z(3.5, counts, 0, TAIL_EDGES)
    counts[:-1] = 0.01  # 1% of its events reached every level: far more than Gaussian tails
    often = _own_tail_z(3.5, counts, 0, TAIL_EDGES)
    assert often < 3.0 < 3.5 < never
    assert _own_tail_z(1.0, counts, 0, TAIL_EDGES) == 1.0  # below the first level: as fitted


def _t_upper_tail(t: float, dof: float) -> float:
    """Student's t upper tail by integrating its density (no scipy here)."""
    x = np.linspace(t, t + 400.0, 2_000_001)
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    return float(np.trapezoid(np.exp(log_c - (dof + 1) / 2 * np.log1p(x * x / dof)), x))


@pytest.mark.parametrize("dof", [10.0, 50.0, 1000.0])
@pytest.mark.parametrize("t", [1.0, 3.0, 4.0, 8.0])
def test_a_z_against_an_estimated_spread_is_read_as_students_t(t, dof):
    exact = _z_of_log_tail(math.log(_t_upper_tail(t, dof)))
    assert _z_of_t(t, dof) == pytest.approx(exact, abs=0.02)
    assert _z_of_t(t, dof) <= t  # never stronger than against a known spread
