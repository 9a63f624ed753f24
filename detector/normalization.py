"""Per-stream online normalisation of raw feature values, so one model serves streams of any scale.

Statistics are a running mean and variance that start as exact cumulative moments (Welford) and
become exponentially weighted over `window` events, so they follow slow drift. A value is
normalised with the statistics from *before* it, which keeps everything causal. The engine's
kernel and `normalise_sequences` (training) call the same compiled functions, so the model is
trained on exactly what the engine will feed it.

>>> import numpy as np
>>> values = np.array([[[10.0], [12.0], [8.0], [10.0], [13.0]]], dtype=np.float32)  # (S, T, F)
>>> [round(float(z), 3) for z in normalise_sequences(values, np.array([5]), window=100.0)[0, :, 0]]
[0.0, 10.0, -3.0, 0.0, 2.121]
"""

from __future__ import annotations

import math

import numba
import numpy as np

Z_CLIP = 10.0  # the model's inputs are clipped here: one wild value must not wreck the state
Z_LIMIT = 1e4  # normalised values themselves (the error's target) only avoid overflow
REL_FLOOR = 1e-6  # sd floor relative to the mean, for constant streams


def symlog(x: np.ndarray) -> np.ndarray:
    """sign(x) * log(1 + |x|): a log scale for heavy-tailed features (amounts, counts, byte
    rates) that is defined everywhere and close to x near 0. A payment 10x the usual one is then
    a fixed step, whatever the account's usual amount, and the forecast's errors are near
    Gaussian where on the raw scale a few large normal payments would dominate them."""
    return np.sign(x) * np.log1p(np.abs(x))


def symexp(y: np.ndarray) -> np.ndarray:
    """The inverse of `symlog`."""
    return np.sign(y) * np.expm1(np.abs(y))


@numba.njit(cache=True, inline="always")
def scale(mean: float, var: float) -> float:
    """The standard deviation used to normalise, floored for constant streams."""
    return math.sqrt(var + (REL_FLOOR * mean) ** 2 + 1e-12)


@numba.njit(cache=True, inline="always")
def normalise(x: float, mean: float, var: float, count: float) -> float:
    """z of x under the statistics of `count` earlier values; a stream's first value maps to 0."""
    if count == 0:
        return 0.0
    return min(max((x - mean) / scale(mean, var), -Z_LIMIT), Z_LIMIT)


@numba.njit(cache=True, inline="always")
def update(x: float, mean: float, var: float, count: float, window: float) -> tuple[float, float]:
    """Fold x into the statistics of a stream that has seen `count` values."""
    alpha = max(1.0 / (count + 1.0), 1.0 / window)
    delta = x - mean
    return mean + alpha * delta, (1.0 - alpha) * (var + alpha * delta * delta)


@numba.njit(cache=True)
def normalise_sequences(values: np.ndarray, lengths: np.ndarray, window: float) -> np.ndarray:
    """Causally normalise padded sequences (S, T, F) as the engine does event by event; the
    result is clipped to +-Z_CLIP like the model's inputs (padding stays 0)."""
    n, steps, f = values.shape
    out = np.zeros_like(values)
    for i in range(n):
        for j in range(f):
            mean, var = 0.0, 0.0
            for t in range(lengths[i]):
                x = values[i, t, j]
                z = normalise(x, mean, var, t)
                out[i, t, j] = min(max(z, -Z_CLIP), Z_CLIP)
                mean, var = update(x, mean, var, t, window)
    return out
