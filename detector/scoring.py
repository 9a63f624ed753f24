"""From the forecaster's prediction and the observed value to a calibrated anomaly probability.

1. Residuals: r_f = (z_f - mean_f) / sd_f per feature, under the forecast's own variance.
2. Error: e = mean_f r_f^2, and the surprise s = e^(1/3), which for Gaussian residuals is close
   to normal (Wilson-Hilferty), so a mean and a variance describe a stream's normal surprise.
3. Evidence over several horizons. For each window w (1 = this event alone, then a few events,
   then a few dozen) the stream keeps an exponentially weighted average of s, and the long-run
   variance of that average around the stream's normal surprise. The window's z-score compares
   the two: a single spike stands out in window 1, a sustained run of middling errors (a variance
   change, a frequency change) in the longer ones. Each window is calibrated on its own history,
   so autocorrelated errors do not inflate it.
4. Stuck signals: the forecaster cannot see an error that is too *small*, so each feature also
   keeps the length of its current run of exactly repeated values and the stream's long-run rate
   of repeats p. A run of k repeats has probability p^k under normal behaviour; its z-score joins
   the others. A counter stream that often repeats learns a high p and is not flagged.
5. Probability = Phi(max z): the probability that normal behaviour would look less surprising.
   High means anomalous. Statistics start from the model's validation statistics (a prior worth
   `PRIOR_WEIGHT` events), then follow the stream over `long_window` events, winsorised so no
   single event dominates. A lasting change (a level shift) therefore stops alerting once it
   has become the stream's normal; the engine keeps anomalous values out of the value
   normalisation (river's `protect_anomaly_detector`).
6. Score = the probability, but only where this event is *news*: more surprising than anything
   the stream showed within about `novelty_window` events (a peak z that decays). An episode
   gives one high score at its onset, and again only if it gets worse, rather than a run of them;
   alerts (and NAB detections) follow the score, so an ongoing anomaly does not page every event.

>>> import torch
>>> scorer = Scorer(threshold=0.9999, windows=(1.0, 4.0, 32.0), long_window=100.0)
>>> stats = scorer.initial_stats(2, n_features=2)
>>> residuals = torch.tensor([[0.5, -0.3], [9.0, 0.1]])                  # (B, F)
>>> values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
>>> result = scorer.score(residuals, values, stats, count=torch.tensor([50.0, 50.0]))
>>> [round(float(p), 3) for p in result.probability]
[0.433, 1.0]
>>> [round(float(p), 3) for p in result.score]      # the first big surprise is news
[0.433, 1.0]
>>> [round(float(c), 3) for c in result.contributions[1]]
[1.0, 0.0]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

PRIOR_WEIGHT = 20.0  # events' worth of trust in the model's validation statistics
WINSOR_Z = 3.0  # long statistics see at most mean + 3 sd of surprise from any one event
REPEAT_PRIOR = 0.05  # prior rate of exactly repeated values
REPEAT_FLOOR = 1e-3  # a run's probability is never judged below this rate per step
TAIL_Z = 2.0  # where a window's tail starts, in sd
TAIL_RATE_PRIOR = 0.0228  # Gaussian P(z > 2)
TAIL_EXCESS_PRIOR = 0.37  # Gaussian E[z - 2 | z > 2]
TAIL_EXCESS_MIN, TAIL_EXCESS_MAX = 0.2, 20.0
TAIL_PRIOR = 10.0  # exceedances' worth of trust in the Gaussian tail prior
LOG_P_MIN = 60.0  # tail probabilities below e^-60 are all "certainly anomalous"
NEWS_MARGIN = 0.5  # sd by which an event must beat the recent peak to be news
Z_MAX = 8.0  # z-scores are capped here: 1 - Phi(8) ~ 6e-16 is still a distinct float64


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
    score: torch.Tensor  # (B,) float64 probability where the event is news, else capped low
    probability: torch.Tensor  # (B,) float64 calibrated anomaly probability
    error: torch.Tensor  # (B,) mean squared residual e
    contributions: torch.Tensor  # (B, F) share of the evidence per feature, sums to 1
    stats: torch.Tensor  # (B, width) the streams' new score statistics


def surprise(residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals (B, F) -> (error e, surprise s = e^(1/3)), each (B,)."""
    error = residuals.square().mean(dim=1)
    return error, error.pow(1.0 / 3.0)


class Scorer:
    """Per-stream score statistics live in the engine's slab as `width(F)` floats per stream:
    [normal surprise mean | window averages | their variances | per feature: last value,
    current repeat run, repeat rate, longest recent run]."""

    def __init__(
        self,
        threshold: float,
        windows: tuple[float, ...] = (1.0, 4.0, 32.0),
        long_window: float = 1000.0,
        calibration: Calibration | None = None,
        novelty_window: float = 200.0,
    ) -> None:
        if not windows or min(windows) < 1.0:
            raise ValueError(f"windows must be >= 1 event each, got {windows}")
        self.threshold = threshold
        self.windows = tuple(float(w) for w in windows)
        self.long_alpha = 1.0 / long_window
        self.novelty_decay = 1.0 - 1.0 / novelty_window
        self.calibration = calibration or Calibration()
        self._alphas = torch.tensor([1.0 / w for w in self.windows])  # (W,)
        self._point_window = self._alphas == 1.0  # (W,)

    def width(self, n_features: int) -> int:
        return 2 + 4 * len(self.windows) + 4 * n_features

    def initial_stats(self, n: int, n_features: int) -> torch.Tensor:
        prior = self.calibration
        a = self._alphas
        n_windows = len(self.windows)
        # An EW average of independent values has variance var * a / (2 - a).
        window_var = prior.var * a / (2.0 - a)
        row = torch.cat(
            [
                torch.tensor([prior.mean, TAIL_Z]),  # normal surprise, recent peak z
                torch.full((n_windows,), prior.mean),  # window averages
                window_var,
                torch.full((n_windows,), TAIL_RATE_PRIOR),  # how often a window exceeds
                torch.full((n_windows,), TAIL_EXCESS_PRIOR),  # by how much, in sd
                torch.full((n_features,), math.nan),  # last value: none yet
                torch.zeros(n_features),  # current run of repeats
                torch.full((n_features,), REPEAT_PRIOR),
                torch.zeros(n_features),  # longest recent run
            ]
        )
        return row.repeat(n, 1)

    def score(
        self, residuals: torch.Tensor, values: torch.Tensor, stats: torch.Tensor, count: torch.Tensor
    ) -> ScoreResult:
        """Score one event per row and return the streams' updated statistics.

        residuals and values (B, F); `count` (B,) is each stream's number of earlier events (how
        far the prior has faded).
        """
        n_windows, n_features = len(self.windows), values.shape[1]
        mean, peak = stats[:, 0], stats[:, 1]  # (B,)
        averages, window_var, tail_rate, tail_excess = stats[:, 2 : 2 + 4 * n_windows].split(
            n_windows, dim=1
        )  # (B, W) each
        last, run, rate, longest = stats[:, 2 + 4 * n_windows :].split(n_features, dim=1)

        error, s = surprise(residuals)  # (B,)
        # Window 1 sees s as it is; longer windows and the long-run statistics see it winsorised,
        # so one spike (judged by window 1) neither holds them up nor teaches them much.
        window_sd = window_var.clamp_min(1e-8).sqrt()  # (B, W)
        capped = torch.minimum(s, mean + WINSOR_Z * window_sd[:, 0])
        inputs = torch.where(self._point_window, s.unsqueeze(1), capped.unsqueeze(1))  # (B, W)
        averages = averages + self._alphas * (inputs - averages)
        z_windows = (averages - mean.unsqueeze(1)) / window_sd  # (B, W)

        # Beyond TAIL_Z sd, a window's tail is the stream's own: exceedances happen at rate p and
        # overshoot by an exponential amount with mean m (peaks over threshold, as in SPOT), so
        # a stream whose errors are heavy-tailed by nature learns that, and only a surprise
        # beyond its usual extremes is improbable.
        over = z_windows - TAIL_Z  # (B, W), in sd
        exceeds = over > 0
        log_tail = torch.log(tail_rate) - over.clamp_min(0.0) / tail_excess
        log_tail = torch.where(exceeds, log_tail, torch.zeros_like(log_tail)).min(dim=1).values

        repeated = values == last  # (B, F); NaN (no last value) never equals
        run = torch.where(repeated, run + 1.0, torch.zeros_like(run))
        # Runs as long as this stream's longest recent one are normal for it (a counter that sits
        # at zero at night); beyond that, each extra repeat has probability p.
        excess = (run - longest).clamp_min(0.0)
        log_stuck = (excess * torch.log(rate.clamp_min(REPEAT_FLOOR))).min(dim=1).values  # (B,)

        z_body = z_windows.max(dim=1).values.clamp(max=TAIL_Z)
        log_p = torch.minimum(log_tail, log_stuck).clamp_min(-LOG_P_MIN)
        z_tail = -torch.special.ndtri(log_p.exp())  # (B,), +inf-free thanks to the clamp
        z = torch.where(log_p < 0, torch.maximum(z_tail, z_body), z_body).clamp(-Z_MAX, Z_MAX)
        # float64: in float32 every z above ~5.3 would be the same score, 1.0.
        z64 = z.double()
        probability = torch.special.ndtr(z64)
        peak = TAIL_Z + (peak - TAIL_Z) * self.novelty_decay
        news = z > peak + NEWS_MARGIN  # a margin, so that a run at the z cap is not news
        score = torch.where(news, probability, torch.special.ndtr(z64.clamp(max=TAIL_Z)))
        peak = torch.maximum(peak, z)

        # Long-run statistics fade in from the prior, then forget over `long_window` events.
        alpha = torch.clamp(1.0 / (count + PRIOR_WEIGHT + 1.0), min=self.long_alpha)  # (B,)
        new_mean = mean + alpha * (capped - mean)
        deviation = (averages - new_mean.unsqueeze(1)).clamp(max=WINSOR_Z * window_sd)
        a = alpha.unsqueeze(1)
        window_var = (1.0 - a) * window_var + a * deviation.square()
        tail_rate = tail_rate + a * (exceeds.to(tail_rate.dtype) - tail_rate)
        # Each exceedance weighs as one of the ~p/a in the window, plus TAIL_PRIOR prior ones.
        step = a / (tail_rate + TAIL_PRIOR * a) * exceeds
        tail_excess = tail_excess + step * (over.clamp(0.0, TAIL_EXCESS_MAX) - tail_excess)
        tail_excess = tail_excess.clamp_min(TAIL_EXCESS_MIN)
        rate = rate + a * (repeated.to(rate.dtype) - rate)
        longest = torch.maximum(longest * (1.0 - self.long_alpha), run)

        squared = residuals.square()
        stuck_wins = (log_stuck < log_tail).unsqueeze(1)
        blame = torch.where(stuck_wins, excess, squared)
        contributions = blame / blame.sum(dim=1, keepdim=True).clamp_min(1e-12)
        new_stats = torch.cat(
            [
                new_mean.unsqueeze(1),
                peak.unsqueeze(1),
                averages,
                window_var,
                tail_rate,
                tail_excess,
                values,
                run,
                rate,
                longest,
            ],
            dim=1,
        )
        return ScoreResult(score, probability, error, contributions, new_stats)
