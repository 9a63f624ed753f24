"""Labelled files -> the daemon's own engine and scorer -> NAB scores, point metrics, plots.

There is no offline scoring path: every file becomes one stream of `Event`s, and the events go
through `replay.replay` into one `Engine.from_config` engine, exactly as the daemon steps Kafka
micro-batches. All streams of a run are interleaved in waves (row k of every file, then row k + 1),
so a micro-batch steps many streams at once; each stream still sees only its own rows, in order,
which makes a row's score depend on nothing after it (the protocol is causal).

What the model may learn from: its offline pretraining, each file's own prefix (NAB's probation
rows, CSV mode's `train_rows`) and the rows already seen (the engine's online normalisation and
score statistics). Labels are read only to score the result.

Three modes:

- `evaluate_nab`: NAB's layout and protocol (`nab.py`); the threshold is swept per profile over
  the whole run, as the benchmark does, unless one is given.
- `evaluate_csv`: labelled CSV files with any number of numeric columns. A model with the file's
  columns as its features scores rows directly. A univariate model (one feature) scores each
  column as its own stream `<file>#<column>`, and a row's score is the max over its columns.
  The score here is the engine's calibrated probability of every row, not the alert score
  (news only) that NAB and the daemon use: point metrics judge every row of an anomaly, and
  an alert score marks only its onset. The alert threshold of a file comes from its training
  rows' scores, never from labels.
- `evaluate_synthetic`: generated streams with injected anomalies; ROC AUC, F1 and detection
  delay per anomaly kind.

Examples
--------

ROC AUC by ranks, ties counted half:

>>> roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0]))
1.0
>>> roc_auc(np.array([0.5, 0.5, 0.5]), np.array([1, 0, 0]))
0.5

Row k of every series steps in the same wave:

>>> wave_order([3, 1, 2])
(array([0, 1, 2, 0, 2, 0]), array([0, 0, 0, 1, 1, 2]))
"""

from __future__ import annotations

import csv
import html
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from detector import nab
from detector.artifact import Artifact
from detector.config import Config
from detector.engine import SCORED, Engine
from detector.errors import ArtifactError, InputError, InvalidRecord
from detector.events import DeadLetter, Event, Position, Schema, parse_timestamp
from detector.replay import ReplaySummary, replay
from detector.sources import Chunk

__all__ = [
    "DETECTOR_NAME",
    "INVALID",
    "TRAIN_QUANTILE",
    "LabelledFile",
    "Replayed",
    "Series",
    "evaluate_csv",
    "evaluate_nab",
    "evaluate_synthetic",
    "format_report",
    "load_labelled_csv",
    "replay_events",
    "roc_auc",
    "score_series",
    "wave_order",
]

DETECTOR_NAME = "detector"  # the detector's name in NAB's results layout
INVALID = 3  # outcome of a row that was never stepped (a non-finite value); engine codes are 0..2
TRAIN_QUANTILE = 0.999  # CSV mode: alert above this quantile of the training rows' scores
# Torch threads per engine. A wave is a few dozen rows: intra-op threads only add overhead, and
# on a busy machine their spin-waits made replay 20x slower. `jobs` is the way to use more cores.
THREADS = 1


# --------------------------------------------------------------------------- replay


@dataclass
class Series:
    """One stream to replay: its id, epoch-second times and values (T, F).

    A row with a non-finite value is not stepped (outcome `INVALID`, score 0).
    """

    name: str
    ts: np.ndarray  # (T,) float64 epoch seconds
    values: np.ndarray  # (T, F) float64
    attrs: tuple[str, ...] = ()  # the same attrs on every row ("" where the data has none)

    def __len__(self) -> int:
        return len(self.ts)


@dataclass
class Replayed:
    """The engine's verdict on every row of one series (or event list), in row order."""

    score: np.ndarray  # (T,) float64; 0 unless scored
    outcome: np.ndarray  # (T,) int8: engine.SCORED / WARMUP / REJECTED, or INVALID
    alert: np.ndarray  # (T,) bool: the engine's alert decision at the configured threshold
    probability: np.ndarray  # (T,) float64 calibrated probability (not only news); 0 unless scored

    @property
    def scored(self) -> np.ndarray:
        return self.outcome == SCORED


def wave_order(lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(series index, row) of every row, ordered by row and then by series: the waves."""
    sizes = np.asarray(lengths, dtype=np.int64)
    series = np.repeat(np.arange(len(sizes)), sizes)
    rows = np.concatenate([np.zeros(0, np.int64), *[np.arange(n) for n in sizes]])
    order = np.lexsort((series, rows))
    return series[order], rows[order]


def replay_events(
    engine: Engine, events: Sequence[Event | None], batch_size: int, attr_buckets: int = 1024
) -> Replayed:
    """Step events, in order and `batch_size` at a time, through `replay.replay`.

    None stands for a record that could not be decoded: it becomes a dead letter, as in the
    daemon, and gets outcome `INVALID`.
    """
    n = len(events)
    score = np.zeros(n)
    probability = np.zeros(n)
    outcome = np.full(n, INVALID, dtype=np.int8)
    alert = np.zeros(n, dtype=bool)

    def chunks() -> Iterator[Chunk]:
        for start in range(0, n, batch_size):
            chunk = Chunk()
            for i in range(start, min(n, start + batch_size)):
                position = Position("evaluate", None, i)
                event = events[i]
                if event is None:
                    chunk.invalid.append(DeadLetter("bad_value", "not finite", position, b""))
                else:
                    chunk.events.append(event)
                    chunk.positions.append(position)
            yield chunk

    for step in replay(chunks(), engine, ReplaySummary(), attr_buckets):
        if not len(step.positions):
            continue
        index = np.fromiter((p.offset for p in step.positions), np.int64, len(step.positions))
        score[index] = step.result.score
        probability[index] = step.result.probability
        outcome[index] = step.result.outcome
        alert[index] = step.result.is_alert
    score[outcome != SCORED] = 0.0
    probability[outcome != SCORED] = 0.0
    return Replayed(score, outcome, alert, probability)


def _score_group(
    artifact: Artifact, config: Config, series: Sequence[Series], batch_size: int, threads: int
) -> list[Replayed]:
    """One engine for a group of series, interleaved in waves, on `threads` torch threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _replay_group(artifact, config, series, batch_size)
    finally:
        torch.set_num_threads(previous)


def _replay_group(
    artifact: Artifact, config: Config, series: Sequence[Series], batch_size: int
) -> list[Replayed]:
    engine = Engine.from_config(artifact.model, config, artifact.calibration)
    index, rows = wave_order([len(s) for s in series])
    listed = [s.values.tolist() for s in series]
    ts = [s.ts.tolist() for s in series]
    finite = [np.isfinite(s.values).all(axis=1).tolist() for s in series]
    events: list[Event | None] = [
        Event(series[i].name, ts[i][r], tuple(listed[i][r]), series[i].attrs)
        if finite[i][r]
        else None
        for i, r in zip(index.tolist(), rows.tolist(), strict=True)
    ]
    flat = replay_events(engine, events, batch_size, artifact.model.config.attr_buckets)
    out = []
    for i in range(len(series)):
        pick = np.flatnonzero(index == i)  # in row order: rows of one series keep their order
        out.append(
            Replayed(flat.score[pick], flat.outcome[pick], flat.alert[pick], flat.probability[pick])
        )
    return out


def score_series(
    artifact: Artifact,
    config: Config,
    series: Sequence[Series],
    *,
    batch_size: int | None = None,
    jobs: int = 1,
) -> list[Replayed]:
    """Scores of every row of every series, through the daemon's engine.

    With `jobs` > 1 the series are split into that many groups of about equal rows, each group
    replayed by its own engine in its own process. A stream's scores do not depend on which
    other streams share its engine.
    """
    batch_size = batch_size or config.engine.batch_size
    for s in series:
        if s.values.ndim != 2 or s.values.shape[1] != artifact.model.config.n_features:
            raise InputError(
                f"{s.name}: {s.values.shape[-1]} value columns, the model takes "
                f"{artifact.model.config.n_features}"
            )
    jobs = max(1, min(jobs, len(series)))
    if jobs == 1:
        return _score_group(artifact, config, series, batch_size, THREADS)
    groups: list[list[int]] = [[] for _ in range(jobs)]
    load = [0] * jobs
    for i in sorted(range(len(series)), key=lambda k: -len(series[k])):
        g = load.index(min(load))
        groups[g].append(i)
        load[g] += len(series[i])
    threads = THREADS
    results: list[Replayed | None] = [None] * len(series)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(_score_group, artifact, config, [series[i] for i in g], batch_size, threads)
            for g in groups
        ]
        for group, future in zip(groups, futures, strict=True):
            for i, replayed in zip(group, future.result(), strict=True):
                results[i] = replayed
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------- metrics


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive outranks a negative (ties count half).

    NaN when either class is empty.

    >>> roc_auc(np.array([0.1, 0.2, 0.9]), np.array([True, False, False]))
    0.0
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    distinct, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of each distinct value's last row
    average_rank = ends - (counts - 1) / 2.0
    rank_sum = float(average_rank[inverse][positives].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _first_detections(windows: Sequence[tuple[int, int]], alerts: np.ndarray) -> list[int | None]:
    rows = np.flatnonzero(alerts)
    first: list[int | None] = []
    for s, e in windows:
        k = np.searchsorted(rows, s)
        first.append(int(rows[k]) if k < len(rows) and rows[k] <= e else None)
    return first


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _finite(value: float) -> float | None:
    """JSON has no inf or NaN: None stands for them."""
    return float(value) if value is not None and math.isfinite(value) else None


# --------------------------------------------------------------------------- NAB


def evaluate_nab(
    root: str | Path,
    artifact: Artifact,
    config: Config,
    output_dir: str | Path | None = None,
    profiles: Sequence[str] | None = None,
    threshold: float | None = None,
    plots: bool = True,
    jobs: int = 1,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Replay a NAB-layout corpus and score it under NAB's rules; returns the report.

    Each file is a stream named by its path under `data/`; timestamps without a zone are UTC.
    Rows still in the engine's warm-up score 0 (NAB never scores the probation rows anyway).
    With `threshold` None it is swept per profile to maximise the summed raw score, as NAB does.
    With `output_dir`, writes `report.json`, NAB's results layout
    `<output>/detector/<category>/detector_<file>.csv`, and (with `plots`) one PNG per file
    under `plots/` with `index.html` listing them.
    """
    started = time.perf_counter()
    names = list(profiles) if profiles else list(nab.PROFILES)
    unknown = [p for p in names if p not in nab.PROFILES]
    if unknown:
        raise InputError(f"unknown NAB profile(s) {unknown}; use {list(nab.PROFILES)}")
    if artifact.model.config.n_features != 1:
        raise ArtifactError(
            f"NAB series are univariate, but the model takes {artifact.model.config.n_features} "
            f"features ({', '.join(artifact.features)})"
        )
    try:
        files = nab.load_corpus(root)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    blank = ("",) * len(artifact.attrs)
    series = [
        Series(
            f.name,
            np.array([parse_timestamp(t) for t in f.timestamps], dtype=np.float64),
            f.values[:, None],
            blank,
        )
        for f in files
    ]
    loaded = time.perf_counter()
    replayed = score_series(artifact, config, series, batch_size=batch_size, jobs=jobs)
    scores = [r.score for r in replayed]
    stepped = time.perf_counter()

    summary: dict[str, Any] = {}
    per_profile: dict[str, list[nab.FileScore]] = {}
    for name in names:
        profile = nab.PROFILES[name]
        if threshold is None:
            sweep = nab.sweep_threshold(files, scores, profile)
            chosen, file_scores = sweep.threshold, sweep.files
        else:
            chosen = float(threshold)
            file_scores = [
                nab.score_file(f, s >= chosen, profile) for f, s in zip(files, scores, strict=True)
            ]
        raw = sum(fs.raw for fs in file_scores)
        null, perfect = nab.null_score(files, profile), nab.perfect_score(files, profile)
        per_profile[name] = file_scores
        summary[name] = {
            "score": _finite(nab.normalised(raw, null, perfect) if perfect != null else math.nan),
            "raw": raw,
            "null": null,
            "perfect": perfect,
            "threshold": _finite(chosen),
            "tp": sum(fs.tp for fs in file_scores),
            "fp": sum(fs.fp for fs in file_scores),
            "fn": sum(fs.fn for fs in file_scores),
        }

    main = names[0]
    per_file = []
    for k, f in enumerate(files):
        entry: dict[str, Any] = {
            "name": f.name,
            "rows": len(f),
            "probation": f.probation,
            "windows": len(f.windows),
            "scored": int(replayed[k].scored.sum()),
        }
        for name in names:
            fs = per_profile[name][k]
            delays = nab.detection_delays(f.windows, fs.detections)
            entry[name] = {
                "raw": fs.raw,
                "tp": fs.tp,
                "fp": fs.fp,
                "fn": fs.fn,
                "detections": fs.detections,
                "delays": delays,
            }
        per_file.append(entry)
    all_delays = [d for e in per_file for d in e[main]["delays"]]
    report: dict[str, Any] = {
        "mode": "nab",
        "root": str(root),
        "model": _model_info(artifact),
        "scoring": config.scoring.model_dump(mode="json"),
        "threshold_mode": "swept" if threshold is None else "fixed",
        "files": len(files),
        "rows": sum(len(f) for f in files),
        "windows": sum(len(f.windows) for f in files),
        "profiles": summary,
        "main_profile": main,
        "mean_delay_rows": _mean(all_delays),
        "per_file": per_file,
        "jobs": jobs,
    }
    if output_dir is not None:
        out = Path(output_dir)
        for f, s in zip(files, scores, strict=True):
            _write_nab_result(out, f, s)
        if plots:
            items = []
            for k, f in enumerate(files):
                picture = Path("plots") / f"{f.name.removesuffix('.csv')}.png"
                alerts = np.zeros(len(f), dtype=bool)
                if summary[main]["threshold"] is not None:
                    alerts = scores[k] >= summary[main]["threshold"]
                alerts[: f.probation] = False
                _plot(
                    out / picture, f.name, f.values[:, None], ["value"], scores[k],
                    summary[main]["threshold"], f.windows, alerts, f.probation,
                )  # fmt: skip
                fs = per_profile[main][k]
                items.append((f.name, picture, f"TP {fs.tp} FP {fs.fp} FN {fs.fn}"))
            _write_index(out / "index.html", "NAB evaluation", format_report(report), items)
    finished = time.perf_counter()
    report["seconds"] = {
        "load": round(loaded - started, 3),
        "replay": round(stepped - loaded, 3),
        "total": round(finished - started, 3),
    }
    report["rows_per_second"] = round(report["rows"] / max(stepped - loaded, 1e-9))
    if output_dir is not None:
        _write_json(Path(output_dir) / "report.json", report)
    return report


def _write_nab_result(out: Path, file: nab.NabFile, score: np.ndarray) -> None:
    category, _, base = file.name.rpartition("/")
    path = out / DETECTOR_NAME / category / f"{DETECTOR_NAME}_{base}"
    path.parent.mkdir(parents=True, exist_ok=True)
    label = np.zeros(len(file), dtype=np.int8)
    for s, e in file.windows:
        label[s : e + 1] = 1
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["timestamp", "value", "anomaly_score", "label"])
        for t, v, s, lab in zip(
            file.timestamps, file.values.tolist(), score.tolist(), label.tolist(), strict=True
        ):
            writer.writerow([t, repr(v), repr(s), lab])


# --------------------------------------------------------------------------- labelled CSV


@dataclass
class LabelledFile:
    """A labelled CSV file: the times as written, their epoch seconds, numeric columns, labels."""

    name: str  # path relative to the evaluated directory
    times: list[str]
    ts: np.ndarray  # (T,) float64
    columns: list[str]
    values: np.ndarray  # (T, F) float64, NaN where a value is missing or not a number
    labels: np.ndarray  # (T,) bool
    skipped: list[str] = field(default_factory=list)  # non-numeric columns left out

    def __len__(self) -> int:
        return len(self.times)


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def load_labelled_csv(
    path: Path,
    name: str,
    sep: str,
    time_col: str,
    label_col: str,
    ignore_cols: Sequence[str] = (),
) -> LabelledFile:
    """Read one labelled file; every other column that holds numbers is a feature.

    A column is numeric when each of its non-empty cells parses as a number. A label is
    positive when it is a non-zero number.
    """
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = [row for row in csv.reader(fh, delimiter=sep) if row]
    if not rows:
        raise InputError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    for needed, what in ((time_col, "--time-col"), (label_col, "--label-col")):
        if needed not in header:
            raise InputError(f"{path}: no column {needed!r} ({what}); it has {', '.join(header)}")
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise InputError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
    cells = list(zip(*body, strict=True)) if body else [() for _ in header]
    by_name = dict(zip(header, cells, strict=True))
    times = list(by_name[time_col])  # written back exactly as read
    ts = np.empty(len(times))
    for i, t in enumerate(times):
        try:
            ts[i] = parse_timestamp(t)
        except InvalidRecord as exc:
            raise InputError(f"{path}:{i + 2}: {exc}") from exc
    try:
        labels = np.array([float(x) != 0.0 for x in by_name[label_col]], dtype=bool)
    except ValueError as exc:
        raise InputError(f"{path}: column {label_col!r} holds a non-number: {exc}") from exc
    skip = {time_col, label_col, *ignore_cols}
    columns, values, skipped = [], [], []
    for column in header:
        if column in skip:
            continue
        numbers = np.array([_to_float(c) for c in by_name[column]])
        filled = [c.strip() != "" for c in by_name[column]]
        if np.isnan(numbers[np.asarray(filled, dtype=bool)]).any() or not any(filled):
            skipped.append(column)
            continue
        columns.append(column)
        values.append(numbers)
    if not columns:
        raise InputError(f"{path}: no numeric feature columns besides time and label")
    return LabelledFile(name, times, ts, columns, np.stack(values, axis=1), labels, skipped)


def _csv_series(artifact: Artifact, file: LabelledFile) -> tuple[list[Series], str]:
    """The file as streams for this model: its columns directly, or one stream per column."""
    blank = ("",) * len(artifact.attrs)
    features = artifact.features
    if len(features) == 1 and len(file.columns) == 1:
        return [Series(file.name, file.ts, file.values, blank)], "direct"
    if len(features) > 1:
        missing = [f for f in features if f not in file.columns]
        if missing:
            raise InputError(
                f"{file.name}: the model's features {features} are not all columns of the file "
                f"(missing {missing}; it has {file.columns})"
            )
        index = [file.columns.index(f) for f in features]
        return [Series(file.name, file.ts, file.values[:, index], blank)], "direct"
    return [
        Series(f"{file.name}#{column}", file.ts, file.values[:, [j]], blank)
        for j, column in enumerate(file.columns)
    ], "per_column"


def evaluate_csv(
    root: str | Path,
    artifact: Artifact,
    config: Config,
    sep: str = ",",
    time_col: str = "timestamp",
    label_col: str = "label",
    ignore_cols: Sequence[str] = (),
    train_rows: int = 0,
    output_dir: str | Path | None = None,
    threshold: float | None = None,
    plots: bool = True,
    jobs: int = 1,
    batch_size: int | None = None,
    train_quantile: float = TRAIN_QUANTILE,
) -> dict[str, Any]:
    """Replay every CSV file under `root` as its own stream and compute point metrics.

    A row's score is its calibrated anomaly probability (max over columns), so that every row of
    a lasting anomaly can count, not only its onset. The first `train_rows` rows of a file are
    normal history: stepped (the engine learns from them) but not scored. A file's alert
    threshold is `threshold` when given, else the larger of the configured threshold and the
    `train_quantile` quantile of its training rows' scores.
    Rows after the training rows that are still warming up score 0 and do not alert.
    With `output_dir`: `predictions/<relative path>` (the time column as in the input, `score`,
    `anomaly`; same separator as the input), plots, `index.html` and `report.json`.
    """
    started = time.perf_counter()
    root = Path(root)
    paths = sorted(p for p in root.rglob("*.csv") if p.is_file())
    if not paths:
        raise InputError(f"no .csv files under {root}")
    files = [
        load_labelled_csv(p, p.relative_to(root).as_posix(), sep, time_col, label_col, ignore_cols)
        for p in paths
    ]
    series: list[Series] = []
    owners: list[int] = []
    modes = set()
    for k, f in enumerate(files):
        streams, mode = _csv_series(artifact, f)
        modes.add(mode)
        series += streams
        owners += [k] * len(streams)
    loaded = time.perf_counter()
    replayed = score_series(artifact, config, series, batch_size=batch_size, jobs=jobs)
    stepped = time.perf_counter()

    owner = np.asarray(owners)
    per_file, all_labels, all_alerts, all_delays = [], [], [], []
    results = []
    windows_total = windows_found = 0
    for k, f in enumerate(files):
        mine = [replayed[i] for i in np.flatnonzero(owner == k)]
        score = np.max(np.stack([r.probability for r in mine]), axis=0)  # (T,) max over columns
        scored = np.any(np.stack([r.scored for r in mine]), axis=0)
        start = min(train_rows, len(f))
        train_scores = score[:start][scored[:start]]
        if threshold is not None:
            chosen = float(threshold)
        elif len(train_scores):
            chosen = max(config.scoring.threshold, float(np.quantile(train_scores, train_quantile)))
        else:
            chosen = config.scoring.threshold
        test_score = score[start:]
        alerts = test_score >= chosen
        labels = f.labels[start:]
        windows = nab.label_windows(labels)
        first = _first_detections(windows, alerts)
        delays = nab.detection_delays(windows, first)
        metrics = nab.point_metrics(labels, alerts)
        per_file.append(
            {
                "name": f.name,
                "rows": len(f),
                "train_rows": start,
                "evaluated": len(labels),
                "columns": f.columns,
                "skipped_columns": f.skipped,
                "threshold": chosen,
                "positives": int(labels.sum()),
                "alerts": int(alerts.sum()),
                **metrics,
                "windows": len(windows),
                "windows_detected": sum(d is not None for d in first),
                "delays": delays,
                "mean_delay_rows": _mean(delays),
            }
        )
        windows_total += len(windows)
        windows_found += sum(d is not None for d in first)
        all_labels.append(labels)
        all_alerts.append(alerts)
        all_delays += delays
        results.append((f, test_score, alerts, chosen, windows, start))
    labels_all = np.concatenate(all_labels)
    alerts_all = np.concatenate(all_alerts)
    overall = nab.point_metrics(labels_all, alerts_all)
    report: dict[str, Any] = {
        "mode": "csv",
        "root": str(root),
        "model": _model_info(artifact),
        "scoring": config.scoring.model_dump(mode="json"),
        "columns_as": sorted(modes)[0] if len(modes) == 1 else sorted(modes),
        "threshold_mode": "fixed" if threshold is not None else f"train_quantile {train_quantile}",
        "train_rows": train_rows,
        "files": len(files),
        "rows": sum(len(f) for f in files),
        "evaluated": int(len(labels_all)),
        "positives": int(labels_all.sum()),
        "alerts": int(alerts_all.sum()),
        "overall": overall,
        "windows": windows_total,
        "windows_detected": windows_found,
        "mean_delay_rows": _mean(all_delays),
        "per_file": per_file,
        "jobs": jobs,
    }
    if output_dir is not None:
        out = Path(output_dir)
        items = []
        for f, test_score, alerts, chosen, windows, start in results:
            path = out / "predictions" / f.name
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh, delimiter=sep)
                writer.writerow([time_col, "score", "anomaly"])
                for t, s, a in zip(
                    f.times[start:], test_score.tolist(), alerts.tolist(), strict=True
                ):
                    writer.writerow([t, repr(s), int(a)])
            if plots:
                picture = Path("plots") / f"{f.name.removesuffix('.csv')}.png"
                shifted = [(s + start, e + start) for s, e in windows]
                full_alerts = np.r_[np.zeros(start, dtype=bool), alerts]
                full_score = np.r_[np.zeros(start), test_score]
                _plot(
                    out / picture, f.name, f.values, f.columns, full_score, chosen, shifted,
                    full_alerts, start,
                )  # fmt: skip
                entry = next(e for e in per_file if e["name"] == f.name)
                items.append(
                    (f.name, picture, f"F1 {entry['f1']:.3f} alerts {entry['alerts']} "
                     f"windows {entry['windows_detected']}/{entry['windows']}")
                )  # fmt: skip
        if plots:
            _write_index(out / "index.html", "CSV evaluation", format_report(report), items)
    finished = time.perf_counter()
    report["seconds"] = {
        "load": round(loaded - started, 3),
        "replay": round(stepped - loaded, 3),
        "total": round(finished - started, 3),
    }
    if output_dir is not None:
        _write_json(Path(output_dir) / "report.json", report)
    return report


# --------------------------------------------------------------------------- synthetic


def _synthetic_events(artifact: Artifact, dataset) -> tuple[list[Event], np.ndarray, str]:
    """The dataset's events as the daemon decodes them, and each one's event index.

    A model with the dataset's features reads events whole; a univariate model reads each
    feature as its own stream `<stream>#<feature>`.
    """
    features = list(artifact.features)
    if all(f in dataset.features for f in features) and (
        len(features) > 1 or len(dataset.features) == 1
    ):
        schema = Schema(features=tuple(features), attrs=tuple(artifact.attrs))
        events = [schema.decode(orjson.dumps(e)) for e in dataset.events]
        return events, np.arange(len(events)), "direct"
    if len(features) != 1:
        raise ArtifactError(
            f"the model's features {features} do not fit the dataset's {dataset.features}"
        )
    out, owner = [], []
    for i, e in enumerate(dataset.events):
        ts = parse_timestamp(e["ts"])
        attrs = tuple(str(e.get("attrs", {}).get(a, "")) for a in artifact.attrs)
        for name in dataset.features:
            out.append(Event(f"{e['stream']}#{name}", ts, (float(e["values"][name]),), attrs))
            owner.append(i)
    return out, np.asarray(owner), "per_column"


def evaluate_synthetic(
    artifact: Artifact,
    config: Config,
    dataset,
    output_dir: str | Path | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Replay a `synthetic.Dataset` in delivery order and score it per anomaly kind.

    Per kind, over scored events: ROC AUC of the calibrated probability (that kind's events
    against normal ones: it ranks every event, where the score only marks news), event-level
    precision, recall and F1 of the engine's alerts at the configured threshold (false
    positives are alerts on normal events), and per episode: how many were caught (an alert on
    one of its labelled events) and the mean delay in events from its first labelled event to
    that alert. Episode precision counts runs of consecutive alerts
    of a stream: a run is true when it touches a labelled event.
    """
    import torch

    started = time.perf_counter()
    events, owner, mode = _synthetic_events(artifact, dataset)
    engine = Engine.from_config(artifact.model, config, artifact.calibration)
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        replayed = replay_events(
            engine,
            events,
            batch_size or config.engine.batch_size,
            artifact.model.config.attr_buckets,
        )
    finally:
        torch.set_num_threads(previous)
    stepped = time.perf_counter()
    n = len(dataset.events)
    score = np.zeros(n)
    np.maximum.at(score, owner, replayed.probability)
    scored = np.zeros(n, dtype=bool)
    np.logical_or.at(scored, owner, replayed.scored)
    alert = np.zeros(n, dtype=bool)
    np.logical_or.at(alert, owner, replayed.alert)
    alert &= scored

    labels = np.asarray(dataset.labels, dtype=object)
    episodes = np.asarray(dataset.episodes, dtype=np.int64)
    normal = labels == ""
    streams = np.asarray([e["stream"] for e in dataset.events], dtype=object)

    # Runs of consecutive alerts per stream (events in time order within a stream).
    order = np.argsort(streams, kind="stable")
    a, s_sorted = alert[order], streams[order]
    new_stream = np.r_[True, s_sorted[1:] != s_sorted[:-1]]
    run_start = a & (new_stream | ~np.r_[False, a[:-1]])
    run_id = np.cumsum(run_start) - 1
    alerted = np.flatnonzero(a)
    run_of_alert = run_id[alerted]
    label_of_alert = labels[order][alerted]
    false_runs = len(set(run_of_alert.tolist()) - set(run_of_alert[label_of_alert != ""].tolist()))

    kinds = list(dataset.kinds) or sorted(set(labels.tolist()) - {""})
    rows = []
    for kind in [*kinds, "all"]:
        is_kind = ~normal if kind == "all" else labels == kind
        pick = scored & (is_kind | normal)
        auc = roc_auc(score[pick], is_kind[pick])
        metrics = nab.point_metrics(is_kind[pick], alert[pick])
        ids = np.unique(episodes[is_kind & (episodes >= 0)])
        delays, caught = [], 0
        for ep in ids.tolist():
            members = np.flatnonzero(episodes == ep)
            hits = np.flatnonzero(alert[members])
            if len(hits):
                caught += 1
                delays.append(int(hits[0]))
        true_runs = len(set(run_of_alert[is_kind[order][alerted]].tolist()))
        rows.append(
            {
                "kind": kind,
                "events": int(is_kind.sum()),
                "scored": int((is_kind & scored).sum()),
                "episodes": len(ids),
                "roc_auc": _finite(auc),
                "precision": metrics["precision"],
                "recall": metrics["recall"],
                "f1": metrics["f1"],
                "episodes_caught": caught,
                "episode_recall": caught / len(ids) if len(ids) else None,
                "episode_precision": (
                    true_runs / (true_runs + false_runs) if true_runs + false_runs else None
                ),
                "mean_delay_events": _mean(delays),
            }
        )
    report: dict[str, Any] = {
        "mode": "synthetic",
        "model": _model_info(artifact),
        "scoring": config.scoring.model_dump(mode="json"),
        "features_as": mode,
        "events": n,
        "streams": len(set(streams.tolist())),
        "scored": int(scored.sum()),
        "normal_alerts": int((alert & normal).sum()),
        "false_alarm_rate": float(
            (alert & normal & scored).sum() / max((normal & scored).sum(), 1)
        ),
        "kinds": rows,
        "seconds": {"replay": round(stepped - started, 3), "total": round(stepped - started, 3)},
        "events_per_second": round(len(events) / max(stepped - started, 1e-9)),
    }
    if output_dir is not None:
        _write_json(Path(output_dir) / "report.json", report)
    return report


# --------------------------------------------------------------------------- output


def _model_info(artifact: Artifact) -> dict[str, Any]:
    return {
        "path": str(artifact.path) if artifact.path else None,
        "version": artifact.version,
        "features": artifact.features,
        "attrs": artifact.attrs,
    }


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The report as plain-text tables, for stdout and the index page."""
    mode = report["mode"]
    if mode == "nab":
        profiles = report["profiles"]
        head = _table(
            ["profile", "score", "raw", "TP", "FP", "FN", "threshold"],
            [
                [name, p["score"], p["raw"], p["tp"], p["fp"], p["fn"], p["threshold"]]
                for name, p in profiles.items()
            ],
        )
        main = report["main_profile"]
        files = _table(
            ["file", "rows", "windows", "TP", "FP", "FN", "delays (rows)"],
            [
                [e["name"], e["rows"], e["windows"], e[main]["tp"], e[main]["fp"], e[main]["fn"],
                 ",".join(str(d) for d in e[main]["delays"]) or "-"]
                for e in report["per_file"]
            ],
        )  # fmt: skip
        return (
            f"NAB: {report['files']} files, {report['rows']} rows, {report['windows']} windows; "
            f"threshold {report['threshold_mode']}\n{head}\n\nper file ({main}):\n{files}"
        )
    if mode == "csv":
        o = report["overall"]
        head = _table(
            ["", "precision", "recall", "F1", "false alarm", "missed alarm", "windows", "delay"],
            [
                ["overall", o["precision"], o["recall"], o["f1"], o["false_alarm_rate"],
                 o["missed_alarm_rate"], f"{report['windows_detected']}/{report['windows']}",
                 report["mean_delay_rows"]],
            ]
            + [
                [e["name"], e["precision"], e["recall"], e["f1"], e["false_alarm_rate"],
                 e["missed_alarm_rate"], f"{e['windows_detected']}/{e['windows']}",
                 e["mean_delay_rows"]]
                for e in report["per_file"]
            ],
        )  # fmt: skip
        return (
            f"CSV: {report['files']} files, {report['evaluated']} rows evaluated after "
            f"{report['train_rows']} training rows each; columns {report['columns_as']}; "
            f"threshold {report['threshold_mode']}\n{head}"
        )
    rows = report["kinds"]
    head = _table(
        ["kind", "events", "episodes", "ROC AUC", "precision", "recall", "F1", "caught",
         "ep. precision", "delay"],
        [
            [r["kind"], r["events"], r["episodes"], r["roc_auc"], r["precision"], r["recall"],
             r["f1"], f"{r['episodes_caught']}/{r['episodes']}", r["episode_precision"],
             r["mean_delay_events"]]
            for r in rows
        ],
    )  # fmt: skip
    return (
        f"synthetic: {report['events']} events of {report['streams']} streams; features "
        f"{report['features_as']}; false alarm rate {report['false_alarm_rate']:.5f}\n{head}"
    )


NINES_MAX = 16.0  # 1 - 1e-16 is the last float64 below 1


def _nines(score: np.ndarray) -> np.ndarray:
    """-log10(1 - score), capped where float64 runs out.

    >>> _nines(np.array([0.0, 0.9, 0.9999, 1.0])).round(6).tolist()
    [0.0, 1.0, 4.0, 16.0]
    """
    nines = -np.log10(np.maximum(1.0 - score, 10.0**-NINES_MAX))
    return np.clip(nines, 0.0, NINES_MAX) + 0.0  # + 0.0 turns -0.0 into 0.0


def _plot(
    path: Path,
    title: str,
    values: np.ndarray,
    columns: list[str],
    score: np.ndarray,
    threshold: float | None,
    windows: Sequence[tuple[int, int]],
    alerts: np.ndarray,
    start: int,
) -> None:
    """Series (columns standardised when there are several), score, threshold, windows, alerts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.arange(len(score))
    fig = Figure(figsize=(10, 4), dpi=80)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    shown = values
    if values.shape[1] > 1:
        sd = np.nanstd(values, axis=0)
        shown = (values - np.nanmean(values, axis=0)) / np.where(sd > 0, sd, 1.0)
    for j in range(shown.shape[1]):
        top.plot(x, shown[:, j], lw=0.6, label=columns[j] if shown.shape[1] > 1 else None)
    for axis in (top, bottom):
        for s, e in windows:
            axis.axvspan(s, e, color="tab:orange", alpha=0.25, lw=0)
        if start:
            axis.axvspan(0, start, color="0.85", alpha=0.5, lw=0)
    hits = np.flatnonzero(alerts)
    if len(hits):
        top.plot(hits, np.nanmax(shown[hits], axis=1), "rv", ms=4, ls="none", label="alert")
    if shown.shape[1] > 1 or len(hits):
        top.legend(loc="upper left", fontsize=6, ncol=min(shown.shape[1] + 1, 6))
    top.set_title(title, fontsize=9)
    # Scores that matter are all within 1e-3 of 1: drawn as their nines, -log10(1 - score).
    bottom.plot(x, _nines(score), lw=0.6, color="tab:purple")
    if threshold is not None:
        bottom.axhline(float(_nines(np.array([threshold]))[0]), color="red", lw=0.6, ls="--")
    bottom.set_ylim(0.0, NINES_MAX)
    bottom.set_ylabel("score: -log10(1 - s)", fontsize=8)
    bottom.set_xlabel("row", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _write_index(
    path: Path, title: str, summary: str, items: Sequence[tuple[str, Path, str]]
) -> None:
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<h1>{html.escape(title)}</h1><pre>{html.escape(summary)}</pre><ul>",
    ]
    parts += [
        f"<li><a href='#{i}'>{html.escape(name)}</a> {html.escape(note)}</li>"
        for i, (name, _, note) in enumerate(items)
    ]
    parts.append("</ul>")
    parts += [
        f"<h3 id='{i}'>{html.escape(name)}</h3><p>{html.escape(note)}</p>"
        f"<img src='{html.escape(picture.as_posix())}' loading='lazy'>"
        for i, (name, picture, note) in enumerate(items)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
