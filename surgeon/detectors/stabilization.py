"""Stabilization: has the loss stopped falling steeply? Ends the automatic warmup.

Statistic: the relative drop of an exponential moving average (EMA) of the
loss over the last ``window`` updates,

    drop_t = (ema_{t-window} - ema_t) / |ema_{t-window}|,

and the detector fires ``STABILIZED`` once ``drop_t < threshold`` has held for
``patience`` consecutive updates. The EMA uses span ``window``
(``alpha = 2 / (window + 1)``) so its noise is small against the drop it is
compared with; a loss that rises also counts as settled.

Why: AutoWU (Kim et al., 2021) ends warmup when the smoothed loss stops
decreasing; early in training the loss falls by a large fraction per window,
later it creeps. Defaults: ``window=50`` updates, ``threshold=0.02`` (less than
2% drop per window), ``patience=10``; the controller scales the window with the
run length.
"""

from collections import deque
from typing import Any

from surgeon._validate import check_in_range, check_positive_int
from surgeon.detectors import Signal

_TINY = 1e-300  # only guards a zero EMA: any other scale gives the same relative drop


class StabilizationDetector:
    """Fires when the EMA's relative drop over ``window`` updates stays below ``threshold``."""

    def __init__(self, window: int = 50, threshold: float = 0.02, patience: int = 10) -> None:
        check_positive_int("stabilize_window", window)
        check_in_range("stabilize_threshold", threshold, 0.0, 1.0, low_open=True, high_open=True)
        check_positive_int("stabilize_patience", patience)
        self.window = window
        self.threshold = threshold
        self.patience = patience
        self.alpha = 2.0 / (window + 1)
        self.reset()

    def reset(self) -> None:
        """Forget every loss seen so far."""
        self.ema: float | None = None
        self.history: deque[float] = deque(maxlen=self.window + 1)
        self.streak = 0
        self.last_drop: float | None = None

    def update(self, loss: float) -> Signal | None:
        """Feed one finite loss; return ``STABILIZED`` while the drop has stayed small."""
        self.ema = loss if self.ema is None else self.ema + self.alpha * (loss - self.ema)
        self.history.append(self.ema)
        if len(self.history) <= self.window:
            return None
        old = self.history[0]
        self.last_drop = (old - self.ema) / max(abs(old), _TINY)
        self.streak = self.streak + 1 if self.last_drop < self.threshold else 0
        return Signal.STABILIZED if self.streak >= self.patience else None

    def state_dict(self) -> dict[str, Any]:
        """The changing counters and statistics (not the configuration)."""
        return {
            "ema": self.ema,
            "history": list(self.history),
            "streak": self.streak,
            "last_drop": self.last_drop,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.ema = state["ema"]
        self.history = deque(state["history"], maxlen=self.window + 1)
        self.streak = state["streak"]
        self.last_drop = state.get("last_drop")
