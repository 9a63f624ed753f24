"""Per-stream online normalisation of raw feature values, so one model serves streams of any scale.

Statistics are a running mean and variance that start as exact cumulative moments (Welford) and
become exponentially weighted over `window` events, so they follow slow drift. The value is
normalised with the statistics from *before* it, which keeps everything causal; training applies
the very same functions along each sequence, so the model sees what the engine will feed it.

>>> import torch
>>> mean, var, count = torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1)
>>> for value in [10.0, 12.0, 8.0, 10.0]:
...     z = normalise(torch.tensor([[value]]), mean, scale(mean, var), count)
...     mean, var = update(torch.tensor([[value]]), mean, var, count, window=100.0)
...     count = count + 1
>>> round(float(mean), 3), round(float(var), 3)
(10.0, 2.0)
"""

from __future__ import annotations

import torch

Z_CLIP = 10.0  # the model's inputs are clipped here: one wild value must not wreck the state
Z_LIMIT = 1e4  # normalised values themselves (the error's target) only avoid overflow
_REL_FLOOR = 1e-6  # sd floor relative to the mean, for constant streams


def scale(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """The standard deviation used to normalise, floored for constant streams."""
    return torch.sqrt(var + (_REL_FLOOR * mean).square() + 1e-12)


def normalise(
    x: torch.Tensor, mean: torch.Tensor, sd: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """x, mean, sd = scale(mean, var) (B, F) and count (B,) -> z (B, F); a stream's first value
    maps to 0. Feed the model `z.clamp(-Z_CLIP, Z_CLIP)`; score errors against z itself."""
    z = ((x - mean) / sd).clamp(-Z_LIMIT, Z_LIMIT)
    return z.masked_fill(count.unsqueeze(1) == 0, 0.0)


def update(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, window: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold x (B, F) into the statistics of streams that have seen `count` (B,) values."""
    alpha = torch.clamp(1.0 / (count + 1.0), min=1.0 / window).unsqueeze(1)  # (B, 1)
    delta = x - mean
    new_mean = mean + alpha * delta
    new_var = (1.0 - alpha) * (var + alpha * delta.square())
    return new_mean, new_var

