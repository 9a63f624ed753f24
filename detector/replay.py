"""Replay recorded events through the streaming engine, exactly as the daemon would score them.

`replay` turns a source's chunks into engine micro-batches and yields each batch with its result;
`score_file` is the `detector score` command built on it. Every input record ends up in exactly
one count: scored, warm-up or invalid (undecodable, or its stream refused because `max_streams`
is full), so the counts add up to the input.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detector.engine import OUTCOMES, REJECTED, SCORED, WARMUP, Engine, StepResult
from detector.events import DeadLetter, EventBatch, Position
from detector.sinks import ErrorFile, open_table_writer
from detector.sources import Chunk


@dataclass
class ReplaySummary:
    scored: int = 0
    warmup: int = 0
    invalid: int = 0
    alerts: int = 0
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def events(self) -> int:
        return self.scored + self.warmup + self.invalid

    def to_dict(self) -> dict:
        return {
            "events": self.events,
            "scored": self.scored,
            "warmup": self.warmup,
            "invalid": self.invalid,
            "alerts": self.alerts,
            "invalid_reasons": dict(self.reasons),
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.events / self.seconds) if self.seconds > 0 else None,
        }


@dataclass
class Step:
    """One replayed micro-batch: the valid events as a batch, the engine's verdict on each,
    and every record that could not be scored (decode failures and refused streams)."""

    batch: EventBatch
    positions: list[Position]
    result: StepResult
    invalid: list[DeadLetter]

    @property
    def kept(self) -> np.ndarray:
        """Rows of the batch that were scored or warming up (not refused)."""
        return np.flatnonzero(self.result.outcome != REJECTED)


def replay(
    chunks: Iterable[Chunk], engine: Engine, summary: ReplaySummary, attr_buckets: int = 1024
) -> Iterator[Step]:
    """Step each chunk through the engine, counting every record in `summary`."""
    started = time.perf_counter()
    for chunk in chunks:
        batch = EventBatch.from_events(chunk.events, engine.n_features, attr_buckets)
        result = engine.step_many(batch)
        invalid = list(chunk.invalid)
        for row in np.flatnonzero(result.outcome == REJECTED):
            invalid.append(
                DeadLetter(
                    reason="streams_full",
                    detail=f"stream {batch.streams[row]!r} is new and max_streams "
                    f"({engine.max_streams}) streams are active",
                    position=chunk.positions[row],
                    payload=batch.streams[row].encode(),
                )
            )
        summary.scored += int(np.count_nonzero(result.outcome == SCORED))
        summary.warmup += int(np.count_nonzero(result.outcome == WARMUP))
        summary.invalid += len(invalid)
        summary.alerts += int(np.count_nonzero(result.is_alert))
        summary.reasons.update(letter.reason for letter in invalid)
        summary.seconds = time.perf_counter() - started
        yield Step(batch, chunk.positions, result, invalid)


def iso_times(ts: np.ndarray) -> list[str]:
    """Epoch seconds -> RFC 3339 UTC strings with milliseconds.

    >>> iso_times(np.array([1795514400.0, 1795514400.25]))
    ['2026-11-24T10:00:00.000Z', '2026-11-24T10:00:00.250Z']
    """
    stamps = np.round(ts * 1000.0).astype("datetime64[ms]")
    return [text + "Z" for text in np.datetime_as_string(stamps, unit="ms").tolist()]


def score_columns(features: list[str]) -> list[str]:
    return ["line", "stream", "ts", "outcome", "score", "is_alert", "error"] + [
        f"expected_{name}" for name in features
    ]


def score_file(
    chunks: Iterable[Chunk],
    engine: Engine,
    features: list[str],
    output: Path,
    errors: Path,
    attr_buckets: int = 1024,
) -> ReplaySummary:
    """Score every record into `output` (one row per valid event) and `errors` (the rest)."""
    summary = ReplaySummary()
    outcome_names = np.array(OUTCOMES)
    with open_table_writer(output, score_columns(features)) as table, ErrorFile(errors) as bad:
        for step in replay(chunks, engine, summary, attr_buckets):
            bad.add_many(step.invalid)
            rows = step.kept
            if not len(rows):
                continue
            result = step.result
            columns = {
                "line": [step.positions[i].offset for i in rows],
                "stream": [step.batch.streams[i] for i in rows],
                "ts": iso_times(step.batch.ts[rows]),
                "outcome": outcome_names[result.outcome[rows]].tolist(),
                "score": result.score[rows],
                "is_alert": result.is_alert[rows],
                "error": result.error[rows],
            }
            for j, name in enumerate(features):
                columns[f"expected_{name}"] = result.expected[rows, j]
            table.write_many(columns)
    return summary
