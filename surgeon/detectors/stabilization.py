"""Stabilization: is the loss still falling steeply, has it settled, or is it rising?

Paces the automatic warmup's ramp: slow while the loss falls steeply, paused while it rises,
finished quickly once it has settled.

Statistic: the relative drop of an exponential moving average (EMA, span ``window``,
``alpha = 2 / (window + 1)``) of the loss over the last ``window`` updates,

    drop_t = (ema_{t-window} - ema_t) / |ema_{t-window}|,

judged against its own noise. The loss's step-to-step noise ``sigma`` comes from first
differences (``sigma^2`` = half an EMA of ``(x_t - x_{t-1})^2``, as in the spike detector: a
trend hardly enters it); an EMA of independent noise has the standard deviation
``sigma * sqrt(alpha / (2 - alpha))``, and the difference of two EMAs ``window`` steps apart
(nearly independent) ``sqrt(2)`` times that, so the noise of ``drop_t`` is

    noise_t = sqrt(2) * sigma * sqrt(alpha / (2 - alpha)) / |ema_{t-window}|.

Each update is one of

* **steep**: ``drop_t - Z * noise_t > threshold``: falling faster than ``threshold`` per window
  beyond doubt (``Z = 2``);
* **rising**: ``-drop_t > max(threshold, Z * noise_t)``: the EMA rose by more than
  ``threshold`` per window, and by more than its noise (returns ``RISING``);
* **creeping up**: rising beyond its noise, but by less than ``threshold``: not settled;
* **settled**: none of these. ``STABILIZED`` fires once ``patience`` settled updates came in a row
  *after* a descent was seen (``steep_seen``: ``patience`` steep updates in a row, not the few
  steps a loss takes to settle from its initial value): the descent that starts a run (or
  follows a plateau) has ended. A rising or creeping update resets the count, so the loss
  never counts as settled while it measurably rises.

Why: AutoWU (Kim et al., 2021) ends warmup when the smoothed loss stops decreasing; early in
training the loss falls by a large fraction per window, later it creeps. A fixed threshold on
the raw drop cannot tell a creeping loss from a noisy one (a 32-window char-LM batch has ~8%
noise: a 10-step EMA drop has ~4% noise); judged against its noise it can, and a rise of the
loss (a catapult: Kalra & Barkeshli 2024, the LR passed the stability edge) is told apart from
a flat stretch. Defaults: ``window=50`` updates, ``threshold=0.02``, ``patience=10``; the
controller scales the window with the run length.
"""

import math
from collections import deque
from typing import Any

from surgeon._validate import check_in_range, check_positive_int
from surgeon.detectors import Signal

_TINY = 1e-300  # only guards a zero EMA: any other scale gives the same relative drop
SIGNIFICANCE = 2.0
"""``Z``: how many noise standard deviations make a drop steep or a rise real."""


class StabilizationDetector:
    """Tells a steep descent (``None``), a settled loss (``STABILIZED``) and a rise (``RISING``)."""

    def __init__(self, window: int = 50, threshold: float = 0.02, patience: int = 10) -> None:
        check_positive_int("stabilize_window", window)
        check_in_range("stabilize_threshold", threshold, 0.0, 1.0, low_open=True, high_open=True)
        check_positive_int("stabilize_patience", patience)
        self.window = window
        self.threshold = threshold
        self.patience = patience
        self.alpha = 2.0 / (window + 1)
        self._ema_noise = math.sqrt(2.0 * self.alpha / (2.0 - self.alpha))
        self.reset()

    def reset(self) -> None:
        """Forget every loss seen so far."""
        self.ema: float | None = None
        self.history: deque[float] = deque(maxlen=self.window + 1)
        self.streak = 0
        self.last_drop: float | None = None
        self.last_noise = 0.0
        self.steep_seen = False
        self.steep_run = 0
        self.rise_run = 0
        self.rise_base = 0.0
        self.count = 0
        self.prev = 0.0
        self.diff_var = 0.0

    def update(self, loss: float) -> Signal | None:
        """Feed one finite loss; return ``RISING``, ``STABILIZED`` or ``None``."""
        self.count += 1
        if self.count > 1:
            diff = loss - self.prev
            weight = max(self.alpha, 1.0 / (self.count - 1))
            var = self.diff_var + weight * (diff * diff - self.diff_var)
            if math.isfinite(var):
                self.diff_var = var
        self.prev = loss
        self.ema = loss if self.ema is None else self.ema + self.alpha * (loss - self.ema)
        self.history.append(self.ema)
        if len(self.history) <= self.window:
            return None
        old = max(abs(self.history[0]), _TINY)
        self.last_drop = (self.history[0] - self.ema) / old
        self.last_noise = math.sqrt(self.diff_var / 2.0) * self._ema_noise / old
        margin = SIGNIFICANCE * self.last_noise
        if -self.last_drop > max(self.threshold, margin):
            self.streak = self.steep_run = 0
            if self.rise_run == 0:  # where this rise started: the EMA a window ago
                self.rise_base = self.history[0]
            self.rise_run += 1
            return Signal.RISING
        self.rise_run = 0
        if self.last_drop - margin > self.threshold:
            self.steep_run += 1
            self.steep_seen = self.steep_seen or self.steep_run >= self.patience
            self.streak = 0
            return None
        self.steep_run = 0
        if -self.last_drop > margin:  # creeping up: less than the threshold, beyond the noise
            self.streak = 0
            return None
        self.streak += 1
        return Signal.STABILIZED if self.steep_seen and self.streak >= self.patience else None

    def restart_rise(self) -> None:
        """Measure any further rise from the current EMA (the caller acted on this one)."""
        self.rise_run, self.rise_base = 1, self.ema if self.ema is not None else 0.0

    def state_dict(self) -> dict[str, Any]:
        """The changing counters and statistics (not the configuration)."""
        return {
            "ema": self.ema,
            "history": list(self.history),
            "streak": self.streak,
            "last_drop": self.last_drop,
            "last_noise": self.last_noise,
            "steep_seen": self.steep_seen,
            "steep_run": self.steep_run,
            "rise_run": self.rise_run,
            "rise_base": self.rise_base,
            "count": self.count,
            "prev": self.prev,
            "diff_var": self.diff_var,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (older states: no noise estimate yet)."""
        self.ema = state["ema"]
        self.history = deque(state["history"], maxlen=self.window + 1)
        self.streak = state["streak"]
        self.last_drop = state.get("last_drop")
        self.last_noise = state.get("last_noise", 0.0)
        self.steep_seen = state.get("steep_seen", False)
        self.steep_run = state.get("steep_run", 0)
        self.rise_run = state.get("rise_run", 0)
        self.rise_base = state.get("rise_base", 0.0)
        self.count = state.get("count", len(self.history))
        self.prev = state.get("prev", self.ema if self.ema is not None else 0.0)
        self.diff_var = state.get("diff_var", 0.0)
