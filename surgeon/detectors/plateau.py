"""Plateau: the smoothed training loss has stopped improving.

Statistic: an EMA of the per-step loss compared with the best EMA seen so far.
An update improves when ``ema < best - min_delta * |best|`` (relative
threshold, as ``ReduceLROnPlateau(threshold_mode="rel")``); ``PLATEAU`` fires
after ``patience`` updates in a row without improvement. After a firing the
detector ignores ``cooldown`` updates and keeps ``best``, so a stream that stays
flat fires again after ``cooldown + patience`` more updates.

Why: torch/Keras ``ReduceLROnPlateau`` works on an epoch metric; the surgeon
sees the noisy step-level training loss, so it smooths first. The EMA's span
defaults to ``patience`` (``alpha = 2 / (patience + 1)``): the noise is averaged
over the same horizon on which progress is demanded. The EMA starts as a
running mean (weight ``max(alpha, 1 / n)`` for the n-th loss) and no best is
kept until ``1 / alpha`` losses are in, so one lucky early batch cannot become a
best that the smoothed loss never beats. ``min_delta=1e-3`` as a relative
threshold follows torch's default order of magnitude (1e-4) for a noisier signal.
"""

import math
from typing import Any

from surgeon._validate import check_in_range, check_positive_int
from surgeon.detectors import Signal


class PlateauDetector:
    """Fires when the loss EMA has not improved by ``min_delta`` (relative) for ``patience``."""

    def __init__(
        self,
        patience: int = 500,
        min_delta: float = 1e-3,
        cooldown: int = 500,
        alpha: float | None = None,
    ) -> None:
        check_positive_int("plateau_patience", patience)
        check_in_range("plateau_min_delta", min_delta, 0.0, 1.0, low_open=False, high_open=True)
        check_positive_int("plateau_cooldown", cooldown, allow_zero=True)
        alpha = 2.0 / (patience + 1) if alpha is None else alpha
        check_in_range("plateau_alpha", alpha, 0.0, 1.0, low_open=True, high_open=False)
        self.patience = patience
        self.min_delta = min_delta
        self.cooldown = cooldown
        self.alpha = alpha
        # losses before a best is kept: 1 / alpha, as an int (2 / (p + 1) x 49 may be 0.99..)
        self._warm_count = math.ceil(1.0 / alpha - 1e-9)
        self.reset()

    def reset(self) -> None:
        """Forget the best value and all counters."""
        self.count = 0
        self.ema: float | None = None
        self.best: float | None = None
        self.bad_steps = 0
        self.cooldown_left = 0

    def update(self, loss: float) -> Signal | None:
        """Feed one finite loss; return ``PLATEAU`` when patience has run out."""
        self.count += 1
        weight = max(self.alpha, 1.0 / self.count)  # a running mean until the span is filled
        self.ema = loss if self.ema is None else self.ema + weight * (loss - self.ema)
        if self.count < self._warm_count:
            return None  # still warming up: no best yet
        if self.best is None or self.ema < self.best - self.min_delta * abs(self.best):
            self.best = self.ema
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_steps = 0
            return None
        if self.bad_steps >= self.patience:
            self.bad_steps = 0
            self.cooldown_left = self.cooldown
            return Signal.PLATEAU
        return None

    def state_dict(self) -> dict[str, Any]:
        """The changing counters and statistics (not the configuration)."""
        return {
            "count": self.count,
            "ema": self.ema,
            "best": self.best,
            "bad_steps": self.bad_steps,
            "cooldown_left": self.cooldown_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.count = state["count"]
        self.ema = state["ema"]
        self.best = state["best"]
        self.bad_steps = state["bad_steps"]
        self.cooldown_left = state["cooldown_left"]
