"""The streaming engine: per-stream state in preallocated slabs, stepped a micro-batch at a time.

A slot table maps each stream id to a row of three slabs: the recurrent state (a float32 tensor,
contiguous for the matrix products), the statistics (float32: event count, normalisation, score
statistics; see `Scorer`) and the clocks (float64: last event time, cooldown end). A batch is
scored in waves: wave k holds the k-th event of every stream in the batch, so a stream with several
events is stepped in order. A wave is one gather of recurrent states, one batched forecast, one
compiled pass of the scorer over the statistics rows (in place; it reads the wave's events from
the batch's columns and writes their verdicts into the batch's result rows, so a later wave
costs no gather or scatter of its own) and one batched recurrent step that writes the new
states back into the slab: no per-event Python. A GRU's wave of fewer than `SMALL_WAVE` events
(most batches' second and third) runs the same compiled passes in one call (`fused_wave`),
without the Python and torch dispatch between them that costs a small wave more than its
arithmetic.
Every row is computed from its own stream's state only, which is why a stream gets the same scores
whether its events come one by one or in big mixed batches.

>>> import numpy as np, torch
>>> from detector.model import Forecaster, ForecasterConfig
>>> from detector.events import EventBatch
>>> torch.manual_seed(0) and None
>>> engine = Engine(Forecaster(ForecasterConfig(n_features=1, hidden_size=8)).eval(),
...                 scorer=Scorer(threshold=0.9999, warmup_events=3))
>>> batch = EventBatch(streams=["a", "b", "a", "a", "a"], ts=np.arange(5.0),
...                    values=np.array([[1.0], [5.0], [1.1], [0.9], [50.0]], dtype=np.float32),
...                    attrs=np.zeros((5, 0), dtype=np.int64))
>>> result = engine.step_many(batch)
>>> [OUTCOMES[o] for o in result.outcome]
['warmup', 'warmup', 'warmup', 'warmup', 'scored']
>>> engine.active_streams, bool(result.score[4] > 0.99)
(2, True)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numba
import numpy as np
import torch

from detector.allocator import keep_freed_memory
from detector.events import EventBatch
from detector.fused_wave import SMALL_WAVE, GruWeights, step_wave
from detector.model import Forecaster
from detector.normalization import symexp, symlog
from detector.scoring import Calibration, Scorer, Scores
from detector.slots import SlotTable

SCORED, WARMUP, REJECTED = 0, 1, 2
OUTCOMES = ("scored", "warmup", "rejected")  # indexed by the codes above
LAST_TS, COOLDOWN_UNTIL = 0, 1  # columns of the float64 slab ("clocks")
CLOCKS = 2


@dataclass
class StepResult:
    """One row per event of the batch, in the batch's order."""

    outcome: np.ndarray  # (N,) int8: SCORED, WARMUP or REJECTED (max_streams full)
    score: np.ndarray  # (N,) float64 anomaly score (probability where it is news); 0 unless scored
    is_alert: np.ndarray  # (N,) bool
    probability: np.ndarray  # (N,) float64 calibrated anomaly probability; 0 unless scored
    details: np.ndarray  # (N, 1 + 2F + A) float32: error | expected (F) | contributions (F + A)
    n_features: int  # F

    @property
    def error(self) -> np.ndarray:
        """(N,) mean squared normalised residual."""
        return self.details[:, 0]

    @property
    def expected(self) -> np.ndarray:
        """(N, F) the forecast mean, in the features' own units."""
        return self.details[:, 1 : 1 + self.n_features]

    @property
    def contributions(self) -> np.ndarray:
        """(N, F + A) each feature's and then each attr's share of the evidence; rows sum to 1."""
        return self.details[:, 1 + self.n_features :]


@dataclass
class Snapshot:
    """The state of a set of streams, as rows of the engine's slabs."""

    streams: list[str]
    rows32: torch.Tensor  # (S, width32): recurrent state, then statistics
    rows64: torch.Tensor  # (S, 2): last event time, cooldown end


@numba.njit(cache=True)
def _wave_ranks(slots: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Each row's position among its stream's rows in the batch (-1 where refused); `seen` is
    scratch indexed by slot, zero on entry and on exit."""
    rank = np.empty(len(slots), dtype=np.int64)
    for i in range(len(slots)):
        if slots[i] < 0:
            rank[i] = -1
        else:
            rank[i] = seen[slots[i]]
            seen[slots[i]] += 1
    for i in range(len(slots)):
        if slots[i] >= 0:
            seen[slots[i]] = 0
    return rank


class Engine:
    def __init__(
        self,
        model: Forecaster,
        *,
        scorer: Scorer | None = None,
        initial_capacity: int = 1024,
        max_streams: int = 1_000_000,
        stream_ttl_seconds: float = math.inf,
    ) -> None:
        keep_freed_memory()
        self.model = model.eval()
        self.scorer = scorer or Scorer(threshold=0.9999)
        self.n_features = model.config.n_features
        self.n_attrs = model.config.n_attrs
        self._log_scale = np.array(model.config.log_scale, dtype=np.int64)
        self.max_streams = max_streams
        self.stream_ttl_seconds = stream_ttl_seconds
        self.evictions = 0
        self.watermark = -math.inf  # latest event time seen

        layers, size = model.config.num_layers, model.state_size
        self._state_shape = (layers, size)
        self._hidden_width = layers * size
        self._initial_row = self.scorer.initial_row(self.n_features, self.n_attrs)
        self.width32 = self._hidden_width + len(self._initial_row)

        capacity = min(initial_capacity, max_streams)
        self._hidden = torch.zeros(capacity, self._hidden_width)
        self._stats = np.zeros((capacity, len(self._initial_row)), dtype=np.float32)
        self._clocks = np.zeros((capacity, CLOCKS), dtype=np.float64)
        self._table = SlotTable(2 * capacity)
        self._seen = np.zeros(capacity, dtype=np.int32)  # scratch for _wave_ranks
        # A GRU's small waves run as one compiled call (fused_wave), with copies of its weights.
        self._gru = GruWeights.of(self.model) if model.config.cell == "gru" else None

    @classmethod
    def from_config(cls, model: Forecaster, config, calibration: Calibration) -> Engine:
        """Build from the `scoring` and `engine` sections of a detector.config.Config."""
        s, e = config.scoring, config.engine
        scorer = Scorer(
            s.threshold,
            tuple(s.windows),
            s.long_window,
            calibration,
            s.novelty_window,
            warmup_events=s.warmup_events,
            cooldown_seconds=s.cooldown_seconds,
            norm_window=s.norm_window,
        )
        return cls(
            model,
            scorer=scorer,
            initial_capacity=e.initial_capacity,
            max_streams=e.max_streams,
            stream_ttl_seconds=e.stream_ttl_seconds,
        )

    @property
    def active_streams(self) -> int:
        return len(self._table)

    @property
    def capacity(self) -> int:
        return self._hidden.shape[0]

    # ---- slot table -------------------------------------------------------------------------

    def _grow(self) -> None:
        capacity = min(2 * self.capacity, self.max_streams)

        hidden = self._hidden.new_zeros(capacity, self._hidden_width)
        hidden[: self._hidden.shape[0]] = self._hidden
        self._hidden = hidden
        self._seen = np.zeros(capacity, dtype=np.int32)
        for name in ("_stats", "_clocks"):
            old = getattr(self, name)
            new = np.zeros((capacity, old.shape[1]), dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def _admit(self, stream: str, now: float, busy: list[int]) -> int:
        """A slot for a new stream, or -1 when max_streams is full and nothing idle can go.

        `busy` holds the slots the current batch already uses (-1 where none): never evicted.
        """
        if len(self._table) >= self.max_streams and not self.evict_idle(
            now, keep=[s for s in busy if s >= 0]
        ):
            return -1
        slot = self._table.add(stream)
        if slot >= self.capacity:
            self._grow()
        return slot

    def evict_idle(self, now: float, keep: Iterable[int] = ()) -> int:
        """Free every stream idle (in event time) longer than the TTL; returns how many."""
        used = self._table.used
        idle = (now - self._clocks[:used, LAST_TS]) > self.stream_ttl_seconds
        for slot in keep:
            idle[slot] = False
        evicted = 0
        for slot in np.flatnonzero(idle).tolist():
            stream = self._table.stream_at(slot)
            if stream is not None:
                self._table.remove(stream)
                evicted += 1
        self.evictions += evicted
        return evicted

    def _lookup(self, batch: EventBatch) -> np.ndarray:
        found = self._table.lookup_many(batch.streams)
        if (found < 0).any():
            slots = found.tolist()
            fresh = []
            for i in np.flatnonzero(found < 0).tolist():
                stream = batch.streams[i]
                slot = self._table.get(stream)  # admitted earlier in this batch?
                if slot is None:
                    now = max(self.watermark, float(batch.ts[i]))
                    slot = self._admit(stream, now, busy=slots)
                    if slot >= 0:
                        fresh.append((slot, float(batch.ts[i])))
                slots[i] = slot
            if fresh:
                index = np.array([slot for slot, _ in fresh])
                self._hidden[torch.from_numpy(index)] = 0.0
                self._stats[index] = self._initial_row
                self._clocks[index] = [[ts, -math.inf] for _, ts in fresh]
            found = np.asarray(slots, dtype=np.int64)
        return found

    # ---- stepping ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step_many(self, batch: EventBatch) -> StepResult:
        n = len(batch)
        slots = self._lookup(batch)
        scores = Scores.empty(n, self.n_features, self.n_attrs)
        values, logged = batch.values, self._log_scale
        if len(logged):  # the model's scale in, the features' own units out
            values = values.copy()
            values[:, logged] = symlog(values[:, logged])
        for rows in self._waves(slots):
            self._step_wave(rows, slots[rows], values, batch, scores)
        if len(logged):
            scores.details[:, 1 + logged] = symexp(scores.details[:, 1 + logged])
        outcome = np.where(scores.warm, WARMUP, SCORED).astype(np.int8)
        outcome[slots < 0] = REJECTED
        if n:
            self.watermark = max(self.watermark, float(batch.ts.max()))
        return StepResult(
            outcome,
            scores.score,
            scores.alert,
            scores.probability,
            scores.details,
            self.n_features,
        )

    def _waves(self, slots: np.ndarray) -> list[np.ndarray]:
        """Row indices of each wave: wave k holds every stream's k-th event, in batch order."""
        rank = _wave_ranks(slots, self._seen)
        waves = int(rank.max(initial=-1)) + 1
        if waves == 1 and rank.min() == 0:
            return [np.arange(len(slots))]
        return [np.flatnonzero(rank == k) for k in range(waves)]

    def _step_wave(
        self,
        rows: np.ndarray,
        slot: np.ndarray,
        values: np.ndarray,
        batch: EventBatch,
        scores: Scores,
    ) -> None:
        """The events at `rows` of the batch, one for each of B distinct streams (`slot`): score
        them into `scores`, then fold them into the state. `values` are the batch's, on the
        model's scale. A GRU's small wave runs as one compiled call (`fused_wave`)."""
        if self._gru is not None and len(rows) < SMALL_WAVE:
            step_wave(
                rows, slot, values, batch.attrs, batch.ts, self._hidden.numpy(), self._stats,
                self._clocks, self._gru, self.scorer.kernel_parameters(self.n_attrs), scores,
            )  # fmt: skip
            return
        index = torch.from_numpy(slot)
        state = self._hidden.index_select(0, index).view(-1, *self._state_shape)  # (B, L, S)
        attrs_t = torch.from_numpy(batch.attrs[rows]) if self.n_attrs else None
        forecast, logvar = self.model.predict(state, attrs_t)  # (B, F) each
        model_input = self.scorer.score_wave(
            rows, slot, values, batch.attrs, batch.ts, forecast.numpy(), logvar.numpy(),
            self._stats, self._clocks, scores,
        )  # fmt: skip
        self.model.step_into(torch.from_numpy(model_input), attrs_t, state, self._hidden, index)

    def warm_up(self) -> float:
        """Compile the kernels this engine runs, on a throwaway engine with the same model and
        scorer (this engine's state is untouched); returns the seconds it took. numba keeps them
        in its on-disk cache, so only the first process after an install pays (about a minute on
        2 cores): a worker does it before it joins its group, so that it never holds partitions
        it cannot serve yet."""
        started = time.perf_counter()
        scratch = Engine(self.model, scorer=self.scorer, initial_capacity=2)
        # A wave as large as SMALL_WAVE (the batched path), then the first stream's second event
        # (a small wave's compiled call).
        streams = [f"warm-up-{i}" for i in range(SMALL_WAVE)]
        streams.append(streams[0])
        n = len(streams)
        scratch.step_many(
            EventBatch(
                streams,
                np.zeros(n),
                np.zeros((n, self.n_features), dtype=np.float32),
                np.zeros((n, self.n_attrs), dtype=np.int64),
            )
        )
        return time.perf_counter() - started

    # ---- snapshots --------------------------------------------------------------------------

    def snapshot(self, streams: Iterable[str] | None = None) -> Snapshot:
        """Copy the state of the given streams (default: all) that the engine holds."""
        table = self._table
        names = table.names() if streams is None else [s for s in streams if s in table]
        index = np.array([table.get(s) for s in names], dtype=np.int64)
        hidden = self._hidden[torch.from_numpy(index)]
        rows32 = torch.cat([hidden, torch.from_numpy(self._stats[index])], dim=1)
        return Snapshot(names, rows32, torch.from_numpy(self._clocks[index]))

    def restore(self, snapshot: Snapshot) -> None:
        """Take over the streams of a snapshot, replacing any state held for them."""
        if snapshot.rows32.shape[1:] != (self.width32,) or snapshot.rows64.shape[1:] != (CLOCKS,):
            raise ValueError(
                f"snapshot rows hold {snapshot.rows32.shape[1]} floats, this engine's "
                f"{self.width32}: it was taken with another model layout"
            )
        slots: list[int] = []
        for stream in snapshot.streams:
            slot = self._table.get(stream)
            if slot is None:
                slot = self._admit(stream, self.watermark, busy=slots)
                if slot < 0:
                    raise ValueError("max_streams is too small to restore this snapshot")
            slots.append(slot)
        index = np.array(slots, dtype=np.int64)
        self._hidden[torch.from_numpy(index)] = snapshot.rows32[:, : self._hidden_width]
        self._stats[index] = snapshot.rows32[:, self._hidden_width :].numpy()
        self._clocks[index] = snapshot.rows64.numpy()
        if len(snapshot.streams):
            self.watermark = max(self.watermark, float(snapshot.rows64[:, LAST_TS].max()))

    def forget(self, streams: Iterable[str]) -> None:
        """Drop streams (e.g. on partition revoke, after their snapshot was handed over)."""
        for stream in streams:
            self._table.remove(stream)
