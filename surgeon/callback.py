"""``ScheduleSurgeon``: the Lightning adapter around :class:`surgeon.engine.StepEngine`.

The engine holds the per-step logic every front door shares (LR write, loss feed, guard,
snapshots, rollbacks); this module maps Lightning's hooks onto it. Each optimizer step:

1. ``on_train_batch_start`` writes ``peak_lr x lr_scale(step)`` into every driven param group
   (``peak_lr``: the LR the group was configured with, so layer-wise ratios hold), and takes a
   last-good snapshot when one is due. This hook, not ``on_before_optimizer_step``: the LR is
   then in place for the whole step (``training_step`` and the backward hooks see the LR that
   ``optimizer.step`` uses; under gradient accumulation the write waits for the next optimizer
   step; a manual ``opt.step()`` inside ``training_step`` is covered). ``on_train_epoch_start``
   writes it too, for callbacks that read it there; a ``LearningRateMonitor`` is moved behind
   the surgeon, and LR schedulers from ``configure_optimizers`` are dropped
   (``replace_lr_schedulers``);
2. ``on_before_backward`` hands the guard each micro-batch loss; ``on_before_optimizer_step``
   flags the step on the device when a loss or gradient is non-finite, and the optimizer then
   skips the whole update (``skip_nonfinite``, see :mod:`surgeon.guard`);
3. ``on_train_batch_end`` adds the micro-batch loss (``outputs["loss"]``, already divided by
   ``accumulate_grad_batches``, free of the AMP scale) to the loss feed; once
   ``trainer.global_step`` has moved, the step is closed and the losses whose readback is due
   go to the controller; a rollback it asks for is carried out there, on every rank alike
   (``on_train_end`` hands it the rest). Steps are Lightning's optimizer steps: one GradScaler
   skipped (recognized from the loss scale, read late with the loss) or one whose
   ``training_step`` returned ``None`` is counted without its loss, so the plan ends with the fit.

The rest is wiring, one concern per module of :mod:`surgeon._lightning`: what the Trainer
says (``trainer``), what users see (``reporting``: info lines, logger metrics, run files,
``callback_metrics``, progress bar, hyperparameters), fits that end before their plan
(``budget``: ``max_time``, ``EarlyStopping``) and ``peak_lr="find"`` (``range_test``). Only
rank zero logs and writes files; every rank makes the same decisions, as the feed averages
the losses across ranks before reading them and budget decisions are rank zero's.
"""

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from surgeon._lightning.budget import FitBudget
from surgeon._lightning.range_test import find_peak_lr
from surgeon._lightning.reporting import NEVER, Reporter
from surgeon._lightning.trainer import (
    CALLBACK_BASES,
    AveragedWeights,
    SurgeonMisconfigurationException,
    averaging_listed_before,
    driven_optimizers,
    grad_scaler,
    log_in_trainers_namespace,
    lr_metric_names,
    make_guard,
    manual_planner,
    mean_across_ranks,
    optimizer_step_counter,
    plan_source,
    set_console_log,
    steps_done,
    swa_added_epoch,
)
from surgeon._validate import check_positive_int, plain_int
from surgeon.config import (
    CONFIG_FIELDS,
    DecayName,
    PeakLR,
    PlateauAction,
    Steps,
    SurgeonConfig,
    WarmupMode,
    resolve_steps,
)
from surgeon.controller import END_UNREAD_MARK, Controller, Event, Phase, plural
from surgeon.engine import (
    PEAK_LR_KEY,
    LossRow,
    SnapshotMode,
    StepEngine,
    check_snapshot_mode,
    starting_scale,
)
from surgeon.guard import NonFiniteGuard, SkipNonfinite
from surgeon.planning import OPEN_ENDED, ManualStepPlanner
from surgeon.recorder import EVENT_CODES, EVENTS_FILE, LR_FIND_FILE, PHASE_CODES
from surgeon.schedules import WSD_DECAY_FRACTION

__all__ = [
    "EVENTS_FILE",
    "EVENT_CODES",
    "LR_FIND_FILE",
    "PEAK_LR_KEY",
    "PHASE_CODES",
    "ScheduleSurgeon",
    "SurgeonMisconfigurationException",
    "lr_metric_names",
]


def _warn(message: str) -> None:
    """The engine's warnings, once per run through Lightning's rank-zero channel (a module
    function, not a lambda: the callback pickles, as ``strategy="ddp_spawn"`` needs)."""
    rank_zero_warn(f"ScheduleSurgeon: {message}")


class ScheduleSurgeon(*CALLBACK_BASES):  # type: ignore[misc]
    """Runs the learning rate of every optimizer as an adaptive warmup/decay controller.

    With no arguments: each group's configured LR is its peak, warmup is automatic
    (a ramp paced by the loss: slow while it falls steeply, paused while it rises, finished
    once it stabilizes; between ``min_warmup`` and ``max_warmup``), then a linear decay to
    ``min_lr_ratio x peak`` (0; ``decay`` picks another shape), and plateau/spike/NaN
    interventions. Lengths (``Steps``) are an int of optimizer steps or a
    float fraction of the planned run. An LR scheduler returned by ``configure_optimizers``
    is dropped (the surgeon owns the LR), a run that will end sooner than planned
    (``max_time``, an ``EarlyStopping`` about to stop it, :meth:`cool_down_now`) cools down
    to the floor in time, and every decision is an event: a line through Lightning's
    rank-zero info channel, a record in ``events.jsonl`` in every logger's directory, and
    ``surgeon/event`` in every logger.

    Args:
        total_steps: Planned length in optimizer steps. Default: what ends the fit first,
            ``max_steps`` (divided by the number of optimizers under manual optimization,
            where Lightning counts each ``opt.step()``) or ``max_epochs``
            (``trainer.estimated_stepping_batches``); with only ``max_time``, planned from
            the step rate of the first steps.
        warmup: ``"auto"``: a linear ramp at the pace of a ``max_warmup``-step ramp, paused
            while the loss rises, finished at the pace of a ``min_warmup``-step ramp once the
            loss has stabilized after its initial descent; a length (an int of steps or a
            float fraction of the run): a fixed linear warmup that long.
        min_warmup: Shortest automatic warmup: the pace at which the ramp finishes once the
            loss has stabilized.
        max_warmup: Longest automatic warmup: the pace of the ramp while the loss still falls
            steeply; the warmup ends here at the latest.
        min_lr_ratio: The floor: decay ends at ``min_lr_ratio x`` each group's peak LR; cuts
            never go lower.
        decay: Shape from the peak to the floor (``"wsd"``, ``"linear"``, ``"cosine"``,
            ``"sqrt"``); ``"wsd"`` holds the peak (phase ``stable``), then decays linearly
            over the last ``wsd_decay_fraction`` of the steps that remain (by default half:
            the best shape measured on the outcome benchmark); the others decay from the
            peak right after warmup.
        wsd_decay_fraction: Share of the steps after warmup that the ``"wsd"`` tail spends
            decaying; also the share of a ``max_time`` run that its cooldown takes.
        stabilize_window: Window (at least 10 steps) over which the loss EMA's relative drop
            is measured.
        stabilize_threshold: Drop per window that tells a steep loss (falling faster, beyond
            twice its noise) from a settled one; a rise by more is a rise.
        stabilize_patience: Consecutive updates a state must hold (settled, steep, rising
            after warmup).
        plateau_patience: Steps without a ``plateau_min_delta`` improvement of the smoothed
            loss before acting (a cut acts only in a hold at the peak).
        plateau_min_delta: Relative improvement of the loss EMA that counts as progress.
        plateau_cooldown: Steps after a plateau response during which the plateau detector
            stays quiet.
        plateau_factor: A plateau cut multiplies the LR by this factor (never below the
            floor).
        plateau_action: ``"cut"``: multiply the LR and keep decaying; ``"restart"``: re-warm
            to ``restart_peak`` over ``restart_warmup`` steps, then decay again.
        max_restarts: Restarts allowed before a plateau falls back to a cut.
        restart_peak: LR a restart re-warms to, as a fraction of the peak.
        restart_warmup: Length of a restart's re-warm ramp.
        spike_zscore: A loss this many noise standard deviations (from first differences)
            above the running level (the median of the last 16 losses) may be a spike.
        spike_ratio: ...and it must also exceed this multiple of the running level; a loss
            that climbs this far after warmup lowers the peak.
        spike_factor: A spike or a non-finite loss multiplies the LR by this factor; a spike
            while the LR comes back from a cut lowers the peak to this factor x its LR.
        spike_cooldown: Steps (at least 1) the cut LR is held before recovery may start.
        spike_recovery: Steps (at least 1) over which the LR ramps back once the loss is in
            its normal band.
        snapshot_every: Steps (at least 10) between last-good snapshots of model and
            optimizer state.
        rollback_threshold: A spike whose loss is at least this multiple of the running mean
            restores the last good snapshot; smaller spikes only cut the LR.
        rollback_nonfinite: Non-finite steps (loss or gradients) in a row that restore the
            last good snapshot.
        skip_nonfinite: ``"auto"`` skips the update of a step with a non-finite loss or
            gradient wherever that costs no host sync (CPU, ``fused=True`` optimizers; under
            a GradScaler, GradScaler does it); ``"always"`` also on CUDA with other optimizers
            (one sync per step); ``"off"``.
        grad_check_every: 1 checks every step's gradients; n > 1 (on the CPU, a non-fused
            optimizer, one process) checks the losses every step and the gradients every n-th
            only: cheaper, but a bad gradient whose damage the loss does not show slips through
            (see :mod:`surgeon.guard`). Every step without snapshots regardless.
        snapshot: Where last-good copies of the weights and optimizer state live for
            rollbacks: ``"cpu"``, ``"device"``, or ``"off"`` (no rollback).
        readback_every: Losses are copied to the host in blocks of this many steps and acted
            on one block later (no host sync on the GPU).
        leave_scheduled_optimizers: Leave the optimizers that ``configure_optimizers`` gave an
            LR scheduler to that scheduler and drive only the others.
        replace_lr_schedulers: Drop the LR schedulers ``configure_optimizers`` returned and
            take over their optimizers (an info line names each; a ``OneCycleLR``'s or
            ``CyclicLR``'s ``max_lr`` becomes the peak, else the LR the optimizer was
            configured with). ``False``: refuse to start beside one. Automatic optimization
            only (under manual optimization ``training_step`` steps the scheduler itself).
        cooldown_on_stop: Anticipate the end of a fit that stops before its plan: with
            ``max_time``, plan from the measured step rate and cool down so the LR reaches the
            floor in time; when an ``EarlyStopping``'s patience is one check from running out,
            decay to the floor by that check.
        verbose: Print each event (and notices such as a dropped scheduler) through
            Lightning's rank-zero info channel.
        log_dir: Where ``events.jsonl``, ``settings.json``, ``losses.csv`` and
            ``checkpoints.csv`` go. Default: every logger's directory (so a plot of either
            finds them), or without a logger
            ``default_root_dir/surgeon_logs/version_N`` (a new N per fit).
        peak_lr: ``"optimizer"``: each group's configured LR is its peak; ``"find"``: an LR
            range test (Lightning's LR finder) in ``on_fit_start`` sets the peaks, keeping
            the groups' ratios, once per fresh fit (a resumed fit keeps the checkpoint's).
        find_min_lr: Lowest LR of the range test (``peak_lr="find"``).
        find_max_lr: Highest LR of the range test.
        find_steps: Optimizer steps of the range test (fewer if the loss diverges first).
    """

    def __init__(
        self,
        *,
        total_steps: int | None = None,
        warmup: WarmupMode = "auto",
        min_warmup: Steps = 0.02,
        max_warmup: Steps = 0.1,
        min_lr_ratio: float = 0.0,
        decay: DecayName = "wsd",
        wsd_decay_fraction: float = 0.5,
        stabilize_window: Steps = 0.01,
        stabilize_threshold: float = 0.02,
        stabilize_patience: int = 10,
        plateau_patience: Steps = 0.1,
        plateau_min_delta: float = 1e-3,
        plateau_cooldown: Steps = 0.1,
        plateau_factor: float = 0.5,
        plateau_action: PlateauAction = "cut",
        max_restarts: int = 2,
        restart_peak: float = 0.5,
        restart_warmup: Steps = 0.01,
        spike_zscore: float = 6.0,
        spike_ratio: float = 1.5,
        spike_factor: float = 0.5,
        spike_cooldown: Steps = 0.01,
        spike_recovery: Steps = 0.02,
        snapshot_every: Steps = 0.01,
        rollback_threshold: float = 4.0,
        rollback_nonfinite: int = 3,
        skip_nonfinite: SkipNonfinite = "auto",
        grad_check_every: int = 1,
        snapshot: SnapshotMode = "cpu",
        readback_every: int = 4,
        leave_scheduled_optimizers: bool = False,
        replace_lr_schedulers: bool = True,
        cooldown_on_stop: bool = True,
        verbose: bool = True,
        log_dir: str | Path | None = None,
        peak_lr: PeakLR = "optimizer",
        find_min_lr: float = 1e-7,
        find_max_lr: float = 1.0,
        find_steps: int = 100,
    ) -> None:
        super().__init__()
        if total_steps is not None:
            total_steps = plain_int(total_steps)
            check_positive_int("total_steps", total_steps)
        grad_check_every, readback_every = plain_int(grad_check_every), plain_int(readback_every)
        given = locals()  # the controller's settings, as passed (SurgeonConfig validates them)
        self.config = SurgeonConfig(**{name: given[name] for name in CONFIG_FIELDS})
        check_snapshot_mode(snapshot)
        if total_steps is not None:
            Controller(total_steps, self.config)  # warmup lengths against the run: fail now
        for name, flag in (
            ("leave_scheduled_optimizers", leave_scheduled_optimizers),
            ("replace_lr_schedulers", replace_lr_schedulers),
            ("cooldown_on_stop", cooldown_on_stop),
            ("verbose", verbose),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {name}={flag!r}")
        if log_dir is not None and not isinstance(log_dir, str | Path):
            raise ValueError(f"log_dir must be a path or None, got log_dir={log_dir!r}")
        NonFiniteGuard(skip_nonfinite, grad_check_every=grad_check_every)  # validates; see start
        self.total_steps = total_steps
        self.leave_scheduled_optimizers = leave_scheduled_optimizers
        self.replace_lr_schedulers = replace_lr_schedulers
        self.cooldown_on_stop = cooldown_on_stop
        self.verbose = verbose
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.skip_nonfinite = skip_nonfinite
        self.grad_check_every = grad_check_every
        self.engine = StepEngine(
            self.config,
            snapshot=snapshot,
            readback_every=readback_every,
            on_event=self._on_event,
            on_losses=self._on_losses,
            on_warning=_warn,
        )
        self._view = Reporter(self.engine, self.config, verbose=verbose, log_dir=self.log_dir)
        self._budget = FitBudget(
            self.engine,
            self.config,
            total_steps=total_steps,
            cooldown_on_stop=cooldown_on_stop,
            notice=self._view.notice,
        )
        # fixed for a fit, read once (on_fit_start / on_train_start) rather than per step through
        # Lightning's chains of properties
        self._step_counter: Any = None  # see optimizer_step_counter
        self._training = False  # between on_train_start and the fit's end (or its exception)
        self._console_log_before: Any = None  # Lightning's console log before this fit
        self._checkpoint_every: list[int] = []
        self._last_fit_raised = False  # the last fit ended by an exception other than Ctrl-C
        self._continued = False  # this fit is fit() again on the Trainer of the last one
        self._epoch_loop: Any = None  # its `_batches_that_stepped` is Lightning's logging step
        self._scaler: Any = None
        self._manual = False
        self._manual_planner: ManualStepPlanner | None = None
        self._last_global_step = 0
        self._warned_unread_step = False
        self._next_check = NEVER  # the first step at which a budget check or `done` is due
        self._pending_state: dict[str, Any] | None = None
        self._resuming = False
        self._state_loaded = False  # this fit restored the surgeon's state from a checkpoint
        self._lr_find_curve: list[tuple[float, float]] | None = None
        self._warned_no_loss = False

    # ------------------------------------------------------------------ public surface
    @property
    def phase(self) -> Phase:
        """The controller's current phase (``Phase.WARMUP`` before the fit starts)."""
        return self.engine.phase

    @property
    def events(self) -> list[Event]:
        """Every decision so far, oldest first."""
        return self.engine.events

    @property
    def controller(self) -> Controller | None:
        """The decisions' phase machine (``None`` before the first fit starts)."""
        return self.engine.controller

    @property
    def step(self) -> int:
        """Optimizer steps so far, as Lightning counts them (steps without an update included)."""
        return self.engine.step

    @property
    def skipped_steps(self) -> int:
        """Steps counted without an update: GradScaler skipped them for a scale overflow, or
        their ``training_step`` returned ``None`` (automatic optimization)."""
        return self.engine.skipped_steps

    @property
    def guard(self) -> NonFiniteGuard:
        """This fit's non-finite guard."""
        return self.engine.guard

    @property
    def log_dirs(self) -> list[Path]:
        """The directories this fit's run files went to (rank zero; empty elsewhere)."""
        return list(self._view.log_dirs)

    @property
    def state_key(self) -> str:
        return "ScheduleSurgeon"

    @property
    def _lr_names(self) -> list[list[str]]:
        """The LR metric names per driven optimizer and group (``LearningRateMonitor``'s)."""
        return self._view.lr_names

    def cool_down_now(self, steps: Steps | None = None) -> Event | None:
        """Bring the end of the run forward: from the current step, decay from the current LR to
        the floor over ``steps`` (an int, or a fraction of the planned run; default 20% of it,
        WSD's usual tail), and end the plan there. Under DDP call it on every rank.
        Returns the ``cooldown`` event, or ``None`` when the plan already ends by then."""
        controller = self.controller
        if controller is None:
            raise RuntimeError(
                "ScheduleSurgeon.cool_down_now() acts on a running fit: call it during "
                "Trainer.fit (from a hook, a callback or training_step)"
            )
        steps = plain_int(steps)  # a numpy integer is an int
        length = WSD_DECAY_FRACTION if steps is None else steps
        n = resolve_steps("steps", length, controller.total_steps, 1)
        return self._budget.cool_down(n, f"cool_down_now(steps={steps!r}) was called")

    # ------------------------------------------------------------------ fit lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        view, engine = self._view, self.engine
        self._console_log_before = log_in_trainers_namespace(trainer)
        self._continued = self._continues_its_last_fit(trainer, pl_module)
        if self._continued:
            # fit() again on the same Trainer after a fit that ended (or was interrupted): it goes
            # on from this callback's state, as from a checkpoint saved where that fit ended
            self._pending_state = self.state_dict()
        self._training = self._last_fit_raised = False
        view.begin_fit(trainer)
        # a resumed fit takes its peaks from the checkpoint's param groups: no second range test
        self._resuming = trainer.ckpt_path is not None or self._pending_state is not None
        total = self._budget.plan(trainer, self._pending_state)
        driven = driven_optimizers(
            trainer,
            leave=self.leave_scheduled_optimizers,
            replace=self.replace_lr_schedulers,
            notice=view.notice,
        )
        self._manual = not pl_module.automatic_optimization
        self._scaler = grad_scaler(trainer)
        # without snapshots no rollback repairs a step whose gradients went unchecked
        every = self.grad_check_every if engine.snapshot != "off" else 1
        try:
            engine.start(
                total,
                trainer.optimizers,
                module=pl_module,
                driven=driven,
                guard=make_guard(trainer, self.skip_nonfinite, self._scaler is not None, every),
                reduce=mean_across_ranks(trainer),
                # Lightning divides the loss by it under automatic optimization only
                accumulate=1 if self._manual else trainer.accumulate_grad_batches,
                device=trainer.strategy.root_device,
                loss_scale=starting_scale(self._scaler),
                manual=self._manual,
                scaler=self._scaler,
            )
        except ValueError as err:
            if "total_steps" not in str(err):  # not about lengths (an LR refused)
                raise SurgeonMisconfigurationException(str(err)) from err
            # a warmup longer than the run: say where the length came from
            source = plan_source(trainer, self.total_steps, self._budget.plan_cap)
            raise SurgeonMisconfigurationException(
                f"{err}; the planned length of {total} steps is {source}"
            ) from err
        engine.more_state = AveragedWeights(trainer)
        averaging = averaging_listed_before(trainer, self)
        if averaging and engine.snapshot != "off":
            _warn(
                f"{', '.join(averaging)} is listed before ScheduleSurgeon: at a checkpoint and at "
                "the fit's end it puts its average in place before the surgeon reads the losses "
                "in flight, and a rollback then puts the raw weights back over it; list "
                "ScheduleSurgeon first (its rollbacks restore the average too)"
            )
        self._state_loaded = False
        self._manual_planner = manual_planner(engine, trainer, self.total_steps)
        self._lr_find_curve = None
        if self.config.peak_lr == "find" and not self._resuming:
            self._lr_find_curve = find_peak_lr(engine, trainer, pl_module)
            # the finder restored the callbacks' state from a checkpoint it took first: our own
            # (fresh) state among them, which is not a resume
            self._pending_state, self._state_loaded = None, False
            engine.forget_written_lr()  # the test wrote its own LRs and set new peaks
        view.watch_lrs(trainer, self)
        if self._pending_state is not None:
            engine.load_state_dict(self._pending_state)
            self._pending_state = None
            self._state_loaded = True
        view.log_hyperparams(trainer)

    def _continues_its_last_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether this fit is ``fit()`` called again on the Trainer of this callback's last fit,
        whose state then goes on: no checkpoint given (nor one a strategy restores after setup),
        the steps done are the ones this callback closed, and that fit did not raise (a fault
        can leave a step half closed and its losses unread: such a fit starts as from a
        checkpoint without surgeon state)."""
        if self._pending_state is not None or self.controller is None or self._last_fit_raised:
            return False
        if trainer.ckpt_path is not None or trainer.global_step == 0:
            return False
        if getattr(trainer.strategy, "restore_checkpoint_after_setup", False):
            return False  # its ckpt_path is read after on_fit_start: not known to be none yet
        return self.engine.step == steps_done(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # a state that validate/test/predict(ckpt_path=...) loaded is not for a later fit
        self._pending_state = None
        if stage == "fit" and self._console_log_before is not None:  # where the fit found it
            set_console_log(self._console_log_before)
            self._console_log_before = None
        self.engine.release()  # snapshot memory
        self._view.end_fit()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_global_step = trainer.global_step
        self._step_counter = optimizer_step_counter(trainer)
        self._training = True
        # ModelCheckpoint(every_n_train_steps=n) saves every n-th step, after the surgeon's
        # on_train_batch_end: surgeon/* in callback_metrics are refreshed there for its name
        # and monitor (else at logging steps, validations and events)
        self._checkpoint_every = sorted(
            {
                every
                for saver in trainer.checkpoint_callbacks
                if (every := getattr(saver, "_every_n_train_steps", 0) or 0) > 0
            }
            if pl_module.automatic_optimization  # manual: global_step counts every optimizer
            else set()
        )
        if trainer.global_step > 0 and not self._state_loaded and self.controller is not None:
            # resumed from a checkpoint saved without the surgeon: the steps done count
            self.engine.start_at(steps_done(trainer))
        self._epoch_loop = trainer.fit_loop.epoch_loop
        # a fresh fit without a length of its own is planned from its step rate under max_time
        self._budget.begin_training(trainer, not self._resuming and self.total_steps is None)
        view = self._view
        view.begin_training(trainer, self._lr_find_curve, self._resuming)
        self.engine.on_loss = view.loss if view.watches_losses else None
        self._schedule_checks()
        controller = self.controller
        if self._state_loaded and controller is not None:  # say it: a silent resume looks lost
            how = "the last fit's state" if self._continued else "the checkpoint's state"
            ends = (
                f"the plan ends at step {controller.total_steps}"
                if controller.total_steps < OPEN_ENDED
                else "the plan is open-ended (only max_time bounds this fit: it cools down to "
                "the floor as its time runs out)"
            )
            view.notice(
                f"resumed at step {self.engine.step} with {how}: phase "
                f"{controller.phase.value}, LR scale {controller.lr_scale(self.engine.step):.3g}, "
                f"{plural(len(controller.events), 'event')} so far, {ends}"
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the losses still in flight: a spike or NaN at the very end is decided on and
        recorded like any other (a rollback included: the fit then ends with the last good
        weights); a fit that ends before its plan says so (a ``stopped`` event)."""
        self._training = False
        self.engine.finish()
        self._budget.record_early_end(trainer)
        self._view.publish(trainer)
        self._view.flush()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """The fit raised: a ``stopped`` event names the exception, and what was decided before
        it stays on disk. An interrupt (Ctrl-C, Lightning's graceful shutdown) in one process
        first reads the losses in flight and decides on them, as the end of a fit does (a
        spike among them rolled back leaves the last good weights); after any other exception,
        or under DDP (the other ranks may not take part in a read), they are left unread."""
        controller, engine = self.controller, self.engine
        training, self._training = self._training, False
        interrupt = isinstance(exception, KeyboardInterrupt)
        read_all = interrupt and trainer.world_size == 1
        self._last_fit_raised = training and not read_all
        try:
            if controller is not None and training:
                if read_all:
                    engine.finish()
                name = type(exception).__name__
                cause = f"interrupted ({name})" if interrupt else f"it raised {name}: {exception}"
                unread = engine.step - controller.step
                if not read_all:
                    cause += f"; {END_UNREAD_MARK}"
                    if unread > 0:
                        cause += f" (the losses of its last {plural(unread, 'step')})"
                self._budget.record_early_end(trainer, cause, done=engine.step)
        except Exception as err:  # never in the way of the fit's own exception
            self._last_fit_raised = True
            rank_zero_warn(
                f"ScheduleSurgeon: could not record how the fit ended ({type(err).__name__}: {err})"
            )
        finally:
            self._view.close()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._view.publish(trainer)  # fresh values for the checkpoint and early-stopping checks

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._budget.after_validation(trainer, self)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The coming step's LR, for callbacks that read it here (``LearningRateMonitor`` logs
        at each epoch start); written again in ``on_train_batch_start``, after any callback that
        changes it at the epoch start (the surgeon owns the LR)."""
        if swa_added_epoch(trainer) and trainer.current_epoch + 1 == trainer.max_epochs:
            # StochasticWeightAveraging's statistics epoch (no step) starts: the fit's training
            # ends here, and SWA puts its average in the model now (after this hook, listed
            # after the surgeon): decide on the last losses first, so a rollback restores the
            # average it then puts in place (else raw weights over it, a review)
            self.engine.finish()
        progress = trainer.fit_loop.epoch_loop.batch_progress  # (restored, not reset yet)
        done = 0 if progress.is_last_batch else progress.current.ready  # of a resumed epoch
        self._budget.count_the_epochs_left(trainer, done)  # a resumed fit: before its check
        if self._budget.pending:  # the last epoch's check (EarlyStopping's ran by now): a stop
            self._budget.check_early_stopping(trainer)  # here runs no batch of this epoch
        self.engine.begin_step()
        self.engine.written_step = -1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._budget.pending:  # a check at this epoch's validation (done by now): act before
            self._budget.check_early_stopping(trainer)  # the next epoch (a stop: none runs)
        self._budget.after_train_epoch()
        self._view.publish(trainer)

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._budget.count_the_epochs_left(trainer, batch_idx)  # a resumed fit's first batch
        if self._budget.pending:  # before this step's LR is written: a cooldown starts here
            self._budget.check_early_stopping(trainer)
        engine = self.engine
        if not self._manual:  # a GradientAccumulationScheduler changes it at epoch starts
            engine.feed.accumulate = trainer.accumulate_grad_batches
        if batch_idx == 0 and trainer.reload_dataloaders_every_n_epochs:  # type: ignore[attr-defined]
            self._budget.follow_the_loader(trainer)  # before this step's LR is written
        engine.begin_step()
        step = self._epoch_loop._batches_that_stepped  # Lightning's logging step
        view = self._view
        if view.step_offset is None:  # the first batch of the fit (loops are restored by now)
            view.step_offset = step - engine.step
        if step >= view.next_log:  # Lightning's cadence: the LRs share a step with its metrics
            view.log_lrs(step)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        self.engine.watch_loss(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self.engine.before_optimizer_step(optimizer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        engine = self.engine
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            engine.add_loss(loss)
        elif not self._warned_no_loss:
            self._warned_no_loss = True
            self._view.warn_no_loss(self._manual)
        counter = self._step_counter  # trainer.global_step, without its chain of properties
        global_step = counter.completed if counter is not None else trainer.global_step
        if global_step == self._last_global_step:
            return  # accumulating: the optimizer step has not happened yet
        self._last_global_step = global_step
        scaler = self._scaler  # GradScaler makes its scale tensor at its first step
        engine.end_step(None if scaler is None else getattr(scaler, "_scale", None))
        if self._manual_planner is not None:
            self._manual_planner.follow(global_step)
        if engine.step >= self._next_check:
            self._on_check()
        for every in self._checkpoint_every:  # ModelCheckpoint saves after this hook, on its
            if global_step % every == 0:  # own count of steps: surgeon/* as of now for its name
                self._view.publish(trainer)
                break

    def _on_check(self) -> None:
        """A ``max_time`` check is due, or the planned steps have run (the progress bar and
        ``callback_metrics`` say ``done`` at once)."""
        step = self.engine.step
        if step >= self._budget.next_check:
            self._budget.check_time()
            self._view.follow_plan()  # a cooldown's end may have moved without an event
        if step >= self._view.next_done:
            self._view.done()
        self._schedule_checks()

    def _schedule_checks(self) -> None:
        self._next_check = min(self._budget.next_check, self._view.next_done)

    def _on_event(self, event: Event) -> None:
        """A decision: where users look (see :class:`~surgeon._lightning.reporting.Reporter`);
        the plan may have moved, and with it the step at which ``done`` is shown."""
        self._view.report(event)
        self._schedule_checks()

    def _on_losses(self, rows: list[LossRow]) -> None:
        """Losses the controller consumed: into ``losses.csv``; a ``max_time`` plan being
        measured keeps them to feed its controller."""
        self._view.losses(rows)
        if self._budget.time is not None:
            self._budget.time.record(rows)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The engine's state; first it reads and decides on the losses in flight, so a spike or
        NaN among them is rolled back before the checkpoint's weights are written."""
        if self.controller is None:
            return self._pending_state or {}
        self._check_step_closed()
        state = self.engine.state_dict()
        self._view.flush()  # the loss rows up to this checkpoint are on disk
        self._view.checkpoint(self.controller.step)  # where replay reads them all too
        if self._budget.time_estimate is not None:  # the run a max_time plan's lengths are of
            state["time_estimate"] = self._budget.time_estimate
        state["early_stopping"] = self._budget.early_stopping_state()
        return state

    def _check_step_closed(self) -> None:
        """A checkpoint saved after an optimizer step whose loss the surgeon has not been handed
        yet (by a callback listed before it, in ``on_train_batch_end``, or from inside
        ``training_step``): that update is in the saved weights unread. Said once."""
        counter = self._step_counter
        if counter is None or counter.completed == self._last_global_step:
            return
        if not self._warned_unread_step:
            self._warned_unread_step = True
            rank_zero_warn(
                "ScheduleSurgeon: a checkpoint was saved after optimizer step "
                f"{counter.completed - 1} and before the surgeon's on_train_batch_end was handed "
                "its loss (a callback listed before "
                "ScheduleSurgeon saved it, or training_step did): that step's update is in the "
                "checkpoint unread, so a spike in it cannot be rolled back out of it (and the run "
                "replays close, not exactly). List the callback that saves after ScheduleSurgeon "
                "(ModelCheckpoint always runs last)"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        # kept for on_fit_start, which starts the engine afresh: a callback reused for a resumed
        # fit would otherwise restore into the previous fit's controller and lose the state
        self._pending_state = state_dict
        if self.controller is not None:
            self.engine.load_state_dict(state_dict)
            self._state_loaded = True

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning took the weights before the callbacks' state: a rollback or buffer repair
        # made while reading the last losses (in place, so the tensors usually are the same)
        # goes into the checkpoint for sure
        if self.controller is not None and self.engine.changed_at_checkpoint:
            checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()
