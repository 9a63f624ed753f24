"""Generated event streams with labelled anomalies: sensors, card transactions, a general corpus.

Every generator is deterministic for a seed (`np.random.default_rng(seed)`) and returns a
`Dataset`: events in the JSON event format of DESIGN.md, sorted by time across streams as a
bus would deliver them (ties by stream id), with one label and one episode id per event.

>>> ds = sensor_streams(n_streams=3, n_steps=500, seed=7)
>>> len(ds.events), ds.features
(1500, ['temperature', 'pressure', 'vibration', 'power'])
>>> ds.events[0]["stream"], ds.events[0]["ts"] <= ds.events[1]["ts"]
('sensor-0', True)
>>> set(ds.labels) - {""} <= set(SENSOR_KINDS)
True
>>> all(stream.startswith("sensor-") for _, _, stream, _, _ in ds.episode_table())
True
>>> tx = transaction_streams(n_accounts=5, n_events=300, seed=1)
>>> tx.features, tx.attrs, sorted(tx.events[0]["attrs"])
(['amount'], ['category', 'channel'], ['category', 'channel'])
>>> general_corpus(n_streams=2, n_steps=50).labels == [""] * 100
True

Anomalies start after the first 30% of each stream, so a model sees normal history first.
A level shift is labelled on its first 5 points only: after that it is the new normal.
"""

from __future__ import annotations

import csv
import gc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson

from detector.events import parse_timestamp

if TYPE_CHECKING:
    from detector.train import History

SENSOR_FEATURES = ("temperature", "pressure", "vibration", "power")
SENSOR_KINDS = ("spike", "level_shift", "variance_change", "stuck", "frequency_change")
TRANSACTION_KINDS = ("unusual_amount", "unusual_category")
CATEGORIES = (
    "grocery", "restaurants", "fuel", "pharmacy", "coffee", "transport", "clothing",
    "electronics", "travel", "hotels", "airlines", "entertainment", "utilities", "telecom",
    "healthcare", "education", "home_improvement", "sporting_goods", "jewelry", "gambling",
)  # fmt: skip
CHANNELS = ("pos", "online", "atm")
KINDS = {"sensors": SENSOR_KINDS, "transactions": TRANSACTION_KINDS, "general": ()}
DEFAULT_START = "2026-01-01T00:00:00Z"
NORMAL_HISTORY = 0.3  # no anomaly in this leading fraction of a stream
NORMAL_EVENTS = 30  # nor in an account's first events: no detector knows an account before that
LEVEL_SHIFT_LABELLED = 5  # a level shift is an anomaly on its first points only
# An unusual amount lies at least this many of the account's own spreads (log scale) above its
# typical amount: 8x is only 3 spreads for the most variable accounts, which one normal purchase
# in ~700 reaches, so a label there would mark an ordinary purchase.
UNUSUAL_SPREADS = 5.0

# How popular each category is, and how much a purchase there costs against an account's usual.
_CATEGORY_WEIGHT = np.array(
    [9, 7, 5, 3, 6, 4, 3, 1.5, 1, 1, 1, 2, 3, 2, 1.5, 0.7, 1.5, 1, 0.3, 0.3]
)  # fmt: skip
_CATEGORY_PRICE = np.array(
    [1.0, 0.8, 1.2, 0.6, 0.15, 0.4, 1.5, 3.0, 4.0, 3.5, 5.0, 0.9, 2.0, 1.2, 1.5, 2.5, 1.8, 1.4,
     4.0, 1.0]
)  # fmt: skip


@dataclass
class Dataset:
    """Events in delivery order with their ground truth.

    `labels[i]` is the anomaly kind of `events[i]` or "" when it is normal; `episodes[i]` is the
    id of the injected episode it belongs to or -1. `episode_features` says which features each
    episode touched (empty for the general corpus).
    """

    events: list[dict]
    labels: list[str]
    episodes: list[int]
    features: list[str]
    attrs: list[str]
    kinds: tuple[str, ...] = ()
    episode_features: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.events)

    def write_events(self, path: str | PathLike[str]) -> None:
        """JSON lines for `.jsonl`/`.json`; CSV (stream, ts, features..., attrs...) for `.csv`."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            with path.open("wb") as out:
                for event in self.events:
                    out.write(orjson.dumps(event))
                    out.write(b"\n")
        elif suffix == ".csv":
            with path.open("w", newline="", encoding="utf-8") as out:
                writer = csv.writer(out)
                writer.writerow(["stream", "ts", *self.features, *self.attrs])
                for event in self.events:
                    values, attrs = event["values"], event.get("attrs", {})
                    writer.writerow(
                        [event["stream"], event["ts"]]
                        + [repr(values[name]) for name in self.features]
                        + [attrs.get(name, "") for name in self.attrs]
                    )
        else:
            raise ValueError(f"unknown event file type {path.suffix!r}: use .jsonl, .json or .csv")

    def write_labelled_files(self, directory: str | PathLike[str]) -> list[Path]:
        """One CSV per stream under `directory` (`<stream>.csv`: timestamp, the features, label
        0/1), the layout `detector evaluate csv` reads; categorical attrs are left out."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rows: dict[str, list[list[str]]] = {}
        for event, kind in zip(self.events, self.labels, strict=True):
            values = event["values"]
            row = [str(event["ts"]), *(repr(values[name]) for name in self.features)]
            rows.setdefault(event["stream"], []).append([*row, "1" if kind else "0"])
        paths = []
        for stream, lines in rows.items():
            path = directory / f"{stream}.csv"
            with path.open("w", newline="", encoding="utf-8") as out:
                writer = csv.writer(out)
                writer.writerow(["timestamp", *self.features, "label"])
                writer.writerows(lines)
            paths.append(path)
        return paths

    def write_labels(self, path: str | PathLike[str]) -> None:
        """CSV with columns stream, ts, kind, episode: one row per event, in event order."""
        with Path(path).open("w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out)
            writer.writerow(["stream", "ts", "kind", "episode"])
            for event, kind, episode in zip(self.events, self.labels, self.episodes, strict=True):
                writer.writerow([event["stream"], event["ts"], kind, episode])

    def episode_table(self) -> list[tuple[int, str, str, str, str]]:
        """(episode id, kind, stream, first labelled ts, last labelled ts), by episode id."""
        table: dict[int, list] = {}
        ids = np.asarray(self.episodes, dtype=np.int64)
        for i in np.flatnonzero(ids >= 0).tolist():
            event = self.events[i]
            row = table.get(ids[i])
            if row is None:
                table[int(ids[i])] = [int(ids[i]), self.labels[i], event["stream"], event["ts"],
                                      event["ts"]]  # fmt: skip
            else:
                row[4] = event["ts"]
        return [tuple(table[key]) for key in sorted(table)]  # type: ignore[misc]


def generate(
    kind: str, n_streams: int, n_steps: int, seed: int = 0, anomalies: bool = True
) -> Dataset:
    """One of the generators by name: "sensors", "transactions" or "general".

    For transactions, `n_steps` is the mean number of events per account. The general corpus is
    normal data only: `anomalies` is ignored there.

    >>> generate("sensors", 2, 100, seed=0, anomalies=False).labels == [""] * 200
    True
    >>> generate("weather", 2, 100)
    Traceback (most recent call last):
    ...
    ValueError: unknown synthetic kind 'weather': use one of 'sensors', 'transactions', 'general'
    """
    if kind == "sensors":
        return sensor_streams(n_streams, n_steps, seed=seed, anomalies=anomalies)
    if kind == "transactions":
        return transaction_streams(n_streams, n_streams * n_steps, seed=seed, anomalies=anomalies)
    if kind == "general":
        return general_corpus(n_streams, n_steps, seed=seed)
    valid = ", ".join(repr(name) for name in KINDS)
    raise ValueError(f"unknown synthetic kind {kind!r}: use one of {valid}")


# --------------------------------------------------------------------------- sensors


def sensor_streams(
    n_streams: int,
    n_steps: int,
    seed: int = 0,
    anomalies: bool = True,
    interval_seconds: float = 300.0,
    start: str = DEFAULT_START,
) -> Dataset:
    """Industrial sensors: temperature, pressure, vibration and power, one event per interval.

    Each stream has its own levels (of very different scales per feature), daily and weekly
    seasonality, AR(1) noise shared in part across features, slow drift, and power that follows
    the load. With `anomalies`, each stream gets about 1-3 episodes per 2000 steps of the
    `SENSOR_KINDS`, none in its first 30%, none overlapping.
    """
    rng = np.random.default_rng(seed)
    S, T, F = n_streams, n_steps, len(SENSOR_FEATURES)
    t = np.arange(T, dtype=np.float64)
    day = 86400.0 / interval_seconds  # steps per day
    week = 7.0 * day

    # Per-stream, per-feature parameters.              # (S, F)
    base = np.stack(
        [rng.uniform(20, 90, S), rng.uniform(1, 10, S),
         np.exp(rng.uniform(np.log(0.01), np.log(1.0), S)),
         np.exp(rng.uniform(np.log(100), np.log(5000), S))],
        axis=1,
    )  # fmt: skip
    noise_frac = np.stack(
        [rng.uniform(0.2, 1.0, S) / base[:, 0], rng.uniform(0.005, 0.02, S),
         rng.uniform(0.02, 0.05, S), rng.uniform(0.01, 0.03, S)],
        axis=1,
    )  # fmt: skip
    sigma = base * noise_frac  # noise sd per feature
    amp = sigma * rng.uniform(3.0, 8.0, (S, F))  # seasonal amplitude, visible against noise
    lag = rng.uniform(-0.4, 0.4, (S, F))
    lag[:, 3] = 0.0  # power is the load itself
    phase_day = rng.uniform(0, 2 * np.pi, (S, 1))
    phase_week = rng.uniform(0, 2 * np.pi, (S, 1))
    weekly = rng.uniform(0.2, 0.6, (S, 1))
    shared = np.array([0.4, 0.3, 0.5, 0.8]) * rng.uniform(0.6, 1.0, (S, F))  # corr with load noise
    drift_slope = rng.normal(0, 1.0, (S, F)) * sigma / max(T, 1)  # ~1 sd over the stream
    drift_wave = rng.normal(0, 1.0, (S, F)) * sigma
    drift_period = rng.uniform(0.7, 2.0, (S, 1)) * max(T, 2)
    drift_phase = rng.uniform(0, 2 * np.pi, (S, 1))

    # Seasonality per feature.                       # (S, T, F)
    daily_angle = 2 * np.pi * t[None, :, None] / day + phase_day[:, :, None] + lag[:, None, :]
    weekly_angle = 2 * np.pi * t[None, :, None] / week + phase_week[:, :, None] + lag[:, None, :]
    daily_part = np.sin(daily_angle)
    seasonal = daily_part + weekly[:, :, None] * np.sin(weekly_angle)
    slow = np.sin(2 * np.pi * t[None, :] / drift_period + drift_phase)  # (S, T)
    clean = (
        base[:, None, :]
        + amp[:, None, :] * seasonal
        + drift_slope[:, None, :] * t[None, :, None]
        + drift_wave[:, None, :] * slow[:, :, None]
    )
    unit = _ar1(rng, (S, F + 1), T, rng.uniform(0.3, 0.7, (S, F + 1)))  # (S, T, F+1), sd 1
    noise = (
        shared[:, None, :] * unit[:, :, :1] + np.sqrt(1 - shared**2)[:, None, :] * unit[:, :, 1:]
    )

    codes = np.zeros((S, T), dtype=np.int8)  # 0 normal, else 1 + index in SENSOR_KINDS
    episode_ids = np.full((S, T), -1, dtype=np.int64)
    episode_features: dict[int, tuple[str, ...]] = {}
    values = np.empty((S, T, F))
    next_id = 0
    for s in range(S):
        x_clean, x_noise = clean[s], noise[s] * sigma[s]
        stuck: list[tuple[int, int, np.ndarray]] = []
        plan = _sensor_plan(rng, T) if anomalies else []
        for kind, t0, t1 in plan:
            feats = _pick_features(rng, kind, F)
            if kind == "spike":
                size = rng.uniform(5, 10, (t1 - t0, feats.size)) * rng.choice([-1, 1], feats.size)
                x_noise[t0:t1, feats] = size * sigma[s, feats]
                labelled = (t0, t1)
            elif kind == "level_shift":
                step = rng.uniform(4, 8, feats.size) * rng.choice([-1, 1], feats.size)
                x_clean[t0:, feats] += step * sigma[s, feats]
                labelled = (t0, t0 + LEVEL_SHIFT_LABELLED)
            elif kind == "variance_change":
                x_noise[t0:t1, feats] *= rng.uniform(4, 6, feats.size)
                labelled = (t0, t1)
            elif kind == "stuck":
                stuck.append((t0, t1, feats))
                labelled = (t0, t1)
            else:  # frequency_change: the daily cycle runs 3-5 times faster, phase-continuous
                factor = min(rng.uniform(3, 5), day / 4)
                angle0 = daily_angle[s, t0, feats]
                fast = np.sin(angle0 + 2 * np.pi * factor * (t[t0:t1, None] - t0) / day)
                x_clean[t0:t1, feats] += amp[s, feats] * (fast - daily_part[s][t0:t1][:, feats])
                labelled = (t0, t1)
            codes[s, labelled[0] : labelled[1]] = 1 + SENSOR_KINDS.index(kind)
            episode_ids[s, labelled[0] : labelled[1]] = next_id
            episode_features[next_id] = tuple(SENSOR_FEATURES[f] for f in feats.tolist())
            next_id += 1
        x = x_clean + x_noise
        x = _round_to(x, sigma[s])
        for t0, t1, feats in stuck:  # after rounding, so the repeated value is exactly the last
            x[t0:t1, feats] = x[t0 - 1, feats]
        values[s] = x

    epoch = _epoch(start)
    offsets = rng.integers(0, max(int(interval_seconds), 1), S)  # streams are not in lock-step
    ts = epoch + offsets[:, None] + np.round(t * interval_seconds).astype(np.int64)[None, :]
    width = len(str(max(S - 1, 0)))
    names = [f"sensor-{i:0{width}d}" for i in range(S)]
    return _assemble(
        names, ts, values.reshape(S * T, F), None, codes, episode_ids, SENSOR_KINDS,
        list(SENSOR_FEATURES), [], episode_features,
    )  # fmt: skip


def _sensor_plan(rng: np.random.Generator, n_steps: int) -> list[tuple[str, int, int]]:
    """Non-overlapping (kind, start, end) episodes after the normal history, in time order."""
    first = math.ceil(NORMAL_HISTORY * n_steps) + 1  # +1: a stuck sensor repeats a normal value
    room = n_steps - first
    gap = 20
    wanted = max(1, round(rng.uniform(1.0, 3.49) * n_steps / 2000))
    lengths = {
        "spike": lambda: int(rng.integers(1, 3)),
        "level_shift": lambda: LEVEL_SHIFT_LABELLED,
        "variance_change": lambda: int(rng.integers(30, 81)),
        "stuck": lambda: int(rng.integers(30, 81)),
        "frequency_change": lambda: int(rng.integers(60, 121)),
    }
    chosen: list[tuple[str, int]] = []
    used = 0
    for kind in rng.choice(SENSOR_KINDS, size=wanted).tolist():
        length = lengths[kind]()
        if used + length + gap <= room:
            chosen.append((kind, length))
            used += length + gap
    if not chosen:
        return []
    slack = room - used
    cuts = np.sort(rng.integers(0, slack + 1, len(chosen)))
    plan, cursor = [], first
    for (kind, length), cut in zip(chosen, cuts.tolist(), strict=True):
        start = cursor + cut
        plan.append((kind, start, start + length))
        cursor += length + gap
    return plan


def _pick_features(rng: np.random.Generator, kind: str, n_features: int) -> np.ndarray:
    if kind in ("stuck", "frequency_change"):  # one sensor, or the whole unit
        count = 1 if rng.random() < 0.6 else n_features
    else:
        count = int(rng.choice([1, 2, n_features], p=[0.6, 0.3, 0.1]))
    return np.sort(rng.choice(n_features, size=count, replace=False))


def _ar1(
    rng: np.random.Generator, shape: tuple[int, ...], n_steps: int, phi: np.ndarray
) -> np.ndarray:
    """Unit-variance AR(1) noise, time on axis 1: (shape[0], n_steps, *shape[1:])."""
    shocks = rng.standard_normal((n_steps, *shape)) * np.sqrt(1 - phi**2)
    out = np.empty_like(shocks)
    out[0] = rng.standard_normal(shape)
    for i in range(1, n_steps):
        out[i] = phi * out[i - 1] + shocks[i]
    return np.moveaxis(out, 0, 1)


def _round_to(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Round each column to two decimal digits below its `scale` (a noise sd or a level)."""
    digits = np.clip(np.ceil(-np.log10(np.maximum(scale, 1e-12))) + 2, 0, 10)
    factor = 10.0**digits
    return np.round(x * factor) / factor


# --------------------------------------------------------------------------- transactions


def transaction_streams(
    n_accounts: int,
    n_events: int,
    seed: int = 0,
    anomalies: bool = True,
    start: str = DEFAULT_START,
) -> Dataset:
    """Card transactions: an `amount`, a merchant `category` and a `channel` per event.

    Accounts differ in activity, typical amount and spread, daily rhythm, their 2-4 habitual
    categories (out of `CATEGORIES`) and channels. Gaps between an account's events are
    exponential (a Poisson process) modulated by the time of day. With `anomalies`, about 1% of
    the events after each account's first 30% (and first 30 events) become "unusual_amount"
    (8-20x its typical amount in the category, and at least `UNUSUAL_SPREADS` of its spreads
    above it) or "unusual_category" (a category the account never uses, 3-6x its typical
    amount).
    """
    rng = np.random.default_rng(seed)
    A = n_accounts
    activity = rng.lognormal(0.0, 0.8, A)
    counts = rng.multinomial(n_events, activity / activity.sum()) if A else np.zeros(0, int)
    span_days = max(1.0, n_events / max(A, 1) / 3.0)  # an average account: 3 purchases a day

    # Cumulative intensity of a shared daily rhythm on a 10-minute grid: quiet nights,
    # a lunch peak and an evening peak.
    grid = np.arange(0.0, span_days * 86400 + 600, 600)
    hour = (grid / 3600) % 24
    rate = 0.1 + np.exp(-(((hour - 12.5) / 2.0) ** 2)) + 1.3 * np.exp(-(((hour - 19) / 2.5) ** 2))
    cumulative = np.concatenate([[0.0], np.cumsum(rate[:-1])])

    typical = rng.lognormal(np.log(35), 0.9, A)
    spread = rng.uniform(0.25, 0.7, A)
    shift = rng.uniform(-2.0, 2.0, A) * 3600  # an account's own rhythm
    popularity = _CATEGORY_WEIGHT / _CATEGORY_WEIGHT.sum()
    n_cat = len(CATEGORIES)

    per_ts, amounts, cats, chans, codes, ids = [], [], [], [], [], []
    episode_features: dict[int, tuple[str, ...]] = {}
    next_id = 0
    epoch = _epoch(start)
    for a in range(A):
        n = int(counts[a])
        habitual = rng.choice(n_cat, size=int(rng.integers(2, 5)), replace=False, p=popularity)
        habit_p = rng.dirichlet(np.full(habitual.size, 1.5))
        chan_p = rng.dirichlet([3.0, 2.0, 0.7])
        u = np.sort(rng.uniform(0, cumulative[-1], n))
        seconds = np.interp(u, cumulative, grid) + shift[a] + 2 * 3600
        ts = epoch + np.floor(seconds).astype(np.int64)
        cat = habitual[rng.choice(habitual.size, size=n, p=habit_p)]
        amount = typical[a] * _CATEGORY_PRICE[cat] * rng.lognormal(0.0, spread[a], n)
        chan = rng.choice(len(CHANNELS), size=n, p=chan_p)
        code = np.zeros(n, dtype=np.int8)
        episode = np.full(n, -1, dtype=np.int64)
        first = max(math.ceil(NORMAL_HISTORY * n), NORMAL_EVENTS)
        if anomalies and n >= 10:
            k = max(min(int(rng.poisson(0.01 * n)), (n - first) // 2), 0)
            spots = np.sort(rng.choice(np.arange(first, n), size=k, replace=False))
            for i in spots.tolist():
                if rng.random() < 0.5:
                    factor = max(rng.uniform(8, 20), math.exp(UNUSUAL_SPREADS * spread[a]))
                    amount[i] = typical[a] * _CATEGORY_PRICE[cat[i]] * factor
                    code[i] = 1
                    episode_features[next_id] = ("amount",)
                else:
                    unused = np.setdiff1d(np.arange(n_cat), habitual)
                    cat[i] = rng.choice(unused)
                    amount[i] = typical[a] * rng.uniform(3, 6)
                    code[i] = 2
                    episode_features[next_id] = ("amount", "category")
                episode[i] = next_id
                next_id += 1
        per_ts.append(ts)
        amounts.append(np.maximum(np.round(amount, 2), 0.01))
        cats.append(cat)
        chans.append(chan)
        codes.append(code)
        ids.append(episode)

    width = len(str(max(A - 1, 0)))
    names = [f"acct-{i:0{width}d}" for i in range(A)]
    cat_all = np.concatenate(cats) if A else np.zeros(0, int)
    chan_all = np.concatenate(chans) if A else np.zeros(0, int)
    attr_rows = list(
        zip(np.asarray(CATEGORIES)[cat_all].tolist(), np.asarray(CHANNELS)[chan_all].tolist(),
            strict=True)
    )  # fmt: skip
    return _assemble(
        names, per_ts, _concat(amounts)[:, None], attr_rows, codes, ids, TRANSACTION_KINDS,
        ["amount"], ["category", "channel"], episode_features,
    )  # fmt: skip


# --------------------------------------------------------------------------- general corpus

_INTERVALS = np.array([1, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600])


def general_corpus(n_streams: int, n_steps: int, seed: int = 0) -> Dataset:
    """Normal data only, one feature "value": diverse series for pretraining a forecaster.

    Each stream draws its own recipe, as in NAB's mix of CPU usage, request counts, traffic,
    tweet volumes and ad costs: 0-3 seasonalities of random period and shape (sine, sawtooth,
    square, peaked), trends, random-walk stretches, regime changes of level and noise, noise from
    tiny to dominant (Gaussian, heavy-tailed, Poisson counts), normal bursts, quantisation,
    percentages clipped to [0, 100], and a sampling interval from 1 s to 1 h.
    """
    names, stamps, values = _general_arrays(n_streams, n_steps, seed)
    S, T = values.shape
    return _assemble(
        names, stamps, values.reshape(S * T, 1), None, np.zeros((S, T), np.int8),
        np.full((S, T), -1, np.int64), (), ["value"], [], {},
    )  # fmt: skip


def synthetic_history(n_streams: int, n_steps: int, seed: int = 0) -> History:
    """The general corpus as training history: one time-ordered `(T, 1)` "value" per stream.

    The same series as `general_corpus(n_streams, n_steps, seed)`, without building an event
    dict per row, so `detector train --synthetic` can pretrain on millions of steps.

    >>> history = synthetic_history(n_streams=3, n_steps=40, seed=1)
    >>> history.features, len(history.streams), history.streams[0].values.shape
    (['value'], 3, (40, 1))
    >>> ds = general_corpus(n_streams=3, n_steps=40, seed=1)
    >>> first = [e["values"]["value"] for e in ds.events if e["stream"] == "series-0"]
    >>> bool(np.allclose(first, history.streams[0].values[:, 0]))
    True
    """
    from detector.train import History, StreamHistory

    names, _, values = _general_arrays(n_streams, n_steps, seed)
    streams = [
        StreamHistory(name, row[:, None].astype(np.float32), np.zeros((len(row), 0), np.int64))
        for name, row in zip(names, values, strict=True)
    ]
    return History(streams, ["value"], [], events=values.size, invalid=0)


def _general_arrays(
    n_streams: int, n_steps: int, seed: int
) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """Stream names, epoch-second timestamps per stream and values (S, T) of the general corpus."""
    rng = np.random.default_rng(seed)
    S, T = n_streams, n_steps
    epoch = _epoch(DEFAULT_START)
    values, stamps = np.empty((S, T)), []
    correlated = _ar1(rng, (S,), T, rng.uniform(0.0, 0.95, S))  # (S, T), one AR(1) per stream
    for s in range(S):
        interval = int(rng.choice(_INTERVALS))
        values[s] = _general_series(rng, T, interval, correlated[s])
        offset = int(rng.integers(0, 86400 * 30))
        stamps.append(epoch + offset + interval * np.arange(T, dtype=np.int64))
    width = len(str(max(S - 1, 0)))
    names = [f"series-{i:0{width}d}" for i in range(S)]
    return names, stamps, values


def _general_series(
    rng: np.random.Generator, T: int, interval: int, correlated: np.ndarray
) -> np.ndarray:
    t = np.arange(T, dtype=np.float64)
    scale = 10 ** rng.uniform(-1, 4)
    x = np.full(T, scale * rng.uniform(0.5, 3.0))

    natural = [p / interval for p in (3600, 86400, 7 * 86400) if 4 <= p / interval <= 4 * T]
    for _ in range(int(rng.choice(4, p=[0.25, 0.4, 0.25, 0.1]))):
        period = (
            rng.choice(natural) if natural and rng.random() < 0.6 else rng.uniform(4, max(T, 8))
        )
        phase = rng.uniform(0, 1)
        cycle = (t / period + phase) % 1.0
        shape = rng.choice(["sine", "sine", "sawtooth", "square", "peaked"])
        if shape == "sine":
            wave = np.sin(2 * np.pi * cycle)
        elif shape == "sawtooth":
            wave = 2 * cycle - 1
        elif shape == "square":
            wave = np.where(cycle < rng.uniform(0.2, 0.8), 1.0, -1.0)
        else:
            wave = np.sin(np.pi * cycle) ** rng.uniform(4, 20) * 2 - 0.5
        x += scale * rng.uniform(0.05, 1.0) * wave
    if rng.random() < 0.3:  # trend
        x += scale * rng.normal(0, 1.0) * t / max(T, 1)
    if rng.random() < 0.3:  # random-walk stretches
        steps = rng.standard_normal(T) * scale * 10 ** rng.uniform(-2.5, -1)
        steps *= rng.random(T // 100 + 1).repeat(100)[:T] < rng.uniform(0.3, 1.0)
        x += np.cumsum(steps)

    noise_sd = scale * 10 ** rng.uniform(-3, 0.3)
    flavour = rng.choice(["gauss", "student", "laplace"])
    if flavour == "gauss":
        noise = rng.standard_normal(T)
    elif flavour == "student":
        noise = rng.standard_t(rng.uniform(2.5, 6), T) / 1.5
    else:
        noise = rng.laplace(0, 1 / np.sqrt(2), T)
    if rng.random() < 0.5:  # part of the noise is autocorrelated
        mix = rng.uniform(0.3, 1.0)
        noise = np.sqrt(mix) * correlated + np.sqrt(1 - mix) * noise
    multiplier = np.ones(T)
    for cut in np.sort(rng.integers(0, T, int(rng.choice(4, p=[0.5, 0.25, 0.15, 0.1])))).tolist():
        x[cut:] += scale * rng.normal(0, 0.5)  # regime change: level and noise
        multiplier[cut:] = 10 ** rng.uniform(-0.7, 0.7)
    x += noise * noise_sd * multiplier
    if rng.random() < 0.15:  # bursts are normal here: traffic, tweets
        for at in rng.integers(0, T, int(rng.integers(1, max(T // 50, 2)))).tolist():
            length = int(rng.integers(3, 30))
            pulse = np.exp(-np.arange(length) / rng.uniform(1, 8)) * scale * rng.uniform(1, 5)
            end = min(T, at + length)
            x[at:end] += pulse[: end - at]

    flavour = rng.choice(
        ["real", "real", "counts", "percent", "quantised"], p=[0.3, 0.2, 0.25, 0.15, 0.1]
    )
    if flavour == "counts":
        return rng.poisson(np.clip(x, 0, None) / scale * 10 ** rng.uniform(0, 3)).astype(float)
    if flavour == "percent":
        return np.round(
            np.clip((x - x.min()) / (np.ptp(x) or 1.0) * rng.uniform(20, 100), 0, 100), 3
        )
    if flavour == "quantised":
        step = 10 ** np.floor(np.log10(noise_sd + scale * 0.01))
        return np.round(x / step) * step
    return _round_to(x, np.array(scale * 1e-3))


# --------------------------------------------------------------------------- assembling


def _epoch(start: str) -> int:
    return int(round(parse_timestamp(start)))


def _concat(parts: list[np.ndarray] | np.ndarray) -> np.ndarray:
    if isinstance(parts, np.ndarray):
        return parts.reshape(-1)
    return np.concatenate(parts) if parts else np.zeros(0)


def _assemble(
    names: list[str],
    ts: list[np.ndarray] | np.ndarray,
    values: np.ndarray,
    attr_rows: Sequence[tuple[str, ...]] | None,
    codes: list[np.ndarray] | np.ndarray,
    episode_ids: list[np.ndarray] | np.ndarray,
    kinds: tuple[str, ...],
    features: list[str],
    attrs: list[str],
    episode_features: dict[int, tuple[str, ...]],
) -> Dataset:
    """Stream-major rows (each stream in time order) -> events in delivery order.

    Stream names sort like their indices, so a stable sort on time breaks ties by stream id.
    """
    if isinstance(ts, np.ndarray):
        lengths = [ts.shape[1]] * ts.shape[0]
    else:
        lengths = [len(part) for part in ts]
    flat_ts = _concat(ts).astype(np.int64)
    stream = np.repeat(np.arange(len(names)), lengths)
    order = np.argsort(flat_ts, kind="stable")
    # Format each distinct second once: streams share most of their timestamps.
    distinct, where = np.unique(flat_ts[order], return_inverse=True)
    texts = np.datetime_as_string(distinct.astype("datetime64[s]"), timezone="UTC").tolist()
    collecting = gc.isenabled()
    gc.disable()  # millions of small dicts: the cyclic collector would rescan them again and again
    try:
        stamps = [texts[i] for i in where.tolist()]
        stream_names = [names[i] for i in stream[order].tolist()]
        rows = values[order].tolist()
        if len(features) == 1:
            name = features[0]
            value_dicts = [{name: row[0]} for row in rows]
        else:
            # per-row zip(strict=True) costs about half as much again as the dicts themselves
            value_dicts = [dict(zip(features, row, strict=False)) for row in rows]
        del rows
        if attr_rows is None:
            events = [
                {"stream": s, "ts": when, "values": v}
                for s, when, v in zip(stream_names, stamps, value_dicts, strict=True)
            ]
        else:
            sorted_attrs = [attr_rows[i] for i in order.tolist()]
            events = [
                {"stream": s, "ts": when, "values": v, "attrs": dict(zip(attrs, a, strict=False))}
                for s, when, v, a in zip(
                    stream_names, stamps, value_dicts, sorted_attrs, strict=True
                )
            ]
        names_of = ["", *kinds]
        labels = [names_of[c] for c in _concat(codes).astype(np.int64)[order].tolist()]
        episodes = _concat(episode_ids).astype(np.int64)[order].tolist()
    finally:
        if collecting:
            gc.enable()
    return Dataset(events, labels, episodes, features, attrs, kinds, episode_features)
