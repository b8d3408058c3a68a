"""What the Trainer says, read once per fit: its callbacks, scaler, counters, strategy and
planned length, and the LR schedulers ``configure_optimizers`` gave it (taken over or refused).

Both Lightning namespaces (``lightning.pytorch`` and ``pytorch_lightning``) are accepted:
callbacks are recognized by class name, errors are of both ``MisconfigurationException``s.
"""

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning_utilities.core.rank_zero as _rank_zero
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim import Optimizer

import surgeon
from surgeon.engine import (
    StepEngine,
    configured_peak,
    distributed_max,
    distributed_mean,
    write_lr,
)
from surgeon.guard import NonFiniteGuard, SkipNonfinite
from surgeon.loss_feed import Reduce
from surgeon.planning import OPEN_ENDED, ManualStepPlanner

# Lightning's rank-zero console log is one for both namespaces, pointed at the one imported last:
# importing the other here must not reroute a pytorch_lightning project's console lines
_users_log = _rank_zero.log
try:  # one class that both Trainers accept: `lightning.pytorch` and `pytorch_lightning`
    import lightning.pytorch as _lightning_pytorch
    from lightning.fabric.utilities.exceptions import (
        MisconfigurationException as _LightningMisconfigurationException,
    )

    CALLBACK_BASES: tuple[type, ...] = (pl.Callback, _lightning_pytorch.Callback)
    _MISCONFIGURATION_BASES: tuple[type, ...] = (
        MisconfigurationException,
        _LightningMisconfigurationException,
    )
except ImportError:  # pragma: no cover - `lightning` is optional
    CALLBACK_BASES = (pl.Callback,)
    _MISCONFIGURATION_BASES = (MisconfigurationException,)
finally:  # where the project's own import of Lightning (before the surgeon's) put it, if any
    _rank_zero.log = surgeon._lightning_log or _users_log


def log_in_trainers_namespace(trainer: pl.Trainer) -> logging.Logger:
    """Point Lightning's rank-zero console log at the namespace ``trainer`` is from, as in a
    project that imports only that namespace: the surgeon's import of the other (it accepts
    both) leaves Lightning's lines and its own where the project's logging config expects
    them. Returns where it pointed before, for the fit's end to put back."""
    before = _rank_zero.log
    lightning = type(trainer).__module__.startswith("lightning.pytorch")
    _rank_zero.log = logging.getLogger(
        f"{'lightning.pytorch' if lightning else 'pytorch_lightning'}.utilities.rank_zero"
    )
    return before


def steps_done(trainer: pl.Trainer) -> int:
    """The surgeon's steps in ``trainer.global_step`` (see :func:`per_batch_steps`)."""
    return math.ceil(trainer.global_step / per_batch_steps(trainer))


def set_console_log(logger: logging.Logger) -> None:
    """Point Lightning's rank-zero console log at ``logger`` (a fit's end puts back where its
    start found it)."""
    _rank_zero.log = logger


class SurgeonMisconfigurationException(*_MISCONFIGURATION_BASES, ValueError):  # type: ignore[misc]
    """The surgeon cannot run with this Trainer setup (raised before training; Lightning's
    ``MisconfigurationException`` of either namespace, and a ``ValueError``)."""

    __module__ = "surgeon.callback"  # its public home (re-exported there)


def is_a(obj: Any, class_name: str) -> bool:
    """Whether ``obj`` is a ``class_name`` of either Lightning namespace (by its class's MRO)."""
    return any(cls.__name__ == class_name for cls in type(obj).__mro__)


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


def time_limit(trainer: pl.Trainer) -> Any:
    """The ``Timer`` enforcing ``Trainer(max_time=...)`` (or one the user added), or ``None``."""
    return next(
        (
            cb
            for cb in trainer.callbacks  # type: ignore[attr-defined]
            if is_a(cb, "Timer") and getattr(cb, "_duration", None) is not None
        ),
        None,
    )


def grad_scaler(trainer: pl.Trainer) -> Any:
    """The precision plugin's enabled GradScaler, or ``None`` (its ``_scale`` tensor appears
    only at its first step, so look for the scaler, not the scale)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    is_enabled = getattr(scaler, "is_enabled", None)
    return scaler if callable(is_enabled) and is_enabled() else None


def optimizer_step_counter(trainer: pl.Trainer) -> Any:
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


def mean_across_ranks(trainer: pl.Trainer) -> Reduce | None:
    """The feed's ``reduce``: the mean over ranks in one all-reduce (``None`` on one process);
    through the strategy where it runs without ``torch.distributed``."""
    if trainer.world_size <= 1:
        return None
    if not (dist.is_available() and dist.is_initialized()):  # a strategy of its own kind
        return lambda block: trainer.strategy.reduce(block, reduce_op="mean")
    return distributed_mean()


def make_guard(
    trainer: pl.Trainer, mode: SkipNonfinite, scaled: bool, grad_check_every: int
) -> NonFiniteGuard:
    """The guard for this fit: off under a GradScaler (which skips non-finite steps itself);
    under DDP on the already-averaged gradients alone; elsewhere with a max across ranks."""
    if scaled or mode == "off":
        return NonFiniteGuard("off")
    if trainer.world_size <= 1:
        return NonFiniteGuard(mode, grad_check_every=grad_check_every)
    if is_a(trainer.strategy, "DDPStrategy"):
        return NonFiniteGuard(mode, check_losses=False)  # no collective needed (see guard)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"ScheduleSurgeon(skip_nonfinite={mode!r}) under {type(trainer.strategy).__name__} "
            "needs torch.distributed to agree on skipped steps; pass skip_nonfinite='off'"
        )
    return NonFiniteGuard(mode, distributed_max())


_DEFAULT_MAX_EPOCHS = 1000
"""Lightning's ``max_epochs`` when neither it, ``max_steps`` nor ``max_time`` is set."""


def planned_steps(trainer: pl.Trainer, total_steps: int | None, timed: bool) -> int | None:
    """``total_steps``, else what ends the fit first: ``max_steps`` or ``max_epochs``
    (Lightning's ``estimated_stepping_batches``, which counts optimizer steps); ``None``
    when only ``max_time`` bounds the fit (``timed``: planned from the step rate once
    measured)."""
    if trainer.limit_train_batches == 0:  # a fit that trains nothing (a validation run):
        return total_steps or OPEN_ENDED  # no step will ask for an LR: any length fits
    estimate = trainer.estimated_stepping_batches  # min(max_steps, epochs x steps/epoch)
    by_epochs = _steps_of_the_epochs(trainer)  # what Lightning's estimate does not know
    if by_epochs is not None:
        estimate = (
            by_epochs if trainer.max_steps in (None, -1) else min(by_epochs, trainer.max_steps)
        )
    if trainer.max_steps is not None and trainer.max_steps > 0:
        # under manual optimization `max_steps` counts every `opt.step()`, but the surgeon
        # steps once per batch: with k optimizers (each stepped once a batch) that is k calls
        estimate = min(estimate, math.ceil(trainer.max_steps / per_batch_steps(trainer)))
    finite = isinstance(estimate, int | float) and math.isfinite(estimate) and estimate >= 1
    # Lightning's default of 1000 epochs: a fit the user left open, e.g. to an EarlyStopping
    defaulted = trainer.max_steps == -1 and trainer.max_epochs == _DEFAULT_MAX_EPOCHS
    # the fit's length is a guess under manual optimization with optimizers that may take
    # turns (its planner follows the real count), and a fast_dev_run is no real fit
    guessed = per_batch_steps(trainer) > 1 or bool(getattr(trainer, "fast_dev_run", False))
    if total_steps is not None:
        if finite and estimate > total_steps and not defaulted:
            rank_zero_warn(
                f"ScheduleSurgeon(total_steps={total_steps}) plans fewer steps than this fit "
                f"runs ({int(estimate)}, from the Trainer's max_steps / max_epochs): the LR "
                f"stays at the floor after step {total_steps}; leave total_steps unset to plan "
                "the whole fit"
            )
        elif finite and estimate < total_steps and not (defaulted or guessed):
            rank_zero_warn(
                f"ScheduleSurgeon(total_steps={total_steps}) plans more steps than this fit "
                f"runs ({int(estimate)}, from the Trainer's max_steps / max_epochs): it ends "
                "before the decay does (a `stopped` event says at which LR); leave total_steps "
                "unset to plan the whole fit, unless a resumed fit goes on with the rest"
            )
        return total_steps
    if finite:
        if defaulted:
            rank_zero_warn(
                f"ScheduleSurgeon plans this fit for max_epochs={_DEFAULT_MAX_EPOCHS} "
                f"({int(estimate)} steps, a warmup of up to 10% of that), Lightning's default "
                "when neither max_steps nor max_epochs is set; if the fit is to end sooner (an "
                "EarlyStopping), set the length you expect, or total_steps (a stop then cools "
                "the LR down in time)"
            )
        return int(estimate)
    if timed:
        return None
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs > 0 and trainer.num_training_batches == math.inf:
        default = " (Lightning's default)" if max_epochs == _DEFAULT_MAX_EPOCHS else ""
        raise SurgeonMisconfigurationException(
            f"ScheduleSurgeon needs a finite planned length: max_epochs={max_epochs}{default} "
            "cannot give one, as the training dataloader has no length (an IterableDataset "
            "without __len__); pass total_steps=..., or set Trainer(max_steps=...) or max_time "
            f"(estimated_stepping_batches={estimate})"
        )
    raise SurgeonMisconfigurationException(
        "ScheduleSurgeon needs a finite planned length: pass total_steps=..., or set "
        f"Trainer(max_steps=...), max_epochs or max_time (estimated_stepping_batches="
        f"{estimate})"
    )


def _steps_of_the_epochs(trainer: pl.Trainer) -> int | None:
    """The optimizer steps ``max_epochs`` epochs make where Lightning's
    ``estimated_stepping_batches`` miscounts them (``None`` elsewhere): a
    ``GradientAccumulationScheduler`` changes the steps per epoch (Lightning counts every epoch
    at the first one's accumulation), and ``StochasticWeightAveraging`` on a model with
    BatchNorm adds an epoch to ``max_epochs`` at its fit start that makes no steps of its own
    (it recomputes the statistics) when it is listed before the surgeon."""
    epochs = trainer.max_epochs
    if epochs is None or epochs < 1:
        return None
    callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
    swa = next((c for c in callbacks if is_a(c, "StochasticWeightAveraging")), None)
    surgeon = next((i for i, c in enumerate(callbacks) if _is_surgeon(c)), len(callbacks))
    # SWA's own on_fit_start ran for this fit only when it comes first (else: a last fit's)
    if swa is not None and callbacks.index(swa) < surgeon and swa_added_epoch(trainer):
        return steps_of_epochs(trainer, 0, epochs - 1)
    if _accumulation_scheduler(trainer) is None:
        return None
    return steps_of_epochs(trainer, 0, epochs)


def averaging_listed_before(trainer: pl.Trainer, surgeon: Any) -> list[str]:
    """The weight-averaging callbacks listed before ``surgeon``: at a checkpoint and at the fit's
    end they put their average in place (in the checkpoint, in the model) before the surgeon
    reads the losses in flight, and a rollback it makes then puts the raw weights back over
    it."""
    callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
    mine = next(i for i, c in enumerate(callbacks) if c is surgeon)
    return [
        type(c).__name__
        for c in callbacks[:mine]
        if isinstance(getattr(c, "_average_model", None), nn.Module)
        or is_a(c, "StochasticWeightAveraging")
        or is_a(c, "WeightAveraging")
    ]


def swa_added_epoch(trainer: pl.Trainer) -> bool:
    """Whether ``max_epochs`` holds the epoch ``StochasticWeightAveraging`` adds to a BatchNorm
    model's fit (at its ``on_fit_start``, run by now) to recompute the statistics: it makes no
    optimizer step."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    swa = next((c for c in callbacks if is_a(c, "StochasticWeightAveraging")), None)
    swa_epochs = getattr(swa, "_max_epochs", None)
    return (
        isinstance(swa_epochs, int)
        and bool(getattr(swa, "_model_contains_batch_norm", False))
        and trainer.max_epochs == swa_epochs + 1
    )


def _accumulation_scheduler(trainer: pl.Trainer) -> Any:
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    return next((c for c in callbacks if type(c).__name__ == "GradientAccumulationScheduler"), None)


def steps_of_epochs(trainer: pl.Trainer, first: int, end: int) -> int | None:
    """The optimizer steps of epochs ``first`` to ``end - 1`` at the training loader's current
    length, each at its epoch's accumulation (a ``GradientAccumulationScheduler``'s, else the
    Trainer's); ``None`` without a finite length."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches < 1:
        return None
    scheduler = _accumulation_scheduler(trainer)
    if scheduler is None:
        return math.ceil(batches / trainer.accumulate_grad_batches) * max(0, end - first)
    per_epoch = scheduler.get_accumulate_grad_batches
    return sum(math.ceil(batches / per_epoch(epoch)) for epoch in range(first, end))


def _is_surgeon(callback: Any) -> bool:
    return any(k.__name__ == "ScheduleSurgeon" for k in type(callback).__mro__)


class AveragedWeights:
    """The averaged copies weight-averaging callbacks keep (Lightning's ``WeightAveraging``,
    ``EMAWeightAveraging``, ``StochasticWeightAveraging``), once made, as the engine's
    :class:`~surgeon.engine.MoreState`: a rollback puts them back with the weights (else the
    average keeps the undone steps' damage, and Lightning swaps it into the model at the fit's
    end: 48x a clean run's loss in a user trial)."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer

    def _averagers(self) -> list[tuple[Any, nn.Module]]:
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
        return [
            (callback, average)
            for callback in callbacks
            if isinstance(average := getattr(callback, "_average_model", None), nn.Module)
        ]

    def tensors(self) -> list[Tensor]:
        tensors: list[Tensor] = []
        for callback, average in self._averagers():
            tensors += [*average.parameters(), *average.buffers()]
            if is_a(callback, "StochasticWeightAveraging"):
                if getattr(callback, "n_averaged", None) is None:
                    # the count it makes when its averaging starts, made now (same value): a
                    # snapshot from before then holds it at 0 (see after_restore)
                    initial = int(getattr(callback, "_init_n_averaged", 0))
                    device = self.trainer.lightning_module.device
                    callback.n_averaged = torch.tensor(initial, dtype=torch.long, device=device)
                tensors.append(callback.n_averaged)
        return tensors

    @staticmethod
    def _count(callback: Any, average: nn.Module) -> int:
        """How many weights the average holds (SWA's count, else ``AveragedModel``'s)."""
        count = getattr(callback, "n_averaged", None)
        if not isinstance(count, Tensor):
            count = getattr(average, "n_averaged", None)
        return int(count.item()) if isinstance(count, Tensor) else -1

    def before_restore(self) -> list[int]:
        return [self._count(callback, average) for callback, average in self._averagers()]

    def after_restore(self, before: list[int]) -> None:
        """An average the rollback emptied (restored to before its first update: the copy the
        callback made at the fit's start, the untrained weights) starts again from the restored
        weights, as its first update does; else, with no update left before the fit ends (SWA
        updates at epoch starts), the callback would put the untrained weights in the model (a
        review: 3.8x a clean run's loss)."""
        module = self.trainer.lightning_module
        for (callback, average), was in zip(self._averagers(), before, strict=False):
            if was > 0 and self._count(callback, average) == 0:
                if is_a(callback, "StochasticWeightAveraging"):
                    count, average_fn = callback.n_averaged, callback._avg_fn
                    callback.update_parameters(average, module, count, average_fn)
                else:
                    average.update_parameters(module)  # type: ignore[operator]
                    # (its own update at this step would count the same weights twice)
                    callback._latest_update_step = self.trainer.global_step


def per_batch_steps(trainer: pl.Trainer) -> int:
    """Lightning's ``global_step`` per surgeon step: every ``opt.step()`` of a manual
    optimization's k optimizers (each stepped once a batch), else 1."""
    manual = not trainer.lightning_module.automatic_optimization
    return max(1, len(trainer.optimizers)) if manual else 1


def plan_source(trainer: pl.Trainer, total_steps: int | None, plan_cap: int | None) -> str:
    """Where the planned length came from, for messages."""
    if total_steps is not None:
        return f"total_steps={total_steps}"
    if plan_cap is None:
        return "provisional (only max_time bounds the fit)"
    return (
        f"what ends the fit first (max_steps={trainer.max_steps}, "
        f"max_epochs={trainer.max_epochs}); pass total_steps=... to plan another length"
    )


def manual_planner(
    engine: StepEngine, trainer: pl.Trainer, total_steps: int | None
) -> ManualStepPlanner | None:
    """Under manual optimization without ``total_steps``, where ``max_steps`` counts every
    ``opt.step()``: the planner that follows the steps per batch (with the batches
    ``max_epochs`` allows); else ``None``."""
    manual = not trainer.lightning_module.automatic_optimization
    if not manual or total_steps is not None or trainer.max_steps in (None, -1):
        return None
    batches, epochs = trainer.num_training_batches, trainer.max_epochs
    if epochs is None or epochs == -1 or not math.isfinite(batches):
        return ManualStepPlanner(engine, trainer.max_steps, math.inf)
    return ManualStepPlanner(engine, trainer.max_steps, batches * epochs)


def _peak_under_scheduler(scheduler: Any, group: dict[str, Any], index: int) -> float:
    """The LR a group had before ``scheduler`` took it over: ``OneCycleLR``'s ``max_lr`` and
    ``CyclicLR``'s ``max_lr`` (their peaks; both overwrite the configured LR), else the LR the
    optimizer was configured with (torch schedulers keep it as ``initial_lr``)."""
    max_lrs = getattr(scheduler, "max_lrs", None)  # CyclicLR
    if max_lrs is not None and "max_lr" not in group:
        return max_lrs[index]
    return configured_peak(group)  # OneCycleLR's max_lr, else the LR before the scheduler


def driven_optimizers(
    trainer: pl.Trainer, *, leave: bool, replace: bool, notice: Callable[[str], None]
) -> list[Optimizer]:
    """The optimizers whose LR the surgeon writes: all, but those left to their LR schedulers
    (``leave``); see :func:`_take_over_schedulers`."""
    scheduled = _take_over_schedulers(trainer, leave=leave, replace=replace, notice=notice)
    driven = [opt for opt in trainer.optimizers if id(opt) not in scheduled]
    if not driven:
        raise SurgeonMisconfigurationException(
            "ScheduleSurgeon has no optimizer to drive: all have LR schedulers and "
            "leave_scheduled_optimizers=True leaves them to those; pass "
            "leave_scheduled_optimizers=False to take them over"
        )
    return driven


def _take_over_schedulers(
    trainer: pl.Trainer, *, leave: bool, replace: bool, notice: Callable[[str], None]
) -> set[int]:
    """The ids of the optimizers left to their LR schedulers (``leave``). The others'
    schedulers are dropped from the Trainer (each group's LR set to the peak the scheduler had
    taken over; ``notice`` says so), or refused (``replace=False``)."""
    configs = trainer.lr_scheduler_configs
    if not configs:
        return set()
    if leave:
        return {id(c.scheduler.optimizer) for c in configs}
    names = ", ".join(type(c.scheduler).__name__ for c in configs)
    fix = (
        "return only the optimizer(s) from configure_optimizers, or pass "
        "ScheduleSurgeon(leave_scheduled_optimizers=True) to leave the optimizers that "
        "have a scheduler to it"
    )
    if not replace:
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
            write_lr(group, peak)
        shown = ", ".join(f"{peak:.4g}" for peak in peaks)
        owner = type(optimizer).__name__
        dropped.append(f"{type(scheduler).__name__} (of {owner}, peak LR {shown})")
    configs.clear()  # the strategy's own list: Lightning neither steps nor saves them now
    notice(
        f"replacing the LR scheduler(s) configure_optimizers returned: {'; '.join(dropped)}. "
        "The surgeon sets the learning rate from here; pass replace_lr_schedulers=False "
        "to refuse to start instead"
    )
    return set()
