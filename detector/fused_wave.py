"""A small wave in one compiled call: the engine's path for waves of a few events (GRU models).

Each step of a wave (gather the states, forecast, score, recurrent step) costs tens of
microseconds of Python, torch and numba dispatch whatever the wave's size. Most batches have a
few small waves after the first (on the engine bench, 4,096 events over 100,000 streams, about 85
events in the second wave and 2 in the third), and those cost ~0.12 ms each alone, almost all
of it dispatch. Here one numba call runs the whole wave with the same compiled passes as the large
waves (the head's `_head`, the scorer's `_score_wave`, the gates' `_gates`), so a stream's
forecast, scores and state come from the same arithmetic either way; the states' products with
W_hh are one torch product before it, as in a large wave (on a copy of W_hh transposed: the
same sums, which BLAS may round differently in the last bit for another shape). The engine bench
went from 968,000 to 1,010,000 events/s with it, and NAB's replay (31 streams: every wave small)
from 3.2 to 2.2 s.

>>> import numpy as np, torch
>>> from detector.model import Forecaster, ForecasterConfig
>>> from detector.scoring import Scorer, Scores
>>> torch.manual_seed(0) and None
>>> model = Forecaster(ForecasterConfig(n_features=2, hidden_size=4, num_layers=2)).eval()
>>> scorer = Scorer(threshold=0.9999)
>>> stats = np.tile(scorer.initial_row(2), (3, 1))
>>> hidden, clocks = np.zeros((3, 8), dtype=np.float32), np.zeros((3, 2))
>>> rows, slots = np.array([0, 1]), np.array([2, 0])
>>> x = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
>>> out = Scores.empty(2, n_features=2)
>>> step_wave(rows, slots, x, np.zeros((2, 0), dtype=np.int64), np.zeros(2), hidden, stats,
...           clocks, GruWeights.of(model), scorer.kernel_parameters(0), out)
>>> stats[[2, 0, 1], 0].tolist(), bool(hidden[1].any()), bool(hidden[2].any())
([1.0, 1.0, 0.0], False, True)
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numba
import numpy as np
import torch
from numba.core.errors import NumbaPerformanceWarning

from detector import jit_cache
from detector.fused_gru import _gates
from detector.fused_head import _head
from detector.model import LOGVAR_MAX, LOGVAR_MIN, Forecaster
from detector.scoring import Scores, _score_wave

jit_cache.keep_current()  # its kernels reach into other modules: see jit_cache

# A wave of fewer events takes this path. Measured (100,000 streams, medians of 250 calls): one
# call 230 / 399 / 743 us for 256 / 512 / 1,024 events, the separate passes 285 / 421 / 694.
SMALL_WAVE = 512


class GruWeights(NamedTuple):
    """A GRU forecaster's streaming weights in the layout the compiled pass takes (float32 numpy;
    a tuple, which numba takes as it is): per layer W_ih and W_hh transposed, (I, 3H) and
    (H, 3H), and the biases; the head; the attr embeddings stacked (A, buckets, dim); the
    log-variance clamp."""

    w_ih_t: tuple[np.ndarray, ...]
    w_hh_t: tuple[np.ndarray, ...]
    b_ih: tuple[np.ndarray, ...]
    b_hh: tuple[np.ndarray, ...]
    head_weight: np.ndarray
    head_bias: np.ndarray
    embeddings: np.ndarray
    logvar_low: np.float32
    logvar_high: np.float32

    @classmethod
    def of(cls, model: Forecaster) -> GruWeights:
        """The weights of an eval-mode model, taken once by the engine: a model must not be
        trained further under an engine (the transposes are copies)."""

        def array(tensor, transpose=False):
            tensor = tensor.detach()
            return np.ascontiguousarray((tensor.t() if transpose else tensor).numpy())

        layers = [model.layer_weights(layer) for layer in range(model.config.num_layers)]
        config = model.config
        embeddings = [array(e.weight) for e in model.embeddings]
        return cls(
            tuple(array(w_ih, transpose=True) for w_ih, _, _, _ in layers),
            tuple(array(w_hh, transpose=True) for _, w_hh, _, _ in layers),
            tuple(array(b_ih) for _, _, b_ih, _ in layers),
            tuple(array(b_hh) for _, _, _, b_hh in layers),
            array(model.head.weight),
            array(model.head.bias),
            np.stack(embeddings)
            if embeddings
            else np.zeros((0, 1, config.attr_dim), dtype=np.float32),
            np.float32(LOGVAR_MIN),
            np.float32(LOGVAR_MAX),
        )


def step_wave(
    rows: np.ndarray,
    slots: np.ndarray,
    x: np.ndarray,
    attrs: np.ndarray,
    ts: np.ndarray,
    hidden: np.ndarray,
    stats: np.ndarray,
    clocks: np.ndarray,
    weights: GruWeights,
    scoring: tuple,  # Scorer.kernel_parameters
    out: Scores,
) -> None:
    """Forecast, score and step the events at `rows` of a batch, one for each of the distinct
    streams `slots`: as `Engine._step_wave` does, with the states in `hidden` (C, L * H) updated
    in place. x (N, F: on the model's scale), attrs (N, A) and ts (N,) are the batch's; `scoring`
    is `Scorer.kernel_parameters`.

    Every layer's product with W_hh needs only the state before the step, so torch does them
    first: a loop in numba took three times as long on 83 rows, and numpy's BLAS brings a
    thread pool of its own that spins against numba's and torch's (4 ms a call here)."""
    states = hidden[slots]  # (B, L * H), a copy
    size = weights.w_hh_t[0].shape[0]
    products = np.empty((len(weights.w_hh_t), len(slots), 3 * size), dtype=np.float32)
    for layer, w in enumerate(weights.w_hh_t):
        layer_states = torch.from_numpy(states[:, layer * size : (layer + 1) * size])
        torch.mm(layer_states, torch.from_numpy(w), out=torch.from_numpy(products[layer]))
    _step_wave(
        rows, slots, x, attrs, ts, states, products, hidden, stats, clocks, weights, scoring,
        (out.score, out.probability, out.alert, out.warm, out.details),
    )  # fmt: skip


@numba.njit(cache=True, inline="always")
def _with_embeddings(row, at, embeddings, buckets):
    """Write each attr's embedding of its bucket into row[at:], one after the other."""
    dim = embeddings.shape[2]
    for a in range(embeddings.shape[0]):
        row[at + a * dim : at + (a + 1) * dim] = embeddings[a, buckets[a]]


# Compiled by the parallel pipeline, with no transformation of its own (the passes it calls are
# parallel themselves): numba segfaults loading from its cache a plain function that calls
# parallel ones (numba issue 8578). A prange of its own here made small waves 2.5x slower. numba
# warns that nothing was parallelised, which is the intent: that warning is silenced for this
# file only. Its cached copy is fast when a process compiled it for one model, as the warm-up
# and the Dockerfile's do; after the test suite had compiled it among other signatures, the
# copy it cached ran small waves 3.5x slower (correct, and fast again once recompiled: clear
# numba's cache, `detector/__pycache__/*.nb*`). Not cached at all, each process would pay ~4 s.
warnings.filterwarnings(
    "ignore", r"(?s).*no transformation for parallel execution.*fused_wave\.py",
    NumbaPerformanceWarning,
)  # fmt: skip
SERIAL = dict.fromkeys(
    ("comprehension", "reduction", "inplace_binop", "setitem", "numpy", "stencil", "fusion"), False
)


@numba.njit(cache=True, parallel=SERIAL)  # type: ignore[call-overload]  # stubs: only a bool
def _step_wave(
    rows, slots, x, attrs, ts, states, products, hidden, stats, clocks, weights, scoring, out
):  # fmt: skip
    w_ih_t, _, b_ih, b_hh, head_weight, head_bias, embeddings, low, high = weights
    b, f = len(rows), x.shape[1]
    layers, size = products.shape[0], products.shape[2] // 3
    context = embeddings.shape[0] * embeddings.shape[2]
    top = (layers - 1) * size

    # The forecast, from the top layer's state and the event's attrs.
    head_input = np.empty((b, size + context), dtype=np.float32)
    for i in range(b):
        head_input[i, :size] = states[i, top : top + size]
        _with_embeddings(head_input[i], size, embeddings, attrs[rows[i]])
    mean = np.empty((b, f), dtype=np.float32)
    logvar = np.empty((b, f), dtype=np.float32)
    _head(head_input, head_weight, head_bias, low, high, mean, logvar)

    model_input = np.empty((b, f), dtype=np.float32)
    _score_wave(rows, slots, x, attrs, ts, mean, logvar, stats, clocks, *scoring, *out[:4],
                model_input, out[4])  # fmt: skip

    # The recurrent step, layer by layer; each layer's new state is the next one's input.
    layer_input = np.empty((b, f + context), dtype=np.float32)
    for i in range(b):
        layer_input[i, :f] = model_input[i]
        _with_embeddings(layer_input[i], f, embeddings, attrs[rows[i]])
    h = np.empty((b, size), dtype=np.float32)
    gi = np.empty((b, 3 * size), dtype=np.float32)
    for layer in range(layers):
        column = layer * size
        for i in range(b):
            h[i] = states[i, column : column + size]
        _gates(layer_input, w_ih_t[layer], gi, products[layer], b_ih[layer], b_hh[layer], h,
               hidden, slots, column)  # fmt: skip
        if layer + 1 < layers:
            layer_input = np.empty((b, size), dtype=np.float32)
            for i in range(b):
                layer_input[i] = hidden[slots[i], column : column + size]
