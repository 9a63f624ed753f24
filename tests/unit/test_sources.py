"""FileSource: events in order with their lines, chunking, and every bad line as a dead letter."""

from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.errors import InputError
from detector.events import REASONS, DeadLetter, Position, Schema
from detector.sources import Chunk, FileSource

SCHEMA = Schema(features=("temperature", "pressure"), attrs=("site",), max_record_bytes=400)


def read_all(source: FileSource) -> tuple[list, list[Position], list[DeadLetter], list[Chunk]]:
    chunks = list(source)
    events = [e for c in chunks for e in c.events]
    positions = [p for c in chunks for p in c.positions]
    invalid = [d for c in chunks for d in c.invalid]
    for chunk in chunks:
        assert len(chunk.events) == len(chunk.positions)
    return events, positions, invalid, chunks


def jsonl(stream="pump-1", ts=0, temperature=71.2, pressure=3.1, site="north") -> bytes:
    return orjson.dumps(
        {
            "stream": stream,
            "ts": ts,
            "values": {"temperature": temperature, "pressure": pressure},
            "attrs": {"site": site},
        }
    )


# -- valid files ---------------------------------------------------------------------------


def test_csv_events_in_order_with_line_numbers(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text(
        "stream,ts,temperature,pressure,site\n"
        "pump-1,2026-11-24T10:00:00Z,71.2,3.1,north\n"
        "\n"
        "pump-2,1795514460,70.0,3.0,south\n"
        'pump-1,1795514520,"72.5",3.2,"north, east"\n'
    )
    events, positions, invalid, _ = read_all(FileSource(path, SCHEMA, batch_size=10))
    assert invalid == []
    assert [(e.stream, e.ts, e.values, e.attrs) for e in events] == [
        ("pump-1", 1795514400.0, (71.2, 3.1), ("north",)),
        ("pump-2", 1795514460.0, (70.0, 3.0), ("south",)),
        ("pump-1", 1795514520.0, (72.5, 3.2), ("north, east",)),
    ]
    assert positions == [Position(str(path), None, n) for n in (2, 4, 5)]


def test_csv_with_bom_crlf_and_optional_columns(tmp_path):
    path = tmp_path / "in.csv"
    schema = Schema(features=("temperature", "pressure"), attrs=("site",), fill={"pressure": 0.0})
    path.write_bytes(b"\xef\xbb\xbfts,stream,temperature\r\n5,a,1.5\r\n6,b,\r\n")
    events, positions, invalid, _ = read_all(FileSource(path, schema, batch_size=10))
    assert [(e.stream, e.ts, e.values, e.attrs) for e in events] == [
        ("a", 5.0, (1.5, 0.0), ("",)),
    ]
    assert [(d.reason, d.position.offset, d.payload) for d in invalid] == [
        ("missing_value", 3, b"6,b,")
    ]


def test_jsonl_events_in_order_with_line_numbers(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + jsonl("a", 1)
        + b"\n\n   \n"
        + jsonl("b", 2)
        + b"\r\n"
        + jsonl("c", "1970-01-01T00:00:03Z")  # no trailing newline
    )
    events, positions, invalid, _ = read_all(FileSource(path, SCHEMA, batch_size=10))
    assert invalid == []
    assert [(e.stream, e.ts) for e in events] == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert [p.offset for p in positions] == [1, 4, 5]


@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson", ".json", ".JSONL"])
def test_json_extensions(tmp_path, suffix):
    path = tmp_path / f"in{suffix}"
    path.write_bytes(jsonl() + b"\n")
    events, _, _, _ = read_all(FileSource(path, SCHEMA, batch_size=10))
    assert len(events) == 1


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 100])
def test_chunks_cover_batch_size_records_including_invalid(tmp_path, batch_size):
    lines = [jsonl(str(i), i) if i % 3 else b"not json" for i in range(20)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    events, positions, invalid, chunks = read_all(FileSource(path, SCHEMA, batch_size=batch_size))
    assert [len(c) for c in chunks[:-1]] == [batch_size] * (len(chunks) - 1)
    assert 1 <= len(chunks[-1]) <= batch_size
    assert sum(len(c) for c in chunks) == 20
    assert [e.stream for e in events] == [str(i) for i in range(20) if i % 3]
    assert [d.position.offset for d in invalid] == [i + 1 for i in range(20) if i % 3 == 0]
    # every chunk holds consecutive lines
    for chunk in chunks:
        lines_in = sorted(
            [p.offset for p in chunk.positions] + [d.position.offset for d in chunk.invalid]
        )
        assert lines_in == list(range(lines_in[0], lines_in[0] + len(lines_in)))


def test_source_can_be_iterated_twice(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl() + b"\n" + jsonl() + b"\n")
    source = FileSource(path, SCHEMA, batch_size=1)
    assert len(list(source)) == len(list(source)) == 2


# -- bad lines -----------------------------------------------------------------------------

LATIN1 = '{"stream": "café", "ts": 0, "values": {"temperature": 1, "pressure": 2}}'.encode(
    "latin-1"
)

# orjson refuses NaN and out-of-range numbers like 1e999 as bad JSON.
BAD_JSONL = [
    (b'{"stream": "a", "ts": 0, "values": {"temperature": 1}}', "missing_value"),
    (b'{"stream": "a", "ts": 0}', "missing_value"),
    (b'{"stream": "a", "ts": 0, "values": {"temperature": "x", "pressure": 1}}', "bad_value"),
    (b'{"stream": "a", "ts": 0, "values": {"temperature": NaN, "pressure": 1}}', "bad_json"),
    (b'{"stream": "a", "ts": 0, "values": {"temperature": 1e999, "pressure": 1}}', "bad_json"),
    (b'{"stream": "a", "ts": 0, "values": {"temperature": "nan", "pressure": 1}}', "bad_value"),
    (b'{"stream": "a", "ts": 0, "values": {"temperature": "-inf", "pressure": 1}}', "bad_value"),
    (b'{"stream": "a", "ts": 0, "values": {"temperature": true, "pressure": 1}}', "bad_value"),
    (
        b'{"stream": "a", "ts": "yesterday", "values": {"temperature": 1, "pressure": 1}}',
        "bad_timestamp",
    ),
    (b'{"stream": "a", "values": {"temperature": 1, "pressure": 1}}', "bad_timestamp"),
    (b'{"ts": 0, "values": {"temperature": 1, "pressure": 1}}', "missing_stream"),
    (b'{"stream": "", "ts": 0, "values": {"temperature": 1, "pressure": 1}}', "missing_stream"),
    (
        b'{"stream": "a", "ts": 0, "values": {"temperature": 1, "pressure": 1}, "attrs": 3}',
        "bad_attr",
    ),
    (b'{"stream": "a", "ts": 0, "values": {"temperature": 1, "pressure": 1', "bad_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (LATIN1, "bad_encoding"),
    (jsonl(site="x" * 500), "too_large"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_JSONL, ids=[r for _, r in BAD_JSONL])
def test_jsonl_bad_line_becomes_dead_letter(tmp_path, line, reason):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl("ok-1") + b"\n" + line + b"\n" + jsonl("ok-2") + b"\n")
    events, positions, invalid, _ = read_all(FileSource(path, SCHEMA, batch_size=100))
    assert [e.stream for e in events] == ["ok-1", "ok-2"]
    assert [p.offset for p in positions] == [1, 3]
    assert len(invalid) == 1
    letter = invalid[0]
    assert (letter.reason, letter.position, letter.payload) == (
        reason,
        Position(str(path), None, 2),
        line,
    )
    assert letter.reason in REASONS
    assert letter.detail


CSV_HEADER = "stream,ts,temperature,pressure,site"
BAD_CSV = [
    ("a,0,,1,x", "missing_value"),
    ("a,0,hot,1,x", "bad_value"),
    ("a,0,NaN,1,x", "bad_value"),
    ("a,0,nan,1,x", "bad_value"),
    ("a,0,inf,1,x", "bad_value"),
    ("a,0,-Infinity,1,x", "bad_value"),
    ("a,yesterday,1,1,x", "bad_timestamp"),
    ("a,,1,1,x", "bad_timestamp"),
    (",0,1,1,x", "missing_stream"),
    ("a,0,1,1", "bad_row"),
    ("a,0,1,1,x,extra", "bad_row"),
    ('a,0,1,1,"unterminated', "bad_row"),
    ("a,0,1,1," + "x" * 500, "too_large"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_CSV, ids=[r for _, r in BAD_CSV])
def test_csv_bad_line_becomes_dead_letter(tmp_path, line, reason):
    path = tmp_path / "in.csv"
    path.write_text(f"{CSV_HEADER}\nok-1,0,1,1,x\n{line}\nok-2,0,1,1,x\n")
    events, positions, invalid, _ = read_all(FileSource(path, SCHEMA, batch_size=100))
    assert [e.stream for e in events] == ["ok-1", "ok-2"]
    assert [p.offset for p in positions] == [2, 4]
    assert [(d.reason, d.position.offset, d.payload) for d in invalid] == [
        (reason, 3, line.encode())
    ]
    assert invalid[0].reason in REASONS


def test_csv_wrong_field_count_detail(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text(f"{CSV_HEADER}\na,0,1\n")
    (letter,) = read_all(FileSource(path, SCHEMA, batch_size=100))[2]
    assert letter.detail == "expected 5 fields, got 3"


def test_csv_latin1_line_in_utf8_file(tmp_path):
    path = tmp_path / "in.csv"
    bad = "café,0,1,1,x".encode("latin-1")
    path.write_bytes(f"{CSV_HEADER}\n".encode() + bad + "\ncafé,0,1,1,x\n".encode())
    events, positions, invalid, _ = read_all(FileSource(path, SCHEMA, batch_size=100))
    assert [e.stream for e in events] == ["café"]
    assert [(d.reason, d.position.offset, d.payload) for d in invalid] == [("bad_encoding", 2, bad)]


# -- unusable files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n\n  \n"),
        ("empty.csv", b""),
        ("header-only.csv", (CSV_HEADER + "\n").encode()),
        ("header-only-bom.csv", b"\xef\xbb\xbf" + CSV_HEADER.encode()),
    ],
)
def test_empty_file_yields_nothing(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert list(FileSource(path, SCHEMA, batch_size=10)) == []


def test_csv_header_missing_a_feature_is_an_input_error(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("stream,ts,temperature,site\na,0,1,x\n")
    with pytest.raises(InputError, match="pressure") as info:
        FileSource(path, SCHEMA, batch_size=10)
    assert "stream, ts, temperature, site" in str(info.value)


def test_csv_header_missing_stream_and_time(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("id,time,temperature,pressure\n")
    with pytest.raises(InputError, match="stream, ts"):
        FileSource(path, SCHEMA, batch_size=10)


def test_csv_header_may_lack_filled_features_and_attrs(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("stream,ts,temperature\na,0,1\n")
    schema = Schema(features=("temperature", "pressure"), attrs=("site",), fill={"pressure": 2})
    (event,) = read_all(FileSource(path, schema, batch_size=10))[0]
    assert event.values == (1.0, 2.0) and event.attrs == ("",)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        FileSource(tmp_path / "nope.jsonl", SCHEMA, batch_size=10)


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "in.parquet"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"\.csv.*\.jsonl"):
        FileSource(path, SCHEMA, batch_size=10)


def test_batch_size_must_be_positive(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"")
    with pytest.raises(ValueError):
        FileSource(path, SCHEMA, batch_size=0)


# -- dead letters --------------------------------------------------------------------------


def test_dead_letter_json_for_a_file_and_a_topic():
    in_file = DeadLetter("bad_json", "eof", Position("in.jsonl", None, 3), b"\xff{")
    assert orjson.loads(in_file.to_json()) == {
        "reason": "bad_json",
        "detail": "eof",
        "source": {"file": "in.jsonl", "line": 3},
        "payload_b64": base64.b64encode(b"\xff{").decode(),
    }
    in_topic = DeadLetter("bad_json", "eof", Position("events", 2, 99), b"{")
    assert orjson.loads(in_topic.to_json())["source"] == {
        "topic": "events",
        "partition": 2,
        "offset": 99,
    }


# -- property: nothing is lost -------------------------------------------------------------

VALID_LINES = st.builds(
    lambda s, t, x: jsonl(s, t, x, x),
    st.text("abc", min_size=1, max_size=3),
    st.integers(0, 10**9),
    st.floats(-1e6, 1e6),
)
INVALID_LINES = st.sampled_from([line for line, _ in BAD_JSONL])
BLANK_LINES = st.sampled_from([b"", b"  ", b"\t"])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=st.lists(st.one_of(VALID_LINES, INVALID_LINES, BLANK_LINES), max_size=40),
    batch_size=st.integers(1, 8),
)
def test_property_nothing_lost_positions_increase(tmp_path, lines, batch_size):
    path = tmp_path / "prop.jsonl"
    path.write_bytes(b"\n".join(lines))
    events, positions, invalid, chunks = read_all(FileSource(path, SCHEMA, batch_size=batch_size))
    non_blank = [i + 1 for i, line in enumerate(lines) if line.strip()]
    assert len(events) + len(invalid) == len(non_blank)
    assert all(0 < len(c) <= batch_size for c in chunks)
    assert all(a.offset < b.offset for a, b in zip(positions, positions[1:], strict=False))
    merged = sorted([p.offset for p in positions] + [d.position.offset for d in invalid])
    assert merged == non_blank
    by_line = dict(enumerate(lines, 1))
    assert all(by_line[d.position.offset] == d.payload for d in invalid)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.one_of(
            st.just("a,0,1,2,x"),
            st.sampled_from([line for line, _ in BAD_CSV]),
            st.just(""),
            st.text(
                st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                max_size=20,
            ),
        ),
        max_size=30,
    ),
    batch_size=st.integers(1, 8),
)
def test_property_csv_nothing_lost(tmp_path, rows, batch_size):
    path = tmp_path / "prop.csv"
    path.write_text(CSV_HEADER + "\n" + "\n".join(rows), encoding="utf-8")
    events, positions, invalid, _ = read_all(FileSource(path, SCHEMA, batch_size=batch_size))
    non_blank = [i + 2 for i, row in enumerate(rows) if row and not row.encode().isspace()]
    merged = sorted([p.offset for p in positions] + [d.position.offset for d in invalid])
    assert merged == non_blank
    assert all(a.offset < b.offset for a, b in zip(positions, positions[1:], strict=False))
