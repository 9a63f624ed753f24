"""Where results go: tables of scores and alerts, and the error file of dead letters.

File sinks only for now; the Kafka alert and dead-letter sinks come later. Sinks follow the
`AlertSink` shape: `add` / `add_many` buffer, `flush` makes it durable, `close` flushes.

A table's format follows the extension: `.csv` (header row; floats at full precision, bools as
0/1) or `.jsonl` / `.ndjson` / `.json` (one JSON object per line). Rows come as tuples or as
a dict of columns:

>>> import pathlib, tempfile
>>> import numpy as np
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> with open_table_writer(folder / "scores.csv", ["stream", "score", "alert"]) as table:
...     table.write_many([("pump-1", 0.25, False)])
...     table.write_many({"stream": ["pump-2"], "score": np.array([0.1], dtype=np.float32),
...                       "alert": np.array([True])})
>>> print((folder / "scores.csv").read_text(), end="")
stream,score,alert
pump-1,0.25,0
pump-2,0.1,1
"""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain, islice
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
import orjson

from detector.errors import DetectorError
from detector.events import DeadLetter

TABLE_FORMATS = {".csv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json"}

Rows = Sequence[Sequence[Any]] | Mapping[str, Any]

_BOOLS = (bool, np.bool_)


def _batches(rows: Iterable[Sequence[Any]], size: int = 4096) -> Iterator[list[Sequence[Any]]]:
    """Slices of a few thousand rows: a million small outputs alive at once is much slower."""
    iterator = iter(rows)
    while batch := list(islice(iterator, size)):
        yield batch


def _open_output(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("wb")


def _column(values: Any, bools_as_ints: bool) -> list[Any]:
    """One column as a list of plain Python values, floats short (float32 0.1 stays 0.1)."""
    if not isinstance(values, np.ndarray):
        if bools_as_ints:
            return [int(v) if v.__class__ in _BOOLS else v for v in values]
        return list(values)
    if values.dtype == np.bool_:
        return values.astype(np.int8).tolist() if bools_as_ints else values.tolist()
    if values.dtype.kind == "f" and values.dtype.itemsize < 8:
        # tolist() would widen 0.1f to 0.10000000149011612; go through its shortest text.
        return values.astype(str).astype(np.float64).tolist()
    return values.tolist()


class TableWriter:
    """Rows to a file, in batches. Use `open_table_writer` to get one for a path."""

    bools_as_ints = False

    def __init__(self, path: str | PathLike[str], columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        self.rows_written = 0
        self._file = _open_output(self.path)
        self._start()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, columns={self.columns!r})"

    def write_many(self, rows: Rows) -> None:
        """Append rows: a sequence of tuples in column order, or a dict column -> values."""
        if isinstance(rows, Mapping):
            if set(rows) != set(self.columns):
                raise ValueError(f"columns {sorted(rows)} do not match the table's {self.columns}")
            lists = [_column(rows[name], self.bools_as_ints) for name in self.columns]
            lengths = {len(values) for values in lists}
            if len(lengths) > 1:
                raise ValueError(f"columns differ in length: {sorted(lengths)}")
            table: Iterable[Sequence[Any]] = zip(*lists, strict=True)
            count = lengths.pop() if lengths else 0
        else:
            width = len(self.columns)
            for row in rows:
                if len(row) != width:
                    raise ValueError(f"a row of {len(row)} values for {width} columns: {row!r}")
            table = self._plain_rows(rows)
            count = len(rows)
        self._write(table)
        self.rows_written += count

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _plain_rows(self, rows: Sequence[Sequence[Any]]) -> Iterable[Sequence[Any]]:
        return rows

    def _start(self) -> None:
        raise NotImplementedError

    def _write(self, rows: Iterable[Sequence[Any]]) -> None:
        raise NotImplementedError


class CsvTableWriter(TableWriter):
    bools_as_ints = True

    def _start(self) -> None:
        self._text = io.TextIOWrapper(self._file, encoding="utf-8", newline="", write_through=False)
        self._csv = csv.writer(self._text, lineterminator="\n")
        self._csv.writerow(self.columns)

    def _plain_rows(self, rows: Sequence[Sequence[Any]]) -> Iterable[Sequence[Any]]:
        bools = _BOOLS
        for batch in _batches(rows):
            if not any(kind in bools for kind in set(map(type, chain.from_iterable(batch)))):
                yield from batch  # the common case: no bools, nothing to convert
                continue
            columns: list[Iterable[Any]] = list(zip(*batch, strict=True))
            for j, column in enumerate(columns):
                if any(kind in bools for kind in set(map(type, column))):
                    columns[j] = [int(v) if v.__class__ in bools else v for v in column]
            yield from zip(*columns, strict=True)

    def _write(self, rows: Iterable[Sequence[Any]]) -> None:
        for batch in _batches(rows):
            self._csv.writerows(batch)

    def flush(self) -> None:
        self._text.flush()

    def close(self) -> None:
        if not self._text.closed:
            self._text.close()


class JsonlTableWriter(TableWriter):
    def _start(self) -> None:
        pass

    def _write(self, rows: Iterable[Sequence[Any]]) -> None:
        dumps, columns = orjson.dumps, self.columns
        option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
        for batch in _batches(rows):
            lines = [dumps(dict(zip(columns, row, strict=True)), option=option) for row in batch]
            self._file.write(b"".join(lines))


def open_table_writer(path: str | PathLike[str], columns: Sequence[str]) -> TableWriter:
    """A writer for `path`, its format from the extension; the header goes out at once."""
    kind = TABLE_FORMATS.get(Path(path).suffix.lower())
    if kind is None:
        supported = ", ".join(TABLE_FORMATS)
        raise DetectorError(
            f"{path}: unknown table type {Path(path).suffix!r}; supported: {supported}"
        )
    return CsvTableWriter(path, columns) if kind == "csv" else JsonlTableWriter(path, columns)


class ErrorFile:
    """Dead letters to a JSON-lines file, one object per record, readable by a person.

    The payload is given as text where it is UTF-8, else as `payload_b64`.

    >>> import pathlib, tempfile
    >>> from detector.events import Position
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "errors.jsonl"
    >>> with ErrorFile(path) as errors:
    ...     errors.add(DeadLetter("bad_json", "eof", Position("in.jsonl", None, 3), b"{"))
    >>> print(path.read_text(), end="")
    {"line":3,"source":"in.jsonl","reason":"bad_json","detail":"eof","payload":"{"}
    """

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = Path(path)
        self.count = 0
        self._file = _open_output(self.path)
        self._pending: list[bytes] = []

    def __repr__(self) -> str:
        return f"ErrorFile({str(self.path)!r}, count={self.count})"

    def add(self, letter: DeadLetter) -> None:
        self._pending.append(self._line(letter))
        self.count += 1
        if len(self._pending) >= 4096:
            self._drain()

    def add_many(self, letters: Iterable[DeadLetter]) -> None:
        for letter in letters:
            self.add(letter)

    def flush(self) -> None:
        self._drain()
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._drain()
            self._file.close()

    def __enter__(self) -> ErrorFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _drain(self) -> None:
        if self._pending:
            self._file.write(b"".join(self._pending))
            self._pending.clear()

    @staticmethod
    def _line(letter: DeadLetter) -> bytes:
        position = letter.position
        record: dict[str, Any]
        if position.partition is None:
            record = {"line": position.offset, "source": position.source}
        else:
            record = {
                "offset": position.offset,
                "source": position.source,
                "partition": position.partition,
            }
        record["reason"] = letter.reason
        record["detail"] = letter.detail
        try:
            record["payload"] = letter.payload.decode("utf-8")
        except UnicodeDecodeError:
            record["payload_b64"] = base64.b64encode(letter.payload).decode("ascii")
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
