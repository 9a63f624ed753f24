"""File sinks: tables round-trip through CSV and JSON lines; the error file keeps each letter."""

from __future__ import annotations

import base64
import csv

import numpy as np
import orjson
import pytest

from detector.errors import DetectorError
from detector.events import DeadLetter, Position
from detector.sinks import CsvTableWriter, ErrorFile, JsonlTableWriter, open_table_writer

COLUMNS = ["stream", "ts", "score", "alert"]
ROWS = [
    ("pump-1", 1795514400.0, 0.1, False),
    ("pump-2", 1795514460.5, 1 / 3, True),
    ('pump,3 "quoted"', 5.0, 1e-300, np.bool_(True)),
]


def read_csv(path):
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.reader(file))


def test_csv_round_trip_rows(tmp_path):
    path = tmp_path / "out" / "scores.csv"  # parent folders are made
    with open_table_writer(path, COLUMNS) as table:
        assert isinstance(table, CsvTableWriter)
        table.write_many(ROWS[:2])
        table.write_many(ROWS[2:])
        assert table.rows_written == 3
    header, *rows = read_csv(path)
    assert header == COLUMNS
    assert [(r[0], float(r[1]), float(r[2]), r[3]) for r in rows] == [
        ("pump-1", 1795514400.0, 0.1, "0"),
        ("pump-2", 1795514460.5, 1 / 3, "1"),  # full precision: round-trips exactly
        ('pump,3 "quoted"', 5.0, 1e-300, "1"),
    ]


def test_csv_columns_from_arrays(tmp_path):
    path = tmp_path / "scores.csv"
    with open_table_writer(path, COLUMNS) as table:
        table.write_many(
            {
                "alert": np.array([True, False]),
                "stream": ["a", "b"],
                "ts": np.array([1.5, 2.5]),
                "score": np.array([0.1, 0.7], dtype=np.float32),
            }
        )
    assert path.read_text() == "stream,ts,score,alert\na,1.5,0.1,1\nb,2.5,0.7,0\n"


def test_header_alone_when_nothing_written(tmp_path):
    path = tmp_path / "scores.csv"
    open_table_writer(path, COLUMNS).close()
    assert path.read_text() == "stream,ts,score,alert\n"


@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson", ".json"])
def test_jsonl_round_trip(tmp_path, suffix):
    path = tmp_path / f"scores{suffix}"
    with open_table_writer(path, COLUMNS) as table:
        assert isinstance(table, JsonlTableWriter)
        table.write_many(ROWS)
        table.write_many(
            {
                "stream": np.array(["x"]),
                "ts": np.array([7.0]),
                "score": np.array([0.1], dtype=np.float32),
                "alert": np.array([False]),
            }
        )
        table.write_many([])
    lines = path.read_bytes().splitlines()
    assert [orjson.loads(line) for line in lines] == [
        {"stream": "pump-1", "ts": 1795514400.0, "score": 0.1, "alert": False},
        {"stream": "pump-2", "ts": 1795514460.5, "score": 1 / 3, "alert": True},
        {"stream": 'pump,3 "quoted"', "ts": 5.0, "score": 1e-300, "alert": True},
        {"stream": "x", "ts": 7.0, "score": 0.1, "alert": False},
    ]


def test_write_many_checks_shape(tmp_path):
    with open_table_writer(tmp_path / "t.csv", ["a", "b"]) as table:
        with pytest.raises(ValueError, match="2 columns"):
            table.write_many([(1, 2, 3)])
        with pytest.raises(ValueError, match="do not match"):
            table.write_many({"a": [1]})
        with pytest.raises(ValueError, match="length"):
            table.write_many({"a": [1], "b": [1, 2]})


def test_unknown_table_extension(tmp_path):
    with pytest.raises(DetectorError, match=r"\.csv"):
        open_table_writer(tmp_path / "t.xlsx", ["a"])


def test_many_rows_in_batches(tmp_path):
    n = 200_000
    path = tmp_path / "big.csv"
    with open_table_writer(path, ["i", "x", "flag"]) as table:
        for start in range(0, n, 50_000):
            i = np.arange(start, start + 50_000)
            table.write_many({"i": i, "x": i / 7, "flag": i % 2 == 0})
    header, *rows = read_csv(path)
    assert len(rows) == n
    assert rows[-1] == [str(n - 1), repr((n - 1) / 7), "0"]


def test_error_file(tmp_path):
    letters = [
        DeadLetter("bad_json", "unexpected end", Position("in.jsonl", None, 3), b'{"a": '),
        DeadLetter("bad_encoding", "not UTF-8", Position("in.csv", None, 9), b"caf\xe9,1"),
        DeadLetter("bad_value", "feature 't' is not a number", Position("events", 2, 77), b"{}"),
    ]
    path = tmp_path / "errors.jsonl"
    with ErrorFile(path) as errors:
        errors.add(letters[0])
        errors.add_many(letters[1:])
        assert errors.count == 3
    assert [orjson.loads(line) for line in path.read_bytes().splitlines()] == [
        {
            "line": 3,
            "source": "in.jsonl",
            "reason": "bad_json",
            "detail": "unexpected end",
            "payload": '{"a": ',
        },
        {
            "line": 9,
            "source": "in.csv",
            "reason": "bad_encoding",
            "detail": "not UTF-8",
            "payload_b64": base64.b64encode(b"caf\xe9,1").decode(),
        },
        {
            "offset": 77,
            "source": "events",
            "partition": 2,
            "reason": "bad_value",
            "detail": "feature 't' is not a number",
            "payload": "{}",
        },
    ]


def test_error_file_is_created_empty_and_flushes(tmp_path):
    path = tmp_path / "errors.jsonl"
    errors = ErrorFile(path)
    assert path.read_bytes() == b""
    errors.add(DeadLetter("bad_json", "x", Position("f", None, 1), b"{"))
    errors.flush()
    assert path.read_bytes().count(b"\n") == 1
    errors.close()
    errors.close()  # idempotent
