"""``surgeon plot`` on a real logged run, and the ``events.jsonl`` it reads.

A short ``Trainer.fit`` of the tiny MLP of ``conftest`` with ``CSVLogger`` and an injected
spike leaves ``metrics.csv`` and ``events.jsonl``; ``surgeon plot`` must turn them into a
PNG whose legend counts exactly the events of the file. The figure is caught on its way to
``plt.close`` (``surgeon/plot.py`` needs no hook for that).

The file and the callback's events must agree across reruns and resumes too: a rerun in
the same directory, a resume after a crash, a callback object reused for a resumed fit, and
a state loaded by ``validate(ckpt_path=...)`` that must not leak into a later fresh fit.
"""

import json
import re
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import torch
from conftest import TinyRegressor, make_loader
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor

from surgeon.callback import EVENTS_FILE, ScheduleSurgeon
from surgeon.cli import main

matplotlib.use("Agg")

STEPS = 60
SPIKE_AT = 40
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def spike_at(step: int) -> Any:
    def hook(global_step: int, batch_idx: int, loss: Tensor) -> Tensor:
        return loss * 20.0 if global_step == step else loss

    return hook


def new_surgeon() -> ScheduleSurgeon:
    return ScheduleSurgeon(min_warmup=5, max_warmup=10, spike_cooldown=3, spike_recovery=5)


def fit(
    make_trainer: Any,
    log_root: Path,
    steps: int = STEPS,
    surgeon: ScheduleSurgeon | None = None,
    logger_class: type = CSVLogger,
    **kwargs: Any,
) -> ScheduleSurgeon:
    """A logged run with warmup and a spike at ``SPIKE_AT``, in ``log_root`` (no version dir)."""
    surgeon = surgeon or new_surgeon()
    fit_kwargs = kwargs.pop("fit", {})
    trainer = make_trainer(
        [surgeon, *kwargs.pop("callbacks", [])],
        max_steps=steps,
        logger=logger_class(log_root, name="", version=""),
        **kwargs,
    )
    trainer.fit(TinyRegressor(loss_hook=spike_at(SPIKE_AT)), make_loader(), **fit_kwargs)
    assert Path(trainer.log_dir) == log_root
    return surgeon


def events_file(log_dir: Path) -> list[dict[str, Any]]:
    lines = (log_dir / EVENTS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, especially on a busy machine."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def caught_figures(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The figures ``plot_run`` closes, left open for inspection (closed after the test)."""
    import matplotlib.pyplot as plt

    close = plt.close
    figures: list[Any] = []
    monkeypatch.setattr(plt, "close", figures.append)
    yield figures
    for figure in figures:
        close(figure)


@pytest.mark.parametrize("logger_class", [CSVLogger, TensorBoardLogger])
def test_plot_of_a_real_run_marks_every_event(
    make_trainer: Any,
    tmp_path: Path,
    caught_figures: list[Any],
    capsys: pytest.CaptureFixture[str],
    logger_class: type,
) -> None:
    surgeon = fit(make_trainer, tmp_path, logger_class=logger_class)
    records = events_file(tmp_path)
    kinds = [record["kind"] for record in records]
    assert len(records) >= 2 and {"warmup_end", "spike"} <= set(kinds)
    assert [(r["step"], r["kind"]) for r in records] == [
        (e.step, e.kind.value) for e in surgeon.events
    ]

    assert main(["plot", str(tmp_path)]) == 0
    out = tmp_path / "surgeon.png"
    assert f"wrote {out}" in capsys.readouterr().out
    assert png_size(out) == (11 * 110, 7 * 110)  # figsize x dpi of plot_run
    assert out.stat().st_size > 20_000  # two panels of curves, not an empty canvas

    (figure,) = caught_figures
    ax_loss, ax_lr = figure.axes[:2]
    # the legend of the LR panel has one "kind (count)" entry per kind of event
    labels = [text.get_text() for text in ax_lr.get_legend().get_texts()]
    counted = {
        match[1]: int(match[2])
        for label in labels
        if (match := re.fullmatch(r"(\w+) \((\d+)\)", label))
    }
    assert counted == Counter(kinds)
    assert sum(counted.values()) == len(records)
    assert {"lr-SGD", "phase: warmup", "phase: decay"} <= set(labels)
    # and each panel has one dashed vertical line per event, at its step
    for ax in (ax_loss, ax_lr):
        marks = sorted(
            line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"
        )
        assert marks == sorted(record["step"] for record in records)
    assert figure._suptitle.get_text().startswith(f"ScheduleSurgeon: {len(records)} events")


def test_plot_out_option_writes_there(make_trainer: Any, tmp_path: Path) -> None:
    fit(make_trainer, tmp_path / "run", steps=20)
    out = tmp_path / "figures" / "run.png"
    assert main(["plot", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert png_size(out)[0] > 0


@pytest.mark.parametrize("what", ["empty", "missing"])
def test_plot_without_metrics_csv_exits_2_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    run_dir = tmp_path / "run"
    if what == "empty":
        run_dir.mkdir()
        (run_dir / EVENTS_FILE).write_text("")  # events alone are not enough
    assert main(["plot", str(run_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"surgeon plot: error: no metrics.csv or TensorBoard event file under {run_dir} "
        "(log the run with CSVLogger or TensorBoardLogger)\n"
    )
    assert not (run_dir / "surgeon.png").exists()


# --------------------------------------------------------------- what events.jsonl holds


def test_a_second_run_in_the_same_log_dir_starts_a_fresh_events_file(
    make_trainer: Any, tmp_path: Path
) -> None:
    """``CSVLogger(version="")`` (as ``surgeon demo`` uses it) reuses the directory and
    rewrites ``metrics.csv``; ``events.jsonl`` must not keep the first run's events."""
    first = fit(make_trainer, tmp_path)
    second = fit(make_trainer, tmp_path)
    assert len(first.events) >= 2
    records = events_file(tmp_path)
    assert [(r["step"], r["kind"]) for r in records] == [
        (e.step, e.kind.value) for e in second.events
    ]


def test_a_resumed_run_in_the_same_log_dir_lists_each_event_once(
    make_trainer: Any, tmp_path: Path
) -> None:
    """A run that wrote events past its last checkpoint (as after a crash), resumed from it
    into the same directory: the file is the restored events plus the new ones, no repeats."""
    ckpt_dir = tmp_path / "ckpt"
    saving = ModelCheckpoint(ckpt_dir, "{step}", every_n_train_steps=30, save_top_k=-1)
    original = fit(make_trainer, tmp_path, callbacks=[saving], enable_checkpointing=True)
    assert any(e.step > 30 for e in original.events)  # events after the checkpoint

    resumed = fit(make_trainer, tmp_path, fit={"ckpt_path": ckpt_dir / "step=30.ckpt"})
    records = events_file(tmp_path)
    assert [(r["step"], r["kind"]) for r in records] == [
        (e.step, e.kind.value) for e in resumed.events
    ]
    assert resumed.events == original.events


class ValidatedRegressor(TinyRegressor):  # type: ignore[misc, valid-type]
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None


def test_a_callback_reused_for_a_resumed_fit_continues_from_the_checkpoint(
    make_trainer: Any, tmp_path: Path
) -> None:
    """The same ``ScheduleSurgeon`` object in a second fit resumed from a checkpoint: the state
    restored must land in the controller that fit builds, not in the previous fit's."""
    ckpt_dir = tmp_path / "ckpt"
    saving = ModelCheckpoint(ckpt_dir, "{step}", every_n_train_steps=30, save_top_k=-1)
    surgeon = fit(make_trainer, tmp_path / "a", callbacks=[saving], enable_checkpointing=True)
    original = list(surgeon.events)

    fit(make_trainer, tmp_path / "b", surgeon=surgeon, fit={"ckpt_path": ckpt_dir / "step=30.ckpt"})
    assert surgeon.step == STEPS
    assert surgeon.events == original
    assert len(events_file(tmp_path / "b")) == len(original)


def test_a_state_loaded_by_validate_is_not_applied_to_a_later_fresh_fit(
    make_trainer: Any, tmp_path: Path
) -> None:
    ckpt_dir = tmp_path / "ckpt"
    saving = ModelCheckpoint(ckpt_dir, "{step}", every_n_train_steps=30, save_top_k=-1)
    surgeon = fit(make_trainer, tmp_path / "a", callbacks=[saving], enable_checkpointing=True)
    original = list(surgeon.events)

    trainer = make_trainer([surgeon])
    trainer.validate(ValidatedRegressor(), make_loader(), ckpt_path=ckpt_dir / "step=30.ckpt")
    fit(make_trainer, tmp_path / "b", surgeon=surgeon)  # fresh: no ckpt_path
    assert surgeon.step == STEPS
    assert surgeon.events == original  # the same run from scratch, not one resumed at step 30
