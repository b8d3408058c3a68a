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
   calls ``opt.step()`` inside ``training_step``. ``on_train_epoch_start`` writes it too,
   for callbacks that read it there. A ``LearningRateMonitor`` reads it in the same hooks:
   the surgeon moves itself ahead of it in ``trainer.callbacks`` (see
   :meth:`ScheduleSurgeon._go_before_lr_monitors`). An LR scheduler returned by
   ``configure_optimizers`` is dropped (as ``StochasticWeightAveraging`` swaps the user's),
   see ``replace_lr_schedulers``.
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
What the user sees (see :meth:`ScheduleSurgeon._report` and :meth:`ScheduleSurgeon._publish`):
each event as a line through Lightning's rank-zero info channel, as text in TensorBoard and
as ``surgeon/event`` in every logger; the run files (:mod:`surgeon.recorder`) in every
logger's directory; the LRs, losses and phase at Lightning's logging cadence and steps; the
LR, phase and last event in ``trainer.callback_metrics``; the phase in the progress bar; the
settings among every logger's hyperparameters. Only rank zero logs and writes files; every
rank makes the same decisions because the feed averages the losses across ranks before
reading them, and budget decisions (``max_time``, ``EarlyStopping``) are broadcast from rank
zero.
"""

import csv
import logging
import math
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer

from surgeon._validate import check_positive_int
from surgeon.config import (
    DecayName,
    PeakLR,
    PlateauAction,
    Steps,
    SurgeonConfig,
    WarmupMode,
    resolve_steps,
)
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
    EVENT_CODES,
    EVENTS_FILE,
    LR_FIND_FILE,
    PHASE_CODES,
    RunRecorder,
    event_record,
    run_settings,
)

log = logging.getLogger("surgeon")
"""Warnings (events and notices go through Lightning's rank-zero info channel)."""

try:  # one class that both Trainers accept: `lightning.pytorch` and `pytorch_lightning`
    import lightning.pytorch as _lightning_pytorch
    from lightning.fabric.utilities.exceptions import (
        MisconfigurationException as _LightningMisconfigurationException,
    )

    _CALLBACK_BASES: tuple[type, ...] = (pl.Callback, _lightning_pytorch.Callback)
    _MISCONFIGURATION_BASES: tuple[type, ...] = (
        MisconfigurationException,
        _LightningMisconfigurationException,
    )
except ImportError:  # pragma: no cover - `lightning` is optional
    _CALLBACK_BASES = (pl.Callback,)
    _MISCONFIGURATION_BASES = (MisconfigurationException,)

__all__ = [
    "EVENTS_FILE",
    "EVENT_CODES",
    "LR_FIND_FILE",
    "PEAK_LR_KEY",
    "PHASE_CODES",
    "ScheduleSurgeon",
    "SurgeonMisconfigurationException",
]

FAR_FROM_CONFIGURED = 30.0
"""A range-test suggestion this many times above or below the configured LR is warned about."""
_MANUAL_SAMPLE = 10
"""Steps before the steps per batch of a manual optimization are trusted to project its length."""
_MANUAL_TOLERANCE = 0.05
"""A projected length off the plan by more than this share of it is re-planned."""
SURGEON_LOGS = "surgeon_logs"
"""Without a logger or ``log_dir``, run files go to ``default_root_dir/surgeon_logs/version_N``."""
OPEN_ENDED = 10**9
"""The planned length of a fit only ``max_time`` bounds: its time cooldown ends it."""
RECENT_CHECKS = 16
"""``max_time``: the recent step rate is measured over this many checks."""
DDP_BUDGET_EVERY = 32
"""Steps between ``max_time`` checks under DDP (each is a broadcast of rank zero's estimate)."""
TIME_MARGIN = 0.05
"""A ``max_time`` plan ends this fraction of the measured steps left early (rates drift)."""


class SurgeonMisconfigurationException(*_MISCONFIGURATION_BASES, ValueError):  # type: ignore[misc]
    """The surgeon cannot run with this Trainer setup (raised before training; Lightning's
    ``MisconfigurationException`` of either namespace, and a ``ValueError``)."""


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
        if len(groups) == 1:  # a named single group is `lr-AdamW/<name>`
            names.append([f"{name}/{groups[0]['name']}" if groups[0].get("name") else name])
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


def _is_a(obj: Any, class_name: str) -> bool:
    """Whether ``obj`` is a ``class_name`` of either Lightning namespace (by its class's MRO)."""
    return any(cls.__name__ == class_name for cls in type(obj).__mro__)


def _time_limit(trainer: pl.Trainer) -> Any:
    """The ``Timer`` enforcing ``Trainer(max_time=...)`` (or one the user added), or ``None``."""
    return next(
        (
            cb
            for cb in trainer.callbacks
            if _is_a(cb, "Timer") and getattr(cb, "_duration", None) is not None
        ),
        None,
    )


def _peak_under_scheduler(scheduler: Any, group: dict[str, Any], index: int) -> float:
    """The LR a group had before ``scheduler`` took it over: ``OneCycleLR``'s ``max_lr`` and
    ``CyclicLR``'s ``max_lr`` (their peaks; both overwrite the configured LR), else the LR the
    optimizer was configured with (torch schedulers keep it as ``initial_lr``)."""
    if "max_lr" in group:  # OneCycleLR
        return group["max_lr"]
    max_lrs = getattr(scheduler, "max_lrs", None)  # CyclicLR
    if max_lrs is not None:
        return max_lrs[index]
    return group.get("initial_lr", group["lr"])


def _versioned_dir(root: Path) -> Path:
    """``root/version_N`` for the first N not taken (as Lightning's loggers number runs)."""
    taken = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    return root / f"version_{max(taken, default=-1) + 1}"


_NEVER = 2**62
"""A step no fit reaches (an integer, so the per-step comparison stays an integer one)."""


class ScheduleSurgeon(*_CALLBACK_BASES):  # type: ignore[misc]
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
        decay: Shape from the peak to the floor (``"linear"``, ``"cosine"``, ``"sqrt"``,
            ``"wsd"``); ``"wsd"`` holds the peak (phase ``stable``), then decays linearly
            over the last ``wsd_decay_fraction`` of the steps that remain. A loss that never
            fell steeply (a saddle) holds the peak until its descent comes and stabilizes.
        wsd_decay_fraction: Share of the steps after warmup that the ``"wsd"`` tail spends
            decaying; also the default length of :meth:`cool_down_now` and the share of a
            ``max_time`` run that its cooldown takes.
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
        log_dir: Where ``events.jsonl``, ``settings.json`` and ``losses.csv`` go. Default:
            every logger's directory (so a plot of either finds them), or without a logger
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
        self.total_steps = total_steps
        self.leave_scheduled_optimizers = leave_scheduled_optimizers
        self.replace_lr_schedulers = replace_lr_schedulers
        self.cooldown_on_stop = cooldown_on_stop
        self.verbose = verbose
        self.log_dir = None if log_dir is None else Path(log_dir)
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
        self._epoch_loop: Any = None  # its `_batches_that_stepped` is Lightning's logging step
        self._scaler: Any = None
        self._trainer: Any = None
        self._log_every = 0
        self._is_global_zero = True
        self._manual = False
        self._lr_names: list[list[str]] = []
        self._lr_monitored = False
        self._recorder: RunRecorder | None = None
        self._log_dirs: list[Path] = []
        self._loggers: list[Any] = []
        self._pending_state: dict[str, Any] | None = None
        self._resuming = False
        self._state_loaded = False  # this fit restored the surgeon's state from a checkpoint
        self._max_steps: int | None = None  # manual optimization ended by max_steps: see below
        self._batch_limit = math.inf
        self._lr_find_curve: list[tuple[float, float]] | None = None
        self._warned_no_loss = False
        # observability: Lightning's step of the surgeon's step 0 (known at the first batch),
        # the last step whose LRs were logged, the phase shown in the progress bar
        self._step_offset: int | None = None
        self._last_logged_step = -1
        self._shown_phase: str | None = None
        self._plan_end = _NEVER
        self._done_shown = False
        self._next_check = _NEVER  # the first step at which one of the two is due (one compare)
        # budget: max_time (measured step rate) and EarlyStopping (patience about to run out)
        self._timer: Any = None
        self._plan_cap: int | None = None
        self._probing = False
        self._time_estimate: int | None = None
        self._probe_losses: dict[int, tuple[float, bool]] = {}
        self._time_samples: deque[tuple[int, float]] = deque(maxlen=RECENT_CHECKS + 1)
        self._time_origin: tuple[int, float] | None = None
        self._time_cooling = False
        self._budget_every = readback_every
        self._next_budget_check = _NEVER
        self._early_stoppers: list[Any] = []
        self._watch_early_stopping = False
        self._es_on_epoch_end = False
        self._es_pending = False
        self._last_es_step = 0

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
    def log_dirs(self) -> list[Path]:
        """The directories this fit's run files went to (rank zero; empty elsewhere)."""
        return list(self._log_dirs)

    @property
    def state_key(self) -> str:
        return "ScheduleSurgeon"

    def cool_down_now(self, steps: Steps | None = None) -> Event | None:
        """Bring the end of the run forward: from the current step, decay from the current LR to
        the floor over ``steps`` (an int, or a fraction of the planned run; default
        ``wsd_decay_fraction`` of it), and end the plan there. Under DDP call it on every rank.
        Returns the ``cooldown`` event, or ``None`` when the plan already ends by then."""
        controller = self.controller
        if controller is None:
            raise RuntimeError(
                "ScheduleSurgeon.cool_down_now() acts on a running fit: call it during "
                "Trainer.fit (from a hook, a callback or training_step)"
            )
        length = self.config.wsd_decay_fraction if steps is None else steps
        n = resolve_steps("steps", length, controller.total_steps, 1)
        return self._cool_down(n, f"cool_down_now(steps={steps!r}) was called")

    # ------------------------------------------------------------------ fit lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._recorder = None  # opened in on_train_start, once a checkpoint is restored
        self._trainer = trainer
        self._is_global_zero = trainer.is_global_zero
        self._loggers = list(trainer.loggers)
        self._log_dirs = []
        self._shown_phase = None
        self._timer = _time_limit(trainer) if self.cooldown_on_stop else None
        # a resumed fit takes its peaks from the checkpoint's param groups: no second range test
        self._resuming = trainer.ckpt_path is not None or self._pending_state is not None
        self._plan_cap = self._planned_steps(trainer)
        total = self._initial_total()
        # a max_time plan's lengths are fractions of the run its step rate allows (checkpointed)
        self._time_estimate = (self._pending_state or {}).get("time_estimate")
        self.engine.config = self._lengths_for(self._time_estimate)
        scheduled = self._take_over_schedulers(trainer)
        driven = [opt for opt in trainer.optimizers if id(opt) not in scheduled]
        if not driven:
            raise SurgeonMisconfigurationException(
                "ScheduleSurgeon has no optimizer to drive: all have LR schedulers and "
                "leave_scheduled_optimizers=True leaves them to those; pass "
                "leave_scheduled_optimizers=False to take them over"
            )
        self._manual = not pl_module.automatic_optimization
        self._scaler = _grad_scaler(trainer)
        try:
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
        except ValueError as err:  # a warmup longer than the run: say where the length came from
            raise SurgeonMisconfigurationException(
                f"{err}; the planned length of {total} steps is {self._plan_source(trainer)}"
            ) from err
        self._state_loaded = False
        self._max_steps, self._batch_limit = self._manual_limits(trainer)
        self._probing = self._timer is not None and not self._resuming and self.total_steps is None
        self._lr_find_curve = None
        if self.config.peak_lr == "find" and not self._resuming:
            self._lr_find_curve = self._find_peak_lr(trainer, pl_module)
        self._lr_names = lr_metric_names(driven)
        self._lr_monitored = self._go_before_lr_monitors(trainer)
        self._log_every = trainer.log_every_n_steps
        if self._pending_state is not None:
            self.engine.load_state_dict(self._pending_state)
            self._pending_state = None
            self._state_loaded = True
        if self._is_global_zero:
            self._log_hyperparams(trainer)

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
        self._trainer = None
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
        self._epoch_loop = trainer.fit_loop.epoch_loop
        self._step_offset = None
        self._last_logged_step = -1
        controller = self.controller
        assert controller is not None
        self._plan_end, self._done_shown = controller.total_steps, False
        self._start_budget(trainer)
        self._schedule_checks()
        self._shown_phase = None  # Lightning cleared the progress bar's metrics after sanity
        if self._is_global_zero:
            # after a checkpoint is restored: the files hold this run's events and losses, none
            # when it starts fresh (a reused log directory keeps no older run's), the restored
            # ones when it resumes (none twice after a crash)
            self._log_dirs = self._run_directories(trainer)
            self._recorder = RunRecorder(*self._log_dirs)
            self._recorder.start(
                config=self.config,
                total_steps=controller.total_steps,
                readback_every=self.engine.readback_every,
                snapshot=self.engine.snapshot_mode,
                events=[self._event_record(event) for event in self.events],
                next_loss_step=controller.step,
            )
            if not self._resuming:  # a reused directory keeps no old curve
                for directory in self._log_dirs:
                    self._write_lr_find(directory / LR_FIND_FILE, self._lr_find_curve)
        self._publish(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the losses still in flight: a spike or NaN at the very end is decided on and
        recorded like any other (a rollback included: the fit then ends with the last good
        weights); a fit that ends before its plan says so (a ``stopped`` event)."""
        self.engine.finish()
        self._record_early_end(trainer)
        self._publish(trainer)
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

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish(trainer)  # fresh values for the checkpoint and early-stopping checks after

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        watch = self._watch_early_stopping and not self._es_on_epoch_end
        if watch and not trainer.sanity_checking:
            self._es_pending = True  # read once every callback's on_validation_end has run

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The coming step's LR, for callbacks that read it here (``LearningRateMonitor`` logs
        at each epoch start); written again in ``on_train_batch_start``, after any callback that
        changes it at the epoch start (the surgeon owns the LR)."""
        self.engine.begin_step()
        self.engine.written_step = -1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._watch_early_stopping and self._es_on_epoch_end:
            self._es_pending = True
        self._publish(trainer)

    def _go_before_lr_monitors(self, trainer: pl.Trainer) -> bool:
        """Whether a ``LearningRateMonitor`` logs the LRs. If so the surgeon leaves the ``lr-*``
        series to it and moves itself ahead of it in ``trainer.callbacks``: both act in
        ``on_train_batch_start``, the surgeon's write must come first for the monitor to log the
        LR the step uses (Lightning calls the hooks in list order)."""
        # called from on_fit_start, while Lightning iterates this list: moving an element to an
        # earlier place neither skips nor repeats the callbacks after it
        callbacks = trainer.callbacks
        monitors = [i for i, cb in enumerate(callbacks) if _is_a(cb, "LearningRateMonitor")]
        if not monitors or not self._loggers:
            return False
        moved = ""
        if callbacks.index(self) > monitors[0]:
            callbacks.remove(self)
            callbacks.insert(monitors[0], self)
            moved = " (moved ahead of it in trainer.callbacks, so it logs the LR each step uses)"
        names = ", ".join(name for names in self._lr_names for name in names)
        self._notice(
            f"LearningRateMonitor logs the learning rates ({names}){moved}; the surgeon leaves "
            "those series to it and logs surgeon/lr_scale beside them"
        )
        return True

    def _planned_steps(self, trainer: pl.Trainer) -> int | None:
        """``total_steps``, else what ends the fit first: ``max_steps`` or ``max_epochs``
        (Lightning's ``estimated_stepping_batches``, which counts optimizer steps); ``None``
        when only ``max_time`` bounds the fit (planned from the step rate once measured)."""
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
        if self._timer is not None:
            return None
        raise SurgeonMisconfigurationException(
            "ScheduleSurgeon needs a finite planned length: pass total_steps=..., or set "
            f"Trainer(max_steps=...), max_epochs or max_time (estimated_stepping_batches="
            f"{estimate})"
        )

    def _plan_source(self, trainer: pl.Trainer) -> str:
        """Where the planned length came from, for messages."""
        if self.total_steps is not None:
            return f"total_steps={self.total_steps}"
        if self._plan_cap is None:
            return "provisional (only max_time bounds the fit)"
        return (
            f"what ends the fit first (max_steps={trainer.max_steps}, "
            f"max_epochs={trainer.max_epochs}); pass total_steps=... to plan another length"
        )

    def _initial_total(self) -> int:
        """The length to start with: a resumed fit whose plan a budget moved (a cooldown, a
        ``max_time`` plan) keeps its checkpoint's; a fit only ``max_time`` bounds is open-ended
        (its time cooldown ends it); else the planned length."""
        state = self._pending_state
        if state is not None and "controller" in state:
            saved = state["controller"]
            moved = any(e["kind"] == EventKind.COOLDOWN.value for e in saved["events"])
            if moved or self._timer is not None:
                return int(saved["total_steps"])
        return OPEN_ENDED if self._plan_cap is None else self._plan_cap

    def _take_over_schedulers(self, trainer: pl.Trainer) -> set[int]:
        """The ids of the optimizers left to their LR schedulers. The others' schedulers are
        dropped from the Trainer (each group's LR set to the peak the scheduler had taken
        over), or refused (``replace_lr_schedulers=False``)."""
        configs = trainer.lr_scheduler_configs
        if not configs:
            return set()
        if self.leave_scheduled_optimizers:
            return {id(c.scheduler.optimizer) for c in configs}
        names = ", ".join(type(c.scheduler).__name__ for c in configs)
        fix = (
            "return only the optimizer(s) from configure_optimizers, or pass "
            "ScheduleSurgeon(leave_scheduled_optimizers=True) to leave the optimizers that "
            "have a scheduler to it"
        )
        if not self.replace_lr_schedulers:
            raise SurgeonMisconfigurationException(
                f"configure_optimizers returned LR scheduler(s) ({names}), but ScheduleSurgeon "
                f"sets the learning rate itself and replace_lr_schedulers=False: {fix}"
            )
        if not trainer.lightning_module.automatic_optimization:
            raise SurgeonMisconfigurationException(
                f"configure_optimizers returned LR scheduler(s) ({names}) under manual "
                "optimization, where training_step steps them itself (after the surgeon has "
                f"written the LR): {fix}"
            )
        dropped = []
        for config in configs:
            scheduler, optimizer = config.scheduler, config.scheduler.optimizer
            peaks = [
                _peak_under_scheduler(scheduler, group, i)
                for i, group in enumerate(optimizer.param_groups)
            ]
            for group, peak in zip(optimizer.param_groups, peaks, strict=True):
                group["lr"] = peak
            shown = ", ".join(f"{peak:.4g}" for peak in peaks)
            owner = type(optimizer).__name__
            dropped.append(f"{type(scheduler).__name__} (of {owner}, peak LR {shown})")
        configs.clear()  # the strategy's own list: Lightning neither steps nor saves them now
        self._notice(
            f"replacing the LR scheduler(s) configure_optimizers returned: {'; '.join(dropped)}. "
            "The surgeon sets the learning rate from here; pass replace_lr_schedulers=False "
            "to refuse to start instead"
        )
        return set()

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._es_pending:  # before this step's LR is written: a cooldown starts here
            self._es_pending = False
            self._check_early_stopping(trainer)
        self.engine.begin_step()
        step = self._epoch_loop._batches_that_stepped  # Lightning's logging step
        if self._step_offset is None:  # the first batch of the fit (loops are restored by now)
            self._step_offset = step - self.engine.step - self.engine.skipped_steps
        # Lightning's cadence (its `should_update_logs`): the LRs share a step with its metrics
        every = self._log_every
        if every and (step + 1) % every == 0 and step != self._last_logged_step:
            self._last_logged_step = step  # once per step (micro-batches share it)
            self._log_lrs(trainer, step)

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
        if self.engine.step >= self._next_check:
            self._on_check(trainer)

    def _on_check(self, trainer: pl.Trainer) -> None:
        """A ``max_time`` check is due, or the planned steps have run (the progress bar and
        ``callback_metrics`` say ``done`` at once)."""
        step = self.engine.step
        if step >= self._next_budget_check:
            self._check_time_budget(trainer)
        if not self._done_shown and step >= self._plan_end:
            self._done_shown = True
            self._publish(trainer)
        self._schedule_checks()

    def _schedule_checks(self) -> None:
        end = _NEVER if self._done_shown else self._plan_end
        self._next_check = min(self._next_budget_check, end)

    # ------------------------------------------------------------------ budget
    def _start_budget(self, trainer: pl.Trainer) -> None:
        """Find the budget this fit may end by: ``max_time`` (checked every few steps from the
        measured step rate) and the ``EarlyStopping`` callbacks (checked after theirs run)."""
        self._early_stoppers = [cb for cb in trainer.callbacks if _is_a(cb, "EarlyStopping")]
        # where EarlyStopping checks: Lightning decides in its setup, before on_fit_start
        self._es_on_epoch_end = any(
            getattr(es, "_check_on_train_epoch_end", False) for es in self._early_stoppers
        )
        self._watch_early_stopping = self.cooldown_on_stop and bool(self._early_stoppers)
        self._es_pending = False
        self._last_es_step = self.engine.step
        self._next_budget_check = _NEVER
        if self._timer is None:
            return
        controller = self.controller
        assert controller is not None
        every = self.engine.readback_every
        if trainer.world_size > 1:  # each check is then a broadcast (Lightning's Timer makes one
            every = max(every, DDP_BUDGET_EVERY)  # every step): fewer checks
        self._budget_every = every
        self._time_origin = None
        self._time_samples.clear()
        self._time_cooling = any(e.kind is EventKind.COOLDOWN for e in controller.events)
        self._next_budget_check = self.engine.step + every

    def _check_time_budget(self, trainer: pl.Trainer) -> None:
        """``max_time``: from the step rate measured since the first check (or over the recent
        checks, if slower), the steps left before the Timer stops the fit. The first estimate
        plans the run (a ``replan``, when the time ends it first); later ones cool down in time
        when the time ends the fit first (for ``wsd`` once the steps left are its tail's share
        of the run; other shapes once warmup is over), and move the cooldown's end when the
        estimate moves by more than a tenth (twice that to extend it: ending early only holds
        the floor longer)."""
        step = self.engine.step
        self._next_budget_check = step + self._budget_every
        timer, controller = self._timer, self.controller
        assert controller is not None
        elapsed = timer.time_elapsed("train")
        samples = self._time_samples
        samples.append((step, elapsed))
        if self._time_origin is None:  # the first steps carry start-up costs: measure after them
            self._time_origin = (step, elapsed)
            return
        start_step, start_time = self._time_origin
        if step - start_step < (3 if self._probing else 1) * self._budget_every:
            return
        # the slower of the whole fit's rate (validation included) and the recent one (a
        # slowdown shows at once): ending early only holds the floor longer
        rate = min(
            (step - start_step) / max(elapsed - start_time, 1e-9),
            (step - samples[0][0]) / max(elapsed - samples[0][1], 1e-9),
        )
        remaining = max(0.0, timer.time_remaining("train"))
        # end a little early rather than late: the LR then holds the floor for those steps
        left = int(remaining * rate * (1.0 - TIME_MARGIN)) - 2 * self._budget_every
        if trainer.world_size > 1:  # every rank plans the same steps (rank zero's clock)
            left = trainer.strategy.broadcast(left)
        left = max(1, left)
        why = (
            f"max_time: {remaining:.4g} s left at {rate:.4g} steps/s (since step {start_step}, "
            f"or over the last {step - samples[0][0]} steps if slower) is about {left} more steps"
        )
        if self._probing:
            self._probing = False
            if step + left < controller.total_steps:
                self._plan_from_time(step + left, why)
            return
        if controller.phase is Phase.DONE:
            return
        if self._plan_cap is not None:  # never past what max_steps / max_epochs allow
            left = min(left, self._plan_cap - step)
        planned = controller.total_steps - step
        if not self._time_cooling:
            wsd = self.config.decay == "wsd"
            tail = self.config.wsd_decay_fraction if wsd else 1.0
            due = left <= tail * (step + left) and (wsd or controller.phase is not Phase.WARMUP)
            if left >= planned or not due:
                return  # the plan ends first, or its cooldown is not due yet
            why += ": cooling down in time"
        else:  # a cooldown is under way: move its end when the estimate has moved enough
            slack = max(2 * self._budget_every, planned // 10)
            if planned - slack <= left <= planned + 2 * slack:
                return
            why += f", not the {planned} the cooldown has left"
        self._time_cooling = True
        self._report(controller.cool_down(step, left, why))

    def _lengths_for(self, run: int | None) -> SurgeonConfig:
        """The settings with every fractional length (warmup, windows, patience, cooldowns,
        snapshots) resolved against a run of ``run`` steps (``None``: as they are)."""
        if run is None:
            return self.config
        lengths: dict[str, Any] = {
            f.name: resolve_steps(f.name, getattr(self.config, f.name), run)
            for f in fields(self.config)
            if f.type is Steps
        }
        if self.config.warmup != "auto":  # a fixed warmup's length
            lengths["warmup"] = resolve_steps("warmup", self.config.warmup, run)
        return replace(self.config, **lengths)

    def _plan_from_time(self, estimate: int, why: str) -> None:
        """Plan the run for the ``estimate`` steps ``max_time`` allows: a fresh controller whose
        fractional lengths are of that run, fed the losses the first one has consumed (the
        events already reported stay the record). Its planned length stays open (or
        ``max_steps`` / ``max_epochs``'s): the time cooldown ends it, wherever the step rate
        puts the end."""
        old = self.controller
        assert old is not None
        config = self._lengths_for(estimate)
        new = Controller(OPEN_ENDED if self._plan_cap is None else self._plan_cap, config)
        for step in range(old.step):
            item = self._probe_losses.get(step)
            if item is None:
                new.pass_step()
            else:
                new.update(item[0], update_skipped=item[1])
        self._probe_losses = {}
        new.events = list(old.events)
        step = self.engine.step
        why += (
            f": the run is planned as a {estimate}-step one (warmup {new.min_warmup} to "
            f"{new.max_warmup} steps), and cools down as the time runs out"
        )
        before, after = old.lr_scale(step), new.lr_scale(step)
        event = Event(max(0, step - 1), EventKind.REPLAN, why, before, after, new.phase)
        new.events.append(event)
        self.engine.config, self.engine.controller = config, new
        self._time_estimate = estimate
        self._report(event)

    def _check_early_stopping(self, trainer: pl.Trainer) -> None:
        """After an ``EarlyStopping`` check: when one more check without improvement would stop
        the fit (its patience is one from running out), decay to the floor by that check (the
        interval is the one since the previous check)."""
        step = self.engine.step
        interval, self._last_es_step = step - self._last_es_step, step
        near = [
            es
            for es in self._early_stoppers
            if es.patience >= 2 and es.wait_count == es.patience - 1
        ]
        steps = interval - 1 if near and interval >= 2 else 0  # the floor on the last step
        if trainer.world_size > 1:  # wait counts are per rank: rank zero decides
            steps = trainer.strategy.broadcast(steps)
        if not steps:
            return
        es = near[0] if near else self._early_stoppers[0]
        self._cool_down(
            steps,
            f"EarlyStopping(monitor={es.monitor!r}, patience={es.patience}) has seen "
            f"{es.wait_count} checks in a row without improvement: the next one without "
            f"improvement stops the fit, about {interval} steps from here",
        )

    def _cool_down(self, steps: int, why: str) -> Event | None:
        """Cool down from the current step over ``steps`` steps, unless the plan ends by then."""
        event = self.engine.cool_down(steps, why)
        if event is None:
            end = self.engine.step + steps
            self._notice(f"{why}; no cooldown: the plan already ends by step {end}")
        return event

    def _record_early_end(self, trainer: pl.Trainer) -> None:
        """A ``stopped`` event when the fit ended before its plan did, saying why."""
        controller = self.controller
        if controller is None or controller.phase is Phase.DONE:
            return
        done = controller.step
        scale = controller.lr_scale(max(0, done - 1))
        why = (
            f"the fit ended after {done} of the {controller.total_steps} planned steps, in phase "
            f"{controller.phase.value} at LR scale {scale:.3g} (the floor is "
            f"{controller.floor:g}): {self._stop_cause(trainer)}"
        )
        event = Event(max(0, done - 1), EventKind.STOPPED, why, scale, scale, controller.phase)
        controller.events.append(event)
        self._report(event)

    def _stop_cause(self, trainer: pl.Trainer) -> str:
        """What ended the fit, as far as Lightning's callbacks tell."""
        for es in self._early_stoppers:
            message = getattr(es, "stopping_reason_message", None)
            if message or (trainer.should_stop and es.wait_count >= es.patience):
                message = message or f"{es.wait_count} checks without improvement"
                return f"EarlyStopping(monitor={es.monitor!r}) stopped it: {message}"
        timer = self._timer or _time_limit(trainer)
        if timer is not None and timer.time_remaining("train") <= 0:
            return f"max_time ({timer._duration:g} s) ran out"
        if trainer.should_stop:
            return "trainer.should_stop was set"
        return "the Trainer's max_steps / max_epochs ended it, or the data ran out"

    # ------------------------------------------------------------------ observability
    def _notice(self, message: str) -> None:
        """A one-off line through Lightning's rank-zero info channel (``verbose``)."""
        if self.verbose:
            rank_zero_info(f"ScheduleSurgeon: {message}")

    def _lightning_step(self, step: int) -> int:
        """Lightning's logging step (``_batches_that_stepped``) of the surgeon's ``step``."""
        return step + self.engine.skipped_steps + (self._step_offset or 0)

    def _log_lrs(self, trainer: pl.Trainer, step: int) -> None:
        """The LRs in place for Lightning's step ``step``, named as ``LearningRateMonitor``
        names them (left to it when it runs), and the state in ``callback_metrics``."""
        metrics = {"surgeon/lr_scale": self.engine.written_scale}
        driven = self.engine.driven
        if not self._lr_monitored:
            pairs = zip(driven, self._lr_names, strict=True)
            if any(len(optimizer.param_groups) != len(names) for optimizer, names in pairs):
                # groups restored after on_fit_start (a resumed BaseFinetuning), or added with a
                # copied peak: name them now
                self._lr_names = lr_metric_names(driven)
            for optimizer, names in zip(driven, self._lr_names, strict=True):
                for group, name in zip(optimizer.param_groups, names, strict=True):
                    metrics[name] = group["lr"]
        if self._is_global_zero:
            for logger in self._loggers:
                logger.log_metrics(metrics, step=step)
        self._publish(trainer)

    def _on_loss(self, step: int, loss: float, update_skipped: bool) -> None:
        """A loss the controller consumed: into ``losses.csv``, and into the loggers at its own
        step when Lightning logs that step (with its smoothed value and the phase)."""
        if self._recorder is not None:
            self._recorder.loss(step, loss, update_skipped)
        if self._probing:  # a max_time plan replays them into its controller
            self._probe_losses[step] = (loss, update_skipped)
        every = self._log_every
        if every and self._is_global_zero:
            at = step + self.engine.skipped_steps + (self._step_offset or 0)  # Lightning's step
            if (at + 1) % every == 0:
                self._log_loss(at, loss)

    def _log_loss(self, step: int, loss: float) -> None:
        """A loss as the controller saw it, its smoothed value, and the phase, at ``step``."""
        assert self.controller is not None
        metrics = {
            "surgeon/loss": loss,
            "surgeon/loss_smooth": self.controller.spike.mean,
            "surgeon/phase": PHASE_CODES[self.controller.phase],
        }
        for logger in self._loggers:
            logger.log_metrics(metrics, step=step)

    def _publish(self, trainer: Any) -> None:
        """The state where Lightning users look: ``surgeon/lr`` (the first param group's, for
        the current step),
        ``surgeon/lr_scale``, ``surgeon/phase``, ``surgeon/last_event`` and its step in
        ``trainer.callback_metrics`` (monitorable, usable in checkpoint names), and the phase's
        name in the progress bar (``done`` once the planned steps have run)."""
        controller = self.controller
        if controller is None or trainer is None or not self.engine.driven:
            return
        step = self.engine.step
        shown = Phase.DONE if step >= controller.total_steps else controller.phase
        scale = controller.lr_scale(step)  # the current step's, written or about to be
        values = {
            "surgeon/lr": self.engine.driven[0].param_groups[0][PEAK_LR_KEY] * scale,
            "surgeon/lr_scale": scale,
            "surgeon/phase": PHASE_CODES[shown],
        }
        if controller.events:
            last = controller.events[-1]
            values["surgeon/last_event"] = EVENT_CODES[last.kind]
            values["surgeon/last_event_step"] = float(last.step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        if shown.value != self._shown_phase:  # the bar reads trainer.progress_bar_metrics
            self._shown_phase = shown.value
            trainer.progress_bar_metrics["phase"] = shown.value

    def _log_hyperparams(self, trainer: pl.Trainer) -> None:
        """The run's settings (``settings.json``) among every logger's hyperparameters, as
        ``surgeon/...``, before Lightning logs the model's. TensorBoard shows the first set a
        run was given: it gets the model's (and datamodule's) with them."""
        controller = self.controller
        assert controller is not None
        engine = self.engine
        settings = run_settings(
            self.config, controller.total_steps, engine.readback_every, engine.snapshot_mode
        )
        flat = {**{k: v for k, v in settings.items() if k != "config"}, **settings["config"]}
        theirs: dict[str, Any] = {}
        for owner in (trainer.lightning_module, trainer.datamodule):
            if owner is not None and getattr(owner, "_log_hyperparams", False):
                theirs.update(owner.hparams_initial)
        theirs.pop("_class_path", None)  # as Lightning leaves LightningCLI's out
        for logger in self._loggers:
            first = theirs if _is_a(logger, "TensorBoardLogger") else {}
            logger.log_hyperparams({**first, "surgeon": flat})
            logger.save()

    def _run_directories(self, trainer: pl.Trainer) -> list[Path]:
        """``log_dir``, else every logger's directory (``log_dir`` where it has one, as
        Lightning's ``trainer.log_dir`` takes it, else ``save_dir``), else a new
        ``default_root_dir/surgeon_logs/version_N``."""
        if self.log_dir is not None:
            return [self.log_dir]
        directories: list[Path] = []
        for logger in self._loggers:
            found = getattr(logger, "log_dir", None) or logger.save_dir
            if found is not None and Path(found) not in directories:
                directories.append(Path(found))
        return directories or [_versioned_dir(Path(trainer.default_root_dir) / SURGEON_LOGS)]

    def _event_lrs(self, event: Event) -> tuple[float, float]:
        """The first param group's LR before and after ``event``."""
        peak = self.engine.driven[0].param_groups[0][PEAK_LR_KEY]
        return peak * event.scale_before, peak * event.scale_after

    def _report(self, event: Event) -> None:
        """``event`` where users look: a line through Lightning's rank-zero info channel
        (``verbose``), its record in ``events.jsonl``, ``surgeon/event`` (its code) in every
        logger and its sentence as TensorBoard text, at Lightning's step; the state in
        ``callback_metrics`` and the progress bar."""
        lr_before, lr_after = self._event_lrs(event)
        line = f"step {event.step}: {event.kind.value}: {event.reason} "
        line += f"(lr {lr_before:.3g} -> {lr_after:.3g})"
        self._notice(line)
        if self._recorder is not None:
            self._recorder.event(self._event_record(event))
        controller = self.controller
        if controller is not None and controller.total_steps != self._plan_end:
            self._plan_end, self._done_shown = controller.total_steps, False
            self._schedule_checks()
        if self._is_global_zero and self._loggers:
            step = self._lightning_step(event.step)
            for logger in self._loggers:
                logger.log_metrics({"surgeon/event": EVENT_CODES[event.kind]}, step=step)
                if _is_a(logger, "TensorBoardLogger"):
                    logger.experiment.add_text("surgeon/events", line, global_step=step)
        self._publish(self._trainer)

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
        if self._time_estimate is not None:  # the run a max_time plan's lengths are of
            state["time_estimate"] = self._time_estimate
        return state

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
