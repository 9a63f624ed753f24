"""How well can any causal detector rank the generator's frequency-change events?

    .venv/bin/python docs/frequency_bound.py [--episodes 1000] [--seed 0]

`detector.synthetic.sensor_streams` injects a frequency change as the daily cycle running 3-5
times faster for 60-120 five-minute steps, phase-continuous, on one feature (60%) or all four,
with a seasonal amplitude of 3-8 noise sd and AR(1) noise (phi 0.3-0.7), and labels every event
of it. Starting phase-continuous, the changed signal leaves the normal one slowly: its first
events are the normal signal plus noise. This script draws episodes with the generator's
parameters and reports, for the labelled events:

- the share whose largest deviation from the normal signal *so far in the episode* (over the
  affected features) is under 1, 2 and 3 noise sd: events no causal detector can tell from
  normal ones, whatever it knows;
- the ROC AUC of an oracle that knows each stream's normal signal and noise level exactly and
  scores each event by an exponentially weighted mean of its squared residuals (per feature,
  the largest over the features), for several windows, against the normal events of streams
  without an episode, as `detector evaluate synthetic` ranks them.

A detector has to estimate the normal signal (its daily shape, weekly cycle and drift) from a few
days of the stream, so the oracle's best AUC is a ceiling for it, not a target.
"""

from __future__ import annotations

import argparse

import numpy as np

from detector.evaluate import roc_auc

FEATURES, STEPS, ONSET, DAY = 4, 400, 200, 288.0  # DAY: five-minute steps per day
WINDOWS = (1, 2, 4, 8, 16, 32)


def residuals(
    rng: np.random.Generator, anomalous: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Residuals from the normal signal in noise sd (STEPS, FEATURES), labels, the deviation."""
    phi = rng.uniform(0.3, 0.7, FEATURES)
    shocks = rng.standard_normal((STEPS, FEATURES)) * np.sqrt(1 - phi**2)
    noise = np.empty((STEPS, FEATURES))
    noise[0] = rng.standard_normal(FEATURES)
    for t in range(1, STEPS):
        noise[t] = phi * noise[t - 1] + shocks[t]
    deviation = np.zeros((STEPS, FEATURES))
    labels = np.zeros(STEPS, dtype=bool)
    if anomalous:
        factor, length = rng.uniform(3, 5), int(rng.integers(60, 121))
        features = [int(rng.integers(FEATURES))] if rng.random() < 0.6 else range(FEATURES)
        angle = 2 * np.pi * np.arange(length) / DAY
        for f in features:
            amplitude, phase = rng.uniform(3, 8), rng.uniform(0, 2 * np.pi)
            deviation[ONSET : ONSET + length, f] = amplitude * (
                np.sin(phase + factor * angle) - np.sin(phase + angle)
            )
        labels[ONSET : ONSET + length] = True
    return noise + deviation, labels, deviation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    streams = [residuals(rng, anomalous=i % 2 == 0) for i in range(2 * args.episodes)]

    so_far = np.concatenate(
        [np.maximum.accumulate(np.abs(dev[lab]).max(axis=1)) for _, lab, dev in streams[::2]]
    )
    for sd in (1, 2, 3):
        share = np.mean(so_far < sd)
        print(f"labelled events whose deviation so far is under {sd} sd: {share:.3f}")

    labels = np.concatenate([lab[ONSET // 2 :] for _, lab, _ in streams])
    for window in WINDOWS:
        scores = []
        for r, _, _ in streams:
            mean, out = np.zeros(FEATURES), np.empty(STEPS)
            for t, squared in enumerate(r**2):
                mean += (squared - mean) / window
                out[t] = mean.max()
            scores.append(out[ONSET // 2 :])
        auc = roc_auc(np.concatenate(scores), labels)
        print(f"oracle, window {window:2d}: ROC AUC {auc:.3f}")


if __name__ == "__main__":
    main()
