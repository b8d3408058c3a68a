"""``ScheduleSurgeon(peak_lr="find")``: Lightning's LR range test sets the peak before training.

A real ``Trainer.fit`` of the tiny MLP of ``conftest`` with two param groups (LR ratio 10):
the peaks become :func:`surgeon.lr_find.suggest_lr`'s suggestion on the test's per-step losses
and a tenth of it, a ``peak_lr`` event is recorded (in the callback, in ``events.jsonl`` and
through a checkpoint), ``lr_find.csv`` holds the curve, a resumed fit does not run the finder
again, and ``surgeon plot`` draws the curve. A fit shorter than ``find_steps`` skips the test, a
suggestion far from the configured LR is warned about, and on the circle example the found peak
trains as well as the configured one (Lightning's own suggestion cost it 0.39 of accuracy).
Lightning's ``_lr_find`` is wrapped (not replaced) to count its calls and catch its result.
"""

import csv
import importlib
import json
import warnings
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyRegressor, make_loader
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.tuner import lr_finder

from surgeon.callback import PEAK_LR_KEY, ScheduleSurgeon
from surgeon.cli import main
from surgeon.controller import Controller, EventKind
from surgeon.lr_find import suggest_lr
from surgeon.recorder import EVENTS_FILE, LR_FIND_FILE

matplotlib.use("Agg")

LRS = (0.1, 0.01)
FIND_STEPS = 30
TOTAL = 40


@pytest.fixture
def finder_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The ``_LRFinder`` objects Lightning's finder returned, one per call."""
    calls: list[Any] = []
    original = lr_finder._lr_find

    def counting(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        calls.append(result)
        return result

    monkeypatch.setattr(lr_finder, "_lr_find", counting)
    return calls


def new_surgeon() -> ScheduleSurgeon:
    return ScheduleSurgeon(
        total_steps=TOTAL, min_warmup=3, max_warmup=5, peak_lr="find", find_steps=FIND_STEPS
    )


def fit(make_trainer: Any, log_dir: Path, surgeon: ScheduleSurgeon, **kwargs: Any) -> Any:
    fit_kwargs = kwargs.pop("fit", {})
    trainer = make_trainer(
        [surgeon], logger=CSVLogger(log_dir, name="", version=""), **{"max_steps": TOTAL, **kwargs}
    )
    trainer.fit(TinyRegressor(lrs=LRS), make_loader(), **fit_kwargs)
    return trainer


def events_file(log_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (log_dir / EVENTS_FILE).read_text().splitlines()]


def read_curve(log_dir: Path) -> list[tuple[float, float]]:
    with (log_dir / LR_FIND_FILE).open(newline="") as f:
        return [(float(row["lr"]), float(row["loss"])) for row in csv.DictReader(f)]


def test_the_finder_sets_the_peaks_keeping_the_group_ratio(
    make_trainer: Any, tmp_path: Path, finder_calls: list[Any], info_lines: list[str]
) -> None:
    surgeon = new_surgeon()
    trainer = fit(make_trainer, tmp_path, surgeon)
    # the finder restores the callbacks from its own checkpoint: a fresh fit, not a resume
    assert not [line for line in info_lines if "resumed at step" in line]
    (finder,) = finder_calls
    # lr_find.csv: the LRs the finder tested and the loss each of its steps returned
    curve = read_curve(tmp_path)
    assert 12 <= len(curve) <= FIND_STEPS
    assert [lr for lr, _ in curve] == [float(lr) for lr in finder.results["lr"]]
    model = trainer.lightning_module
    tested = model.records[: len(curve)]  # the finder's steps come first
    assert [loss for _, loss in curve] == [record["loss"] for record in tested]
    assert [record["lrs"][0][0] for record in tested] == pytest.approx([lr for lr, _ in curve])
    found = suggest_lr(*zip(*curve, strict=True))
    assert found is not None
    suggestion = found.lr

    groups = trainer.optimizers[0].param_groups
    peaks = [g[PEAK_LR_KEY] for g in groups]
    assert peaks == [suggestion * LRS[0] / LRS[0], suggestion * LRS[1] / LRS[0]]
    assert peaks[0] == suggestion
    assert peaks[1] == pytest.approx(suggestion / 10, rel=1e-12)
    # the LRs written for training keep the ratio too
    last = model.records[-1]["lrs"][0]
    assert last[0] / last[1] == pytest.approx(10.0)
    # a group added later without an LR of its own (the optimizer's default, made LRS[0])
    # peaks at the found LR, as the first group does
    assert trainer.optimizers[0].defaults["lr"] == pytest.approx(suggestion, rel=1e-12)

    (event,) = [e for e in surgeon.events if e.kind is EventKind.PEAK_LR]
    assert surgeon.events[0] is event and event.step == 0
    assert f"{suggestion:.4g}" in event.reason and found.reason in event.reason
    assert f"over {len(curve)} steps" in event.reason
    assert f"{curve[0][0]:.3g} to {curve[-1][0]:.3g}" in event.reason
    assert f"first was {LRS[0]:.4g}" in event.reason
    fresh = Controller(TOTAL, surgeon.config)  # the scale at step 1 of the plan, unchanged
    assert event.scale_before == event.scale_after == fresh.lr_scale(1)

    (line,) = [e for e in events_file(tmp_path) if e["kind"] == "peak_lr"]
    assert line["step"] == 0 and line["reason"] == event.reason
    assert line["lr_after"] == pytest.approx(suggestion * event.scale_after)

    # the event survives the controller's state round trip
    again = Controller(TOTAL, surgeon.config)
    again.load_state_dict(surgeon.controller.state_dict())
    assert again.events[0] == event
    # and the module's hook the losses were caught in is its class's again
    assert "on_train_batch_end" not in vars(model)


def test_the_finder_sets_float_peaks_from_tensor_lrs(make_trainer: Any, tmp_path: Path) -> None:
    """Tensor LRs (compiled optimizer steps): the peaks are floats (the run files are JSON) with
    the configured ratio, and the same tensors are driven."""
    surgeon = new_surgeon()
    trainer = make_trainer(
        [surgeon], logger=CSVLogger(tmp_path, name="", version=""), max_steps=TOTAL
    )
    trainer.fit(TinyRegressor(lrs=tuple(torch.tensor(lr) for lr in LRS)), make_loader())
    groups = trainer.optimizers[0].param_groups
    peaks = [g[PEAK_LR_KEY] for g in groups]
    assert all(type(peak) is float for peak in peaks)
    assert peaks[0] / peaks[1] == pytest.approx(10.0, rel=1e-6)
    assert all(isinstance(g["lr"], torch.Tensor) for g in groups)
    assert next(e["kind"] for e in events_file(tmp_path)) == "peak_lr"


def test_a_resumed_fit_keeps_the_peaks_and_does_not_run_the_finder_again(
    make_trainer: Any, tmp_path: Path, finder_calls: list[Any]
) -> None:
    first = fit(make_trainer, tmp_path, new_surgeon(), max_steps=20)
    assert len(finder_calls) == 1
    peaks = [g[PEAK_LR_KEY] for g in first.optimizers[0].param_groups]
    ckpt = tmp_path / "half.ckpt"
    first.save_checkpoint(ckpt)

    surgeon = new_surgeon()
    resumed = fit(make_trainer, tmp_path, surgeon, fit={"ckpt_path": str(ckpt)})
    assert len(finder_calls) == 1, "the finder ran again on resume"
    assert resumed.global_step == TOTAL
    assert [g[PEAK_LR_KEY] for g in resumed.optimizers[0].param_groups] == peaks
    assert [e.kind for e in surgeon.events].count(EventKind.PEAK_LR) == 1
    assert [e["kind"] for e in events_file(tmp_path)].count("peak_lr") == 1
    assert (tmp_path / LR_FIND_FILE).exists()


def test_the_optimizer_default_runs_no_finder(
    make_trainer: Any, tmp_path: Path, finder_calls: list[Any]
) -> None:
    surgeon = ScheduleSurgeon(total_steps=TOTAL, min_warmup=3, max_warmup=5)
    trainer = fit(make_trainer, tmp_path, surgeon)
    assert finder_calls == []
    assert [g[PEAK_LR_KEY] for g in trainer.optimizers[0].param_groups] == list(LRS)
    assert not (tmp_path / LR_FIND_FILE).exists()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"peak_lr": "nope"}, "peak_lr"),
        ({"find_min_lr": 0.0}, "find_min_lr"),
        ({"find_min_lr": 1e-3, "find_max_lr": 1e-4}, "find_max_lr"),
        ({"find_steps": 0}, "find_steps"),
    ],
)
def test_bad_finder_arguments_are_refused(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}="):
        ScheduleSurgeon(**kwargs)


def test_plot_of_a_run_with_a_range_test_writes_a_png(
    make_trainer: Any, tmp_path: Path, finder_calls: list[Any]
) -> None:
    fit(make_trainer, tmp_path, new_surgeon())
    assert main(["plot", str(tmp_path)]) == 0
    data = (tmp_path / "surgeon.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (11 * 110, round(9.5 * 110))  # the third panel makes it taller


def test_a_fit_shorter_than_find_steps_skips_the_range_test(
    make_trainer: Any, tmp_path: Path, finder_calls: list[Any]
) -> None:
    surgeon = ScheduleSurgeon(peak_lr="find", find_steps=FIND_STEPS, min_warmup=3, max_warmup=5)
    message = (
        r"skipped the LR range test: the fit is planned for 29 steps, fewer than find_steps=30; "
        r"keeping the optimizer's configured LRs. Pass find_steps <= 29 to run it anyway."
    )
    with pytest.warns(UserWarning, match=message):
        trainer = fit(make_trainer, tmp_path, surgeon, max_steps=FIND_STEPS - 1)
    assert finder_calls == []
    assert [g[PEAK_LR_KEY] for g in trainer.optimizers[0].param_groups] == list(LRS)
    assert EventKind.PEAK_LR not in [e.kind for e in surgeon.events]
    assert not (tmp_path / LR_FIND_FILE).exists()
    # one step more and it runs
    fit(make_trainer, tmp_path / "long", new_surgeon(), max_steps=FIND_STEPS)
    assert len(finder_calls) == 1


def test_two_optimizers_are_refused_saying_what_to_do_instead(make_trainer: Any) -> None:
    trainer = make_trainer([new_surgeon()], max_steps=TOTAL)
    message = (
        r"ScheduleSurgeon\(peak_lr='find'\) needs exactly one optimizer \(Lightning's LR finder "
        r"drives one\), got 2: pass peak_lr='optimizer' and set each optimizer's LR"
    )
    with pytest.raises(ValueError, match=message):
        trainer.fit(TinyRegressor(lrs=LRS, manual=True), make_loader())


@pytest.mark.parametrize("configured", [1e-6, 3e-3])
def test_a_suggestion_far_from_the_configured_lr_is_warned_about(
    make_trainer: Any, tmp_path: Path, configured: float
) -> None:
    """More than 30x from the configured LR (either way): a warning naming both and the way
    back; within it, none."""
    surgeon = new_surgeon()
    trainer = make_trainer(
        [surgeon], logger=CSVLogger(tmp_path, name="", version=""), max_steps=TOTAL
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyRegressor(lrs=(configured,)), make_loader())
    peak = trainer.optimizers[0].param_groups[0][PEAK_LR_KEY]
    ratio = max(peak / configured, configured / peak)
    warned = [str(w.message) for w in caught if "from the configured" in str(w.message)]
    if ratio > 30:
        assert warned == [
            f"ScheduleSurgeon(peak_lr='find') sets the peak LR to {peak:.3g}, {ratio:.0f}x from "
            f"the configured {configured:.3g} (first param group): check the LR range test's "
            "curve (lr_find.csv, drawn by surgeon plot), or pass peak_lr='optimizer' to keep the "
            "configured LRs"
        ]
    else:
        assert warned == []
    assert (ratio > 30) == (configured == 1e-6)  # the two cases are the two sides of the line


def test_a_range_test_that_shows_nothing_keeps_the_configured_lrs(
    make_trainer: Any, tmp_path: Path
) -> None:
    """LRs too small to move the loss, and no divergence: no suggestion, a warning, the curve
    kept for a look."""
    surgeon = ScheduleSurgeon(
        total_steps=TOTAL, peak_lr="find", find_steps=FIND_STEPS, find_max_lr=2e-7
    )
    with pytest.warns(UserWarning, match=r"the LR range test gave no suggestion \(its loss"):
        trainer = fit(make_trainer, tmp_path, surgeon)
    assert [g[PEAK_LR_KEY] for g in trainer.optimizers[0].param_groups] == list(LRS)
    assert EventKind.PEAK_LR not in [e.kind for e in surgeon.events]
    assert len(read_curve(tmp_path)) == FIND_STEPS


def test_a_range_test_on_a_loss_below_zero_says_it_needs_a_positive_one(
    make_trainer: Any, tmp_path: Path
) -> None:
    """A loss that is negative (a negative ELBO, an NLL of a density): Lightning's finder stops
    at once (a loss above 4x a negative best) and the suggestion reads the log of the loss, so
    the warning names the cause and the fix, not wider bounds; the configured LRs are kept."""
    surgeon = ScheduleSurgeon(total_steps=TOTAL, peak_lr="find", find_steps=FIND_STEPS)
    trainer = make_trainer(
        [surgeon], logger=CSVLogger(tmp_path, name="", version=""), max_steps=TOTAL
    )
    model = TinyRegressor(lrs=LRS, loss_hook=lambda step, batch_idx, loss: loss - 10.0)
    with pytest.warns(UserWarning, match=r"the LR range test needs a positive loss") as warned:
        trainer.fit(model, make_loader())
    assert not [w for w in warned if "Widen find_min_lr" in str(w.message)]
    assert [g[PEAK_LR_KEY] for g in trainer.optimizers[0].param_groups] == list(LRS)
    assert EventKind.PEAK_LR not in [e.kind for e in surgeon.events]


@pytest.mark.slow
def test_the_circle_example_trains_as_well_with_the_found_peak_as_with_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report behind this rule: ``peak_lr="find"`` took the circle example from 0.989 to
    0.60 accuracy (Lightning's suggestion, 6.3e-5 against the configured 0.1). Same seed, same
    400 steps, once with each peak."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    toy_tasks = importlib.import_module("toy_tasks")
    accuracy, peaks = {}, {}
    for mode in ("optimizer", "find"):
        pl.seed_everything(0, verbose=False)
        surgeon = ScheduleSurgeon(peak_lr=mode)
        trainer = toy_tasks.make_trainer(
            tmp_path / mode, 400, surgeon, enable_progress_bar=False, accelerator="cpu"
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(toy_tasks.CircleNet(lr=0.1), toy_tasks.CircleData(seed=0))
        # its loss still falls at find_max_lr=1.0 (the best peak of a sweep is 2.0): said so
        still_falling = [w for w in caught if "was still falling at the end" in str(w.message)]
        assert len(still_falling) == (mode == "find")
        accuracy[mode] = float(trainer.callback_metrics["val_acc"])
        peaks[mode] = trainer.optimizers[0].param_groups[0][PEAK_LR_KEY]
    assert peaks["optimizer"] == 0.1
    assert 0.1 / 3 < peaks["find"] < 0.1 * 3  # the recorded curves put it at 0.085-0.1
    assert accuracy["optimizer"] > 0.95
    assert accuracy["find"] >= accuracy["optimizer"] - 0.02
