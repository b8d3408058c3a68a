"""``ScheduleSurgeon(peak_lr="find")``: Lightning's LR range test sets the peak before training.

A real ``Trainer.fit`` of the tiny MLP of ``conftest`` with two param groups (LR ratio 10):
the peaks become the finder's suggestion and a tenth of it, a ``peak_lr`` event is recorded
(in the callback, in ``events.jsonl`` and through a checkpoint), ``lr_find.csv`` holds the
curve, a resumed fit does not run the finder again, and ``surgeon plot`` draws the curve.
Lightning's ``_lr_find`` is wrapped (not replaced) to count its calls and catch its result.
"""

import csv
import json
from pathlib import Path
from typing import Any

import matplotlib
import pytest
from conftest import TinyRegressor, make_loader
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.tuner import lr_finder

from surgeon.callback import EVENTS_FILE, LR_FIND_FILE, PEAK_LR_KEY, ScheduleSurgeon
from surgeon.cli import main
from surgeon.controller import Controller, EventKind

matplotlib.use("Agg")

LRS = (0.1, 0.01)
FIND_STEPS = 30
TOTAL = 20


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


def test_the_finder_sets_the_peaks_keeping_the_group_ratio(
    make_trainer: Any, tmp_path: Path, finder_calls: list[Any]
) -> None:
    surgeon = new_surgeon()
    trainer = fit(make_trainer, tmp_path, surgeon)
    (finder,) = finder_calls
    suggestion = finder.suggestion()
    assert suggestion is not None and suggestion > 0

    groups = trainer.optimizers[0].param_groups
    peaks = [g[PEAK_LR_KEY] for g in groups]
    assert peaks == [suggestion * LRS[0] / LRS[0], suggestion * LRS[1] / LRS[0]]
    assert peaks[0] == suggestion
    assert peaks[1] == pytest.approx(suggestion / 10, rel=1e-12)
    # the LRs written for training keep the ratio too
    model = trainer.lightning_module
    last = model.records[-1]["lrs"][0]
    assert last[0] / last[1] == pytest.approx(10.0)

    (event,) = [e for e in surgeon.events if e.kind is EventKind.PEAK_LR]
    assert surgeon.events[0] is event and event.step == 0
    assert f"{suggestion:.4g}" in event.reason
    rows = list(zip(finder.results["lr"], finder.results["loss"], strict=True))
    assert f"over {len(rows)} steps" in event.reason
    assert f"{rows[0][0]:.3g} to {rows[-1][0]:.3g}" in event.reason
    assert f"first was {LRS[0]:.4g}" in event.reason
    fresh = Controller(TOTAL, surgeon.config)  # the scale at step 1 of the plan, unchanged
    assert event.scale_before == event.scale_after == fresh.lr_scale(1)

    (line,) = [e for e in events_file(tmp_path) if e["kind"] == "peak_lr"]
    assert line["step"] == 0 and line["reason"] == event.reason
    assert line["lr_after"] == pytest.approx(suggestion * event.scale_after)

    with (tmp_path / LR_FIND_FILE).open(newline="") as f:
        table = list(csv.DictReader(f))
    assert 12 <= len(table) <= FIND_STEPS
    assert len(table) == len(rows)
    assert [float(r["lr"]) for r in table] == [float(lr) for lr, _ in rows]

    # the event survives the controller's state round trip
    again = Controller(TOTAL, surgeon.config)
    again.load_state_dict(surgeon.controller.state_dict())
    assert again.events[0] == event


def test_a_resumed_fit_keeps_the_peaks_and_does_not_run_the_finder_again(
    make_trainer: Any, tmp_path: Path, finder_calls: list[Any]
) -> None:
    first = fit(make_trainer, tmp_path, new_surgeon(), max_steps=10)
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
