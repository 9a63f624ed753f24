"""How well can any causal detector rank the generator's frequency-change events?

    .venv/bin/python docs/frequency_bound.py [--episodes 1000] [--glr-episodes 300] [--seed 0]

`detector.synthetic.sensor_streams` injects a frequency change as the daily cycle running 3-5
times faster for 60-120 five-minute steps, phase-continuous, on one feature (60%) or all four,
with a seasonal amplitude of 3-8 noise sd and AR(1) noise (phi 0.3-0.7), and labels every event
of it. Starting phase-continuous, the changed signal leaves the normal one slowly: its first
events are the normal signal plus noise. This script draws streams with the generator's
parameters (half of them with an episode) and reports, for the labelled events:

- the share whose largest deviation from the normal signal *so far in the episode* (over the
  affected features) is under 1, 2 and 3 noise sd;
- the ROC AUC, against the normal events of streams without an episode (as `detector evaluate
  synthetic` ranks them), of three detectors that know each stream's normal signal and noise
  exactly, each knowing more than the one before:
  - energy: an exponentially weighted mean of the squared residuals (per feature, the largest
    over the features), for several windows;
  - GLR: the generalised likelihood ratio of "a frequency change started at some step in the
    last 120, 3-5 times faster, on one feature or all" against "normal", maximised over the
    onset, the factor (a grid) and the features, on the whitened residuals;
  - the Neyman-Pearson bound: for each labelled event, the AUC of the likelihood-ratio test
    told the episode's onset, factor and features in advance, Phi(sqrt(D / 2)) with D the
    whitened deviation's energy from the onset to the event. No detector, causal or told
    anything short of the episode itself, ranks an event better, so the mean is an upper bound.

A real detector has to estimate the normal signal (its daily shape, weekly cycle and drift) from
a few days of the stream, and does not know the anomaly's shape, so the first two are a ceiling
for it, not a target.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

from detector.evaluate import roc_auc

FEATURES, STEPS, ONSET, DAY = 4, 400, 200, 288.0  # DAY: five-minute steps per day
WINDOWS = (1, 2, 4, 8, 16, 32)
LONGEST = 120  # steps of the longest episode: the GLR's onsets go back this far
FACTORS = np.linspace(3.0, 5.0, 9)  # the GLR's grid of speed-ups


@dataclass
class Stream:
    residuals: np.ndarray  # (STEPS, FEATURES) observed minus normal signal, in noise sd
    labels: np.ndarray  # (STEPS,) bool
    deviation: np.ndarray  # (STEPS, FEATURES) the episode's change of the signal (0 outside)
    phi: np.ndarray  # (FEATURES,) AR(1) coefficients of the noise
    amplitude: np.ndarray  # (FEATURES,) daily amplitude, in noise sd
    phase: np.ndarray  # (FEATURES,) daily phase at step 0

    def whiten(self, series: np.ndarray) -> np.ndarray:
        """AR(1) innovations of `series` (T, FEATURES) in their own sd (the value before the
        first step taken as 0)."""
        before = np.concatenate([np.zeros((1, FEATURES)), series[:-1]])
        return (series - self.phi * before) / np.sqrt(1.0 - self.phi**2)


def changed_signal(
    amplitude: np.ndarray, phase: np.ndarray, onset: np.ndarray, factor: float, step: np.ndarray
) -> np.ndarray:
    """The frequency change's deviation from the daily cycle at `step` for an episode from
    `onset`, phase-continuous there (arrays broadcast; the last axis is the features')."""
    normal_there = phase + 2 * np.pi * onset / DAY
    faster = np.sin(normal_there + factor * 2 * np.pi * (step - onset) / DAY)
    return amplitude * (faster - np.sin(phase + 2 * np.pi * step / DAY))


def draw(rng: np.random.Generator, anomalous: bool) -> Stream:
    phi = rng.uniform(0.3, 0.7, FEATURES)
    amplitude, phase = rng.uniform(3, 8, FEATURES), rng.uniform(0, 2 * np.pi, FEATURES)
    shocks = rng.standard_normal((STEPS, FEATURES)) * np.sqrt(1 - phi**2)
    noise = np.empty((STEPS, FEATURES))
    noise[0] = rng.standard_normal(FEATURES)
    for t in range(1, STEPS):
        noise[t] = phi * noise[t - 1] + shocks[t]
    deviation = np.zeros((STEPS, FEATURES))
    labels = np.zeros(STEPS, dtype=bool)
    if anomalous:
        factor, length = rng.uniform(3, 5), int(rng.integers(60, LONGEST + 1))
        features = [int(rng.integers(FEATURES))] if rng.random() < 0.6 else list(range(FEATURES))
        steps = np.arange(ONSET, ONSET + length)[:, None]
        change = changed_signal(amplitude, phase, np.array(ONSET), factor, steps)
        deviation[ONSET : ONSET + length, features] = change[:, features]
        labels[ONSET : ONSET + length] = True
    return Stream(noise + deviation, labels, deviation, phi, amplitude, phase)


def energy_scores(stream: Stream, window: int) -> np.ndarray:
    mean, out = np.zeros(FEATURES), np.empty(STEPS)
    for t, squared in enumerate(stream.residuals**2):
        mean += (squared - mean) / window
        out[t] = mean.max()
    return out


def glr_scores(stream: Stream) -> np.ndarray:
    """max over onsets tau (within LONGEST steps), FACTORS and features (each alone, or all) of
    the log likelihood ratio of the episode from tau to t, on the whitened residuals."""
    innovations = stream.whiten(stream.residuals)
    onset = np.arange(STEPS)[:, None]  # (tau, 1)
    step = onset + np.arange(LONGEST)[None, :]  # (tau, offset)
    inside = step < STEPS
    at = np.minimum(step, STEPS - 1)
    best = np.full(STEPS, -np.inf)
    for factor in FACTORS:
        template = changed_signal(
            stream.amplitude, stream.phase, onset[..., None], factor, step[..., None]
        )  # (tau, offset, F), 0 before each onset: whitened per onset along the offsets
        before = np.concatenate([np.zeros_like(template[:, :1]), template[:, :-1]], axis=1)
        white = (template - stream.phi * before) / np.sqrt(1.0 - stream.phi**2)
        gain = np.where(inside[..., None], white * innovations[at] - 0.5 * white**2, 0.0)
        llr = np.cumsum(gain, axis=1)
        candidates = np.maximum(llr.max(axis=2), llr.sum(axis=2))  # one feature, or all
        np.maximum.at(best, step[inside], candidates[inside])
    return best


def neyman_pearson_bound(stream: Stream) -> np.ndarray:
    """Per labelled event, Phi(sqrt(D / 2)): the AUC of the likelihood-ratio test that knows the
    episode, D the energy of its whitened deviation from the onset up to the event."""
    energy = np.cumsum((stream.whiten(stream.deviation) ** 2).sum(axis=1))[stream.labels]
    return 0.5 * np.array([math.erfc(-math.sqrt(d / 2.0) / math.sqrt(2.0)) for d in energy])


def ranked(streams: list[Stream], score) -> float:
    """ROC AUC of `score(stream)` over the steps after the first half of the normal lead-in."""
    scores = np.concatenate([score(s)[ONSET // 2 :] for s in streams])
    return roc_auc(scores, np.concatenate([s.labels[ONSET // 2 :] for s in streams]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--glr-episodes", type=int, default=300, help="the GLR is the slow one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    streams = [draw(rng, anomalous=i % 2 == 0) for i in range(2 * args.episodes)]
    episodes = streams[::2]

    so_far = np.concatenate(
        [np.maximum.accumulate(np.abs(s.deviation[s.labels]).max(axis=1)) for s in episodes]
    )
    for sd in (1, 2, 3):
        share = np.mean(so_far < sd)
        print(f"labelled events whose deviation so far is under {sd} sd: {share:.3f}")
    for window in WINDOWS:
        auc = ranked(streams, lambda s, w=window: energy_scores(s, w))
        print(f"energy, window {window:2d}: ROC AUC {auc:.3f}")
    glr = ranked(streams[: 2 * args.glr_episodes], glr_scores)
    print(f"GLR over onset, factor and features ({args.glr_episodes} episodes): ROC AUC {glr:.3f}")
    bound = np.concatenate([neyman_pearson_bound(s) for s in episodes]).mean()
    print(f"Neyman-Pearson bound, the episode known in advance: ROC AUC <= {bound:.3f}")


if __name__ == "__main__":
    main()
