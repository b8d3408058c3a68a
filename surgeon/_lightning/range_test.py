"""``peak_lr="find"``: Lightning's LR range test, read step by step, and the peak it suggests.

Lightning's LR finder runs the test (and restores the model, optimizers and callbacks after
it); the loss of each of its steps is read here as its own ``_LRCallback`` reads it, and
:func:`surgeon.lr_find.suggest_lr` picks the peak from the curve.
"""

import importlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from surgeon.controller import Event, EventKind
from surgeon.engine import PEAK_LR_KEY, StepEngine, check_lr
from surgeon.lr_find import MIN_DROP, MIN_POINTS, suggest_lr
from surgeon.recorder import LR_FIND_FILE

FAR_FROM_CONFIGURED = 30.0
"""A range-test suggestion this many times above or below the configured LR is warned about."""

Curve = list[tuple[float, float]]
"""``(lr, loss)`` per step of a range test."""


def _lr_find(trainer: pl.Trainer) -> Any:
    """Lightning's ``_lr_find`` from the Trainer's own namespace (looked up at call time)."""
    package = (
        "lightning.pytorch"
        if type(trainer).__module__.startswith("lightning.pytorch")
        else "pytorch_lightning"
    )
    return importlib.import_module(f"{package}.tuner.lr_finder")._lr_find


@contextmanager
def range_test_losses(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[list[float]]:
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

    pl_module.on_train_batch_end = record  # type: ignore[method-assign]
    try:
        yield losses
    finally:
        if own is None:
            del pl_module.on_train_batch_end  # the class's hook again
        else:
            pl_module.on_train_batch_end = own  # type: ignore[method-assign]


def find_peak_lr(
    engine: StepEngine, trainer: pl.Trainer, pl_module: pl.LightningModule
) -> Curve | None:
    """Run Lightning's LR range test and :func:`surgeon.lr_find.suggest_lr` on its losses;
    set each group's peak to ``suggestion x`` its ratio to the first group; record a
    ``peak_lr`` event (to ``engine.on_event``). Returns the ``(lr, loss)`` curve (``None``: no
    test was run). The finder restores the callbacks' state from a checkpoint it took first:
    the caller's own (fresh) state among them, which is not a resume.

    Skipped, with a warning, when the fit is planned for fewer steps than ``find_steps``: a
    test longer than the fit costs more than the fit, and suggests an LR for more steps."""
    controller, cfg = engine.controller, engine.config
    assert controller is not None
    if len(trainer.optimizers) != 1:
        raise ValueError(
            "ScheduleSurgeon(peak_lr='find') needs exactly one optimizer (Lightning's LR "
            f"finder drives one), got {len(trainer.optimizers)}: pass peak_lr='optimizer' "
            "and set each optimizer's LR"
        )
    total = controller.total_steps
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
    with range_test_losses(trainer, pl_module) as losses:
        finder = _lr_find(trainer)(
            trainer,
            pl_module,
            min_lr=cfg.find_min_lr,
            max_lr=cfg.find_max_lr,
            num_training=cfg.find_steps,
        )
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
    finite = [loss for loss in losses if math.isfinite(loss)]
    if found is None and finite and min(finite) <= 0:
        rank_zero_warn(
            "ScheduleSurgeon(peak_lr='find'): the LR range test needs a positive loss, and this "
            f"one reached {min(finite):.4g} ({tested}): the suggestion is read on the log of the "
            "loss, and Lightning's finder stops once a loss exceeds 4x its best, which a best "
            "<= 0 makes at once. Keeping the optimizer's configured LRs; set the peak LR in the "
            "optimizer with peak_lr='optimizer' (the default), or shift the loss above 0 for "
            "the test."
        )
        return curve
    if found is None:
        rank_zero_warn(
            "ScheduleSurgeon(peak_lr='find'): the LR range test gave no suggestion (its loss "
            f"neither fell by {MIN_DROP:.0%} nor diverged, had fewer than {MIN_POINTS} finite "
            f"values; {tested}); keeping the optimizer's configured LRs. Widen "
            "find_min_lr..find_max_lr or raise find_steps."
        )
        return curve
    suggestion = found.lr
    if found.at_end:
        rank_zero_warn(
            f"ScheduleSurgeon(peak_lr='find'): the loss was still falling at the end of the LR "
            f"range test ({tested}), so the suggestion {suggestion:.3g} may be low; raise "
            "find_max_lr to find where the loss turns up"
        )
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
        group[PEAK_LR_KEY] = suggestion * float(lr) / first
    defaults = getattr(optimizer, "defaults", None)
    if isinstance(defaults, dict) and isinstance(defaults.get("lr"), (float, int, Tensor)):
        # a group added later without an LR of its own peaks at the found LR too (the
        # optimizer's default is a group's peak: see StepEngine.adopt_new_param_groups)
        defaults["lr"] = defaults["lr"] * (suggestion / first)  # (a tensor stays one)
    why = (
        f"LR range test suggests peak LR {suggestion:.4g} (first param group; others keep "
        f"their configured ratios, first was {first:.4g}): {found.reason}; {tested}"
    )
    # the scale is untouched (only the peak changed): both sides are the next step's
    controller = engine.controller  # (as restored after the test)
    assert controller is not None
    scale = controller.lr_scale(1)
    event = Event(0, EventKind.PEAK_LR, why, scale, scale, controller.phase)
    controller.events.append(event)
    engine.on_event(event)  # logged now; events.jsonl is written once training starts
    return curve
