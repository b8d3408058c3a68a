"""The surgeon's settings: one validated dataclass shared by the controller and the callback.

Lengths are ``Steps``: an ``int`` counts optimizer steps, a ``float`` in (0, 1]
is a fraction of the planned total; both resolve with :func:`resolve_steps`
once the total is known.
"""

import math
import numbers
from dataclasses import dataclass, fields
from typing import Literal

from surgeon._validate import check_in_range, check_positive_int, plain_int

Steps = int | float
WarmupMode = Literal["auto"] | int | float
DecayName = Literal["cosine", "linear", "sqrt", "wsd"]
PlateauAction = Literal["cut", "restart"]
PeakLR = Literal["optimizer", "find"]

DECAY_NAMES: tuple[str, ...] = ("cosine", "linear", "sqrt", "wsd")
PLATEAU_ACTIONS: tuple[str, ...] = ("cut", "restart")
PEAK_LR_MODES: tuple[str, ...] = ("optimizer", "find")
_RESTART_PEAK = 0.5


def check_steps(name: str, value: Steps) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 0 or a float fraction in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"{name} must be an int (steps) or a float in (0, 1], got {name}={value!r}"
        )
    if isinstance(value, int):
        check_positive_int(name, value, allow_zero=True)
    elif not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(
            f"{name} as a float is a fraction of the total steps and must be in (0, 1], "
            f"got {name}={value!r}"
        )


def resolve_steps(name: str, value: Steps, total_steps: int, minimum: int = 0) -> int:
    """Steps for ``value``: an int as is, a fraction as ``round(value * total)``; >= minimum."""
    check_steps(name, value)
    steps = value if isinstance(value, int) else round(value * total_steps)
    return max(minimum, steps)


@dataclass(frozen=True, kw_only=True)
class SurgeonConfig:
    """Every knob of the controller, validated on construction."""

    warmup: WarmupMode = "auto"
    """``"auto"``: a linear ramp at the pace of a ``max_warmup``-step ramp, paused while the loss
    rises, finished at the pace of a ``min_warmup``-step ramp once the loss has stabilized
    after its initial descent; a length (an int of steps or a float fraction of the run): a
    fixed linear warmup that long."""
    min_warmup: Steps = 0.02
    """Shortest automatic warmup: the pace (a 0-to-peak ramp of this many steps) at which the
    ramp finishes once the loss has stabilized."""
    max_warmup: Steps = 0.1
    """Longest automatic warmup: the pace of the ramp while the loss still falls steeply (it
    reaches the peak here unless held); the warmup ends here at the latest."""
    min_lr_ratio: float = 0.0
    """The floor: decay ends at ``min_lr_ratio x`` each group's peak LR; cuts never go lower.
    0 (decay to zero): Bergsma et al. 2025, "Straight to zero"."""
    decay: DecayName = "wsd"
    """Shape from the peak to the floor: ``"wsd"`` holds the peak, then decays linearly over
    the last ``wsd_decay_fraction`` of the steps that remain (by default half: between WSD's
    short tail, Hägele et al. 2024, and linear to zero, Bergsma et al. 2025; the best of the
    shapes measured on the outcome benchmark); ``"linear"``, ``"cosine"``, ``"sqrt"``: from
    the peak right after warmup."""
    wsd_decay_fraction: float = 0.5
    """Share of the steps after warmup that the ``"wsd"`` tail spends decaying (``surgeon
    preview wsd`` and :func:`surgeon.schedules.wsd` take WSD's usual 0.2)."""

    stabilize_window: Steps = 0.01
    """Window (at least 10 steps) over which the loss EMA's relative drop is measured."""
    stabilize_threshold: float = 0.02
    """Drop per window that tells steep from settled: steep when the EMA falls faster than this
    beyond twice its noise; rising when it rises more than this and than twice its noise."""
    stabilize_patience: int = 10
    """Consecutive updates a state must hold: settled (stabilized), steep (a descent seen),
    rising after warmup (a climb)."""

    plateau_patience: Steps = 0.1
    """Steps (at least 10) without a ``plateau_min_delta`` improvement of the smoothed loss
    before acting; a cut acts only in a hold at the peak (``wsd``), never in a decay."""
    plateau_min_delta: float = 1e-3
    """Relative improvement of the loss EMA that counts as progress."""
    plateau_cooldown: Steps = 0.1
    """Steps after a plateau response during which the plateau detector stays quiet."""
    plateau_factor: float = 0.5
    """A plateau cut multiplies the LR by this factor (never below the floor)."""
    plateau_action: PlateauAction = "cut"
    """``"cut"``: multiply the LR and keep decaying; ``"restart"``: re-warm to
    ``restart_peak`` over ``restart_warmup`` steps, then decay again (SGDR-like)."""
    max_restarts: int = 2
    """Restarts allowed before a plateau falls back to a cut."""
    restart_peak: float = _RESTART_PEAK
    """LR a restart re-warms to, as a fraction of the peak."""
    restart_warmup: Steps = 0.01
    """Length of a restart's re-warm ramp."""

    spike_zscore: float = 6.0
    """A loss this many noise standard deviations (from first differences) above the running
    level (the median of the last 16 losses) may be a spike."""
    spike_ratio: float = 1.5
    """...and it must also exceed this multiple of the running level; a loss that climbs this
    far over its level after warmup lowers the peak."""
    spike_factor: float = 0.5
    """A spike or a non-finite loss multiplies the LR by this factor; a spike while the LR
    comes back from a cut (or a climb) lowers the peak to this factor x the LR it happened at."""
    spike_cooldown: Steps = 0.01
    """Steps (at least 1) the cut LR is held before recovery may start, counted from the first
    LR the cut reaches (losses are read a few steps late), so it is applied this long also on a
    short run; the recovery is judged on the losses of the cut, read late too."""
    spike_recovery: Steps = 0.02
    """Steps (at least 1) over which the LR ramps back once the loss is in its normal band."""

    snapshot_every: Steps = 0.01
    """Steps (at least 10) between last-good snapshots of model and optimizer state; a snapshot
    is kept only if the loss of its step turns out to be in its normal band."""
    rollback_threshold: float = 4.0
    """A spike whose loss is at least this multiple of the running mean restores the last good
    snapshot (as do ``rollback_nonfinite`` non-finite steps in a row); smaller spikes only cut."""
    rollback_nonfinite: int = 3
    """Non-finite steps (loss or gradients) in a row that restore the last good snapshot."""

    peak_lr: PeakLR = "optimizer"
    """``"optimizer"``: each group's configured LR is its peak; ``"find"``: an LR range test
    (Lightning's LR finder) before training sets the peak, keeping the groups' LR ratios."""
    find_min_lr: float = 1e-7
    """Lowest LR of the range test (``peak_lr="find"``)."""
    find_max_lr: float = 1.0
    """Highest LR of the range test."""
    find_steps: int = 100
    """Optimizer steps of the range test (fewer if the loss diverges first)."""

    def __post_init__(self) -> None:
        for item in fields(self):  # numpy integers (lengths computed with numpy)
            value = getattr(self, item.name)
            if plain_int(value) is not value:
                object.__setattr__(self, item.name, plain_int(value))
        if self.warmup != "auto":
            if isinstance(self.warmup, bool) or not isinstance(self.warmup, int | float):
                raise ValueError(
                    "warmup must be 'auto', an int (steps) or a float in (0, 1] (a fraction of "
                    f"the run), got warmup={self.warmup!r}"
                )
            check_steps("warmup", self.warmup)
        for name in (
            "min_warmup",
            "max_warmup",
            "stabilize_window",
            "plateau_patience",
            "plateau_cooldown",
            "restart_warmup",
            "spike_cooldown",
            "spike_recovery",
            "snapshot_every",
        ):
            check_steps(name, getattr(self, name))
        counts = [isinstance(v, numbers.Integral) for v in (self.min_warmup, self.max_warmup)]
        if counts[0] == counts[1] and self.min_warmup > self.max_warmup:  # both steps or fractions
            raise ValueError(
                "min_warmup must be <= max_warmup, "
                f"got min_warmup={self.min_warmup!r}, max_warmup={self.max_warmup!r}"
            )
        check_in_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, low_open=False, high_open=False)
        if self.decay not in DECAY_NAMES:
            raise ValueError(f"decay must be one of {DECAY_NAMES}, got decay={self.decay!r}")
        check_in_range(
            "wsd_decay_fraction", self.wsd_decay_fraction, 0.0, 1.0, low_open=True, high_open=False
        )
        check_in_range(
            "stabilize_threshold", self.stabilize_threshold, 0.0, 1.0, low_open=True, high_open=True
        )
        check_positive_int("stabilize_patience", self.stabilize_patience)
        check_in_range(
            "plateau_min_delta", self.plateau_min_delta, 0.0, 1.0, low_open=False, high_open=True
        )
        for name in ("plateau_factor", "spike_factor"):
            check_in_range(name, getattr(self, name), 0.0, 1.0, low_open=True, high_open=False)
        if self.plateau_action not in PLATEAU_ACTIONS:
            raise ValueError(
                f"plateau_action must be one of {PLATEAU_ACTIONS}, "
                f"got plateau_action={self.plateau_action!r}"
            )
        check_positive_int("max_restarts", self.max_restarts, allow_zero=True)
        check_in_range("restart_peak", self.restart_peak, 0.0, 1.0, low_open=True, high_open=False)
        restarts = self.plateau_action == "restart" and self.max_restarts > 0
        if restarts and self.restart_peak < self.min_lr_ratio:  # otherwise it is never used
            default = " (its default)" if self.restart_peak == _RESTART_PEAK else ""
            raise ValueError(
                "restart_peak must be >= min_lr_ratio when plateau_action='restart' (a restart "
                f"re-warms to restart_peak x the peak, not below the floor), got "
                f"restart_peak={self.restart_peak!r}{default}, min_lr_ratio={self.min_lr_ratio!r}"
                "; raise restart_peak"
            )
        check_in_range(
            "spike_zscore", self.spike_zscore, 0.0, math.inf, low_open=True, high_open=True
        )
        check_in_range(
            "spike_ratio", self.spike_ratio, 1.0, math.inf, low_open=False, high_open=True
        )
        check_in_range(
            "rollback_threshold",
            self.rollback_threshold,
            1.0,
            math.inf,
            low_open=False,
            high_open=True,
        )
        check_positive_int("rollback_nonfinite", self.rollback_nonfinite)
        if self.peak_lr not in PEAK_LR_MODES:
            raise ValueError(
                f"peak_lr must be one of {PEAK_LR_MODES}, got peak_lr={self.peak_lr!r}"
            )
        for name in ("find_min_lr", "find_max_lr"):
            check_in_range(name, getattr(self, name), 0.0, math.inf, low_open=True, high_open=True)
        if self.find_min_lr >= self.find_max_lr:
            raise ValueError(
                "find_min_lr must be below find_max_lr (the range test's LRs), got "
                f"find_min_lr={self.find_min_lr!r}, find_max_lr={self.find_max_lr!r}"
            )
        check_positive_int("find_steps", self.find_steps)


CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SurgeonConfig))
