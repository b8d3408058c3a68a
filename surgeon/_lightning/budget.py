"""Fits that end before their plan: ``max_time``, an ``EarlyStopping`` about to stop the fit,
and the record of an early end.

* ``max_time``: the ``Timer`` that enforces it is the clock of a
  :class:`~surgeon.planning.TimePlanner` (checked every ``readback_every`` steps, every
  :data:`DDP_BUDGET_EVERY` under DDP, where each check is a broadcast of rank zero's
  estimate); a fit only the time bounds is planned open-ended, then from its step rate;
* ``EarlyStopping``: after its check (at the validation's end or the epoch's, where it
  checks), when one more check without improvement would stop the fit and two or more have
  been without improvement already, the LR decays to the floor by that check; rank zero
  decides. If that check improves after all (the anneal itself often improves the monitored
  metric), the LR ramps back to where the cooldown started and the plan runs on to the fit's
  length; with fewer than two check intervals of it left and a floor of 0, the fit is
  stopped instead (the up to ``patience`` checks EarlyStopping would wait train nothing);
* a fit that ends before its plan gets a ``stopped`` event saying what ended it.
"""

import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl

from surgeon._lightning.reporting import NEVER
from surgeon._lightning.trainer import (
    is_a,
    per_batch_steps,
    planned_steps,
    steps_of_epochs,
    swa_added_epoch,
    time_limit,
)
from surgeon.config import SurgeonConfig
from surgeon.controller import Event, EventKind, Phase, plural
from surgeon.engine import StepEngine
from surgeon.planning import OPEN_ENDED, TimePlanner, lengths_for

_ES_COOLDOWN = "EarlyStopping("
"""How the reason of a cooldown for an ``EarlyStopping`` check begins."""
DDP_BUDGET_EVERY = 32
"""Steps between ``max_time`` checks under DDP (each is a broadcast of rank zero's estimate)."""


def _may_stop_by_next_check(trainer: pl.Trainer, interval: int) -> bool:
    """Whether Lightning lets a stop at the next ``EarlyStopping`` check end the fit: its
    ``min_steps`` and ``min_epochs`` met by then (``interval`` surgeon steps from now; an
    epoch-end check has one more epoch processed). A stop it refuses leaves the fit running
    on (until they are met: :func:`_steps_until_a_refused_stop`)."""
    loop = trainer.fit_loop
    if loop.min_steps and trainer.global_step + interval * per_batch_steps(trainer) < (
        loop.min_steps
    ):
        return False
    return not (loop.min_epochs and loop.epoch_progress.current.processed + 1 < loop.min_epochs)  # type: ignore[attr-defined]


def _steps_until_a_refused_stop(trainer: pl.Trainer) -> int:
    """Surgeon steps from now until Lightning ends a fit whose stop it refused
    (``should_stop`` set before ``min_steps`` / ``min_epochs`` were met): it ends at the first
    step that meets ``min_steps``, and at the end of the epoch that meets ``min_epochs``."""
    loop = trainer.fit_loop
    per_batch = per_batch_steps(trainer)
    done = trainer.global_step // per_batch
    left = 0
    if loop.min_steps:
        left = max(left, math.ceil(loop.min_steps / per_batch) - done)
    if loop.min_epochs and loop.epoch_progress.current.processed < loop.min_epochs:  # type: ignore[attr-defined]
        epochs = steps_of_epochs(trainer, 0, loop.min_epochs)  # (at the loader's length now)
        if epochs is not None:
            left = max(left, epochs - done)
    return left


class FitBudget:
    """What may end a fit before its plan, watched through Lightning's callbacks."""

    def __init__(
        self,
        engine: StepEngine,
        config: SurgeonConfig,
        *,
        total_steps: int | None,
        cooldown_on_stop: bool,
        notice: Callable[[str], None],
    ) -> None:
        self.engine, self.config = engine, config
        self.total_steps = total_steps
        self.cooldown_on_stop = cooldown_on_stop
        self.notice = notice
        self.timer: Any = None
        self.plan_cap: int | None = None
        """What ``total_steps`` / ``max_steps`` / ``max_epochs`` allow (``None``: only time)."""
        self.time_estimate: int | None = None
        """The run a ``max_time`` plan's lengths are of (checkpointed)."""
        self.time: TimePlanner | None = None
        self.pending = False
        """An ``EarlyStopping`` check has run: look at it before the next step's LR."""
        self._early_stoppers: list[Any] = []
        self._watch_early_stopping = False
        self._es_on_epoch_end = False
        self._last_es_step = 0
        self._saved_early_stopping: dict[str, Any] | None = None
        # the checkpoint's plan end and whether a cooldown moved it, to recount the epochs left
        self._count_epochs_left: tuple[int, bool] | None = None

    @property
    def next_check(self) -> int:
        """The step at which the next ``max_time`` check is due."""
        return NEVER if self.time is None else self.time.next_check

    def plan(self, trainer: pl.Trainer, pending_state: dict[str, Any] | None) -> int:
        """``on_fit_start``: the length to start with, and the settings' lengths. A resumed fit
        whose plan a budget moved (a cooldown, a ``max_time`` plan) keeps its checkpoint's; a
        fit only ``max_time`` bounds is open-ended (its time cooldown ends it); else the
        planned length (``total_steps``, else what ends the fit first)."""
        self.timer = time_limit(trainer) if self.cooldown_on_stop else None
        self.plan_cap = planned_steps(trainer, self.total_steps, self.timer is not None)
        # a max_time plan's lengths are fractions of the run its step rate allows (checkpointed)
        self.time_estimate = (pending_state or {}).get("time_estimate")
        self._saved_early_stopping = (pending_state or {}).get("early_stopping")
        self.engine.config = lengths_for(self.config, self.time_estimate)
        if pending_state is not None and "controller" in pending_state:
            saved = pending_state["controller"]
            moved = any(e["kind"] == EventKind.COOLDOWN.value for e in saved["events"])
            if self.timer is not None:
                return int(saved["total_steps"])
            if self._ended_by_epochs(trainer):
                # the epochs done ran at the checkpoint's steps per epoch, the ones left run at
                # this fit's: counted at its first batch, once Lightning has restored its loops
                # (a plan a cooldown moved keeps its end: the count is the fit's length)
                self._count_epochs_left = (int(saved["total_steps"]), moved)
            # the checkpoint's planned length (the settings' lengths are fractions of it); its
            # state then keeps its plan (one a cooldown moved too)
            if moved or self._count_epochs_left is not None:
                return int(pending_state.get("planned", saved["total_steps"]))
        return OPEN_ENDED if self.plan_cap is None else self.plan_cap

    def _ended_by_epochs(self, trainer: pl.Trainer) -> bool:
        """Whether ``max_epochs`` sets this fit's planned length (not ``total_steps``,
        ``max_steps`` or ``max_time``; automatic optimization: manual has its own planner)."""
        cap, epochs, max_steps = self.plan_cap, trainer.max_epochs, trainer.max_steps
        return (
            self.total_steps is None
            and cap is not None
            and epochs is not None
            and epochs > 0
            and trainer.lightning_module.automatic_optimization
            and (max_steps is None or max_steps < 0 or cap < max_steps)
        )

    def count_the_epochs_left(self, trainer: pl.Trainer, batch_idx: int) -> None:
        """At the first batch of a fit resumed from a checkpoint, which ``max_epochs`` ends
        (``batch_idx``: the batches of this epoch done before the checkpoint): the steps left
        are the batches left at this fit's accumulation, which may differ from the
        checkpoint's (a batch size or ``accumulate_grad_batches`` changed on resume; Lightning's
        estimate counts the epochs done at this fit's length too): a ``replan`` when that moves
        the end."""
        saved, self._count_epochs_left = self._count_epochs_left, None
        if saved is None:
            return
        saved_end, moved = saved
        controller, epochs = self.engine.controller, trainer.max_epochs
        epoch, batches = trainer.current_epoch, trainer.num_training_batches
        if controller is None or epochs is None:
            return
        epochs -= swa_added_epoch(trainer)  # it makes no steps
        later = steps_of_epochs(trainer, epoch + 1, epochs)
        this_epoch = steps_of_epochs(trainer, epoch, epoch + 1)
        if later is None or this_epoch is None or epoch >= epochs:
            return
        # the steps of this epoch not done: its batch_idx batches before made whole steps of
        # its accumulation, the one under way (resumed between micro-batches) is still to come
        left = later + max(0, this_epoch - batch_idx // trainer.accumulate_grad_batches)
        step = self.engine.step
        total = self._end_after(trainer, left)
        self.plan_cap = total  # the fit's length (an EarlyStopping rewarm plans to it)
        if moved or controller.total_steps != saved_end:  # a cooldown set the end (the
            return  # checkpoint's, or one this resume made at its first check)
        if total > step and total != controller.total_steps:
            self.engine.replan(
                total,
                f"resumed in epoch {epoch} of max_epochs={epochs}: the batches left make "
                f"{left} steps at this fit's {batches} batches an epoch, accumulating "
                f"{trainer.accumulate_grad_batches} (the checkpoint's plan counted its own)",
            )

    def begin_training(self, trainer: pl.Trainer, probing: bool) -> None:
        """``on_train_start``: find the ``EarlyStopping`` callbacks (checked after theirs run)
        and start the ``max_time`` planner (``probing``: it plans the run's length)."""
        self._early_stoppers = [cb for cb in trainer.callbacks if is_a(cb, "EarlyStopping")]  # type: ignore[attr-defined]
        # where EarlyStopping checks: Lightning decides in its setup, before on_fit_start
        at_epoch_end = [
            bool(getattr(es, "_check_on_train_epoch_end", False)) for es in self._early_stoppers
        ]
        self._es_on_epoch_end = any(at_epoch_end)
        self._watch_early_stopping = self.cooldown_on_stop and bool(self._early_stoppers)
        if self._watch_early_stopping and self._es_on_epoch_end and not all(at_epoch_end):
            self.notice(
                "the EarlyStopping callbacks check in different places (at validations and at "
                "epoch ends): the cooldown before a stop follows the epoch-end checks only, so "
                "a stop at a validation inside an epoch may come at a higher LR"
            )
        self.pending = False
        self._last_es_step = self.engine.step
        saved, self._saved_early_stopping = self._saved_early_stopping, None
        if saved is not None:  # a checkpoint written between a check and the next step
            self.pending, self._last_es_step = bool(saved["pending"]), int(saved["last_check"])
        self.time = None
        if self.timer is None:
            return
        every = self.engine.readback_every
        if trainer.world_size > 1:  # each check is then a broadcast (Lightning's Timer makes one
            every = max(every, DDP_BUDGET_EVERY)  # every step): fewer checks
        timer = self.timer
        self.time = TimePlanner(
            self.engine,
            self.config,
            elapsed=lambda: timer.time_elapsed("train"),
            remaining=lambda: timer.time_remaining("train"),
            every=every,
            plan_cap=self.plan_cap,
            probing=probing,
            agree=trainer.strategy.broadcast if trainer.world_size > 1 else lambda n: n,
        )

    def check_time(self) -> None:
        """A ``max_time`` check (due at :attr:`next_check`)."""
        assert self.time is not None
        self.time.check()
        if self.time.estimate is not None:
            self.time_estimate = self.time.estimate

    def after_validation(self, trainer: pl.Trainer, surgeon: Any) -> None:
        """At the surgeon's ``on_validation_end``: an ``EarlyStopping`` that checks there is
        looked at now when every one of them runs before the surgeon (its check is done: a stop
        then runs no further step), else before the next step."""
        watch = self._watch_early_stopping and not self._es_on_epoch_end
        if watch and not trainer.sanity_checking:
            self.pending = True
            callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
            mine = next(i for i, cb in enumerate(callbacks) if cb is surgeon)
            if all(callbacks.index(es) < mine for es in self._early_stoppers):
                self.check_early_stopping(trainer)

    def after_train_epoch(self) -> None:
        """At the epoch's end: an ``EarlyStopping`` that checks there is looked at before the
        next step."""
        if self._watch_early_stopping and self._es_on_epoch_end:
            self.pending = True

    def early_stopping_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the ``EarlyStopping`` watch: a check not looked at yet
        (``ModelCheckpoint`` saves right after the validation that ran it) and the step of the
        last one (the interval the cooldown is sized by)."""
        return {"pending": self.pending, "last_check": self._last_es_step}

    def check_early_stopping(self, trainer: pl.Trainer) -> None:
        """After an ``EarlyStopping`` check: when one more check without improvement would stop
        the fit (its patience is one from running out), decay to the floor by that check (the
        interval is the one since the previous check)."""
        self.pending = False
        step = self.engine.step
        interval, self._last_es_step = step - self._last_es_step, step
        controller = self.engine.controller
        if (
            controller is not None
            and step >= controller.total_steps
            and (cooled := self._es_cooldown()) is not None
        ):
            if trainer.should_stop:
                return
            cap = self.plan_cap
            if cap is not None and cap - step >= 2 * max(1, interval):
                self._rewarm_after_an_improved_check(cooled, cap, interval)
            elif controller.floor == 0.0:
                self.engine.finish()  # read the plan's last losses (every rank runs this)
                self._stop_at_zero(trainer)
            return
        if trainer.should_stop:  # a stop Lightning refused: it ends the fit at a known step
            self._cool_down_for_a_refused_stop(trainer)
            return
        # two checks in a row without improvement at least: after one, a noisy metric is as
        # likely to improve at the next check, and the anneal costs that check's progress (a
        # user trial: patience=2 fits cooled down after one check, and 2 of 6 then stopped at
        # a third of their epochs, 1.8-2.0x the loss of the fits that went on)
        near = [
            index
            for index, es in enumerate(self._early_stoppers)
            if es.patience >= 3 and es.wait_count == es.patience - 1
        ]
        steps = interval - 1 if near and interval >= 2 else 0  # the floor on the last step
        if steps and not _may_stop_by_next_check(trainer, interval):
            steps = 0  # Lightning would refuse that stop: the fit goes on, and so does the plan
        which = near[0] if near else 0
        waited = self._early_stoppers[which].wait_count
        if trainer.world_size > 1:  # wait counts are per rank: rank zero decides, and says why
            steps, which, waited = trainer.strategy.broadcast((steps, which, waited))
        if not steps:
            return
        es = self._early_stoppers[which]
        self.cool_down(
            steps,
            f"{_ES_COOLDOWN}monitor={es.monitor!r}, patience={es.patience}) has seen "
            f"{plural(waited, 'check')} in a row without improvement: the next one "
            f"without improvement stops the fit, about {plural(interval, 'step')} from here",
        )

    def _cool_down_for_a_refused_stop(self, trainer: pl.Trainer) -> None:
        """``EarlyStopping`` stopped the fit before ``min_steps`` / ``min_epochs`` were met:
        Lightning runs on until they are, then ends it; decay to the floor by its last step
        (once: a plan that ends by then is left alone)."""
        controller = self.engine.controller
        left = _steps_until_a_refused_stop(trainer)
        if trainer.world_size > 1:
            left = trainer.strategy.broadcast(left)
        if controller is None or left < 2 or controller.total_steps <= self.engine.step + left:
            return
        loop = trainer.fit_loop
        unmet = (
            ("min_steps", loop.min_steps, trainer.global_step),
            ("min_epochs", loop.min_epochs, loop.epoch_progress.current.processed),  # type: ignore[attr-defined]
        )
        minimum = ", ".join(
            f"{name}={value}" for name, value, now in unmet if value and now < value
        )
        names = ", ".join(f"monitor={es.monitor!r}" for es in self._early_stoppers)
        self.cool_down(
            left - 1,
            f"{_ES_COOLDOWN}{names}) stopped the fit, and Lightning runs it on until {minimum} "
            f"{'is' if ',' not in minimum else 'are'} met, {plural(left, 'step')} from here",
        )

    def follow_the_loader(self, trainer: pl.Trainer) -> None:
        """At an epoch's first batch, with ``reload_dataloaders_every_n_epochs``: a plan that
        ``max_epochs`` ends follows the training loader's length, so a reloaded loader of
        another length moves the end (a ``replan`` event; not after a cooldown moved it)."""
        controller = self.engine.controller
        every = trainer.reload_dataloaders_every_n_epochs  # type: ignore[attr-defined]
        if controller is None or not every or self.total_steps is not None or self.timer:
            return
        epochs = trainer.max_epochs
        if epochs is None or epochs < 1 or controller.phase is Phase.DONE:
            return
        if not trainer.lightning_module.automatic_optimization:  # its own planner follows
            return
        if any(e.kind is EventKind.COOLDOWN for e in controller.events):
            return
        left = steps_of_epochs(trainer, trainer.current_epoch, epochs)
        if left is None:
            return
        step = self.engine.step
        total = self._end_after(trainer, left)
        if total > step and total != controller.total_steps:
            self.plan_cap = total  # the fit's length (an EarlyStopping rewarm plans to it)
            self.engine.replan(
                total,
                f"the training loader was reloaded with {trainer.num_training_batches} batches "
                f"an epoch (reload_dataloaders_every_n_epochs={every}): the "
                f"{plural(epochs - trainer.current_epoch, 'epoch')} left make {left} steps",
            )

    def _end_after(self, trainer: pl.Trainer, left: int) -> int:
        """The step the fit ends at with ``left`` steps to go from now, unless ``max_steps``
        ends it first."""
        step = self.engine.step
        if trainer.max_steps is not None and trainer.max_steps > 0:
            left = min(left, max(0, trainer.max_steps - trainer.global_step))
        return step + left

    def _es_cooldown(self) -> Event | None:
        """The last cooldown, the one that planned this run's end, when it was for an
        ``EarlyStopping`` check (from the events, so a resumed fit knows it too; not when one of
        ``cool_down_now`` or ``max_time`` came after it)."""
        controller = self.engine.controller
        events = controller.events if controller is not None else []
        last = next((e for e in reversed(events) if e.kind is EventKind.COOLDOWN), None)
        return last if last is not None and last.reason.startswith(_ES_COOLDOWN) else None

    def _rewarm_after_an_improved_check(self, cooled: Event, cap: int, interval: int) -> None:
        """The cooldown ``cooled`` for an ``EarlyStopping`` check ended the plan at the floor and
        that check improved (an anneal often makes it): the stop it anticipated did not come,
        and the fit has ``cap`` steps of budget. The LR ramps back over the cooldown's length to
        where the cooldown started, and the plan runs on to ``cap``; EarlyStopping decides the
        end (a user trial: stopping here turned ``patience=2`` into a stop after one noisy
        check, 4 of 6 fits ending at a third of their epochs, 1.5-2.3x the loss)."""
        ramp = max(1, self.engine.step - cooled.step - 1)
        names = ", ".join(f"EarlyStopping(monitor={es.monitor!r})" for es in self._early_stoppers)
        self.engine.rewarm(
            cap,
            cooled.scale_before,
            min(ramp, interval),
            f"the cooldown for {names} ended the plan at the floor and its check improved (the "
            "anneal did it), so it did not stop the fit: the fit goes on, EarlyStopping decides "
            "its end",
        )

    def _stop_at_zero(self, trainer: pl.Trainer) -> None:
        """The cooldown for an ``EarlyStopping`` check ended the plan at LR 0 and that check did
        not stop the fit: stop it (a ``stopped`` event) instead of running on at LR 0."""
        names = ", ".join(f"EarlyStopping(monitor={es.monitor!r})" for es in self._early_stoppers)
        why = (
            f"the cooldown for {names} has ended the plan at LR 0 and its check did not stop the "
            "fit (the anneal improved the metric): it would wait more checks while nothing "
            "trains, so the fit stops here"
        )
        self._record_stopped(max(0, self.engine.step - 1), 0.0, why)
        trainer.should_stop = True

    def cool_down(self, steps: int, why: str) -> Event | None:
        """Cool down from the current step over ``steps`` steps, unless the plan ends by then
        (then say so)."""
        event = self.engine.cool_down(steps, why)
        if event is None:
            end = self.engine.step + steps
            self.notice(f"{why}; no cooldown: the plan already ends by step {end}")
        return event

    def record_early_end(
        self, trainer: pl.Trainer, cause: str | None = None, done: int | None = None
    ) -> None:
        """A ``stopped`` event when the fit ended before its plan did, saying why (``cause``:
        what ended it, else what Lightning's callbacks tell; ``done``: the steps it ran, else
        the steps whose losses were read)."""
        controller = self.engine.controller
        if controller is None or controller.phase is Phase.DONE:
            return
        done = controller.step if done is None else done
        event = controller.ended_early(done, cause or self._stop_cause(trainer))
        if event is not None:
            self.engine.on_event(event)

    def _record_stopped(self, step: int, scale: float, why: str) -> None:
        """A ``stopped`` event at ``step`` (the LR scale is ``scale`` on both sides), recorded
        and reported."""
        controller = self.engine.controller
        assert controller is not None
        event = Event(step, EventKind.STOPPED, why, scale, scale, controller.phase)
        controller.events.append(event)
        self.engine.on_event(event)

    def _stop_cause(self, trainer: pl.Trainer) -> str:
        """What ended the fit, as far as Lightning's callbacks tell."""
        for es in self._early_stoppers:
            message = getattr(es, "stopping_reason_message", None)
            if message or (trainer.should_stop and es.wait_count >= es.patience):
                message = message or f"{plural(es.wait_count, 'check')} without improvement"
                return f"EarlyStopping(monitor={es.monitor!r}) stopped it: {message}"
        timer = self.timer or time_limit(trainer)
        if timer is not None and timer.time_remaining("train") <= 0:
            return f"max_time ({timer._duration:g} s) ran out"
        if trainer.should_stop:
            return "trainer.should_stop was set"
        return "the Trainer's max_steps / max_epochs ended it, or the data ran out"
