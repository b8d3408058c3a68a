"""Faults a long, expensive run relies on the surgeon to live through: real ``Trainer.fit`` runs
on CPU (the tiny models of ``conftest``), each fault planted at a known step.

The first part is one test per fault that lost training or corrupted state before (issue 14):
a lasting level shift, a stale rollback target, non-finite BatchNorm buffers, a checkpoint
written before the last losses were read, a resume inside a spike's read-back window, a resume
from a checkpoint saved without the surgeon, param groups added with LR 0 or at scale 0, a
collapsing GradScaler scale, manual optimization with unequal optimizer steps, a run that can
make no progress, NaN on the first steps (before any snapshot's loss is read), and settings
changed on resume.

The second part is the fault matrix: every fault, old and new, against the same checks on the
finished run: weights and buffers finite, no rollback undoing more than
:attr:`Controller.max_undone_steps`, the final loss (on the whole data set, in eval mode) within
5% of the same configuration's clean run, and under DDP the same decisions on every rank.
"""

import csv
import itertools
import json
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import IN_FEATURES, TinyRegressor, make_loader
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn

from surgeon import ScheduleSurgeon, schedules
from surgeon.controller import STATE_ROLLBACK_MARK, Controller, Event, EventKind, Phase
from surgeon.engine import PEAK_LR_KEY, TrainingStalled

PEAK = 0.05
"""The tiny model's default LR."""

FaultHook = Callable[[int, int, Tensor], Tensor]


# ---------------------------------------------------------------------------- helpers
def undone_steps(event: Event) -> int:
    """How many steps with an update a ``rollback`` event says it undid."""
    match = re.search(r"\((\d+) steps(?:, (\d+) with an update)?\)$", event.reason)
    assert match, event.reason
    return int(match.group(2) or match.group(1))


def rollback_target(event: Event) -> int:
    match = re.search(r"restored the snapshot of step (\d+)", event.reason)
    assert match, event.reason
    return int(match.group(1))


def of_kind(surgeon: ScheduleSurgeon, kind: EventKind) -> list[Event]:
    return [e for e in surgeon.events if e.kind is kind]


def assert_within_bound(surgeon: ScheduleSurgeon) -> None:
    """No rollback undid more steps with an update than the documented bound (a rollback for
    NaN/inf weights or optimizer state: its own)."""
    controller = surgeon.controller
    assert controller is not None
    for event in of_kind(surgeon, EventKind.ROLLBACK):
        state = STATE_ROLLBACK_MARK in event.reason
        bound = controller.max_undone_state_steps if state else controller.max_undone_steps
        assert undone_steps(event) <= bound, (event.reason, bound)


def assert_finite(model: nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), f"{name} is not finite"


def eval_loss(model: nn.Module, loader: Any = None) -> float:
    """Mean squared error over the whole data set, in eval mode (BatchNorm's running stats)."""
    loader = loader if loader is not None else make_loader()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = torch.cat([b[0] for b in loader])
        y = torch.cat([b[1] for b in loader])
        loss = nn.functional.mse_loss(model.net(x), y).item()
    model.train(was_training)
    return loss


def at(steps: set[int], fault: Callable[[Tensor], Tensor]) -> FaultHook:
    """A ``loss_hook`` applying ``fault`` to the loss of the optimizer steps in ``steps``."""

    def hook(step: int, batch_idx: int, loss: Tensor) -> Tensor:
        return fault(loss) if step in steps else loss

    return hook


def nan(loss: Tensor) -> Tensor:
    return loss * math.nan


class Net(TinyRegressor):
    """The tiny MLP with knobs: an optimizer (``sgd``, ``fused-sgd``, ``fused-adam``,
    ``fused-adagrad``, ``lbfgs``), three param groups, a BatchNorm layer, NaN planted in one
    input value of given steps, an inf planted in a gradient at given steps."""

    def __init__(
        self,
        *,
        optimizer: str = "sgd",
        groups: int = 1,
        batchnorm: bool = False,
        nan_input_at: frozenset[int] = frozenset(),
        inf_grad_at: frozenset[int] = frozenset(),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if batchnorm:
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Linear(IN_FEATURES, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1)
            )
        self.optimizer_name = optimizer
        self.groups = groups
        self.nan_input_at = nan_input_at
        self.inf_grad_at = inf_grad_at

    def configure_optimizers(self) -> Any:
        params = list(self.net.parameters())
        if self.groups == 3:
            param_groups = [
                {"params": params[:1], "lr": PEAK},
                {"params": params[1:2], "lr": PEAK / 2},
                {"params": params[2:], "lr": PEAK / 5},
            ]
        else:
            param_groups = [{"params": params, "lr": PEAK}]
        name = self.optimizer_name
        if name == "sgd":
            return torch.optim.SGD(param_groups, lr=PEAK, momentum=0.9)
        if name == "fused-sgd":
            return torch.optim.SGD(param_groups, lr=PEAK, momentum=0.9, fused=True)
        if name == "fused-adam":
            return torch.optim.Adam(param_groups, lr=PEAK / 10, fused=True)
        if name == "fused-adagrad":
            return torch.optim.Adagrad(param_groups, lr=PEAK, fused=True)
        assert name == "lbfgs"
        return torch.optim.LBFGS(params, lr=0.5, max_iter=2)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.global_step in self.nan_input_at:
            x, y = batch
            x = x.clone()
            x[0, 0] = math.nan
            batch = (x, y)
        return super().training_step(batch, batch_idx)

    def on_after_backward(self) -> None:
        if self.global_step in self.inf_grad_at:
            self.net[0].weight.grad[0, 0] = math.inf


@pytest.mark.parametrize(
    "averaging", ["ema", "swa", "swa-in-the-last-epoch", "ema-starting-at-the-end"]
)
def test_a_rollback_restores_the_average_a_weight_averaging_callback_keeps(
    make_trainer: Callable[..., Any], averaging: str
) -> None:
    """``EMAWeightAveraging`` keeps an average of the weights, which Lightning swaps into the
    model at the fit's end: a x300 spike rolled back in the weights stayed in the average (a
    user trial: the final model 48x a clean run's loss). The snapshot keeps the average too:
    the rollback puts it back, and the final (averaged) model ends close to a clean run's, as
    without the average. ``StochasticWeightAveraging`` with the spike just before its start
    (step 30), whose count is made at its start: the rollback restarts its average (a review:
    the snapshot had one tensor fewer, the restore skipped the average, 5764x). A rollback to
    before an average's first update, with none left before the fit's end (SWA averaging in
    the last epoch only; an EMA starting at step 52), starts it again from the restored weights
    (a review: the callback put its untrained starting copy in the model, 3.8x)."""
    from pytorch_lightning.callbacks import EMAWeightAveraging, StochasticWeightAveraging

    spikes, averager_kw = {
        "ema": ({40, 41}, {"decay": 0.98}),
        "swa": ({28, 29}, {"swa_lrs": 0.05, "swa_epoch_start": 4}),
        "swa-in-the-last-epoch": ({51, 52}, {"swa_lrs": 0.05, "swa_epoch_start": 6}),
        "ema-starting-at-the-end": ({58, 59}, {"decay": 0.9, "update_starting_at_step": 52}),
    }[averaging]
    length = {"max_steps": 200} if averaging == "ema" else {"max_epochs": 6}

    def fitted(factor: float, average: bool) -> tuple[ScheduleSurgeon, float]:
        torch.manual_seed(0)
        surgeon = ScheduleSurgeon()
        model = TinyRegressor(loss_hook=at(spikes, lambda loss: loss * factor))
        kind = EMAWeightAveraging if averaging.startswith("ema") else StochasticWeightAveraging
        averager: Any = kind(**averager_kw)
        callbacks = [surgeon, averager] if average else [surgeon]  # the order the README says
        make_trainer(callbacks, **length).fit(model, make_loader())
        return surgeon, eval_loss(model)

    for average in (False, True):
        _, clean = fitted(1.0, average)
        surgeon, hit = fitted(300.0, average)
        (rollback,) = of_kind(surgeon, EventKind.ROLLBACK)
        assert rollback_target(rollback) <= min(spikes)
        assert hit < 1.3 * clean, (average, hit, clean)


def test_swa_on_a_batchnorm_model_ends_with_its_average_after_a_late_rollback(
    make_trainer: Callable[..., Any],
) -> None:
    """SWA puts its average in a BatchNorm model when its statistics epoch starts, before the
    fit's end, where the surgeon read the last losses: a x300 burst in the last training steps
    was rolled back after that, the raw weights over the average (a review). The surgeon now
    reads them as that epoch starts, before SWA's transfer: the fit ends with the average."""
    from pytorch_lightning.callbacks import StochasticWeightAveraging

    def fitted(factor: float) -> tuple[ScheduleSurgeon, float, bool]:
        torch.manual_seed(0)
        surgeon = ScheduleSurgeon()
        swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=4)
        model = TinyRegressor(loss_hook=at({58, 59}, lambda loss: loss * factor))
        model.net.insert(1, nn.BatchNorm1d(16))
        make_trainer([surgeon, swa], max_epochs=6).fit(model, make_loader())
        average = swa._average_model
        assert average is not None
        pairs = zip(average.parameters(), model.parameters(), strict=True)
        return surgeon, eval_loss(model), all(torch.equal(a, p) for a, p in pairs)

    _, clean, clean_is_average = fitted(1.0)
    surgeon, hit, is_average = fitted(300.0)
    assert clean_is_average and is_average
    assert EventKind.ROLLBACK in [e.kind for e in surgeon.events]
    assert hit < 1.3 * clean, (hit, clean)


def test_a_reseeded_average_counts_the_restored_weights_once(
    make_trainer: Callable[..., Any],
) -> None:
    """An equal-weight ``WeightAveraging`` of each step's weights from step 52; a x300 burst at
    58-59 is rolled back to before its first update, which starts it again from the restored
    weights: once, not again by the callback's own update at that step (a review: counted
    twice, 18 for 17 weight states)."""
    from pytorch_lightning.callbacks import WeightAveraging

    class Late(WeightAveraging):  # type: ignore[misc]
        def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
            return step_idx is not None and step_idx >= 52

    counts: list[tuple[int, int]] = []
    averaging = Late()

    class Spy(pl.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            assert averaging._average_model is not None
            counts.append((trainer.global_step, int(averaging._average_model.n_averaged)))

    torch.manual_seed(0)
    surgeon = ScheduleSurgeon()
    trainer = make_trainer([surgeon, averaging, Spy()], max_epochs=8)
    trainer.fit(TinyRegressor(loss_hook=at({58, 59}, lambda loss: loss * 300.0)), make_loader())
    assert EventKind.ROLLBACK in [e.kind for e in surgeon.events]
    ((step, count),) = [b for a, b in itertools.pairwise(counts) if b[1] < a[1]]
    assert count == 1
    assert counts[-1][1] == trainer.global_step - step + 1  # one per weight state since


def test_a_weight_averaging_callback_listed_before_the_surgeon_is_warned_about(
    make_trainer: Callable[..., Any],
) -> None:
    """Listed before the surgeon, ``EMAWeightAveraging`` puts its average in the model at the
    fit's end before the surgeon's last read, whose rollback (a spike on the last step) then
    puts the raw weights back over it (a user trial): a warning says to list the surgeon
    first; in that order the final model is the average."""
    from pytorch_lightning.callbacks import EMAWeightAveraging

    def fit(first: str) -> tuple[list[str], bool]:
        torch.manual_seed(0)
        surgeon, ema = ScheduleSurgeon(), EMAWeightAveraging(decay=0.9)
        model = TinyRegressor(loss_hook=at({59}, lambda loss: loss * 300))
        trainer = make_trainer([ema, surgeon] if first == "ema" else [surgeon, ema], max_steps=60)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, make_loader())
        assert EventKind.ROLLBACK in [e.kind for e in surgeon.events]
        assert ema._average_model is not None
        average = ema._average_model.module.state_dict()
        is_average = all(
            torch.equal(v, average[k]) for k, v in model.state_dict().items() if k in average
        )
        said = [
            str(w.message) for w in caught if "is listed before ScheduleSurgeon" in str(w.message)
        ]
        return said, is_average

    said, is_average = fit("ema")
    assert len(said) == 1 and said[0].startswith("ScheduleSurgeon: EMAWeightAveraging is listed")
    assert not is_average
    said, is_average = fit("surgeon")
    assert said == [] and is_average
    # without snapshots no rollback can happen: nothing to say (a review)
    trainer = make_trainer(
        [EMAWeightAveraging(decay=0.9), ScheduleSurgeon(snapshot="off")], max_steps=5
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyRegressor(), make_loader())
    assert not [w for w in caught if "is listed before ScheduleSurgeon" in str(w.message)]


# ---------------------------------------------------------------------------- 1. level shift
@pytest.mark.parametrize("shift", [2.0, 10.0, 100.0])
def test_a_lasting_level_shift_is_rolled_back_once_then_taken_as_the_new_baseline(
    make_trainer: Callable[..., Any], shift: float
) -> None:
    """+shift on the loss from step 150 of 600 (gradients unchanged, weights never damaged):
    the first read of it rolls back (it looks like damage); the good weights then give the
    same level, which becomes the new baseline: no second rollback, and the cut LR recovers
    within a few cooldowns instead of rolling back to step 140 again and again."""
    surgeon = ScheduleSurgeon()
    model = TinyRegressor(loss_hook=lambda s, b, loss: loss + shift if s >= 150 else loss)
    make_trainer([surgeon], max_steps=600).fit(model, make_loader())

    (rollback,) = of_kind(surgeon, EventKind.ROLLBACK)
    assert rollback.step == 151 and rollback_target(rollback) == 140  # 151 confirms 150
    assert_within_bound(surgeon)
    spikes = of_kind(surgeon, EventKind.SPIKE)
    assert "a lasting level shift, not damage" in spikes[1].reason
    assert len(spikes) == 2  # the shift, then its confirmation by the good weights: no storm
    recovered = of_kind(surgeon, EventKind.RECOVERED)
    assert recovered and recovered[0].step < 150 + 3 * surgeon.controller.spike_cooldown + 20
    assert_finite(model)


def test_a_repeated_rollback_to_the_same_snapshot_is_refused(
    make_trainer: Callable[..., Any],
) -> None:
    """NaN losses from step 100 to 140 (unguarded: they reach the weights): three in a row roll
    back to a snapshot before 100; the NaN goes on, and no loss was normal since, so it is not
    rolled back to that snapshot again: the run cuts and carries on until the stretch has lasted
    two snapshot intervals, then stops (nothing left to go back to)."""
    surgeon = ScheduleSurgeon(skip_nonfinite="off")
    model = TinyRegressor(loss_hook=at(set(range(100, 141)), nan))
    with pytest.raises(TrainingStalled, match=r"non-finite steps in a row"):
        make_trainer([surgeon], max_steps=300).fit(model, make_loader())
    (rollback,) = of_kind(surgeon, EventKind.ROLLBACK)
    assert rollback_target(rollback) < 100
    refused = [e for e in of_kind(surgeon, EventKind.NONFINITE) if "no rollback" in e.reason]
    assert refused and "would repeat it" in refused[0].reason
    assert of_kind(surgeon, EventKind.STALLED)


# ---------------------------------------------------------------------------- 2. stale target
@pytest.mark.slow
def test_harmless_nans_do_not_make_the_rollback_target_stale(
    make_trainer: Callable[..., Any],
) -> None:
    """A skipped NaN every 50 steps of a 2000-step run keeps the LR cut or recovering most of
    the time; snapshots go on being taken all the same, so a NaN burst at step 1500 rolls back
    a few steps, not to step 0, and once."""
    steps = {s for s in range(2000) if s % 50 == 25} | set(range(1500, 1505))
    surgeon = ScheduleSurgeon()
    model = TinyRegressor(loss_hook=at(steps, nan))
    make_trainer([surgeon], max_steps=2000).fit(model, make_loader())
    (rollback,) = of_kind(surgeon, EventKind.ROLLBACK)
    assert 1500 - 2 * surgeon.controller.snapshot_every <= rollback_target(rollback) < 1500
    assert_within_bound(surgeon)
    assert surgeon.controller.good_snapshot_step >= 1900  # still taken at the end
    assert_finite(model)


# ---------------------------------------------------------------------------- 3. buffers
@pytest.mark.parametrize("snapshot", ["cpu", "off"])
def test_nan_in_one_input_leaves_batchnorm_statistics_finite(
    make_trainer: Callable[..., Any], snapshot: str
) -> None:
    """One NaN input value at step 40: the update is skipped, but BatchNorm wrote NaN into its
    running mean and variance during the forward pass. They are found (a device flag read with
    the loss) and repaired from the good snapshot, or reset without one, with an event; the
    model evaluates finite after the fit."""
    surgeon = ScheduleSurgeon(snapshot=snapshot)
    model = Net(batchnorm=True, nan_input_at=frozenset({40}))
    make_trainer([surgeon], max_steps=100).fit(model, make_loader())
    (repair,) = of_kind(surgeon, EventKind.BUFFERS_RESTORED)
    assert repair.step == 40
    assert (
        "snapshot of step" if snapshot == "cpu" else "the running statistics of the modules"
    ) in (repair.reason)
    assert [e.kind for e in surgeon.events if e.step == 40][:2] == [
        EventKind.BUFFERS_RESTORED,
        EventKind.NONFINITE,
    ]
    assert_finite(model)
    assert math.isfinite(eval_loss(model))


def test_a_snapshot_taken_after_nan_buffers_never_becomes_a_rollback_target(
    make_trainer: Callable[..., Any],
) -> None:
    """One NaN input value at step 38, two steps before the snapshot of step 40 is taken (its
    flag is read a block later, after that snapshot copied the NaN running statistics; the
    snapshot's own loss is normal, as training normalizes with the batch's statistics), then a
    x50 spike at steps 47-48 that rolls back: the rollback goes to the snapshot of step 30,
    taken before the NaN, never to the one of step 40, and the model evaluates finite after
    the fit (a rollback to step 40 restored the NaN statistics, and every later repair copied
    them back from it)."""
    surgeon = ScheduleSurgeon(snapshot_every=10)
    model = Net(
        batchnorm=True,
        nan_input_at=frozenset({38}),
        loss_hook=at({47, 48}, lambda loss: loss * 50),
    )
    make_trainer([surgeon], max_steps=120).fit(model, make_loader())
    (repair,) = of_kind(surgeon, EventKind.BUFFERS_RESTORED)
    assert repair.step == 38 and "snapshot of step 30" in repair.reason
    (rollback,) = of_kind(surgeon, EventKind.ROLLBACK)
    assert rollback.step == 48 and rollback_target(rollback) == 30
    assert_within_bound(surgeon)
    assert_finite(model)
    assert math.isfinite(eval_loss(model))


def test_a_repair_from_a_snapshot_holding_the_same_nan_resets_the_statistics() -> None:
    """Defence in depth: when the snapshot a repair copies from holds NaN in the same entries,
    the repair does not keep them: the running statistics are reset (and the event says so)."""
    from surgeon.config import SurgeonConfig
    from surgeon.engine import StepEngine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = StepEngine(SurgeonConfig())
    engine.start(100, [optimizer], module=model)
    bn = model[1]
    bn.running_mean[0] = math.nan  # the snapshot copies it
    engine.begin_step()  # step 0: a snapshot is due
    controller = engine.controller
    assert controller is not None
    controller._good_snapshot = (0, 1)  # as if its loss had been read normal
    bn.running_mean[1] = math.inf
    engine._repair_buffers(0)
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert bn.running_mean.tolist() == [0.0] * 4  # reset, not the snapshot's NaN
    (event,) = [e for e in controller.events if e.kind is EventKind.BUFFERS_RESTORED]
    assert "which held some too: the running statistics of the modules holding them reset" in (
        event.reason
    )


def test_the_buffer_check_makes_no_host_sync(make_trainer: Callable[..., Any]) -> None:
    """The per-step buffer check is a device flag that travels with the loss: the hooks read
    nothing off read-back steps (the rules of ``test_host_sync``), with BatchNorm buffers to
    check and a fused optimizer (the guard reads nothing either)."""
    from test_host_sync import CountingSurgeon, check_hook_syncs

    surgeon = CountingSurgeon(readback_every=4, snapshot_every=10)
    model = Net(batchnorm=True, optimizer="fused-sgd")
    make_trainer([surgeon], max_steps=24).fit(model, make_loader(batches=8))
    assert len(surgeon.engine._buffers) == 2  # running mean and variance: checked every step
    check_hook_syncs(surgeon.calls, 4)


# ---------------------------------------------------------------------------- 4. checkpoints
@pytest.mark.parametrize(("spiked", "decided"), [((296, 297), 297), ((299,), 299)])
def test_the_last_checkpoint_holds_no_unread_damage(
    make_trainer: Callable[..., Any], tmp_path: Path, spiked: tuple[int, ...], decided: int
) -> None:
    """A x50 spike at steps 296-297 of 300 (the second confirms the first) is still in flight
    when ModelCheckpoint saves step 300, or one at step 299 that no loss can confirm before the
    save: the checkpoint reads it first, rolls back, and saves the good weights, the same as
    the model holds after the fit."""
    surgeon = ScheduleSurgeon()
    model = TinyRegressor(loss_hook=at(set(spiked), lambda loss: loss * 50))
    ckpt = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=300, save_last=True)
    make_trainer([surgeon, ckpt], max_steps=300, enable_checkpointing=True).fit(
        model, make_loader()
    )
    (rollback,) = of_kind(surgeon, EventKind.ROLLBACK)
    assert rollback.step == decided
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved[name], tensor), name
    restored = TinyRegressor()
    restored.load_state_dict(saved)
    assert eval_loss(restored) == eval_loss(model)


class SavesCheckpoint(pl.Callback):
    """Calls ``trainer.save_checkpoint(path)`` itself at the end of step ``step`` (as a user's
    callback may, e.g. on a signal), noting the events and the weights just before and after."""

    def __init__(self, surgeon: ScheduleSurgeon, step: int, path: Path) -> None:
        self.surgeon, self.step, self.path = surgeon, step, path
        self.events_before: list[Event] = []
        self.events_after: list[Event] = []
        self.weights_before: dict[str, Tensor] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step != self.step + 1:
            return
        self.events_before = list(self.surgeon.events)
        self.weights_before = {k: v.clone() for k, v in pl_module.state_dict().items()}
        trainer.save_checkpoint(self.path)
        self.events_after = list(self.surgeon.events)


def test_an_explicit_save_checkpoint_holds_no_unread_damage(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """A x50 spike at steps 146-147 is still in flight (its losses unread) at the end of step
    149, when a callback calls ``trainer.save_checkpoint`` itself: the save reads those losses
    first, rolls back, and writes the restored weights (those of the snapshot's step), not the
    damaged ones the model held when the save began."""
    surgeon, weights = ScheduleSurgeon(), WeightsAtStepStart()
    saver = SavesCheckpoint(surgeon, 149, tmp_path / "explicit.ckpt")
    model = TinyRegressor(loss_hook=at({146, 147}, lambda loss: loss * 50))
    make_trainer([surgeon, weights, saver], max_steps=200).fit(model, make_loader())

    assert not [e for e in saver.events_before if e.step >= 140]  # in flight when the save began
    (rollback,) = [e for e in saver.events_after if e.kind is EventKind.ROLLBACK]
    assert rollback.step == 147 and of_kind(surgeon, EventKind.ROLLBACK) == [rollback]
    target = rollback_target(rollback)
    assert target <= 146
    saved = torch.load(tmp_path / "explicit.ckpt", weights_only=False)["state_dict"]
    names = [name for name, _ in model.named_parameters()]
    for name, good in zip(names, weights.at[target], strict=True):
        assert torch.equal(saved[name], good), name  # the snapshot's weights
    assert any(not torch.equal(saved[n], saver.weights_before[n]) for n in names)  # not damaged


def test_a_checkpoint_saved_before_the_surgeon_has_the_steps_loss_is_warned_about(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """A callback listed *before* the surgeon saves in ``on_train_batch_end``: the surgeon has
    not been handed that step's loss yet, so the step's update goes into the checkpoint unread
    (documented under Not protected). Said once, naming the step and the remedy; listed after
    the surgeon, the same save says nothing (and reads everything, as above)."""
    surgeon = ScheduleSurgeon()
    saver = SavesCheckpoint(surgeon, 60, tmp_path / "early.ckpt")
    with pytest.warns(UserWarning, match="after optimizer step 60 and before") as warned:
        make_trainer([saver, surgeon], max_steps=80).fit(TinyRegressor(), make_loader())
    said = [str(w.message) for w in warned if "handed its loss" in str(w.message)]
    assert len(said) == 1 and "List the callback that saves after ScheduleSurgeon" in said[0]
    surgeon = ScheduleSurgeon()
    saver = SavesCheckpoint(surgeon, 60, tmp_path / "late.ckpt")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        make_trainer([surgeon, saver], max_steps=80).fit(TinyRegressor(), make_loader())
    assert not [w for w in seen if "handed its loss" in str(w.message)]


def test_a_spike_on_the_last_step_is_rolled_back_without_a_checkpoint(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """A x50 spike at step 299 of 300: no loss comes after it to confirm it, at a checkpoint
    or at the end of the fit alike; the fit ends with the same rollback and the same weights
    whether or not ModelCheckpoint saves step 300."""

    def run(checkpoint: bool) -> tuple[ScheduleSurgeon, TinyRegressor]:
        surgeon = ScheduleSurgeon()
        model = TinyRegressor(loss_hook=at({299}, lambda loss: loss * 50))
        callbacks: list[Any] = [surgeon]
        if checkpoint:
            callbacks.append(ModelCheckpoint(tmp_path, every_n_train_steps=300))
        make_trainer(callbacks, max_steps=300, enable_checkpointing=checkpoint).fit(
            model, make_loader()
        )
        return surgeon, model

    (saved, saved_model), (plain, plain_model) = run(True), run(False)
    assert [e.step for e in of_kind(plain, EventKind.ROLLBACK)] == [299]
    assert plain.events == saved.events
    for name, tensor in plain_model.state_dict().items():
        assert torch.equal(saved_model.state_dict()[name], tensor), name


def test_a_weights_only_checkpoint_is_not_read_first(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """Not guaranteed: ``save_weights_only`` checkpoints skip the callbacks' state, so the
    losses in flight are not read before them; the spike of steps 296-297 is rolled back only
    at the end of the fit, after last.ckpt was written with the damaged weights."""
    surgeon = ScheduleSurgeon()
    model = TinyRegressor(loss_hook=at({296, 297}, lambda loss: loss * 50))
    ckpt = ModelCheckpoint(
        tmp_path, every_n_train_steps=300, save_last=True, save_weights_only=True
    )
    make_trainer([surgeon, ckpt], max_steps=300, enable_checkpointing=True).fit(
        model, make_loader()
    )
    assert [e.step for e in of_kind(surgeon, EventKind.ROLLBACK)] == [297]
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert not all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- 5. resume
def test_a_resume_inside_a_spikes_read_back_window_is_exact(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """Spike at 197-198, checkpoint at 200 (a crash later): the checkpoint decided on the
    spike before saving (rolled back to 191), so the resumed run goes on with the same LRs, losses
    and decisions as the uninterrupted one, rollbacks included."""

    def run(ckpt_path: Path | None, root: str) -> tuple[ScheduleSurgeon, TinyRegressor]:
        surgeon = ScheduleSurgeon()
        model = TinyRegressor(loss_hook=at({197, 198}, lambda loss: loss * 50))
        ckpt = ModelCheckpoint(tmp_path / "ck", "{step}", every_n_train_steps=100, save_top_k=-1)
        trainer = make_trainer(
            [surgeon, ckpt],
            max_steps=300,
            enable_checkpointing=True,
            default_root_dir=tmp_path / root,
        )
        trainer.fit(model, make_loader(), ckpt_path=ckpt_path)
        return surgeon, model

    surgeon_a, model_a = run(None, "a")
    rollbacks = of_kind(surgeon_a, EventKind.ROLLBACK)
    assert [(e.step, rollback_target(e)) for e in rollbacks] == [(198, 191)]
    surgeon_b, model_b = run(tmp_path / "ck" / "step=200.ckpt", "b")
    assert [r["step"] for r in model_b.records] == list(range(200, 300))
    assert [r["lrs"] for r in model_b.records] == [r["lrs"] for r in model_a.records[200:]]
    assert [r["loss"] for r in model_b.records] == [r["loss"] for r in model_a.records[200:]]
    assert surgeon_b.events == surgeon_a.events
    assert surgeon_b.state_dict() == surgeon_a.state_dict()


def test_a_resume_from_a_checkpoint_without_the_surgeon_plans_from_its_step(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """A constant-LR run checkpointed at step 150 of 300, resumed with the surgeon: the 150
    steps done count (no re-warm from ~0), the configured LR is the peak, the decay reaches
    the floor at step 300, metrics go out on Lightning's steps, and a ``replan`` says so."""
    ckpt = ModelCheckpoint(tmp_path / "ck", "{step}", every_n_train_steps=150, save_top_k=-1)
    make_trainer([ckpt], max_steps=150, enable_checkpointing=True).fit(
        TinyRegressor(), make_loader()
    )
    surgeon, model = ScheduleSurgeon(), TinyRegressor()
    trainer = make_trainer([surgeon], max_steps=300, logger=CSVLogger(tmp_path, name="b"))
    trainer.fit(model, make_loader(), ckpt_path=tmp_path / "ck" / "step=150.ckpt")

    (replan,) = of_kind(surgeon, EventKind.REPLAN)
    assert replan.step == 150 and "the 150 steps already done count" in replan.reason
    # the default linear decay starts at once: no hold, so no decay_start
    kinds = [EventKind.REPLAN, EventKind.DECAY_START, EventKind.DONE]  # the default's hold
    assert [e.kind for e in surgeon.events] == kinds
    plan = Controller(300, surgeon.config)  # the plan from step 150, no loss changing it
    plan.start_at(150)
    lrs = [r["lrs"][0][0] for r in model.records]
    assert lrs == [PEAK * plan.lr_scale(t) for t in range(150, 300)]
    assert lrs[0] == PEAK and lrs[-1] < 0.15 * PEAK  # the configured LR, no ramp; the decay
    assert surgeon.step == 300
    with (Path(trainer.log_dir) / "metrics.csv").open() as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row["lr-SGD"]]
    assert steps[0] == 150 and steps[-1] == 299


class Scheduled(TinyRegressor):
    """SGD at ``PEAK`` with the LR scheduler ``make_scheduler`` makes, stepped every step
    (``scheduled=False``: the module returns the optimizer alone)."""

    def __init__(self, scheduled: bool = True) -> None:
        super().__init__()
        self.with_scheduler = scheduled

    @staticmethod
    def make_scheduler(optimizer: torch.optim.Optimizer) -> Any:
        raise NotImplementedError

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=PEAK, momentum=0.9)
        if not self.with_scheduler:
            return optimizer
        scheduler = self.make_scheduler(optimizer)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


class OneCycle(Scheduled):
    """``OneCycleLR(max_lr=PEAK)`` over 300 steps."""

    @staticmethod
    def make_scheduler(optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=PEAK, total_steps=300)


@pytest.mark.parametrize("scheduled", [True, False], ids=["onecycle-returned", "none-returned"])
def test_a_resume_from_a_one_cycle_run_without_the_surgeon_peaks_at_its_max_lr(
    make_trainer: Callable[..., Any], tmp_path: Path, scheduled: bool
) -> None:
    """A ``OneCycleLR`` run checkpointed at step 150 without the surgeon leaves ``initial_lr =
    max_lr / 25`` in its param groups; resumed with the surgeon (the module still returning the
    scheduler, or no longer), the peak is ``max_lr``, not 1/25 of it."""
    ckpt = ModelCheckpoint(tmp_path / "ck", "{step}", every_n_train_steps=150, save_top_k=-1)
    make_trainer([ckpt], max_steps=150, enable_checkpointing=True).fit(OneCycle(), make_loader())
    surgeon, model = ScheduleSurgeon(), OneCycle(scheduled)
    trainer = make_trainer([surgeon], max_steps=300)
    trainer.fit(model, make_loader(), ckpt_path=tmp_path / "ck" / "step=150.ckpt")
    lrs = [r["lrs"][0][0] for r in model.records]
    assert lrs[0] == pytest.approx(PEAK) and max(lrs) == pytest.approx(PEAK)
    assert lrs[-1] < 0.15 * PEAK  # and it decays from there


class Cyclic(Scheduled):
    """``CyclicLR(base_lr=PEAK / 10, max_lr=PEAK)``, cycles of 80 steps."""

    @staticmethod
    def make_scheduler(optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.CyclicLR(
            optimizer, base_lr=PEAK / 10, max_lr=PEAK, step_size_up=40
        )


@pytest.mark.parametrize("scheduled", [True, False], ids=["cyclic-returned", "none-returned"])
def test_a_resume_from_a_cyclic_run_without_the_surgeon_peaks_at_its_base_lr(
    make_trainer: Callable[..., Any], tmp_path: Path, scheduled: bool
) -> None:
    """Not recoverable: a ``CyclicLR`` run keeps its ``max_lr`` in the scheduler alone; its param
    groups hold ``initial_lr = base_lr`` and, at the step-150 checkpoint, an LR a quarter of the
    way up from it. Resumed with the surgeon, ``base_lr`` is the peak (documented): the first
    LR, the highest, and the decay goes from it to the floor."""
    ckpt = ModelCheckpoint(tmp_path / "ck", "{step}", every_n_train_steps=150, save_top_k=-1)
    first = Cyclic()
    make_trainer([ckpt], max_steps=150, enable_checkpointing=True).fit(first, make_loader())
    saved = torch.load(tmp_path / "ck" / "step=150.ckpt", weights_only=False)
    (group,) = saved["optimizer_states"][0]["param_groups"]
    assert group["initial_lr"] == pytest.approx(PEAK / 10)
    assert group["lr"] == pytest.approx(PEAK / 10 + 0.25 * (PEAK - PEAK / 10))
    assert max(r["lrs"][0][0] for r in first.records) == pytest.approx(PEAK)  # it peaked at max_lr

    surgeon, model = ScheduleSurgeon(), Cyclic(scheduled)
    trainer = make_trainer([surgeon], max_steps=300)
    trainer.fit(model, make_loader(), ckpt_path=tmp_path / "ck" / "step=150.ckpt")
    (replan,) = of_kind(surgeon, EventKind.REPLAN)
    assert replan.step == 150
    lrs = [r["lrs"][0][0] for r in model.records]
    assert lrs[0] == pytest.approx(PEAK / 10) and max(lrs) == pytest.approx(PEAK / 10)
    assert lrs[-1] < 0.15 * PEAK / 10  # and it decays from there


# ---------------------------------------------------------------------------- 7. param groups
class AddsGroup(pl.Callback):
    """Adds ``model.extra`` as a param group with ``lr`` at the start of step ``step``."""

    def __init__(self, step: int, lr: float) -> None:
        self.step, self.lr = step, lr

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.optimizers[0].add_param_group({"params": [pl_module.extra], "lr": self.lr})


class WithExtra(TinyRegressor):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.extra = nn.Parameter(torch.zeros(3))  # not in the optimizer until added


@pytest.mark.parametrize(
    ("surgeon_kw", "max_steps", "add_at", "lr"),
    [({}, 60, 20, 0.0), ({"total_steps": 30, "min_lr_ratio": 0.0}, 50, 40, 0.01)],
    ids=["lr-zero", "scale-zero"],
)
def test_a_param_group_added_mid_fit_never_crashes_it(
    make_trainer: Callable[..., Any], surgeon_kw: dict, max_steps: int, add_at: int, lr: float
) -> None:
    """A group added with LR 0 stays at 0 (its peak is 0); one added while the LR scale is 0
    (past the plan with ``min_lr_ratio=0``) takes its LR as its peak (and so stays at 0 with the
    rest: ``test_a_param_group_added_at_lr_scale_zero_peaks_at_its_lr`` shows the peak at
    work)."""
    surgeon, model = ScheduleSurgeon(**surgeon_kw), WithExtra()
    trainer = make_trainer([surgeon, AddsGroup(add_at, lr)], max_steps=max_steps)
    trainer.fit(model, make_loader())
    assert surgeon.step == max_steps
    added = [r["lrs"][0][1] for r in model.records if r["step"] > add_at]
    assert added and all(value == 0.0 for value in added)
    assert trainer.optimizers[0].param_groups[1][PEAK_LR_KEY] == lr


class WithExtraGroup(WithExtra):
    """``WithExtra`` whose optimizer has ``extra`` as its second param group from the start
    (LR 0.01), as a module resumed from a checkpoint of an ``AddsGroup`` fit makes it."""

    def configure_optimizers(self) -> Any:
        groups = [{"params": list(self.net.parameters())}, {"params": [self.extra], "lr": 0.01}]
        return torch.optim.SGD(groups, lr=PEAK, momentum=0.9)


def test_a_param_group_added_at_lr_scale_zero_peaks_at_its_lr(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """A group added with LR 0.01 while the LR scale is 0 (past a 30-step plan with
    ``min_lr_ratio=0``) gets 0.01 as its peak: it trains at 0 like the rest, the checkpoint keeps
    the peak in its param group, and once the scale rises again (resumed with
    ``min_lr_ratio=0.5``: the floor, where a finished plan stays, is half the peak) its LR is
    0.01 x 0.5, beside the first group's ``PEAK`` x 0.5."""
    ckpt = ModelCheckpoint(tmp_path / "ck", "{step}", every_n_train_steps=50, save_top_k=-1)
    surgeon, model = ScheduleSurgeon(total_steps=30, min_lr_ratio=0.0), WithExtra()
    make_trainer([surgeon, AddsGroup(40, 0.01), ckpt], max_steps=50, enable_checkpointing=True).fit(
        model, make_loader()
    )
    assert {tuple(r["lrs"][0]) for r in model.records if r["step"] > 40} == {(0.0, 0.0)}
    path = tmp_path / "ck" / "step=50.ckpt"
    saved = torch.load(path, weights_only=False)["optimizer_states"][0]["param_groups"]
    assert [g[PEAK_LR_KEY] for g in saved] == [PEAK, 0.01]

    surgeon = ScheduleSurgeon(total_steps=30, min_lr_ratio=0.5)
    model = WithExtraGroup()
    make_trainer([surgeon], max_steps=60).fit(model, make_loader(), ckpt_path=path)
    (replan,) = of_kind(surgeon, EventKind.REPLAN)
    assert "min_lr_ratio=0.5 instead of 0.0" in replan.reason
    lrs = [r["lrs"][0] for r in model.records]
    assert len(lrs) == 10 and lrs == [pytest.approx([PEAK * 0.5, 0.01 * 0.5], rel=1e-12)] * 10


# ---------------------------------------------------------------------------- 8. GradScaler
def test_a_collapsing_gradscaler_scale_is_a_fault(make_trainer: Callable[..., Any]) -> None:
    """fp16 with a real inf gradient (finite loss) 20 steps in a row: GradScaler skips each
    and halves its scale (calibration: those steps are counted without their loss). Once the
    scale is down to 1 the gradients overflow unscaled: those are non-finite steps, counted and
    recorded; three in a row roll back (the 16 skipped steps before them, undone at no cost, do
    not count against its reach: without that allowance the rollback was refused as 28 steps
    back), which also puts back
    the scale saved with the snapshot: the step after the undone ones starts with exactly that
    scale, not the collapsed one."""
    from pytorch_lightning.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    surgeon = ScheduleSurgeon()
    model = Net(inf_grad_at=frozenset(range(100, 120)))

    class ScaleAtStepStart(pl.Callback):
        """(the surgeon's step, GradScaler's scale) as each batch starts, after the surgeon's
        own hook took the step's snapshot if one was due: the scale such a snapshot holds."""

        def __init__(self) -> None:
            self.seen: list[tuple[int, float]] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self.seen.append((surgeon.step, scaler.get_scale()))

    scales = ScaleAtStepStart()
    make_trainer([surgeon, scales], max_steps=300, plugins=[plugin]).fit(model, make_loader())

    skipped = of_kind(surgeon, EventKind.SKIPPED_STEP)
    assert len(skipped) >= 3 and "gradients are non-finite" in skipped[0].reason
    (rollback,) = of_kind(surgeon, EventKind.ROLLBACK)
    assert "3 non-finite steps in a row" in rollback.reason
    assert_within_bound(surgeon)
    assert surgeon.step == 300 and surgeon.phase is Phase.DONE  # skipped steps are counted
    assert surgeon.skipped_steps == 16  # calibration: the drops from 2**16 down to 1
    # 16 of the steps it undid had no update (they lose nothing undone, so they do not count
    # against the rollback's reach): the reason says so
    assert re.search(r"\(\d+ steps, \d+ with an update\)$", rollback.reason)
    # the step after the undone ones starts with the scale saved with the snapshot (taken at
    # the first start of its step) restored, not the collapsed one the undone steps left
    undone = re.search(r"undoing the updates of steps (\d+) to (\d+)", rollback.reason)
    assert undone and int(undone[1]) == rollback_target(rollback)
    target, after = int(undone[1]), int(undone[2]) + 1
    saved = next(scale for step, scale in scales.seen if step == target)
    resumed = next(i for i, (step, _) in enumerate(scales.seen) if step == after)
    assert saved == 2.0**16  # before the collapse
    assert scales.seen[resumed - 1][1] < 1.0  # the last undone step's: collapsed below 1
    assert scales.seen[resumed][1] == saved
    assert_finite(model)


# ---------------------------------------------------------------------------- 9. manual
class UnequalSteps(TinyRegressor):
    """Manual optimization, one optimizer per layer; the second steps every 5th batch."""

    def __init__(self) -> None:
        super().__init__((PEAK, PEAK / 5), manual=True)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        first, second = self.optimizers()
        lrs = [[g["lr"] for g in opt.param_groups] for opt in (first, second)]
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.records.append({"step": self.global_step, "lrs": lrs, "loss": loss.item()})
        self.manual_backward(loss)
        first.step()
        if batch_idx % 5 == 0:
            second.step()
        first.zero_grad()
        second.zero_grad()
        return loss


def test_manual_optimization_with_unequal_optimizer_steps_replans(
    make_trainer: Callable[..., Any],
) -> None:
    """``max_steps=600`` counts every ``opt.step()``: 1.2 per batch here, so 500 batches, not
    the 300 planned for two optimizers stepping every batch. The surgeon sees it from the
    steps per batch, re-plans early (an event) and reaches the floor at the last batch."""
    surgeon = ScheduleSurgeon(decay="wsd", wsd_decay_fraction=0.2, min_lr_ratio=0.1)
    model = UnequalSteps()
    make_trainer([surgeon], max_steps=600).fit(model, make_loader())
    assert len(model.records) == 500
    (replan,) = of_kind(surgeon, EventKind.REPLAN)
    assert replan.step <= 20 and "about 500 steps, not 300" in replan.reason
    lrs = [r["lrs"][0][0] for r in model.records]
    assert lrs[300] == PEAK  # still at the peak at 60% (wsd)
    assert [e.step for e in of_kind(surgeon, EventKind.DONE)] == [499]  # the plan ends with it
    assert lrs[-1] < 0.12 * PEAK


# ---------------------------------------------------------------------------- 10. no progress
@pytest.mark.parametrize("setup", ["unguarded", "guarded", "lbfgs"])
def test_a_run_that_cannot_make_progress_stops_with_an_error(
    make_trainer: Callable[..., Any], setup: str
) -> None:
    """NaN from step 0 on: no snapshot is ever good, every step is non-finite. After two
    snapshot intervals the fit stops with an error naming the steps and the cause, instead of
    finishing with NaN (unguarded, LBFGS) or unchanged (guarded) weights."""
    surgeon = ScheduleSurgeon(skip_nonfinite="off" if setup == "unguarded" else "auto")
    model = Net(optimizer="lbfgs" if setup == "lbfgs" else "sgd", loss_hook=lambda s, b, x: nan(x))
    trainer = make_trainer([surgeon], max_steps=300)
    with pytest.raises(TrainingStalled) as raised:
        trainer.fit(model, make_loader())
    stall = 2 * surgeon.controller.snapshot_every
    message = str(raised.value)
    assert f"step {stall - 1}: {stall} non-finite steps in a row (steps 0 to {stall - 1}" in message
    assert "nothing to roll back to (no good snapshot yet)" in message
    assert "keeps no snapshots" not in message  # it keeps them: none was ever good
    assert trainer.global_step < 300


# ---------------------------------------------------------------------------- faults at the start
class WeightsAtStepStart(pl.Callback):
    """A copy of the weights as each step starts."""

    def __init__(self) -> None:
        self.at: dict[int, list[Tensor]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.at[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]


@pytest.mark.parametrize("bad", [(0, 1), (0, 1, 2)], ids=["steps-0-1", "steps-0-2"])
def test_faults_before_the_first_snapshots_loss_is_read_are_skipped_and_cut(
    make_trainer: Callable[..., Any], bad: tuple[int, ...]
) -> None:
    """NaN losses on the first steps of a fit, before the loss of any snapshot is read (no
    snapshot is good yet): nothing is rolled back; each NaN step is skipped (weights untouched)
    and the first cuts the LR (a ``nonfinite`` event lowering the scale; the LRs from the step
    it takes effect at are below a clean run's, whose ramp they followed until then). Three in
    a row, which roll back later in a run (the control, at steps 50-52), say why they do not."""

    def fit(loss_hook: FaultHook | None) -> tuple[ScheduleSurgeon, Net, WeightsAtStepStart]:
        surgeon, model, weights = ScheduleSurgeon(), Net(loss_hook=loss_hook), WeightsAtStepStart()
        make_trainer([surgeon, weights], max_steps=100).fit(model, make_loader())
        return surgeon, model, weights

    surgeon, model, weights = fit(at(set(bad), nan))
    assert not of_kind(surgeon, EventKind.ROLLBACK)
    for step in bad:
        kinds = [e.kind for e in surgeon.events if e.step == step]
        assert kinds == [EventKind.NONFINITE, EventKind.SKIPPED_STEP], step
    assert all(
        torch.equal(a, b) for a, b in zip(weights.at[0], weights.at[len(bad)], strict=True)
    ), "a skipped step changed the weights"
    assert_finite(model)

    first = of_kind(surgeon, EventKind.NONFINITE)[0]
    assert first.step == 0 and first.scale_after < first.scale_before
    match = re.search(r"LR multiplier cut x0\.5 to 0\.5 from step (\d+)", first.reason)
    assert match, first.reason
    cut_from = int(match[1])  # read back a block late: the ramp went on until then
    _, clean_model, _ = fit(None)
    lrs = [r["lrs"][0][0] for r in model.records]
    clean = [r["lrs"][0][0] for r in clean_model.records]
    assert 0 < cut_from < 20 and lrs[:cut_from] == clean[:cut_from]
    assert all(lrs[t] < clean[t] / 2 for t in range(cut_from, cut_from + 4))

    if len(bad) == 3:
        (third,) = [e for e in of_kind(surgeon, EventKind.NONFINITE) if e.step == 2]
        assert (
            "3 non-finite steps in a row (rollback_nonfinite=3), but no rollback: no good "
            "snapshot yet" in third.reason
        )
        later, _, _ = fit(at({50, 51, 52}, nan))
        assert [e.step for e in of_kind(later, EventKind.ROLLBACK)] == [52]


# ---------------------------------------------------------------------------- settings on resume
def _saved_at_150(make_trainer: Callable[..., Any], tmp_path: Path) -> tuple[Path, list[float]]:
    """A 300-step run's step-150 checkpoint and its LRs (no plateau cuts: patience = the run)."""
    ckpt = ModelCheckpoint(tmp_path / "ck", "{step}", every_n_train_steps=150, save_top_k=-1)
    surgeon = ScheduleSurgeon(plateau_patience=1.0, decay="wsd", min_lr_ratio=0.1)
    model = TinyRegressor()
    make_trainer([surgeon, ckpt], max_steps=300, enable_checkpointing=True).fit(
        model, make_loader()
    )
    return tmp_path / "ck" / "step=150.ckpt", [r["lrs"][0][0] for r in model.records]


def test_another_decay_shape_on_resume_replans_the_rest(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """Saved with ``wsd`` (holding the peak at step 150), resumed with ``decay="cosine"``: a
    ``replan`` naming the setting, then a cosine decay from the current LR to the floor over
    the 150 steps left."""
    path, _ = _saved_at_150(make_trainer, tmp_path)
    surgeon = ScheduleSurgeon(plateau_patience=1.0, decay="cosine", min_lr_ratio=0.1)
    model = TinyRegressor()
    make_trainer([surgeon], max_steps=300).fit(model, make_loader(), ckpt_path=path)
    (replan,) = of_kind(surgeon, EventKind.REPLAN)
    assert replan.step == 150 and "decay='cosine' instead of 'wsd'" in replan.reason
    assert replan.scale_before == replan.scale_after == 1.0  # no jump
    curve = schedules.decay_shape("cosine", 1.0, 0.1, 150)
    lrs = [r["lrs"][0][0] for r in model.records]
    assert lrs == pytest.approx([PEAK * curve(t) for t in range(150)], rel=1e-9)


def test_another_wsd_decay_fraction_on_resume_replans_the_rest(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """Saved with ``wsd`` and its default ``wsd_decay_fraction=0.5`` while holding the peak at
    step 150 (its decay starts at about step 165), resumed with 0.2: a ``replan`` naming the
    setting, then the rest planned with the new fraction: the peak held over 80% of the 150
    steps left, a linear decay to the floor over the last 20% (30 steps)."""
    path, lrs_a = _saved_at_150(make_trainer, tmp_path)
    surgeon = ScheduleSurgeon(
        plateau_patience=1.0, decay="wsd", wsd_decay_fraction=0.2, min_lr_ratio=0.1
    )
    model = TinyRegressor()
    make_trainer([surgeon], max_steps=300).fit(model, make_loader(), ckpt_path=path)
    (replan,) = of_kind(surgeon, EventKind.REPLAN)
    assert replan.step == 150 and "wsd_decay_fraction=0.2 instead of 0.5" in replan.reason
    assert replan.scale_before == replan.scale_after == 1.0  # no jump
    tail = schedules.decay_shape("linear", 1.0, 0.1, 30)
    expected = [PEAK] * 120 + [PEAK * tail(t) for t in range(30)]
    lrs = [r["lrs"][0][0] for r in model.records]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs_a[150] == PEAK > lrs_a[200]  # the saved plan's decay was under way by then


def test_another_floor_on_resume_takes_full_effect(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """Resumed with ``min_lr_ratio=0.01`` instead of 0.1 while holding the peak: the same plan
    (the same hold, the same decay steps), now decaying to the new floor, with a ``replan``
    event that names the setting."""
    path, lrs_a = _saved_at_150(make_trainer, tmp_path)
    surgeon = ScheduleSurgeon(plateau_patience=1.0, decay="wsd", min_lr_ratio=0.01)
    model = TinyRegressor()
    make_trainer([surgeon], max_steps=300).fit(model, make_loader(), ckpt_path=path)
    (replan,) = of_kind(surgeon, EventKind.REPLAN)
    assert "min_lr_ratio=0.01 instead of 0.1" in replan.reason
    lrs = [r["lrs"][0][0] for r in model.records]
    # each LR is as far between the peak and the new floor as the saved run's between the
    # peak and its floor
    expected = [PEAK * 0.01 + (lr - PEAK * 0.1) * 0.99 / 0.9 for lr in lrs_a[150:]]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[-1] < lrs_a[-1]


def test_another_peak_lr_mode_on_resume_is_refused(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """``peak_lr`` cannot take effect on a resume (the peaks come from the checkpoint and no
    range test runs): refused with a message saying how to go on."""
    path, _ = _saved_at_150(make_trainer, tmp_path)
    surgeon = ScheduleSurgeon(plateau_patience=1.0, peak_lr="find")
    trainer = make_trainer([surgeon], max_steps=300)
    with pytest.raises(ValueError, match=r"peak_lr='find' differs .* resume with peak_lr="):
        trainer.fit(TinyRegressor(), make_loader(), ckpt_path=path)


# ---------------------------------------------------------------------------- the fault matrix
FAULT_STEP, MATRIX_STEPS, MATRIX_BATCHES = 100, 500, 50
"""Long enough on enough data (800 samples, no overfitting) for the loss to settle at its noise
floor, where a step lost or a while at a cut LR costs little: what "nothing lost" promises."""
MATRIX: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (the configuration, shared with its clean run; the fault)
    "nan-x1": ({}, {"loss_hook": at({FAULT_STEP}, nan)}),
    "nan-x5": ({}, {"loss_hook": at(set(range(FAULT_STEP, FAULT_STEP + 5)), nan)}),
    "inf-grad": ({}, {"inf_grad_at": frozenset({FAULT_STEP})}),
    "nan-last-steps": ({}, {"loss_hook": at(set(range(MATRIX_STEPS - 4, MATRIX_STEPS)), nan)}),
    "nan-steps-0-1": ({}, {"loss_hook": at({0, 1}, nan)}),
    "spike-x1000": ({}, {"loss_hook": at({FAULT_STEP}, lambda loss: loss * 1000)}),
    "spike-x1e30": ({}, {"loss_hook": at({FAULT_STEP}, lambda loss: loss * 1e30)}),
    "level-shift": ({}, {"loss_hook": lambda s, b, loss: loss + 10.0 if s >= 150 else loss}),
    "bf16-mixed": ({"precision": "bf16-mixed"}, {"loss_hook": at({FAULT_STEP}, nan)}),
    "accumulation-nan-micro-batch": (
        {"accumulate_grad_batches": 2},
        {"loss_hook": lambda s, b, loss: nan(loss) if s == FAULT_STEP and b % 2 else loss},
    ),
    "fused-sgd": ({"optimizer": "fused-sgd"}, {"loss_hook": at({FAULT_STEP}, nan)}),
    "fused-adam": ({"optimizer": "fused-adam"}, {"loss_hook": at({FAULT_STEP}, nan)}),
    "fused-adagrad": ({"optimizer": "fused-adagrad"}, {"loss_hook": at({FAULT_STEP}, nan)}),
    "3-param-groups": ({"groups": 3}, {"loss_hook": at({FAULT_STEP}, nan)}),
    "batchnorm-nan-input": ({"batchnorm": True}, {"nan_input_at": frozenset({FAULT_STEP})}),
    "stale-target": (
        {},
        {"loss_hook": at(set(range(25, MATRIX_STEPS, 50)) | {400, 401, 402, 403}, nan)},
    ),
    "fp16-scale-collapse": (
        {"precision": "16-mixed"},
        {"inf_grad_at": frozenset(range(FAULT_STEP, FAULT_STEP + 20))},
    ),
}
TRAINER_KEYS = ("precision", "accumulate_grad_batches")
_CLEAN_LOSS: dict[str, float] = {}


def _fit(make_trainer: Callable[..., Any], surgeon: ScheduleSurgeon, kwargs: dict) -> Net:
    """Fit ``Net(**kwargs)`` (trainer settings taken out of ``kwargs``) for MATRIX_STEPS."""
    trainer_kw = {k: kwargs.pop(k) for k in TRAINER_KEYS if k in kwargs}
    if trainer_kw.get("precision") == "16-mixed":  # on CPU: torch's CPU GradScaler
        from pytorch_lightning.plugins import MixedPrecision

        scaler = torch.amp.GradScaler("cpu")
        trainer_kw = {"plugins": [MixedPrecision(trainer_kw.pop("precision"), "cpu", scaler)]}
    model = Net(**kwargs)
    loader = make_loader(batches=MATRIX_BATCHES)
    make_trainer([surgeon], max_steps=MATRIX_STEPS, **trainer_kw).fit(model, loader)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MATRIX))
def test_fault_matrix(make_trainer: Callable[..., Any], name: str) -> None:
    """Every fault: the fit finishes with finite weights and buffers, no rollback undoes more
    than the bound, and the final loss is within 5% of the same configuration's clean run."""
    config, fault = MATRIX[name]
    key = json.dumps(config, sort_keys=True)
    data = make_loader(batches=MATRIX_BATCHES)
    if key not in _CLEAN_LOSS:
        _CLEAN_LOSS[key] = eval_loss(_fit(make_trainer, ScheduleSurgeon(), dict(config)), data)
    surgeon = ScheduleSurgeon()
    model = _fit(make_trainer, surgeon, {**config, **fault})
    assert_finite(model)
    assert_within_bound(surgeon)
    assert eval_loss(model, data) == pytest.approx(_CLEAN_LOSS[key], rel=0.05)


@pytest.mark.slow
def test_fault_matrix_ddp_nan_on_one_rank(tmp_path: Path) -> None:
    """Two ranks (gloo) with a BatchNorm layer: a NaN loss on rank 1 alone at step 30, a NaN
    input on rank 1 alone at step 50 (its running statistics go NaN, rank 0's do not). Both
    ranks skip both steps and decide the same (events and controller state equal, the buffer
    repair included), the weights stay finite and equal, buffers finite, no rollback undoes
    more than the bound, and the final loss is at most 5% above a clean two-rank run's."""
    from test_ddp import run_worker

    common = ["--steps=80", "--spike-step=-1", "--batchnorm"]
    (tmp_path / "clean").mkdir()
    (tmp_path / "nan").mkdir()
    clean = run_worker(tmp_path / "clean", *common)
    faulty = run_worker(
        tmp_path / "nan", *common, "--nan-step=30", "--nan-input-step=50", "--spike-rank=1"
    )
    for records in (clean, faulty):
        assert records[0]["events"] == records[1]["events"]
        assert records[0]["controller"] == records[1]["controller"]
        assert records[0]["weights"] == records[1]["weights"]
        assert all(math.isfinite(w) for w in records[0]["weights"])
        assert all(r["buffers_finite"] for r in records)
    events = faulty[0]["events"]
    assert [30, "skipped_step"] in events and [50, "skipped_step"] in events
    assert [50, "buffers_restored"] in events
    state = json.loads(faulty[0]["controller"])
    bound = 2 * 10 + 2 * 4  # 2 x snapshot_every (at least 10) + 2 x readback_every
    for event in state["events"]:
        if event["kind"] == "rollback":
            assert int(re.search(r"\((\d+) steps\)$", event["reason"]).group(1)) <= bound
    assert faulty[0]["eval_loss"] <= 1.05 * clean[0]["eval_loss"]  # the faults cost < 5%


@pytest.mark.parametrize("bad", [100, 99], ids=["at-a-snapshot", "just-before-a-snapshot"])
def test_an_outliers_damage_that_shows_later_is_rolled_back_to_before_it(
    make_trainer: Callable[..., Any], bad: int
) -> None:
    """One x1000 batch under Adam at step 100: the next loss is normal (an ``outlier``, no
    action), but Adam's momentum goes on pushing along that gradient; the loss that climbs a
    few steps later is a confirmed spike, and the rollback restores the snapshot from before
    the bad batch, Adam's moments included: they end the fit as in a run without it. At step
    99 the snapshot of step 100 holds the bad update and its own loss is normal: it never
    becomes the target (it did: the rollback restored the x1e6 second moment, and a `climb`
    lowered the peak later)."""

    def fitted(loss_hook: FaultHook | None) -> tuple[ScheduleSurgeon, float]:
        surgeon = ScheduleSurgeon()
        model = Net(optimizer="fused-adam", loss_hook=loss_hook)
        trainer = make_trainer([surgeon], max_steps=200)
        trainer.fit(model, make_loader())
        state = trainer.optimizers[0].state.values()
        return surgeon, max(s["exp_avg_sq"].max().item() for s in state)

    _, clean = fitted(None)
    surgeon, hit = fitted(at({bad}, lambda loss: loss * 1000))
    assert [e.kind for e in surgeon.events if e.step == bad + 1] == [EventKind.OUTLIER]
    (spike,) = of_kind(surgeon, EventKind.SPIKE)
    (rollback,) = of_kind(surgeon, EventKind.ROLLBACK)
    assert bad + 1 < spike.step == rollback.step < 120 and rollback_target(rollback) < bad
    assert not of_kind(surgeon, EventKind.CLIMB)
    assert_within_bound(surgeon)
    assert hit < 10 * clean  # the x1e6 squared gradient did not survive the rollback


@pytest.mark.parametrize(
    ("optimizer", "hard_batch"), [("fused-adam", False), ("adagrad", False), ("fused-adam", True)]
)
def test_an_outlier_that_overflows_the_optimizers_state_is_rolled_back(
    make_trainer: Callable[..., Any], optimizer: str, hard_batch: bool
) -> None:
    """A x1e30 loss at step 100: its gradient is finite (the guard lets it through), but its
    square is not: Adam's second moment (Adagrad's sum) becomes inf, every later update of
    those weights is 0, and the next loss is normal (an ``outlier``). A severe outlier is where
    such a gradient comes from: the state is checked as it is dismissed, and the run rolls back
    to the snapshot before the bad batch: the state ends finite, and the fit ends close to a
    clean one (before: the weights froze, the final loss 7.9x a clean run's in a user trial).
    With an ordinary hard batch (x20) at step 105 too, the same."""

    def fitted(loss_hook: FaultHook | None) -> tuple[ScheduleSurgeon, Any, float]:
        surgeon = ScheduleSurgeon()
        model = Net(
            optimizer="fused-adam" if optimizer == "fused-adam" else "sgd", loss_hook=loss_hook
        )
        if optimizer == "adagrad":
            model.optimizer_name = "fused-adagrad"
        trainer = make_trainer([surgeon], max_steps=300)
        trainer.fit(model, make_loader())
        return surgeon, trainer.optimizers[0], eval_loss(model)

    def faults(factors: dict[int, float]) -> FaultHook:
        return lambda step, _, loss: loss * factors[step] if step in factors else loss

    hard = {105: 20.0} if hard_batch else {}
    _, _, clean = fitted(faults(hard))
    surgeon, opt, hit = fitted(faults({100: 1e30, **hard}))
    assert [e.kind for e in surgeon.events if e.step == 101] == [
        EventKind.OUTLIER,
        EventKind.ROLLBACK,
    ]
    (rollback,) = of_kind(surgeon, EventKind.ROLLBACK)
    assert "found right after the severe outlier at step 100" in rollback.reason
    assert rollback_target(rollback) < 100
    assert_within_bound(surgeon)
    for state in opt.state.values():
        assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, Tensor))
    assert hit < 1.25 * clean, (hit, clean)  # 1.13x (Adam) and 1.03x (Adagrad) measured


def test_checkpoints_every_step_warn_once_that_nothing_can_roll_back(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """ModelCheckpoint every step: each checkpoint drops the snapshot of the step before it as
    soon as its loss confirms it, so nothing can ever roll back; one warning (Lightning's
    ``rank_zero_warn``) says so. Every 10 steps: none."""

    def fit(every: int) -> list[str]:
        ckpt = ModelCheckpoint(tmp_path / f"ck{every}", "{step}", every_n_train_steps=every)
        trainer = make_trainer([ScheduleSurgeon(), ckpt], max_steps=30, enable_checkpointing=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(TinyRegressor(), make_loader())
        return [str(w.message) for w in caught if "came too close" in str(w.message)]

    (message,) = fit(1)
    assert message.startswith("ScheduleSurgeon: the checkpoints from step 1 to step 3 came too")
    assert fit(10) == []
