"""Nothing lost, in real ``Trainer.fit`` runs: non-finite steps are skipped, severe spikes
rolled back.

* A NaN or inf planted in the loss (with non-finite or with finite gradients) or in a
  gradient alone at a known step: the run finishes, weights and optimizer state after that
  step equal those before it (compared tensor by tensor; AdamW's per-parameter step counter
  does not advance), and the events say ``nonfinite`` and ``skipped_step`` at that step. Both
  ways of skipping are exercised: the host check (plain SGD, AdamW) and GradScaler's
  ``found_inf`` (fused SGD, fused AdamW).
* A 1000x loss spike that, with the surgeon off, wrecks the run: with rollback on the run
  ends within 10% of the final loss of a clean run.
"""

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyRegressor, make_loader
from torch import Tensor

from surgeon import ScheduleSurgeon
from surgeon.controller import EventKind

BAD_STEP = 30


class StateRecorder(pl.Callback):
    """Clones every parameter and optimizer-state tensor at the start of each step."""

    def __init__(self) -> None:
        self.at_step: dict[int, list[Tensor]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        optimizer = trainer.optimizers[0]
        state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
        tensors = [*pl_module.parameters(), *state]
        self.at_step[trainer.global_step] = [t.detach().clone() for t in tensors]


class AdamWRegressor(TinyRegressor):
    """The tiny MLP trained by AdamW: its state holds a per-parameter step counter
    (``state["step"]``) beside the moments."""

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.01, fused=self.fused)


def poisoned_model(
    poison: str, fused: bool, value: float = math.nan, optimizer: str = "sgd"
) -> TinyRegressor:
    """``value`` (NaN or inf) planted at ``BAD_STEP``: ``"grad"`` in one gradient (the loss
    stays finite), ``"loss-and-grad"`` times the loss (its gradients non-finite too),
    ``"loss-only"`` plus the loss (its gradients stay finite)."""

    def loss_times(step: int, batch_idx: int, loss: Tensor) -> Tensor:
        return loss * value if step == BAD_STEP else loss

    def loss_plus(step: int, batch_idx: int, loss: Tensor) -> Tensor:
        return loss + value if step == BAD_STEP else loss

    base = AdamWRegressor if optimizer == "adamw" else TinyRegressor
    if poison != "grad":
        hook = loss_times if poison == "loss-and-grad" else loss_plus
        return base(loss_hook=hook, fused=fused)

    class GradPoisoner(base):  # type: ignore[misc, valid-type]
        def on_after_backward(self) -> None:
            if self.global_step == BAD_STEP:
                self.net[0].weight.grad[0, 0] = value

    return GradPoisoner(fused=fused)


def same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def adam_steps(optimizer: torch.optim.Optimizer) -> set[float]:
    """The per-parameter step counters of an Adam-family optimizer (none for SGD)."""
    return {float(s["step"]) for s in optimizer.state.values() if "step" in s}


class StepCounters(pl.Callback):
    """Adam's per-parameter step counters at the start of each step."""

    def __init__(self) -> None:
        self.at_step: dict[int, set[float]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.at_step[trainer.global_step] = adam_steps(trainer.optimizers[0])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "found-inf"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("poison", ["loss-and-grad", "loss-only", "grad"])
def test_a_non_finite_step_is_skipped_and_changes_nothing(
    make_trainer: Callable[..., Any], poison: str, value: float, fused: bool, optimizer: str
) -> None:
    """A NaN or inf in the loss, its gradients or one gradient at ``BAD_STEP``: that step
    changes no weight and no optimizer state (SGD's momentum; AdamW's moments and its
    per-parameter step counter ``state["step"]``, which does not advance: AdamW counts one
    step fewer than the trainer at the end). The trainer's own ``global_step`` does advance
    (Lightning counts the skipped step), and so does the surgeon's, so the plan stays on
    Lightning's steps."""
    # every step's gradients (by default every 8th on the CPU: tests/test_guard.py, the others)
    surgeon, recorder, counters = ScheduleSurgeon(), StateRecorder(), StepCounters()
    model = poisoned_model(poison, fused, value, optimizer)
    trainer = make_trainer([surgeon, recorder, counters], max_steps=60)
    trainer.fit(model, make_loader())
    assert trainer.global_step == 60 and surgeon.step == 60  # finished; the step counts
    before, after = recorder.at_step[BAD_STEP], recorder.at_step[BAD_STEP + 1]
    assert same(after, before), "the non-finite step changed weights or optimizer state"
    assert not same(recorder.at_step[BAD_STEP + 2], after), "the next step was not applied"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    at_bad = [e.kind for e in surgeon.events if e.step == BAD_STEP]
    assert at_bad == [EventKind.NONFINITE, EventKind.SKIPPED_STEP]
    if optimizer == "adamw":  # the step counter: BAD_STEP steps before it, none for it
        assert counters.at_step[BAD_STEP] == counters.at_step[BAD_STEP + 1] == {BAD_STEP}
        assert counters.at_step[BAD_STEP + 2] == {BAD_STEP + 1}
        assert adam_steps(trainer.optimizers[0]) == {59}  # 60 trainer steps, one skipped


def test_without_the_guard_the_same_nan_ruins_the_weights(make_trainer: Callable) -> None:
    """The control: with ``skip_nonfinite='off'`` and no rollback the NaN reaches the weights."""
    surgeon = ScheduleSurgeon(skip_nonfinite="off", snapshot="off")
    model = poisoned_model("grad", fused=False)
    make_trainer([surgeon], max_steps=40).fit(model, make_loader())
    assert any(torch.isnan(p).any() for p in model.parameters())
    assert EventKind.SKIPPED_STEP not in [e.kind for e in surgeon.events]


def test_without_the_guard_a_rollback_repairs_the_nan(make_trainer: Callable) -> None:
    """Unguarded (as on CUDA with a non-fused optimizer), the NaN weights produce NaN losses
    until ``rollback_nonfinite`` of them in a row restore the last good snapshot."""
    surgeon = ScheduleSurgeon(skip_nonfinite="off")
    model = poisoned_model("grad", fused=False)
    make_trainer([surgeon], max_steps=80).fit(model, make_loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rollback = next(e for e in surgeon.events if e.kind is EventKind.ROLLBACK)
    assert rollback.step == BAD_STEP + 1 + 2  # the third non-finite loss in a row
    assert "3 non-finite steps in a row" in rollback.reason


# ---------------------------------------------------------------------------- spikes
SPIKE_STEP, STEPS = 100, 300


def spike_1000x(step: int, batch_idx: int, loss: Tensor) -> Tensor:
    return loss * 1000.0 if step == SPIKE_STEP else loss


def spike_1000x_twice(step: int, batch_idx: int, loss: Tensor) -> Tensor:
    """Steps 100 and 101 x1000: a spike its next loss confirms whatever the LR did."""
    return loss * 1000.0 if step in (SPIKE_STEP, SPIKE_STEP + 1) else loss


def final_loss(callbacks: list[Any], spike: bool, make_trainer: Callable[..., Any]) -> float:
    """Mean training loss of the last 10 steps."""
    model = TinyRegressor(loss_hook=spike_1000x if spike else None)
    make_trainer(callbacks, max_steps=STEPS).fit(model, make_loader())
    losses = [r["loss"] for r in model.records[-10:]]
    return sum(losses) / len(losses)


def test_a_severe_spike_is_rolled_back_and_the_run_ends_as_a_clean_one(
    make_trainer: Callable[..., Any],
) -> None:
    clean = final_loss([ScheduleSurgeon()], spike=False, make_trainer=make_trainer)
    # left alone (no surgeon: constant LR) the spike wrecks the run
    wrecked = final_loss([], spike=True, make_trainer=make_trainer)
    assert not math.isfinite(wrecked) or wrecked > 10 * clean
    # the surgeon without rollback only cuts the LR: still far off
    cut_only = final_loss([ScheduleSurgeon(snapshot="off")], True, make_trainer)
    assert cut_only > 1.5 * clean
    surgeon = ScheduleSurgeon()
    rolled_back = final_loss([surgeon], spike=True, make_trainer=make_trainer)
    assert rolled_back == pytest.approx(clean, rel=0.10)
    kinds = [(e.step, e.kind) for e in surgeon.events]
    acted = SPIKE_STEP + 1  # the loss of the damaged weights confirms the spike
    assert (acted, EventKind.SPIKE) in kinds and (acted, EventKind.ROLLBACK) in kinds
    rollback = next(e for e in surgeon.events if e.kind is EventKind.ROLLBACK)
    assert "restored the snapshot of step 90" in rollback.reason


def test_rollback_is_in_events_jsonl_and_resume_takes_new_snapshots(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """A checkpoint holds no snapshot; the resumed fit takes its own and still rolls back."""
    surgeon = ScheduleSurgeon()
    ckpt = pl.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=60, save_top_k=-1)
    logger = pl.loggers.CSVLogger(tmp_path, name="run", version=0)
    trainer = make_trainer([surgeon, ckpt], max_steps=60, logger=logger, enable_checkpointing=True)
    trainer.fit(TinyRegressor(loss_hook=spike_1000x_twice), make_loader())
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    saved = torch.load(path, weights_only=False)["callbacks"]["ScheduleSurgeon"]
    assert not any(isinstance(v, Tensor) for v in _leaves(saved)), "a snapshot was checkpointed"

    resumed = ScheduleSurgeon()
    trainer = make_trainer([resumed], max_steps=STEPS, logger=logger)
    trainer.fit(TinyRegressor(loss_hook=spike_1000x_twice), make_loader(), ckpt_path=path)
    rollback = next(e for e in resumed.events if e.kind is EventKind.ROLLBACK)
    assert rollback.step == SPIKE_STEP + 1
    assert "restored the snapshot of step 91" in rollback.reason  # taken after the resume
    lines = (Path(trainer.log_dir) / "events.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert {"step": SPIKE_STEP + 1, "kind": "rollback"}.items() <= next(
        e for e in logged if e["kind"] == "rollback"
    ).items()


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list | tuple):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"snapshot": "gpu"}, "snapshot"),
        ({"skip_nonfinite": "sometimes"}, "skip_nonfinite"),
        ({"rollback_threshold": 0.5}, "rollback_threshold"),
        ({"rollback_threshold": math.nan}, "rollback_threshold"),
        ({"rollback_nonfinite": 0}, "rollback_nonfinite"),
        ({"snapshot_every": -3}, "snapshot_every"),
        ({"snapshot_every": 1.5}, "snapshot_every"),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ScheduleSurgeon(**kwargs)


def test_a_nan_in_the_last_steps_is_rolled_back_when_training_ends(
    make_trainer: Callable[..., Any],
) -> None:
    """The losses of the last few steps are still in flight when the loop stops; reading them
    at ``on_train_end`` lets their decisions happen: NaN weights from a NaN gradient 4 steps
    before the end (3 NaN losses follow) are rolled back, so the fit ends with good weights."""
    steps, bad = 60, 56

    class LatePoisoner(TinyRegressor):
        def on_after_backward(self) -> None:
            if self.global_step == bad:
                self.net[0].weight.grad[0, 0] = math.nan

    surgeon = ScheduleSurgeon(skip_nonfinite="off")  # unguarded: the NaN reaches the weights
    recorder = StateRecorder()
    model = LatePoisoner()
    make_trainer([surgeon, recorder], max_steps=steps).fit(model, make_loader())

    assert all(math.isnan(r["loss"]) for r in model.records[bad + 1 :])  # the last 3 steps
    rollback = next(e for e in surgeon.events if e.kind is EventKind.ROLLBACK)
    assert rollback.step == steps - 1 and "3 non-finite steps in a row" in rollback.reason
    target = int(rollback.reason.split("snapshot of step ")[1].split()[0])
    assert target <= bad
    params = [p.detach() for p in model.parameters()]
    assert same(params, recorder.at_step[target][: len(params)])  # back to that step's weights
