"""Spike and non-finite loss.

Statistic: each finite loss ``x`` is compared with the stream's recent *level* in units of
its step-to-step *noise*:

* ``level`` is the median of the last ``window`` finite losses;
* ``noise`` is ``sigma = sqrt(v / 2)``, where ``v`` is an exponential moving average
  (``alpha``) of the squared first differences ``(x_t - x_{t-1})^2``, capped at
  ``WINDOW_CAP = 3`` times the noise the last ``window`` differences show (their median
  ``|x_t - x_{t-1}|`` over ``0.6745 * sqrt(2)``, its value for Gaussian noise of sigma 1).

``x`` is a spike when, after ``min_observations`` finite losses, both

    z = (x - level) / sigma > zscore      and      x - level > (ratio - 1) * |level|.

NaN and inf always fire ``NONFINITE`` and never touch the statistics.

Why these statistics: early in training the loss falls steeply, and a running variance of the
loss itself holds that descent (an EMA variance put a x20 spike at step 60 of a steep descent at
z = 1.99). A difference of consecutive losses holds the batch-to-batch noise and only one step
of the trend, so ``sigma`` is the noise from the first few steps on (a differenced series,
as in ARIMA's d = 1; for independent noise of variance s^2, E[(x_t - x_{t-1})^2] = 2 s^2). The
median follows the trend with a lag of ``window / 2`` steps, never below it on a descent, so
a lag makes a spike look smaller, never a normal loss look like one.

Why the cap: ``v`` remembers ~``1 / alpha`` steps, so right after a fast descent (the level
100x lower within 150 steps) it still holds the large differences of the higher losses, and a
x10 spike stayed inside that band. The median of the last ``window`` differences follows the
noise within ``window / 2`` steps and ignores a spike's own two differences; it is a noisy
estimate (1% of stationary Gaussian windows read under 0.46x the true sigma), so it only caps
``v``'s answer at 3x its own: on a stationary stream the cap binds on ~0.1% of the steps and
never narrows the band below ``v``'s own low readings (0.63x the true sigma over 40,000
steps); after a descent it narrows the band to the noise of now. The differences are
absolute, so a loss that crosses zero is measured as any other (a noise *relative* to the
level, tried first, made false spikes there).

A spike must not poison the statistics it is measured against: one outlier cannot move a
median, and each first difference enters ``v`` clipped to ``zscore * sqrt(v)`` (so an outlier
moves ``v`` no more than a ``zscore``-sigma step would). A lasting level shift is a new
baseline within ``window / 2 + 1`` losses (the median has moved), and it leaves ``sigma`` as it
was (one clipped difference). Before any spread is seen (``v = 0``, a constant stream) the
difference is clipped to the ratio threshold ``(ratio - 1) * |level|`` (an all-zero stream
has no scale: nothing is "x times" its level, and a jump from it teaches no spread).

Why both tests: a z-score alone fires on tiny bumps of very smooth streams (full-batch training
has a noise near 0); a ratio alone fires on ordinary noise of small, noisy losses. Anchors:
OLMo-core (6 sigma), ZClip (EMA alpha 0.97, i.e. ``alpha=0.03`` here), llm-foundry
``KillLossSpike`` (2x the mean), Lightning ``SpikeDetection`` (rtol 2). Defaults:
``zscore=6.0``, ``ratio=1.5``, ``alpha=0.03``, ``window=16``, ``min_observations=10``.
``last_zscore`` tells the controller whether the latest loss is in its normal band.
"""

import math
from collections import deque
from typing import Any

from surgeon._validate import check_in_range, check_positive_int
from surgeon.detectors import Signal

WINDOW_CAP = 3.0
"""``sigma`` is at most this many times the noise of the last ``window`` differences."""
MEDIAN_ABS_DIFF = 0.6745 * math.sqrt(2.0)
"""The median of ``|x_t - x_{t-1}|`` for independent Gaussian noise of ``sigma = 1``."""


def _median(values: deque[float]) -> float:
    """``statistics.median``'s arithmetic, without its checks (``values`` is not empty)."""
    ordered = sorted(values)
    half = len(ordered) // 2
    return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2


class SpikeDetector:
    """Fires ``SPIKE`` on an outlier loss (z-score and ratio) and ``NONFINITE`` on NaN/inf."""

    def __init__(
        self,
        zscore: float = 6.0,
        ratio: float = 1.5,
        alpha: float = 0.03,
        min_observations: int = 10,
        window: int = 16,
    ) -> None:
        check_in_range("spike_zscore", zscore, 0.0, math.inf, low_open=True, high_open=True)
        check_in_range("spike_ratio", ratio, 1.0, math.inf, low_open=False, high_open=True)
        check_in_range("spike_alpha", alpha, 0.0, 1.0, low_open=True, high_open=False)
        check_positive_int("spike_min_observations", min_observations)
        check_positive_int("spike_window", window)
        self.zscore = zscore
        self.ratio = ratio
        self.alpha = alpha
        self.min_observations = min_observations
        self.window = window
        self.reset()

    def reset(self) -> None:
        """Forget the running statistics."""
        self.recent: deque[float] = deque(maxlen=self.window)
        self.mean = 0.0
        self.var = 0.0
        self.diffs: deque[float] = deque(maxlen=self.window)  # the last |x_t - x_{t-1}|
        self.count = 0
        self.last_zscore = 0.0

    @property
    def std(self) -> float:
        """The step-to-step noise of the loss: ``sqrt(v / 2)``, at most ``WINDOW_CAP`` times
        the noise of the last ``window`` differences."""
        return self._noise()

    def _noise(self) -> float:
        sigma = math.sqrt(self.var / 2.0)
        if len(self.diffs) == self.window:
            med = _median(self.diffs)
            if med > 0:  # no cap from a window without spread (repeated, quantized losses)
                sigma = min(sigma, WINDOW_CAP * med / MEDIAN_ABS_DIFF)
        return sigma

    def update(self, loss: float) -> Signal | None:
        """Feed one loss; return ``NONFINITE``, ``SPIKE`` or ``None``."""
        if not math.isfinite(loss):
            return Signal.NONFINITE
        if self.count == 0:
            self.recent.append(loss)
            self.mean, self.count = loss, 1
            return None
        std, level = self._noise(), self.mean
        excess = loss - level
        self.last_zscore = excess / std if std > 0 else (math.inf if excess > 0 else 0.0)
        is_spike = (
            self.count >= self.min_observations
            and self.last_zscore > self.zscore
            and excess > (self.ratio - 1.0) * abs(level)
            and (std > 0 or level != 0)  # an all-zero stream has no scale to measure by
        )
        diff = loss - self.recent[-1]
        self.diffs.append(abs(diff))
        if self.var > 0:
            limit = self.zscore * math.sqrt(self.var)
        else:  # no spread seen yet (a constant stream): clip at the ratio threshold
            limit = (self.ratio - 1.0) * abs(level)
        diff = max(-limit, min(limit, diff))
        weight = max(self.alpha, 1.0 / self.count)  # a running mean until 1 / alpha differences
        var = self.var + weight * (diff * diff - self.var)
        if math.isfinite(var):  # else a loss so far out (~1e154) that its square overflows
            self.var = var
        self.recent.append(loss)
        self.mean = _median(self.recent)
        self.count += 1
        return Signal.SPIKE if is_spike else None

    def rebase(self, level: float) -> None:
        """A lasting level shift: the level moves to ``level`` (the window is filled with it; the
        noise estimate stays), so the losses at the new level are normal from the next one on."""
        self.recent = deque([level] * max(1, len(self.recent)), maxlen=self.window)
        self.mean = level
        self.last_zscore = 0.0

    def state_dict(self) -> dict[str, Any]:
        """The changing statistics (not the configuration)."""
        return {
            "recent": list(self.recent),
            "mean": self.mean,
            "var": self.var,
            "diffs": list(self.diffs),
            "count": self.count,
            "last_zscore": self.last_zscore,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a state of the older EMA detector, without
        ``recent``, restarts the window from its mean; one without ``diffs``, the cap's window)."""
        self.recent = deque(state.get("recent", [state["mean"]]), maxlen=self.window)
        self.mean = state["mean"]
        self.var = state["var"]
        self.diffs = deque(state.get("diffs", []), maxlen=self.window)
        self.count = state["count"]
        self.last_zscore = state["last_zscore"]
