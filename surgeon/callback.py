"""``ScheduleSurgeon``: the Lightning adapter around :class:`surgeon.engine.StepEngine`.

The engine holds the per-step logic every front door shares (feed, controller, guard,
snapshots); this module maps Lightning's hooks onto it, plans the run from the Trainer, and
sends events and metrics to Lightning's loggers. What happens each optimizer step:

1. ``on_train_batch_start`` writes ``peak_lr x lr_scale(step)`` into every param
   group of every optimizer, where ``peak_lr`` is the LR that group was configured
   with (so layer-wise ratios hold). This hook, not ``on_before_optimizer_step``,
   because the LR must be in place for the *whole* step: ``training_step`` and the
   backward hooks then see the LR that ``optimizer.step`` will use, with gradient
   accumulation it runs once per micro-batch and the write is skipped until the
   next optimizer step, and it also covers manual optimization where the user
   calls ``opt.step()`` inside ``training_step``. (In Lightning 2.6 a configured
   step-interval scheduler overwrites ``group["lr"]`` right after the step; the
   surgeon refuses to run beside one, see ``leave_scheduled_optimizers``.)
2. ``on_train_batch_end`` adds the micro-batch loss (``outputs["loss"]``, already
   divided by ``accumulate_grad_batches`` and free of the AMP scale) to the
   :class:`~surgeon.loss_feed.LossFeed`; when ``trainer.global_step`` has moved the
   optimizer step is closed, and losses whose readback is due go to the controller
   (``on_train_end`` hands it the rest, so the last steps are decided on too).

Steps are optimizer steps: a step GradScaler skipped is recognized from the loss
scale (read late, with the loss) and not counted.

Nothing lost (see :mod:`surgeon.guard` and :mod:`surgeon.snapshot`):

3. ``on_before_backward`` keeps each micro-batch loss and ``on_before_optimizer_step``
   flags the step on the device when a loss or gradient is non-finite; the optimizer
   then skips the whole update (``skip_nonfinite``). The flag travels with the loss
   and the controller records a ``skipped_step`` event when it is read.
4. At the start of every ``snapshot_every``-th step while the loss is normal, the
   weights and optimizer state are copied (``snapshot="cpu"`` or ``"device"``); on a
   severe spike or a run of non-finite steps the controller asks for the last good copy
   and ``on_train_batch_end`` restores it (a ``rollback`` event), on every rank alike.
Only rank zero logs metrics and writes ``events.jsonl`` (each rank logs its event lines on
the ``surgeon`` logger); every rank makes the same
decisions because the feed averages the losses across ranks before reading them.
"""

import csv
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from surgeon._validate import check_positive_int
from surgeon.config import DecayName, PeakLR, PlateauAction, Steps, SurgeonConfig, WarmupMode
from surgeon.controller import Controller, Event, EventKind, Phase
from surgeon.engine import (
    PEAK_LR_KEY,
    SnapshotMode,
    StepEngine,
    check_lr,
    check_snapshot_mode,
    distributed_max,
    distributed_mean,
    starting_scale,
)
from surgeon.guard import NonFiniteGuard, SkipNonfinite
from surgeon.loss_feed import Reduce
from surgeon.lr_find import MIN_DROP, MIN_POINTS, suggest_lr
from surgeon.recorder import (
    EVENTS_FILE,
    LR_FIND_FILE,
    PHASE_CODES,
    RunRecorder,
    event_record,
)

log = logging.getLogger("surgeon")

try:  # one class that both Trainers accept: `lightning.pytorch` and `pytorch_lightning`
    import lightning.pytorch as _lightning_pytorch

    _CALLBACK_BASES: tuple[type, ...] = (pl.Callback, _lightning_pytorch.Callback)
except ImportError:  # pragma: no cover - `lightning` is optional
    _CALLBACK_BASES = (pl.Callback,)

__all__ = ["EVENTS_FILE", "LR_FIND_FILE", "PEAK_LR_KEY", "PHASE_CODES", "ScheduleSurgeon"]

FAR_FROM_CONFIGURED = 30.0
"""A range-test suggestion this many times above or below the configured LR is warned about."""
_MANUAL_SAMPLE = 10
"""Steps before the steps per batch of a manual optimization are trusted to project its length."""
_MANUAL_TOLERANCE = 0.05
"""A projected length off the plan by more than this share of it is re-planned."""


def lr_metric_names(optimizers: list[Optimizer]) -> list[list[str]]:
    """Metric names per optimizer and group, as ``LearningRateMonitor`` names them."""
    seen: defaultdict[type, int] = defaultdict(int)
    names = []
    for optimizer in optimizers:
        seen[type(optimizer)] += 1
        name = f"lr-{type(optimizer).__name__}"
        if seen[type(optimizer)] > 1:
            name += f"-{seen[type(optimizer)] - 1}"
        groups = optimizer.param_groups
        if len(groups) == 1:
            names.append([name])
        else:
            names.append([f"{name}/{g.get('name', f'pg{i + 1}')}" for i, g in enumerate(groups)])
    return names


def _lr_find(trainer: pl.Trainer) -> Any:
    """Lightning's ``_lr_find`` from the Trainer's own namespace (looked up at call time)."""
    if type(trainer).__module__.startswith("lightning.pytorch"):
        from lightning.pytorch.tuner import lr_finder
    else:
        from pytorch_lightning.tuner import lr_finder
    return lr_finder._lr_find


@contextmanager
def _range_test_losses(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[list[float]]:
    """The loss of each step of Lightning's range test, as its ``_LRCallback`` reads it
    (``outputs["loss"]`` at the last micro-batch of a step; NaN for a step without one), one per
    entry of ``finder.results["lr"]``. The finder replaces the Trainer's callbacks while it runs,
    so the module's own ``on_train_batch_end`` is wrapped for the duration instead."""
    losses: list[float] = []
    own = vars(pl_module).get("on_train_batch_end")
    hook = pl_module.on_train_batch_end

    def record(outputs: Any, batch: Any, batch_idx: int) -> Any:
        if (trainer.fit_loop.batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            losses.append(float(loss) if isinstance(loss, Tensor) else math.nan)
        return hook(outputs, batch, batch_idx)

    pl_module.on_train_batch_end = record
    try:
        yield losses
    finally:
        if own is None:
            del pl_module.on_train_batch_end  # the class's hook again
        else:
            pl_module.on_train_batch_end = own


def _mean_across_ranks(trainer: pl.Trainer) -> Reduce | None:
    """The feed's ``reduce``: the mean over ranks in one all-reduce (``None`` on one process);
    through the strategy where it runs without ``torch.distributed``."""
    if trainer.world_size <= 1:
        return None
    if not (dist.is_available() and dist.is_initialized()):  # a strategy of its own kind
        return lambda block: trainer.strategy.reduce(block, reduce_op="mean")
    return distributed_mean()


def _make_guard(
    trainer: pl.Trainer, mode: SkipNonfinite, scaled: bool, grad_check_every: int
) -> NonFiniteGuard:
    """The guard for this fit: off under a GradScaler (which skips non-finite steps itself);
    under DDP on the already-averaged gradients alone; elsewhere with a max across ranks."""
    if scaled or mode == "off":
        return NonFiniteGuard("off")
    if trainer.world_size <= 1:
        return NonFiniteGuard(mode, grad_check_every=grad_check_every)
    if any(cls.__name__ == "DDPStrategy" for cls in type(trainer.strategy).__mro__):
        return NonFiniteGuard(mode, check_losses=False)  # no collective needed (see guard)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"ScheduleSurgeon(skip_nonfinite={mode!r}) under {type(trainer.strategy).__name__} "
            "needs torch.distributed to agree on skipped steps; pass skip_nonfinite='off'"
        )
    return NonFiniteGuard(mode, distributed_max())


def _optimizer_step_counter(trainer: pl.Trainer) -> Any:
    """Lightning's counter whose ``completed`` is ``trainer.global_step``, or ``None``.

    The property walks a chain of seven (fit loop, Lightning module, optimization loop, ...), a
    few µs a read, to a counter that is the same object for the whole fit: which loop counts is
    fixed by ``automatic_optimization``, and Lightning updates the counter in place, also when it
    restores a checkpoint (before ``on_train_start``, where this is called). ``None`` where the
    loops are laid out otherwise (another Lightning version): read the property then.
    """
    loop = trainer.fit_loop.epoch_loop
    try:
        if trainer.lightning_module.automatic_optimization:
            counter = loop.automatic_optimization.optim_progress.optimizer.step.total
        else:
            counter = loop.manual_optimization.optim_step_progress.total
        return counter if counter.completed == trainer.global_step else None
    except AttributeError:
        return None


def _grad_scaler(trainer: pl.Trainer) -> Any:
    """The precision plugin's enabled GradScaler, or ``None`` (its ``_scale`` tensor appears
    only at its first step, so look for the scaler, not the scale)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    is_enabled = getattr(scaler, "is_enabled", None)
    return scaler if callable(is_enabled) and is_enabled() else None


class ScheduleSurgeon(*_CALLBACK_BASES):  # type: ignore[misc]
    """Runs the learning rate of every optimizer as an adaptive warmup/decay controller.

    With no arguments: each group's configured LR is its peak, warmup is automatic
    (a ramp paced by the loss: slow while it falls steeply, paused while it rises, finished
    once it stabilizes; between ``min_warmup`` and ``max_warmup``), then a linear decay to
    ``min_lr_ratio x peak`` (0; ``decay`` picks another shape), and plateau/spike/NaN
    interventions. See :class:`surgeon.config.SurgeonConfig` for every
    knob; ``total_steps`` defaults to what ends the fit first: ``max_steps`` (divided by
    the number of optimizers under manual optimization, where Lightning counts each
    ``opt.step()``) or ``max_epochs`` (``trainer.estimated_stepping_batches``). With
    ``peak_lr="find"`` Lightning's LR range test sets the peaks in ``on_fit_start`` (the
    first group's peak is the suggestion, the others keep their ratios to it), once per
    fresh fit; a resumed fit keeps the checkpoint's.

    ``skip_nonfinite``: ``"auto"`` skips the update of a step with a non-finite loss or
    gradient wherever that costs no host sync (CPU, ``fused=True`` optimizers; under a
    GradScaler, GradScaler does it); ``"always"`` also on CUDA with other optimizers (one
    sync per step); ``"off"``. ``grad_check_every``: 1 (default) checks every step's gradients;
    n > 1, on the CPU, checks the losses every step and the gradients every n-th only, cheaper
    but weaker (see :mod:`surgeon.guard`; every step without snapshots).
    ``snapshot``: where last-good copies of the weights and
    optimizer state live for rollbacks (``"cpu"``, ``"device"``, ``"off"``: no rollback).
    """

    def __init__(
        self,
        *,
        total_steps: int | None = None,
        warmup: WarmupMode = "auto",
        min_warmup: Steps = 0.02,
        max_warmup: Steps = 0.1,
        min_lr_ratio: float = 0.0,
        decay: DecayName = "linear",
        wsd_decay_fraction: float = 0.2,
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
        peak_lr: PeakLR = "optimizer",
        find_min_lr: float = 1e-7,
        find_max_lr: float = 1.0,
        find_steps: int = 100,
    ) -> None:
        super().__init__()
        if total_steps is not None:
            check_positive_int("total_steps", total_steps)
        self.config = SurgeonConfig(
            warmup=warmup,
            min_warmup=min_warmup,
            max_warmup=max_warmup,
            min_lr_ratio=min_lr_ratio,
            decay=decay,
            wsd_decay_fraction=wsd_decay_fraction,
            stabilize_window=stabilize_window,
            stabilize_threshold=stabilize_threshold,
            stabilize_patience=stabilize_patience,
            plateau_patience=plateau_patience,
            plateau_min_delta=plateau_min_delta,
            plateau_cooldown=plateau_cooldown,
            plateau_factor=plateau_factor,
            plateau_action=plateau_action,
            max_restarts=max_restarts,
            restart_peak=restart_peak,
            restart_warmup=restart_warmup,
            spike_zscore=spike_zscore,
            spike_ratio=spike_ratio,
            spike_factor=spike_factor,
            spike_cooldown=spike_cooldown,
            spike_recovery=spike_recovery,
            snapshot_every=snapshot_every,
            rollback_threshold=rollback_threshold,
            rollback_nonfinite=rollback_nonfinite,
            peak_lr=peak_lr,
            find_min_lr=find_min_lr,
            find_max_lr=find_max_lr,
            find_steps=find_steps,
        )
        check_snapshot_mode(snapshot)
        if total_steps is not None:
            Controller(total_steps, self.config)  # warmup lengths against the run: fail now
        if not isinstance(leave_scheduled_optimizers, bool):
            raise ValueError(
                "leave_scheduled_optimizers must be True or False, got "
                f"leave_scheduled_optimizers={leave_scheduled_optimizers!r}"
            )
        self.total_steps = total_steps
        self.leave_scheduled_optimizers = leave_scheduled_optimizers
        self.skip_nonfinite = skip_nonfinite
        NonFiniteGuard(skip_nonfinite, grad_check_every=grad_check_every)  # validates; see start
        self.grad_check_every = grad_check_every
        self.engine = StepEngine(
            self.config,
            snapshot=snapshot,
            readback_every=readback_every,
            on_event=self._report,
            on_loss=self._on_loss,
        )
        self._last_global_step = 0
        # fixed for a fit, read once (on_fit_start / on_train_start) rather than per step through
        # Lightning's chains of properties
        self._step_counter: Any = None  # see _optimizer_step_counter
        self._scaler: Any = None
        self._log_every = 1
        self._is_global_zero = True
        self._manual = False
        self._lr_names: list[list[str]] = []
        self._recorder: RunRecorder | None = None
        self._log_dir: Path | None = None
        self._loggers: list[Any] = []
        self._pending_state: dict[str, Any] | None = None
        self._state_loaded = False  # this fit restored the surgeon's state from a checkpoint
        self._max_steps: int | None = None  # manual optimization ended by max_steps: see below
        self._batch_limit = math.inf
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
        """Optimizer steps applied so far (GradScaler-skipped steps excluded once known)."""
        return self.engine.step

    @property
    def skipped_steps(self) -> int:
        """Steps GradScaler skipped for a scale overflow (not counted)."""
        return self.engine.skipped_steps

    @property
    def guard(self) -> NonFiniteGuard:
        """This fit's non-finite guard."""
        return self.engine.guard

    @property
    def state_key(self) -> str:
        return "ScheduleSurgeon"

    # ------------------------------------------------------------------ fit lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._recorder = None  # opened in on_train_start, once a checkpoint is restored
        total = self._planned_steps(trainer)
        scheduled = self._scheduled_optimizers(trainer)
        driven = [opt for opt in trainer.optimizers if id(opt) not in scheduled]
        if not driven:
            raise ValueError("ScheduleSurgeon has no optimizer to drive: all have LR schedulers")
        self._manual = not pl_module.automatic_optimization
        self._scaler = _grad_scaler(trainer)
        self.engine.start(
            total,
            trainer.optimizers,
            module=pl_module,
            driven=driven,
            guard=_make_guard(
                trainer,
                self.skip_nonfinite,
                self._scaler is not None,
                # without snapshots no rollback repairs a step whose gradients went unchecked
                self.grad_check_every if self.engine.snapshot != "off" else 1,
            ),
            reduce=_mean_across_ranks(trainer),
            # Lightning divides the loss by it under automatic optimization only
            accumulate=1 if self._manual else trainer.accumulate_grad_batches,
            device=trainer.strategy.root_device,
            loss_scale=starting_scale(self._scaler),
            manual=self._manual,
            scaler=self._scaler,
        )
        self._state_loaded = False
        self._max_steps, self._batch_limit = self._manual_limits(trainer)
        # a resumed fit takes its peaks from the checkpoint's param groups: no second range test
        resuming = trainer.ckpt_path is not None or self._pending_state is not None
        curve = None
        if self.config.peak_lr == "find" and not resuming:
            curve = self._find_peak_lr(trainer, pl_module)
        self._lr_names = lr_metric_names(driven)
        self._log_every = max(1, trainer.log_every_n_steps)
        self._is_global_zero = trainer.is_global_zero
        self._loggers = list(trainer.loggers)
        if self._pending_state is not None:
            self.engine.load_state_dict(self._pending_state)
            self._pending_state = None
            self._state_loaded = True
        # on every rank: `trainer.log_dir` broadcasts from rank 0 (a collective)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self._log_dir = log_dir if trainer.is_global_zero else None
        if self._log_dir is not None and not resuming:  # a reused directory keeps no old curve
            log_dir.mkdir(parents=True, exist_ok=True)
            self._write_lr_find(log_dir / LR_FIND_FILE, curve)
        self._show_phase_in_progress_bar(trainer)

    def _find_peak_lr(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> list[tuple[float, float]] | None:
        """Run Lightning's LR range test and :func:`surgeon.lr_find.suggest_lr` on its losses;
        set each group's peak to ``suggestion x`` its ratio to the first group; record a
        ``peak_lr`` event. Returns the ``(lr, loss)`` curve (``None``: no test was run).

        Skipped, with a warning, when the fit is planned for fewer steps than ``find_steps``: a
        test longer than the fit costs more than the fit, and suggests an LR for more steps."""
        assert self.controller is not None
        cfg = self.config
        if len(trainer.optimizers) != 1:
            raise ValueError(
                "ScheduleSurgeon(peak_lr='find') needs exactly one optimizer (Lightning's LR "
                f"finder drives one), got {len(trainer.optimizers)}: pass peak_lr='optimizer' "
                "and set each optimizer's LR"
            )
        total = self.controller.total_steps
        if total < cfg.find_steps:
            rank_zero_warn(
                f"ScheduleSurgeon(peak_lr='find') skipped the LR range test: the fit is planned "
                f"for {total} steps, fewer than find_steps={cfg.find_steps}; keeping the "
                f"optimizer's configured LRs. Pass find_steps <= {total} to run it anyway."
            )
            return None
        optimizer = trainer.optimizers[0]
        configured = [group["lr"] for group in optimizer.param_groups]
        first = check_lr(configured[0])
        with _range_test_losses(trainer, pl_module) as losses:
            finder = _lr_find(trainer)(
                trainer,
                pl_module,
                min_lr=cfg.find_min_lr,
                max_lr=cfg.find_max_lr,
                num_training=cfg.find_steps,
            )
        # the finder restored the model, optimizers and callbacks from a checkpoint it took
        # first: our own (fresh) state among them, which is not a resume
        self._pending_state = None
        if finder is None:  # Lightning skips it under fast_dev_run (and says so)
            return None
        lrs = [float(lr) for lr in finder.results["lr"]]
        losses = trainer.strategy.broadcast(losses)[: len(lrs)]  # rank 0's, like the finder's
        curve = list(zip(lrs, losses, strict=False))
        found = suggest_lr(lrs[: len(losses)], losses)
        steps = f"LRs {lrs[0]:.3g} to {lrs[-1]:.3g} over {len(curve)} steps" if curve else "no step"
        tested = (
            f"tested {steps} (find_min_lr={cfg.find_min_lr:g}, find_max_lr={cfg.find_max_lr:g}, "
            f"find_steps={cfg.find_steps})"
        )
        if found is None:
            rank_zero_warn(
                "ScheduleSurgeon(peak_lr='find'): the LR range test gave no suggestion (its loss "
                f"neither fell by {MIN_DROP:.0%} nor diverged, had fewer than {MIN_POINTS} finite "
                f"values, or was <= 0; {tested}); keeping the optimizer's configured LRs. Widen "
                "find_min_lr..find_max_lr or raise find_steps."
            )
            return curve
        suggestion = found.lr
        if max(suggestion / first, first / suggestion) > FAR_FROM_CONFIGURED:
            rank_zero_warn(
                f"ScheduleSurgeon(peak_lr='find') sets the peak LR to {suggestion:.3g}, "
                f"{max(suggestion / first, first / suggestion):.0f}x from the configured "
                f"{first:.3g} (first param group): check the LR range test's curve "
                f"({LR_FIND_FILE}, drawn by surgeon plot), or pass peak_lr='optimizer' to keep "
                "the configured LRs"
            )
        # load_state_dict replaced the param group dicts: read them again
        for group, lr in zip(optimizer.param_groups, configured, strict=True):
            group[PEAK_LR_KEY] = suggestion * lr / first
        why = (
            f"LR range test suggests peak LR {suggestion:.4g} (first param group; others keep "
            f"their configured ratios, first was {first:.4g}): {found.reason}; {tested}"
        )
        # the scale is untouched (only the peak changed): both sides are the next step's
        scale = self.controller.lr_scale(1)
        event = Event(0, EventKind.PEAK_LR, why, scale, scale, self.controller.phase)
        self.controller.events.append(event)
        self._report(event)  # logged now; events.jsonl is written once training starts
        return curve

    @staticmethod
    def _write_lr_find(path: Path, curve: list[tuple[float, float]] | None) -> None:
        if curve is None:
            path.unlink(missing_ok=True)
            return
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["lr", "loss"])
            writer.writerows(curve)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # a state that validate/test/predict(ckpt_path=...) loaded is not for a later fit
        self._pending_state = None
        self.engine.release()  # snapshot memory
        if self._recorder is not None:
            self._recorder.close()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_global_step = trainer.global_step
        self._step_counter = _optimizer_step_counter(trainer)
        if trainer.global_step > 0 and not self._state_loaded and self.controller is not None:
            # resumed from a checkpoint saved without the surgeon: the steps done count
            per_batch = len(trainer.optimizers) if self._manual else 1
            self.engine.start_at(math.ceil(trainer.global_step / per_batch))
        controller = self.controller
        if self._log_dir is not None and controller is not None:
            # after a checkpoint is restored: the files hold this run's events and losses, none
            # when it starts fresh (a reused log directory keeps no older run's), the restored
            # ones when it resumes (none twice after a crash)
            self._recorder = RunRecorder(self._log_dir)
            self._recorder.start(
                config=self.config,
                total_steps=controller.total_steps,
                readback_every=self.engine.readback_every,
                snapshot=self.engine.snapshot_mode,
                events=[self._event_record(event) for event in self.events],
                next_loss_step=controller.step,
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the losses still in flight: a spike or NaN at the very end is decided on and
        recorded like any other (a rollback included: the fit then ends with the last good
        weights)."""
        self.engine.finish()
        if self._recorder is not None:
            self._recorder.flush()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._recorder is not None:  # what was decided before the fault stays on disk
            self._recorder.close()

    def _manual_limits(self, trainer: pl.Trainer) -> tuple[int | None, float]:
        """Under manual optimization without ``total_steps``: Trainer's ``max_steps`` (``None``:
        none) and the batches ``max_epochs`` allows, to follow the steps per batch with."""
        if not self._manual or self.total_steps is not None or trainer.max_steps in (None, -1):
            return None, math.inf
        batches, epochs = trainer.num_training_batches, trainer.max_epochs
        bounded = epochs not in (None, -1) and math.isfinite(batches)
        return trainer.max_steps, batches * epochs if bounded else math.inf

    def _follow_manual_steps(self, global_step: int) -> None:
        """Under manual optimization ``max_steps`` counts every ``opt.step()``, and the plan
        assumed every optimizer steps every batch. Once 10 steps are in, project the run's
        length from the optimizer steps per batch so far; off the plan by more than 5% (and by
        more than an unfinished cycle of the stepping pattern can skew it: up to one step per
        optimizer), re-plan (a ``replan`` event). The same counters on every rank and after a
        resume: the same decisions."""
        engine, controller = self.engine, self.controller
        assert self._max_steps is not None and controller is not None
        done = engine.step + engine.skipped_steps  # the batches that stepped an optimizer
        if done < _MANUAL_SAMPLE:
            return
        per_batch = global_step / done
        left = max(0, self._max_steps - global_step)
        projected = int(min(done + math.ceil(left / per_batch), self._batch_limit))
        tolerance = max(_MANUAL_TOLERANCE, len(engine.optimizers) / done)
        if abs(projected - controller.total_steps) <= tolerance * controller.total_steps:
            return
        engine.replan(
            projected,
            f"under manual optimization max_steps={self._max_steps} counts every opt.step(), "
            f"{per_batch:.3g} per batch so far: the run ends after about {projected} steps, not "
            f"{controller.total_steps}",
        )

    def _planned_steps(self, trainer: pl.Trainer) -> int:
        """``total_steps``, else what ends the fit first: ``max_steps`` or ``max_epochs``
        (Lightning's ``estimated_stepping_batches``, which counts optimizer steps)."""
        if self.total_steps is not None:
            return self.total_steps
        estimate = trainer.estimated_stepping_batches  # min(max_steps, epochs x steps/epoch)
        if trainer.max_steps is not None and trainer.max_steps > 0:
            # under manual optimization `max_steps` counts every `opt.step()`, but the surgeon
            # steps once per batch: with k optimizers (each stepped once a batch) that is k calls
            manual = not trainer.lightning_module.automatic_optimization
            per_batch = len(trainer.optimizers) if manual else 1
            estimate = min(estimate, math.ceil(trainer.max_steps / per_batch))
        if isinstance(estimate, int | float) and math.isfinite(estimate) and estimate >= 1:
            return int(estimate)
        raise ValueError(
            "ScheduleSurgeon needs a finite planned length: pass total_steps=..., or set "
            f"Trainer(max_steps=...) or max_epochs (estimated_stepping_batches={estimate})"
        )

    def _scheduled_optimizers(self, trainer: pl.Trainer) -> set[int]:
        configs = trainer.lr_scheduler_configs
        if not configs:
            return set()
        owned = {id(c.scheduler.optimizer) for c in configs}
        if self.leave_scheduled_optimizers:
            return owned
        names = ", ".join(type(c.scheduler).__name__ for c in configs)
        raise ValueError(
            f"configure_optimizers returned LR scheduler(s) ({names}), but ScheduleSurgeon sets "
            "the learning rate itself: return only the optimizer(s) from configure_optimizers, "
            "or pass ScheduleSurgeon(leave_scheduled_optimizers=True) to leave the optimizers "
            "that have a scheduler alone"
        )

    def _show_phase_in_progress_bar(self, trainer: pl.Trainer) -> None:
        bar = trainer.progress_bar_callback
        if bar is None or getattr(bar.get_metrics, "_surgeon", False):
            return
        original = bar.get_metrics

        def get_metrics(*args: Any, **kwargs: Any) -> dict[str, Any]:
            return {**original(*args, **kwargs), "phase": self.phase.value}

        get_metrics._surgeon = True  # type: ignore[attr-defined]
        bar.get_metrics = get_metrics  # type: ignore[method-assign]

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        scale = self.engine.begin_step()
        if scale is not None and self.step % self._log_every == 0 and self._is_global_zero:
            self._log_lrs(scale)

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
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            self.engine.add_loss(loss)
        elif not self._warned_no_loss:
            self._warned_no_loss = True
            counted = (
                "are counted, but no spike, plateau or stabilization can be seen in them"
                if self._manual
                else "are not counted (Lightning skips their optimizer step)"
            )
            log.warning(
                "ScheduleSurgeon found no loss in a training_step output; steps without a loss "
                f"{counted}: return the loss, or a dict with 'loss'"
            )
        counter = self._step_counter  # trainer.global_step, without its chain of properties
        global_step = counter.completed if counter is not None else trainer.global_step
        if global_step == self._last_global_step:
            return  # accumulating: the optimizer step has not happened yet
        self._last_global_step = global_step
        # GradScaler makes its scale tensor at its first step
        self.engine.end_step(getattr(self._scaler, "_scale", None))
        if self._max_steps is not None:
            self._follow_manual_steps(global_step)

    # ------------------------------------------------------------------ observability
    def _log_lrs(self, scale: float) -> None:
        """The LRs written for the current step, named as ``LearningRateMonitor`` names them."""
        metrics = {"surgeon/lr_scale": scale}
        driven = self.engine.driven
        pairs = zip(driven, self._lr_names, strict=True)
        if any(len(optimizer.param_groups) != len(names) for optimizer, names in pairs):
            # groups restored after on_fit_start (a resumed BaseFinetuning), or added with a
            # copied peak: name them now
            self._lr_names = lr_metric_names(driven)
        for optimizer, names in zip(driven, self._lr_names, strict=True):
            for group, name in zip(optimizer.param_groups, names, strict=True):
                metrics[name] = group["lr"]
        for logger in self._loggers:
            logger.log_metrics(metrics, step=self.step)

    def _on_loss(self, step: int, loss: float, update_skipped: bool) -> None:
        """A loss the controller consumed: into ``losses.csv``, and into the loggers at
        Lightning's logging cadence (with its smoothed value and the phase)."""
        if self._recorder is not None:
            self._recorder.loss(step, loss, update_skipped)
        if step % self._log_every == 0 and self._is_global_zero:
            self._log_loss(step, loss)

    def _log_loss(self, step: int, loss: float) -> None:
        """The loss of ``step`` as the controller saw it, its smoothed value, and the phase."""
        assert self.controller is not None
        metrics = {
            "surgeon/loss": loss,
            "surgeon/loss_smooth": self.controller.spike.mean,
            "surgeon/phase": PHASE_CODES[self.controller.phase],
        }
        for logger in self._loggers:
            logger.log_metrics(metrics, step=step)

    def _event_lrs(self, event: Event) -> tuple[float, float]:
        """The first param group's LR before and after ``event``."""
        peak = self.engine.driven[0].param_groups[0][PEAK_LR_KEY]
        return peak * event.scale_before, peak * event.scale_after

    def _report(self, event: Event) -> None:
        """A log line for ``event``, and its line in ``events.jsonl`` (rank zero, once open)."""
        lr_before, lr_after = self._event_lrs(event)
        log.info(
            "step %d: %s: %s (lr %.3g -> %.3g)",
            event.step,
            event.kind.value,
            event.reason,
            lr_before,
            lr_after,
        )
        if self._recorder is not None:
            self._recorder.event(self._event_record(event))

    def _event_record(self, event: Event) -> dict[str, Any]:
        """``event`` as a record of ``events.jsonl``, with the LRs of the first param group."""
        return event_record(event, *self._event_lrs(event))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The engine's state; first it reads and decides on the losses in flight, so a spike or
        NaN among them is rolled back before the checkpoint's weights are written."""
        if self.controller is None:
            return self._pending_state or {}
        state = self.engine.state_dict()
        if self._recorder is not None:
            self._recorder.flush()  # the loss rows up to this checkpoint are on disk
        return state

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning took the weights before the callbacks' state: a rollback or buffer repair
        # made while reading the last losses (in place, so the tensors usually are the same)
        # goes into the checkpoint for sure
        if self.controller is not None and self.engine.changed_at_checkpoint:
            checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        # kept for on_fit_start, which starts the engine afresh: a callback reused for a resumed
        # fit would otherwise restore into the previous fit's controller and lose the state
        self._pending_state = state_dict
        if self.controller is not None:
            self.engine.load_state_dict(state_dict)
            self._state_loaded = True
