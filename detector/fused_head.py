"""The streaming forecast head as one compiled pass: a linear layer, split into mean and clamped
log-variance, written straight into the two contiguous arrays the scorer reads.

The head is a product of (B, I) with an (I, 2F) weight, 2F = 8 for four features: a shape for
which the BLAS call costs more in dispatch and threading than in arithmetic, and whose result
torch would then split, clamp and copy into contiguous halves (four more passes). Here one
numba pass does each row's 2F dot products while the row is in cache; the dot products are
vectorised (the flags below let LLVM reorder a sum), and each row's arithmetic is the same
whatever the batch, so a stream's forecast does not depend on what it was batched with.
Measured alone on 4,096 x 64 -> 8 (2 threads, 200 calls, three repetitions): torch's linear,
chunk, clamp and two contiguous copies 0.27-0.37 ms, this pass 0.15-0.17 ms.

>>> import torch
>>> linear = torch.nn.Linear(6, 4)
>>> x = torch.randn(3, 6)
>>> mean, logvar = linear_head(x, linear.weight, linear.bias, -1.0, 1.0)
>>> expected = linear(x).detach()
>>> bool((mean - expected[:, :2]).abs().max() < 1e-6)
True
>>> bool((logvar - expected[:, 2:].clamp(-1.0, 1.0)).abs().max() < 1e-6)
True
"""

from __future__ import annotations

import numba
import numpy as np
import torch

# Reassociation (to vectorise the sums) and fused multiply-adds; not the flags that assume no
# NaN or infinity, so the clamp keeps its meaning.
FLAGS = {"reassoc", "contract"}


@numba.njit(parallel=True, cache=True, fastmath=FLAGS)
def _head(inputs, weight, bias, low, high, mean, logvar):
    f = mean.shape[1]
    for i in numba.prange(inputs.shape[0]):
        for o in range(2 * f):
            total = np.float32(0.0)
            for k in range(inputs.shape[1]):
                total += inputs[i, k] * weight[o, k]
            total += bias[o]
            if o < f:
                mean[i, o] = total
            else:
                logvar[i, o - f] = min(max(total, low), high)


def linear_head(
    inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs (B, I) float32 on the CPU, weight (2F, I), bias (2F,) -> mean (B, F) and the
    log-variance (B, F) clamped to [low, high], both contiguous."""
    batch, f = inputs.shape[0], weight.shape[0] // 2
    mean, logvar = torch.empty(batch, f), torch.empty(batch, f)
    _head(
        inputs.detach().contiguous().numpy(),
        weight.detach().numpy(),
        bias.detach().numpy(),
        np.float32(low),
        np.float32(high),
        mean.numpy(),
        logvar.numpy(),
    )
    return mean, logvar
