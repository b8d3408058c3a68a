"""Spike and non-finite loss.

Statistic: a running mean and variance of the loss as exponential moving
averages (``alpha``; EMA variance as in West 1979). A finite loss ``x`` is a
spike when, after ``min_observations`` updates, both

    z = (x - mean) / std > zscore      and      x - mean > (ratio - 1) * |mean|.

NaN and inf always fire ``NONFINITE`` and never touch the statistics.

Why both tests: a z-score alone fires on tiny bumps of very smooth streams
(full-batch training has std near 0); a ratio alone fires on ordinary noise
of small, noisy losses. Anchors: OLMo-core (6 sigma), ZClip (EMA alpha 0.97,
i.e. ``alpha=0.03`` here), llm-foundry ``KillLossSpike`` (2x the mean),
Lightning ``SpikeDetection`` (rtol 2). Defaults: ``zscore=6.0``, ``ratio=1.5``,
``alpha=0.03``, ``min_observations=20``.

A spike must not poison the statistics it is measured against: each loss
enters the EMAs winsorized at ``mean + zscore * std``, so a single outlier
moves them no more than a 6-sigma sample would, while a lasting level shift is
still absorbed over time. On a stream constant so far (std 0) that cap is no
cap, so a spike enters at the ratio threshold ``mean + (ratio - 1) * |mean|``.
``last_zscore`` tells the controller whether the latest loss is back in its
normal band.
"""

import math
from typing import Any

from surgeon._validate import check_in_range, check_positive_int
from surgeon.detectors import Signal


class SpikeDetector:
    """Fires ``SPIKE`` on an outlier loss (z-score and ratio) and ``NONFINITE`` on NaN/inf."""

    def __init__(
        self,
        zscore: float = 6.0,
        ratio: float = 1.5,
        alpha: float = 0.03,
        min_observations: int = 20,
    ) -> None:
        check_in_range("spike_zscore", zscore, 0.0, math.inf, low_open=True, high_open=True)
        check_in_range("spike_ratio", ratio, 1.0, math.inf, low_open=False, high_open=True)
        check_in_range("spike_alpha", alpha, 0.0, 1.0, low_open=True, high_open=False)
        check_positive_int("spike_min_observations", min_observations)
        self.zscore = zscore
        self.ratio = ratio
        self.alpha = alpha
        self.min_observations = min_observations
        self.reset()

    def reset(self) -> None:
        """Forget the running statistics."""
        self.mean = 0.0
        self.var = 0.0
        self.count = 0
        self.last_zscore = 0.0

    @property
    def std(self) -> float:
        """Running standard deviation of the (winsorized) loss."""
        return math.sqrt(self.var)

    def update(self, loss: float) -> Signal | None:
        """Feed one loss; return ``NONFINITE``, ``SPIKE`` or ``None``."""
        if not math.isfinite(loss):
            return Signal.NONFINITE
        if self.count == 0:
            self.mean, self.count = loss, 1
            return None
        std = self.std
        excess = loss - self.mean
        self.last_zscore = excess / std if std > 0 else (math.inf if excess > 0 else 0.0)
        is_spike = (
            self.count >= self.min_observations
            and self.last_zscore > self.zscore
            and excess > (self.ratio - 1.0) * abs(self.mean)
            and (std > 0 or self.mean != 0)  # an all-zero stream has no scale to measure by
        )
        if std > 0:
            loss = min(loss, self.mean + self.zscore * std)
        elif is_spike and (self.ratio - 1.0) * abs(self.mean) > 0:
            # no spread yet (a constant stream): the spike enters at the ratio threshold
            loss = self.mean + (self.ratio - 1.0) * abs(self.mean)
        diff = loss - self.mean
        increment = self.alpha * diff
        var = (1.0 - self.alpha) * (self.var + diff * increment)
        if not math.isfinite(var):  # a loss so far out (~1e154) that its square overflows:
            return Signal.SPIKE if is_spike else None  # keep the statistics finite without it
        self.mean += increment
        self.var = var
        self.count += 1
        return Signal.SPIKE if is_spike else None

    def rebase(self, level: float) -> None:
        """A lasting level shift: the running mean moves to ``level`` (the spread stays), so
        the losses at the new level are normal from the next one on."""
        self.mean = level
        self.last_zscore = 0.0

    def state_dict(self) -> dict[str, Any]:
        """The changing statistics (not the configuration)."""
        return {
            "mean": self.mean,
            "var": self.var,
            "count": self.count,
            "last_zscore": self.last_zscore,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.mean = state["mean"]
        self.var = state["var"]
        self.count = state["count"]
        self.last_zscore = state["last_zscore"]
