"""Events in, as records and as columnar batches; decoding raises InvalidRecord, never returns None.

An event names its stream, its time (RFC 3339 or epoch seconds), its numeric feature values and,
for transaction streams, categorical attributes:

>>> schema = Schema(features=("temperature", "pressure"), attrs=("site",))
>>> event = schema.decode(b'{"stream": "pump-17", "ts": "2026-11-24T10:00:00Z",'
...                       b' "values": {"temperature": 71.2, "pressure": 3.1},'
...                       b' "attrs": {"site": "north"}}')
>>> event.stream, event.ts, event.values, event.attrs
('pump-17', 1795514400.0, (71.2, 3.1), ('north',))
>>> schema.decode(b'{"stream": "pump-17", "ts": 0, "values": {"temperature": "hot"}}')
Traceback (most recent call last):
...
detector.errors.InvalidRecord: bad_value: feature 'temperature' is not a number: 'hot'
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from detector.errors import InvalidRecord

# Reasons are metric label values: keep this set small and fixed.
REASONS = (
    "too_large",
    "bad_encoding",
    "bad_json",
    "not_an_object",
    "missing_stream",
    "bad_timestamp",
    "missing_value",
    "bad_value",
    "bad_attr",
    "bad_row",  # a CSV line that is not a row of the header's shape
    "streams_full",
)


@dataclass(frozen=True, slots=True)
class Event:
    stream: str
    ts: float  # epoch seconds, UTC
    values: tuple[float, ...]  # in the schema's feature order
    attrs: tuple[str, ...] = ()  # in the schema's attr order; "" where absent


def parse_timestamp(value: Any) -> float:
    """Epoch seconds from an RFC 3339 / ISO 8601 string or a number; naive times are UTC.

    >>> parse_timestamp("2026-11-24T10:00:00Z"), parse_timestamp("1795514400"), parse_timestamp(5)
    (1795514400.0, 1795514400.0, 5.0)
    >>> parse_timestamp("2026-11-24 11:00:00+01:00"), parse_timestamp("1.5e-3")
    (1795514400.0, 0.0015)
    """
    if isinstance(value, bool):
        raise InvalidRecord("bad_timestamp", f"not a time: {value!r}")
    seconds: float | None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        # RFC 3339 starts "YYYY-": try it first, as float()'s exception on it costs more than the
        # whole parse (1.4 against 0.8 us, in every event of a stream with string times).
        seconds = _iso_seconds(text) if text[4:5] == "-" else None
        if seconds is None:
            try:
                seconds = float(text)
            except ValueError:
                seconds = _iso_seconds(text)
    else:
        raise InvalidRecord("bad_timestamp", f"not a time: {value!r}")
    if seconds is None:
        raise InvalidRecord("bad_timestamp", f"not RFC 3339 or epoch seconds: {value!r}")
    if not math.isfinite(seconds):
        raise InvalidRecord("bad_timestamp", f"not a finite time: {value!r}")
    return seconds


def _iso_seconds(text: str) -> float | None:
    """Epoch seconds of an ISO 8601 time (naive means UTC), or None if it is not one."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidRecord("bad_value", f"feature {name!r} is not a number: {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidRecord("bad_value", f"feature {name!r} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise InvalidRecord("bad_value", f"feature {name!r} is not finite: {value!r}")
    return number


@dataclass(frozen=True)
class Schema:
    """What an event must carry: the model's features and attrs, and where they are.

    `decode` reads the JSON event format of DESIGN.md; `from_row` reads a flat mapping of
    strings, as a CSV row gives it (features and attrs as columns).
    """

    features: tuple[str, ...]
    attrs: tuple[str, ...] = ()
    fill: Mapping[str, float] = field(default_factory=dict)
    stream_field: str = "stream"
    time_field: str = "ts"
    max_record_bytes: int = 65536

    @classmethod
    def from_config(cls, data, features: Sequence[str], attrs: Sequence[str] = ()) -> Schema:
        """From a `detector.config.DataConfig` and the model's features and attrs."""
        return cls(
            features=tuple(features),
            attrs=tuple(attrs),
            fill=dict(data.fill),
            stream_field=data.stream_field,
            time_field=data.time_field,
            max_record_bytes=data.max_record_bytes,
        )

    def decode(self, raw: bytes) -> Event:
        if len(raw) > self.max_record_bytes:
            raise InvalidRecord(
                "too_large", f"{len(raw)} bytes, the limit is {self.max_record_bytes}"
            )
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRecord("bad_encoding", "not UTF-8") from None
            raise InvalidRecord("bad_json", str(exc)) from None
        if not isinstance(record, dict):
            raise InvalidRecord("not_an_object", f"a JSON {type(record).__name__}, not an object")
        values = record.get("values")
        if not isinstance(values, dict):
            raise InvalidRecord("missing_value", "'values' must be an object of feature: number")
        attrs = record.get("attrs") or {}
        if not isinstance(attrs, dict):
            raise InvalidRecord("bad_attr", "'attrs' must be an object of name: string")
        stream, ts = record.get(self.stream_field), record.get(self.time_field)
        return self._event(stream, ts, values, attrs)

    def decode_many(self, raws: Sequence[bytes | None], attr_buckets: int) -> Decoded:
        """Decode a micro-batch of records into the engine's columns, as `decode` would one by
        one (a test holds the two to the same events and the same reasons).

        The common record (the fields where the schema expects them, numbers as JSON numbers,
        string ids and attrs) goes through a short path that builds no `Event`; anything else
        is handed to `decode`, whose checks give the reason. A 4-feature sensor event with an
        epoch time: 11.0 us per record through `decode` and `EventBatch.from_events`, 6.3 us
        here, of which `orjson.loads` 2.6 us (with an RFC 3339 time: 12.4 and 8.8 us; medians
        of 15 batches of 4,096).
        """
        loads, limit = orjson.loads, self.max_record_bytes
        features, attr_names = self.features, self.attrs
        stream_field, time_field = self.stream_field, self.time_field
        kept: list[int] = []
        streams: list[str] = []
        stamps: list[float] = []
        rows: list[list[Any]] = []
        labels: list[tuple[str, ...]] = []
        invalid: list[tuple[int, InvalidRecord]] = []
        for i, raw in enumerate(raws):
            try:
                if raw is None or len(raw) > limit:
                    raise LookupError  # `decode` names the reason
                record = loads(raw)
                stream, ts, values = record[stream_field], record[time_field], record["values"]
                row = [values[name] for name in features]
                if attr_names:
                    given = record.get("attrs") or {}
                    named = tuple(given.get(name, "") for name in attr_names)
                    if any(type(a) is not str for a in named):
                        raise LookupError
                else:
                    named = ()
                if type(stream) is not str or not stream:
                    raise LookupError
                kind = type(ts)
                if kind is str:
                    ts = parse_timestamp(ts)
                elif kind is not float and kind is not int:
                    raise LookupError
                for value in row:  # not bool, None or a string: JSON numbers only
                    kind = type(value)
                    if kind is not float and kind is not int:
                        raise LookupError
            except (LookupError, TypeError, AttributeError, ValueError, InvalidRecord):
                # orjson.JSONDecodeError is a ValueError; InvalidRecord a bad string time.
                try:
                    event = self.decode(raw if raw is not None else b"")
                except InvalidRecord as exc:
                    invalid.append((i, exc))
                    continue
                stream, ts, row, named = event.stream, event.ts, list(event.values), event.attrs
            kept.append(i)
            streams.append(stream)
            stamps.append(ts)
            rows.append(row)
            labels.append(named)
        n, f = len(kept), len(features)
        # JSON numbers are finite: orjson refuses 1e400 and NaN, and parse_timestamp checks.
        values64 = np.array(rows, dtype=np.float64).reshape(n, f)
        ts64 = np.array(stamps, dtype=np.float64)
        buckets = hash_attrs(labels, len(attr_names), attr_buckets)
        batch = EventBatch(streams, ts64, values64.astype(np.float32), buckets)
        return Decoded(batch, kept, values64, labels, invalid)

    def from_row(self, row: Mapping[str, Any]) -> Event:
        return self._event(row.get(self.stream_field), row.get(self.time_field), row, row)

    def _event(
        self, stream: Any, ts: Any, values: Mapping[str, Any], attrs: Mapping[str, Any]
    ) -> Event:
        if isinstance(stream, int) and not isinstance(stream, bool):
            stream = str(stream)
        if not isinstance(stream, str) or not stream:
            raise InvalidRecord(
                "missing_stream", f"{self.stream_field!r} must be a non-empty string"
            )
        if ts is None or ts == "":
            raise InvalidRecord("bad_timestamp", f"{self.time_field!r} is missing")
        numbers = []
        for name in self.features:
            value = values.get(name)
            if value is None or value == "":
                if name not in self.fill:
                    raise InvalidRecord("missing_value", f"feature {name!r} is missing")
                value = self.fill[name]
            numbers.append(_number(name, value))
        labels = []
        for name in self.attrs:
            value = attrs.get(name, "")
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise InvalidRecord("bad_attr", f"attr {name!r} must be a string: {value!r}")
            labels.append(str(value))
        return Event(stream, parse_timestamp(ts), tuple(numbers), tuple(labels))


def hash_attr(value: str, buckets: int) -> int:
    """A stable bucket for a categorical value (Python's hash() is salted per process).

    Bucket 0 is kept for "absent".

    >>> hash_attr("", 1024), hash_attr("grocery", 1024) == hash_attr("grocery", 1024)
    (0, True)
    """
    if not value:
        return 0
    return 1 + zlib.crc32(value.encode("utf-8")) % (buckets - 1)


def hash_attrs(labels: Sequence[Sequence[str]], n_attrs: int, buckets: int) -> np.ndarray:
    """(N, n_attrs) int64 buckets of N events' attr values (`hash_attr` of each)."""
    return np.array(
        [[hash_attr(a, buckets) for a in row] for row in labels], dtype=np.int64
    ).reshape(len(labels), n_attrs)


@dataclass
class EventBatch:
    """A micro-batch in columns: what the engine steps. Rows keep their arrival order."""

    streams: list[str]
    ts: np.ndarray  # (N,) float64 epoch seconds
    values: np.ndarray  # (N, F) float32
    attrs: np.ndarray  # (N, A) int64 hash buckets; A may be 0

    def __len__(self) -> int:
        return len(self.streams)

    @classmethod
    def from_events(cls, events: Sequence[Event], n_features: int, attr_buckets: int) -> EventBatch:
        n = len(events)
        values = np.array([e.values for e in events], dtype=np.float32).reshape(n, n_features)
        n_attrs = len(events[0].attrs) if events else 0
        return cls(
            streams=[e.stream for e in events],
            ts=np.fromiter((e.ts for e in events), dtype=np.float64, count=n),
            values=values,
            attrs=hash_attrs([e.attrs for e in events], n_attrs, attr_buckets),
        )

    def take(self, rows: Iterable[int] | np.ndarray) -> EventBatch:
        index = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64)
        return EventBatch(
            streams=[self.streams[i] for i in index],
            ts=self.ts[index],
            values=self.values[index],
            attrs=self.attrs[index],
        )


@dataclass
class Decoded:
    """A micro-batch of records decoded by `Schema.decode_many`."""

    batch: EventBatch  # the valid records, in input order
    kept: list[int]  # each batch row's index in the input
    values: np.ndarray  # (N, F) float64: the values as sent (alerts quote them)
    attrs: list[tuple[str, ...]]  # (N,) the attrs as sent, "" where absent
    invalid: list[tuple[int, InvalidRecord]]  # input index and reason, in input order


@dataclass(frozen=True, slots=True)
class Position:
    """Where a record came from: a Kafka topic, partition and offset, or a file and line.

    >>> str(Position("sensor-events", 3, 18842)), str(Position("data/replay.jsonl", None, 12))
    ('sensor-events[3]@18842', 'data/replay.jsonl:12')
    """

    source: str  # topic, or file path
    partition: int | None  # None for files
    offset: int  # Kafka offset, or 1-based line number in a file

    def __str__(self) -> str:
        if self.partition is None:
            return f"{self.source}:{self.offset}"
        return f"{self.source}[{self.partition}]@{self.offset}"

    def to_dict(self) -> dict[str, Any]:
        """The `source` object of a dead letter: topic/partition/offset, or file/line."""
        if self.partition is None:
            return {"file": self.source, "line": self.offset}
        return {"topic": self.source, "partition": self.partition, "offset": self.offset}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that failed to decode or validate, kept with its raw bytes: never dropped.

    >>> try:
    ...     Schema(features=("t",)).decode(b"[1]")
    ... except InvalidRecord as exc:
    ...     letter = DeadLetter.from_invalid(exc, Position("in", 0, 7), b"[1]")
    >>> orjson.loads(letter.to_json())  # doctest: +NORMALIZE_WHITESPACE
    {'reason': 'not_an_object', 'detail': 'a JSON list, not an object',
     'source': {'topic': 'in', 'partition': 0, 'offset': 7}, 'payload_b64': 'WzFd'}
    """

    reason: str  # one of REASONS
    detail: str
    position: Position
    payload: bytes

    @classmethod
    def from_invalid(cls, exc: InvalidRecord, position: Position, payload: bytes) -> DeadLetter:
        return cls(exc.reason, exc.detail, position, payload)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "reason": self.reason,
                "detail": self.detail,
                "source": self.position.to_dict(),
                "payload_b64": base64.b64encode(self.payload).decode("ascii"),
            }
        )
