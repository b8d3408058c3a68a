"""Scripted loss streams and reference statistics shared by the detector and controller tests."""

from __future__ import annotations

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


def settled(drops: Sequence[float | None], threshold: float, patience: int) -> list[int]:
    """Indices at which the last ``patience`` drops were all below ``threshold``."""
    found, streak = [], 0
    for t, drop in enumerate(drops):
        streak = streak + 1 if drop is not None and drop < threshold else 0
        if streak >= patience:
            found.append(t)
    return found
