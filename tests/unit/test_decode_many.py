"""`Schema.decode_many` (the worker's path) against `Schema.decode` record by record."""

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.errors import InvalidRecord
from detector.events import Schema, hash_attr

SCHEMA = Schema(features=("t", "p"), attrs=("site",), fill={"p": -1.0}, max_record_bytes=300)
BUCKETS = 64

scalars = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.none(),
    st.sampled_from(["", "1.5", "nan", "hot", "2026-11-24T10:00:00Z", "1795514400"]),
)
records = st.fixed_dictionaries(
    {},
    optional={
        "stream": st.one_of(st.sampled_from(["a", "b", ""]), scalars),
        "ts": st.one_of(scalars, st.sampled_from(["2026-11-24 11:00:00+01:00", "yesterday"])),
        "values": st.one_of(
            st.fixed_dictionaries({}, optional={"t": scalars, "p": scalars, "x": scalars}),
            scalars,
            st.lists(scalars, max_size=2),
        ),
        "attrs": st.one_of(
            st.fixed_dictionaries({}, optional={"site": scalars}), scalars, st.just({})
        ),
        "padding": st.text(max_size=300),  # some records go over max_record_bytes
    },
)
raw_records = st.one_of(
    records.map(orjson.dumps),
    st.sampled_from(
        [
            b"",
            b"[1]",
            b"{",
            b"\xff\xfe",
            b"null",
            b'{"stream": "a", "ts": 1, "values": {"t": 1e400, "p": 1}}',
            b'{"stream": "a", "ts": 1, "values": {"t": 123456789012345678901234567890, "p": 1}}',
        ]
    ),
    st.none(),  # a Kafka tombstone
)


def one_by_one(raws):
    events, invalid = [], []
    for i, raw in enumerate(raws):
        try:
            events.append((i, SCHEMA.decode(raw if raw is not None else b"")))
        except InvalidRecord as exc:
            invalid.append((i, exc.reason, exc.detail))
    return events, invalid


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(raw_records, max_size=12))
def test_decode_many_gives_what_decode_gives_record_by_record(raws):
    events, invalid = one_by_one(raws)
    decoded = SCHEMA.decode_many(raws, BUCKETS)
    assert [(i, e.reason, e.detail) for i, e in decoded.invalid] == invalid
    assert decoded.kept == [i for i, _ in events]
    batch = decoded.batch
    assert batch.streams == [e.stream for _, e in events]
    assert batch.ts.tolist() == [e.ts for _, e in events]
    assert decoded.values.tolist() == [list(e.values) for _, e in events]
    assert decoded.values.dtype == np.float64 and batch.values.dtype == np.float32
    np.testing.assert_array_equal(batch.values, decoded.values.astype(np.float32))
    assert decoded.attrs == [e.attrs for _, e in events]
    assert batch.attrs.tolist() == [[hash_attr(a, BUCKETS) for a in e.attrs] for _, e in events]


def test_the_common_record_takes_the_short_path_and_an_odd_one_the_checked_path():
    raws = [
        b'{"stream": "a", "ts": 5, "values": {"t": 1.5, "p": 2}, "attrs": {"site": "n"}}',
        b'{"stream": 7, "ts": "1970-01-01T00:00:06Z", "values": {"t": "2.5"}}',  # converted
        b'{"stream": "a", "ts": 7, "values": {"t": true, "p": 1}}',
    ]
    decoded = SCHEMA.decode_many(raws, BUCKETS)
    assert decoded.kept == [0, 1]
    assert decoded.batch.streams == ["a", "7"]
    assert decoded.values.tolist() == [[1.5, 2.0], [2.5, -1.0]]  # p filled in the second
    assert decoded.attrs == [("n",), ("",)]
    [(at, exc)] = decoded.invalid
    assert at == 2 and exc.reason == "bad_value"


def test_an_empty_micro_batch_has_the_engine_s_shapes():
    decoded = SCHEMA.decode_many([], BUCKETS)
    assert decoded.batch.values.shape == (0, 2) and decoded.batch.attrs.shape == (0, 1)
    assert len(decoded.batch) == 0 and decoded.invalid == []
