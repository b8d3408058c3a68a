"""The surgeon's brain: a phase machine over the loss stream, free of torch and Lightning.

Feed it one float per optimizer step with :meth:`Controller.update`; ask it for
the LR multiplier of any coming step with :meth:`Controller.lr_scale`. The LR a
param group gets is ``its own base LR x lr_scale(step)``, so group ratios hold.

The multiplier is ``base(step) x intervention(step)``:

* ``base`` is a *plan*, a ramp-hold-decay curve built from :mod:`surgeon.schedules`
  and re-planned only by decisions: warmup end, a plateau cut or restart, and a
  spike during warmup (which pauses the ramp);
* ``intervention`` is 1 except after a spike or a non-finite loss: cut by
  ``spike_factor``, held for ``spike_cooldown`` steps, and ramped back to 1 over
  ``spike_recovery`` steps once the loss is back in its normal band.

Rollback: the caller keeps last-good snapshots of the weights and tells the
controller when it took one (:meth:`Controller.snapshot_due`,
:meth:`Controller.snapshot_taken`); a snapshot becomes the rollback target once
the loss of its step is read and is in the normal band. A spike of at least
``rollback_threshold x`` the running mean, or ``rollback_nonfinite`` non-finite
steps in a row, sets :attr:`Controller.rollback_to`; the caller restores that
snapshot and calls :meth:`Controller.rolled_back`, which records the event and
ignores the losses of the undone steps that are still on their way.

Time: the loss passed to the ``n``-th call of ``update`` belongs to step ``n``
(counting from 0); a decision made on it takes effect from step ``n + 1`` and is
recorded as an :class:`Event` at step ``n``. Both curves are closed-form in the
step, so ``lr_scale`` may be asked for steps ahead of the last loss (the callback
reads losses a few steps late, on every device) and the answer is a pure function of the
losses seen.
"""

import math
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any

from surgeon import schedules
from surgeon._validate import check_positive_int
from surgeon.config import SurgeonConfig, resolve_steps
from surgeon.detectors import PlateauDetector, Signal, SpikeDetector, StabilizationDetector

NORMAL_BAND_ZSCORE = 3.0
"""A loss within this many running standard deviations of the running mean is 'normal'."""

_MIN_STABILIZE_WINDOW = 10
_MIN_PEAK = 1e-12  # a lowered peak stays positive even with a floor of 0
_MIN_SNAPSHOT_EVERY = 10


def _format_bytes(nbytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} bytes"


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
    RAMP_PAUSE = "ramp_pause"
    """The loss rose during the warmup ramp: the LR holds where it is."""
    RAMP_RESUME = "ramp_resume"
    """The loss stopped rising: the warmup ramp goes on."""
    CLIMB = "climb"
    """After warmup the loss kept rising: the peak (and the LR) is lowered for good."""
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
    """A resumed run plans another length: the rest of the schedule was re-planned over it."""
    PEAK_LR = "peak_lr"
    """Recorded by the callback: an LR range test set the peak before step 0."""


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
    shape: str

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

    def __init__(self, total_steps: int, config: SurgeonConfig | None = None) -> None:
        check_positive_int("total_steps", total_steps)
        self.config = cfg = config if config is not None else SurgeonConfig()
        self.total_steps = total_steps
        self.floor = cfg.min_lr_ratio
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
            patience=resolve_steps("plateau_patience", cfg.plateau_patience, total_steps, 1),
            min_delta=cfg.plateau_min_delta,
            cooldown=resolve_steps("plateau_cooldown", cfg.plateau_cooldown, total_steps),
        )
        self.spike = SpikeDetector(zscore=cfg.spike_zscore, ratio=cfg.spike_ratio)
        self.snapshot_every = resolve_steps(
            "snapshot_every", cfg.snapshot_every, total_steps, _MIN_SNAPSHOT_EVERY
        )
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to step 0 of warmup with empty statistics and no events."""
        self.step = 0
        self.phase = Phase.WARMUP
        self.events: list[Event] = []
        self.restarts = 0
        self.paused = False
        self.peak = 1.0
        self.awaiting_descent = False
        self.watch_until = 0
        self.nonfinite_streak = 0
        self.ignore_until = 0
        self.intervention = _Intervention()
        self.forget_snapshots()
        for detector in (self.stabilizer, self.plateau, self.spike):
            detector.reset()
        if self.max_warmup == 0:
            self._set_plan(self._decay_plan(0, 1.0))
            self.phase = self._plan_phase(0)
        else:
            ramp = self.max_warmup
            self._set_plan(self._decay_plan(0, 1.0, v0=1.0 / (ramp + 1), ramp=ramp))

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
            "awaiting_descent": self.awaiting_descent,
            "watch_until": self.watch_until,
            "restarts": self.restarts,
            "nonfinite_streak": self.nonfinite_streak,
            "ignore_until": self.ignore_until,
            "events": [event.to_dict() for event in self.events],
            "stabilizer": self.stabilizer.state_dict(),
            "plateau": self.plateau.state_dict(),
            "spike": self.spike.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], *, next_step: int | None = None) -> None:
        """Restore what :meth:`state_dict` returned; the next LRs match the original's exactly.

        Saved by a run planned for another length: the rest is re-planned over this one's
        ``total_steps`` from ``next_step``, the first step whose LR the caller has not written
        yet (default: the step of the next loss; a caller that reads losses late is ahead)."""
        self.step = state["step"]
        self.phase = Phase(state["phase"])
        self._set_plan(_Plan(**state["plan"]))
        self.intervention = _Intervention(**state["intervention"])
        self.paused = state["paused"]
        self.peak = state.get("peak", 1.0)
        self.awaiting_descent = state.get("awaiting_descent", False)
        self.watch_until = state.get("watch_until", 0)
        self.restarts = state["restarts"]
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        self.ignore_until = state.get("ignore_until", 0)
        self.forget_snapshots()  # snapshots are not checkpointed: the next one is due at once
        self.events = [Event.from_dict(event) for event in state["events"]]
        self.stabilizer.load_state_dict(state["stabilizer"])
        self.plateau.load_state_dict(state["plateau"])
        self.spike.load_state_dict(state["spike"])
        saved_total = state.get("total_steps", self.total_steps)
        if saved_total != self.total_steps:
            self._replan(saved_total, self.step if next_step is None else next_step)

    def _replan(self, saved_total: int, step: int) -> None:
        """The state was saved by a run planned for ``saved_total`` steps, this one plans
        ``total_steps``: keep the LR where it is and spread what is left of the plan over the
        new length from ``step`` (a ramp in progress finishes; the decay restarts from the
        current level)."""
        before = self.lr_scale(step)
        plan = self._plan
        if step >= self.total_steps:
            self.phase = Phase.DONE
            how = "nothing is left to plan"
        elif plan.hold is None:  # a warmup paused by a spike: its recovery plans the rest
            how = "the paused warmup plans the rest when it resumes"
        elif self.phase is Phase.WARMUP:
            # the ramp goes on; a new max_warmup already behind ends the warmup at the next step
            self._set_plan(self._decay_plan(plan.start, plan.v1, v0=plan.v0, ramp=plan.ramp))
            how = f"the warmup ramp goes on (max_warmup {self.max_warmup} steps), the decay follows"
        else:
            if step < plan.start + plan.ramp:  # a restart's ramp in progress: let it finish
                self._set_plan(self._decay_plan(plan.start, plan.v1, v0=plan.v0, ramp=plan.ramp))
            else:
                latest = self._latest_decay_start(step) if self.awaiting_descent else None
                level = self._base(step - plan.start)
                self._set_plan(self._decay_plan(step, level, decay_start=latest))
            self.phase = self._plan_phase(step)
            how = f"{self.config.decay} decay from the current LR scale over the remaining steps"
        why = (
            f"resumed at step {step} with a planned length of {self.total_steps} steps instead of "
            f"{saved_total}: {how}"
        )
        after = self.lr_scale(step)
        self.events.append(Event(step, EventKind.REPLAN, why, before, after, self.phase))

    # ------------------------------------------------------------------ LR
    def lr_scale(self, step: int) -> float:
        """Multiplier for each param group's base LR at optimizer ``step`` (>= the last loss's)."""
        scale = self._base(max(0, step - self._plan.start))
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
        step = self.step
        self.step += 1
        if step < self.ignore_until:  # undone by a rollback: the loss of discarded weights
            return self._close_step(step, [])
        new_events: list[Event] = []
        self._expire_recovery(step)

        mean, std = self.spike.mean, self.spike.std  # before this loss, for a spike's reason
        if update_skipped and math.isfinite(loss):
            signal, bad = Signal.NONFINITE, f"gradients are non-finite (loss {loss:.4g}); "
        else:
            signal, bad = self.spike.update(loss), f"loss is {loss}; "
        if signal is Signal.NONFINITE:
            self.nonfinite_streak += 1
            new_events.append(self._cut_for_spike(step, EventKind.NONFINITE, bad))
            if update_skipped:
                why = f"the optimizer update of step {step} was not applied: {bad.rstrip('; ')}"
                new_events.append(self._event(step, EventKind.SKIPPED_STEP, why, None))
            if self.nonfinite_streak >= self.config.rollback_nonfinite:
                self._request_rollback(
                    step,
                    f"{self.nonfinite_streak} non-finite steps in a row (rollback_nonfinite="
                    f"{self.config.rollback_nonfinite})",
                )
        elif signal is Signal.SPIKE:
            self.nonfinite_streak = 0
            why = (
                f"loss {loss:.4g} is {self.spike.last_zscore:.1f} sigma above its running mean "
                f"{mean:.4g} (noise {std:.3g}; thresholds {self.spike.zscore:g} sigma and "
                f"{self.spike.ratio:g}x the mean); "
            )
            new_events.append(self._cut_for_spike(step, EventKind.SPIKE, why))
            threshold = self.config.rollback_threshold
            if loss - mean >= (threshold - 1.0) * abs(mean):
                self._request_rollback(
                    step,
                    f"loss {loss:.4g} is at least {threshold:g}x its running mean {mean:.4g} "
                    f"(rollback_threshold={threshold:g})",
                )
        else:
            self.nonfinite_streak = 0
            self._settle_snapshot(step)
            if self.intervention.mode == "hold":
                new_events += self._maybe_recover(step, loss)
            if self.phase is Phase.WARMUP:
                new_events += self._warmup_update(step, loss)
            elif self.awaiting_descent:
                new_events += self._saddle_update(step, loss)
            elif self.phase in (Phase.STABLE, Phase.DECAY) and self.intervention.mode == "normal":
                new_events += self._climb_update(step, loss) or self._plateau_update(step, loss)
        return self._close_step(step, new_events)

    def pass_step(self) -> list[Event]:
        """Count step ``self.step`` without its loss (manual optimization whose
        ``training_step`` returned none): the plan moves on, warmup ends at ``max_warmup``,
        no detector sees anything."""
        step = self.step
        self.step += 1
        self._expire_recovery(step)
        return self._close_step(step, [])

    def _expire_recovery(self, step: int) -> None:
        if self.intervention.mode == "recover" and self.intervention.at(step + 1) >= 1.0:
            self.intervention = _Intervention()
            # a spike this soon after the LR is back is the same instability again
            self.watch_until = step + 1 + self.spike_cooldown + self.spike_recovery

    def _close_step(self, step: int, new_events: list[Event]) -> list[Event]:
        """What every step ends with: a snapshot of this step that did not settle is no good,
        the warmup deadline, the end of the plan; record ``new_events``."""
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
            level = self._base(step + 1 - plan.start)
            why = (
                f"the hold at LR scale {level:.3g} ends: {plan.shape} decay to the floor "
                f"({self.floor:g}) over the last {plan.decay} steps"
            )
            new_events.append(self._event(step, EventKind.DECAY_START, why, None))
        self.phase = phase

    # ------------------------------------------------------------------ snapshots and rollback
    def forget_snapshots(self) -> None:
        """No snapshot exists (a fresh fit, a resume, or the caller dropped them)."""
        self._pending_snapshot: tuple[int, int] | None = None
        self._good_snapshot: tuple[int, int] | None = None
        self._last_snapshot_step = -math.inf
        # set by a decision to roll back: the step of the snapshot the caller is to restore
        self.rollback_to: int | None = None
        self._rollback_cause: tuple[int, str] = (0, "")

    @property
    def good_snapshot_step(self) -> int | None:
        """The step of the snapshot a rollback would restore (``None``: none yet)."""
        return None if self._good_snapshot is None else self._good_snapshot[0]

    def snapshot_due(self, step: int) -> bool:
        """Whether the caller should snapshot the weights as they are at the start of ``step``:
        ``snapshot_every`` steps after the last one, none waiting for its loss, and the loss
        stream normal as far as it has been read (no cut LR, no non-finite step)."""
        return (
            self._pending_snapshot is None
            and self.rollback_to is None
            and step - self._last_snapshot_step >= self.snapshot_every
            and step >= self.ignore_until
            and self.intervention.mode == "normal"
            and self.nonfinite_streak == 0
        )

    def snapshot_taken(self, step: int, nbytes: int) -> None:
        """The caller snapshotted the weights at the start of ``step`` (``nbytes`` in memory).
        It becomes the rollback target once the loss of ``step`` is read and normal."""
        self._pending_snapshot = (step, nbytes)
        self._last_snapshot_step = step

    def _settle_snapshot(self, step: int) -> None:
        """Promote the pending snapshot once the (normal) loss of its step is read."""
        pending = self._pending_snapshot
        if (
            pending is not None
            and pending[0] == step
            and self.spike.last_zscore <= NORMAL_BAND_ZSCORE
        ):
            self._good_snapshot, self._pending_snapshot = pending, None

    def _request_rollback(self, step: int, cause: str) -> None:
        if self._good_snapshot is None or self.rollback_to is not None:
            return  # nothing to go back to (yet), or already going back
        self.rollback_to = self._good_snapshot[0]
        self._rollback_cause = (step, cause)

    def rolled_back(self, now: int) -> Event:
        """Record that the caller restored the snapshot of step :attr:`rollback_to` and resumes
        at step ``now``; the losses of steps before ``now`` that arrive later are ignored."""
        if self.rollback_to is None or self._good_snapshot is None:
            raise ValueError("rolled_back() without a rollback decision (rollback_to is None)")
        target, nbytes = self._good_snapshot
        step, cause = self._rollback_cause
        self.rollback_to = None
        self._pending_snapshot = None  # may hold weights taken after the trouble began
        self.ignore_until = max(self.ignore_until, now)
        self.nonfinite_streak = 0
        why = (
            f"{cause}: restored the snapshot of step {target} ({_format_bytes(nbytes)}), "
            f"undoing the updates of steps {target} to {now - 1} ({now - target} steps)"
        )
        scale = self.lr_scale(now)
        event = Event(step, EventKind.ROLLBACK, why, scale, scale, self.phase)
        self.events.append(event)
        return event

    def _warmup_update(self, step: int, loss: float) -> list[Event]:
        """The automatic warmup's decisions on a normal loss: pause the ramp while the loss rises,
        resume it once it stops rising, end the warmup once the loss has stabilized."""
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
            level = self._base(step + 1 - self._plan.start)
            self.paused = True
            self._set_plan(_Plan(step + 1, level, level, 0, None, 0, "linear"))
            why = f"the loss is rising: {trend}; the warmup ramp holds at LR scale {level:.3g}"
            return [self._event(step, EventKind.RAMP_PAUSE, why, before)]
        if self.paused:
            before = self.lr_scale(step + 1)
            level = self._base(step + 1 - self._plan.start)
            self.paused = False
            ramp = self._ramp_steps(level, self.max_warmup)
            self._set_plan(self._decay_plan(step + 1, self.peak, v0=level, ramp=ramp))
            why = (
                f"the loss stopped rising: {trend}; the ramp goes on from LR scale {level:.3g} "
                f"to {self.peak:.3g} over {ramp} steps"
            )
            return [self._event(step, EventKind.RAMP_RESUME, why, before)]
        if signal is Signal.STABILIZED and step + 1 >= self.min_warmup:
            why = (
                f"the loss stabilized after its initial descent: {trend}, not steeper and not "
                f"rising for {det.patience} steps in a row"
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
                why = f"fixed warmup of {self.max_warmup} steps finished"
            else:
                drop = "none measured yet" if det.last_drop is None else f"{det.last_drop:.2%}"
                why = (
                    f"the ramp reached the peak at the pace of a {self.max_warmup}-step ramp "
                    f"(max_warmup) before the loss stabilized (last EMA drop {drop} per "
                    f"{det.window} steps, noise {det.last_noise:.2%})"
                )
            return [self._end_warmup(step, why)]
        if step + 1 < self.max_warmup:
            return []
        level = self._base(step + 1 - plan.start)
        if self.paused and self.intervention.mode == "normal":  # held by a rising loss
            self.peak = min(self.peak, level)
            why = (
                f"max_warmup={self.max_warmup} steps reached while the loss was rising: the peak "
                f"is lowered to LR scale {self.peak:.3g}, the highest the loss took"
            )
        else:
            why = (
                f"max_warmup={self.max_warmup} steps reached at LR scale {level:.3g} (the ramp was "
                f"held on the way); it finishes at the pace of a {self.min_warmup}-step ramp"
            )
        return [self._end_warmup(step, why)]

    def _end_warmup(self, step: int, why: str) -> Event:
        """Warmup is over: from the current level the LR goes to the peak at the ``min_warmup``
        pace (at once if it is there), then decays."""
        before = self.lr_scale(step + 1)
        level = self._base(step + 1 - self._plan.start)
        self.paused = False
        ramp = self._ramp_steps(level, self.min_warmup)
        # a loss that never fell steeply sits where it started (a saddle): hold the peak, the
        # decay waits for the descent (at the latest, a wsd tail)
        self.awaiting_descent = (
            self.config.warmup == "auto"
            and self.config.decay != "wsd"  # wsd holds the peak anyway
            and not self.stabilizer.steep_seen
        )
        latest = self._latest_decay_start(step + 1) if self.awaiting_descent else None
        if ramp:
            plan = self._decay_plan(step + 1, self.peak, v0=level, ramp=ramp, decay_start=latest)
            why += f"; the LR goes from scale {level:.3g} to the peak over {ramp} steps"
        else:
            plan = self._decay_plan(step + 1, min(level, self.peak), decay_start=latest)
        self._set_plan(plan)
        if self.awaiting_descent:
            why += (
                "; the loss has not fallen steeply yet: the peak is held until it does (a saddle), "
                f"at the latest until step {latest}"
            )
        self.phase = self._plan_phase(step + 1)
        self.plateau.reset()
        return self._event(step, EventKind.WARMUP_END, why, before)

    def _latest_decay_start(self, start: int) -> int:
        """Where a hold that began at ``start`` gives way to the decay at the latest: the last
        ``wsd_decay_fraction`` of the steps from ``start`` are left for the decay."""
        return self.total_steps - round(self.config.wsd_decay_fraction * (self.total_steps - start))

    def _saddle_update(self, step: int, loss: float) -> list[Event]:
        """The peak is held while the loss sits where it started and while it then falls
        steeply; the decay begins once that descent has stabilized, as a warmup ends (Barak et
        al. 2022: a lower LR only delays the escape from such a plateau)."""
        signal = self.stabilizer.update(loss)
        det = self.stabilizer
        if self.phase is not Phase.STABLE:  # the latest decay start came first
            self.awaiting_descent = False
            return []
        if signal is not Signal.STABILIZED:
            return []
        before = self.lr_scale(step + 1)
        self.awaiting_descent = False
        level = self._base(step + 1 - self._plan.start)
        self._set_plan(self._decay_plan(step + 1, level))
        self.phase = self._plan_phase(step + 1)
        self.plateau.reset()
        why = (
            f"the loss left its initial plateau and its descent stabilized: its EMA changed by "
            f"{-(det.last_drop or 0.0):+.2%} over the last {det.window} steps (noise "
            f"{det.last_noise:.2%}, threshold {det.threshold:.2%}) for {det.patience} steps; "
            f"{self._plan.shape} decay from LR scale {level:.3g} to the floor ({self.floor:g}) "
            f"over the remaining {self._plan.decay} steps"
        )
        return [self._event(step, EventKind.DECAY_START, why, before)]

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
        run, det.rise_run = det.rise_run, 0
        before = self.lr_scale(step + 1)
        self._lower_peak(step, self._base(step + 1 - self._plan.start) * self.config.spike_factor)
        self.plateau.reset()
        why = (
            f"the loss kept rising: its EMA went from {det.rise_base:.4g} to {det.ema:.4g} "
            f"(more than {ratio:g}x), rising beyond its noise ({det.last_noise:.2%} per "
            f"{det.window} steps) for {run} steps in a row; "
            f"the peak is lowered x"
            f"{self.config.spike_factor:g} to LR scale {self.peak:.3g} for the rest of the run"
        )
        return [self._event(step, EventKind.CLIMB, why, before)]

    def _plateau_update(self, step: int, loss: float) -> list[Event]:
        """A stalled loss: cut the LR of a hold at its level (a decay already lowers it: a cut
        late in a healthy decay only costs), or restart (``plateau_action="restart"``)."""
        if self.plateau.update(loss) is not Signal.PLATEAU:
            return []
        if self.config.plateau_action == "cut" and self.phase is not Phase.STABLE:
            return []
        cfg, det = self.config, self.plateau
        before = self.lr_scale(step + 1)
        current = self._base(step + 1 - self._plan.start)
        stalled = (
            f"the smoothed loss (EMA {det.ema:.4g}) has not improved by {det.min_delta:.2%} on "
            f"its best {det.best:.4g} for {det.patience} steps; "
        )
        if cfg.plateau_action == "restart" and self.restarts < cfg.max_restarts:
            self.restarts += 1
            target = cfg.restart_peak * self.peak
            self._set_plan(self._decay_plan(step + 1, target, v0=current, ramp=self.restart_warmup))
            why = (
                f"{stalled}restart {self.restarts}/{cfg.max_restarts}: re-warm from "
                f"{current:.3g} to {target:.3g} ({cfg.restart_peak:g} of the peak) "
                f"over {self.restart_warmup} steps"
            )
            return [self._event(step, EventKind.RESTART, why, before)]
        cut = max(self.floor, current * cfg.plateau_factor)
        if cut >= current:
            return []  # already at the floor: nothing left to cut
        self._set_plan(self._decay_plan(step + 1, cut))
        why = f"{stalled}LR scale cut x{cfg.plateau_factor:g} from {current:.3g} to {cut:.3g}"
        return [self._event(step, EventKind.PLATEAU, why, before)]

    def _cut_for_spike(self, step: int, kind: EventKind, why: str) -> Event:
        before = self.lr_scale(step + 1)
        hold_until = step + 1 + self.spike_cooldown
        if self.intervention.mode == "hold":
            self.intervention.hold_until = hold_until
            why += f"already cut, cooldown extended to step {hold_until}"
            return self._event(step, kind, why, before)
        if self.intervention.mode == "recover" or step < self.watch_until:
            self._lower_peak(step, before * self.config.spike_factor)
            why += (
                f"the loss spiked again at LR scale {before:.3g} within "
                f"{self.spike_cooldown + self.spike_recovery} steps of the last cut: the peak is "
                f"lowered to {self.peak:.3g} for the rest of the run; "
            )
        current = self.intervention.at(step + 1)
        value = max(self.floor, current * self.config.spike_factor)
        self.intervention = _Intervention(mode="hold", value=value, hold_until=hold_until)
        if self.phase is Phase.WARMUP and not self.paused:
            self.paused = True
            frozen = min(self.peak, self._base(step + 1 - self._plan.start))
            self._set_plan(_Plan(step + 1, frozen, frozen, 0, None, 0, "linear"))
            why += "warmup ramp paused; "
        why += (
            f"LR multiplier cut x{self.config.spike_factor:g} to {value:.3g}, "
            f"held for {self.spike_cooldown} steps"
        )
        return self._event(step, kind, why, before)

    def _lower_peak(self, step: int, peak: float) -> None:
        """The LR went past what this run can take: the peak becomes ``peak`` (never below the
        floor) for the rest of the run, a ceiling, and the plan is re-planned under it from
        step ``step + 1``."""
        self.peak = max(self.floor, min(self.peak, peak), _MIN_PEAK)
        level = self._base(step + 1 - self._plan.start)
        if self.phase is Phase.WARMUP:
            if self.paused or level >= self.peak:  # held, or past the new peak: hold there
                held = min(level, self.peak)
                self._set_plan(_Plan(step + 1, held, held, 0, None, 0, "linear"))
                self.paused = True
            else:  # the ramp goes on, to the lower peak
                ramp = self._ramp_steps(level, self.max_warmup)
                self._set_plan(self._decay_plan(step + 1, self.peak, v0=level, ramp=ramp))
        elif self.phase is not Phase.DONE and level > self.peak:
            latest = self._latest_decay_start(step + 1) if self.awaiting_descent else None
            self._set_plan(self._decay_plan(step + 1, self.peak, decay_start=latest))
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
            recover_start=step + 1,
            recover_steps=self.spike_recovery,
        )
        why = (
            f"loss {loss:.4g} is back within {NORMAL_BAND_ZSCORE:g} sigma of its running mean "
            f"{self.spike.mean:.4g}; LR multiplier ramps from {held.value:.3g} back to 1 over "
            f"{self.spike_recovery} steps"
        )
        if self.paused:
            self.paused = False
            current = self._base(step + 1 - self._plan.start)
            ramp = self._ramp_steps(current, self.max_warmup)
            self._set_plan(self._decay_plan(step + 1, self.peak, v0=current, ramp=ramp))
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
    ) -> _Plan:
        """Ramp ``v0 -> v1`` from ``start``, hold until ``decay_start``, then decay to the floor
        by ``total_steps`` in the configured shape (for ``wsd``: hold, then a linear tail)."""
        ramp_end = start + ramp
        decay_start = ramp_end if decay_start is None else max(decay_start, ramp_end)
        remaining = max(0, self.total_steps - decay_start)
        shape, stable = self.config.decay, 0
        if shape == "wsd":
            stable = round(remaining * (1.0 - self.config.wsd_decay_fraction))
            shape = "linear"
        hold = decay_start - ramp_end + stable
        return _Plan(start, v1 if v0 is None else v0, v1, ramp, hold, remaining - stable, shape)

    def _set_plan(self, plan: _Plan) -> None:
        self._plan = plan
        self._base = plan.build(self.floor)

    def _event(self, step: int, kind: EventKind, why: str, before: float | None) -> Event:
        """An event at ``step``; ``before=None``: the LR is unchanged by it."""
        after = self.lr_scale(step + 1)
        return Event(step, kind, why, after if before is None else before, after)
