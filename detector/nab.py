"""NAB (Numenta Anomaly Benchmark) scoring, threshold sweep and point metrics.

The rules are those of `data/nab/README.md` (the benchmark's own definition):

- the first 15% of a file's rows (at most 750) are the probation period and are never scored;
- inside an anomaly window only the earliest detection counts and earns
  `A_TP * S(y) / S(-1)`, with `S(y) = 2 / (1 + e^(5y)) - 1` and `y = (i - (end + 1)) / width`
  (-1 at the window's first row, 0 just past its last row);
- a window with no detection costs `-A_FN`;
- a detection outside every window costs `A_FP * S((i - end) / width)`, using the nearest
  preceding window's last row `end` and `width`, or `-A_FP` when no window precedes it;
- the raw score is summed over files and normalised as `100 * (raw - null) / (perfect - null)`.

Windows are inclusive `(start, end)` row indices and a row "detects" when its score is at
least the threshold.

Examples
--------

A 100-row file has a probation period of 15 rows. Give it one window over rows 40..59:

>>> import numpy as np
>>> from detector import nab
>>> f = nab.NabFile(
...     name="toy/a.csv",
...     timestamps=[str(i) for i in range(100)],
...     values=np.zeros(100),
...     windows=[(40, 59)],
... )
>>> f.probation
15

Detecting the window's first row earns the full `A_TP`; a false positive far after the
window costs nearly `A_FP`:

>>> detections = np.zeros(100, dtype=bool)
>>> detections[[40, 45, 99]] = True
>>> s = nab.score_file(f, detections, nab.PROFILES["standard"])
>>> s.tp, s.fp, s.fn, s.detections
(1, 1, 0, [40])
>>> round(s.raw, 4)  # 1 + 0.11 * S(40 / 20)
0.89

Sweeping the threshold over anomaly scores picks the one with the best summed raw score:

>>> scores = np.zeros(100)
>>> scores[40] = 0.9
>>> scores[99] = 0.5
>>> sweep = nab.sweep_threshold([f], [scores], nab.PROFILES["standard"])
>>> sweep.threshold, sweep.raw, sweep.normalised
(0.9, 1.0, 100.0)

Point metrics for a labelled stream:

>>> labels = np.array([0, 0, 1, 1, 0, 0], dtype=bool)
>>> alerts = np.array([0, 1, 0, 1, 0, 0], dtype=bool)
>>> m = nab.point_metrics(labels, alerts)
>>> m["precision"], m["recall"], m["false_alarm_rate"], m["missed_alarm_rate"]
(0.5, 0.5, 0.25, 0.5)
>>> nab.label_windows(labels)
[(2, 3)]

"""

from __future__ import annotations

import bisect
import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

__all__ = [
    "PROBATION_FRACTION",
    "PROBATION_MAX_ROWS",
    "PROFILES",
    "FileScore",
    "NabFile",
    "Profile",
    "Sweep",
    "detection_delays",
    "label_windows",
    "load_corpus",
    "normalised",
    "null_score",
    "perfect_score",
    "point_metrics",
    "probation_length",
    "scaled_sigmoid",
    "score_file",
    "sweep_threshold",
]

PROBATION_FRACTION = 0.15
PROBATION_MAX_ROWS = 750

Window = tuple[int, int]


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """An application profile: the weights of true positives, false positives and misses.

    >>> PROFILES["reward_low_FN_rate"]
    Profile(name='reward_low_FN_rate', a_tp=1.0, a_fp=0.11, a_fn=2.0)

    """

    name: str
    a_tp: float
    a_fp: float
    a_fn: float


PROFILES: dict[str, Profile] = {
    "standard": Profile("standard", 1.0, 0.11, 1.0),
    "reward_low_FP_rate": Profile("reward_low_FP_rate", 1.0, 0.22, 1.0),
    "reward_low_FN_rate": Profile("reward_low_FN_rate", 1.0, 0.11, 2.0),
}


# --------------------------------------------------------------------------- corpus


def probation_length(n_rows: int) -> int:
    """Rows at the start of a file that are never scored: 15% of them, at most 750.

    >>> probation_length(4032), probation_length(15902)
    (604, 750)

    """
    return min(math.floor(PROBATION_FRACTION * n_rows), PROBATION_MAX_ROWS)


@dataclass(eq=False)
class NabFile:
    """One NAB series with its anomaly windows as inclusive row indices.

    `name` is the path relative to `data/`, e.g. `"realKnownCause/nyc_taxi.csv"`. Windows must
    be sorted, disjoint and inside the file; the constructor raises `ValueError` otherwise.

    >>> NabFile("x.csv", ["a", "b"], np.zeros(2), [(1, 2)])
    Traceback (most recent call last):
    ...
    ValueError: x.csv: window (1, 2) is outside rows 0..1

    """

    name: str
    timestamps: list[str]
    values: np.ndarray
    windows: list[Window] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        n = len(self.values)
        if len(self.timestamps) != n:
            raise ValueError(f"{self.name}: {len(self.timestamps)} timestamps but {n} values")
        self.windows = [(int(s), int(e)) for s, e in self.windows]
        previous_end = -1
        for s, e in self.windows:
            if not 0 <= s <= e < n:
                raise ValueError(f"{self.name}: window {(s, e)} is outside rows 0..{n - 1}")
            if s <= previous_end:
                raise ValueError(f"{self.name}: window {(s, e)} overlaps or precedes another")
            previous_end = e

    def __len__(self) -> int:
        return len(self.values)

    @property
    def probation(self) -> int:
        """Number of leading rows in the probation period."""
        return probation_length(len(self.values))


def _parse_time(text: str, where: str) -> datetime:
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ValueError(f"{where}: bad timestamp {text!r}") from exc


def _rows_of_windows(
    name: str, times: Sequence[datetime], windows: Sequence[Sequence[str]]
) -> list[Window]:
    """Map `[start, end]` timestamps to the inclusive rows whose timestamps lie inside."""
    rows = []
    for window in windows:
        start, end = (_parse_time(t, f"labels of {name}") for t in window)
        s = bisect.bisect_left(times, start)
        e = bisect.bisect_right(times, end) - 1
        if s > e:
            raise ValueError(f"{name}: window {list(window)} contains no rows")
        rows.append((s, e))
    return rows


def _read_series(path: Path, name: str) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["timestamp", "value"]:
            raise ValueError(f"{path}: expected a 'timestamp,value' header, got {header}")
        timestamps, values = [], []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                timestamps.append(row[0])
                values.append(float(row[1]))
            except (IndexError, ValueError) as exc:
                raise ValueError(f"{path}:{line_no}: bad row {row}") from exc
    if not values:
        raise ValueError(f"{path}: no rows")
    return timestamps, np.asarray(values, dtype=np.float64)


def load_corpus(root: Path | str) -> list[NabFile]:
    """Read `root/data/**/*.csv` and `root/labels/combined_windows.json`, sorted by name.

    Timestamps of the data and of the labels are both parsed with `datetime.fromisoformat`; a
    window covers every row whose timestamp lies in `[start, end]` (duplicated timestamps
    included). Raises `ValueError` when the labels file is missing, a data file has no
    labels entry, or a file's timestamps go backwards. Labels entries for files that are not
    in `data/` are ignored.
    """
    root = Path(root)
    labels_path = root / "labels" / "combined_windows.json"
    if not labels_path.is_file():
        raise ValueError(f"NAB labels file not found: {labels_path}")
    with labels_path.open() as fh:
        labels = json.load(fh)
    data_dir = root / "data"
    paths = sorted(data_dir.rglob("*.csv"), key=lambda p: p.relative_to(data_dir).as_posix())
    if not paths:
        raise ValueError(f"no NAB data files under {data_dir}")
    files = []
    for path in paths:
        name = path.relative_to(data_dir).as_posix()
        if name not in labels:
            raise ValueError(f"{name} has no entry in {labels_path}")
        timestamps, values = _read_series(path, name)
        times = [_parse_time(t, f"{path}") for t in timestamps]
        if any(b < a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"{path}: timestamps are not in time order")
        windows = _rows_of_windows(name, times, labels[name])
        files.append(NabFile(name, timestamps, values, windows))
    return files


# --------------------------------------------------------------------------- scoring


def scaled_sigmoid(y: float | np.ndarray) -> float | np.ndarray:
    """NAB's `S(y) = 2 / (1 + e^(5y)) - 1`: +1 far left of 0, 0 at 0, -1 far right.

    >>> float(scaled_sigmoid(0.0))
    0.0
    >>> round(float(scaled_sigmoid(-1.0)), 6)
    0.986614

    """
    with np.errstate(over="ignore"):  # e^(5y) overflows to inf for large y: S -> -1, fine
        return 2.0 / (1.0 + np.exp(5.0 * np.asarray(y, dtype=np.float64))) - 1.0


_S_FIRST_ROW = float(scaled_sigmoid(-1.0))


def _row_values(file: NabFile, profile: Profile) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the index of its window (-1 outside), and what a detection there is worth.

    Inside a window that is the TP value `a_tp * S(y) / S(-1)`; outside, the (negative) FP
    cost. The TP value falls strictly from the window's first row to its last.
    """
    n = len(file)
    index = np.arange(n)
    window_of_row = np.full(n, -1, dtype=np.int64)
    value = np.full(n, -profile.a_fp, dtype=np.float64)  # no preceding window
    for k, (s, e) in enumerate(file.windows):
        width = e - s + 1
        inside = slice(s, e + 1)
        window_of_row[inside] = k
        y = (index[inside] - (e + 1)) / width
        value[inside] = profile.a_tp * scaled_sigmoid(y) / _S_FIRST_ROW
        following_end = file.windows[k + 1][0] if k + 1 < len(file.windows) else n
        after = slice(e + 1, following_end)
        value[after] = profile.a_fp * scaled_sigmoid((index[after] - e) / width)
    return window_of_row, value


@dataclass
class FileScore:
    """The score of one file at one threshold.

    `detections[k]` is the row of the earliest counted detection in window `k`, or None.
    `fp` counts detected rows outside every window (after probation).
    """

    name: str
    raw: float
    tp: int
    fp: int
    fn: int
    detections: list[int | None]


def _check_length(file: NabFile, array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != (len(file),):
        raise ValueError(f"{file.name}: {what} has shape {array.shape}, expected ({len(file)},)")
    return array


def score_file(file: NabFile, detections: np.ndarray, profile: Profile) -> FileScore:
    """Score one file's boolean detections under `profile`.

    Detections in the probation period are ignored, whether inside a window or not.

    >>> f = NabFile("f.csv", ["t"] * 40, np.zeros(40), [(20, 29)])
    >>> d = np.zeros(40, dtype=bool)
    >>> d[[2, 25, 27]] = True  # row 2 is in probation (6 rows): ignored
    >>> s = score_file(f, d, PROFILES["standard"])
    >>> s.tp, s.fp, s.fn, s.detections
    (1, 0, 0, [25])

    """
    detections = _check_length(file, detections, "detections").astype(bool)
    window_of_row, value = _row_values(file, profile)
    rows = np.flatnonzero(detections[file.probation :]) + file.probation
    raw = 0.0
    first: list[int | None] = []
    for s, e in file.windows:
        lo = np.searchsorted(rows, s)
        if lo < len(rows) and rows[lo] <= e:
            first.append(int(rows[lo]))
            raw += float(value[rows[lo]])
        else:
            first.append(None)
            raw -= profile.a_fn
    false_positives = rows[window_of_row[rows] < 0]
    raw += float(value[false_positives].sum())
    tp = sum(d is not None for d in first)
    return FileScore(file.name, raw, tp, len(false_positives), len(first) - tp, first)


def null_score(files: Sequence[NabFile], profile: Profile) -> float:
    """Raw score of a detector that never alerts: every window missed."""
    return -profile.a_fn * sum(len(f.windows) for f in files)


def perfect_score(files: Sequence[NabFile], profile: Profile) -> float:
    """Raw score of a detector that detects every window at its first row and nothing else."""
    return profile.a_tp * sum(len(f.windows) for f in files)


def normalised(raw: float, null: float, perfect: float) -> float:
    """`100 * (raw - null) / (perfect - null)`: 0 never alerts, 100 is perfect.

    >>> normalised(-3.0, -4.0, 4.0)
    12.5

    """
    if perfect == null:
        raise ValueError("perfect and null scores are equal (a corpus with no windows)")
    return 100.0 * (raw - null) / (perfect - null)


# --------------------------------------------------------------------------- sweep


@dataclass
class Sweep:
    """The best threshold over a corpus (detect when `score >= threshold`).

    `threshold` is `inf` when never alerting is best. `raw` is the summed raw score there,
    `normalised` its normalised score (NaN for a corpus without windows), `files` the
    per-file scores.
    """

    threshold: float
    raw: float
    normalised: float
    files: list[FileScore]


def sweep_threshold(
    files: Sequence[NabFile], scores: Sequence[np.ndarray], profile: Profile
) -> Sweep:
    """Find the threshold that maximises the summed raw score over `files`.

    Every distinct score value (and "never alert") is a candidate. All scored rows are sorted
    by score, descending, and the total is updated row by row: a false positive adds its cost,
    and a window's contribution is `-a_fn` until one of its rows is detected, then the TP value
    of the earliest of its rows detected so far. Rows with equal scores enter together. Ties
    between thresholds go to the highest one. Cost: one sort of all rows.

    >>> f = NabFile("f.csv", ["t"] * 40, np.zeros(40), [(20, 29)])
    >>> s = np.zeros(40)
    >>> s[[10, 22]] = [0.8, 0.6]
    >>> sw = sweep_threshold([f], [s], PROFILES["standard"])
    >>> sw.threshold, sw.files[0].fp, sw.files[0].detections
    (0.6, 1, [22])

    """
    if len(files) != len(scores):
        raise ValueError(f"{len(files)} files but {len(scores)} score arrays")
    parts_score, parts_window, parts_value = [], [], []
    n_windows = 0
    for file, file_scores in zip(files, scores, strict=True):
        file_scores = _check_length(file, file_scores, "scores").astype(np.float64)
        if np.isnan(file_scores).any():
            raise ValueError(f"{file.name}: scores contain NaN")
        window_of_row, value = _row_values(file, profile)
        p = file.probation
        parts_score.append(file_scores[p:])
        # Number windows across the corpus; rows outside windows keep -1.
        parts_window.append(np.where(window_of_row[p:] >= 0, window_of_row[p:] + n_windows, -1))
        parts_value.append(value[p:])
        n_windows += len(file.windows)

    null = null_score(files, profile)
    perfect = perfect_score(files, profile)
    # All scored rows of the corpus, concatenated in file and time order.
    score_all = np.concatenate([np.zeros(0), *parts_score])
    window_all = np.concatenate([np.zeros(0, dtype=np.int64), *parts_window])
    value_all = np.concatenate([np.zeros(0), *parts_value])
    m = len(score_all)

    order = np.argsort(-score_all, kind="stable")  # sweep order: highest score first
    score, window = score_all[order], window_all[order]

    # Change of the total when each row (in sweep order) becomes detected.
    delta = np.where(window < 0, value_all[order], 0.0)
    in_window = np.flatnonzero(window >= 0)
    if len(in_window):
        # Window rows grouped by window, in sweep order inside each group.
        by_window = in_window[np.argsort(window[in_window], kind="stable")]
        w = window[by_window]
        # A window is worth the TP value of its earliest detected row so far (the TP value
        # falls with the row). Take a running minimum of the row's position in `*_all`
        # that restarts at each window: later windows get smaller keys, so each group's
        # keys are below all earlier ones.
        key = (n_windows - w) * m + order[by_window]
        earliest = np.minimum.accumulate(key) % m
        current = value_all[earliest]
        first_in_group = np.r_[True, w[1:] != w[:-1]]
        previous = np.where(first_in_group, -profile.a_fn, np.r_[0.0, current[:-1]])
        delta[by_window] = current - previous

    # Totals at the boundaries between distinct scores, after the "never alert" candidate.
    last_of_group = np.flatnonzero(np.r_[score[1:] != score[:-1], m > 0])
    totals = np.r_[null, null + np.cumsum(delta)[last_of_group]]
    thresholds = np.r_[np.inf, score[last_of_group]]
    best = int(np.argmax(totals))  # first maximum: the highest threshold among ties
    threshold = float(thresholds[best])

    per_file = [
        score_file(f, np.asarray(s, dtype=np.float64) >= threshold, profile)
        for f, s in zip(files, scores, strict=True)
    ]
    raw = sum(fs.raw for fs in per_file)
    score_normalised = normalised(raw, null, perfect) if perfect != null else math.nan
    return Sweep(threshold, raw, score_normalised, per_file)


# --------------------------------------------------------------------------- point metrics


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def point_metrics(labels: np.ndarray, alerts: np.ndarray) -> dict[str, float]:
    """Row-wise precision, recall, F1, false alarm rate and missed alarm rate.

    `false_alarm_rate` is FP / negatives and `missed_alarm_rate` FN / positives. Every ratio
    whose denominator is zero (no alerts, no positives, no negatives) is defined as 0.0.

    >>> point_metrics(np.zeros(3, dtype=bool), np.zeros(3, dtype=bool))["recall"]
    0.0

    """
    labels = np.asarray(labels, dtype=bool)
    alerts = np.asarray(alerts, dtype=bool)
    if labels.shape != alerts.shape:
        raise ValueError(f"labels {labels.shape} and alerts {alerts.shape} differ in shape")
    tp = int(np.sum(labels & alerts))
    fp = int(np.sum(~labels & alerts))
    fn = int(np.sum(labels & ~alerts))
    tn = int(np.sum(~labels & ~alerts))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "false_alarm_rate": _ratio(fp, fp + tn),
        "missed_alarm_rate": _ratio(fn, tp + fn),
    }


def label_windows(labels: np.ndarray) -> list[Window]:
    """Runs of consecutive positive labels as inclusive `(start, end)` rows.

    >>> label_windows(np.array([1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=bool))
    [(0, 1), (4, 4), (6, 8)]

    """
    padded = np.r_[False, np.asarray(labels, dtype=bool), False].astype(np.int8)
    edges = np.diff(padded)
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def detection_delays(
    windows: Sequence[Window], first_detection_index: Sequence[int | None]
) -> list[int]:
    """Rows from each detected window's start to its earliest detection; missed ones skipped.

    >>> detection_delays([(10, 20), (30, 40), (50, 60)], [12, None, 50])
    [2, 0]

    """
    if len(windows) != len(first_detection_index):
        raise ValueError(
            f"{len(windows)} windows but {len(first_detection_index)} detection indices"
        )
    pairs = zip(windows, first_detection_index, strict=True)
    return [d - s for (s, _), d in pairs if d is not None]
