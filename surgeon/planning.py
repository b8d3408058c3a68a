"""Re-planning a run from what it turns out to allow: framework-free, from counters and times.

The planned length a run starts with is a guess when something else ends it. What the
adapters measure, and what the engine's plan is then moved to:

* :class:`TimePlanner`: a wall-clock budget (Lightning's ``max_time``). From the step rate it
  estimates the steps left; the first estimate plans the run (its fractional lengths resolved
  against it), later ones cool down so the LR reaches the floor as the time runs out;
* :class:`ManualStepPlanner`: a budget of optimizer calls where several optimizers step per
  batch (Lightning's ``max_steps`` under manual optimization counts every ``opt.step()``): the
  run's length projected from the calls per batch so far;
* :func:`lengths_for`: the settings with every fractional length resolved against a run.

Each acts on a :class:`~surgeon.engine.StepEngine` through its controller and reports through
the engine's ``on_event``; what reads the clock, and what makes ranks agree on a number, is
passed in.
"""

import math
from collections import deque
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

from surgeon.config import Steps, SurgeonConfig, resolve_steps
from surgeon.controller import Controller, Event, EventKind, Phase
from surgeon.engine import StepEngine

OPEN_ENDED = 10**9
"""The planned length of a run only a time budget bounds: its time cooldown ends it."""
RECENT_CHECKS = 16
"""The recent step rate is measured over this many time checks."""
TIME_MARGIN = 0.05
"""A time plan ends this fraction of the measured steps left early (rates drift)."""
RECORDED_MOVE = 0.02
"""A re-planned ``max_time`` cooldown is recorded (an event, printed and logged) only when its
end moved by more than this share of the run since the last one recorded; the others move
the plan alike (the same LRs), unrecorded: the measured step rate jitters."""
MANUAL_SAMPLE = 10
"""Steps before the optimizer calls per batch are trusted to project the run's length."""
MANUAL_TOLERANCE = 0.05
"""A projected length off the plan by more than this share of it is re-planned."""


def _same(value: Any) -> Any:
    """One process: what every rank agrees on is its own."""
    return value


def lengths_for(config: SurgeonConfig, run: int | None) -> SurgeonConfig:
    """``config`` with every fractional length (warmup, windows, patience, cooldowns,
    snapshots) resolved against a run of ``run`` steps (``None``: as it is)."""
    if run is None:
        return config
    lengths: dict[str, Any] = {
        f.name: resolve_steps(f.name, getattr(config, f.name), run)
        for f in fields(config)
        if f.type is Steps
    }
    if config.warmup != "auto":  # a fixed warmup's length
        lengths["warmup"] = resolve_steps("warmup", config.warmup, run)
    return replace(config, **lengths)


class TimePlanner:
    """Plans and cools down a run that a wall-clock budget ends, from its measured step rate.

    Checked every ``every`` steps (:meth:`check` once ``engine.step >= next_check``): from the
    rate measured since the first check (or over the recent checks, if slower), the steps left
    before the time runs out. While ``probing`` (a fresh run without a length of its own) the
    first estimate plans the run: a ``replan`` when the time ends it first, with a fresh
    controller fed the losses consumed so far (:meth:`record` them while probing). Later ones
    cool down in time when the time ends the run first (for ``wsd`` once the steps left are its
    tail's share of the run; other shapes once warmup is over), and move the cooldown's end when
    the estimate moves by more than a tenth (twice that to extend it: ending early only holds
    the floor longer; at least ``2 x every`` steps), recording the move only when the end moved
    by more than :data:`RECORDED_MOVE` of the run since the last recorded one. ``agree`` makes
    the ranks agree on the steps left and the readings its reason quotes (rank zero's clock:
    a broadcast of a tuple)."""

    def __init__(
        self,
        engine: StepEngine,
        config: SurgeonConfig,
        *,
        elapsed: Callable[[], float],
        remaining: Callable[[], float],
        every: int,
        plan_cap: int | None,
        probing: bool,
        agree: Callable[[Any], Any] = _same,
    ) -> None:
        """``config``: the settings as given (fractions of the run), ``plan_cap``: a length the
        run never goes past (``None``: only the time bounds it)."""
        assert engine.controller is not None
        self.engine, self.config = engine, config
        self.elapsed, self.remaining, self.agree = elapsed, remaining, agree
        self.every = every
        self.plan_cap = plan_cap
        self.probing = probing
        self.estimate: int | None = None
        """The run a time plan's lengths are of (``None``: no plan made)."""
        self.next_check = engine.step + every
        self._probe_losses: dict[int, tuple[float | None, bool]] = {}
        self._samples: deque[tuple[int, float]] = deque(maxlen=RECENT_CHECKS + 1)
        self._origin: tuple[int, float] | None = None
        self._cooling = any(e.kind is EventKind.COOLDOWN for e in engine.events)
        self._recorded_end = engine.controller.total_steps  # a cooldown's, once cooling

    def record(self, rows: list[tuple[int, float | None, bool]]) -> None:
        """Losses the controller consumed, ``(step, loss, update_skipped)``, kept while probing:
        a time plan feeds them to its fresh controller."""
        if self.probing:
            self._probe_losses.update((step, (loss, us)) for step, loss, us in rows)

    def check(self) -> None:
        """Measure the rate, estimate the steps left, and plan or cool down (see the class)."""
        engine = self.engine
        step = engine.step
        self.next_check = step + self.every
        controller = engine.controller
        assert controller is not None
        elapsed = self.elapsed()
        samples = self._samples
        samples.append((step, elapsed))
        if self._origin is None:  # the first steps carry start-up costs: measure after them
            self._origin = (step, elapsed)
            return
        start_step, start_time = self._origin
        if step - start_step < (3 if self.probing else 1) * self.every:
            return
        # the slower of the whole run's rate (validation included) and the recent one (a
        # slowdown shows at once): ending early only holds the floor longer
        rate = min(
            (step - start_step) / max(elapsed - start_time, 1e-9),
            (step - samples[0][0]) / max(elapsed - samples[0][1], 1e-9),
        )
        remaining = max(0.0, self.remaining())
        # end a little early rather than late: the LR then holds the floor for those steps
        estimate = int(remaining * rate * (1.0 - TIME_MARGIN)) - 2 * self.every
        # rank zero's estimate, and the clock readings its reason quotes, are every rank's
        estimate, remaining, rate = self.agree((estimate, remaining, rate))
        left = max(1, estimate)
        why = (
            f"max_time: {remaining:.4g} s left at {rate:.4g} steps/s (since step {start_step}, "
            f"or over the last {step - samples[0][0]} steps if slower) is about {left} more steps"
        )
        if self.probing:
            self.probing = False
            if step + left < controller.total_steps:
                self._plan(step + left, why)
            self._probe_losses = {}
            return
        if controller.phase is Phase.DONE:
            return
        if self.plan_cap is not None:  # never past what the run's own length allows
            left = min(left, self.plan_cap - step)
        planned = controller.total_steps - step
        if not self._cooling:
            wsd = self.config.decay == "wsd"
            tail = self.config.wsd_decay_fraction if wsd else 1.0
            due = left <= tail * (step + left) and (wsd or controller.phase is not Phase.WARMUP)
            if left >= planned or not due:
                return  # the plan ends first, or its cooldown is not due yet
            why += ": cooling down in time"
        else:  # a cooldown is under way: move its end when the estimate has moved enough
            slack = max(2 * self.every, planned // 10)
            if planned - slack <= left <= planned + 2 * slack:
                return
            why += f", not the {planned} the cooldown has left"
        first = not self._cooling
        self._cooling = True
        event = controller.cool_down(step, left, why, record=False)
        end = controller.total_steps
        if first or abs(end - self._recorded_end) > RECORDED_MOVE * end:
            self._recorded_end = end
            controller.events.append(event)
            engine.on_event(event)
        # else the same plan, unrecorded: a small move of the end (the rate's jitter)

    def _plan(self, estimate: int, why: str) -> None:
        """Plan the run for the ``estimate`` steps the time allows: a fresh controller whose
        fractional lengths are of that run, fed the losses the first one has consumed (the
        events already reported stay the record). Its planned length stays open (or
        ``plan_cap``): the time cooldown ends it, wherever the step rate puts the end."""
        engine = self.engine
        old = engine.controller
        assert old is not None
        config = lengths_for(self.config, estimate)
        new = Controller(OPEN_ENDED if self.plan_cap is None else self.plan_cap, config)
        for step in range(old.step):
            item = self._probe_losses.get(step)
            if item is None or item[0] is None:  # a step without a loss
                new.pass_step(applied=item is None or not item[1])
            else:
                new.update(item[0], update_skipped=item[1])
        new.events = list(old.events)
        step = engine.step
        why += (
            f": the run is planned as a {estimate}-step one (warmup {new.min_warmup} to "
            f"{new.max_warmup} steps), and cools down as the time runs out"
        )
        before, after = old.lr_scale(step), new.lr_scale(step)
        end = new.total_steps if new.total_steps < OPEN_ENDED else None  # None: open-ended
        event = Event(max(0, step - 1), EventKind.REPLAN, why, before, after, new.phase, end)
        new.events.append(event)
        engine.config, engine.controller = config, new
        self.estimate = estimate
        engine.on_event(event)


class ManualStepPlanner:
    """Follows a run whose step budget counts every optimizer call (``max_steps``) while
    several optimizers may step per batch, and the plan assumed each steps every batch.

    Once :data:`MANUAL_SAMPLE` steps are in, :meth:`follow` projects the run's length from the
    calls per batch so far; off the plan by more than :data:`MANUAL_TOLERANCE` (and by more
    than an unfinished cycle of the stepping pattern can skew it: up to one step per optimizer),
    it re-plans (a ``replan`` event). The same counters on every rank and after a resume: the
    same decisions."""

    def __init__(self, engine: StepEngine, max_steps: int, batch_limit: float) -> None:
        """``max_steps``: the budget of optimizer calls; ``batch_limit``: the batches the run
        has at most (``math.inf``: no other bound)."""
        self.engine = engine
        self.max_steps = max_steps
        self.batch_limit = batch_limit

    def follow(self, calls: int) -> None:
        """After a step: ``calls`` optimizer calls so far (Lightning's ``global_step``)."""
        engine, controller = self.engine, self.engine.controller
        assert controller is not None
        done = engine.step  # the batches that stepped an optimizer
        if done < MANUAL_SAMPLE:
            return
        per_batch = calls / done
        left = max(0, self.max_steps - calls)
        projected = int(min(done + math.ceil(left / per_batch), self.batch_limit))
        tolerance = max(MANUAL_TOLERANCE, len(engine.optimizers) / done)
        if abs(projected - controller.total_steps) <= tolerance * controller.total_steps:
            return
        engine.replan(
            projected,
            f"under manual optimization max_steps={self.max_steps} counts every opt.step(), "
            f"{per_batch:.3g} per batch so far: the run ends after about {projected} steps, not "
            f"{controller.total_steps}",
        )
