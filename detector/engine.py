"""The streaming engine: per-stream state in preallocated slabs, stepped a micro-batch at a time.

A slot table maps each stream id to a row of three slabs: the recurrent state (float32, kept
contiguous for the matrix products), the statistics (float32: event count, normalisation, score
statistics) and the clocks (float64: last event time, cooldown end). A batch is
scored in waves: wave k holds the k-th event of every stream in the batch, so a stream with several
events is stepped in order, and each wave is one gather, one batched model step and one scatter.
Every row is computed from its own stream's state only, which is why a stream gets the same scores
whether its events come one by one or in big mixed batches.

>>> import numpy as np, torch
>>> from detector.model import Forecaster, ForecasterConfig
>>> from detector.events import EventBatch
>>> torch.manual_seed(0) and None
>>> engine = Engine(Forecaster(ForecasterConfig(n_features=1, hidden_size=8)).eval(),
...                 warmup_events=3)
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
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch

from detector import normalization
from detector.events import EventBatch
from detector.model import Forecaster
from detector.scoring import Calibration, Scorer

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
    details: np.ndarray  # (N, 1 + 2F) float32: error | expected | contributions

    @property
    def error(self) -> np.ndarray:
        """(N,) mean squared normalised residual."""
        return self.details[:, 0]

    @property
    def expected(self) -> np.ndarray:
        """(N, F) the forecast mean, in the features' own units."""
        f = (self.details.shape[1] - 1) // 2
        return self.details[:, 1 : 1 + f]

    @property
    def contributions(self) -> np.ndarray:
        """(N, F) each feature's share of the evidence; rows sum to 1."""
        f = (self.details.shape[1] - 1) // 2
        return self.details[:, 1 + f :]


@dataclass
class Snapshot:
    """The state of a set of streams, as rows of the engine's slabs."""

    streams: list[str]
    rows32: torch.Tensor  # (S, width32): recurrent state, then statistics
    rows64: torch.Tensor  # (S, 2): last event time, cooldown end


class Engine:
    def __init__(
        self,
        model: Forecaster,
        *,
        scorer: Scorer | None = None,
        warmup_events: int = 30,
        cooldown_seconds: float = 0.0,
        norm_window: float = 2000.0,
        initial_capacity: int = 1024,
        max_streams: int = 1_000_000,
        stream_ttl_seconds: float = math.inf,
    ) -> None:
        self.model = model.eval()
        self.scorer = scorer or Scorer(threshold=0.9999)
        self.n_features = model.config.n_features
        self.warmup_events = warmup_events
        self.cooldown_seconds = cooldown_seconds
        self.norm_window = norm_window
        self.max_streams = max_streams
        self.stream_ttl_seconds = stream_ttl_seconds
        self.evictions = 0
        self.watermark = -math.inf  # latest event time seen

        layers, size, f = model.config.num_layers, model.state_size, self.n_features
        self._state_shape = (layers, size)
        self._hidden_width = layers * size
        # Statistics columns: count | normalisation mean | variance | score statistics.
        self._mean = slice(1, 1 + f)
        self._var = slice(1 + f, 1 + 2 * f)
        self._stats = slice(1 + 2 * f, 1 + 2 * f + self.scorer.width(f))
        self._init32 = torch.zeros(self._stats.stop)
        self._init32[self._stats] = self.scorer.initial_stats(1, f)[0]
        self.width32 = self._hidden_width + self._stats.stop

        capacity = min(initial_capacity, max_streams)
        self._hidden = torch.zeros(capacity, self._hidden_width)
        self._slab32 = torch.zeros(capacity, self._stats.stop)
        self._slab64 = torch.zeros(capacity, CLOCKS, dtype=torch.float64)
        self._slots: dict[str, int] = {}
        self._ids: list[str | None] = []  # slot -> stream id; None where free
        self._free: list[int] = []

    @classmethod
    def from_config(cls, model: Forecaster, config, calibration: Calibration) -> Engine:
        """Build from the `scoring` and `engine` sections of a detector.config.Config."""
        s, e = config.scoring, config.engine
        return cls(
            model,
            scorer=Scorer(
                s.threshold, tuple(s.windows), s.long_window, calibration, s.novelty_window
            ),
            warmup_events=s.warmup_events,
            cooldown_seconds=s.cooldown_seconds,
            norm_window=s.norm_window,
            initial_capacity=e.initial_capacity,
            max_streams=e.max_streams,
            stream_ttl_seconds=e.stream_ttl_seconds,
        )

    @property
    def active_streams(self) -> int:
        return len(self._slots)

    @property
    def capacity(self) -> int:
        return self._hidden.shape[0]

    # ---- slot table -------------------------------------------------------------------------

    def _grow(self) -> None:
        capacity = min(2 * self.capacity, self.max_streams)

        def grown(slab: torch.Tensor) -> torch.Tensor:
            bigger = slab.new_zeros(capacity, slab.shape[1])
            bigger[: slab.shape[0]] = slab
            return bigger

        self._hidden = grown(self._hidden)
        self._slab32 = grown(self._slab32)
        self._slab64 = grown(self._slab64)

    def _admit(self, stream: str, now: float, busy: list[int]) -> int:
        """A slot for a new stream, or -1 when max_streams is full and nothing idle can go.

        `busy` holds the slots the current batch already uses (-1 where none): never evicted.
        """
        if len(self._slots) >= self.max_streams and not self.evict_idle(
            now, keep=[s for s in busy if s >= 0]
        ):
            return -1
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self._ids)
            if slot >= self.capacity:
                self._grow()
            self._ids.append(None)
        self._slots[stream] = slot
        self._ids[slot] = stream
        return slot

    def evict_idle(self, now: float, keep: Iterable[int] = ()) -> int:
        """Free every stream idle (in event time) longer than the TTL; returns how many."""
        used = len(self._ids)
        idle = (now - self._slab64[:used, LAST_TS]) > self.stream_ttl_seconds
        for slot in keep:
            idle[slot] = False
        evicted = 0
        for slot in idle.nonzero().flatten().tolist():
            stream = self._ids[slot]
            if stream is None:
                continue
            del self._slots[stream]
            self._ids[slot] = None
            self._free.append(slot)
            evicted += 1
        self.evictions += evicted
        return evicted

    def _lookup(self, batch: EventBatch) -> np.ndarray:
        get = self._slots.get
        slots = list(map(get, batch.streams, repeat(-1, len(batch))))
        if -1 in slots:
            fresh = []
            for i, stream in enumerate(batch.streams):
                if slots[i] != -1:
                    continue
                slot = get(stream, -1)
                if slot == -1:
                    now = max(self.watermark, float(batch.ts[i]))
                    slot = self._admit(stream, now, busy=slots)
                    if slot >= 0:
                        fresh.append((slot, float(batch.ts[i])))
                slots[i] = slot
            if fresh:
                index = torch.tensor([slot for slot, _ in fresh])
                self._hidden[index] = 0.0
                self._slab32[index] = self._init32
                self._slab64[index] = torch.tensor(
                    [[ts, -math.inf] for _, ts in fresh], dtype=torch.float64
                )
        return np.asarray(slots, dtype=np.int64)

    # ---- stepping ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step_many(self, batch: EventBatch) -> StepResult:
        n = len(batch)
        slots = self._lookup(batch)
        outcome = np.full(n, SCORED, dtype=np.int8)
        outcome[slots < 0] = REJECTED
        values = torch.from_numpy(batch.values)
        ts = torch.from_numpy(batch.ts)
        attrs = torch.from_numpy(batch.attrs) if batch.attrs.shape[1] else None
        waves = self._waves(slots)
        if len(waves) == 1 and len(waves[0]) == n:  # the common case: n distinct known streams
            score, probability, alert, details, warm = self._step_wave(
                torch.from_numpy(slots), values, ts, attrs
            )
            outcome[warm.numpy()] = WARMUP
        else:
            score = torch.zeros(n, dtype=torch.float64)
            probability = torch.zeros(n, dtype=torch.float64)
            alert = torch.zeros(n, dtype=torch.bool)
            details = torch.zeros(n, 1 + 2 * self.n_features)
            for rows in waves:
                row_index = torch.from_numpy(rows)
                wave_score, wave_probability, wave_alert, wave_details, warm = self._step_wave(
                    torch.from_numpy(slots[rows]),
                    values.index_select(0, row_index),
                    ts.index_select(0, row_index),
                    attrs.index_select(0, row_index) if attrs is not None else None,
                )
                score.index_copy_(0, row_index, wave_score)
                probability.index_copy_(0, row_index, wave_probability)
                alert.index_copy_(0, row_index, wave_alert)
                details.index_copy_(0, row_index, wave_details)
                outcome[rows[warm.numpy()]] = WARMUP
        if n:
            self.watermark = max(self.watermark, float(batch.ts.max()))
        return StepResult(
            outcome, score.numpy(), alert.numpy(), probability.numpy(), details.numpy()
        )

    @staticmethod
    def _waves(slots: np.ndarray) -> list[np.ndarray]:
        """Row indices of each wave: wave k holds every stream's k-th event, in batch order."""
        rows = np.flatnonzero(slots >= 0)
        if len(rows) == 0:
            return []
        order = np.argsort(slots[rows], kind="stable")
        ordered = slots[rows][order]
        first = np.ones(len(ordered), dtype=bool)
        first[1:] = ordered[1:] != ordered[:-1]
        if first.all():
            return [rows]
        positions = np.arange(len(ordered))
        rank_sorted = positions - np.maximum.accumulate(np.where(first, positions, 0))
        rank = np.empty_like(rank_sorted)
        rank[order] = rank_sorted
        return [rows[rank == k] for k in range(int(rank_sorted.max()) + 1)]

    def _step_wave(
        self,
        slot: torch.Tensor,
        x: torch.Tensor,
        ts: torch.Tensor,
        attrs: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        """One event for each of B distinct streams: score it, then fold it into the state."""
        state = self._hidden.index_select(0, slot).view(-1, *self._state_shape)  # (B, L, S)
        rows = self._slab32.index_select(0, slot)  # (B, K)
        clocks = self._slab64.index_select(0, slot)  # (B, 2)
        count = rows[:, 0]  # (B,)
        mean, var, stats = rows[:, self._mean], rows[:, self._var], rows[:, self._stats]

        scale = normalization.scale(mean, var)  # (B, F)
        z = normalization.normalise(x, mean, scale, count)  # (B, F)
        forecast, logvar = self.model.predict(state)  # (B, F)
        residuals = (z - forecast) * torch.exp(-0.5 * logvar)
        result = self.scorer.score(residuals, x, stats, count)
        warm = count < self.warmup_events
        score = result.score.masked_fill(warm, 0.0)
        probability = result.probability.masked_fill(warm, 0.0)
        anomalous = probability >= self.scorer.threshold
        alert = (score >= self.scorer.threshold) & (ts >= clocks[:, COOLDOWN_UNTIL])

        new_state = self.model.step(
            z.clamp(-normalization.Z_CLIP, normalization.Z_CLIP), attrs, state
        )
        new_mean, new_var = normalization.update(x, mean, var, count, self.norm_window)
        # Anomalous values stay out of the normal range; the first two forecasts come from a
        # state that has seen (almost) nothing, so they teach the score statistics nothing.
        keep = anomalous.unsqueeze(1)
        stats_ready = (count >= 2).unsqueeze(1)
        self._hidden.index_copy_(0, slot, new_state.reshape(len(slot), -1))
        new_rows = torch.cat(
            [
                (count + 1.0).unsqueeze(1),
                torch.where(keep, mean, new_mean),
                torch.where(keep, var, new_var),
                torch.where(stats_ready, result.stats, stats),
            ],
            dim=1,
        )
        self._slab32.index_copy_(0, slot, new_rows)
        cooldown = torch.where(alert, ts + self.cooldown_seconds, clocks[:, COOLDOWN_UNTIL])
        self._slab64.index_copy_(0, slot, torch.stack([ts, cooldown], dim=1))
        expected = forecast * scale + mean
        details = torch.cat([result.error.unsqueeze(1), expected, result.contributions], dim=1)
        return score, probability, alert, details, warm

    # ---- snapshots --------------------------------------------------------------------------

    def snapshot(self, streams: Iterable[str] | None = None) -> Snapshot:
        """Copy the state of the given streams (default: all) that the engine holds."""
        names = list(self._slots) if streams is None else [s for s in streams if s in self._slots]
        index = torch.tensor([self._slots[s] for s in names], dtype=torch.int64)
        rows32 = torch.cat([self._hidden[index], self._slab32[index]], dim=1)
        return Snapshot(names, rows32, self._slab64[index].clone())

    def restore(self, snapshot: Snapshot) -> None:
        """Take over the streams of a snapshot, replacing any state held for them."""
        if snapshot.rows32.shape[1:] != (self.width32,) or snapshot.rows64.shape[1:] != (CLOCKS,):
            raise ValueError(
                f"snapshot rows hold {snapshot.rows32.shape[1]} floats, this engine's "
                f"{self.width32}: it was taken with another model layout"
            )
        slots = []
        for stream in snapshot.streams:
            slot = self._slots.get(stream)
            if slot is None:
                slot = self._admit(stream, self.watermark, busy=slots)
                if slot < 0:
                    raise ValueError("max_streams is too small to restore this snapshot")
            slots.append(slot)
        index = torch.tensor(slots, dtype=torch.int64)
        self._hidden[index] = snapshot.rows32[:, : self._hidden_width]
        self._slab32[index] = snapshot.rows32[:, self._hidden_width :]
        self._slab64[index] = snapshot.rows64
        if len(snapshot.streams):
            self.watermark = max(self.watermark, float(snapshot.rows64[:, LAST_TS].max()))

    def forget(self, streams: Iterable[str]) -> None:
        """Drop streams (e.g. on partition revoke, after their snapshot was handed over)."""
        for stream in streams:
            slot = self._slots.pop(stream, None)
            if slot is not None:
                self._ids[slot] = None
                self._free.append(slot)
