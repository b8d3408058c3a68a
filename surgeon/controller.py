"""The surgeon's brain: a phase machine over the loss stream, free of torch and Lightning.

Feed it one float per optimizer step with :meth:`Controller.update`; ask it for
the LR multiplier of any coming step with :meth:`Controller.lr_scale`. The LR a
param group gets is ``its own base LR x lr_scale(step)``, so group ratios hold.

The multiplier is ``base(step) x intervention(step)``:

* ``base`` is a *plan*, a ramp-hold-decay curve built from :mod:`surgeon.schedules`
  and re-planned only by decisions, each an event whose reason quotes its numbers:

  - **warmup** (``warmup="auto"``): a linear ramp from ~0 at the pace of a ``max_warmup``-step
    ramp, *paused* while the loss rises (``ramp_pause``/``ramp_resume``: a catapult, the LR
    passed the stability edge; Kalra & Barkeshli 2024), *finished* at the pace of a
    ``min_warmup``-step ramp once the loss has stabilized after its initial descent
    (``warmup_end``; AutoWU, Kim et al. 2021). A loss that is still falling steeply keeps the
    slow ramp to its end; one still rising at ``max_warmup`` makes the LR it reached the peak.
    The stabilization detector tells steep, settled and rising apart against the loss's own
    noise;
  - **decay** from the peak to the floor (0 by default): ``wsd`` (the default) holds the peak
    first, then decays linearly over the last ``wsd_decay_fraction`` (half) of the steps
    after warmup; ``linear``, ``cosine``, ``sqrt`` decay right after warmup;
  - **ceilings**: the peak is lowered for the rest of the run when the LR proves too high for
    the run: a second confirmed spike while the LR is still cut (once per cut: a storm is one
    verdict), a spike while the LR is coming back from the last cut (or soon after), a loss that
    keeps rising after warmup by more than ``spike_ratio`` (``climb``), a loss still rising at
    ``max_warmup``;
  - **plateau**: a stall during a hold at the peak (``wsd``) cuts the LR; a decay is left alone
    (it lowers the LR already); ``plateau_action="restart"`` re-warms;
* ``intervention`` is 1 except after a spike or a non-finite loss: cut by
  ``spike_factor``, held for ``spike_cooldown`` steps, and ramped back to 1 over
  ``spike_recovery`` steps once the loss is back in its normal band (a spike during the warmup
  ramp also pauses it). A spike is acted on only once the *next* loss confirms it (still out
  of its normal band, or non-finite): the weights the next loss is measured on are the ones
  the spike would have damaged, so a next loss back in its band says the spike was one hard
  batch, an ``outlier`` event with no cut and no rollback. A non-finite loss acts at once.

Rollback: the caller keeps last-good snapshots of the weights and tells the
controller when it took one (:meth:`Controller.snapshot_due`, every ``snapshot_every``
steps, :meth:`Controller.snapshot_taken`); a snapshot becomes the rollback target once
the loss of its step is read and is in the normal band. A confirmed spike of at least
``rollback_threshold x`` the running mean, or ``rollback_nonfinite`` non-finite
steps in a row, sets :attr:`Controller.rollback_to`; the caller restores that
snapshot and calls :meth:`Controller.rolled_back`, which records the event and
ignores the losses of the undone steps that are still on their way. Never further back
than two snapshot intervals before the bad step (at most :attr:`Controller.max_undone_steps`
steps with an update undone, the read-back lag included; three from where NaN/inf weights or
optimizer state are found, :data:`STATE_REACH`), and never twice in a row to the same snapshot:
until a loss in the normal band has been read after a rollback, further trouble skips and
cuts, and a spike then is a lasting level shift (the good weights give it too), not damage:
the running mean moves to it. A run of non-finite steps that lasts two snapshot intervals with
nothing to roll back to stops the run (a ``stalled`` event, :attr:`Controller.stalled`).

Time: the loss passed to the ``n``-th call of ``update`` belongs to step ``n``
(counting from 0); a decision made on it takes effect from step ``n + 1`` and is
recorded as an :class:`Event` at step ``n``. Both curves are closed-form in the
step, so ``lr_scale`` may be asked for steps ahead of the last loss (the callback
reads losses a few steps late, on every device) and the answer is a pure function of the
losses seen.
"""

import itertools
import math
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any

from surgeon import schedules
from surgeon._validate import check_positive_int
from surgeon.config import SurgeonConfig, resolve_steps
from surgeon.detectors import PlateauDetector, Signal, SpikeDetector, StabilizationDetector

STATE_REACH = 3
"""How many snapshot intervals a rollback for NaN/inf weights or optimizer state reaches back
from the step it is found at (a loss's rollback: 2): the damage lies somewhere in the interval
before the snapshot whose check finds it, and it never heals (Adam's inf second moment stops
those weights for the rest of the run), so one more interval is worth undoing."""
NORMAL_BAND_ZSCORE = 3.0
"""A loss within this many running standard deviations of the running mean is 'normal'."""

_PLAN_SETTINGS = frozenset(
    {"decay", "wsd_decay_fraction", "min_lr_ratio", "warmup", "min_warmup", "max_warmup"}
)
"""Settings the plan is built from: changed on a resume, the rest is re-planned over them."""

_MIN_STABILIZE_WINDOW = 10
_MIN_PEAK = 1e-12  # a lowered peak stays positive even with a floor of 0
_MIN_PLATEAU_PATIENCE = 10  # a shorter stall is noise: on a 60-step run 10% is 6 steps
_MIN_SNAPSHOT_EVERY = 10
_REVISIONS = itertools.count()  # shared by all controllers, so that a revision names one of them

SNAPSHOTS_OFF = "snapshots are off (snapshot='off', or a Surgeon without model=)"
"""Why no rollback can happen in a run without snapshots (a refused rollback's reason)."""


def _as_loss(loss: Any) -> float:
    """``loss`` as a float: a real number (a numpy or 0-d/one-element torch scalar too), or a
    ``ValueError`` saying what was passed (``True`` is not a loss; a value too large for a
    float is inf)."""
    if isinstance(loss, float):
        return loss
    dtype = getattr(loss, "dtype", None)  # a tensor's or an array's: bool and complex are no loss
    odd = dtype is not None and any(kind in str(dtype) for kind in ("bool", "complex"))
    if odd or isinstance(loss, bool | str | bytes | complex) or loss is None:
        raise ValueError(
            f"update(loss) takes the step's loss as a real number, got {type(loss).__name__}: "
            f"{loss!r:.80}"
        )
    try:
        return float(loss)
    except OverflowError:
        return math.inf if loss > 0 else -math.inf
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"update(loss) takes the step's loss as a real number, got {type(loss).__name__}: "
            f"{loss!r:.80} ({err})"
        ) from None


def _ratio_words(factor: float, mean: float, of: str) -> str:
    """The ratio tests' threshold in words: ``loss - mean >= (factor - 1) |mean|`` is ``factor x``
    a positive mean, and ``factor - 1`` times the size of a mean <= 0 above it."""
    return f"{factor:g}x {of}" if mean > 0 else f"{factor - 1.0:g}x |mean| above {of}"


def plural(count: int, noun: str) -> str:
    """``"1 check"``, ``"2 checks"``: a count in an event's reason."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _steps(count: int, kind: str = "") -> str:
    """``"1 step"``, ``"2 steps"``, ``"3 non-finite steps"``."""
    return plural(count, f"{kind}step")


def _format_bytes(nbytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} bytes"


END_UNREAD_MARK = "its end was not read"
"""In the reason of the ``stopped`` event of a fit that raised with its last losses unread: its
end made no decision (``surgeon replay`` makes none there either)."""

STATE_ROLLBACK_MARK = "non-finite weights or optimizer state"
"""In the reason of a rollback the engine asked for from a snapshot's NaN/inf check, not from
a loss (a replay of the losses does not make it)."""


class Phase(str, Enum):
    """Where the run is in its lifetime; interventions are events, not phases.

    After warmup the phase follows the plan: ``STABLE`` while it holds its level (the
    ``wsd`` hold, a restart's re-warm), ``DECAY`` in its decay; ``DONE`` past ``total_steps``.
    Every change of phase is an event (``warmup_end``, ``decay_start``, ``done``, or the
    decision that re-planned)."""

    WARMUP = "warmup"
    STABLE = "stable"
    DECAY = "decay"
    DONE = "done"


class EventKind(str, Enum):
    """What the controller decided."""

    WARMUP_END = "warmup_end"
    PLATEAU = "plateau"
    RESTART = "restart"
    SPIKE = "spike"
    NONFINITE = "nonfinite"
    RECOVERED = "recovered"
    SKIPPED_STEP = "skipped_step"
    """The step's optimizer update was not applied (non-finite loss or gradients)."""
    ROLLBACK = "rollback"
    """Weights and optimizer state went back to the last good snapshot."""
    DECAY_START = "decay_start"
    """The plan's hold at its level ended; the decay to the floor begins (phase ``decay``)."""
    DONE = "done"
    """The planned length is over; the LR stays at the floor (phase ``done``)."""
    REPLAN = "replan"
    """The planned length changed (a resumed run planned for another length, or a ``max_time``
    fit planned from its measured step rate): the rest of the schedule was re-planned over it."""
    COOLDOWN = "cooldown"
    """The run's end was brought forward (a time budget, an ``EarlyStopping`` about to stop the
    fit, or a request): decay from the current level to the floor, and the plan ends there."""
    STOPPED = "stopped"
    """Recorded by the callback: the fit ended before its plan did (the LR never reached the
    end of its schedule)."""
    PEAK_LR = "peak_lr"
    """Recorded by the callback: an LR range test set the peak before step 0."""
    BUFFERS_RESTORED = "buffers_restored"
    """Non-finite values in the module's buffers (e.g. BatchNorm running statistics) were
    replaced by those of the last good snapshot."""
    STALLED = "stalled"
    """Every step was non-finite for two snapshot intervals and nothing was left to roll back
    to: the run cannot make progress and is stopped."""
    RAMP_PAUSE = "ramp_pause"
    """The loss rose during the warmup ramp: the LR holds where it is."""
    RAMP_RESUME = "ramp_resume"
    """The loss is back down (its EMA no higher than a window before): the warmup ramp goes
    on."""
    CLIMB = "climb"
    """After warmup the loss kept rising: the peak (and the LR) is lowered for good."""
    OUTLIER = "outlier"
    """A spike whose next loss is back in the normal band: one hard batch; no action (last,
    so that the codes of the kinds before it stay as they were)."""


@dataclass(frozen=True)
class Event:
    """One decision: at which step, what, why (a sentence with the numbers), LR scale around it,
    and the phase the run is in after the step's decisions (``None``: not recorded)."""

    step: int
    kind: EventKind
    reason: str
    scale_before: float
    scale_after: float
    phase: Phase | None = None
    total_steps: int | None = None
    """The planned length from this event on, for an event that moved the run's end
    (``replan``, ``cooldown``; ``None`` otherwise, or when the plan is open-ended)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``kind`` and ``phase`` as their string values)."""
        phase = None if self.phase is None else self.phase.value
        return {**asdict(self), "kind": self.kind.value, "phase": phase}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Event":
        """Inverse of :meth:`to_dict` (records of older versions have no ``phase``)."""
        phase = data.get("phase")
        return cls(
            **{
                **data,
                "kind": EventKind(data["kind"]),
                "phase": None if phase is None else Phase(phase),
            }
        )


@dataclass
class _Plan:
    """The base curve from ``start`` on: ramp ``v0 -> v1`` over ``ramp`` steps, hold ``v1`` for
    ``hold`` steps (``None``: forever), then ``shape`` from ``v1`` to the floor over ``decay``."""

    start: int
    v0: float
    v1: float
    ramp: int
    hold: int | None
    decay: int
    shape: schedules.DecayShape

    def build(self, floor: float) -> schedules.Schedule:
        """The plan as a schedule of the local step ``step - start``."""
        pieces = [schedules.linear(self.v0, self.v1, self.ramp)] if self.ramp else []
        if self.hold is None:
            return _join([*pieces, schedules.constant(self.v1)], [self.ramp] if pieces else [])
        if self.hold:
            pieces.append(schedules.constant(self.v1))
        pieces.append(schedules.decay_shape(self.shape, self.v1, min(floor, self.v1), self.decay))
        bounds = [self.ramp] if self.ramp else []
        if self.hold:
            bounds.append(self.ramp + self.hold)
        return _join(pieces, bounds)


def _join(pieces: list[schedules.Schedule], bounds: list[int]) -> schedules.Schedule:
    """``schedules.join``, or the only piece itself: the same curve, one call less per step."""
    return pieces[0] if len(pieces) == 1 else schedules.join(pieces, bounds)


@dataclass
class _Intervention:
    """The spike multiplier: ``1`` (normal), ``value`` (holding) or a ramp back to 1."""

    mode: str = "normal"  # "normal" | "hold" | "recover"
    value: float = 1.0
    hold_until: int = 0
    recover_start: int = 0
    recover_steps: int = 1
    lowered: bool = False
    """This hold has lowered the peak already: a storm of spikes inside it lowers it once."""
    answered: float = math.inf
    """The worst loss the hold's last cut answered: a confirmed spike ``rollback_threshold``
    x above it (the loss still exploding at the cut LR) cuts again."""

    def at(self, step: int) -> float:
        """The multiplier for ``step``."""
        if self.mode == "hold":
            return self.value
        if self.mode == "recover":
            progress = min(1.0, max(0, step - self.recover_start) / self.recover_steps)
            return self.value + (1.0 - self.value) * progress
        return 1.0


class Controller:
    """Warmup -> decay -> done, with plateau and spike interventions, driven by loss floats."""

    _pending_snapshot: tuple[int, int] | None  # (step, bytes) taken, not yet confirmed good
    _good_snapshot: tuple[int, int] | None  # the one a rollback restores
    _idle_since_good: int
    _unsettled: tuple[int, str] | None  # see _settle_at_the_end

    def __init__(
        self, total_steps: int, config: SurgeonConfig | None = None, *, lag: int = 0
    ) -> None:
        """``lag``: how many steps after its step's LR was written a loss may arrive at the
        latest (the loss feed's ``2 x readback_every``); snapshots are at least that far apart
        (so each is judged before the next is due), and it is part of the rollback bound."""
        check_positive_int("total_steps", total_steps)
        check_positive_int("lag", lag, allow_zero=True)
        self.lag = lag
        self.written_until = 0
        """The first step whose LR the caller has not written yet, set by a caller that reads
        losses late before each loss (0: none is ahead, the decisions take effect at the next
        step): a cut is held, and a recovery ramps, from the first LR it reaches."""
        self.config = cfg = config if config is not None else SurgeonConfig()
        self.total_steps = total_steps
        self.floor = float(cfg.min_lr_ratio)
        if cfg.warmup == "auto":
            self.min_warmup = resolve_steps("min_warmup", cfg.min_warmup, total_steps)
            self.max_warmup = resolve_steps("max_warmup", cfg.max_warmup, total_steps)
        else:
            self.min_warmup = self.max_warmup = resolve_steps("warmup", cfg.warmup, total_steps)
        names = ("min_warmup", "max_warmup") if cfg.warmup == "auto" else ("warmup", "warmup")
        for name, value in zip(names, (self.min_warmup, self.max_warmup), strict=True):
            if value > total_steps:
                raise ValueError(
                    f"{name} must be <= total_steps, got {name}={value} steps, "
                    f"total_steps={total_steps}"
                )
        if self.min_warmup > self.max_warmup:
            raise ValueError(
                "min_warmup must be <= max_warmup, got "
                f"min_warmup={self.min_warmup} steps, max_warmup={self.max_warmup} steps"
            )
        self.spike_cooldown = resolve_steps("spike_cooldown", cfg.spike_cooldown, total_steps, 1)
        self.spike_recovery = resolve_steps("spike_recovery", cfg.spike_recovery, total_steps, 1)
        self.restart_warmup = resolve_steps("restart_warmup", cfg.restart_warmup, total_steps, 1)
        self.stabilizer = StabilizationDetector(
            window=resolve_steps(
                "stabilize_window", cfg.stabilize_window, total_steps, _MIN_STABILIZE_WINDOW
            ),
            threshold=cfg.stabilize_threshold,
            patience=cfg.stabilize_patience,
        )
        self.plateau = PlateauDetector(
            patience=resolve_steps(
                "plateau_patience", cfg.plateau_patience, total_steps, _MIN_PLATEAU_PATIENCE
            ),
            min_delta=cfg.plateau_min_delta,
            cooldown=resolve_steps("plateau_cooldown", cfg.plateau_cooldown, total_steps),
        )
        self.spike = SpikeDetector(zscore=cfg.spike_zscore, ratio=cfg.spike_ratio)
        self.snapshot_every = resolve_steps(
            "snapshot_every", cfg.snapshot_every, total_steps, max(_MIN_SNAPSHOT_EVERY, lag)
        )
        self.max_undone_steps = 2 * self.snapshot_every + lag
        """The most steps with an update a rollback for a loss undoes: its target is at most two
        snapshot intervals before the step whose loss asked for it, which is read at most
        ``lag`` steps later (steps passed without an update, which undoing loses nothing of,
        come on top)."""
        self.max_undone_state_steps = STATE_REACH * self.snapshot_every + lag
        """The same for a rollback for NaN/inf weights or optimizer state (:data:`STATE_REACH`
        intervals)."""
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to step 0 of warmup with empty statistics and no events."""
        self.step = 0
        self.revision = next(_REVISIONS)
        """Changes whenever :meth:`lr_scale` of the steps to come may have (a new plan, or a step's
        decisions; unique across controllers): scales computed ahead hold while it does."""
        self.phase = Phase.WARMUP
        self.events: list[Event] = []
        self.restarts = 0
        self.paused = False
        self.peak = 1.0
        self.watch_until = 0
        self.nonfinite_streak = 0
        self.nonfinite_applied = False
        """Some step of the current non-finite streak had its update applied (unguarded)."""
        self.ignore_until = 0
        self.rolled_back_to: int | None = None
        """The target of the last rollback, until a loss in the normal band is read after it."""
        self.shifted_level: float | None = None
        """The running mean a confirmed spike after that rollback was taken to shift to (once:
        a loss that keeps rising above it is instability, not another level shift)."""
        self.stalled = False
        """Set by a ``stalled`` event: the run cannot make progress; the caller stops it."""
        self._no_rollback = ""
        self.suspect: dict[str, float] | None = None
        """A spike waiting for the next loss to confirm it (step, loss, level, noise, z)."""
        self.state_check_due: int | None = None
        """The step of a severe outlier just dismissed: the caller checks the weights and
        optimizer state now (a gradient too large to square leaves Adam's second moment inf
        with normal losses after it), then sets it back to ``None``."""
        self.intervention = _Intervention()
        self.forget_snapshots()
        for detector in (self.stabilizer, self.plateau, self.spike):
            detector.reset()
        if self.max_warmup == 0:
            self._set_plan(self._decay_plan(0, 1.0))
            self.phase = self._plan_phase(0)
        else:
            ramp = self.max_warmup
            self._set_plan(self._warmup_plan(0, 1.0 / (ramp + 1), ramp))

    def state_dict(self) -> dict[str, Any]:
        """Counters, statistics, phase, plan, intervention and events (not the configuration,
        not the snapshot bookkeeping: snapshots live in memory only)."""
        return {
            "total_steps": self.total_steps,
            "step": self.step,
            "phase": self.phase.value,
            "plan": asdict(self._plan),
            "intervention": asdict(self.intervention),
            "paused": self.paused,
            "peak": self.peak,
            "watch_until": self.watch_until,
            "restarts": self.restarts,
            "nonfinite_streak": self.nonfinite_streak,
            "nonfinite_applied": self.nonfinite_applied,
            "ignore_until": self.ignore_until,
            "rolled_back_to": self.rolled_back_to,
            "shifted_level": self.shifted_level,
            "suspect": self.suspect,
            "events": [event.to_dict() for event in self.events],
            "stabilizer": self.stabilizer.state_dict(),
            "plateau": self.plateau.state_dict(),
            "spike": self.spike.state_dict(),
        }

    def load_state_dict(
        self,
        state: dict[str, Any],
        *,
        next_step: int | None = None,
        total_steps: int | None = None,
        saved_settings: dict[str, Any] | None = None,
    ) -> None:
        """Restore what :meth:`state_dict` returned; the next LRs match the original's exactly.

        ``total_steps``: the length to plan for from here (default: this controller's);
        ``saved_settings``: the :class:`SurgeonConfig` fields the state was saved with (``None``:
        unknown, taken as this config's). Another length or other settings take full effect
        from ``next_step``, the first step whose LR the caller has not written yet (default:
        the step of the next loss; a caller that reads losses late is ahead), with a ``replan``
        event that says what changed and what was done about it."""
        self.step = state["step"]
        self.phase = Phase(state["phase"])
        self.intervention = _Intervention(**state["intervention"])
        self.paused = state["paused"]
        self.peak = state.get("peak", 1.0)
        self.watch_until = state.get("watch_until", 0)
        self.restarts = state["restarts"]
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        self.nonfinite_applied = state.get("nonfinite_applied", False)
        self.ignore_until = state.get("ignore_until", 0)
        self.rolled_back_to = state.get("rolled_back_to")
        self.shifted_level = state.get("shifted_level")
        self.suspect = state.get("suspect")
        self.forget_snapshots()  # snapshots are not checkpointed: the next one is due at once
        self.events = [Event.from_dict(event) for event in state["events"]]
        self.stabilizer.load_state_dict(state["stabilizer"])
        self.plateau.load_state_dict(state["plateau"])
        self.spike.load_state_dict(state["spike"])
        if total_steps is not None:
            check_positive_int("total_steps", total_steps)
            self.total_steps = total_steps
        current = asdict(self.config)
        changed = {
            name: (old, current[name])
            for name, old in (saved_settings or {}).items()
            if name in current and current[name] != old
        }
        plan = _Plan(**state["plan"])
        saved_total = state.get("total_steps", self.total_steps)
        if saved_total == self.total_steps and not changed:
            self._set_plan(plan)
            return
        step = self.step if next_step is None else next_step
        changes = [f"{name}={new!r} instead of {old!r}" for name, (old, new) in changed.items()]
        if saved_total != self.total_steps:
            length = f"a planned length of {self.total_steps} steps instead of {saved_total}"
            changes.insert(0, length)
        cause = f"resumed at step {step} with {', '.join(changes)}"
        self._replan(step, plan, cause, saved_total != self.total_steps, changed)

    def replan(self, total_steps: int, step: int, cause: str) -> Event:
        """Plan for ``total_steps`` from ``step`` on (the caller learned that the run has another
        length than planned, ``cause`` saying how): the LR goes on from where it is; returns the
        ``replan`` event (recorded)."""
        check_positive_int("total_steps", total_steps)
        self.total_steps = total_steps
        return self._replan(step, self._plan, cause, True, {})

    def _replan(
        self,
        step: int,
        plan: _Plan,
        cause: str,
        new_length: bool,
        changed: dict[str, tuple[Any, Any]],
    ) -> Event:
        """Re-plan from ``step`` after ``plan`` (built with the floor it had) for another length
        or other settings (``changed``: name -> (old, new)): keep the LR where it is; a ramp in
        progress finishes; the decay goes from the current level to the (new) floor over the
        steps left, in the (new) shape (a decay under way goes on without a new hold)."""
        floor = self.floor
        self.floor = changed.get("min_lr_ratio", (floor, floor))[0]
        self._set_plan(plan)
        before, level = self.lr_scale(step), self._level(step)
        decaying = self._plan_phase(step) is Phase.DECAY
        self.floor = floor
        self._set_plan(plan)
        new_shape = new_length or "decay" in changed or "wsd_decay_fraction" in changed
        in_warmup = self.phase is Phase.WARMUP
        warmup_changed = bool({"warmup", "min_warmup", "max_warmup"} & set(changed))
        how = "the plan is unchanged"
        if step >= self.total_steps:  # (the old plan may still be decaying: drop it)
            self._set_plan(_Plan(step, self.floor, self.floor, 0, None, 0, plan.shape))
            self.phase = Phase.DONE
            how = "nothing is left to plan: the LR stays at the floor"
        elif plan.hold is None:  # a warmup paused by a spike: its recovery plans the rest
            how = "the paused warmup plans the rest when it resumes"
        elif in_warmup and (new_shape or warmup_changed):
            # the ramp goes on at its pace; a new max_warmup already behind ends the warmup at
            # the next step (from the LR it is at), and the decay after it is re-planned
            self._set_plan(self._warmup_plan(plan.start, plan.v0, plan.ramp))
            how = (
                f"the warmup ramp goes on (warmup ends by step {max(self.max_warmup, step)} at "
                "the latest), the decay follows"
            )
        elif not in_warmup and (new_shape or ("min_lr_ratio" in changed and decaying)):
            ramping = step < plan.start + plan.ramp  # a restart's ramp: let it finish
            if ramping:
                self._set_plan(self._decay_plan(plan.start, plan.v1, v0=plan.v0, ramp=plan.ramp))
            else:
                self._set_plan(self._decay_plan(step, level, tail_only=decaying))
            self.phase = self._plan_phase(step)
            new, floor = self._plan, self.floor
            aside = " (a cut in force aside)" if self.intervention.at(step) != 1.0 else ""
            held, tail = new.hold or 0, f"to the floor {floor:g} over the last {_steps(new.decay)}"
            if ramping:
                how = (
                    f"{self.config.decay}: the restart's ramp goes on to LR scale {new.v1:.3g} "
                    f"by step {new.start + new.ramp}, then "
                    + (f"holds for {_steps(held)}, then decays linearly " if held else "decays ")
                    + tail
                )
            elif held:
                how = (
                    f"{self.config.decay}: the plan's LR scale {level:.3g}{aside} holds for "
                    f"{_steps(held)}, then decays linearly {tail}"
                )
            else:
                how = (
                    f"{self.config.decay} decay from the plan's LR scale {level:.3g}{aside} to "
                    f"the floor {floor:g} over the remaining {_steps(self.total_steps - step)}"
                )
            if new_length and level <= self.floor:
                how += (
                    " (the run had ended its decay: the added steps train at the floor; the "
                    "surgeon does not re-warm a finished run)"
                )
        elif "min_lr_ratio" in changed:
            how = f"the plan's decay now ends at the floor {self.floor:g}"
        if warmup_changed and not in_warmup:
            how += "; warmup is over, so its settings have nothing left to change"
        others = [n for n in changed if n not in _PLAN_SETTINGS]
        if others:
            how += f"; {', '.join(others)} in effect from here"
        after = self.lr_scale(step)
        event = Event(
            step, EventKind.REPLAN, f"{cause}: {how}", before, after, self.phase, self.total_steps
        )
        self.events.append(event)
        return event

    def start_at(self, step: int) -> Event:
        """Begin at ``step`` instead of 0: the run trained ``step`` steps before without a
        controller, at its configured LR, which is the peak. No ramp again: warmup counts as
        done and the decay plan runs from the peak to ``total_steps``. Returns the ``replan``
        event that says so (recorded)."""
        if self.step or self.events:
            raise ValueError(f"start_at() on a controller that has run (step {self.step})")
        check_positive_int("step", step, allow_zero=True)
        self.step = step
        self._set_plan(self._decay_plan(step, 1.0))
        if step >= self.total_steps:
            self.phase = Phase.DONE
            how = "nothing is left to plan: the LR is at the floor"
        else:
            self.phase = self._plan_phase(step)
            how = (
                f"warmup counts as done; {self.config.decay} decay to the floor "
                f"({self.floor:g} of the peak) by step {self.total_steps}"
            )
        why = (
            f"started at step {step} without surgeon state (a checkpoint saved without it, or "
            f"a fit continued after one that raised): the {_steps(step)} "
            f"already done {'counts' if step == 1 else 'count'}, and each param group's "
            f"configured LR is its peak; {how}"
        )
        event = Event(step, EventKind.REPLAN, why, 1.0, self.lr_scale(step), self.phase)
        self.events.append(event)
        return event

    # ------------------------------------------------------------------ LR
    def _level(self, step: int) -> float:
        """The plan's base curve at ``step``; a plan that starts later (the caller wrote LRs
        ahead of the decision that made it) is at its start until then."""
        return self._base(max(0, step - self._plan.start))

    def lr_scale(self, step: int) -> float:
        """Multiplier for each param group's base LR at optimizer ``step`` (>= the last loss's)."""
        scale = self._base(max(0, step - self._plan.start))  # _level, inlined: every step
        if self.intervention.mode != "normal":  # else it is 1: no call (this runs every step)
            scale *= self.intervention.at(step)
        return scale if self.phase is Phase.WARMUP else max(self.floor, scale)

    def lr_for(self, base_lr: float, step: int) -> float:
        """The LR for a param group whose configured (peak) LR is ``base_lr``."""
        return base_lr * self.lr_scale(step)

    # ------------------------------------------------------------------ decisions
    def update(self, loss: float, *, update_skipped: bool = False) -> list[Event]:
        """Consume the loss of step ``self.step``; return the events it caused.

        ``update_skipped``: the caller did not apply this step's optimizer update (its loss or
        gradients were non-finite); recorded as a ``skipped_step`` event, and the step counts
        as non-finite even when the loss is finite (only the gradients were bad).
        """
        loss = _as_loss(loss)  # before the step counts: a refused loss leaves the state as it was
        step = self.step
        self.step += 1
        if step < self.ignore_until:  # undone by a rollback: the loss of discarded weights
            return self._close_step(step, [])
        new_events: list[Event] = []
        self._expire_recovery(step)

        mean, std = self.spike.mean, self.spike.std  # before this loss, for a spike's reason
        signal: Signal | None
        if update_skipped and math.isfinite(loss):
            signal, bad = Signal.NONFINITE, f"gradients are non-finite (loss {loss:.4g}); "
        else:
            signal = self.spike.update(loss)
            bad = f"loss is {loss}; " if signal is Signal.NONFINITE else ""  # repr only when used
        suspect, self.suspect = self.suspect, None
        if suspect is not None:  # the loss after a spike decides what the spike was
            if signal is Signal.NONFINITE or self.spike.last_zscore > NORMAL_BAND_ZSCORE:
                nonfinite = signal is Signal.NONFINITE
                new_events.append(self._confirm_spike(step, suspect, loss, nonfinite))
                if not nonfinite:
                    return self._close_step(step, new_events)
            else:
                new_events.append(self._dismiss_spike(step, suspect, loss))
        if signal is Signal.NONFINITE:
            self.nonfinite_streak += 1
            self.nonfinite_applied = self.nonfinite_applied or not update_skipped
            streak, needed = self.nonfinite_streak, self.config.rollback_nonfinite
            if streak == needed:
                why = f"{_steps(streak, 'non-finite ')} in a row (rollback_nonfinite={needed})"
                bad += self._request_rollback(step, why)
            new_events.append(self._cut_for_spike(step, EventKind.NONFINITE, bad))
            if update_skipped:
                why = f"the optimizer update of step {step} was not applied: {bad.split(';')[0]}"
                new_events.append(self._event(step, EventKind.SKIPPED_STEP, why, None))
            if streak >= 2 * self.snapshot_every and not self.stalled and self.rollback_to is None:
                new_events.append(self._stall(step, loss, update_skipped))
        elif signal is Signal.SPIKE:  # acted on once the next loss confirms it
            self.nonfinite_streak, self.nonfinite_applied = 0, False
            z = self.spike.last_zscore
            self.suspect = {"step": step, "loss": loss, "mean": mean, "std": std, "z": z}
        else:
            self.nonfinite_streak, self.nonfinite_applied = 0, False
            if self.spike.last_zscore <= NORMAL_BAND_ZSCORE:
                # normal again: the next trouble may roll back
                self.rolled_back_to = self.shifted_level = None
            self._settle_snapshot(step)
            if self.intervention.mode == "hold":
                new_events += self._maybe_recover(step, loss)
            if self.phase is Phase.WARMUP:
                new_events += self._warmup_update(step, loss)
            elif self.phase in (Phase.STABLE, Phase.DECAY) and self.intervention.mode == "normal":
                new_events += self._climb_update(step, loss) or self._plateau_update(step, loss)
        return self._close_step(step, new_events)

    def pass_step(self, applied: bool = True) -> list[Event]:
        """Count step ``self.step`` without its loss: the plan moves on, warmup ends at
        ``max_warmup``, no detector sees anything. ``applied``: the step updated the weights
        (manual optimization whose ``training_step`` returned none); ``False``: it did not
        (GradScaler skipped it for a scale overflow, or its batch gave no loss), so a snapshot
        of this step holds the weights of the next one and waits for that step's loss
        (its :attr:`pending_snapshot_step` moves on: the caller's copy is renamed to match)."""
        step = self.step
        self.step += 1
        self._expire_recovery(step)
        pending = self._pending_snapshot
        if not applied:
            self._idle_since_good += 1  # undoing it undoes nothing: not in a rollback's reach
            if pending is not None and pending[0] == step:
                self._pending_snapshot = (step + 1, pending[1])
        return self._close_step(step, [])

    def cool_down(self, start: int, steps: int, why: str, *, record: bool = True) -> Event:
        """Bring the end of the run forward (or move it): from step ``start`` decay from the
        current level to the floor over ``steps`` steps; ``total_steps`` becomes
        ``start + steps``. Returns the ``cooldown`` event, recorded at ``start - 1`` (it takes
        effect from ``start``) with ``why`` and the new plan.

        ``start``: the first step whose LR the caller has not written yet (a caller that reads
        losses late is ahead of :attr:`step`). The LR at ``start`` is unchanged (the curve stays
        continuous) and the decay has the configured shape (``wsd``: its linear tail), continued
        so that it passes through that level at ``start``: the plan begins at the next loss's
        step, so the decisions still to come on the losses before ``start`` see the phase
        ``decay`` already. The plateau detector starts afresh (the level is a new baseline).
        ``record=False``: the event is returned but not added to :attr:`events` (the caller
        records it, or leaves a move too small to report unrecorded).
        """
        check_positive_int("steps", steps)
        start = max(start, self.step)
        before = self.lr_scale(start)
        level = self._level(start)
        shape = "linear" if self.config.decay == "wsd" else self.config.decay
        lag, length = start - self.step, start - self.step + steps
        top = level
        if level > self.floor:  # the curve through `level` at `start` and the floor at the end
            left = schedules.decay_shape(shape, 1.0, 0.0, length)(lag)
            top = self.floor + (level - self.floor) / left
        self.total_steps = start + steps
        self.paused = False
        self._set_plan(_Plan(self.step, top, top, 0, 0, length, shape))
        self.phase = Phase.DECAY
        self.plateau.reset()
        why += (
            f": {shape} decay from LR scale {level:.3g} to the floor ({self.floor:g}) over "
            f"{_steps(steps)}; the plan now ends at step {self.total_steps}"
        )
        after = self.lr_scale(start)
        event = Event(
            max(0, start - 1), EventKind.COOLDOWN, why, before, after, self.phase, self.total_steps
        )
        if record:  # else the caller records it, or not (a move too small to report)
            self.events.append(event)
        return event

    def rewarm(self, start: int, total_steps: int, level: float, ramp: int, why: str) -> Event:
        """Give a run that cooled down to its end the rest of a longer plan (the end it cooled
        down for did not come): from step ``start`` (the first LR not written yet) ramp
        linearly from the current level to ``level`` over ``ramp`` steps, then decay to the
        floor by ``total_steps`` in the configured shape. Returns the ``replan`` event, recorded
        at ``start - 1`` with ``why`` and the new plan."""
        check_positive_int("total_steps", total_steps)
        check_positive_int("ramp", ramp)
        start = max(start, self.step)
        before, current = self.lr_scale(start), self._level(start)
        level = max(current, min(level, self.peak))
        self.total_steps = total_steps
        self._set_plan(self._decay_plan(start, level, v0=current, ramp=ramp))
        self.phase = self._plan_phase(start)
        self.plateau.reset()
        plan = self._plan
        then = (
            f"holds for {_steps(plan.hold)}, then decays linearly"
            if plan.hold
            else f"{plan.shape} decay"
        )
        why += (
            f": the LR ramps from scale {current:.3g} back to {level:.3g} over {_steps(ramp)}, "
            f"then {then} to the floor ({self.floor:g}); the plan ends at step {total_steps}"
        )
        after = self.lr_scale(start)
        event = Event(
            max(0, start - 1), EventKind.REPLAN, why, before, after, self.phase, total_steps
        )
        self.events.append(event)
        return event

    def _expire_recovery(self, step: int) -> None:
        if self.intervention.mode == "recover" and self.intervention.at(step + 1) >= 1.0:
            self.intervention = _Intervention()
            # a spike this soon after the LR is back is the same instability again
            self.watch_until = step + 1 + self.spike_cooldown + self.spike_recovery

    def _close_step(self, step: int, new_events: list[Event]) -> list[Event]:
        """What every step ends with: a snapshot of this step that did not settle is no good,
        the warmup deadline, the end of the plan; record ``new_events``."""
        self.revision = next(_REVISIONS)  # the step's decisions may have moved the curve
        pending = self._pending_snapshot
        if pending is not None and pending[0] == step:  # its loss was not normal (or unknown)
            self._pending_snapshot = None
        if self.phase is Phase.WARMUP:
            new_events += self._warmup_clock(step)
        self._follow_plan(step, new_events)
        if new_events:  # each says the phase the step's decisions left the run in
            new_events = [replace(event, phase=self.phase) for event in new_events]
            self.events += new_events
        return new_events

    def _plan_phase(self, step: int) -> Phase:
        """``STABLE`` or ``DECAY``: where ``step`` falls in the current plan (after warmup)."""
        plan = self._plan
        if plan.hold is None or step - plan.start < plan.ramp + plan.hold:
            return Phase.STABLE
        return Phase.DECAY

    def _follow_plan(self, step: int, new_events: list[Event]) -> None:
        """Move the phase along the plan as step ``step`` ends: ``decay_start`` when the hold
        gives way to the decay, ``done`` when the planned length is over."""
        if self.phase in (Phase.WARMUP, Phase.DONE):
            return
        if self.step >= self.total_steps:
            self.phase = Phase.DONE
            why = (
                f"planned length of {self.total_steps} steps reached; the LR stays at the floor "
                f"({self.floor:g} of the peak) from here"
            )
            new_events.append(self._event(step, EventKind.DONE, why, None))
            return
        phase = self._plan_phase(step + 1)
        if phase is Phase.DECAY and self.phase is Phase.STABLE:
            plan = self._plan
            level = self._level(step + 1)
            what = "the hold ends" if plan.hold else "the ramp reached its top"
            why = (
                f"{what}: {plan.shape} decay from LR scale {level:.3g} to the floor "
                f"({self.floor:g}) over the last {_steps(plan.decay)}"
            )
            new_events.append(self._event(step, EventKind.DECAY_START, why, None))
        self.phase = phase

    # ------------------------------------------------------------------ snapshots and rollback
    def forget_snapshots(self, why: str = "no good snapshot yet") -> None:
        """No snapshot exists (a fresh fit, a resume, or the caller dropped them); ``why``: the
        clause a rollback refused for want of one says, until one is confirmed."""
        self._no_snapshot_why = why
        self._pending_snapshot = None
        self._good_snapshot = None
        self._idle_since_good = 0  # steps passed without an update since the good snapshot
        self._unsettled = None  # (step, cause) of the last spike answered by a cut
        self._last_snapshot_step = -math.inf
        # set by a decision to roll back: the step of the snapshot the caller is to restore
        self.rollback_to: int | None = None
        self._rollback_cause: tuple[int, str] = (0, "")

    def snapshots_off(self) -> None:
        """The caller keeps no snapshots (``snapshot="off"``, or a plain loop without
        ``model=``): a rollback refused for want of one says so."""
        self.forget_snapshots(SNAPSHOTS_OFF)

    def checkpoint_dropped_snapshots(self, step: int) -> None:
        """A checkpoint after ``step`` steps dropped the caller's snapshots (a resumed run has
        none, so both go on alike): forget them, and say so when a rollback is refused."""
        self.forget_snapshots(
            f"no good snapshot: the checkpoint at step {step} dropped the snapshots "
            "(a resumed run has none, so both go on alike) and none taken since is confirmed yet "
            "(one is once the loss of its own step is read and normal), so trouble this close "
            "after a checkpoint cannot be rolled back; checkpoint less often to leave fewer such "
            "steps"
        )

    @property
    def good_snapshot_step(self) -> int | None:
        """The step of the snapshot a rollback would restore (``None``: none yet)."""
        return None if self._good_snapshot is None else self._good_snapshot[0]

    @property
    def pending_snapshot_step(self) -> int | None:
        """The step of the snapshot waiting for its loss (``None``: none)."""
        return None if self._pending_snapshot is None else self._pending_snapshot[0]

    def snapshot_nonfinite(self, step: int) -> str:
        """The snapshot of ``step`` copied NaN/inf weights or optimizer state (damage no loss
        showed: Adam's second moment overflowed by a gradient too large to square makes every
        later update 0): it never becomes the target, and the run rolls back to the snapshot
        before it (:data:`STATE_REACH` intervals). Returns why not (``""``: asked)."""
        if self._pending_snapshot is not None and self._pending_snapshot[0] == step:
            self._pending_snapshot = None
        cause = (
            f"the snapshot of step {step} copied {STATE_ROLLBACK_MARK} (a gradient too large "
            "for the optimizer's statistics, e.g. Adam's squared gradient overflowing, with "
            "normal losses)"
        )
        return self._request_rollback(step, cause, intervals=STATE_REACH)

    def state_nonfinite(self, step: int, found: str) -> str:
        """The weights or their optimizer state hold NaN/inf after ``step`` (``found``: when it
        was looked, e.g. before a checkpoint; damage no loss showed): roll back to the good
        snapshot (:data:`STATE_REACH` intervals). Returns why not (``""``: asked)."""
        cause = (
            f"{STATE_ROLLBACK_MARK} after step {step}, found {found} (a gradient too large for "
            "the optimizer's statistics, with normal losses)"
        )
        return self._request_rollback(step, cause, intervals=STATE_REACH)

    def snapshot_due(self, step: int) -> bool:
        """Whether the caller should snapshot the weights as they are at the start of ``step``:
        ``snapshot_every`` steps after the last one, none waiting for its loss, no rollback on
        its way. Also while the LR is cut or after a non-finite step: a snapshot only becomes
        the target if the loss of its own step is normal, so a regular grid of them keeps the
        target recent through any trouble the run lives through."""
        return (
            self._pending_snapshot is None
            and self.rollback_to is None
            and step - self._last_snapshot_step >= self.snapshot_every
            and step >= self.ignore_until
        )

    def snapshot_taken(self, step: int, nbytes: int) -> None:
        """The caller snapshotted the weights at the start of ``step`` (``nbytes`` in memory).
        It becomes the rollback target once the loss of ``step`` is read and normal."""
        self._pending_snapshot = (step, nbytes)
        self._last_snapshot_step = step

    def before_checkpoint(self, *, end_of_fit: bool = False) -> None:
        """Every loss so far has been read and a checkpoint, or the end of the fit, is next: no
        loss will confirm a spike in the last one. If that spike reached ``rollback_threshold``,
        or the last losses were non-finite with their updates applied (unguarded), the weights
        are suspect: ask for a rollback now rather than have them saved or kept (when a recent
        good snapshot exists). At the end of the fit (``end_of_fit``, or a checkpoint at the
        plan's last step) also for a spike the last steps left unanswered
        (:meth:`_settle_at_the_end`)."""
        suspect = self.suspect
        if suspect is not None and not self.nonfinite_streak:
            threshold = self.config.rollback_threshold
            if self._severe(suspect["loss"], suspect["mean"]):
                self._request_rollback(
                    int(suspect["step"]),
                    f"{self._spike_words(suspect)} just before a checkpoint or the end of the "
                    "fit, unconfirmed; "
                    f"at least {_ratio_words(threshold, suspect['mean'], 'its running mean')} "
                    f"(rollback_threshold={threshold:g})",
                )
        if self.nonfinite_streak and self.nonfinite_applied:
            streak = self.nonfinite_streak
            self._request_rollback(
                self.step - 1,
                f"{streak} non-finite step(s) with their updates applied just before a checkpoint "
                "or the end of the fit",
            )
        if end_of_fit or self.step >= self.total_steps:
            self._settle_at_the_end()

    def _settle_at_the_end(self) -> None:
        """At the end of the fit no later step is left for the cut that answered a confirmed
        spike since the good snapshot: if the loss is still out of its normal band, the
        weights hold the damage (the next steps would have worked it off): roll back to the
        good snapshot, when within reach. An outlier whose next losses are back in band is
        left alone here too: rolling back undoes the last steps of the decay, which a trial
        measured to cost more than such a batch (README, *Guarantees*)."""
        unsettled, good = self._unsettled, self._good_snapshot
        if unsettled is None or good is None or unsettled[0] < good[0]:
            return  # none, or the good snapshot holds it already
        if self.spike.last_zscore <= NORMAL_BAND_ZSCORE:
            return  # the loss is back in its band: the cut has done its work
        step, cause = unsettled
        self._request_rollback(
            step,
            f"{cause} just before the end of the fit, its loss still out of its band, no step "
            "left for the cut to act",
        )

    def ended_early(self, done: int, cause: str) -> Event | None:
        """The run ended after ``done`` steps, before its plan did (``cause``: what ended it):
        the ``stopped`` event that says where the LR was left; ``None`` when the plan was done."""
        step = max(0, done - 1)
        last = self.events[-1] if self.events else None
        if self.phase is Phase.DONE or (
            last and last.kind is EventKind.STOPPED and last.step == step
        ):
            return None  # the plan was done, or this end is recorded already
        scale = self.lr_scale(step)
        why = (
            f"the fit ended after {done} of the {self.total_steps} planned steps, in phase "
            f"{self.phase.value} at LR scale {scale:.3g} (the floor is {self.floor:g}): {cause}"
        )
        event = Event(step, EventKind.STOPPED, why, scale, scale, self.phase)
        self.events.append(event)
        return event

    def buffers_nonfinite(self, step: int, how: str) -> Event:
        """Record that the module's buffers held non-finite values after step ``step`` and were
        repaired (``how``: a clause saying with what); a snapshot taken after it (at the start
        of a later step, before this flag was read) holds them, so it will not become the
        target."""
        pending = self._pending_snapshot
        if pending is not None and pending[0] > step:
            self._pending_snapshot = None
        why = f"non-finite values in the module's buffers after step {step}: {how}"
        event = replace(self._event(step, EventKind.BUFFERS_RESTORED, why, None), phase=self.phase)
        self.events.append(event)
        return event

    def _settle_snapshot(self, step: int) -> None:
        """Promote the pending snapshot once the (normal) loss of its step is read."""
        pending = self._pending_snapshot
        if (
            pending is not None
            and pending[0] == step
            and self.spike.last_zscore <= NORMAL_BAND_ZSCORE
        ):
            self._good_snapshot, self._pending_snapshot = pending, None
            self._idle_since_good = 0

    def _request_rollback(self, step: int, cause: str, *, intervals: int = 2) -> str:
        """Ask the caller to restore the good snapshot for the trouble at ``step``, unless that
        would travel back more than ``intervals`` snapshot intervals or repeat the last
        rollback; returns why not (``""``: asked, or already going back), a clause for the
        event's reason."""
        if self.rollback_to is not None:
            return ""
        good = self._good_snapshot
        reach = intervals * self.snapshot_every
        if self.rolled_back_to is not None:
            why = (
                f"the loss has not been normal since the rollback to step {self.rolled_back_to}, "
                "so going back again would repeat it"
            )
        elif good is None:
            why = self._no_snapshot_why
        elif step - good[0] - self._idle_since_good > reach:
            idle = self._idle_since_good
            updated = f" ({step - good[0] - idle} with an update)" if idle else ""
            why = (
                f"the last good snapshot (step {good[0]}) is {_steps(step - good[0])} back"
                f"{updated}, more than {intervals} snapshot intervals ({reach} steps)"
            )
        else:
            self.rollback_to = good[0]
            self._rollback_cause = (step, cause)
            return ""
        self._no_rollback = why
        return f"{cause}, but no rollback: {why}; "

    def _stall(self, step: int, loss: float, update_skipped: bool) -> Event:
        """The ``stalled`` event: non-finite for two snapshot intervals, nothing to go back to."""
        self.stalled = True
        streak = self.nonfinite_streak
        what = "updates skipped" if update_skipped else "updates applied"
        why = (
            f"{_steps(streak, 'non-finite ')} in a row (steps {step - streak + 1} to {step}, "
            f"last loss {loss}, {what}) and nothing to roll back to "
            f"({self._no_rollback or 'no snapshot'}): "
            "the run cannot make progress; stopping it"
        )
        return self._event(step, EventKind.STALLED, why, None)

    def rolled_back(self, now: int) -> Event:
        """Record that the caller restored the snapshot of step :attr:`rollback_to` and resumes
        at step ``now``; the losses of steps before ``now`` that arrive later are ignored."""
        if self.rollback_to is None or self._good_snapshot is None:
            raise ValueError("rolled_back() without a rollback decision (rollback_to is None)")
        target, nbytes = self._good_snapshot
        step, cause = self._rollback_cause
        self.rollback_to = None
        self.suspect = None
        self._pending_snapshot = None  # may hold weights taken after the trouble began
        self.ignore_until = max(self.ignore_until, now)
        self.nonfinite_streak, self.nonfinite_applied = 0, False
        self.rolled_back_to, self.shifted_level = target, None
        self._unsettled = None
        idle = self._idle_since_good  # (steps not read yet count as updated)
        updated = f", {now - target - idle} with an update" if idle else ""
        why = (
            f"{cause}: restored the snapshot of step {target} ({_format_bytes(nbytes)}), "
            f"undoing the updates of steps {target} to {now - 1} ({_steps(now - target)}{updated})"
        )
        scale = self.lr_scale(now)
        event = Event(step, EventKind.ROLLBACK, why, scale, scale, self.phase)
        self.events.append(event)
        return event

    def _warmup_update(self, step: int, loss: float) -> list[Event]:
        """The automatic warmup's decisions on a normal loss: pause the ramp while the loss rises,
        resume it once it is back down (the EMA no higher than a window before: no flapping on
        a noisy rise), end the warmup once the loss has stabilized."""
        signal = self.stabilizer.update(loss)
        if self.config.warmup != "auto" or self.intervention.mode != "normal":
            return []  # a fixed ramp, or one a spike holds (its recovery resumes it)
        det = self.stabilizer
        trend = (
            f"its EMA changed by {-(det.last_drop or 0.0):+.2%} over the last {det.window} steps "
            f"(noise {det.last_noise:.2%}, threshold {det.threshold:.2%})"
        )
        if signal is Signal.RISING:
            if self.paused:
                return []
            before = self.lr_scale(step + 1)
            level = self._level(step + 1)
            self.paused = True
            self._set_plan(_Plan(step + 1, level, level, 0, None, 0, "linear"))
            where = "at the peak" if level >= self.peak else f"at LR scale {level:.3g}"
            why = f"the loss is rising: {trend}; the warmup ramp holds {where}"
            return [self._event(step, EventKind.RAMP_PAUSE, why, before)]
        if self.paused:
            if (det.last_drop or 0.0) < 0.0:
                return []  # not back down yet: the EMA is above where it was a window ago
            before = self.lr_scale(step + 1)
            level = self._level(step + 1)
            self.paused = False
            ramp = self._ramp_steps(level, self.max_warmup)
            self._set_plan(self._warmup_plan(step + 1, level, ramp))
            why = (
                f"the loss is back down: {trend}; the ramp goes on from LR scale {level:.3g} "
                f"to {self.peak:.3g} over {_steps(ramp)}"
            )
            return [self._event(step, EventKind.RAMP_RESUME, why, before)]
        if signal is Signal.STABILIZED and step + 1 >= self.min_warmup:
            why = (
                f"the loss stabilized after its initial descent: {trend}, not steeper and not "
                f"rising for {_steps(det.patience)} in a row"
            )
            return [self._end_warmup(step, why)]
        return []

    def _ramp_steps(self, level: float, pace: int) -> int:
        """Steps from ``level`` to the peak at the pace of a 0-to-peak ramp of ``pace`` steps."""
        return math.ceil(max(0.0, self.peak - level) * pace)

    def _warmup_clock(self, step: int) -> list[Event]:
        """At the end of step ``step`` in warmup: the ramp reached the peak (the warmup is over),
        or ``max_warmup`` is reached (it ends here)."""
        plan, det = self._plan, self.stabilizer
        if plan.hold is not None and step + 1 - plan.start >= plan.ramp:
            if self.config.warmup != "auto":
                why = f"fixed warmup of {_steps(self.max_warmup)} finished"
            else:
                if det.last_drop is None:
                    measured = f"fewer than {det.window + 1} losses to measure its trend by"
                else:
                    measured = (
                        f"last EMA drop {det.last_drop:.2%} per {det.window} steps, noise "
                        f"{det.last_noise:.2%}"
                    )
                why = (
                    f"the ramp reached the peak at the pace of a {self.max_warmup}-step ramp "
                    f"(max_warmup) before the loss stabilized ({measured})"
                )
            return [self._end_warmup(step, why)]
        if step + 1 < self.max_warmup:
            return []
        level = self._level(step + 1)
        if self.paused and self.intervention.mode == "normal":  # held by a rising loss
            if level < self.peak:
                self.peak = level
                why = (
                    f"max_warmup={_steps(self.max_warmup)} reached while the loss was rising: the "
                    f"peak is lowered to LR scale {self.peak:.3g}, the highest the loss took"
                )
            else:  # held at the peak itself
                why = (
                    f"max_warmup={_steps(self.max_warmup)} reached while the loss was rising, at "
                    "the peak already"
                )
        else:
            why = (
                f"max_warmup={_steps(self.max_warmup)} reached at LR scale {level:.3g} (the ramp "
                f"was held on the way); it finishes at the pace of a {self.min_warmup}-step ramp"
            )
        return [self._end_warmup(step, why)]

    def _end_warmup(self, step: int, why: str) -> Event:
        """Warmup is over: from the current level the LR goes to the peak at the ``min_warmup``
        pace (at once if it is there), then decays."""
        before = self.lr_scale(step + 1)
        plan, start = self._plan, step + 1
        if plan.hold is not None and plan.ramp > start - plan.start:
            # the caller has written the slow ramp's LRs before `written_until`: the faster
            # ramp goes on from the first LR not written, where the slow one is by then (no
            # jump, no flat stretch)
            start = min(self._first_reached(step), plan.start + plan.ramp)
        level = self._level(start)
        self.paused = False
        ramp = self._ramp_steps(level, self.min_warmup)
        if ramp:
            self._set_plan(self._decay_plan(start, self.peak, v0=level, ramp=ramp))
            why += f"; the LR goes from scale {level:.3g} to the peak over {_steps(ramp)}"
        else:
            self._set_plan(self._decay_plan(start, min(level, self.peak)))
        self.phase = self._plan_phase(step + 1)
        self.plateau.reset()
        return self._event(step, EventKind.WARMUP_END, why, before)

    def _warmup_plan(self, start: int, v0: float, ramp: int) -> _Plan:
        """The warmup ramp from ``v0`` to the peak over ``ramp`` steps from ``start``; after it
        (an automatic warmup, a decay other than wsd) the peak holds until the warmup ends, a
        decision on losses read late: an LR written ahead of it is the peak, never an early
        step of a decay that the decision would then move (at the latest, the wsd tail)."""
        holds = self.config.warmup == "auto" and self.config.decay != "wsd"
        latest = self._latest_decay_start(start + ramp) if holds else None
        return self._decay_plan(start, self.peak, v0=v0, ramp=ramp, decay_start=latest)

    def _latest_decay_start(self, start: int) -> int:
        """Where a hold that began at ``start`` gives way to the decay at the latest: the last
        ``wsd_decay_fraction`` of the steps from ``start`` are left for the decay."""
        return self.total_steps - round(self.config.wsd_decay_fraction * (self.total_steps - start))

    def _climb_update(self, step: int, loss: float) -> list[Event]:
        """After warmup: a loss that rises for ``stabilize_patience`` updates in a row beyond
        its noise is climbing away (the LR is past what the run can take now, e.g. at the edge
        of stability; a catapult that does not come back): the peak is lowered to
        ``spike_factor x`` the current LR scale for the rest of the run."""
        det = self.stabilizer
        if det.update(loss) is not Signal.RISING or det.rise_run < det.patience:
            return []
        ratio = self.config.spike_ratio
        assert det.ema is not None
        if det.ema - det.rise_base <= (ratio - 1.0) * abs(det.rise_base):
            return []  # rising, but not yet by the spike ratio: a slow spike, or noise
        run, base = det.rise_run, det.rise_base
        det.restart_rise()  # a further climb is measured from here
        before = self.lr_scale(step + 1)
        self._lower_peak(step, self._level(step + 1) * self.config.spike_factor)
        self.plateau.reset()
        why = (
            f"the loss kept rising: its EMA went from {base:.4g} to {det.ema:.4g} "
            f"(more than {ratio:g}x), rising beyond its noise ({det.last_noise:.2%} per "
            f"{det.window} steps) for {_steps(run)} in a row; "
            f"the peak is lowered x"
            f"{self.config.spike_factor:g} to LR scale {self.peak:.3g} for the rest of the run"
        )
        return [self._event(step, EventKind.CLIMB, why, before)]

    def _plateau_update(self, step: int, loss: float) -> list[Event]:
        """A stalled loss: cut the LR of a hold at its level (a decay already lowers it: a cut
        late in a healthy decay only costs), or restart (``plateau_action="restart"``)."""
        if self.plateau.update(loss) is not Signal.PLATEAU:
            return []
        cfg, det = self.config, self.plateau
        restart = cfg.plateau_action == "restart" and self.restarts < cfg.max_restarts
        if not restart and self.phase is not Phase.STABLE:
            return []
        before = self.lr_scale(step + 1)
        current = self._level(step + 1)
        stalled = (
            f"the smoothed loss (EMA {det.ema:.4g}) has not improved by {det.min_delta:.2%} on "
            f"its best {det.best:.4g} for {det.patience} steps; "
        )
        if restart:
            self.restarts += 1
            target = cfg.restart_peak * self.peak
            self._set_plan(self._decay_plan(step + 1, target, v0=current, ramp=self.restart_warmup))
            why = (
                f"{stalled}restart {self.restarts}/{cfg.max_restarts}: re-warm from "
                f"{current:.3g} to {target:.3g} ({cfg.restart_peak:g} of the peak) "
                f"over {_steps(self.restart_warmup)}"
            )
            return [self._event(step, EventKind.RESTART, why, before)]
        cut = max(self.floor, current * cfg.plateau_factor)
        if cut >= current:
            return []  # already at the floor: nothing left to cut
        self._set_plan(self._decay_plan(step + 1, cut))
        why = f"{stalled}LR scale cut x{cfg.plateau_factor:g} from {current:.3g} to {cut:.3g}"
        return [self._event(step, EventKind.PLATEAU, why, before)]

    def _spike_words(self, suspect: dict[str, float]) -> str:
        z = suspect["z"]
        sigmas = f"{z:.1f}" if abs(z) < 1e6 else f"{z:.3g}"  # (1e+29, not 30 digits)
        return (
            f"loss {suspect['loss']:.4g} at step {int(suspect['step'])} is {sigmas} "
            f"sigma above its running mean {suspect['mean']:.4g} (noise {suspect['std']:.3g}; "
            f"thresholds {self.spike.zscore:g} sigma and "
            f"{_ratio_words(self.spike.ratio, suspect['mean'], 'the mean')})"
        )

    def _confirm_spike(
        self, step: int, suspect: dict[str, float], loss: float, nonfinite: bool
    ) -> Event:
        """The loss after a spike is still out of its normal band (or non-finite, or its
        gradients are: ``nonfinite``): the run is in trouble, not one hard batch. Cut, and roll
        back if the spike or that loss reached ``rollback_threshold`` (a non-finite loss always
        does)."""
        self.nonfinite_streak, self.nonfinite_applied = 0, False
        mean = suspect["mean"]
        worst = max(suspect["loss"], loss) if math.isfinite(loss) else suspect["loss"]
        if not math.isfinite(loss):
            still = "is not finite"
        elif nonfinite:  # the detector did not see it: its z-score is the spike's
            still = "has non-finite gradients"
        else:
            still = f"is still {self.spike.last_zscore:.1f} sigma above it"
        why = f"{self._spike_words(suspect)}, and the next loss, {loss:.4g}, {still}; "
        threshold = self.config.rollback_threshold
        level_shift = self.rolled_back_to is not None and self.shifted_level is None
        if level_shift:
            # the good weights give it too: not damage, a new level (taken once)
            level = loss if math.isfinite(loss) else suspect["loss"]
            self.spike.rebase(level)
            self.shifted_level = level
            why += (
                f"the loss has stayed up since the rollback to step {self.rolled_back_to}: a "
                f"lasting level shift, not damage; {level:.4g} is the new running mean (no "
                "further rollback); "
            )
        elif self.rolled_back_to is not None:  # rising past the level it shifted to
            why += (
                f"the loss rose again past the level it shifted to after the rollback to step "
                f"{self.rolled_back_to} ({self.shifted_level:.4g}): instability at this LR, "
                "not another level shift (no further rollback); "
            )
        elif self._severe(worst, mean):
            why += self._request_rollback(
                step,
                f"loss {worst:.4g} is at least "
                f"{_ratio_words(threshold, mean, 'its running mean')} {mean:.4g} "
                f"(rollback_threshold={threshold:g})",
            )
        elif not math.isfinite(loss):
            why += self._request_rollback(step, f"the next loss, {loss}, is not finite")
        if self.rollback_to is None:
            self._unsettled = (int(suspect["step"]), f"a spike at step {int(suspect['step'])}")
        return self._cut_for_spike(step, EventKind.SPIKE, why, level_shift=level_shift, worst=worst)

    def _severe(self, loss: float, mean: float) -> bool:
        """Whether ``loss`` is at least ``rollback_threshold x`` the running ``mean``: damage
        that a rollback undoes, once the weights are suspect."""
        return loss - mean >= (self.config.rollback_threshold - 1.0) * abs(mean)

    def _dismiss_spike(self, step: int, suspect: dict[str, float], loss: float) -> Event:
        """The loss after a spike is back in its normal band: one hard batch, no instability.
        A snapshot taken after it holds its update (and, under Adam, its squared gradient in
        the second moment): it does not become a rollback target, so damage that shows later
        is rolled back to before the bad batch. A severe one (``rollback_threshold``) asks the
        caller to check the weights and optimizer state now (:attr:`state_check_due`)."""
        pending = self._pending_snapshot
        if pending is not None and pending[0] > int(suspect["step"]):
            self._pending_snapshot = None
        if self._severe(suspect["loss"], suspect["mean"]):
            self.state_check_due = int(suspect["step"])
        why = (
            f"{self._spike_words(suspect)}, but the next loss, {loss:.4g}, is back within "
            f"{NORMAL_BAND_ZSCORE:g} sigma: an isolated outlier (a hard batch), no action"
        )
        return self._event(step, EventKind.OUTLIER, why, self.lr_scale(step + 1))

    def _first_reached(self, step: int) -> int:
        """The first step whose LR a decision on the loss of ``step`` reaches: the next one, or
        the first the caller has not written yet (a caller reading losses late has written the
        LRs before ``written_until``). A cut is held, and a recovery ramps, from there."""
        return max(step + 1, self.written_until)

    def _cut_for_spike(
        self,
        step: int,
        kind: EventKind,
        why: str,
        *,
        level_shift: bool = False,
        worst: float = math.inf,
    ) -> Event:
        """Cut the LR multiplier x ``spike_factor`` and hold it (``worst``: the spike's worst
        loss); a spike while held extends the hold, lowers the peak once per hold (a storm) and
        cuts again if its loss is ``rollback_threshold`` x the worst one the last cut answered
        (the cut LR did not stop it: an exploding loss)."""
        before = self.lr_scale(step + 1)
        hold_until = self._first_reached(step) + self.spike_cooldown
        if self.intervention.mode == "hold":
            self.intervention.hold_until = hold_until
            # (a spike that shows a level shift after a rollback is no verdict on the LR)
            storm = kind is EventKind.SPIKE and not level_shift
            if storm and not self.intervention.lowered:
                # a second confirmed spike while the LR is still cut: the LR before the cut is
                # too high for this run (not a level shift: those follow a rollback); once per
                # hold, a storm of them is one verdict
                self.intervention.lowered = True
                self._lower_peak(step, self._level(step + 1) * self.config.spike_factor)
                why += (
                    f"a second spike while the LR is cut: the peak is lowered to "
                    f"{self.peak:.3g} for the rest of the run; "
                )
            answered = self.intervention.answered
            exploding = math.isfinite(worst) and math.isfinite(answered)
            if exploding and not level_shift and self._severe(worst, answered):
                value = max(self.floor, self.intervention.value * self.config.spike_factor)
                why += (
                    f"loss {worst:.4g} is at least "
                    f"{_ratio_words(self.config.rollback_threshold, answered, 'the loss')} "
                    f"{answered:.4g} the cut answered: still exploding, LR multiplier cut again "
                    f"x{self.config.spike_factor:g} to {value:.3g}; "
                )
                self.intervention.value, self.intervention.answered = value, worst
            why += f"already cut, cooldown extended to step {hold_until}"
            return self._event(step, kind, why, before)
        current = self.intervention.at(step + 1)
        lowered = self.intervention.mode == "recover" or step < self.watch_until
        if lowered:
            # the plan now carries the LR it spiked at x factor; the cut starts from there
            self._lower_peak(step, before * self.config.spike_factor)
            current = 1.0
            why += (
                f"the loss spiked again at LR scale {before:.3g} within "
                f"{self.spike_cooldown + self.spike_recovery} steps of the last cut: the peak is "
                f"lowered to {self.peak:.3g} for the rest of the run; "
            )
        value = max(self.floor, current * self.config.spike_factor)
        self.intervention = _Intervention(
            "hold", value, hold_until, lowered=lowered, answered=worst
        )
        if self.phase is Phase.WARMUP and not self.paused:
            self.paused = True
            frozen = min(self.peak, self._level(step + 1))
            self._set_plan(_Plan(step + 1, frozen, frozen, 0, None, 0, "linear"))
            why += "warmup ramp paused; "
        why += (
            f"LR multiplier cut x{self.config.spike_factor:g} to {value:.3g} from step "
            f"{hold_until - self.spike_cooldown}, held for at least {_steps(self.spike_cooldown)}"
        )
        return self._event(step, kind, why, before)

    def _lower_peak(self, step: int, peak: float) -> None:
        """The LR went past what this run can take: the peak becomes ``peak`` (never below the
        floor) for the rest of the run, a ceiling, and the plan is re-planned under it from
        step ``step + 1``."""
        self.peak = max(self.floor, min(self.peak, peak), _MIN_PEAK)
        level = self._level(step + 1)
        if self.phase is Phase.WARMUP:
            if self.paused or level >= self.peak:  # held, or past the new peak: hold there
                held = min(level, self.peak)
                self._set_plan(_Plan(step + 1, held, held, 0, None, 0, "linear"))
                self.paused = True
            else:  # the ramp goes on, to the lower peak
                ramp = self._ramp_steps(level, self.max_warmup)
                self._set_plan(self._warmup_plan(step + 1, level, ramp))
        elif self.phase is not Phase.DONE and level > self.peak:
            # a hold holds the lower peak; a decay under way goes on decaying, from it
            decaying = self.phase is Phase.DECAY
            self._set_plan(self._decay_plan(step + 1, self.peak, tail_only=decaying))
            self.phase = self._plan_phase(step + 1)

    def _maybe_recover(self, step: int, loss: float) -> list[Event]:
        """While the LR is held cut: start its recovery once the cooldown is over and the loss
        is back in its normal band."""
        held = self.intervention
        if step + 1 < held.hold_until:
            return []
        if self.spike.last_zscore > NORMAL_BAND_ZSCORE:
            return []
        before = self.lr_scale(step + 1)
        self.plateau.reset()  # the level after a spike is a new baseline, not a stall
        self.intervention = _Intervention(
            mode="recover",
            value=held.value,
            recover_start=self._first_reached(step),
            recover_steps=self.spike_recovery,
        )
        why = (
            f"loss {loss:.4g} is back within {NORMAL_BAND_ZSCORE:g} sigma of its running mean "
            f"{self.spike.mean:.4g}; LR multiplier ramps from {held.value:.3g} back to 1 over "
            f"{_steps(self.spike_recovery)} from step {self.intervention.recover_start}"
        )
        if self.paused:
            self.paused = False
            current = self._level(step + 1)
            ramp = self._ramp_steps(current, self.max_warmup)
            self._set_plan(self._warmup_plan(step + 1, current, ramp))
            why += "; warmup ramp resumed"
        return [self._event(step, EventKind.RECOVERED, why, before)]

    # ------------------------------------------------------------------ plans
    def _decay_plan(
        self,
        start: int,
        v1: float,
        *,
        v0: float | None = None,
        ramp: int = 0,
        decay_start: int | None = None,
        tail_only: bool = False,
    ) -> _Plan:
        """Ramp ``v0 -> v1`` from ``start``, hold until ``decay_start``, then decay to the floor
        by ``total_steps`` in the configured shape (for ``wsd``: hold, then a linear tail;
        ``tail_only``: the tail alone, for a decay already under way)."""
        ramp_end = start + ramp
        decay_start = ramp_end if decay_start is None else max(decay_start, ramp_end)
        remaining = max(0, self.total_steps - decay_start)
        shape, stable = self.config.decay, 0
        if shape == "wsd":
            if not tail_only:
                stable = round(remaining * (1.0 - self.config.wsd_decay_fraction))
            shape = "linear"
        hold = decay_start - ramp_end + stable
        return _Plan(start, v1 if v0 is None else v0, v1, ramp, hold, remaining - stable, shape)

    def _set_plan(self, plan: _Plan) -> None:
        self._plan = plan
        self._base = plan.build(self.floor)
        self.revision = next(_REVISIONS)

    def _event(self, step: int, kind: EventKind, why: str, before: float | None) -> Event:
        """An event at ``step``; ``before=None``: the LR is unchanged by it."""
        after = self.lr_scale(step + 1)
        return Event(step, kind, why, after if before is None else before, after)
