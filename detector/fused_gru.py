"""The streaming GRU step as one matrix product and one compiled pass over the gates.

`torch.gru_cell` on the CPU runs its gates as eight separate tensor operations, each a pass over
a (B, 3H) or (B, H) temporary: on a 4,096-event wave they take three times as long as the two
matrix products. Here torch does only the product of the states with W_hh; one numba pass then
computes, row by row while the row is in cache, the input's product (a few multiply-adds per
gate for the handful of features a stream has; as a BLAS call, 0.3-0.5 ms of a 4,096-event
wave), r = sigmoid(i_r + h_r), z = sigmoid(i_z + h_z), n = tanh(i_n + r * h_n) and
h' = n + z * (h - n) (PyTorch's GRU equations), and writes h' where it belongs: straight into
the engine's state slab (`gru_step_into`), so that no scatter follows. The exponential is a
float32 polynomial (relative error under 3e-7) that LLVM vectorises, where a call to libm's
`exp` or `tanh` per element would not. Measured on 4,096 x 64 (2 threads): 2.3-2.8 ms for
`torch.gru_cell`, 1.5 ms for this step with both products in torch. Folding in the input's
product and the scatter (with the head's own pass, `fused_head`) took the engine from 386,000 to
443,000 events/s (medians of three alternations; docs/benchmarks.md).

For streaming only: no gradient flows through it (training runs `torch.nn.GRU` on whole
sequences).

>>> import torch
>>> cell = torch.nn.GRUCell(3, 5)
>>> x, h = torch.randn(4, 3), torch.randn(4, 5)
>>> weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
>>> bool((gru_step(x, h, *weights) - cell(x, h)).abs().max() < 1e-5)
True
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

F32 = np.float32
ONE, HALF, TWO = F32(1.0), F32(0.5), F32(2.0)
LOG2E = F32(1.4426950408889634)
LN2_HI, LN2_LO = F32(0.693359375), F32(-2.12194440e-4)  # ln 2 in two parts (Cody-Waite)
EXP_MIN, EXP_MAX = F32(-87.0), F32(88.0)  # e^x stays a normal float32 in between
# Taylor coefficients of e^f for |f| <= ln(2) / 2, highest power first.
EXP_POLY = tuple(F32(1.0 / c) for c in (5040, 720, 120, 24, 6, 2, 1, 1))


@intrinsic
def _float32_from_bits(typingctx, bits):  # noqa: ARG001 - numba's intrinsic signature
    """The float32 whose IEEE bits are the int32 `bits` (a bit cast, no conversion)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@numba.njit(inline="always", cache=True)
def _exp(x):
    """e^x for float32 x: 2^k * e^f with x = k ln 2 + f, e^f a degree-7 polynomial."""
    x = min(max(x, EXP_MIN), EXP_MAX)
    k = np.floor(x * LOG2E + HALF)
    f = x - k * LN2_HI - k * LN2_LO
    p = EXP_POLY[0]
    for c in EXP_POLY[1:]:
        p = p * f + c
    return p * _float32_from_bits(np.int32((np.int32(k) + np.int32(127)) << np.int32(23)))


@numba.njit(inline="always", cache=True)
def _sigmoid(a):
    return ONE / (ONE + _exp(-a))


@numba.njit(parallel=True, cache=True, fastmath={"contract"})  # multiply-adds: one rounding
def _gates(x, w_ih_t, gi, gh, b_ih, b_hh, h, out, rows, column):
    """out[rows[b], column:column + H] = row b's new hidden state, from its input x[b] (I,), the
    product gh = h W_hh' (B, 3H, in PyTorch's order r, z, n) and the biases (3H,). The input's
    product gi[b] = x[b] W_ih' is computed here, row by row into the scratch `gi` (B, 3H): with a
    handful of inputs the product is a few multiply-adds per gate, which a BLAS call spends more
    time dispatching than doing."""
    size = h.shape[1]
    bias = b_ih + b_hh
    for b in numba.prange(h.shape[0]):
        g = gi[b]
        g[:] = 0.0
        for k in range(x.shape[1]):  # over the inputs, each a multiple of a row of W_ih'
            v = x[b, k]
            for j in range(3 * size):
                g[j] += v * w_ih_t[k, j]
        target = out[rows[b]]
        for j in range(size):
            r = _sigmoid(g[j] + gh[b, j] + bias[j])
            z = _sigmoid(g[size + j] + gh[b, size + j] + bias[size + j])
            i_n = g[2 * size + j] + b_ih[2 * size + j]
            n = TWO * _sigmoid(TWO * (i_n + r * (gh[b, 2 * size + j] + b_hh[2 * size + j]))) - ONE
            target[column + j] = n + z * (h[b, j] - n)


def gru_step(
    x: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor,
    b_hh: torch.Tensor,
) -> torch.Tensor:
    """One GRU step for a batch: x (B, I), h (B, H) float32 on the CPU -> the new h (B, H)."""
    out = torch.empty(h.shape[0], h.shape[1])
    gru_step_into(x, h, w_ih, w_hh, b_ih, b_hh, out, torch.arange(h.shape[0]), 0)
    return out


def gru_step_into(
    x: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor,
    b_hh: torch.Tensor,
    slab: torch.Tensor,
    rows: torch.Tensor,
    column: int,
) -> None:
    """`gru_step`, its new states written straight into rows `rows` (B,) of the float32 tensor
    `slab` (C, W), columns column .. column + H: the engine's state slab, which then needs no
    scatter of its own (an `index_copy_` of a 4,096-event wave took 0.3-0.5 ms)."""
    x, h = x.detach().contiguous(), h.detach().contiguous()
    # The biases are added in the pass: addmm would first copy them into every row of its output.
    gh = torch.mm(h, w_hh.detach().t())
    gi = np.empty((len(h), w_ih.shape[0]), dtype=np.float32)
    w_ih_t = w_ih.detach().t().contiguous().numpy()
    biases = b_ih.detach().numpy(), b_hh.detach().numpy()
    _gates(
        x.numpy(), w_ih_t, gi, gh.numpy(), *biases, h.numpy(), slab.numpy(), rows.numpy(), column
    )
