"""Plateau: the smoothed training loss has stopped improving.

Statistic: an EMA of the per-step loss (``alpha``) compared with the best EMA
seen so far. An update improves when ``ema < best - min_delta * |best|``
(relative threshold, as ``ReduceLROnPlateau(threshold_mode="rel")``);
``PLATEAU`` fires after ``patience`` updates in a row without improvement. After
a firing the detector ignores ``cooldown`` updates and keeps ``best``, so a
stream that stays flat fires again after ``cooldown + patience`` more updates.

Why: torch/Keras ``ReduceLROnPlateau`` works on an epoch metric; the surgeon
sees the noisy step-level training loss, so it smooths first (default
``alpha=0.02``, a ~50-step time constant) and counts patience in steps.
Defaults ``min_delta=1e-3`` and ``patience=500``/``cooldown=500`` are starting
points; the controller scales patience and cooldown with the run length.
"""

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
        alpha: float = 0.02,
    ) -> None:
        check_positive_int("plateau_patience", patience)
        check_in_range("plateau_min_delta", min_delta, 0.0, 1.0, low_open=False, high_open=True)
        check_positive_int("plateau_cooldown", cooldown, allow_zero=True)
        check_in_range("plateau_alpha", alpha, 0.0, 1.0, low_open=True, high_open=False)
        self.patience = patience
        self.min_delta = min_delta
        self.cooldown = cooldown
        self.alpha = alpha
        self.reset()

    def reset(self) -> None:
        """Forget the best value and all counters."""
        self.ema: float | None = None
        self.best: float | None = None
        self.bad_steps = 0
        self.cooldown_left = 0

    def update(self, loss: float) -> Signal | None:
        """Feed one finite loss; return ``PLATEAU`` when patience has run out."""
        self.ema = loss if self.ema is None else self.ema + self.alpha * (loss - self.ema)
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
            "ema": self.ema,
            "best": self.best,
            "bad_steps": self.bad_steps,
            "cooldown_left": self.cooldown_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.ema = state["ema"]
        self.best = state["best"]
        self.bad_steps = state["bad_steps"]
        self.cooldown_left = state["cooldown_left"]
