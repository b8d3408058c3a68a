"""Scripted loss streams and reference statistics shared by the detector and controller tests."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def noisy(values: Sequence[float], rel_sigma: float, seed: int) -> list[float]:
    """``values`` with multiplicative Gaussian noise of relative size ``rel_sigma``."""
    rng = random.Random(seed)
    return [v * (1.0 + rel_sigma * rng.gauss(0.0, 1.0)) for v in values]


def ema_drops(losses: Sequence[float], window: int) -> list[float | None]:
    """The stabilization statistic from its definition: an EMA of span ``window``
    (``alpha = 2 / (window + 1)``) and ``drop_t = (ema_{t-window} - ema_t) / |ema_{t-window}|``;
    ``None`` while fewer than ``window + 1`` EMAs exist."""
    alpha = 2.0 / (window + 1)
    emas: list[float] = []
    for x in losses:
        emas.append(x if not emas else emas[-1] + alpha * (x - emas[-1]))
    return [
        None if t < window else (emas[t - window] - emas[t]) / abs(emas[t - window])
        for t in range(len(emas))
    ]


def trend_states(
    losses: Sequence[float], window: int, threshold: float, patience: int
) -> list[tuple[str, bool, bool]]:
    """StabilizationDetector's classification from its definition, per update: ``(state,
    steep_seen, stabilized)`` with ``state`` one of ``"none"`` (too few updates), ``"steep"``,
    ``"rising"``, ``"creeping"``, ``"settled"``.

    EMA of span ``window``; ``drop_t = (ema_{t-window} - ema_t) / |ema_{t-window}|``; the noise
    ``sigma^2`` is half the EMA (``alpha``, a running mean for the first ``1 / alpha``
    differences) of squared first differences, and the drop's noise
    ``sigma * sqrt(2 alpha / (2 - alpha)) / |ema_{t-window}|``; steep when ``drop - 2 noise >
    threshold``, rising when ``-drop > max(threshold, 2 noise)``, creeping when ``-drop > 2
    noise`` (and not rising), else settled; ``steep_seen`` after
    ``patience`` steep updates in a row, stabilized after ``patience`` settled ones once a
    descent was seen."""
    alpha = 2.0 / (window + 1)
    emas: list[float] = []
    var, out = 0.0, []
    steep_run = settled_run = 0
    steep_seen = False
    for t, x in enumerate(losses):
        if t:
            d = x - losses[t - 1]
            var += max(alpha, 1.0 / t) * (d * d - var)
        emas.append(x if not emas else emas[-1] + alpha * (x - emas[-1]))
        if t < window:
            out.append(("none", steep_seen, False))
            continue
        old = abs(emas[t - window])
        drop = (emas[t - window] - emas[t]) / old
        noise = math.sqrt(var / 2.0) * math.sqrt(2.0 * alpha / (2.0 - alpha)) / old
        if -drop > max(threshold, 2.0 * noise):
            state, steep_run, settled_run = "rising", 0, 0
        elif drop - 2.0 * noise > threshold:
            state, settled_run = "steep", 0
            steep_run += 1
            steep_seen = steep_seen or steep_run >= patience
        elif -drop > 2.0 * noise:
            state, steep_run, settled_run = "creeping", 0, 0
        else:
            state, steep_run = "settled", 0
            settled_run += 1
        out.append((state, steep_seen, steep_seen and settled_run >= patience))
    return out


def spike(losses: list[float], at: int, factor: float = 10.0) -> int:
    """Multiply the losses of steps ``at`` and ``at + 1`` by ``factor`` in place: a spike that
    the next loss confirms. Returns ``at + 1``, the step whose loss the controller acts on."""
    losses[at] *= factor
    losses[at + 1] *= factor
    return at + 1
