"""From the forecaster's prediction and the observed value to a calibrated anomaly probability.

1. Residuals: r_f = (z_f - mean_f) / sd_f per feature, under the forecast's own variance.
2. Error: e = mean_f w_f r_f^2, and the surprise s = e^(1/3), which for Gaussian residuals is
   close to normal (Wilson-Hilferty), so a mean and a variance describe a stream's normal
   surprise. Each feature's squared residual is weighed by how closely the stream's forecasts
   of it usually do against the others' (w_f = mean_k m_k / m_f, m the features' typical
   squared residuals, learned like the normal surprise): a jump of 4 forecast sd in a
   feature forecast to within half its residuals' spread is not averaged away by one forecast
   loosely. With one feature, w = 1.
3. Evidence over several horizons. For each window w (1 = this event alone, then a few events;
   `windows` in the config) the stream keeps an exponentially weighted average of s, and the
   long-run variance of that average around the stream's normal surprise. The window's z-score
   compares the two: a single spike stands out in window 1, a sustained run of middling errors
   in the longer ones, which see each event winsorised at `WINDOW_WINSOR_Z` sd of window 1, so
   that a spike is window 1's finding and a lasting change moves them from its first event.
   Each window is calibrated on its own history, so autocorrelated errors do not inflate it.
   The z is read as Student's t with as many degrees of freedom as events behind the
   statistics (plus the prior's `PRIOR_WEIGHT`): a new stream's spread is an estimate, and a z
   of 3.7 against the spread of 50 events is as common as 3.4 against a known one (young
   streams alerted at 1e-3 an event with the 1e-4 threshold).
   One more window (`SMOOTH_WINDOW` events) watches the series through a plainer forecaster:
   each normalised value against its exponentially smoothed level (`SMOOTH_ALPHA`), in units of
   the stream's typical squared deviation from it. A forecaster that follows the series step by
   step takes up a level shift or a faster cycle within an event or two, and its variance
   forecast a lasting change of the noise, so its residuals return to normal while the fault
   goes on; the smoothed level lags, and its deviations stay large for as long as the series
   moves unlike itself. Its surprise has its own normal and spread, its window its own fitted
   tail, judged from 2 * `PRIOR_WEIGHT` events on.
4. Stuck signals: the forecaster cannot see an error that is too *small*, so each feature also
   keeps the length of its current run of exactly repeated values and the stream's long-run rate
   of repeats p. A run of k repeats has probability p^k under normal behaviour; its z-score joins
   the others, and once it is below `STUCK_LOG_P` the run counts as stuck at one fixed level, so
   that it is news (and alerts) once. A counter stream that often repeats learns a high p and is
   not flagged.
5. Own tails: the windows' tails are fitted (an exponential beyond 2 sd, its mean excess
   learned from the stream's exceedances). The probability is the fit's predictive one: with
   the mean excess known from k exceedances (plus `TAIL_PRIOR`), an excess u is as likely as
   (1 + u / (k mean))^-k (Lomax), heavier than e^(-u / mean) while k is small, so that a stream
   whose tail rests on a few exceedances is not trusted to the sixth nine. And a bursty stream
   goes that far more often than the fit says. Each stream counts the share of its events that
   reached each of the `TAIL_EDGES` levels; the probability of a z is the fitted one mixed with
   the counted share (carried above the last level by the fitted shape), the fit trusted as
   much as `TAIL_TRUST` counted events. A stream of tweet volumes whose 6-sd bursts are weekly
   events learns that they are. A stuck run is one finding however long it lasts, and is not
   counted: a sensor that was stuck for an hour is not deaf to its next anomaly.
6. Records: a value beyond the highest (lowest) the stream has shown, by more than
   `RECORD_MARGIN` of their range. Among n exchangeable values the newest is a record with
   probability 1/n, so records are expected ln(n) + 0.58 times by the n-th value; a stream that
   sets more (drift, a cycle not yet seen in full) raises its own record rate, and the excess
   beyond the old record is exponential with the stream's mean excess (prior `RECORD_SCALE`).
   This sees what a forecaster that follows the series cannot: the first time it goes where it
   has never been. Extremes beyond the stream's normal band fade over `RECORD_MEMORY` events.
   Records count from the start but are judged from `RECORD_MIN_EVENTS` values on: the range
   of a few dozen values is itself too uncertain for the excess beyond it to mean much.
7. Transitions: each feature's range (record low to high) is cut into `TRANSITION_BANDS` equal
   bands, and the stream remembers which moves between bands (from the band of its last value
   to the band of this one) it has made: 64 bits a feature. A move it has never made is as
   probable as the stream's recent rate of new moves (an average over `TRANSITION_MEMORY`
   events, shrunk toward `TRANSITION_RATE_PRIOR` by `PRIOR_WEIGHT` events), so a series that
   has long since shown all its moves and now falls from the top of its range to the bottom in
   one step, without a record or a large forecast error, is news; one that wanders makes new
   moves all the time and none is. Judged, like records, from `RECORD_MIN_EVENTS` values on
   (Bonferroni over the features). This is the contextual novelty of detectors such as CAD OSE
   in 64 bits: what the series does next given where it is, rather than how far it is off.
8. Categories: a forecaster of numbers cannot say that a card was used in a category its owner
   never uses. Each categorical attr keeps a small sketch of the stream's most frequent values
   (`SKETCH_SLOTS` values and their counts). The tail probability of a value is the chance of a
   value at most as frequent. For a value the stream has not shown, that is the chance of
   something new: the Good-Turing estimate (values seen once, over events seen) shrunk toward
   the rate of new values that training measured on warmed-up streams (`PRIOR_WEIGHT` events of
   trust), so an account that has used three categories for a hundred purchases makes a fourth
   improbable, while a merchant-id attr that is new half the time never is. Which new value it
   is matters too: training counts the streams that showed each value, and a new value's chance
   is that of something new *and* at most as common among them (among the values the stream has
   not shown), so a card's first jeweller is rarer news than its first supermarket. An anomalous
   event, or a value improbable enough to alert on its own, counts half, so an unusual value is
   remembered without becoming a singleton that makes the next new value look ordinary. The
   rarest attr (Bonferroni over the attrs) is one more piece of evidence beside the numeric
   ones, and so is its combination with them by Fisher's method: a new category with a middling
   amount is more than either alone. Each remembered value also keeps the mean and variance of
   the stream's features among its own events: an amount that is ordinary for the account but
   ten times its usual spend at this merchant category is judged against the category
   (two-sided, Bonferroni over features and attrs), which a forecaster that has seen an account
   for a few dozen purchases cannot do. A value seen n times keeps n / (n + within / between)
   of its own level (empirical Bayes: the spread within a value pooled over the sketch and
   shrunk toward the stream's variance by `LEVEL_PRIOR` events, the spread between values what
   the stream's variance holds beyond it), so where categories differ in price far more than
   purchases within one, three purchases already place the category's level.
   Anomalous events stay out of these levels.
9. Probability = Phi(max z) over the windows (own tails), the stuck runs, the records and the
   transitions: the probability that normal behaviour would look less surprising.
   High means anomalous. Statistics start from the model's validation statistics (a prior worth
   `PRIOR_WEIGHT` events), then follow the stream over `long_window` events, winsorised so no
   single event dominates. A lasting change (a level shift) therefore stops alerting once it
   has become the stream's normal; the engine keeps anomalous values out of the value
   normalisation (river's `protect_anomaly_detector`).
10. Score = the probability, but only where this event is *news*: more surprising than anything
    the stream showed within the last `novelty_window` events. The recent maximum is kept as two
    block maxima (the current block of novelty_window / 2 events and the one before), so it spans
    between half and all of the window in two floats, and then forgets completely. (A peak that
    decays every event lets an ongoing episode at a constant level re-qualify as news once the
    peak has decayed below it; measured on NAB, the block maxima scored 56.5 where the decaying
    peak scored 49.8.) An episode gives one high score at its onset, and again only if it gets
    worse; alerts (and NAB detections) follow the score, so an ongoing anomaly does not page
    every event.

The statistics live in the engine's float32 slab, one row per stream; `score_wave` steps a wave
of events (distinct streams) in one compiled pass that reads and writes those rows in place:

>>> import numpy as np
>>> scorer = Scorer(threshold=0.9999, windows=(1.0, 4.0, 32.0), long_window=100.0)
>>> stats = np.tile(scorer.initial_row(n_features=2), (2, 1))     # two streams
>>> stats[:, 0] = 50                                               # both past warm-up
>>> x = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
>>> stats[:, 1:3], stats[:, 3:5] = x, 1.0                          # mean = x, var = 1
>>> forecast = np.array([[0.5, -0.3], [-9.0, 0.1]], dtype=np.float32)   # in sd, (B, F)
>>> no_attrs = np.zeros((2, 0), dtype=np.int64)
>>> out = Scores.empty(2, n_features=2)                            # the batch's verdicts
>>> both = np.arange(2)                                            # batch rows and slots
>>> model_input = scorer.score_wave(both, both, x, no_attrs, np.zeros(2), forecast,
...                                 np.zeros_like(forecast), stats, np.zeros((2, 2)), out)
>>> out.probability.round(3).tolist(), out.alert.tolist()
([0.433, 1.0], [False, True])
>>> out.details[1, 3:].round(3).tolist()                           # contributions
[1.0, 0.0]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numba
import numpy as np

from detector import jit_cache
from detector.normalization import Z_CLIP, normalise, scale, update
from detector.prefetch import prefetch_row

jit_cache.keep_current()  # its kernels reach into other modules: see jit_cache

PRIOR_WEIGHT = 20.0  # events' worth of trust in the model's validation statistics
WINSOR_Z = 3.0  # long statistics see at most mean + 3 sd of surprise from any one event
# ... and the windows longer than one event at most mean + 5 sd: at 3 the onset of a lasting
# change (a level shift's first error) counted in window 4 as no more than a common 3-sd event,
# while 5 still keeps a 10-sd spike from holding window 32 up (see evaluation.md).
WINDOW_WINSOR_Z = 5.0
SQUARES_FLOOR = 1e-8  # a feature's typical squared residual never falls below this (a constant
# feature forecast exactly would decay to a denormal, and its weight overflow the error)
REPEAT_PRIOR = 0.05  # prior rate of exactly repeated values
STUCK_RATE_MAX = 0.1  # a feature that repeats more often than this cannot look "stuck"
REPEAT_FLOOR = 1e-3  # a run's probability is never judged below this rate per step
TAIL_Z = 2.0  # where a window's tail starts, in sd
PHI_TAIL_Z = 0.5 * math.erfc(-TAIL_Z / math.sqrt(2.0))
TAIL_RATE_PRIOR = 0.0228  # Gaussian P(z > 2)
TAIL_EXCESS_PRIOR = 0.37  # Gaussian E[z - 2 | z > 2]
TAIL_EXCESS_MIN, TAIL_EXCESS_MAX = 0.2, 20.0
TAIL_PRIOR = 10.0  # exceedances' worth of trust in the Gaussian tail prior
LOG_P_MIN = 60.0  # tail probabilities below e^-60 are all "certainly anomalous"
STUCK_LOG_P_MIN = 15.0  # a stuck run is never more improbable than e^-15 (z ~ 5.2)
SKETCH_SLOTS = 8  # most frequent values remembered per categorical attr and stream
LEVEL_PRIOR = 5.0  # events' worth of the stream's variance in the spread within an attr value
LEVEL_MIN = 3.0  # an attr value's level is judged once it has been seen this often
ANOMALOUS_SIGHTING = 0.5  # what an anomalous event adds to its attr value's count
NEW_VALUE_RATE = 0.01  # prior rate of values new to a stream, where training measured none
Z_MAX = 8.0  # z-scores are capped here: 1 - Phi(8) ~ 6e-16 is still a distinct float64
STUCK_LOG_P = 9.2  # a run this improbable (1e-4, the default alert level) is taken as stuck
# z levels at which a stream counts its own events, finer where most of them fall; beyond the
# last (the z cap), the stream's share there is carried on by the fitted shape. Stuck runs are
# not counted (see the kernel), so no stuck sensor, however long, teaches a stream that the far
# tail is common.
TAIL_EDGES = np.r_[np.arange(2.0, 4.01, 0.25), 4.5, 5.0, 6.0, 7.0, 8.0]
TAIL_TRUST = 10000.0  # events' worth of trust in the fitted tails against the counted ones
TAIL_MEMORY = 1e5  # events over which the counts are kept (exponentially)
RECORD_MARGIN = 0.01  # a record counts once it beats the old one by this share of the range
RECORD_SCALE = 0.05  # prior mean excess of a record beyond the margin, as a share of the range
RECORD_PRIOR = 10.0  # records' worth of trust in the exchangeable record rate and the prior excess
RECORD_MIN_EVENTS = 60  # records are judged from this many values on (see the docstring)
RECORD_MEMORY = 2e4  # events over which an extreme beyond the normal band is forgotten
RECORD_FORGET = 1.0 / RECORD_MEMORY
RECORD_BAND = 3.0  # ... the band: value mean +- this many sd
EULER = 0.5772156649015329
TRANSITION_BANDS = 8  # a feature's range (record low to high) is cut into this many bands
TRANSITION_BITS = 24  # bits of the seen-transitions set per float32 (exact integers to 2^24)
TRANSITION_WORDS = -(-TRANSITION_BANDS * TRANSITION_BANDS // TRANSITION_BITS)
TRANSITION_MEMORY = 300.0  # events over which the rate of new transitions is averaged
TRANSITION_RATE_PRIOR = 0.025  # prior rate of new transitions (PRIOR_WEIGHT events of trust)
SMOOTH_ALPHA = 0.2  # the smoothed level's step: it takes up a level shift within ~10 events
SMOOTH_WINDOW = 16.0  # events in the window of the smoothed level's residuals
AHEAD = 8  # the kernel prefetches the rows of the event this many ahead


@dataclass(frozen=True)
class Calibration:
    """Surprise statistics measured on validation data when the model was trained."""

    mean: float = 0.86  # E[(chi2_1)^(1/3)] for a perfectly calibrated forecast
    var: float = 0.2
    quantiles: tuple[float, ...] = ()  # 0.5, 0.9, 0.99, 0.999, 0.9999 of the surprise
    # Per categorical attr: how often a warmed-up stream showed a value new to it.
    new_value_rates: tuple[float, ...] = ()
    # Per categorical attr, (hash bucket, streams that showed it) for every value training saw,
    # and the number of buckets the values were hashed into.
    value_streams: tuple[tuple[tuple[int, int], ...], ...] = ()
    attr_buckets: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(
            float(data["mean"]),
            float(data["var"]),
            tuple(data.get("quantiles", ())),
            tuple(float(r) for r in data.get("new_value_rates", ())),
            tuple(
                tuple((int(b), int(n)) for b, n in pairs) for pairs in data.get("value_streams", ())
            ),
            int(data.get("attr_buckets", 0)),
        )

    def new_value_rate(self, attr: int) -> float:
        """The trained rate of new values of an attr, or a cautious default where the
        artifact has none."""
        rates = self.new_value_rates
        return rates[attr] if attr < len(rates) else NEW_VALUE_RATE

    def value_commonness(self, attr: int) -> np.ndarray:
        """(2, attr_buckets + 1): per hash bucket, the share of the streams' values that were
        this one in training (row 0), and the share of values at most as common (row 1); the
        last column serves any value beyond the buckets.

        A value no training stream showed gets a share of the unseen mass, estimated as
        Good-Turing does (the values one stream showed, plus one). Without training counts
        every value is as common as any (a tail of 1): new values are judged by rate alone."""
        table = np.zeros((2, self.attr_buckets + 1))
        table[1] = 1.0
        pairs = self.value_streams[attr] if attr < len(self.value_streams) else ()
        if not pairs:
            return table
        buckets, streams = (np.array(column) for column in zip(*pairs, strict=True))
        unseen = 1.0 + np.count_nonzero(streams == 1)
        total = streams.sum() + unseen
        table[0] = unseen / total / max(self.attr_buckets + 1 - len(buckets), 1)
        table[1] = unseen / total
        order = np.argsort(streams, kind="stable")
        tails = unseen / total + np.cumsum(streams[order]) / total
        # values shown by as many streams share the tail of the last of them
        last_of_count = np.searchsorted(streams[order], streams[order], side="right") - 1
        table[0, buckets[order]] = streams[order] / total
        table[1, buckets[order]] = tails[last_of_count]
        return table


@dataclass
class Scores:
    """The scorer's verdict on the events of a batch, one row each, filled wave by wave."""

    score: np.ndarray  # (N,) float64 probability where the event is news, else Phi(TAIL_Z)
    probability: np.ndarray  # (N,) float64 calibrated anomaly probability
    alert: np.ndarray  # (N,) bool
    warm: np.ndarray  # (N,) bool: still warming up (score and probability are 0)
    details: np.ndarray  # (N, 1 + 2F + A) float32: error | expected (F) | contributions (F + A)

    @classmethod
    def empty(cls, n: int, n_features: int, n_attrs: int = 0) -> Scores:
        """Zeros: what a row the scorer never sees (a refused event) keeps."""
        return cls(
            score=np.zeros(n),
            probability=np.zeros(n),
            alert=np.zeros(n, dtype=np.bool_),
            warm=np.zeros(n, dtype=np.bool_),
            details=np.zeros((n, 1 + 2 * n_features + n_attrs), dtype=np.float32),
        )


@numba.vectorize(["float64(float64)"], cache=True)
def surprise(error: float) -> float:
    """Mean squared residual e -> surprise s = e^(1/3), close to normal for Gaussian residuals.
    A ufunc: the scoring kernel calls it per event, training on arrays of validation errors."""
    return error ** (1.0 / 3.0)


class Scorer:
    """The scoring parameters and the layout of a stream's statistics row (float32):

    [count | value mean (F) | value variance (F) | surprise mean | peak z of this block |
     peak z of the last block |
     window averages (W) | their variances (W) | tail rates (W) | tail excesses (W) |
     last value (F) | repeat run (F) | repeat rate (F) | longest recent run (F) |
     record high (F) | record low (F) | records seen (F) | their summed excess (F) |
     transitions made, as bits (TRANSITION_WORDS * F) | rate of new transitions (F) |
     mean squared residual (F) |
     smoothed level (F) | its mean squared residual (F) | smoothed surprise mean | its
     variance | its window average | the window's variance | tail rate | tail excess |
     events counted at each TAIL_EDGES level (E) | events (1) |
     per categorical attr, a sketch: its values (SKETCH_SLOTS), their counts (SKETCH_SLOTS),
     the mean and variance of each feature among the events with each value (2 * SKETCH_SLOTS * F)]
    """

    def __init__(
        self,
        threshold: float,
        windows: tuple[float, ...] = (1.0, 4.0),
        long_window: float = 1000.0,
        calibration: Calibration | None = None,
        novelty_window: float = 200.0,
        *,
        warmup_events: int = 30,
        cooldown_seconds: float = 0.0,
        norm_window: float = 2000.0,
    ) -> None:
        if not windows or min(windows) < 1.0:
            raise ValueError(f"windows must be >= 1 event each, got {windows}")
        # Scalars as floats: numba compiles one kernel per argument types, and a worker
        # compiles only what its warm-up did (an int novelty block in one config, a float in
        # another, were two kernels).
        self.threshold = float(threshold)
        self.windows = tuple(float(w) for w in windows)
        self.long_window = float(long_window)
        self.calibration = calibration or Calibration()
        self.novelty_block = float(max(1, round(novelty_window / 2.0)))
        self.novelty_memory = novelty_window >= 2.0  # below that, every event is judged alone
        self.warmup_events = warmup_events
        self.cooldown_seconds = float(cooldown_seconds)
        self.norm_window = float(norm_window)
        self._alphas = np.array([1.0 / w for w in self.windows])
        self._attr_priors: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def attr_priors(self, n_attrs: int) -> tuple[np.ndarray, np.ndarray]:
        """Per attr, the trained rate of new values (A,) and the commonness of each value among
        training's streams (A, 2, buckets + 1; see Calibration.value_commonness)."""
        priors = self._attr_priors.get(n_attrs)
        if priors is None:
            c = self.calibration
            rates = np.array([c.new_value_rate(a) for a in range(n_attrs)])
            tables = [c.value_commonness(a) for a in range(n_attrs)]
            commonness = np.stack(tables) if tables else np.ones((0, 2, 1))
            priors = self._attr_priors[n_attrs] = (rates, commonness)
        return priors

    def width(self, n_features: int, n_attrs: int = 0) -> int:
        return (
            11 + 4 * len(self.windows) + (14 + TRANSITION_WORDS) * n_features + len(TAIL_EDGES)
            + _sketch_width(n_features) * n_attrs
        )  # fmt: skip

    def initial_row(self, n_features: int, n_attrs: int = 0) -> np.ndarray:
        """A new stream's statistics: no values seen, surprise at the calibration prior."""
        prior, a, w, f = self.calibration, self._alphas, len(self.windows), n_features
        empty_sketch = [  # values, counts, feature means and variances per value
            np.full(SKETCH_SLOTS, -1.0), np.zeros(SKETCH_SLOTS), np.zeros(2 * SKETCH_SLOTS * f)
        ]  # fmt: skip
        return np.concatenate(
            [
                [0.0],  # count
                np.zeros(2 * f),  # value mean and variance
                [prior.mean, TAIL_Z, TAIL_Z],  # normal surprise, recent peaks of z
                np.full(w, prior.mean),  # window averages
                prior.var * a / (2.0 - a),  # their variances: EW average of independent values
                np.full(w, TAIL_RATE_PRIOR),
                np.full(w, TAIL_EXCESS_PRIOR),
                np.full(f, np.nan),  # last value: none yet
                np.zeros(f),  # current run of repeats
                np.full(f, REPEAT_PRIOR),
                np.zeros(f),  # longest recent run
                np.full(2 * f, np.nan),  # record high and low: none yet
                np.zeros(2 * f),  # no records
                np.zeros(TRANSITION_WORDS * f),  # no transitions made
                np.full(f, TRANSITION_RATE_PRIOR),
                np.ones(f),  # mean squared residuals: a calibrated forecast's
                np.full(f, np.nan),  # smoothed levels: none yet
                np.zeros(f),  # their mean squared residuals: none yet
                _smooth_prior(f, SMOOTH_WINDOW),
                np.zeros(len(TAIL_EDGES) + 1),  # no events counted
                *(empty_sketch * n_attrs),
            ]
        ).astype(np.float32)

    def score_wave(
        self,
        rows: np.ndarray,
        slots: np.ndarray,
        x: np.ndarray,
        attrs: np.ndarray,
        ts: np.ndarray,
        forecast: np.ndarray,
        logvar: np.ndarray,
        stats: np.ndarray,
        clocks: np.ndarray,
        out: Scores,
    ) -> np.ndarray:
        """Score the events at `rows` (B,) of a batch, one for each of B distinct streams, and
        fold them into their streams' rows; returns their normalised values (B, F), clipped,
        for the model.

        x (N, F), attrs (N, A: the categorical attrs' hash buckets, A may be 0) and ts (N,) are
        the batch's, and the verdicts go to the same rows of `out`; slots (B,), forecast and
        logvar (B, F, in normalised units) are the wave's. slots index `stats` (C, width) and
        `clocks` (C, 2: last time, cooldown end), which are updated in place.
        """
        model_input = np.empty((len(rows), x.shape[1]), dtype=np.float32)
        _score_wave(
            rows, slots, x, attrs, ts, forecast, logvar, stats, clocks,
            *self.kernel_parameters(attrs.shape[1]),
            out.score, out.probability, out.alert, out.warm, model_input, out.details,
        )  # fmt: skip
        return model_input

    def kernel_parameters(
        self, n_attrs: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float, float, bool, float, float, float]:
        """The scoring kernel's parameters between its inputs and its outputs, for a model with
        `n_attrs` categorical attrs."""
        return (
            self._alphas, *self.attr_priors(n_attrs), self.threshold, 1.0 / self.long_window,
            self.novelty_block, self.novelty_memory, float(self.warmup_events),
            self.cooldown_seconds, self.norm_window,
        )  # fmt: skip


@numba.njit(cache=True, inline="always")
def _ndtr(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


@numba.njit(cache=True)
def _z_of_log_tail(log_p: float) -> float:
    """z with upper-tail probability exp(log_p) <= 0.5: Acklam's approximation to the normal
    quantile, then one Newton step on erfc (relative error well below 1e-9)."""
    p = math.exp(log_p)
    q = math.sqrt(-2.0 * log_p)
    z = -(((((-7.784894002430293e-03 * q - 3.223964580411365e-01) * q - 2.400758277161838)
            * q - 2.549732539343734) * q + 4.374664141464968) * q + 2.938163982698783) / (
        (((7.784695709041462e-03 * q + 3.224671290700398e-01) * q + 2.445134137142996) * q
         + 3.754408661907416) * q + 1.0)  # fmt: skip
    if p > 0.02425:  # central region
        r = (0.5 - p) ** 2
        t = 0.5 - p
        z = (((((-3.969683028665376e01 * r + 2.209460984245205e02) * r - 2.759285104469687e02)
               * r + 1.383577518672690e02) * r - 3.066479806614716e01) * r + 2.506628277459239
             ) * t / (((((-5.447609879822406e01 * r + 1.615858368580409e02) * r
                         - 1.556989798598866e02) * r + 6.680131188771972e01) * r
                       - 1.328068155363154e01) * r + 1.0)  # fmt: skip
    error = 0.5 * math.erfc(z / math.sqrt(2.0)) - p
    return z + error * math.sqrt(2.0 * math.pi) * math.exp(0.5 * z * z)


@numba.njit(cache=True, inline="always")
def _z_of_t(t: float, dof: float) -> float:
    """The normal z with the upper tail of Student's t with `dof` degrees of freedom at t
    (Wallace's approximation, within 0.02 for dof >= 10 and t <= 8): a z measured against a
    spread estimated from few events is weaker evidence than the same z against a known one."""
    if t <= 0.0:
        return t
    return math.sqrt(dof * math.log1p(t * t / dof)) * (8.0 * dof + 1.0) / (8.0 * dof + 3.0)


@numba.njit(cache=True)
def _z_of_log_p(log_p: float) -> float:
    """z with upper-tail probability exp(log_p), for any probability in (0, 1]."""
    if log_p <= -math.log(2.0):
        return _z_of_log_tail(log_p)
    return -_z_of_log_tail(math.log(-math.expm1(log_p)))


@numba.njit(cache=True, inline="always")
def _column(value, commonness):
    last = commonness.shape[1] - 1
    return int(value) if 0.0 <= value < last else last


@numba.njit(cache=True, inline="always")
def _rarity(row, at, value, commonness):
    """Among the values a stream has not shown (not in its sketch at row[at:]), the share of
    training's streams' values that are at most as common as `value`: a new value's own tail.
    A card's first purchase at a jeweller is rarer news than its first at a supermarket."""
    column = _column(value, commonness)
    share, tail = commonness[0, column], commonness[1, column]
    shown, shown_below = 0.0, 0.0
    for k in range(SKETCH_SLOTS):
        if row[at + SKETCH_SLOTS + k] > 0.0:
            other = commonness[0, _column(row[at + k], commonness)]
            shown += other
            shown_below += other if other <= share else 0.0
    return min(max(tail - shown_below, share) / max(1.0 - shown, share), 1.0)


@numba.njit(cache=True, inline="always")
def _value_tail(row, at, value, seen, new_rate, commonness):
    """log P(a value at most as frequent as `value`) under the sketch at row[at:] of a stream
    that has seen `seen` values: the chance of something new (and, for a new value, at most as
    common among training's streams), plus the mass of the values seen no more often than this
    one."""
    own, total, singles = 0.0, 0.0, 0.0
    for k in range(SKETCH_SLOTS):
        count = row[at + SKETCH_SLOTS + k]
        total += count
        singles += 1.0 if count == 1.0 else 0.0
        if row[at + k] == value:
            own = count
    p_new = min((singles + PRIOR_WEIGHT * new_rate) / (seen + PRIOR_WEIGHT), 1.0)
    if own == 0.0:
        return math.log(max(p_new * _rarity(row, at, value, commonness), 1e-300))
    rarer = 0.0
    for k in range(SKETCH_SLOTS):
        count = row[at + SKETCH_SLOTS + k]
        rarer += count if count <= own else 0.0
    return math.log(min(p_new + (1.0 - p_new) * rarer / total, 1.0))


@numba.njit(cache=True)
def _sketch_width(n_features: int) -> int:
    """Floats per categorical attr: values, counts, and per value each feature's mean and
    variance."""
    return 2 * SKETCH_SLOTS * (1 + n_features)


@numba.njit(cache=True, inline="always")
def _slot_of(row, at, value):
    """The sketch slot that holds `value`, or -1."""
    for k in range(SKETCH_SLOTS):
        if row[at + k] == value:
            return k
    return -1


@numba.njit(cache=True, inline="always")
def _count_value(row, at, value, weight):
    """Fold a value into the sketch with `weight`: count it, or give it the slot of the least
    frequent value (space-saving; an empty slot counts 0). Returns the slot, and whether it was
    taken over."""
    weakest = 0
    for k in range(SKETCH_SLOTS):
        if row[at + k] == value:
            row[at + SKETCH_SLOTS + k] += weight
            return k, False
        if row[at + SKETCH_SLOTS + k] < row[at + SKETCH_SLOTS + weakest]:
            weakest = k
    row[at + weakest] = value
    row[at + SKETCH_SLOTS + weakest] = weight
    return weakest, True


@numba.njit(cache=True, inline="always")
def _level_z(row, at, k, f, j, x, mean, var):
    """z of feature j's value x among the stream's events with the value in slot k, by empirical
    Bayes: the values' levels spread around the stream's `mean` by what the stream's variance
    `var` holds beyond the spread within a value (pooled over the sketch, shrunk toward `var` by
    LEVEL_PRIOR events), so a value seen n times keeps n / (n + within / between) of its own level,
    and x is judged against the within spread plus the level's own uncertainty."""
    counts_at, means_at = at + SKETCH_SLOTS, at + 2 * SKETCH_SLOTS
    vars_at = means_at + SKETCH_SLOTS * f
    summed, freedom = LEVEL_PRIOR * var, LEVEL_PRIOR
    for slot in range(SKETCH_SLOTS):
        seen = row[counts_at + slot]
        if seen >= 2.0:
            summed += seen * row[vars_at + slot * f + j]
            freedom += seen - 1.0
    within = summed / freedom
    between = max(var - within, 1e-12)
    n = row[counts_at + k]
    own = n / (n + within / between)
    level = own * row[means_at + k * f + j] + (1.0 - own) * mean
    return (x - level) / scale(level, within * (1.0 + own / n))


@numba.njit(cache=True, inline="always")
def _learn_level(row, at, k, fresh, f, x, norm_window):
    """Fold the event's values into the means and variances of its value's slot k."""
    means_at = at + 2 * SKETCH_SLOTS
    vars_at = means_at + SKETCH_SLOTS * f
    n = row[at + SKETCH_SLOTS + k]
    for j in range(f):
        if fresh:
            row[means_at + k * f + j], row[vars_at + k * f + j] = x[j], 0.0
        else:
            row[means_at + k * f + j], row[vars_at + k * f + j] = update(
                x[j], row[means_at + k * f + j], row[vars_at + k * f + j], n - 1.0, norm_window
            )


@numba.njit(cache=True, inline="always")
def _own_tail_z(z, row, at, edges):
    """z recalibrated to the stream's own tail: the fitted tail probability Q(z), mixed with the
    share of the stream's events counted at or above z's level (scaled within the level by Q's
    shape), trusting the fit as much as TAIL_TRUST counted events."""
    if not z > edges[0]:
        return z
    k = 0
    while k + 1 < len(edges) and edges[k + 1] <= z:
        k += 1
    q = _ndtr(-z)
    counted = min(row[at + len(edges)], TAIL_MEMORY)
    own = row[at + k] * q / _ndtr(-edges[k])
    p = (counted * own + TAIL_TRUST * q) / (counted + TAIL_TRUST)
    return _z_of_log_p(max(math.log(p), -LOG_P_MIN))


@numba.njit(cache=True, inline="always")
def _run_log_p(run, longest, rate):
    """log P(a run of `run` repeats) for a feature whose longest recent run is `longest` and
    whose rate of repeats is `rate`: each repeat beyond the longest recent run has probability
    rate (at least REPEAT_FLOOR); 0 for a feature that repeats too often to look stuck."""
    excess = max(run - longest, 0.0)
    if excess > 0.0 and rate < STUCK_RATE_MAX:
        return excess * math.log(max(rate, REPEAT_FLOOR))
    return 0.0


@numba.njit(cache=True, inline="always")
def _span(high, low):
    """The width of a stream's range, floored for a stream that has shown one value."""
    return max(high - low, 1e-6 * max(abs(high), abs(low)) + 1e-12)


@numba.njit(cache=True, inline="always")
def _beyond_record(x, high, low):
    """How far x lies beyond the stream's record high or low, as a share of their range beyond
    RECORD_MARGIN (<= 0: not a record; NaN until a value was seen)."""
    return max(x - high, low - x) / _span(high, low) - RECORD_MARGIN


@numba.njit(cache=True, inline="always")
def _record_excess(row, at, f):
    """A feature's mean excess of records beyond the margin: its records' own (row[at] of them,
    summed at row[at + f]) shrunk toward RECORD_SCALE."""
    return (row[at + f] + RECORD_PRIOR * RECORD_SCALE) / (row[at] + RECORD_PRIOR)


@numba.njit(cache=True, inline="always")
def _record_log_p(row, at, f, beyond, count):
    """log P(a record `beyond` the margin) for the feature whose records are counted at row[at].

    Among n exchangeable values the newest is a record with probability 1/n, so about
    H(n) = ln n + 0.577 records are expected by the n-th. A stream that has set more (a drift, a
    cycle not yet seen in full) raises its record rate by its count over H(n), shrunk toward 1;
    the excess beyond the margin is exponential with the stream's own mean excess."""
    n = min(count, RECORD_MEMORY)
    expected = math.log(n) + EULER + (count - n) / RECORD_MEMORY  # H(n), then 1/M per event
    rate = (row[at] + RECORD_PRIOR) / (expected + RECORD_PRIOR) / n
    return min(math.log(rate), 0.0) - beyond / _record_excess(row, at, f)


@numba.njit(cache=True, inline="always")
def _band(x, high, low):
    """Which of TRANSITION_BANDS equal bands of [low, high] x falls in (the outer ones extend
    beyond)."""
    band = int(math.floor((x - low) / _span(high, low) * TRANSITION_BANDS))
    return min(max(band, 0), TRANSITION_BANDS - 1)


@numba.njit(cache=True, inline="always")
def _transition(row, at, rate_at, last, x, high, low, count):
    """log P(the move last -> x) when it is a transition between bands (`_band`, of the range
    before x) that the stream has never made, else 0; then counts the move. Its probability is
    the stream's rate of new transitions, averaged over TRANSITION_MEMORY events and shrunk
    toward TRANSITION_RATE_PRIOR by PRIOR_WEIGHT events."""
    if math.isnan(last) or math.isnan(high):
        return 0.0
    code = _band(last, high, low) * TRANSITION_BANDS + _band(x, high, low)
    word = at + code // TRANSITION_BITS
    bit = 1 << (code % TRANSITION_BITS)
    bits = int(row[word])
    new = (bits & bit) == 0
    rate = row[rate_at]
    log_p = 0.0
    if new:
        weight = count + PRIOR_WEIGHT
        log_p = math.log((rate * count + PRIOR_WEIGHT * TRANSITION_RATE_PRIOR) / weight)
        row[word] = np.float32(bits | bit)
    alpha = max(1.0 / max(count, 1.0), 1.0 / TRANSITION_MEMORY)
    row[rate_at] = rate + alpha * ((1.0 if new else 0.0) - rate)
    return log_p


def _smooth_prior(n_features: int, window: float) -> np.ndarray:
    """The smoothed surprise's statistics for Gaussian residuals: the cube root of a mean of
    F squared unit residuals is close to normal with mean 1 - 2 / 9F and variance 2 / 9F
    (Wilson-Hilferty), and its window's average varies a / (2 - a) as much."""
    a, var = 1.0 / window, 2.0 / (9.0 * n_features)
    mean = 1.0 - var
    return np.array([mean, var, mean, var * a / (2.0 - a), TAIL_RATE_PRIOR, TAIL_EXCESS_PRIOR])


@numba.njit(cache=True, inline="always")
def _window_log_tail(zk, rate, excess, tail_events):
    """log P(a window's z this far beyond TAIL_Z) under its fitted tail: an exponential with the
    mean excess known from the exceedances behind it (rate times the events its average spans,
    plus TAIL_PRIOR), read predictively (Lomax)."""
    shape = TAIL_PRIOR + rate * tail_events
    return math.log(rate) - shape * math.log1p((zk - TAIL_Z) / (shape * excess))


@numba.njit(cache=True, inline="always")
def _learn_window(row, avg_at, wvar_at, rate_at, excess_at, normal, new_normal, alpha):
    """Fold a window's (already updated) average into its variance around the normal surprise
    and into its tail's rate and mean excess."""
    sd = math.sqrt(max(row[wvar_at], 1e-8))
    zk = (row[avg_at] - normal) / sd
    deviation = min(row[avg_at] - new_normal, WINSOR_Z * sd)
    row[wvar_at] = (1.0 - alpha) * row[wvar_at] + alpha * deviation * deviation
    exceeds = 1.0 if zk > TAIL_Z else 0.0
    rate = row[rate_at]
    row[rate_at] = rate + alpha * (exceeds - rate)
    if exceeds:
        step = alpha / (rate + TAIL_PRIOR * alpha)
        over = min(zk - TAIL_Z, TAIL_EXCESS_MAX)
        row[excess_at] = max(row[excess_at] + step * (over - row[excess_at]), TAIL_EXCESS_MIN)


@numba.njit(cache=True, parallel=True)
def _score_wave(
    rows, slots, x, attrs, ts, forecast, logvar, stats, clocks, alphas, new_rates, commonness,
    threshold, long_alpha, novelty_block, novelty_memory, warmup, cooldown, norm_window,
    score, probability, alert, warm, model_input, details,
):  # fmt: skip
    b, f = len(rows), x.shape[1]
    n_attrs = attrs.shape[1]
    w = alphas.shape[0]
    edges = TAIL_EDGES
    n_edges = len(edges)
    mean_at, var_at, s_at, peak_at, last_peak_at = 1, 1 + f, 1 + 2 * f, 2 + 2 * f, 3 + 2 * f
    avg_at = 4 + 2 * f
    wvar_at, rate_at, excess_at = avg_at + w, avg_at + 2 * w, avg_at + 3 * w
    last_at = avg_at + 4 * w
    run_at, repeat_at, longest_at = last_at + f, last_at + 2 * f, last_at + 3 * f
    high_at, low_at = last_at + 4 * f, last_at + 5 * f
    records_at, excess_sum_at = last_at + 6 * f, last_at + 7 * f
    transitions_at = last_at + 8 * f  # TRANSITION_WORDS per feature
    transition_rate_at = transitions_at + TRANSITION_WORDS * f
    squares_at = transition_rate_at + f
    smooth_at, smooth_squares_at = squares_at + f, squares_at + 2 * f
    smooth_s_at, smooth_var_at = squares_at + 3 * f, squares_at + 3 * f + 1
    smooth_avg_at = smooth_var_at + 1  # then its variance, tail rate and tail excess
    counts_at = smooth_avg_at + 4  # E levels, then the number of events counted
    sketch_at = counts_at + n_edges + 1  # one sketch per attr
    sketch_width = _sketch_width(f)
    log_features = math.log(f)
    log_level_tests = math.log(f * n_attrs) if n_attrs else 0.0  # Bonferroni: per f and a
    squared = np.empty((b, f))  # each value's squared residual
    smooth_deviation = np.empty((b, f))  # ... its squared deviation from its smoothed level
    smooth_squared = np.ones((b, f))  # ... and that in its typical units (1 until known)
    run_log_p = np.empty((b, f))  # each value's run of repeats: its log p (0: not stuck-like)
    beyond = np.empty((b, f))  # each value's distance beyond its record (<= 0: none)
    transition_log_p = np.zeros((b, f))  # each value's new transition: its log p (0: none)
    level_z = np.zeros((b, f))  # each value's |z| among its attr values' events (0: none)
    news_alone = np.zeros((b, n_attrs), dtype=np.bool_)  # each attr value: improbable alone?
    log_alert = math.log(1.0 - threshold)
    for i in numba.prange(b):  # the streams of a wave are distinct: rows never collide
        if i + AHEAD < b:
            prefetch_row(stats, slots[i + AHEAD])
            prefetch_row(clocks, slots[i + AHEAD])
        e = rows[i]  # the event's row in the batch
        row = stats[slots[i]]
        count = row[0]

        # Residuals under the forecast; the expected value in the feature's own units. Each
        # feature's squared residual is weighed by how well the stream's forecasts of it usually
        # do against the others', so a jump in a feature that is forecast closely is not
        # averaged away by one forecast loosely (one feature alone: weight 1).
        typical = 0.0
        for j in range(f):
            typical += row[squares_at + j]
        typical /= f
        error = 0.0
        for j in range(f):
            mean, var = row[mean_at + j], row[var_at + j]
            z = normalise(x[e, j], mean, var, count)
            model_input[i, j] = min(max(z, -Z_CLIP), Z_CLIP)
            r = (z - forecast[i, j]) * math.exp(-0.5 * logvar[i, j])
            squared[i, j] = r * r
            details[e, 1 + j] = forecast[i, j] * scale(mean, var) + mean
            details[e, 1 + f + j] = r * r * typical / row[squares_at + j]
            error += details[e, 1 + f + j]
        error /= f
        s = surprise(error)
        details[e, 0] = error

        # The same against each normalised value's smoothed level (item 3 of the docstring),
        # judged once PRIOR_WEIGHT deviations have set what is typical (see the learning).
        smooth_ready = count >= 2.0 * PRIOR_WEIGHT
        smooth_events = count - PRIOR_WEIGHT  # behind its statistics, the prior's included
        smooth_error = 0.0
        for j in range(f):
            deviation = model_input[i, j] - row[smooth_at + j]  # NaN before a level exists
            smooth_deviation[i, j] = deviation * deviation
            typical_j = row[smooth_squares_at + j]
            smooth_ready = smooth_ready and typical_j > 0.0
            smooth_squared[i, j] = smooth_deviation[i, j] / typical_j if typical_j > 0.0 else 1.0
            smooth_error += smooth_squared[i, j]
        s_smooth = surprise(smooth_error / f)

        # Windows: z of each horizon's average surprise; beyond TAIL_Z the stream's own tail.
        normal = row[s_at]
        spread = math.sqrt(max(row[wvar_at], 1e-8))  # of window 1: one event's surprise
        capped = min(s, normal + WINSOR_Z * spread)
        windowed = min(s, normal + WINDOW_WINSOR_Z * spread)
        z_body = -Z_MAX
        log_tail = 0.0
        dof = count + PRIOR_WEIGHT  # events behind the statistics, the prior's included
        tail_events = min(dof, 2.0 / long_alpha)  # ... and behind an average of long_alpha
        for k in range(w):
            # Window 1 sees s as it is; longer ones see it winsorised, so that one spike (judged
            # by window 1) does not hold them up for dozens of events.
            seen = s if alphas[k] == 1.0 else windowed
            average = row[avg_at + k] + alphas[k] * (seen - row[avg_at + k])
            row_sd = math.sqrt(max(row[wvar_at + k], 1e-8))
            zk = _z_of_t((average - normal) / row_sd, dof)
            z_body = max(z_body, min(zk, TAIL_Z))
            if zk > TAIL_Z:
                tail = _window_log_tail(zk, row[rate_at + k], row[excess_at + k], tail_events)
                log_tail = min(log_tail, tail)
            row[avg_at + k] = average if count >= 2 else row[avg_at + k]
        # The smoothed level's window, judged like the others against its own normal.
        smooth_normal = row[smooth_s_at]
        smooth_spread = math.sqrt(max(row[smooth_var_at], 1e-8))
        by_smooth = False
        if smooth_ready:
            seen = min(s_smooth, smooth_normal + WINDOW_WINSOR_Z * smooth_spread)
            average = row[smooth_avg_at] + (seen - row[smooth_avg_at]) / SMOOTH_WINDOW
            row_sd = math.sqrt(max(row[smooth_avg_at + 1], 1e-8))
            zk = _z_of_t((average - smooth_normal) / row_sd, smooth_events)
            z_body = max(z_body, min(zk, TAIL_Z))
            if zk > TAIL_Z:
                tail = _window_log_tail(
                    zk, row[smooth_avg_at + 2], row[smooth_avg_at + 3],
                    min(smooth_events, 2.0 / long_alpha),
                )  # fmt: skip
                by_smooth = tail < log_tail
                log_tail = min(log_tail, tail)
            row[smooth_avg_at] = average

        # Stuck signals: runs beyond the longest recent one, each extra repeat with rate p. The
        # evidence grows with the run until STUCK_LOG_P, then jumps to its cap and stays there:
        # a stuck sensor is one finding (one alert), not one that worsens with every repeat.
        log_stuck = 0.0
        for j in range(f):
            run = row[run_at + j] + 1.0 if x[e, j] == row[last_at + j] else 0.0
            run_log_p[i, j] = _run_log_p(run, row[longest_at + j], row[repeat_at + j])
            log_stuck = min(log_stuck, run_log_p[i, j])
        log_stuck = -STUCK_LOG_P_MIN if log_stuck <= -STUCK_LOG_P else log_stuck
        log_fit = max(min(log_tail, log_stuck), -LOG_P_MIN)
        z_fit = max(_z_of_log_tail(log_fit), z_body) if log_fit < 0.0 else z_body

        # Levels: each value of a categorical attr keeps the mean and variance of the stream's
        # features among its events (an account's usual amount at a merchant category), so a
        # value normal for the stream but not for this attr value stands out.
        log_level = 0.0
        for a in range(n_attrs):
            at = sketch_at + sketch_width * a
            k = _slot_of(row, at, float(attrs[e, a]))
            if k >= 0 and row[at + SKETCH_SLOTS + k] >= LEVEL_MIN:
                for j in range(f):
                    zj = abs(_level_z(row, at, k, f, j, x[e, j], row[mean_at + j], row[var_at + j]))
                    level_z[i, j] = max(level_z[i, j], zj)
                    log_level = min(log_level, math.log(max(2.0 * _ndtr(-zj), 1e-300)))
        log_level = max(min(log_level + log_level_tests, 0.0), -LOG_P_MIN)
        z_level = _z_of_log_p(log_level) if log_level < 0.0 else -Z_MAX
        by_level = z_level > z_fit
        z_fit = max(z_fit, z_level)

        # The fitted tails, checked against how often this stream really went that far.
        z_own = _own_tail_z(z_fit, row, counts_at, edges)

        # Records: a value beyond every one the stream has shown.
        log_record = 0.0
        for j in range(f):
            beyond[i, j] = _beyond_record(x[e, j], row[high_at + j], row[low_at + j])
            if beyond[i, j] > 0.0 and count >= RECORD_MIN_EVENTS:
                log_record = min(
                    log_record, _record_log_p(row, records_at + j, f, beyond[i, j], count)
                )
        log_record = max(min(log_record + log_features, 0.0), -LOG_P_MIN)  # Bonferroni
        z_record = _z_of_log_p(log_record) if log_record < 0.0 else -Z_MAX
        by_record = z_record > z_own

        # Transitions: a move between bands of the range that the stream has never made.
        log_transition = 0.0
        for j in range(f):
            transition_log_p[i, j] = _transition(
                row, transitions_at + TRANSITION_WORDS * j, transition_rate_at + j,
                row[last_at + j], x[e, j], row[high_at + j], row[low_at + j], count,
            )  # fmt: skip
            if count >= RECORD_MIN_EVENTS:
                log_transition = min(log_transition, transition_log_p[i, j])
        log_transition = max(min(log_transition + log_features, 0.0), -LOG_P_MIN)
        z_transition = _z_of_log_p(log_transition) if log_transition < 0.0 else -Z_MAX
        by_transition = z_transition > max(z_own, z_record)
        by_record = by_record and not by_transition
        zed = min(max(max(z_own, z_record, z_transition), -Z_MAX), Z_MAX)

        # Categories: the rarest attr value (Bonferroni over the attrs), alone and joined with
        # the numeric evidence by Fisher's method.
        by_attrs, log_numeric, joint = False, 0.0, 0.0
        if n_attrs:
            log_attr = 0.0
            for a in range(n_attrs):
                at = sketch_at + sketch_width * a
                tail = _value_tail(row, at, float(attrs[e, a]), count, new_rates[a], commonness[a])
                details[e, 1 + 2 * f + a] = abs(tail)  # its evidence (tail <= 0), for the blame
                news_alone[i, a] = tail < log_alert
                log_attr = min(log_attr, tail)
            log_attr = min(log_attr + math.log(n_attrs), 0.0)
            log_numeric = math.log(max(_ndtr(-zed), 1e-300))
            joint = log_numeric + log_attr
            log_combined = max(min(log_attr, joint + math.log(1.0 - joint)), -LOG_P_MIN)
            by_attrs = log_combined < log_numeric
            if by_attrs:
                zed = min(max(_z_of_log_p(log_combined), -Z_MAX), Z_MAX)
        is_warm = count < warmup
        prob = 0.0 if is_warm else _ndtr(zed)

        # News: more surprising than the recent peaks. Compared as float32, the precision the
        # peaks are stored in, so that a run of equal surprise is not news again and again.
        peak, last_peak = row[peak_at], row[last_peak_at]
        if count % novelty_block == 0:  # a new block: this block's peak becomes the last's
            last_peak = peak if novelty_memory else TAIL_Z
            peak = TAIL_Z
        news = np.float32(zed) > max(peak, last_peak)
        probability[e] = prob
        # Old news scores at most Phi(TAIL_Z): what an ordinary event can score.
        score[e] = prob if (news or is_warm or zed < TAIL_Z) else PHI_TAIL_Z
        warm[e] = is_warm
        alert[e] = score[e] >= threshold and ts[e] >= clocks[slots[i], 1]
        if alert[e]:
            clocks[slots[i], 1] = ts[e] + cooldown
        clocks[slots[i], 0] = ts[e]

        # Blame: the record-breaking features when a record decided, the features that made a
        # new transition when one did, the stuck ones when a run did, else each feature's
        # squared residual; where the categories decided, they share it with the numbers by
        # their evidence.
        total = 0.0
        for j in range(f):
            if by_record:
                details[e, 1 + f + j] = max(beyond[i, j], 0.0)
            elif by_transition:
                details[e, 1 + f + j] = -transition_log_p[i, j]
            elif by_level:
                details[e, 1 + f + j] = level_z[i, j] * level_z[i, j]
            elif log_stuck < log_tail:
                run = row[run_at + j] + 1.0 if x[e, j] == row[last_at + j] else 0.0
                details[e, 1 + f + j] = max(run - row[longest_at + j], 0.0)
            elif by_smooth:
                details[e, 1 + f + j] = smooth_squared[i, j]
            total += details[e, 1 + f + j]
        numeric_share = -log_numeric / -joint if by_attrs else 1.0
        for j in range(f):
            details[e, 1 + f + j] *= numeric_share / max(total, 1e-12)
        attr_total = 0.0
        for a in range(n_attrs):
            attr_total += details[e, 1 + 2 * f + a]
        for a in range(n_attrs):
            share = (1.0 - numeric_share) / max(attr_total, 1e-12) if by_attrs else 0.0
            details[e, 1 + 2 * f + a] *= share
        # An anomalous event, or a value improbable enough to alert on its own, counts half: the
        # value is remembered, but a new value seen only there is not one of Good-Turing's
        # singletons, which would make the next new value look ordinary (a second unusual
        # category right after the first, or after a first that other evidence held below).
        for a in range(n_attrs):
            at = sketch_at + sketch_width * a
            ordinary = prob < threshold and not news_alone[i, a]
            sighting = 1.0 if ordinary else ANOMALOUS_SIGHTING
            k, fresh = _count_value(row, at, float(attrs[e, a]), sighting)
            if fresh or prob < threshold:  # anomalous values stay out of the levels
                _learn_level(row, at, k, fresh, f, x[e], norm_window)

        # Records follow every value; an extreme beyond the normal band fades over
        # RECORD_MEMORY events, so that a stream that has moved on is judged by its new range.
        for j in range(f):
            high, low = row[high_at + j], row[low_at + j]
            if math.isnan(high):
                row[high_at + j], row[low_at + j] = x[e, j], x[e, j]
                continue
            if beyond[i, j] > 0.0 and count >= 2:
                mean_excess = _record_excess(row, records_at + j, f)
                row[records_at + j] += 1.0
                row[excess_sum_at + j] += min(beyond[i, j], 10.0 * mean_excess)
            band = RECORD_BAND * scale(row[mean_at + j], row[var_at + j])
            top, bottom = row[mean_at + j] + band, row[mean_at + j] - band
            row[high_at + j] = max(x[e, j], high - max(high - top, 0.0) * RECORD_FORGET)
            row[low_at + j] = min(x[e, j], low + max(bottom - low, 0.0) * RECORD_FORGET)

        # Learn. The first two forecasts come from a state that has seen (almost) nothing.
        alpha = max(1.0 / (count + PRIOR_WEIGHT + 1.0), long_alpha)
        if count >= 2:
            row[peak_at] = peak if is_warm else max(peak, zed)
            row[last_peak_at] = last_peak
            # A stuck run is counted by no level: it is one finding, and counted it taught the
            # stream that the far tail is common (a 78-event run left 5% of a stream's events
            # at z >= 4, and its next anomaly, a level shift with 5x the largest error the
            # stream had shown, at q 2.8).
            if not is_warm and log_stuck > -STUCK_LOG_P_MIN:
                counted = row[counts_at + n_edges]
                rate_alpha = max(1.0 / (counted + 1.0), 1.0 / TAIL_MEMORY)
                for k in range(n_edges):
                    hit = 1.0 if z_fit >= edges[k] else 0.0
                    row[counts_at + k] += rate_alpha * (hit - row[counts_at + k])
                row[counts_at + n_edges] = counted + 1.0
            new_normal = normal + alpha * (capped - normal)
            row[s_at] = new_normal
            for k in range(w):
                _learn_window(
                    row, avg_at + k, wvar_at + k, rate_at + k, excess_at + k, normal, new_normal,
                    alpha,
                )  # fmt: skip
            if smooth_ready:
                rate = max(1.0 / (smooth_events + 1.0), long_alpha)
                capped = min(s_smooth, smooth_normal + WINSOR_Z * smooth_spread)
                new_normal = smooth_normal + rate * (capped - smooth_normal)
                row[smooth_s_at] = new_normal
                deviation = capped - new_normal
                row[smooth_var_at] = (1.0 - rate) * row[smooth_var_at] + rate * deviation**2
                _learn_window(
                    row, smooth_avg_at, smooth_avg_at + 1, smooth_avg_at + 2, smooth_avg_at + 3,
                    smooth_normal, new_normal, rate,
                )  # fmt: skip
            for j in range(f):
                repeated = x[e, j] == row[last_at + j]
                run = row[run_at + j] + 1.0 if repeated else 0.0
                longest, rate = row[longest_at + j], row[repeat_at + j]
                # A stuck run is an anomaly, and like anomalous values it stays out of what is
                # normal: its repeats out of the rate, its length out of the longest recent run
                # (a sensor stuck for 68 events was deaf to its next stuck run for 50 more).
                if not (repeated and run_log_p[i, j] <= -STUCK_LOG_P):
                    row[repeat_at + j] = rate + alpha * ((1.0 if repeated else 0.0) - rate)
                # The longest recent run learns from runs that have ended, so that a run in
                # progress is judged against what came before it.
                ended = 0.0 if repeated else row[run_at + j]
                if _run_log_p(ended, longest, rate) <= -STUCK_LOG_P:
                    ended = 0.0
                row[longest_at + j] = max(longest * (1.0 - long_alpha), ended)
                row[run_at + j] = run
        else:
            for j in range(f):
                row[run_at + j] = 0.0
        for j in range(f):
            row[last_at + j] = x[e, j]
            level = row[smooth_at + j]
            value = model_input[i, j]
            row[smooth_at + j] = (
                value if math.isnan(level) else level + SMOOTH_ALPHA * (value - level)
            )

        # Anomalous values stay out of the normal range (river's protect_anomaly_detector), and
        # out of the features' typical residuals (winsorised, like the surprise).
        if prob < threshold:
            for j in range(f):
                typical_j = row[squares_at + j]
                seen = min(squared[i, j], WINSOR_Z * WINSOR_Z * typical_j)
                row[squares_at + j] = max(typical_j + alpha * (seen - typical_j), SQUARES_FLOOR)
                # The smoothed level's typical squared deviation, from PRIOR_WEIGHT events on
                # (the first values' normalisation is too unsettled to say what is typical): a
                # plain mean over the first ones, then exponential and winsorised like the rest.
                measured = smooth_events + 1.0
                if measured >= 1.0:
                    typical_j = row[smooth_squares_at + j]
                    seen = smooth_deviation[i, j]
                    if measured > PRIOR_WEIGHT:
                        seen = min(seen, WINSOR_Z * WINSOR_Z * typical_j)
                    rate = max(1.0 / measured, long_alpha)
                    row[smooth_squares_at + j] = max(
                        typical_j + rate * (seen - typical_j), SQUARES_FLOOR
                    )
            for j in range(f):
                row[mean_at + j], row[var_at + j] = update(
                    x[e, j], row[mean_at + j], row[var_at + j], count, norm_window
                )
        row[0] = count + 1.0
