"""Offline training: history files -> per-stream sequences -> a forecaster artifact.

Each stream's events are ordered by time and normalised causally with the engine's own online
statistics. The first part of every stream (in time) trains, the rest validates. Training is
truncated backpropagation through time: streams are batched (padded, with a mask, so streams of
any length are used whole), cut into windows of `train.window` steps, and the recurrent state is
carried from one window to the next but detached. The loss is the Gaussian negative
log-likelihood of the next step; gradients are clipped, weights decayed, and training stops early
when the validation loss has not improved for `train.patience` epochs. The best epoch's weights are
kept, and the surprise statistics of the validation residuals become the scorer's calibration prior.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from detector import normalization
from detector.config import Config
from detector.errors import InputError
from detector.events import Schema, hash_attr
from detector.model import Forecaster, ForecasterConfig
from detector.scoring import Calibration, surprise
from detector.sources import FileSource, first_record

QUANTILES = (0.5, 0.9, 0.99, 0.999, 0.9999)


@dataclass
class StreamHistory:
    name: str
    values: np.ndarray  # (T, F) float32, time-ordered
    attrs: np.ndarray  # (T, A) int64 hash buckets


@dataclass
class History:
    streams: list[StreamHistory]
    features: list[str]
    attrs: list[str] = field(default_factory=list)
    events: int = 0
    invalid: int = 0


@dataclass
class FitResult:
    model: Forecaster
    calibration: Calibration
    metrics: dict[str, float]


def infer_features(path: Path, schema: Schema) -> list[str]:
    """Numeric feature names from a file's first record: CSV columns or JSON `values` keys."""
    record = first_record(path)
    if record is None:
        raise InputError(f"{path}: no records to infer features from; pass --features")
    nested = record.get("values")
    values: dict = nested if isinstance(nested, dict) else record
    skip = {schema.stream_field, schema.time_field, "attrs", *schema.attrs}
    names = []
    for key, value in values.items():
        if key in skip:
            continue
        try:
            float(value)
        except (TypeError, ValueError):
            continue
        names.append(key)
    if not names:
        raise InputError(f"{path}: no numeric columns besides stream and time; pass --features")
    return names


def load_history(paths: Sequence[Path], schema: Schema, attr_buckets: int) -> History:
    """Read files into per-stream time-ordered arrays; invalid rows are counted and skipped."""
    rows: dict[str, list] = defaultdict(list)
    events = invalid = 0
    for path in paths:
        for chunk in FileSource(path, schema, batch_size=65536):
            invalid += len(chunk.invalid)
            events += len(chunk.events)
            for event in chunk.events:
                rows[event.stream].append(event)
    streams = []
    for name, stream_events in rows.items():
        stream_events.sort(key=lambda e: e.ts)  # stable: file order breaks ties
        values = np.array([e.values for e in stream_events], dtype=np.float32)
        attrs = np.array(
            [[hash_attr(a, attr_buckets) for a in e.attrs] for e in stream_events], dtype=np.int64
        ).reshape(len(stream_events), len(schema.attrs))
        streams.append(StreamHistory(name, values, attrs))
    return History(streams, list(schema.features), list(schema.attrs), events, invalid)


def _pad(
    history: History, window: float, log_scale: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s.values) for s in history.streams])
    steps, f, a = int(lengths.max()), len(history.features), len(history.attrs)
    values = torch.zeros(len(history.streams), steps, f)
    attrs = torch.zeros(len(history.streams), steps, a, dtype=torch.int64)
    for i, stream in enumerate(history.streams):
        values[i, : len(stream.values)] = torch.from_numpy(stream.values)
        attrs[i, : len(stream.attrs)] = torch.from_numpy(stream.attrs)
    logged = list(log_scale)
    values[:, :, logged] = torch.from_numpy(normalization.symlog(values[:, :, logged].numpy()))
    z = normalization.normalise_sequences(values.numpy(), lengths.numpy(), window)
    return torch.from_numpy(z), attrs, lengths


def forecaster_config(
    config: Config, features: Sequence[str], attrs: Sequence[str], **overrides: Any
) -> ForecasterConfig:
    """The architecture of the `model` config section for these features and attrs."""
    m = config.model
    unknown = [name for name in m.log_features if name not in features]
    if unknown:
        raise InputError(
            f"model.log_features: {unknown} are not features of this model "
            f"({', '.join(features)}); list only features"
        )
    settings: dict[str, Any] = {
        "n_features": len(features),
        "cell": m.cell,
        "hidden_size": m.hidden_size,
        "num_layers": m.num_layers,
        "dropout": m.dropout,
        "n_attrs": len(attrs),
        "attr_buckets": m.attr_buckets,
        "attr_dim": m.attr_dim,
        "log_scale": tuple(list(features).index(name) for name in m.log_features),
    }
    return ForecasterConfig(**(settings | overrides))


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-element negative log-likelihood (without the constant), (B, T, F)."""
    return 0.5 * (logvar + (target - mean).square() * torch.exp(-logvar))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).expand_as(values).float()
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def fit(
    history: History,
    model_config: ForecasterConfig,
    config: Config,
    *,
    epochs: int | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> FitResult:
    """Train a forecaster on the history; see the module docstring for the procedure."""
    train_cfg = config.train
    epochs = epochs or train_cfg.epochs
    seed = train_cfg.seed if seed is None else seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if not history.streams:
        raise InputError("no valid events to train on")

    z, attrs, lengths = _pad(history, config.scoring.norm_window, model_config.log_scale)
    split = (lengths.float() * (1.0 - train_cfg.validation_fraction)).floor().long()  # (S,)
    steps = z.shape[1]
    time = torch.arange(steps)
    # Target t+1 is learnable when it exists and lies in the training part of its stream.
    train_mask = time.unsqueeze(0) + 1 < split.unsqueeze(1)  # (S, T)
    val_mask = (time.unsqueeze(0) + 1 >= split.unsqueeze(1)) & (
        time.unsqueeze(0) + 1 < lengths.unsqueeze(1)
    )
    if not val_mask.any():
        raise InputError("the history is too short to hold out validation data; add events")

    model = Forecaster(model_config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay
    )
    window, group = train_cfg.window, train_cfg.batch_streams
    n_streams = z.shape[0]
    windows_per_group = math.ceil(int(split.max()) / window)
    total = epochs * math.ceil(n_streams / group) * windows_per_group
    bar = tqdm(total=total, desc="training", unit="window", disable=not progress, file=sys.stderr)
    best_loss, best_state, best_epoch, stale = math.inf, None, 0, 0
    train_loss = math.nan
    epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(n_streams)
        losses = []
        for start in range(0, n_streams, group):
            idx = torch.from_numpy(order[start : start + group])
            state = None
            span = int(split[idx].max())
            for begin in range(0, span - 1, window):
                end = min(begin + window, steps - 1)
                x = z[idx, begin:end]
                target = z[idx, begin + 1 : end + 1]
                mask = train_mask[idx, begin:end]
                step_attrs = attrs[idx, begin:end] if history.attrs else None
                next_attrs = attrs[idx, begin + 1 : end + 1] if history.attrs else None
                mean, logvar, state = model(x, step_attrs, state, next_attrs)
                state = state.detach()
                if not mask.any():
                    continue
                loss = _masked_mean(gaussian_nll(mean, logvar, target), mask)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
                optimizer.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", best=f"{best_loss:.3f}")
        train_loss = float(np.mean(losses)) if losses else math.nan
        val_loss = _validation_loss(model, z, attrs if history.attrs else None, val_mask)
        if val_loss < best_loss - 1e-4:
            best_loss, best_epoch, stale = val_loss, epoch, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= train_cfg.patience:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    calibration = replace(
        _calibrate(model, z, attrs if history.attrs else None, val_mask),
        new_value_rates=new_value_rates(history, config.scoring.warmup_events),
        value_streams=value_streams(history),
        attr_buckets=model_config.attr_buckets,
    )
    metrics = {
        "train_nll": train_loss,
        "val_nll": best_loss,
        "best_epoch": best_epoch,
        "epochs_run": epoch,
    }
    return FitResult(model, calibration, metrics)


@torch.no_grad()
def _forecast(model: Forecaster, z: torch.Tensor, attrs: torch.Tensor | None):
    model.eval()
    if attrs is None:
        mean, logvar, _ = model(z)
    else:  # the last step has no next step: its forecast is dropped, whatever it is told
        mean, logvar, _ = model(z, attrs, None, torch.cat([attrs[:, 1:], attrs[:, -1:]], dim=1))
    return mean[:, :-1], logvar[:, :-1], z[:, 1:]


def _validation_loss(model, z, attrs, val_mask) -> float:
    mean, logvar, target = _forecast(model, z, attrs)
    return float(_masked_mean(gaussian_nll(mean, logvar, target), val_mask[:, :-1]))


def new_value_rates(history: History, warmup: int) -> tuple[float, ...]:
    """Per attr, the fraction of events after a stream's warm-up whose value the stream had not
    shown before (with half an event of prior, so that none seen is not "impossible")."""
    rates = []
    for a in range(len(history.attrs)):
        new = events = 0
        for stream in history.streams:
            column = stream.attrs[:, a].tolist()
            seen = set(column[:warmup])
            for value in column[warmup:]:
                new += value not in seen
                seen.add(value)
            events += max(len(column) - warmup, 0)
        rates.append((new + 0.5) / (events + 1.0))
    return tuple(rates)


def value_streams(history: History) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per attr, (hash bucket, how many streams showed it) for every value in the history."""
    per_attr = []
    for a in range(len(history.attrs)):
        streams: defaultdict[int, int] = defaultdict(int)
        for stream in history.streams:
            for bucket in np.unique(stream.attrs[:, a]).tolist():
                streams[bucket] += 1
        per_attr.append(tuple(sorted(streams.items())))
    return tuple(per_attr)


def _calibrate(model, z, attrs, val_mask) -> Calibration:
    mean, logvar, target = _forecast(model, z, attrs)
    residuals = (target - mean) * torch.exp(-0.5 * logvar)  # (S, T-1, F)
    picked = residuals[val_mask[:, :-1]]  # (N, F)
    s = surprise(picked.square().mean(dim=1).double().numpy())
    return Calibration(
        mean=float(s.mean()),
        var=float(s.var(ddof=1)),
        quantiles=tuple(float(q) for q in np.quantile(s, QUANTILES)),
    )
