"""Generated datasets: deterministic, ordered like a bus, decodable, and truly anomalous."""

from __future__ import annotations

import csv
import math
from collections import defaultdict

import numpy as np
import orjson
import pytest

from detector.events import Schema, parse_timestamp
from detector.synthetic import (
    LEVEL_SHIFT_LABELLED,
    NORMAL_EVENTS,
    NORMAL_HISTORY,
    SENSOR_FEATURES,
    SENSOR_KINDS,
    TRANSACTION_KINDS,
    Dataset,
    general_corpus,
    generate,
    sensor_streams,
    transaction_streams,
)


@pytest.fixture(scope="module")
def sensors() -> Dataset:
    return sensor_streams(n_streams=12, n_steps=2000, seed=11)


@pytest.fixture(scope="module")
def transactions() -> Dataset:
    return transaction_streams(n_accounts=40, n_events=8000, seed=5)


@pytest.fixture(scope="module")
def general() -> Dataset:
    return general_corpus(n_streams=30, n_steps=300, seed=2)


def by_stream(ds: Dataset) -> dict[str, list[int]]:
    """Event indices of each stream, in delivery order."""
    rows: dict[str, list[int]] = defaultdict(list)
    for i, event in enumerate(ds.events):
        rows[event["stream"]].append(i)
    return rows


def test_same_seed_same_data_other_seed_other_data() -> None:
    for make in (
        lambda seed: sensor_streams(3, 400, seed=seed),
        lambda seed: transaction_streams(5, 500, seed=seed),
        lambda seed: general_corpus(4, 200, seed=seed),
    ):
        first, again, other = make(1), make(1), make(2)
        assert first.events == again.events
        assert first.labels == again.labels and first.episodes == again.episodes
        assert first.events != other.events


@pytest.mark.parametrize("name", ["sensors", "transactions", "general"])
def test_events_are_sorted_by_time_then_stream(name: str, request: pytest.FixtureRequest) -> None:
    ds = request.getfixturevalue(name)
    keys = [(parse_timestamp(e["ts"]), e["stream"]) for e in ds.events]
    assert keys == sorted(keys)
    assert all(e["ts"].endswith("Z") for e in ds.events)
    assert len(ds.labels) == len(ds.episodes) == len(ds.events)


@pytest.mark.parametrize("name", ["sensors", "transactions", "general"])
def test_every_event_decodes_with_the_declared_schema(
    name: str, request: pytest.FixtureRequest
) -> None:
    ds = request.getfixturevalue(name)
    schema = Schema(features=tuple(ds.features), attrs=tuple(ds.attrs))
    for event in ds.events[:3000]:
        decoded = schema.decode(orjson.dumps(event))
        assert decoded.stream == event["stream"]
        assert decoded.values == tuple(event["values"][f] for f in ds.features)
        assert all(np.isfinite(decoded.values))


def test_labels_are_declared_kinds_and_match_episodes(
    sensors: Dataset, transactions: Dataset
) -> None:
    for ds, kinds in ((sensors, SENSOR_KINDS), (transactions, TRANSACTION_KINDS)):
        assert ds.kinds == kinds
        assert set(ds.labels) <= {"", *kinds}
        assert set(ds.labels) > {""}  # some anomalies were injected
        for label, episode in zip(ds.labels, ds.episodes, strict=True):
            assert (label == "") == (episode == -1)
    assert sensors.features == list(SENSOR_FEATURES)
    assert transactions.features == ["amount"] and transactions.attrs == ["category", "channel"]


def test_episode_table_lists_each_episode_once(sensors: Dataset) -> None:
    table = sensors.episode_table()
    assert [row[0] for row in table] == sorted(set(sensors.episodes) - {-1})
    for _, kind, stream, start, end in table:
        assert kind in SENSOR_KINDS and stream.startswith("sensor-")
        assert parse_timestamp(start) <= parse_timestamp(end)
    per_stream = defaultdict(int)
    for row in table:
        per_stream[row[2]] += 1
    assert 1 <= min(per_stream.values()) and max(per_stream.values()) <= 4


def test_level_shift_labels_only_its_first_points(sensors: Dataset) -> None:
    counts: dict[int, int] = defaultdict(int)
    for label, episode in zip(sensors.labels, sensors.episodes, strict=True):
        if label == "level_shift":
            counts[episode] += 1
    assert counts  # seed 11 has level shifts
    assert set(counts.values()) == {LEVEL_SHIFT_LABELLED}


def test_no_anomalies_when_asked_and_none_in_the_normal_history(
    sensors: Dataset, transactions: Dataset
) -> None:
    clean = sensor_streams(4, 500, seed=11, anomalies=False)
    assert set(clean.labels) == {""} and set(clean.episodes) == {-1}
    clean_tx = transaction_streams(5, 1000, seed=5, anomalies=False)
    assert set(clean_tx.labels) == {""}
    for ds in (sensors, transactions):
        for rows in by_stream(ds).values():
            history = int(np.ceil(NORMAL_HISTORY * len(rows)))
            assert all(ds.labels[i] == "" for i in rows[:history])
    for rows in by_stream(transactions).values():  # an account is known before it is judged
        assert all(transactions.labels[i] == "" for i in rows[:NORMAL_EVENTS])


def test_general_corpus_is_normal_and_diverse(general: Dataset) -> None:
    assert general.features == ["value"] and general.attrs == []
    assert set(general.labels) == {""}
    gaps, levels = set(), []
    for rows in by_stream(general).values():
        times = [parse_timestamp(general.events[i]["ts"]) for i in rows[:2]]
        gaps.add(times[1] - times[0])
        levels.append(np.std([general.events[i]["values"]["value"] for i in rows]))
    assert len(gaps) >= 5  # sampling intervals differ
    assert max(levels) / max(min(levels), 1e-9) > 100  # scales differ by orders of magnitude


def test_spikes_stand_far_from_their_neighbours(sensors: Dataset) -> None:
    rows = by_stream(sensors)
    spikes = [row for row in sensors.episode_table() if row[1] == "spike"]
    assert spikes
    for episode, _, stream, _, _ in spikes:
        index = rows[stream]
        where = [k for k, i in enumerate(index) if sensors.episodes[i] == episode]
        values = np.array(
            [[sensors.events[i]["values"][f] for f in SENSOR_FEATURES] for i in index]
        )
        lo, hi = where[0], where[-1] + 1
        around = np.concatenate([values[lo - 15 : lo], values[hi : hi + 15]])
        centre = np.median(around, axis=0)
        spread = 1.4826 * np.median(np.abs(np.diff(around, axis=0)), axis=0) / np.sqrt(2)
        deviation = np.abs(values[lo:hi] - centre) / spread
        assert deviation.max() > 4, (episode, deviation.max())


def test_stuck_sensor_repeats_its_last_value(sensors: Dataset) -> None:
    rows = by_stream(sensors)
    stuck = [row for row in sensors.episode_table() if row[1] == "stuck"]
    assert stuck
    for episode, _, stream, _, _ in stuck:
        index = rows[stream]
        where = [k for k, i in enumerate(index) if sensors.episodes[i] == episode]
        frozen = sensors.episode_features[episode]
        for name in frozen:
            seen = {sensors.events[index[k]]["values"][name] for k in [where[0] - 1, *where]}
            assert len(seen) == 1


def test_unusual_category_was_never_used_by_the_account(transactions: Dataset) -> None:
    used: dict[str, set[str]] = defaultdict(set)
    found = 0
    for event, label in zip(transactions.events, transactions.labels, strict=True):
        category = event["attrs"]["category"]
        if label == "unusual_category":
            assert category not in used[event["stream"]]
            found += 1
        else:
            used[event["stream"]].add(category)
    assert found
    for event, label in zip(transactions.events, transactions.labels, strict=True):
        if label == "unusual_category":  # and not later either
            assert event["attrs"]["category"] not in used[event["stream"]]


def test_unusual_amount_dwarfs_the_accounts_usual_spend(transactions: Dataset) -> None:
    amounts: dict[tuple[str, str], list[float]] = defaultdict(list)
    for event, label in zip(transactions.events, transactions.labels, strict=True):
        if not label:
            amounts[event["stream"], event["attrs"]["category"]].append(event["values"]["amount"])
    checked = 0
    for event, label in zip(transactions.events, transactions.labels, strict=True):
        usual = amounts.get((event["stream"], event["attrs"]["category"]), [])
        if label == "unusual_amount" and len(usual) >= 5:
            assert event["values"]["amount"] > 3 * np.median(usual)
            checked += 1
    assert checked
    assert all(e["values"]["amount"] > 0 for e in transactions.events)


def test_unusual_amount_is_beyond_the_accounts_normal_spread(transactions: Dataset) -> None:
    """On the log scale, against the account's own purchases in the category: a label on an
    amount that normal purchases reach would mark an ordinary purchase (8x is only 3 spreads
    for the most variable accounts)."""
    logs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for event, label in zip(transactions.events, transactions.labels, strict=True):
        if not label:
            logs[event["stream"], event["attrs"]["category"]].append(
                math.log(event["values"]["amount"])
            )
    zs = []
    for event, label in zip(transactions.events, transactions.labels, strict=True):
        usual = logs.get((event["stream"], event["attrs"]["category"]), [])
        if label == "unusual_amount" and len(usual) >= 20:
            zs.append((math.log(event["values"]["amount"]) - np.mean(usual)) / np.std(usual))
    assert len(zs) >= 10
    assert min(zs) > 3.5  # UNUSUAL_SPREADS (5), less the estimates' noise over 20+ purchases


def test_jsonl_and_csv_round_trip(transactions: Dataset, tmp_path) -> None:
    ds = transactions
    ds.write_events(tmp_path / "events.jsonl")
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    assert len(lines) == len(ds) and orjson.loads(lines[7]) == ds.events[7]

    ds.write_events(tmp_path / "events.csv")
    with (tmp_path / "events.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(ds)
    assert list(rows[0]) == ["stream", "ts", "amount", "category", "channel"]
    assert float(rows[7]["amount"]) == ds.events[7]["values"]["amount"]
    assert rows[7]["category"] == ds.events[7]["attrs"]["category"]
    schema = Schema(features=("amount",), attrs=("category", "channel"))
    assert schema.from_row(rows[7]).values == (ds.events[7]["values"]["amount"],)

    ds.write_labels(tmp_path / "labels.csv")
    with (tmp_path / "labels.csv").open(newline="") as handle:
        labels = list(csv.DictReader(handle))
    assert [row["kind"] for row in labels] == ds.labels
    assert [int(row["episode"]) for row in labels] == ds.episodes
    assert labels[7]["ts"] == ds.events[7]["ts"]

    with pytest.raises(ValueError, match="unknown event file type"):
        ds.write_events(tmp_path / "events.parquet")


def test_sensor_csv_keeps_every_feature(tmp_path) -> None:
    ds = sensor_streams(2, 50, seed=0, anomalies=False)
    ds.write_events(tmp_path / "sensors.csv")
    with (tmp_path / "sensors.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["stream", "ts", *SENSOR_FEATURES]
    assert float(rows[3]["power"]) == ds.events[3]["values"]["power"]


def test_generate_dispatches_and_names_valid_kinds() -> None:
    assert len(generate("sensors", 2, 100, seed=0, anomalies=False)) == 200
    assert len(generate("transactions", 3, 50, seed=0, anomalies=True)) == 150
    assert generate("general", 2, 60, seed=0, anomalies=False).features == ["value"]
    with pytest.raises(ValueError, match="'sensors', 'transactions', 'general'"):
        generate("weather", 1, 10, seed=0, anomalies=False)
