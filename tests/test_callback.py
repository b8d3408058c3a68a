"""``ScheduleSurgeon`` inside real ``Trainer.fit`` runs (CPU, the tiny MLP of ``conftest``).

The reference for every LR check is a fresh :class:`Controller` fed the losses that
``training_step`` returned, with the lag :mod:`surgeon.loss_feed` documents: the LR of
step ``t`` is written when the losses of the first ``(t // R - 1) * R`` steps (``R`` =
``readback_every``) have been handed to the controller (:func:`fed_before`).
"""

import csv
import dataclasses
import importlib
import inspect
import itertools
import json
import logging
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning
import torch
from conftest import IN_FEATURES, TinyRegressor, make_loader, regressor_class, spike_at
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from surgeon.callback import ScheduleSurgeon
from surgeon.config import SurgeonConfig
from surgeon.controller import Controller, EventKind, Phase
from surgeon.replay import read_stream

R = 4
"""The default ``readback_every``."""
PEAK = 0.05
"""The tiny model's default (single-group) LR."""


def fed_before(step: int, readback_every: int = R) -> int:
    """How many losses the controller has been given when the LR of ``step`` is written."""
    return max(0, step // readback_every - 1) * readback_every


def replay_scales(
    losses: list[float], total_steps: int, config: SurgeonConfig, readback_every: int = R
) -> list[float]:
    """``lr_scale`` per step from a fresh controller fed ``losses`` with the callback's lag."""
    controller = Controller(total_steps, config)
    scales = []
    for step in range(len(losses)):
        while controller.step < fed_before(step, readback_every):
            controller.update(losses[controller.step])
        scales.append(controller.lr_scale(step))
    return scales


def first_lrs(model: Any) -> list[float]:
    """The LR of the first param group of the first optimizer, per ``training_step``."""
    return [r["lrs"][0][0] for r in model.records]


def losses_of(model: Any) -> list[float]:
    return [r["loss"] for r in model.records]


# ---------------------------------------------------------------------------- LR written


def test_lr_in_training_step_is_peak_times_controller_scale(make_trainer: Any) -> None:
    steps, ramp = 100, 10
    cb = ScheduleSurgeon(warmup=ramp, decay="cosine", min_lr_ratio=0.1)
    scales_seen: list[float] = []
    phases_seen: list[str] = []

    def hook(step: int, batch_idx: int, loss: Tensor) -> Tensor:
        assert cb.controller is not None
        scales_seen.append(cb.controller.lr_scale(step))
        phases_seen.append(cb.phase.value)
        return loss

    model = TinyRegressor(loss_hook=hook)
    make_trainer([cb], max_steps=steps).fit(model, make_loader())

    lrs = first_lrs(model)
    assert [r["step"] for r in model.records] == list(range(steps))
    # the LR training_step sees is the one the callback wrote for this step
    assert lrs == [PEAK * s for s in scales_seen]
    # ... and the one a fresh controller fed the same losses with the same lag computes
    assert cb.controller is not None
    replay = replay_scales(losses_of(model), steps, cb.config)
    assert lrs == [PEAK * s for s in replay]

    # shape: ramp peak*(t+1)/(ramp+1), reaches the peak, never rises after warmup (no spikes
    # here, only cuts), ends at the floor
    assert not [e for e in cb.events if e.kind in (EventKind.SPIKE, EventKind.RECOVERED)]
    for t in range(ramp):
        assert math.isclose(lrs[t], PEAK * (t + 1) / (ramp + 1), rel_tol=1e-12)
    assert lrs[ramp] == PEAK == max(lrs)
    warmup_end = cb.events[0]
    assert warmup_end.kind is EventKind.WARMUP_END
    assert lrs[: ramp + 1] == sorted(lrs[: ramp + 1])
    after = lrs[warmup_end.step + 1 :]
    assert after == sorted(after, reverse=True)
    assert lrs[-1] < 0.2 * PEAK
    assert math.isclose(lrs[-1], cb.config.min_lr_ratio * PEAK, rel_tol=0.01)
    assert cb.controller.lr_scale(steps) == cb.config.min_lr_ratio

    # phase as the run saw it: warmup first, decay after, never back
    assert phases_seen[0] == "warmup" and "decay" in phases_seen
    assert phases_seen == sorted(phases_seen, key=["warmup", "decay", "done"].index)
    assert cb.phase.value in ("decay", "done")
    assert isinstance(warmup_end.step, int)
    assert cb.events[0].kind.value == "warmup_end"


def test_phase_before_fit_is_warmup_and_events_empty() -> None:
    cb = ScheduleSurgeon()
    assert cb.phase is Phase.WARMUP
    assert cb.events == []


def test_resuming_after_a_param_group_was_added_mid_fit(make_trainer: Any, tmp_path: Path) -> None:
    """Lightning restores the added group (BackboneFinetuning's) after ``on_fit_start``: the
    resumed run logs and drives both groups, with the ratio of the first run."""
    from pytorch_lightning.callbacks import BackboneFinetuning

    def callbacks() -> list[Any]:  # the surgeon first: its on_fit_start runs before the restore
        return [ScheduleSurgeon(total_steps=40), BackboneFinetuning(1, verbose=False)]

    ckpt = ModelCheckpoint(tmp_path / "ck", save_last=True)
    first = make_trainer([*callbacks(), ckpt], max_epochs=2, enable_checkpointing=True)
    first.fit(WithBackbone(), make_loader())  # 10 steps an epoch, the group added at epoch 1
    model = WithBackbone()
    resumed = make_trainer(callbacks(), max_epochs=4, logger=CSVLogger(tmp_path))
    resumed.fit(model, make_loader(), ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert [r["step"] for r in model.records] == list(range(20, 40))
    assert all(len(r["lrs"][0]) == 2 for r in model.records)
    assert all(
        math.isclose(r["lrs"][0][1] / r["lrs"][0][0], 0.1, rel_tol=1e-9) for r in model.records
    )
    with (Path(resumed.log_dir) / "metrics.csv").open() as f:
        assert {"lr-SGD/pg1", "lr-SGD/pg2"} <= set(next(csv.DictReader(f)))


@pytest.mark.parametrize("accumulate, batch_size", [(1, 16), (2, 16), (1, 32), (1, 8)])
def test_a_resumed_epoch_fit_plans_its_epochs_left_at_its_own_length(
    make_trainer: Any, tmp_path: Path, accumulate: int, batch_size: int
) -> None:
    """A 4-epoch fit of 10 steps an epoch, resumed after epoch 1 (step 20) with another batch
    size or accumulation: the two epochs left make 10, 5 or 20 steps each, and the plan ends
    where the fit does, at the floor (a user trial: Lightning's estimate counts the epochs done
    at the new length too, so accumulating 2 planned 20 steps for a fit of 30: every resumed
    step at LR 0; batch size 8 planned 80 for 60, never annealing). Unchanged: no replan."""
    ckpt = ModelCheckpoint(tmp_path / "ck", "{epoch}", save_top_k=-1)
    first = make_trainer([ScheduleSurgeon(), ckpt], max_epochs=4, enable_checkpointing=True)
    first.fit(TinyRegressor(), make_loader(batches=10, batch_size=16))
    surgeon, model = ScheduleSurgeon(), TinyRegressor()
    resumed = make_trainer([surgeon], max_epochs=4, accumulate_grad_batches=accumulate)
    loader = make_loader(batches=160 // batch_size, batch_size=batch_size)
    resumed.fit(model, loader, ckpt_path=tmp_path / "ck" / "epoch=1.ckpt")
    ends = 20 + 2 * (160 // batch_size) // accumulate
    assert resumed.global_step == ends
    assert surgeon.controller is not None and surgeon.controller.total_steps == ends
    assert model.records[-1]["lrs"][0][0] <= 0.2 * 0.05 < model.records[0]["lrs"][0][0]  # decayed
    replans = [e for e in surgeon.events if e.kind is EventKind.REPLAN]
    if (accumulate, batch_size) == (1, 16):
        assert not replans
    else:
        (replan,) = replans
        assert replan.step == 20 and f"make {ends - 20} steps" in replan.reason


@pytest.mark.parametrize("batch_idx", [0, 91, 97, 98, 99])
def test_the_steps_left_of_a_resumed_epoch_follow_the_accumulation_boundaries(
    batch_idx: int,
) -> None:
    """100 batches accumulating 7 (a step at every 7th batch and at the last), resumed at
    ``batch_idx`` of the last epoch, e.g. between micro-batches (a ``train_time_interval``
    checkpoint): the plan ends at the last step Lightning makes (a review: an average
    accumulation counted one step short at batch 97)."""
    from types import SimpleNamespace

    from surgeon._lightning.budget import FitBudget

    ends: list[int] = []
    engine = SimpleNamespace(
        controller=SimpleNamespace(total_steps=500),
        step=200,
        replan=lambda total, why: ends.append(total),
    )
    budget = FitBudget.__new__(FitBudget)
    budget.engine, budget._count_epochs_left = engine, (500, False)  # type: ignore[assignment]
    trainer = SimpleNamespace(
        max_epochs=3,
        current_epoch=2,
        num_training_batches=100,
        accumulate_grad_batches=7,
        callbacks=[],
        max_steps=-1,
        global_step=200,
    )
    budget.count_the_epochs_left(trainer, batch_idx)  # type: ignore[arg-type]
    left = sum(1 for i in range(batch_idx, 100) if (i + 1) % 7 == 0 or i == 99)
    assert ends == [200 + left]


def test_a_resumed_swa_batchnorm_fit_does_not_plan_swas_statistics_epoch(
    make_trainer: Any, tmp_path: Path
) -> None:
    """``StochasticWeightAveraging`` adds an epoch to a BatchNorm model's ``max_epochs`` that makes
    no step: a fit resumed unchanged keeps the plan of 80 steps and ends at the floor (a review:
    the count at its first batch took that epoch for 16 more steps, the LR ended at 0.34)."""
    from pytorch_lightning.callbacks import StochasticWeightAveraging

    def model() -> Any:
        regressor = TinyRegressor()
        regressor.net = nn.Sequential(
            nn.Linear(IN_FEATURES, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)
        )
        return regressor

    def callbacks(surgeon: ScheduleSurgeon) -> list[Any]:
        return [StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=3), surgeon]

    ckpt = ModelCheckpoint(tmp_path / "ck", "{epoch}", save_top_k=-1)
    first = ScheduleSurgeon(warmup=4)
    trainer = make_trainer([*callbacks(first), ckpt], max_epochs=5, enable_checkpointing=True)
    trainer.fit(model(), make_loader(batches=16))
    resumed = ScheduleSurgeon(warmup=4)
    fitted = model()
    trainer = make_trainer(callbacks(resumed), max_epochs=5)
    trainer.fit(fitted, make_loader(batches=16), ckpt_path=tmp_path / "ck" / "epoch=1.ckpt")
    assert first.controller is not None and resumed.controller is not None
    assert resumed.controller.total_steps == first.controller.total_steps == 80
    assert EventKind.REPLAN not in [e.kind for e in resumed.events]
    assert fitted.records[-1]["lrs"][0][0] < 0.1 * 0.05


class ImprovingAfterACooldown(TinyRegressor):  # type: ignore[misc, valid-type]
    """Logs a scripted ``val_loss`` per epoch: with ``EarlyStopping(patience=3)`` epochs 3-4 make
    the surgeon cool down over epoch 5, whose check improves."""

    SCRIPT = (3.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", torch.tensor(self.SCRIPT[self.current_epoch]))


@pytest.mark.parametrize("resumed_after", [1, 4, 5])
def test_a_rewarm_after_a_resume_of_another_length_plans_to_the_fits_end(
    make_trainer: Any, tmp_path: Path, resumed_after: int
) -> None:
    """Resumed at half the batch size after epoch 1 (the 8 epochs left make 160 steps, the fit
    ends at 180), after epoch 4 (the checkpoint holds the cooldown) or after epoch 5 (its check,
    which improved, not acted on yet): an EarlyStopping cooldown whose check improves ramps
    back and plans to the fit's end, where the LR reaches the floor (two reviews: the rewarm
    planned to Lightning's estimate, 200, and the fit ended at LR scale 0.5-0.94)."""
    from pytorch_lightning.callbacks import EarlyStopping

    def fit(batch_size: int, ckpt: Path | None, extra: list[Any]) -> tuple[Any, Any, Any]:
        surgeon = ScheduleSurgeon(min_warmup=4, max_warmup=8, plateau_patience=1.0)
        early = EarlyStopping(monitor="val_loss", patience=3)
        trainer = make_trainer(
            [surgeon, early, *extra], max_epochs=10, enable_checkpointing=bool(extra)
        )
        model = ImprovingAfterACooldown()
        loader = make_loader(batches=160 // batch_size, batch_size=batch_size)
        trainer.fit(model, loader, make_loader(batches=2), ckpt_path=ckpt)
        return surgeon, trainer, model

    fit(16, None, [ModelCheckpoint(tmp_path / "ck", "{epoch}", save_top_k=-1)])
    surgeon, trainer, model = fit(8, tmp_path / "ck" / f"epoch={resumed_after}.ckpt", [])
    rewarms = [e for e in surgeon.events if "its check improved" in e.reason]
    assert len(rewarms) == 1 and rewarms[0].kind is EventKind.REPLAN
    assert surgeon.controller is not None
    assert surgeon.controller.total_steps == trainer.global_step
    assert trainer.global_step == (
        180 if resumed_after == 1 else 150 if resumed_after == 4 else 140
    )
    assert model.records[-1]["lrs"][0][0] < 0.1 * 0.05


def test_a_cool_down_now_after_an_early_stopping_rewarm_is_kept(make_trainer: Any) -> None:
    """An EarlyStopping cooldown whose check improves ramps back (epoch 5); the user then calls
    ``cool_down_now`` at epoch 7: the plan ends there, at the floor, and the next improving
    check leaves it so (a review: any EarlyStopping cooldown in the events made the next end of
    the plan count as one, and the rewarm undid the user's cooldown)."""
    from pytorch_lightning.callbacks import EarlyStopping

    class EndAtEpoch7(pytorch_lightning.Callback):  # type: ignore[misc]
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 7:
                surgeon.cool_down_now(steps=9)

    surgeon = ScheduleSurgeon(min_warmup=4, max_warmup=8, plateau_patience=1.0)
    early = EarlyStopping(monitor="val_loss", patience=3)
    trainer = make_trainer([surgeon, early, EndAtEpoch7()], max_epochs=10)
    model = ImprovingAfterACooldown()
    trainer.fit(model, make_loader(), make_loader(batches=2))
    assert [e.kind for e in surgeon.events if "its check improved" in e.reason] == [
        EventKind.REPLAN
    ]
    lrs = {r["step"]: r["lrs"][0][0] for r in model.records}
    assert lrs[70] > 0 and max(lrs[step] for step in range(79, 100)) == 0.0


def test_two_param_groups_keep_their_ratio(make_trainer: Any) -> None:
    cb = ScheduleSurgeon(min_warmup=8, max_warmup=16, decay="cosine")
    model = TinyRegressor((1e-3, 1e-4))
    make_trainer([cb], max_steps=60).fit(model, make_loader())

    groups = [r["lrs"][0] for r in model.records]
    assert len(groups) == 60
    assert all(len(g) == 2 for g in groups)
    assert groups[0][0] < 1e-3 and groups[0][1] < 1e-4  # the surgeon did write them
    assert len({lr0 for lr0, _ in groups}) > 20  # ... and kept changing them
    for lr0, lr1 in groups:
        assert math.isclose(lr0 / lr1, 10.0, rel_tol=1e-12)
    # the configured LR stays as each group's peak, saved with the optimizer
    opt = model.trainer.optimizers[0]
    assert [g["surgeon_peak_lr"] for g in opt.param_groups] == [1e-3, 1e-4]


# ---------------------------------------------------------------------------- accumulation


class WithBackbone(TinyRegressor):  # type: ignore[misc, valid-type]
    """The first layer is a ``backbone`` for ``BackboneFinetuning``, which freezes it first:
    the optimizer starts with the head alone."""

    @property
    def backbone(self) -> torch.nn.Module:
        return self.net[0]

    def configure_optimizers(self) -> Any:
        head = [p for p in self.net.parameters() if p.requires_grad]  # backbone frozen
        return torch.optim.SGD(head, lr=0.05, momentum=0.9)


def test_a_param_group_added_mid_fit_is_driven_from_its_own_lr(make_trainer: Any) -> None:
    """Lightning's ``BackboneFinetuning`` adds the unfrozen backbone as a new param group at
    epoch 1 with 0.1 x the head's LR of the moment; the surgeon keeps that LR and drives the
    group with the same scale as the head from then on, so the 0.1 ratio holds (and its LR is
    logged under a metric name of its own). Its later per-epoch raises of the backbone's LR
    (``lambda_func``) are overwritten, and said once: the surgeon owns every LR."""
    from pytorch_lightning.callbacks import BackboneFinetuning

    cb = ScheduleSurgeon(warmup=8, decay="cosine")
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False)
    model = WithBackbone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([finetuning, cb], max_steps=40).fit(model, make_loader())  # 10 steps/epoch
    said = [str(w.message) for w in caught if "something else writes LRs" in str(w.message)]
    assert len(said) == 1  # at epoch 2's start, once per run (epoch 3's is not said again)
    assert said[0].startswith(
        "ScheduleSurgeon: the LR of param group 1 of SGD was changed to "
    ) and re.search(r"after the surgeon wrote [0-9.e-]+ for step 19: ", said[0])

    groups = [r["lrs"][0] for r in model.records]
    assert [len(g) for g in groups] == [1] * 10 + [2] * 30
    opt = model.trainer.optimizers[0]
    peak0, peak1 = (g["surgeon_peak_lr"] for g in opt.param_groups)
    assert peak0 == 0.05
    assert peak1 == pytest.approx(0.1 * peak0, rel=1e-12)
    for lr0, lr1 in groups[10:]:
        assert math.isclose(lr1 / lr0, 0.1, rel_tol=1e-9)  # BackboneFinetuning's ratio
    assert len({lr1 for _, lr1 in groups[10:]}) > 20  # ... and the surgeon kept moving it
    assert cb._lr_names == [["lr-SGD/pg1", "lr-SGD/pg2"]]


def losses_fed_to_the_controller(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The list every loss ``Controller.update`` is handed goes to, in order, from now on."""
    fed: list[float] = []
    update = Controller.update

    def spy(self: Controller, loss: float, **kwargs: Any) -> Any:
        fed.append(loss)
        return update(self, loss, **kwargs)

    monkeypatch.setattr(Controller, "update", spy)
    return fed


@pytest.mark.parametrize(
    ("scheduling", "made"), [({0: 1, 2: 4}, 2 * 16 + 4 * 4), ({0: 4, 3: 1}, 3 * 4 + 3 * 16)]
)
def test_a_gradient_accumulation_scheduler_is_planned_and_fed_by_epoch(
    make_trainer: Any, monkeypatch: pytest.MonkeyPatch, scheduling: dict[int, int], made: int
) -> None:
    """``GradientAccumulationScheduler`` changes ``accumulate_grad_batches`` at epoch starts:
    the plan counts each epoch's optimizer steps at its own accumulation (Lightning's estimate
    counts them all at the first epoch's: 96 planned for 48 made, the LR never decaying to
    the floor, or 24 for 60, the rest at LR 0), and each step's loss is the mean of its
    micro-batches at the accumulation of its epoch (before, 4x off after a change: false
    outliers and climbs)."""
    from pytorch_lightning.callbacks import GradientAccumulationScheduler

    fed = losses_fed_to_the_controller(monkeypatch)

    def constant_loss(step: int, batch_idx: int, loss: Tensor) -> Tensor:
        return loss - loss.detach() + 10.0  # every micro-batch 10.0, with real gradients

    cb = ScheduleSurgeon(warmup=4)
    model = TinyRegressor(loss_hook=constant_loss)
    trainer = make_trainer(
        [GradientAccumulationScheduler(scheduling), cb], max_epochs=6
    )  # 16 batches an epoch
    trainer.fit(model, make_loader(batches=16))
    assert trainer.global_step == made
    assert cb.controller is not None and cb.controller.total_steps == made
    assert [e.kind for e in cb.events][-1] is EventKind.DONE  # the floor reached, no stop
    assert fed == pytest.approx([10.0] * made)


def test_stochastic_weight_averagings_batchnorm_epoch_is_not_planned(make_trainer: Any) -> None:
    """``StochasticWeightAveraging`` on a model with BatchNorm adds an epoch to ``max_epochs``
    at its fit start (it recomputes the statistics, one step); listed before the surgeon it
    did so before the surgeon planned: 112 steps for a fit of 97, the decay ending at 0.2 of
    the peak. Either order now plans the epochs' steps and reaches the floor, also with an
    SWA instance that ran a fit before (listed after the surgeon, it holds that fit's
    ``max_epochs`` when the surgeon plans)."""
    from pytorch_lightning.callbacks import StochasticWeightAveraging

    planned = []
    reused = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=3)
    for swa_first, swa, epochs in ((True, reused, 5), (False, None, 6), (False, reused, 6)):
        cb = ScheduleSurgeon(warmup=4)
        swa = swa or StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=3)
        model = TinyRegressor()
        model.net = torch.nn.Sequential(
            torch.nn.Linear(model.net[0].in_features, 8),
            torch.nn.BatchNorm1d(8),
            torch.nn.Tanh(),
            torch.nn.Linear(8, 1),
        )
        callbacks = [swa, cb] if swa_first else [cb, swa]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(callbacks, max_epochs=epochs).fit(model, make_loader(batches=16))
        assert cb.controller is not None
        planned.append(cb.controller.total_steps)
        assert EventKind.DONE in [e.kind for e in cb.events]
    assert planned == [80, 96, 96]  # (the last one planned 80: the 5 of its first fit)


@pytest.mark.parametrize(("minimum", "end"), [({"min_epochs": 15}, 120), ({"min_steps": 117}, 117)])
def test_an_early_stop_lightning_refuses_is_cooled_down_to_where_it_ends_the_fit(
    make_trainer: Any, minimum: dict[str, int], end: int
) -> None:
    """``EarlyStopping`` stops the fit before ``Trainer(min_epochs=...)`` / ``min_steps`` are
    met: Lightning refuses, runs on until they are, then ends the fit (at the end of the
    epoch that meets ``min_epochs``, at the step that meets ``min_steps``, whatever the checks
    say). The surgeon does not cool down for the refused stop (before: to LR 0 at epoch 3, and
    the rest of the fit, ~90 steps, at LR 0), and decays to the floor by that end instead:
    the last step at the floor, the only one."""
    from pytorch_lightning.callbacks import EarlyStopping

    class Flat(TinyRegressor):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", 1.0)  # never improves

    cb = ScheduleSurgeon(warmup=4)
    model = Flat()
    trainer = make_trainer([cb, EarlyStopping("val_loss", patience=3)], max_epochs=40, **minimum)
    trainer.fit(model, make_loader(batches=8), make_loader(batches=2, seed=1))
    assert trainer.global_step == end
    lrs = [r["lrs"][0][0] for r in model.records]
    assert lrs.count(0.0) == 1 and lrs[-1] == 0.0  # the floor on the fit's last step
    (cooldown,) = [e for e in cb.events if e.kind is EventKind.COOLDOWN]
    (name,) = minimum
    assert f"stopped the fit, and Lightning runs it on until {name}=" in cooldown.reason
    assert cooldown.step < 40  # at the refused stop, not one check before the end
    decay = lrs[cooldown.step + 1 :]
    assert all(b < a for a, b in itertools.pairwise(decay))  # one linear decay


@pytest.mark.parametrize("growth", [8, -4])
def test_a_reloaded_loader_of_another_length_moves_the_plans_end(
    make_trainer: Any, growth: int
) -> None:
    """``reload_dataloaders_every_n_epochs=1`` with a loader that grows (or shrinks) each
    epoch: the plan, from the first epoch's length x ``max_epochs``, is re-planned at each
    epoch's first batch over the epochs left at the new length (a ``replan`` event), so the
    decay ends with the fit, no step at LR 0 (before: a growing loader left half the fit at
    LR 0, a shrinking one never decayed to the floor)."""

    class Growing(TinyRegressor):
        def train_dataloader(self) -> Any:
            return make_loader(batches=16 + growth * self.trainer.current_epoch)

    cb = ScheduleSurgeon(warmup=4)
    model = Growing()
    trainer = make_trainer([cb], max_epochs=3, reload_dataloaders_every_n_epochs=1)
    trainer.fit(model)
    made = sum(16 + growth * epoch for epoch in range(3))
    assert trainer.global_step == made
    assert cb.controller is not None and cb.controller.total_steps == made
    replans = [e for e in cb.events if e.kind is EventKind.REPLAN]
    assert [e.step for e in replans] == [16, 32 + growth]
    assert "the training loader was reloaded with" in replans[0].reason
    lrs = [r["lrs"][0][0] for r in model.records]
    assert 0.0 not in lrs and lrs[-1] == min(lrs) <= 0.1 * max(lrs)  # ends at the floor's door
    assert [e.kind for e in cb.events][-1] is EventKind.DONE


@pytest.mark.parametrize("settings", [{}, {"warmup": 50}, {"min_warmup": 20, "max_warmup": 100}])
def test_a_fit_with_no_training_batches_runs_without_a_plan(
    make_trainer: Any, settings: dict[str, int]
) -> None:
    """``limit_train_batches=0`` (a validation-only smoke run) trains nothing: the surgeon makes
    no decision and no error, whatever lengths in steps it is given (before: a
    ``MisconfigurationException`` about a dataloader without length)."""
    cb = ScheduleSurgeon(**settings)
    trainer = make_trainer([cb], max_epochs=2, limit_train_batches=0)
    trainer.fit(TinyRegressor(), make_loader(), make_loader(batches=2, seed=1))
    assert trainer.global_step == 0 and cb.events == []


def test_gradient_accumulation_counts_optimizer_steps_and_feeds_the_mean(
    make_trainer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps, accumulate = 24, 4
    fed = losses_fed_to_the_controller(monkeypatch)
    values = range(1, steps * accumulate + 1)  # the loss each micro-batch returns, in order
    micro = iter(values)

    def known_loss(step: int, batch_idx: int, loss: Tensor) -> Tensor:
        return loss - loss.detach() + float(next(micro))  # that value, with real gradients

    cb = ScheduleSurgeon(warmup=8)
    model = TinyRegressor(loss_hook=known_loss)
    trainer = make_trainer([cb], max_steps=steps, accumulate_grad_batches=accumulate)
    trainer.fit(model, make_loader(batches=12))

    assert trainer.global_step == steps
    assert cb.step == steps
    # steps were counted on Lightning's own counter object, not the fallback property chain
    assert cb._step_counter is not None and cb._step_counter.completed == steps
    assert len(model.records) == steps * accumulate
    assert cb.controller is not None and cb.controller.total_steps == steps
    # every step's loss reached the controller: the last ones when training ended
    assert cb.controller.step == len(fed) == steps
    # the loss of optimizer step s is the mean of its micro-batch losses
    expected = [
        sum(values[accumulate * s : accumulate * (s + 1)]) / accumulate for s in range(steps)
    ]
    assert fed == expected[: len(fed)]
    # one LR per optimizer step: the same for all its micro-batches, the ramp's between steps
    lrs = first_lrs(model)
    per_step = [lrs[i : i + accumulate] for i in range(0, len(lrs), accumulate)]
    assert all(len(set(same)) == 1 for same in per_step)
    ramp = [PEAK * (t + 1) / 9 for t in range(8)]
    assert [same[0] for same in per_step[:8]] == pytest.approx(ramp, rel=1e-12)


def test_a_checkpoint_between_micro_batches_keeps_the_steps_first_losses(
    make_trainer: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A checkpoint saved between two micro-batches of a step (``ModelCheckpoint`` with
    ``train_time_interval``, or its save of the resume step again after a resume's first
    micro-batch): the step's loss is still the mean of all its micro-batches (before: the
    micro-batches before the save were dropped, so a x100 micro-batch spike became an outlier
    and a resumed run's decisions differed from the uninterrupted one's)."""
    steps, accumulate = 12, 2
    fed = losses_fed_to_the_controller(monkeypatch)
    values = range(1, steps * accumulate + 1)
    micro = iter(values)

    def known_loss(step: int, batch_idx: int, loss: Tensor) -> Tensor:
        return loss - loss.detach() + float(next(micro))

    class SavesMidStep(pytorch_lightning.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.fit_loop.batch_idx % accumulate == 0:  # after a step's first micro-batch
                trainer.save_checkpoint(tmp_path / f"mid-{trainer.global_step}.ckpt")

    cb = ScheduleSurgeon(warmup=4)
    model = TinyRegressor(loss_hook=known_loss)
    make_trainer([cb, SavesMidStep()], max_steps=steps, accumulate_grad_batches=accumulate).fit(
        model, make_loader(batches=12)
    )
    assert len(list(tmp_path.glob("mid-*.ckpt"))) == steps
    expected = [
        sum(values[accumulate * s : accumulate * (s + 1)]) / accumulate for s in range(steps)
    ]
    assert fed == expected


# ---------------------------------------------------------------------------- manual optimization


def test_manual_optimization_two_optimizers(make_trainer: Any) -> None:
    """Works: each optimizer gets its own peak x the same scale, one surgeon step per batch, and
    the plan spans the batches (Lightning counts every ``opt.step()`` in ``max_steps``)."""
    batches = 24
    cb = ScheduleSurgeon(warmup=8, decay="cosine", min_lr_ratio=0.1)
    model = TinyRegressor((0.05, 0.01), manual=True)
    trainer = make_trainer([cb], max_steps=2 * batches)
    trainer.fit(model, make_loader())

    assert trainer.global_step == 2 * batches  # two optimizer steps per batch
    assert len(model.records) == batches
    assert cb.step == batches
    assert cb._step_counter is not None and cb._step_counter.completed == 2 * batches
    assert cb.controller is not None and cb.controller.total_steps == batches
    assert [r["step"] for r in model.records] == list(range(0, 2 * batches, 2))
    replay = replay_scales(losses_of(model), batches, cb.config)
    assert [r["lrs"][0][0] for r in model.records] == [0.05 * s for s in replay]
    assert [r["lrs"][1][0] for r in model.records] == [0.01 * s for s in replay]
    last0 = model.records[-1]["lrs"][0][0]  # the last step of a cosine to the floor 0.1
    assert 0.05 * 0.1 < last0 < 0.05 * 0.12


def test_manual_optimization_one_optimizer(make_trainer: Any) -> None:
    steps = 30
    cb = ScheduleSurgeon(min_warmup=5, max_warmup=10)
    model = TinyRegressor(manual=True)
    trainer = make_trainer([cb], max_steps=steps)
    trainer.fit(model, make_loader())

    assert trainer.global_step == cb.step == len(model.records) == steps
    assert cb.controller is not None and cb.controller.total_steps == steps
    replay = replay_scales(losses_of(model), steps, cb.config)
    assert first_lrs(model) == [PEAK * s for s in replay]
    # the automatic ramp starts at 1 / (max_warmup + 1) of the peak
    assert first_lrs(model)[0] == pytest.approx(PEAK / 11, rel=1e-12)


# ---------------------------------------------------------------------------- spike


def test_injected_spike_cuts_the_lr_after_the_readback_delay(make_trainer: Any) -> None:
    """Steps 99 and 100 x20: the loss of 100 confirms the spike of 99, and the cut is written
    once the block holding step 100 is read."""
    steps, k, factor = 160, 100, 20.0
    clean: dict[int, float] = {}

    def hook(step: int, batch_idx: int, loss: Tensor) -> Tensor:
        if step in (k - 1, k):
            clean[step] = loss.item()
            return loss * factor
        return loss

    # no plateau response in this run (patience = the whole run): the spike alone moves the LR
    cb = ScheduleSurgeon(
        warmup=20,
        spike_cooldown=8,
        spike_recovery=10,
        plateau_patience=1.0,
        decay="cosine",
        rollback_threshold=50.0,  # a cut, not a rollback (tests/test_rollback.py has those)
    )
    model = TinyRegressor(loss_hook=hook)
    trainer = make_trainer([cb], max_steps=steps)
    trainer.fit(model, make_loader())

    spikes = [e for e in cb.events if e.kind is EventKind.SPIKE]
    assert spikes, [(e.step, e.kind.value) for e in cb.events]
    assert abs(spikes[0].step - k) <= 2
    assert spikes[0].step == k
    assert spikes[0].scale_after == pytest.approx(spikes[0].scale_before * cb.config.spike_factor)
    assert "sigma above its running mean" in spikes[0].reason

    # the plan without the spike: the same losses with step k's loss un-spiked
    losses = losses_of(model)
    assert losses[k] == pytest.approx(factor * clean[k], rel=1e-6)
    unspiked = [*losses[: k - 1], clean[k - 1], clean[k], *losses[k + 1 :]]
    no_spike = replay_scales(unspiked, steps, cb.config)
    lrs = first_lrs(model)
    applied = (k // R + 2) * R  # first step whose LR is written after step k's loss was read
    assert lrs[:applied] == [PEAK * s for s in no_spike[:applied]]
    # from there the plan known before step k's loss, cut (the damaged weights' next losses
    # may be spikes of their own: the cut is extended, not deepened)
    plan = Controller(steps, cb.config)
    for loss in losses[:k]:
        plan.update(loss)
    for t in range(applied, applied + R):
        assert lrs[t] < PEAK * plan.lr_scale(t)
        assert lrs[t] == pytest.approx(PEAK * plan.lr_scale(t) * cb.config.spike_factor)
    assert trainer.global_step == steps
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------- resume


def test_resume_reproduces_the_uninterrupted_run_exactly(make_trainer: Any, tmp_path: Path) -> None:
    """Checkpoints mid-warmup (step 30, saved by run A itself) and mid-decay (step 90, saved by
    a run B stopped by ``max_steps=90``); both on epoch boundaries (10 batches per epoch), and
    both with a partial readback block (30 and 90 are not multiples of R).

    Both are ``ModelCheckpoint`` saves: ``trainer.save_checkpoint`` after a fit that ended at
    ``max_steps`` resumes one batch off in Lightning 2.6 (the restored epoch loop reports
    ``batch_idx == 10`` and the next epoch starts over), which shifts the data, not the LRs.
    """
    steps = 120
    surgeon_args = {"total_steps": steps, "min_warmup": 40, "max_warmup": 60}

    def every(n: int, dirpath: Path) -> ModelCheckpoint:
        return ModelCheckpoint(dirpath, "{step}", every_n_train_steps=n, save_top_k=-1)

    cb_a = ScheduleSurgeon(**surgeon_args)
    model_a = TinyRegressor()
    saving = {"enable_checkpointing": True}
    trainer_a = make_trainer([cb_a, every(30, tmp_path / "a")], max_steps=steps, **saving)
    trainer_a.fit(model_a, make_loader())
    assert cb_a.controller is not None and cb_a.phase is not Phase.WARMUP
    assert [e.kind for e in cb_a.events].count(EventKind.WARMUP_END) == 1
    assert 39 <= cb_a.events[0].step <= 59  # warmup_end: step 30 is before, 90 after

    cb_b = ScheduleSurgeon(**surgeon_args)
    model_b = TinyRegressor()
    trainer_b = make_trainer([cb_b, every(90, tmp_path / "b")], max_steps=90, **saving)
    trainer_b.fit(model_b, make_loader())
    assert first_lrs(model_b) == first_lrs(model_a)[:90]

    for start, ckpt in ((30, tmp_path / "a/step=30.ckpt"), (90, tmp_path / "b/step=90.ckpt")):
        cb = ScheduleSurgeon(**surgeon_args)
        model = TinyRegressor(seed=start)  # weights come from the checkpoint
        trainer = make_trainer([cb], max_steps=steps, default_root_dir=tmp_path / f"r{start}")
        trainer.fit(model, make_loader(), ckpt_path=ckpt)

        assert [r["step"] for r in model.records] == list(range(start, steps))
        assert losses_of(model) == losses_of(model_a)[start:]  # same data and weights
        assert first_lrs(model) == first_lrs(model_a)[start:]
        assert cb.events == cb_a.events
        # the resumed run's events.jsonl holds the restored events and the new ones, once each
        lines = (cb.log_dirs[0] / "events.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [e.step for e in cb_a.events]
        assert cb.step == cb_a.step == steps
        assert cb.state_dict() == cb_a.state_dict()


def test_resume_with_a_longer_run_replans_the_rest_from_where_it_is(
    make_trainer: Any, tmp_path: Path
) -> None:
    """A run planned for 60 steps, resumed from its step-30 checkpoint with ``max_steps=120``:
    a ``replan`` event, the LR carries on from the checkpoint's (no jump), and the decay now
    ends at step 120 (no plateau cuts: ``plateau_patience`` is the whole run)."""
    surgeon_args = {"min_warmup": 4, "max_warmup": 8, "plateau_patience": 1.0}
    ckpt = ModelCheckpoint(tmp_path / "a", "{step}", every_n_train_steps=30, save_top_k=-1)
    cb_a, model_a = ScheduleSurgeon(**surgeon_args), TinyRegressor()
    trainer = make_trainer([cb_a, ckpt], max_steps=60, enable_checkpointing=True)
    trainer.fit(model_a, make_loader())

    cb, model = ScheduleSurgeon(**surgeon_args), TinyRegressor()
    trainer = make_trainer([cb], max_steps=120, default_root_dir=tmp_path / "b")
    trainer.fit(model, make_loader(), ckpt_path=tmp_path / "a/step=30.ckpt")

    assert cb.controller is not None and cb.controller.total_steps == 120
    replans = [e for e in cb.events if e.kind is EventKind.REPLAN]
    assert len(replans) == 1 and replans[0].step == 30
    assert "120 steps instead of 60" in replans[0].reason
    assert replans[0].scale_before == replans[0].scale_after  # no jump
    lrs, lrs_a = first_lrs(model), first_lrs(model_a)
    # it was holding at the peak: half the 90 steps left hold, as the reason says
    assert "holds for 45 steps, then decays linearly to the floor 0 over the last 45" in (
        replans[0].reason
    )
    assert lrs[:46] == [lrs[0]] * 46 and lrs[46] < lrs[0]  # (the decay starts at the peak)
    assert lrs[0] == lrs_a[30]  # carries on where the checkpoint was
    assert lrs_a[59] < 0.3 * lrs_a[30]  # the 60-step plan had decayed by its end ...
    assert lrs[59 - 30] > 0.6 * lrs[0]  # ... the 120-step one decays over 90 steps from 30
    assert lrs[-1] < 0.3 * lrs[0] and cb.phase is Phase.DONE  # and decays by step 120
    events = (cb.log_dirs[0] / "events.jsonl").read_text()
    assert '"kind": "replan"' in events


# ---------------------------------------------------------------------------- schedulers


def test_configured_lr_scheduler_is_refused_on_request(make_trainer: Any) -> None:
    trainer = make_trainer([ScheduleSurgeon(replace_lr_schedulers=False)], max_steps=10)
    with pytest.raises(MisconfigurationException, match="StepLR") as err:
        trainer.fit(TinyRegressor(scheduled=True), make_loader())
    assert "return only the optimizer(s) from configure_optimizers" in str(err.value)
    assert "leave_scheduled_optimizers=True" in str(err.value)


def test_leave_scheduled_optimizers_drives_only_the_others(make_trainer: Any) -> None:
    batches = 20
    cb = ScheduleSurgeon(min_warmup=4, max_warmup=8, leave_scheduled_optimizers=True)
    model = TinyRegressor((0.05, 0.01), manual=True, scheduled=True)
    make_trainer([cb], max_steps=2 * batches).fit(model, make_loader())

    assert len(model.records) == cb.step == batches
    # the first optimizer follows its StepLR(step_size=3, gamma=0.5), stepped once a batch
    for i, r in enumerate(model.records):
        assert math.isclose(r["lrs"][0][0], 0.05 * 0.5 ** (i // 3), rel_tol=1e-12)
    assert "surgeon_peak_lr" not in model.trainer.optimizers[0].param_groups[0]
    # the second is the surgeon's
    replay = replay_scales(losses_of(model), batches, cb.config)
    assert [r["lrs"][1][0] for r in model.records] == [0.01 * s for s in replay]


def test_a_rollback_leaves_a_scheduled_optimizers_lr_to_its_scheduler(make_trainer: Any) -> None:
    """A 1000x spike rolls weights and optimizer state back; the optimizer whose LR a StepLR
    drives keeps the scheduler's LR (the scheduler is not rolled back), every batch."""
    spike = 60

    def hook(step: int, batch_idx: int, loss: Tensor) -> Tensor:
        return loss * 1000 if step == 2 * spike else loss  # manual: 2 opt.step() per batch

    cb = ScheduleSurgeon(leave_scheduled_optimizers=True)
    model = TinyRegressor((0.05, 0.05), manual=True, scheduled=True, loss_hook=hook)
    make_trainer([cb], max_steps=240).fit(model, make_loader())
    assert EventKind.ROLLBACK in [e.kind for e in cb.events]
    for i, r in enumerate(model.records):
        assert r["lrs"][0][0] == 0.05 * 0.5 ** (i // 3), i


def test_leave_scheduled_optimizers_with_nothing_left_to_drive(make_trainer: Any) -> None:
    trainer = make_trainer([ScheduleSurgeon(leave_scheduled_optimizers=True)], max_steps=10)
    with pytest.raises(ValueError, match="no optimizer to drive"):
        trainer.fit(TinyRegressor(scheduled=True), make_loader())


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"warmup": -1}, "warmup"),
        ({"min_warmup": 2.0}, "min_warmup"),
        ({"max_warmup": -0.5}, "max_warmup"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"decay": "nope"}, "decay"),
        ({"spike_factor": 0}, "spike_factor"),
        ({"plateau_factor": 1.5}, "plateau_factor"),
        ({"total_steps": 0}, "total_steps"),
        ({"readback_every": 0}, "readback_every"),
        ({"min_warmup": 0.5, "max_warmup": 0.2}, "min_warmup"),
        ({"min_warmup": 20, "max_warmup": 10}, "min_warmup"),
        ({"total_steps": 100, "min_warmup": 50, "max_warmup": 0.1}, "min_warmup"),
        ({"total_steps": 100, "warmup": 500}, "warmup"),
        ({"min_lr_ratio": 10**400}, "min_lr_ratio"),
        ({"leave_scheduled_optimizers": "no"}, "leave_scheduled_optimizers"),
    ],
)
def test_bad_constructor_value_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"(?<!\w){field}="):
        ScheduleSurgeon(**kwargs)


class _Endless(IterableDataset):
    """Batches with no ``__len__``: Lightning cannot count the steps of an epoch."""

    def __iter__(self) -> Any:
        x, y = next(iter(make_loader(batches=1)))
        for _ in range(20):
            yield x[0], y[0]


@pytest.mark.parametrize(
    ("manual", "trainer_kw", "planned"),
    [
        (False, {"max_epochs": 3, "max_steps": 1000}, 30),  # the epochs end it first
        (False, {"max_epochs": 3, "max_steps": 25}, 25),  # max_steps does
        (False, {"max_epochs": 2, "accumulate_grad_batches": 3}, 8),  # ceil(10 / 3) a epoch
        (True, {"max_epochs": 2, "max_steps": 1000}, 20),  # one surgeon step per batch
        (True, {"max_epochs": 5, "max_steps": 30}, 15),  # 2 opt.step() per batch
    ],
    ids=["epochs-first", "steps-first", "accumulate", "manual-epochs-first", "manual-steps"],
)
def test_planned_length_is_what_ends_the_fit_first(
    make_trainer: Any, manual: bool, trainer_kw: dict[str, Any], planned: int
) -> None:
    cb = ScheduleSurgeon(min_warmup=2, max_warmup=4)
    lrs = (0.05, 0.01) if manual else (0.05,)
    trainer = make_trainer([cb], **trainer_kw)
    trainer.fit(TinyRegressor(lrs, manual=manual), make_loader())
    assert cb.controller is not None and cb.controller.total_steps == planned
    assert cb.step == planned  # the fit did end there
    assert cb.phase.value == "done"  # so the plan ran out exactly at the end


@pytest.mark.parametrize(
    ("trainer_kwargs", "loader"),
    [
        ({"max_epochs": -1, "max_steps": -1}, make_loader),
        ({"max_epochs": 1, "max_steps": -1}, lambda: DataLoader(_Endless(), batch_size=4)),
    ],
    ids=["unlimited-epochs", "iterable-without-len"],
)
def test_no_finite_planned_length_asks_for_total_steps(
    make_trainer: Any, trainer_kwargs: dict[str, Any], loader: Callable[[], DataLoader]
) -> None:
    trainer = make_trainer([ScheduleSurgeon()], **trainer_kwargs)
    with pytest.raises(ValueError, match="total_steps"):
        trainer.fit(TinyRegressor(), loader())


def test_iterable_without_len_runs_with_total_steps(make_trainer: Any) -> None:
    cb = ScheduleSurgeon(total_steps=5, warmup=2)
    trainer = make_trainer([cb], max_epochs=1, max_steps=-1)
    trainer.fit(TinyRegressor(), DataLoader(_Endless(), batch_size=4))
    assert cb.step == 5
    assert cb.controller is not None and cb.controller.total_steps == 5


def test_warmup_longer_than_the_run_is_refused_at_fit_start(make_trainer: Any) -> None:
    """Lengths given in steps are checked against the total once it is known."""
    trainer = make_trainer([ScheduleSurgeon(min_warmup=50, max_warmup=0.1)], max_steps=100)
    with pytest.raises(ValueError, match=r"min_warmup=50 steps, max_warmup=10 steps"):
        trainer.fit(TinyRegressor(), make_loader())


def test_constructor_defaults_match_the_config_defaults() -> None:
    params = inspect.signature(ScheduleSurgeon.__init__).parameters
    config_fields = {f.name: f for f in dataclasses.fields(SurgeonConfig)}
    for name, field in config_fields.items():
        assert name in params, f"ScheduleSurgeon does not take {name}"
        assert params[name].default == field.default, name
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    own = {
        "self",
        "total_steps",
        "readback_every",
        "leave_scheduled_optimizers",
        "replace_lr_schedulers",
        "cooldown_on_stop",
        "verbose",
        "log_dir",
        "skip_nonfinite",
        "grad_check_every",
        "snapshot",
    }
    assert set(params) - own == set(config_fields)
    assert ScheduleSurgeon().config == SurgeonConfig()


# ---------------------------------------------------------------------------- namespaces


@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning.pytorch"])
def test_works_with_both_lightning_namespaces(make_trainer: Any, namespace: str) -> None:
    ns = importlib.import_module(namespace)
    cb = ScheduleSurgeon(min_warmup=4, max_warmup=8, decay="cosine")
    assert isinstance(cb, ns.Callback)
    model = regressor_class(ns)()
    assert isinstance(model, ns.LightningModule)
    trainer = make_trainer([cb], namespace=ns, max_steps=20)
    assert isinstance(trainer, ns.Trainer)
    trainer.fit(model, make_loader())

    assert cb.step == 20
    replay = replay_scales(losses_of(model), 20, cb.config)
    assert first_lrs(model) == [PEAK * s for s in replay]
    # the automatic ramp starts at 1 / (max_warmup + 1) of the peak
    assert first_lrs(model)[0] == pytest.approx(PEAK / 9, rel=1e-12)


# ---------------------------------------------------------------------------- observability


def test_csv_metrics_events_file_and_log_lines(
    make_trainer: Any, tmp_path: Path, info_lines: list[str]
) -> None:
    steps = 80
    cb = ScheduleSurgeon(warmup=10, spike_cooldown=4)
    model = TinyRegressor((0.05, 0.005), loss_hook=spike_at(60))
    trainer = make_trainer([cb], max_steps=steps, logger=CSVLogger(tmp_path))
    trainer.fit(model, make_loader())
    log_dir = Path(trainer.log_dir)

    kinds = {e.kind for e in cb.events}
    assert {EventKind.WARMUP_END, EventKind.SPIKE} <= kinds

    with (log_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"lr-SGD/pg1", "lr-SGD/pg2", "surgeon/phase", "surgeon/loss_smooth"} <= columns
    # the LR columns are the LRs the optimizer used at that step
    logged = {int(r["step"]): float(r["lr-SGD/pg1"]) for r in rows if r["lr-SGD/pg1"]}
    assert logged == {r["step"]: r["lrs"][0][0] for r in model.records}
    logged2 = {int(r["step"]): float(r["lr-SGD/pg2"]) for r in rows if r["lr-SGD/pg2"]}
    assert logged2 == {r["step"]: r["lrs"][0][1] for r in model.records}
    phases = [float(r["surgeon/phase"]) for r in rows if r["surgeon/phase"]]
    # the last loss, read when training ended, completes the plan
    assert phases[0] == 0.0 and phases[-2] in (1.0, 2.0) and phases[-1] == 3.0
    assert set(phases) <= {0.0, 1.0, 2.0, 3.0}

    lines = (log_dir / "events.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["step"], r["kind"], r["reason"]) for r in records] == [
        (e.step, e.kind.value, e.reason) for e in cb.events
    ]
    assert all(math.isclose(r["lr_after"], 0.05 * r["scale_after"]) for r in records)

    # each event is a line through Lightning's rank-zero info channel
    surgeon_lines = [line for line in info_lines if line.startswith("ScheduleSurgeon: step ")]
    assert len(surgeon_lines) == len(cb.events)
    for line, event in zip(surgeon_lines, cb.events, strict=True):
        assert line.startswith(f"ScheduleSurgeon: step {event.step}: {event.kind.value}: ")
        assert event.reason in line


def test_verbose_false_prints_no_events(make_trainer: Any, info_lines: list[str]) -> None:
    cb = ScheduleSurgeon(warmup=4, decay="wsd", verbose=False)
    make_trainer([cb], max_steps=20).fit(TinyRegressor(), make_loader())
    assert len(cb.events) >= 3  # warmup_end, decay_start, done
    assert not [line for line in info_lines if "ScheduleSurgeon" in line]


def test_steps_without_a_loss_are_counted_and_the_plan_ends_with_the_fit(
    make_trainer: Any, tmp_path: Path
) -> None:
    """``training_step`` returning ``None`` (Lightning's skip-this-batch idiom) still advances
    ``global_step`` while no weights move: the surgeon counts the step without its loss (no
    non-finite loss read into it), so with every 5th batch skipped the plan still ends with the
    fit at the floor (not counting them left the last 8 of 40 steps' decay undone: a
    ``stopped`` event at LR scale 0.4); ``losses.csv`` holds them as rows without a loss, and
    replay makes the run's LRs and events from it."""

    class Skipping(TinyRegressor):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            return None if batch_idx % 5 == 4 else loss

    steps = 40
    cb = ScheduleSurgeon(min_warmup=4, max_warmup=8, readback_every=4, log_dir=tmp_path)
    model = Skipping()
    make_trainer([cb], max_steps=steps).fit(model, make_loader())

    assert not [e for e in cb.events if e.kind in (EventKind.NONFINITE, EventKind.STOPPED)]
    assert cb.skipped_steps == sum(1 for t in range(steps) if t % 5 == 4)  # all read at the end
    assert cb.step == cb.controller.step == steps and cb.phase is Phase.DONE
    lrs = [r["lrs"][0][0] for r in model.records]
    assert lrs[-1] == pytest.approx(0.05 * cb.controller.lr_scale(steps - 1)) and lrs[-1] < 0.01
    rows = (tmp_path / "losses.csv").read_text().splitlines()[1:]
    empty = [int(r.split(",")[0]) for r in rows if not r.split(",")[1]]
    assert empty == [t for t in range(steps) if t % 5 == 4]
    stream = read_stream(tmp_path)
    assert stream.settings is not None
    replayed = stream.replayed(stream.settings)
    assert [(e.step, e.kind) for e in replayed.events] == [(e.step, e.kind) for e in cb.events]
    assert replayed.lr_scales == pytest.approx([r["lrs"][0][0] / 0.05 for r in model.records])


def test_manual_steps_without_a_loss_are_counted_and_follow_the_plan(
    make_trainer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Under manual optimization ``training_step`` may return nothing while the user steps the
    optimizers: those steps count (the LR follows the plan to its end), unwatched, with a
    warning once."""

    class Silent(TinyRegressor):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            super().training_step(batch, batch_idx)  # steps both optimizers
            return None

    caplog.set_level(logging.WARNING, logger="surgeon")
    batches = 40
    cb = ScheduleSurgeon(min_warmup=4, max_warmup=8)
    model = Silent((0.05, 0.01), manual=True)
    make_trainer([cb], max_steps=2 * batches).fit(model, make_loader())
    assert cb.step == cb.controller.step == batches and cb.skipped_steps == 0
    assert cb.phase.value == "done"
    # at max_warmup: no losses; then the plan's own phase changes (the default hold's end)
    kinds = [EventKind.WARMUP_END, EventKind.DECAY_START, EventKind.DONE]
    assert [e.kind for e in cb.events] == kinds
    plan = Controller(batches, cb.config)  # the plan with no loss seen, step by step
    expected = []
    for t in range(batches):
        expected.append(0.05 * plan.lr_scale(t))
        plan.pass_step()
    # steps are passed a block at a time (readback_every=4): the LRs of steps 9-11 were written
    # (the peak, after the ramp) before the block that ends the warmup at step 7 was passed
    expected[9:12] = [0.05] * 3
    assert [r["lrs"][0][0] for r in model.records] == pytest.approx(expected, rel=1e-12)
    # the slow ramp (the pace of max_warmup) reaches the peak at step 8 and ends the warmup
    # (no loss was seen); the decay follows
    assert expected[8] == pytest.approx(0.05) and expected[-1] < 0.05 * 0.1
    assert expected[8:] == sorted(expected[8:], reverse=True)
    assert len([r for r in caplog.records if "found no loss" in r.getMessage()]) == 1


def test_progress_bar_shows_the_phase(make_trainer: Any) -> None:
    seen: list[str] = []

    class ReadBar(pytorch_lightning.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            seen.append(trainer.progress_bar_callback.get_metrics(trainer, pl_module)["phase"])

    cb = ScheduleSurgeon(warmup=8, decay="cosine")
    trainer = make_trainer([cb, ReadBar()], max_steps=30, enable_progress_bar=True)
    trainer.fit(TinyRegressor(), make_loader())
    switch = seen.index("decay")  # once, and never back; `done` as the planned steps end
    assert seen == ["warmup"] * switch + ["decay"] * (len(seen) - switch - 1) + ["done"]
    assert switch > cb.events[0].step  # shown once the controller has decided it
    assert cb.phase.value == "done"  # the last losses, read when training ended, finish the plan


@pytest.mark.parametrize("bad", [0, 5])
@pytest.mark.parametrize("poison", ["overflow", "inf-loss"])
def test_a_step_gradscaler_skipped(make_trainer: Any, bad: int, poison: str) -> None:
    """16-mixed on CPU with torch's CPU GradScaler (the guard stands aside). A finite but huge
    loss overflows the scaled fp16 gradients: GradScaler skips the step and halves its scale,
    routine calibration, so the surgeon counts the step without its loss (the plan moves on with
    Lightning's count) and says nothing. An inf loss:
    GradScaler skips it too, and the surgeon records it as a skipped non-finite step (counted,
    ``nonfinite`` + ``skipped_step``), as the guard would have. The very first step as well: its
    scale drop is measured from the scaler's starting scale."""
    from pytorch_lightning.plugins import MixedPrecision

    factor = 1e30 if poison == "overflow" else math.inf

    def hook(step: int, batch_idx: int, loss: Tensor) -> Tensor:
        return loss * factor if step == bad else loss

    cb = ScheduleSurgeon(min_warmup=2, max_warmup=4, readback_every=2)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = make_trainer([cb], max_steps=20, plugins=[plugin])
    trainer.fit(TinyRegressor(loss_hook=hook), make_loader())

    assert trainer.global_step == 20
    assert cb.guard.mode == "off"  # GradScaler skips non-finite steps itself: no second check
    at_bad = [e.kind for e in cb.events if e.step == bad]
    if poison == "overflow":
        assert cb.skipped_steps == 1 and cb.step == 20 and cb.phase is Phase.DONE
        assert not [e for e in cb.events if e.kind is EventKind.NONFINITE]
    else:
        assert cb.skipped_steps == 0 and cb.step == 20
        assert at_bad[:2] == [EventKind.NONFINITE, EventKind.SKIPPED_STEP]
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_total_steps_shorter_than_the_fit_warns_that_the_rest_runs_at_the_floor(
    make_trainer: Any,
) -> None:
    """``total_steps=10`` in a 20-step fit: said at the start (the rest would train at LR 0
    without a word otherwise); a plan as long as the fit says nothing."""
    model = TinyRegressor()
    with pytest.warns(
        UserWarning, match=r"total_steps=10\) plans fewer steps than this fit runs \(20"
    ):
        make_trainer([ScheduleSurgeon(total_steps=10, warmup=2)], max_steps=20).fit(
            model, make_loader()
        )
    assert model.records[-1]["lrs"][0][0] == 0.0  # as said: the floor
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*plans fewer steps.*")
        make_trainer([ScheduleSurgeon(total_steps=20, warmup=2)], max_steps=20).fit(
            TinyRegressor(), make_loader()
        )


def test_a_plan_and_a_fit_of_other_lengths_warn_unless_total_steps_plans_an_open_fit() -> None:
    """A Trainer without max_steps, max_epochs or max_time runs Lightning's default 1000 epochs:
    a user who gives total_steps there plans the fit by it (stopping it otherwise, e.g. with
    EarlyStopping): no warning; an explicit longer max_steps warns, and so does a shorter one
    (the fit would end before the decay, at the peak: it said nothing), and so does the default
    length without total_steps (the plan, and its warmup, were of 1000 epochs, unsaid)."""
    from types import SimpleNamespace

    from surgeon._lightning.trainer import planned_steps

    def trainer(max_steps: int, max_epochs: int, **overrides: Any) -> Any:
        module = SimpleNamespace(automatic_optimization=overrides.pop("automatic", True))
        batches = 10 * max_epochs if max_steps == -1 else max_steps
        fields = {
            "estimated_stepping_batches": batches,
            "max_steps": max_steps,
            "max_epochs": max_epochs,
            "lightning_module": module,
            "optimizers": [None],
            "limit_train_batches": 1.0,
            "num_training_batches": 10,
            "accumulate_grad_batches": 1,
            "callbacks": [],
        }
        return SimpleNamespace(**{**fields, **overrides})

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*ScheduleSurgeon.*")
        assert planned_steps(trainer(-1, 1000), 500, False) == 500
        assert planned_steps(trainer(500, -1), 500, False) == 500
        assert planned_steps(trainer(-1, 20), None, False) == 200
        # a smoke run, and manual optimizers that may take turns (max_steps counts each
        # opt.step(): the length is a guess its planner corrects), say nothing of a longer plan
        assert planned_steps(trainer(1, -1, fast_dev_run=1), 1000, False) == 1000
        two = trainer(80, -1, automatic=False, optimizers=[None, None])
        assert planned_steps(two, 80, False) == 80
    with pytest.warns(UserWarning, match=r"plans fewer steps than this fit runs \(800"):
        assert planned_steps(trainer(800, -1), 500, False) == 500
    with pytest.warns(UserWarning, match=r"plans more steps than this fit runs \(128,"):
        assert planned_steps(trainer(128, -1), 1000, False) == 1000
    with pytest.warns(UserWarning, match=r"plans this fit for max_epochs=1000 \(10000 steps"):
        assert planned_steps(trainer(-1, 1000), None, False) == 10_000


def test_fit_called_again_on_the_same_trainer_goes_on_as_a_resume(
    make_trainer: Any, tmp_path: Path, info_lines: list[str]
) -> None:
    """``trainer.fit`` again on the same Trainer and callback (a continued fit, no ``ckpt_path``)
    goes on from the callback's own state, as a resume from a checkpoint saved where the first
    fit ended does: the finished run stays at the floor for the added steps, with a ``replan``
    saying so (before: a 'checkpoint without surgeon state' replan that re-started the LR at
    the full peak, with no ramp); its notice says it goes on from the last fit's state (no
    checkpoint is involved)."""

    def continued(via_checkpoint: bool) -> tuple[list[float], list[Any]]:
        folder = tmp_path / ("ckpt" if via_checkpoint else "same")
        surgeon, model = ScheduleSurgeon(min_warmup=2, max_warmup=4), TinyRegressor()
        saver = ModelCheckpoint(folder, "last", every_n_epochs=1)
        trainer = make_trainer([surgeon, saver], max_epochs=2, enable_checkpointing=True)
        trainer.fit(model, make_loader())
        if via_checkpoint:
            trainer = make_trainer([surgeon], max_epochs=4)
            trainer.fit(model, make_loader(), ckpt_path=folder / "last.ckpt")
        else:
            trainer.fit_loop.max_epochs = 4
            trainer.fit(model, make_loader())
        steps = [r["step"] for r in model.records]
        assert steps == list(range(40))
        return [r["lrs"][0][0] for r in model.records[20:]], surgeon.events

    lrs, events = continued(via_checkpoint=False)
    said = [line for line in info_lines if "ScheduleSurgeon: resumed at step" in line]
    assert said == [said[0]] and "resumed at step 20 with the last fit's state" in said[0]
    assert lrs == [0.0] * 20  # the finished run's floor, not the peak
    replans = [e for e in events if e.kind is EventKind.REPLAN]
    assert len(replans) == 1 and "does not re-warm a finished run" in replans[0].reason
    assert "without surgeon state" not in replans[0].reason
    lrs_ckpt, events_ckpt = continued(via_checkpoint=True)
    assert any("resumed at step 20 with the checkpoint's state" in line for line in info_lines)
    assert lrs == lrs_ckpt
    assert [(e.step, e.kind, e.reason) for e in events] == [
        (e.step, e.kind, e.reason) for e in events_ckpt
    ]


@pytest.mark.parametrize("exception", [KeyboardInterrupt, RuntimeError])
def test_a_fit_that_raises_says_so_in_a_stopped_event(
    make_trainer: Any, tmp_path: Path, exception: type[BaseException]
) -> None:
    """A fit interrupted at step 37 (Ctrl-C: Lightning's graceful shutdown, then exit) reads the
    losses in flight first, as a fit's end does: ``losses.csv`` holds every step before the
    interrupt and a ``stopped`` event says what happened (before: the rows read 4-7 steps late
    were lost and the run's record just ended). Another exception is named too; its losses in
    flight stay unread (the device may be what failed)."""

    def hook(step: int, batch_idx: int, loss: Tensor) -> Tensor:
        if step == 37:
            raise exception("stop here")
        return loss

    surgeon = ScheduleSurgeon(min_warmup=2, max_warmup=4, log_dir=tmp_path)
    trainer = make_trainer([surgeon], max_steps=60)
    with pytest.raises((SystemExit, exception)):
        trainer.fit(TinyRegressor(loss_hook=hook), make_loader(batches=60))
    stopped = surgeon.events[-1]
    assert stopped.kind is EventKind.STOPPED
    with (tmp_path / "losses.csv").open() as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    logged = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert logged[-1]["kind"] == "stopped" and logged[-1]["reason"] == stopped.reason
    assert stopped.step == 36 and "the fit ended after 37 of the 60 planned steps" in stopped.reason
    if exception is KeyboardInterrupt:
        assert steps == list(range(37))
        assert stopped.reason.endswith("interrupted (KeyboardInterrupt)")
    else:
        assert steps == list(range(len(steps))) and 37 - 8 < len(steps) < 37
        assert stopped.reason.endswith(
            f"it raised RuntimeError: stop here; its end was not read (the losses of its last "
            f"{37 - len(steps)} steps)"
        )


def test_an_exception_after_the_fit_leaves_its_record_alone(
    make_trainer: Any, tmp_path: Path
) -> None:
    """A fit that ended early (one ``stopped`` event), then the same callback in a fit that
    raises before training (``configure_optimizers``): no second ``stopped`` event lands in the
    finished fit's record (a stale step counter made one)."""
    surgeon = ScheduleSurgeon(total_steps=40, min_warmup=2, max_warmup=4, log_dir=tmp_path)
    make_trainer([surgeon], max_steps=20).fit(TinyRegressor(), make_loader())
    assert [e.kind for e in surgeon.events].count(EventKind.STOPPED) == 1
    logged = (tmp_path / "events.jsonl").read_text()

    class Broken(TinyRegressor):
        def configure_optimizers(self) -> Any:
            raise RuntimeError("no optimizer today")

    with pytest.raises(RuntimeError, match="no optimizer today"):
        make_trainer([surgeon], max_steps=20).fit(Broken(), make_loader())
    assert [e.kind for e in surgeon.events].count(EventKind.STOPPED) == 1
    assert (tmp_path / "events.jsonl").read_text() == logged


def test_fit_again_after_a_fit_that_raised_starts_without_its_state(
    make_trainer: Any, tmp_path: Path
) -> None:
    """A fit that raised mid-run may have left a step half closed and losses unread: ``fit()``
    again on its Trainer starts as from a checkpoint without surgeon state (a ``replan`` that
    says so), after the ``stopped`` event, never reading the old losses into the new run's
    record out of order."""

    def hook(step: int, batch_idx: int, loss: Tensor) -> Tensor:
        if step == 37 and not model.raised:
            model.raised = True
            raise RuntimeError("once")
        return loss

    surgeon = ScheduleSurgeon(min_warmup=2, max_warmup=4, log_dir=tmp_path)
    model = TinyRegressor(loss_hook=hook)
    model.raised = False
    trainer = make_trainer([surgeon], max_steps=60)
    with pytest.raises(RuntimeError, match="once"):
        trainer.fit(model, make_loader(batches=60))
    trainer.fit(model, make_loader(batches=60))
    kinds = [(e.step, e.kind) for e in surgeon.events]
    assert kinds == sorted(kinds, key=lambda k: k[0])
    replan = next(e for e in surgeon.events if e.kind is EventKind.REPLAN)
    assert replan.step == 37 and "a fit continued after one that raised" in replan.reason
    with (tmp_path / "losses.csv").open() as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert steps == sorted(steps) and steps[-1] == 59


def test_lightnings_console_log_stays_in_the_projects_namespace(make_trainer: Any) -> None:
    """Lightning's rank-zero console log is one for both namespaces, pointed at the one imported
    last; the surgeon imports both (its callback fits either Trainer). Importing it keeps a
    ``pytorch_lightning`` project's pointer (it moved to ``lightning.pytorch``, so that
    project's logging settings missed Lightning's lines and the surgeon's decisions), and a
    fit points it at its Trainer's namespace while it runs, and back where it found it after."""
    import subprocess
    import sys

    import lightning.pytorch
    import lightning_utilities.core.rank_zero as rank_zero

    for project, surgeon_import in (
        ("pytorch_lightning", "import surgeon.callback"),
        ("lightning.pytorch", "import surgeon.callback"),
        ("lightning.pytorch", "from surgeon import ScheduleSurgeon"),
        ("pytorch_lightning", "import surgeon; import pytorch_lightning; surgeon.ScheduleSurgeon"),
    ):
        code = (
            f"import {project}, lightning_utilities.core.rank_zero as rz; "
            f"before = rz.log.name; {surgeon_import}; print(before, rz.log.name)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
        assert out == [f"{project}.utilities.rank_zero"] * 2, (project, surgeon_import)
    for namespace, name in (
        (lightning.pytorch, "lightning.pytorch"),
        (pytorch_lightning, "pytorch_lightning"),
    ):

        class Look(namespace.Callback):  # type: ignore[misc, name-defined]
            seen = ""

            def on_train_start(self, *_: Any) -> None:
                self.seen = rank_zero.log.name

        before, look = rank_zero.log, Look()
        trainer = make_trainer(
            [ScheduleSurgeon(total_steps=4), look], namespace=namespace, max_steps=4
        )
        trainer.fit(regressor_class(namespace)(), make_loader())
        assert look.seen == f"{name}.utilities.rank_zero"  # during the fit: its Trainer's
        assert rank_zero.log is before  # after it: where the fit found it


@pytest.mark.parametrize("scaler", [False, True], ids=["fp32", "fp16-gradscaler"])
def test_a_periodic_checkpoints_name_reads_the_lr_of_its_step(
    make_trainer: Any, tmp_path: Path, scaler: bool
) -> None:
    """``ModelCheckpoint(every_n_train_steps=n)`` names read ``trainer.callback_metrics``, which
    the surgeon refreshed only at logging steps (every 50 by default), so a checkpoint at step
    30 was named with step 0's LR. The surgeon refreshes them on the steps such a checkpoint
    saves at, counted as Lightning counts them (a GradScaler's calibration skips are steps to
    Lightning, not to the surgeon): each name holds the LR of the step the checkpoint resumes
    at."""
    surgeon = ScheduleSurgeon(min_warmup=10, max_warmup=40, readback_every=2)
    model = TinyRegressor()
    extra: dict[str, Any] = {}
    if scaler:
        from pytorch_lightning.plugins import MixedPrecision

        amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        extra["plugins"] = [amp]
    saver = ModelCheckpoint(
        tmp_path,
        "{step}-{surgeon/lr:.5f}",
        every_n_train_steps=30,
        save_top_k=-1,
        auto_insert_metric_name=False,
    )
    trainer = make_trainer(
        [surgeon, saver], max_steps=150, enable_checkpointing=True, log_every_n_steps=50, **extra
    )
    trainer.fit(model, make_loader(batches=150))
    if scaler:
        assert surgeon.engine.skipped_steps >= 1  # the case: the two counts differ
    lrs = {r["step"]: r["lrs"][0][0] for r in model.records}
    named = {}
    for path in tmp_path.glob("*.ckpt"):
        step, lr = path.stem.split("-")
        named[int(step)] = float(lr)
    assert sorted(named) == [30, 60, 90, 120, 150]
    for step, lr in named.items():
        if step < 150:
            assert lr == pytest.approx(lrs[step], abs=1e-5), step  # the next step's LR
    assert len({round(lr, 5) for lr in named.values()}) >= 4  # the LR moved between them
