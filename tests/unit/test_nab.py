"""NAB scoring: hand-worked cases, the threshold sweep against brute force, the real corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector import nab
from detector.nab import PROFILES, NabFile

STANDARD = PROFILES["standard"]
NAB_ROOT = Path("/work/shared/data/nab")

# S(-1) = 2 / (1 + e^-5) - 1 = 2 / 1.0067379 - 1 = 0.9866143
S_MINUS_1 = 0.9866142981514305


def toy(n: int = 100, windows: list[tuple[int, int]] | None = None) -> NabFile:
    """A file of n rows; with n = 100 the probation period is floor(15.0) = 15 rows."""
    windows = [(40, 59)] if windows is None else windows  # width 20
    return NabFile("toy/t.csv", [str(i) for i in range(n)], np.zeros(n), windows)


def detect(n: int, *rows: int) -> np.ndarray:
    d = np.zeros(n, dtype=bool)
    d[list(rows)] = True
    return d


# --------------------------------------------------------------------------- sigmoid, profiles


def test_scaled_sigmoid_values():
    assert nab.scaled_sigmoid(0.0) == 0.0
    assert nab.scaled_sigmoid(-1.0) == pytest.approx(S_MINUS_1, rel=1e-12)
    # Very far right saturates at -1 without overflow warnings.
    assert nab.scaled_sigmoid(1000.0) == -1.0


def test_profiles():
    assert (STANDARD.a_tp, STANDARD.a_fp, STANDARD.a_fn) == (1.0, 0.11, 1.0)
    low_fp = PROFILES["reward_low_FP_rate"]
    assert (low_fp.a_tp, low_fp.a_fp, low_fp.a_fn) == (1.0, 0.22, 1.0)
    low_fn = PROFILES["reward_low_FN_rate"]
    assert (low_fn.a_tp, low_fn.a_fp, low_fn.a_fn) == (1.0, 0.11, 2.0)


# --------------------------------------------------------------------------- true positives


def test_detection_at_first_row_of_window_earns_exactly_a_tp():
    # y = (40 - 60) / 20 = -1, so the value is a_tp * S(-1) / S(-1) = 1.
    s = nab.score_file(toy(), detect(100, 40), STANDARD)
    assert s.raw == 1.0
    assert (s.tp, s.fp, s.fn, s.detections) == (1, 0, 0, [40])


def test_detection_at_last_row_of_window():
    # y = (59 - 60) / 20 = -0.05; S(-0.05) = 2 / (1 + e^-0.25) - 1 = 2 / 1.7788008 - 1
    # = 0.1243530; divided by S(-1) = 0.9866143 gives 0.1260401.
    s = nab.score_file(toy(), detect(100, 59), STANDARD)
    expected = float(nab.scaled_sigmoid(-1 / 20) / nab.scaled_sigmoid(-1.0))
    assert s.raw == pytest.approx(expected, rel=1e-12)
    assert s.raw == pytest.approx(0.1260401374727592, rel=1e-9)


def test_only_the_earliest_detection_in_a_window_counts():
    # 45 and 50 are both in the window: only 45 counts, 50 earns and costs nothing.
    both = nab.score_file(toy(), detect(100, 45, 50), STANDARD)
    alone = nab.score_file(toy(), detect(100, 45), STANDARD)
    assert both.raw == alone.raw
    assert (both.tp, both.fp, both.fn, both.detections) == (1, 0, 0, [45])


# --------------------------------------------------------------------------- false positives


def test_false_positive_before_any_window_costs_a_fp():
    # Row 20 is past probation (15) and no window precedes it: -0.11; the window is missed: -1.
    s = nab.score_file(toy(), detect(100, 20), STANDARD)
    assert s.raw == pytest.approx(-0.11 - 1.0, rel=1e-12)
    assert (s.tp, s.fp, s.fn) == (0, 1, 1)


def test_false_positive_right_after_a_window_costs_little():
    # Row 60: y = (60 - 59) / 20 = 0.05; 0.11 * S(0.05) = 0.11 * -0.1243530 = -0.0136788.
    s = nab.score_file(toy(), detect(100, 40, 60), STANDARD)
    assert s.raw - 1.0 == pytest.approx(-0.013678830194875575, rel=1e-9)
    assert s.fp == 1


def test_false_positive_far_after_a_window_costs_nearly_a_fp():
    # Row 99: y = (99 - 59) / 20 = 2; S(2) = 2 / (1 + e^10) - 1 = 2 / 22027.47 - 1 = -0.9999092,
    # so the cost is 0.11 * -0.9999092 = -0.1099900.
    s = nab.score_file(toy(), detect(100, 40, 99), STANDARD)
    assert s.raw - 1.0 == pytest.approx(-0.10999001246888546, rel=1e-9)
    # reward_low_FP_rate doubles it: 0.22 * -0.9999092 = -0.2199800.
    s = nab.score_file(toy(), detect(100, 40, 99), PROFILES["reward_low_FP_rate"])
    assert s.raw - 1.0 == pytest.approx(-0.2199800249377709, rel=1e-9)


def test_false_positive_uses_the_nearest_preceding_window():
    # Windows (20, 29) of width 10 and (40, 59) of width 20. Row 35 follows the first:
    # y = (35 - 29) / 10 = 0.6. Row 70 follows the second: y = (70 - 59) / 20 = 0.55.
    f = toy(windows=[(20, 29), (40, 59)])
    s = nab.score_file(f, detect(100, 20, 35, 40, 70), STANDARD)
    expected = 2.0 + 0.11 * (nab.scaled_sigmoid(0.6) + nab.scaled_sigmoid(0.55))
    assert s.raw == pytest.approx(float(expected), rel=1e-12)
    assert (s.tp, s.fp, s.fn) == (2, 2, 0)


# --------------------------------------------------------------------------- probation, misses


def test_detections_in_probation_are_ignored():
    # Probation is 15 rows: detections at rows 3 (outside) and 12 (inside the window) are
    # ignored, so the window (10, 30) is missed: raw = -1.
    f = toy(windows=[(10, 30)])
    s = nab.score_file(f, detect(100, 3, 12), STANDARD)
    assert (s.raw, s.tp, s.fp, s.fn, s.detections) == (-1.0, 0, 0, 1, [None])
    # The first scored row 15 in a window of width 21: y = (15 - 31) / 21 = -16 / 21,
    # S(-0.7619) / S(-1) = 0.9566 / 0.9866 = 0.9696.
    s = nab.score_file(f, detect(100, 12, 15), STANDARD)
    assert s.detections == [15]
    assert s.raw == pytest.approx(0.9696223491500445, rel=1e-9)


def test_missed_windows_cost_a_fn():
    f = toy(windows=[(20, 29), (40, 59)])
    none = np.zeros(100, dtype=bool)
    assert nab.score_file(f, none, STANDARD).raw == -2.0
    assert nab.score_file(f, none, PROFILES["reward_low_FN_rate"]).raw == -4.0
    assert nab.score_file(f, none, STANDARD).fn == 2


def test_score_file_rejects_wrong_length():
    with pytest.raises(ValueError, match="shape"):
        nab.score_file(toy(), np.zeros(99, dtype=bool), STANDARD)


def test_nabfile_rejects_overlapping_windows():
    with pytest.raises(ValueError, match="overlaps"):
        toy(windows=[(20, 40), (40, 50)])


# --------------------------------------------------------------------------- normalisation


def test_normalisation_never_alerting_is_0_and_perfect_is_100():
    files = [toy(), toy(windows=[(20, 29), (40, 59)]), toy(windows=[])]
    for profile in PROFILES.values():
        null = nab.null_score(files, profile)
        perfect = nab.perfect_score(files, profile)
        assert (null, perfect) == (-3 * profile.a_fn, 3 * profile.a_tp)
        never = sum(nab.score_file(f, np.zeros(100, bool), profile).raw for f in files)
        assert nab.normalised(never, null, perfect) == 0.0
        first_rows = [detect(100, *(s for s, _ in f.windows)) for f in files]
        best = sum(
            nab.score_file(f, d, profile).raw for f, d in zip(files, first_rows, strict=True)
        )
        assert nab.normalised(best, null, perfect) == 100.0


def test_normalised_without_windows_raises():
    with pytest.raises(ValueError):
        nab.normalised(0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- sweep


def brute_force(files, scores, profile):
    """Total raw score for every candidate threshold, highest threshold first."""
    pairs = list(zip(files, scores, strict=True))
    candidates = [math.inf, *sorted({float(v) for s in scores for v in s}, reverse=True)]
    return [(t, sum(nab.score_file(f, s >= t, profile).raw for f, s in pairs)) for t in candidates]


def check_sweep_matches_brute_force(files, scores, profile):
    sweep = nab.sweep_threshold(files, scores, profile)
    totals = brute_force(files, scores, profile)
    best = max(total for _, total in totals)
    assert sweep.raw == pytest.approx(best, abs=1e-9)
    # The reported per-file scores are those at the reported threshold.
    pairs = zip(files, scores, strict=True)
    at_threshold = [nab.score_file(f, s >= sweep.threshold, profile) for f, s in pairs]
    assert [fs.raw for fs in sweep.files] == [fs.raw for fs in at_threshold]
    # Ties go to the highest threshold: nothing above it does (noticeably) as well.
    for t, total in totals:
        if t > sweep.threshold:
            assert total < best + 1e-9
    return sweep


@st.composite
def corpora(draw):
    files, scores = [], []
    for k in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 60))
        cuts = sorted(draw(st.sets(st.integers(0, n - 1), max_size=6)))
        # Pair consecutive cut points into disjoint windows.
        windows = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
        if len(cuts) % 2:  # an odd cut point becomes a one-row window
            windows.append((cuts[-1], cuts[-1]))
        files.append(NabFile(f"f{k}.csv", ["t"] * n, np.zeros(n), windows))
        levels = draw(st.integers(1, 6))  # few distinct levels, so ties are common
        scores.append(np.array(draw(st.lists(st.integers(0, levels), min_size=n, max_size=n))) / 6)
    return files, scores


@settings(max_examples=200, deadline=None)
@given(corpora(), st.sampled_from(sorted(PROFILES)))
def test_sweep_equals_brute_force(corpus, profile_name):
    files, scores = corpus
    check_sweep_matches_brute_force(files, scores, PROFILES[profile_name])


def test_sweep_hand_worked():
    # Window (40, 59). Row 30 scores 0.9 (an FP before the window, -0.11), row 45 scores 0.5
    # (y = (45 - 60) / 20 = -0.75; S(-0.75) = 2 / (1 + e^-3.75) - 1 = 2 / 1.0235177 - 1
    # = 0.9540453, / S(-1) = 0.9669891). Thresholds: inf -> -1; 0.9 -> -1.11;
    # 0.5 -> -0.11 + 0.9669891 = 0.8569891; 0.0 -> every row past probation detects (worse).
    f = toy()
    scores = np.zeros(100)
    scores[30], scores[45] = 0.9, 0.5
    sweep = nab.sweep_threshold([f], [scores], STANDARD)
    assert sweep.threshold == 0.5
    assert sweep.raw == pytest.approx(-0.11 + 0.9669891, abs=1e-6)
    assert sweep.files[0].detections == [45]
    assert sweep.normalised == pytest.approx(100 * (sweep.raw + 1) / 2)


def test_sweep_never_alert_when_everything_hurts():
    # Only an FP scores above zero, and every row scores >= 0: never alerting (-1) is best.
    f = toy()
    scores = np.zeros(100)
    scores[20] = 1.0
    sweep = nab.sweep_threshold([f], [scores], STANDARD)
    assert sweep.threshold == math.inf
    assert (sweep.raw, sweep.normalised) == (-1.0, 0.0)


def test_sweep_ignores_probation_scores():
    # A huge score in probation does not matter: the best threshold still catches row 40.
    f = toy()
    scores = np.zeros(100)
    scores[5], scores[40] = 5.0, 1.0
    sweep = nab.sweep_threshold([f], [scores], STANDARD)
    assert sweep.raw == 1.0
    assert sweep.threshold == 1.0


def test_sweep_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        nab.sweep_threshold([toy()], [np.full(100, np.nan)], STANDARD)


# --------------------------------------------------------------------------- real corpus


@pytest.fixture(scope="module")
def corpus():
    if not NAB_ROOT.is_dir():
        pytest.skip("NAB data not present")
    return nab.load_corpus(NAB_ROOT)


def test_load_corpus_real(corpus):
    assert len(corpus) == 31
    assert sum(len(f.windows) for f in corpus) == 57
    assert [f.name for f in corpus] == sorted(f.name for f in corpus)
    for f in corpus:
        n = len(f)
        assert f.probation == min(math.floor(0.15 * n), 750)
        assert len(f.timestamps) == n and f.values.dtype == np.float64
    taxi = next(f for f in corpus if f.name == "realKnownCause/nyc_taxi.csv")
    assert len(taxi) == 10320 and taxi.probation == 750
    # The first window is 2014-10-30 15:30:00 .. 2014-11-03 22:30:00 (half-hourly rows).
    s, e = taxi.windows[0]
    assert taxi.timestamps[s] == "2014-10-30 15:30:00"
    assert taxi.timestamps[e] == "2014-11-03 22:30:00"
    assert e - s + 1 == 207


def test_real_corpus_perfect_and_null(corpus):
    null, perfect = nab.null_score(corpus, STANDARD), nab.perfect_score(corpus, STANDARD)
    assert (null, perfect) == (-57.0, 57.0)
    first_rows = [detect(len(f), *(s for s, _ in f.windows)) for f in corpus]
    raw = sum(nab.score_file(f, d, STANDARD).raw for f, d in zip(corpus, first_rows, strict=True))
    assert nab.normalised(raw, null, perfect) == pytest.approx(100.0)


def test_sweep_on_real_corpus_matches_brute_force(corpus):
    # Quantised random scores keep the brute force small (21 thresholds).
    rng = np.random.default_rng(0)
    scores = [rng.integers(0, 21, len(f)) / 20 for f in corpus]
    sweep = check_sweep_matches_brute_force(corpus, scores, STANDARD)
    assert len(sweep.files) == 31


def write_corpus(root: Path, labels: dict | None) -> None:
    (root / "data" / "cat").mkdir(parents=True)
    rows = "timestamp,value\n" + "".join(f"2020-01-01 00:0{i}:00,{i}\n" for i in range(6))
    (root / "data" / "cat" / "a.csv").write_text(rows)
    if labels is not None:
        (root / "labels").mkdir()
        (root / "labels" / "combined_windows.json").write_text(json.dumps(labels))


def test_load_corpus_maps_label_timestamps(tmp_path):
    window = ["2020-01-01 00:02:00.000000", "2020-01-01 00:04:00.000000"]
    write_corpus(tmp_path, {"cat/a.csv": [window], "cat/elsewhere.csv": []})
    [f] = nab.load_corpus(tmp_path)
    assert (f.name, f.windows, f.values.tolist()) == ("cat/a.csv", [(2, 4)], [0, 1, 2, 3, 4, 5])


def test_load_corpus_missing_labels_file(tmp_path):
    write_corpus(tmp_path, None)
    with pytest.raises(ValueError, match="labels file not found"):
        nab.load_corpus(tmp_path)


def test_load_corpus_data_file_missing_from_labels(tmp_path):
    write_corpus(tmp_path, {"cat/other.csv": []})
    with pytest.raises(ValueError, match="cat/a.csv has no entry"):
        nab.load_corpus(tmp_path)


# --------------------------------------------------------------------------- point metrics


def test_point_metrics_small_example():
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    alerts = np.array([1, 0, 0, 0, 1, 1, 1, 0, 0, 0], dtype=bool)
    # TP = 2 (rows 4, 5), FP = 2 (rows 0, 6), FN = 1 (row 3), TN = 5; 3 positives, 7 negatives.
    m = nab.point_metrics(labels, alerts)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    # F1 = 2 * 0.5 * 0.6667 / (0.5 + 0.6667) = 0.5714 = 4 / 7
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["false_alarm_rate"] == pytest.approx(2 / 7)
    assert m["missed_alarm_rate"] == pytest.approx(1 / 3)


def test_point_metrics_zero_divisions_are_zero():
    empty = np.zeros(4, dtype=bool)
    m = nab.point_metrics(empty, empty)
    assert m == dict.fromkeys(
        ["precision", "recall", "f1", "false_alarm_rate", "missed_alarm_rate"], 0.0
    )
    full = np.ones(4, dtype=bool)
    assert nab.point_metrics(full, full)["false_alarm_rate"] == 0.0  # no negatives


def test_label_windows_and_detection_delays():
    labels = np.array([1, 0, 1, 1, 1, 0, 0, 1], dtype=bool)
    windows = nab.label_windows(labels)
    assert windows == [(0, 0), (2, 4), (7, 7)]
    assert nab.label_windows(np.zeros(3, dtype=bool)) == []
    assert nab.detection_delays(windows, [0, 4, None]) == [0, 2]
    with pytest.raises(ValueError):
        nab.detection_delays(windows, [0])
