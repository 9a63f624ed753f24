"""The recurrent forecaster: normalised features (+ hashed categorical embeddings) -> GRU/LSTM/RNN
-> the next step's Gaussian (mean and log-variance per feature).

Categorical attrs play two parts. An event's attrs enter the recurrent state with its values, and
the forecast of an event is conditioned on that event's own attrs: they arrive with its values,
so the forecast of a card payment already knows it is "electronics" and not "groceries", and a
price that is normal for one category is not blurred into the spread of all of them.

One module serves both uses. `forward` runs whole (padded) sequences for training; `predict` and
`step` run one step at a time from an external hidden state for streaming, with the same weights.
The streaming state of one stream is a `(num_layers, state_size)` tensor: the hidden state, with the
LSTM's cell state concatenated after it.

>>> import torch
>>> model = Forecaster(ForecasterConfig(n_features=2, hidden_size=8, num_layers=2)).eval()
>>> x = torch.randn(3, 5, 2)                                   # (B, T, F)
>>> mean, logvar, h = model(x)
>>> mean.shape, h.shape
(torch.Size([3, 5, 2]), torch.Size([3, 2, 8]))
>>> state = model.initial_state(3)
>>> for t in range(5):
...     state = model.step(x[:, t], None, state)
>>> torch.allclose(state, h, atol=1e-6)
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from detector.fused_gru import gru_step, gru_step_into
from detector.fused_head import linear_head

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}
LOGVAR_MIN, LOGVAR_MAX = -7.0, 5.0  # variance of a normalised feature: ~1e-3 .. ~150


@dataclass(frozen=True)
class ForecasterConfig:
    n_features: int
    cell: str = "gru"
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0
    n_attrs: int = 0
    attr_buckets: int = 1024
    attr_dim: int = 8
    log_scale: tuple[int, ...] = ()  # features (by index) forecast on normalization.symlog's scale

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_scale", tuple(int(i) for i in self.log_scale))
        if any(not 0 <= i < self.n_features for i in self.log_scale):
            raise ValueError(f"log_scale {self.log_scale} names features beyond {self.n_features}")

    def to_dict(self) -> dict:
        return asdict(self)


class Forecaster(nn.Module):
    def __init__(self, config: ForecasterConfig) -> None:
        super().__init__()
        if config.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {config.cell!r}")
        self.config = config
        self.embeddings = nn.ModuleList(
            nn.Embedding(config.attr_buckets, config.attr_dim) for _ in range(config.n_attrs)
        )
        input_size = config.n_features + config.n_attrs * config.attr_dim
        self.core = CELLS[config.cell](
            input_size,
            config.hidden_size,
            config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(config.dropout)
        context = config.n_attrs * config.attr_dim  # the forecast event's attrs
        self.head = nn.Linear(config.hidden_size + context, 2 * config.n_features)

    @property
    def state_size(self) -> int:
        """Floats of state per layer: hidden, plus the cell state for an LSTM."""
        return self.config.hidden_size * (2 if self.config.cell == "lstm" else 1)

    def initial_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.config.num_layers, self.state_size)

    def _with_attrs(self, x: torch.Tensor, attrs: torch.Tensor | None) -> torch.Tensor:
        """x with the embeddings of attrs (..., A) appended on its last axis."""
        if not self.embeddings:
            return x
        assert attrs is not None, "this model embeds categorical attrs: pass them"
        embedded = [emb(attrs[..., i]) for i, emb in enumerate(self.embeddings)]
        return torch.cat([x, *embedded], dim=-1)

    def _head(
        self, top: torch.Tensor, attrs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.head(self._with_attrs(self.dropout(top), attrs)).chunk(2, dim=-1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def forward(
        self,
        x: torch.Tensor,
        attrs: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        next_attrs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run sequences x (B, T, F), attrs (B, T, A) -> mean, logvar (B, T, F), final state.

        Output t is the forecast of step t + 1, made after seeing steps 0..t and told the attrs
        of step t + 1 (`next_attrs`, (B, T, A)).
        """
        inputs = self._with_attrs(x, attrs)  # (B, T, I)
        if state is None:
            state = self.initial_state(x.shape[0]).to(x)
        hx = state.transpose(0, 1).contiguous()  # (L, B, S)
        if self.config.cell == "lstm":
            h0, c0 = hx.chunk(2, dim=-1)
            out, (hn, cn) = self.core(inputs, (h0.contiguous(), c0.contiguous()))
            final = torch.cat([hn, cn], dim=-1)
        else:
            out, final = self.core(inputs, hx)  # out (B, T, H)
        mean, logvar = self._head(out, next_attrs)
        return mean, logvar, final.transpose(0, 1)  # (B, L, S)

    def predict(
        self, state: torch.Tensor, attrs: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forecast of the next event from streaming states (B, L, S) and that event's attrs
        (B, A) -> mean, logvar (B, F), contiguous. For streaming: the head runs as one compiled
        pass (`fused_head`), without dropout and gradient."""
        top = state[:, -1, : self.config.hidden_size]
        return linear_head(
            self._with_attrs(top, attrs), self.head.weight, self.head.bias, LOGVAR_MIN, LOGVAR_MAX
        )

    def layer_weights(
        self, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        core = self.core
        return (
            getattr(core, f"weight_ih_l{layer}"),
            getattr(core, f"weight_hh_l{layer}"),
            getattr(core, f"bias_ih_l{layer}"),
            getattr(core, f"bias_hh_l{layer}"),
        )

    def step(
        self, x: torch.Tensor, attrs: torch.Tensor | None, state: torch.Tensor
    ) -> torch.Tensor:
        """Advance streaming states (B, L, S) by one observation x (B, F): the new states.

        For streaming: a GRU steps through `fused_gru`, which carries no gradient."""
        layer_input = self._with_attrs(x, attrs)  # (B, I)
        hidden = self.config.hidden_size
        new_layers = []
        for layer in range(self.config.num_layers):
            weights = self.layer_weights(layer)
            previous = state[:, layer]  # (B, S)
            if self.config.cell == "gru":
                h = gru_step(layer_input, previous, *weights)
                new_layers.append(h)
            elif self.config.cell == "lstm":
                h, c = torch.lstm_cell(
                    layer_input, (previous[:, :hidden], previous[:, hidden:]), *weights
                )
                new_layers.append(torch.cat([h, c], dim=-1))
            else:
                h = torch.rnn_tanh_cell(layer_input, previous, *weights)
                new_layers.append(h)
            layer_input = h
        if len(new_layers) == 1:
            return new_layers[0].unsqueeze(1)  # (B, 1, S), no copy
        return torch.stack(new_layers, dim=1)  # (B, L, S)

    def step_into(
        self,
        x: torch.Tensor,
        attrs: torch.Tensor | None,
        state: torch.Tensor,
        slab: torch.Tensor,
        rows: torch.Tensor,
    ) -> None:
        """`step`, the new states stored in rows `rows` (B,) of `slab` (C, L * S), the engine's
        state slab. A GRU's gates write each layer's state there themselves."""
        if self.config.cell != "gru":
            slab.index_copy_(0, rows, self.step(x, attrs, state).reshape(len(rows), -1))
            return
        layer_input = self._with_attrs(x, attrs)
        size = self.state_size
        for layer in range(self.config.num_layers):
            column = layer * size
            weights = self.layer_weights(layer)
            gru_step_into(layer_input, state[:, layer], *weights, slab, rows, column)
            if layer + 1 < self.config.num_layers:
                layer_input = slab[:, column : column + size].index_select(0, rows)
