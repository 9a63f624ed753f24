"""Engine throughput and per-stream memory, against the bare batched recurrent step.

    .venv/bin/python bench/engine.py [--runs 5] [--streams 100000] [--batch 4096]

Throughput: engine + scorer alone (string stream ids in, scores and alert decisions out),
hidden 64, 4 features, batches of `--batch` events over `--streams` streams that each have
`HISTORY` events behind them (so every timed event is scored in full), their ids fresh strings
as the worker's decoder makes them. In the same run, the bare step: `GRUCell` + output head on
a contiguous batch of the same size, no lookup, gather/scatter or scoring: the physical limit.
The engine steps its GRU with `detector.fused_gru` (faster than `GRUCell`), so the same bare step
with that cell is timed too, and the ratio to it reported beside the first.
Memory: process RSS growth while 1,000,000 streams are admitted, divided by the streams (the slot
table, its string keys and the slabs included). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import numpy as np
import orjson
import torch

from detector.allocator import keep_freed_memory
from detector.engine import Engine
from detector.events import EventBatch
from detector.fused_gru import gru_step
from detector.model import Forecaster, ForecasterConfig

HIDDEN, FEATURES = 64, 4
# Events each stream has seen before the timed part: past the scorer's warm-up (30 events), the
# smoothed level's window (40) and records (60), so that every timed event is scored in full.
HISTORY = 60


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def make_batches(n_batches: int, batch: int, streams: list[str], seed: int) -> list[EventBatch]:
    """Batches of random events over `streams`, their ids fresh string objects per batch, as the
    worker's decoder makes them (`orjson.loads` of each record): no hash cached on them yet, and
    a batch's ids side by side in memory, not spread over the process like long-lived ones."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_batches):
        pick = rng.integers(0, len(streams), batch)
        out.append(
            EventBatch(
                streams=orjson.loads(orjson.dumps([streams[i] for i in pick])),
                ts=np.full(batch, 1.7e9 + k, dtype=np.float64),
                values=rng.standard_normal((batch, FEATURES)).astype(np.float32),
                attrs=np.zeros((batch, 0), dtype=np.int64),
            )
        )
    return out


def engine_rate(model: Forecaster, n_streams: int, batch: int, n_batches: int) -> float:
    streams = [f"sensor-{i:07d}" for i in range(n_streams)]
    engine = Engine(model, initial_capacity=n_streams)
    rng = np.random.default_rng(0)
    for step in range(HISTORY):  # every stream's history, a batch of distinct streams at a time
        for i in range(0, n_streams, batch):
            ids = streams[i : i + batch]
            engine.step_many(
                EventBatch(
                    streams=ids,
                    ts=np.full(len(ids), 1.6e9 + step),
                    values=rng.standard_normal((len(ids), FEATURES)).astype(np.float32),
                    attrs=np.zeros((len(ids), 0), dtype=np.int64),
                )
            )
    batches = make_batches(n_batches, batch, streams, seed=1)
    engine.step_many(batches[0])
    started = time.perf_counter()
    for b in batches:
        result = engine.step_many(b)
    elapsed = time.perf_counter() - started
    assert result.score.shape == (batch,) and result.is_alert.dtype == np.bool_
    return n_batches * batch / elapsed


@torch.inference_mode()
def bare_rate(batch: int, n_batches: int, fused: bool = False) -> float:
    """`GRUCell` + head on a contiguous batch; with `fused`, the engine's own GRU step instead
    of `GRUCell` (the same arithmetic, its gates in one compiled pass)."""
    cell = torch.nn.GRUCell(FEATURES, HIDDEN)
    head = torch.nn.Linear(HIDDEN, 2 * FEATURES)
    weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)

    def step(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return gru_step(x, h, *weights) if fused else cell(x, h)

    x, h = torch.randn(batch, FEATURES), torch.zeros(batch, HIDDEN)
    for _ in range(5):
        h = step(x, h)
        head(h)
    started = time.perf_counter()
    for _ in range(n_batches):
        h = step(x, h)
        head(h)
    return n_batches * batch / (time.perf_counter() - started)


def state_bytes_per_stream(model: Forecaster, n_streams: int, batch: int) -> float:
    engine = Engine(model)
    values = np.zeros((batch, FEATURES), dtype=np.float32)
    no_attrs = np.zeros((batch, 0), dtype=np.int64)
    ts = np.full(batch, 1.7e9)
    before = rss_bytes()
    for start in range(0, n_streams, batch):
        n = min(batch, n_streams - start)
        ids = [f"sensor-{i:07d}" for i in range(start, start + n)]
        engine.step_many(EventBatch(ids, ts[:n], values[:n], no_attrs[:n]))
    grown = rss_bytes() - before
    assert engine.active_streams == n_streams
    return grown / n_streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--memory-streams", type=int, default=1_000_000)
    args = parser.parse_args()

    keep_freed_memory()  # what the engine sets for itself: the bare step gets it from its first run
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_features=FEATURES, hidden_size=HIDDEN)).eval()
    engine_runs, bare_runs, fused_runs = [], [], []
    for run in range(args.runs):
        bare_runs.append(bare_rate(args.batch, args.batches))
        fused_runs.append(bare_rate(args.batch, args.batches, fused=True))
        engine_runs.append(engine_rate(model, args.streams, args.batch, args.batches))
        print(
            f"run {run + 1}: engine {engine_runs[-1]:,.0f} events/s, bare step "
            f"{bare_runs[-1]:,.0f} events/s, ratio {engine_runs[-1] / bare_runs[-1]:.2f}; "
            f"bare fused step {fused_runs[-1]:,.0f} events/s, "
            f"ratio {engine_runs[-1] / fused_runs[-1]:.2f}",
            file=sys.stderr,
        )
    memory = state_bytes_per_stream(model, args.memory_streams, args.batch)
    print(
        f"state: {memory:,.0f} bytes per stream at {args.memory_streams:,} streams", file=sys.stderr
    )
    ratios = [e / b for e, b in zip(engine_runs, bare_runs, strict=True)]
    fused_ratios = [e / b for e, b in zip(engine_runs, fused_runs, strict=True)]
    print(
        json.dumps(
            {
                "events_per_s": round(statistics.median(engine_runs)),
                "bare_step_events_per_s": round(statistics.median(bare_runs)),
                "ratio_median": round(statistics.median(ratios), 3),
                "bare_fused_step_events_per_s": round(statistics.median(fused_runs)),
                "ratio_to_fused_median": round(statistics.median(fused_ratios), 3),
                "state_bytes_per_stream": round(memory),
                "runs": args.runs,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
