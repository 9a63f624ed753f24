"""Where events come from: a file now (CSV or JSON lines), Kafka later. Each yields chunks.

A chunk covers up to `batch_size` consecutive input records in order. A record that fails to
decode or validate becomes a DeadLetter in the chunk, with its line and raw bytes: nothing is
dropped, and one bad line never stops the run. Blank lines are skipped and not counted.

>>> import pathlib, tempfile
>>> from detector.events import Schema
>>> path = pathlib.Path(tempfile.mkdtemp()) / "replay.csv"
>>> _ = path.write_text("stream,ts,temperature\\npump-1,0,71.2\\npump-1,60,hot\\npump-2,60,70.9\\n")
>>> for chunk in FileSource(path, Schema(features=("temperature",)), batch_size=2):
...     print([(e.stream, p.offset) for e, p in zip(chunk.events, chunk.positions)],
...           [(d.reason, d.position.offset) for d in chunk.invalid])
[('pump-1', 2)] [('bad_value', 3)]
[('pump-2', 4)] []
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import orjson

from detector.errors import InputError, InvalidRecord
from detector.events import DeadLetter, Event, Position, Schema

FORMATS = {".csv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json"}

_BOM = b"\xef\xbb\xbf"


@dataclass
class Chunk:
    """Consecutive input records: the valid ones as events (with aligned positions), the rest
    as dead letters. `len(chunk)` counts both."""

    events: list[Event] = field(default_factory=list)
    positions: list[Position] = field(default_factory=list)  # positions[i] is events[i]'s
    invalid: list[DeadLetter] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events) + len(self.invalid)


def first_record(path: str | PathLike[str]) -> dict | None:
    """The first record of a file as a mapping (a CSV row by column, or the JSON object), or None
    for a file without records: for looking at a file's fields before choosing a schema."""
    source = Path(path)
    kind = FORMATS.get(source.suffix.lower())
    if kind is None:
        supported = ", ".join(FORMATS)
        raise InputError(f"{source}: unknown file type {source.suffix!r}; supported: {supported}")
    if not source.is_file():
        raise InputError(f"{source}: no such file")
    with source.open("rb") as handle:
        lines = [
            line.removeprefix(_BOM).strip() for line, _ in zip(handle, range(1000), strict=False)
        ]
    lines = [line for line in lines if line][:2]
    try:
        if kind == "csv":
            if len(lines) < 2:
                return None
            names, row = csv.reader([line.decode("utf-8") for line in lines])
            return dict(zip((name.strip() for name in names), row, strict=False))
        record = orjson.loads(lines[0]) if lines else None
    except (UnicodeDecodeError, orjson.JSONDecodeError, ValueError) as exc:
        raise InputError(f"{source}: cannot read its first record ({exc})") from exc
    return record if isinstance(record, dict) else None


class FileSource:
    """Chunks of events from a CSV file (header row) or a JSON-lines file, in file order.

    The format follows the extension: `.csv`, or `.jsonl` / `.ndjson` / `.json` (one JSON
    event per line, as in DESIGN.md). A position's offset is the 1-based line number.
    A file that cannot be used at all (missing, unknown extension, a CSV header without the
    stream, time or a required feature column) raises InputError here, before any chunk.
    An empty file yields no chunks.
    """

    def __init__(self, path: str | PathLike[str], schema: Schema, batch_size: int = 4096) -> None:
        self.path = Path(path)
        self.schema = schema
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.format = FORMATS.get(self.path.suffix.lower())
        if self.format is None:
            raise InputError(
                f"{self.path}: unknown file type {self.path.suffix!r}; "
                f"supported: {', '.join(FORMATS)}"
            )
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file")
        if not self.path.is_file():
            raise InputError(f"{self.path}: not a regular file")
        self._header = self._read_header() if self.format == "csv" else None

    def __repr__(self) -> str:
        return f"FileSource({str(self.path)!r}, batch_size={self.batch_size})"

    def __iter__(self) -> Iterator[Chunk]:
        # One flat loop: at a million lines a second, every layer of generators shows.
        if self.format == "csv":
            if self._header is None:
                return
            parse = self._parse_csv_line
            skip = 1  # the header is the first non-blank line
        else:
            parse = self.schema.decode
            skip = 0
        source = str(self.path)
        size = self.batch_size
        events: list[Event] = []
        positions: list[Position] = []
        invalid: list[DeadLetter] = []
        count = 0
        for number, raw in self._lines():
            if skip:
                skip -= 1
                continue
            try:
                event = parse(raw)
            except InvalidRecord as exc:
                invalid.append(
                    DeadLetter(exc.reason, exc.detail, Position(source, None, number), raw)
                )
            else:
                events.append(event)
                positions.append(Position(source, None, number))
            count += 1
            if count == size:
                yield Chunk(events, positions, invalid)
                events, positions, invalid, count = [], [], [], 0
        if count:
            yield Chunk(events, positions, invalid)

    # -- reading ---------------------------------------------------------------------------

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, raw line without its newline) for every non-blank line."""
        with self.path.open("rb") as file:
            first = True
            for number, raw in enumerate(file, 1):
                if raw[-1:] == b"\n":
                    raw = raw[:-2] if raw[-2:-1] == b"\r" else raw[:-1]
                if first:
                    first = False
                    if raw.startswith(_BOM):
                        raw = raw[len(_BOM) :]
                if raw and not raw.isspace():
                    yield number, raw

    def _read_header(self) -> list[str] | None:
        for number, raw in self._lines():
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{self.path}:{number}: the CSV header is not UTF-8") from None
            try:
                columns = [name.strip() for name in next(csv.reader([text], strict=True))]
            except csv.Error as exc:
                raise InputError(f"{self.path}:{number}: unreadable CSV header: {exc}") from None
            schema = self.schema
            required = [schema.stream_field, schema.time_field]
            required += [name for name in schema.features if name not in schema.fill]
            missing = [name for name in required if name not in columns]
            if missing:
                raise InputError(
                    f"{self.path}: the CSV header lacks column(s) {', '.join(missing)}; "
                    f"it has {', '.join(columns)} (a feature may be absent only where the "
                    f"config gives it a fill value)"
                )
            return columns
        return None  # empty file

    def _parse_csv_line(self, raw: bytes) -> Event:
        header = self._header
        assert header is not None
        limit = self.schema.max_record_bytes
        if len(raw) > limit:
            raise InvalidRecord("too_large", f"{len(raw)} bytes, the limit is {limit}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRecord("bad_encoding", f"not UTF-8: {exc.reason}") from None
        if '"' in text:
            try:
                fields = next(csv.reader([text], strict=True))
            except csv.Error as exc:
                raise InvalidRecord("bad_row", f"malformed CSV: {exc}") from None
        else:
            fields = text.split(",")
        if len(fields) != len(header):
            raise InvalidRecord("bad_row", f"expected {len(header)} fields, got {len(fields)}")
        return self.schema.from_row(dict(zip(header, fields, strict=True)))
