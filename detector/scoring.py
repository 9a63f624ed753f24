"""From the forecaster's prediction and the observed value to a calibrated anomaly probability.

1. Residuals: r_f = (z_f - mean_f) / sd_f per feature, under the forecast's own variance.
2. Error: e = mean_f r_f^2, and the surprise s = e^(1/3), which for Gaussian residuals is close
   to normal (Wilson-Hilferty), so a mean and a variance describe a stream's normal surprise well.
3. Per stream, bounded state: a long, exponentially weighted mean and variance of s (its normal
   error), started from the model's validation statistics as a prior worth `PRIOR_WEIGHT` events,
   and a short average of s (recent error). Both the point surprise and the short average are
   turned into z-scores against the long statistics; the larger wins, so a single spike and a
   sustained run of middling errors both count.
4. Score = Phi(z), the probability that the stream's normal error is below what was seen.
   High means anomalous. Points that alert never update the "normal" statistics (river's
   `protect_anomaly_detector`), and the update is winsorised so no single point dominates.
5. Alert when score >= threshold and the stream's cooldown (event time) has passed.

>>> import torch
>>> scorer = Scorer(threshold=0.9999, short_window=3.0, long_window=100.0)
>>> stats = scorer.initial_stats(2)
>>> residuals = torch.tensor([[0.5, -0.3], [9.0, 0.1]])                  # (B, F)
>>> result = scorer.score(residuals, stats)
>>> [round(float(p), 3) for p in result.score]
[0.305, 1.0]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

PRIOR_WEIGHT = 20.0  # events' worth of trust in the model's validation statistics
WINSOR_Z = 3.0  # long statistics see at most mean + 3 sd of surprise from any one event
STATS = 3  # per-stream floats: long mean, long variance, short mean


@dataclass(frozen=True)
class Calibration:
    """Surprise statistics measured on validation data when the model was trained."""

    mean: float = 0.86  # E[(chi2_1)^(1/3)] for a perfectly calibrated forecast
    var: float = 0.2
    quantiles: tuple[float, ...] = ()  # 0.5, 0.9, 0.99, 0.999, 0.9999 of the surprise

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(float(data["mean"]), float(data["var"]), tuple(data.get("quantiles", ())))


@dataclass
class ScoreResult:
    score: torch.Tensor  # (B,) calibrated anomaly probability
    error: torch.Tensor  # (B,) mean squared residual e
    contributions: torch.Tensor  # (B, F) share of e per feature, sums to 1
    stats: torch.Tensor  # (B, STATS) the streams' new score statistics


def surprise(residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals (B, F) -> (error e, surprise s = e^(1/3)), each (B,)."""
    error = residuals.square().mean(dim=1)
    return error, error.pow(1.0 / 3.0)


class Scorer:
    def __init__(
        self,
        threshold: float,
        short_window: float,
        long_window: float,
        calibration: Calibration | None = None,
    ) -> None:
        self.threshold = threshold
        self.short_alpha = 1.0 / short_window
        self.long_alpha = 1.0 / long_window
        self.calibration = calibration or Calibration()
        # Var of an EW mean of independent values, relative to one value's variance.
        self._short_var_ratio = self.short_alpha / (2.0 - self.short_alpha)
        self._gate_z = math.sqrt(2.0) * torch.erfinv(torch.tensor(2 * threshold - 1.0)).item()

    def initial_stats(self, n: int) -> torch.Tensor:
        prior = self.calibration
        row = torch.tensor([prior.mean, prior.var, prior.mean])
        return row.repeat(n, 1)  # (n, STATS)

    def score(
        self,
        residuals: torch.Tensor,
        stats: torch.Tensor,
        updates: torch.Tensor | None = None,
        protect: torch.Tensor | None = None,
    ) -> ScoreResult:
        """Score one event per row and return the streams' updated statistics.

        `updates` (B,) counts each stream's earlier events (how far the prior has faded);
        `protect` (B,) bool marks rows whose anomalous points must not update the statistics
        (default: all; during warm-up a stream learns its own error level freely).
        """
        error, s = surprise(residuals)  # (B,)
        mean, var, short = stats.unbind(dim=1)
        sd = var.clamp_min(1e-6).sqrt()
        short = short + self.short_alpha * (s - short)
        z_point = (s - mean) / sd
        z_short = (short - mean) / (sd * math.sqrt(self._short_var_ratio))
        z = torch.maximum(z_point, z_short)
        score = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))

        # Learn "normal" only from normal-looking points, each clipped to mean + WINSOR_Z sd.
        if updates is None:
            updates = torch.zeros_like(s)
        alpha = torch.clamp(1.0 / (updates + PRIOR_WEIGHT + 1.0), min=self.long_alpha)
        gated = z >= self._gate_z
        if protect is not None:
            gated = gated & protect
        alpha = torch.where(gated, torch.zeros_like(alpha), alpha)
        clipped = torch.minimum(s, mean + WINSOR_Z * sd)
        delta = clipped - mean
        new_mean = mean + alpha * delta
        new_var = (1.0 - alpha) * (var + alpha * delta.square())
        contributions = residuals.square() / (residuals.square().sum(dim=1, keepdim=True) + 1e-12)
        return ScoreResult(
            score=score,
            error=error,
            contributions=contributions,
            stats=torch.stack([new_mean, new_var, short], dim=1),
        )
