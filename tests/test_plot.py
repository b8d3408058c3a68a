"""``surgeon plot``: what it derives from a run (phases, loss, smoothing, LR lines, event styles)
and the figure it draws from a real logged run.

The derived pieces are checked on hand-written runs where the right answer is known (phase
boundaries one step after their events, a smoothed loss that does not lag, param groups that
share a line); a short ``Trainer.fit`` of the tiny MLP of ``conftest`` with an injected spike
checks them against what the callback decided and logged, and the figure (caught on its way to
``plt.close``) for its legend, lines and shading.

The file and the callback's events must agree across reruns and resumes too: a rerun in
the same directory, a resume after a crash, a callback object reused for a resumed fit, and
a state loaded by ``validate(ckpt_path=...)`` that must not leak into a later fresh fit.
"""

import json
import math
import re
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import torch
from conftest import TinyRegressor, make_loader, spike_at
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn

from surgeon.callback import ScheduleSurgeon
from surgeon.cli import main
from surgeon.controller import EventKind, Phase
from surgeon.plot import (
    EVENT_COLORS,
    PHASE_COLORS,
    UNKNOWN_EVENT_COLOR,
    Run,
    draw,
    event_dashes,
    event_style,
    load_run,
    loss_source,
    lr_lines,
    own_losses,
    phase_spans,
    smooth,
)
from surgeon.recorder import EVENTS_FILE, LOSSES_FILE, PHASE_CODES, SETTINGS_FILE

matplotlib.use("Agg")

STEPS = 60
SPIKE_AT = 40
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def new_surgeon(**overrides: Any) -> ScheduleSurgeon:
    settings = {"min_warmup": 5, "max_warmup": 10, "spike_cooldown": 3, "spike_recovery": 5}
    return ScheduleSurgeon(**{**settings, **overrides})


def fit(
    make_trainer: Any,
    log_root: Path,
    steps: int = STEPS,
    surgeon: ScheduleSurgeon | None = None,
    logger_class: type = CSVLogger,
    model_class: type = TinyRegressor,
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
    trainer.fit(model_class(loss_hook=spike_at(SPIKE_AT)), make_loader(), **fit_kwargs)
    assert Path(trainer.log_dir) == log_root
    return surgeon


class LoggingRegressor(TinyRegressor):  # type: ignore[misc, valid-type]
    """Logs its own ``train_loss`` every step and ``val_loss`` at each validation."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))


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


def run_of(
    events: list[dict[str, Any]] | None = None,
    series: dict[str, list[tuple[int, float]]] | None = None,
    **kwargs: Any,
) -> Run:
    """A run as :func:`surgeon.plot.load_run` returns it, written by hand."""
    return Run(Path("run"), Path("run/metrics.csv"), series or {}, events or [], **kwargs)


def event(step: int, kind: str, phase: str | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step, "kind": kind, "reason": "", "lr_after": 0.1}
    if phase is not None:
        record["phase"] = phase
    return record


# ------------------------------------------------------------------------------ phases


def test_phases_come_from_the_events_one_step_after_each() -> None:
    """The phase an event records holds from the next step: ``warmup_end`` at step 9 starts
    ``stable`` at 10, however sparsely the metrics were logged."""
    events = [
        event(9, "warmup_end", "stable"),
        event(30, "spike", "stable"),  # no phase change
        event(47, "decay_start", "decay"),
        event(70, "plateau", "stable"),  # a restart re-plans: a new hold
        event(80, "decay_start", "decay"),
        event(99, "done", "done"),
    ]
    rows = {"surgeon/phase": [(0, 0.0), (50, 2.0)]}  # sparse rows: not used
    spans = phase_spans(run_of(events, rows, losses=[(s, 1.0) for s in range(120)]))
    assert spans == [
        ("warmup", 0, 10),
        ("stable", 10, 48),
        ("decay", 48, 71),
        ("stable", 71, 81),
        ("decay", 81, 100),
        ("done", 100, 119),
    ]


def test_phases_of_older_event_files_come_from_the_logged_rows() -> None:
    codes = {phase.value: code for phase, code in PHASE_CODES.items()}
    rows = [(0, 0.0), (5, 0.0), (10, codes["stable"]), (15, codes["decay"]), (20, codes["done"])]
    spans = phase_spans(run_of([event(8, "warmup_end")], {"surgeon/phase": rows}))
    assert spans == [("warmup", 0, 11), ("stable", 11, 16), ("decay", 16, 20)]  # done: past the end


def test_a_run_that_never_left_warmup_is_one_span() -> None:
    assert phase_spans(run_of([], {"lr-SGD": [(0, 0.1), (7, 0.1)]})) == [("warmup", 0, 7)]


# ------------------------------------------------------------------------------ loss


def test_the_loss_comes_from_losses_csv_then_the_logged_surgeon_loss_then_the_runs_own() -> None:
    every_step = [(0, 2.0), (1, math.nan), (2, 1.5)]
    logged = {"surgeon/loss": [(0, 2.0)], "train_loss": [(0, 2.1), (1, 1.9)]}
    assert loss_source(run_of(series=logged, losses=every_step)) == (
        LOSSES_FILE,
        [(0, 2.0), (2, 1.5)],  # the NaN step is marked by its event, not drawn
    )
    assert loss_source(run_of(series=logged)) == ("surgeon/loss", [(0, 2.0)])
    del logged["surgeon/loss"]
    assert loss_source(run_of(series=logged)) == ("train_loss", [(0, 2.1), (1, 1.9)])
    assert loss_source(run_of(series={"val_loss": [(0, 1.0)]})) == ("", [])


def test_the_smoothed_loss_does_not_lag() -> None:
    """On a loss falling geometrically (linear in log) from 10, a centred mean of the logs is
    the curve itself; an EMA like the spike detector's sits 7x above it at step 99."""
    points = [(step, 10.0 * math.exp(-step / 25)) for step in range(200)]
    smoothed = smooth(points)
    assert [step for step, _ in smoothed] == list(range(200))
    for (_, loss), (_, value) in zip(points, smoothed, strict=True):
        assert value == pytest.approx(loss, rel=1e-9)
    ema = points[0][1]
    for _, loss in points[:100]:
        ema += 0.03 * (loss - ema)
    assert ema > 7 * points[99][1]  # what the old plot drew as "loss_smooth"


def test_the_smoothed_loss_averages_the_noise_over_two_percent_of_the_run() -> None:
    noisy = [(step, 1.0 * (1.5 if step % 2 else 1 / 1.5)) for step in range(1000)]
    smoothed = smooth(noisy)
    middle = [value for step, value in smoothed if 20 <= step < 980]
    # a 21-point window (2% of 1000) of alternating 1.5 and 1/1.5: geometric mean 1.5**(+-1/21)
    assert all(1.5 ** (-1 / 21) - 1e-9 <= value <= 1.5 ** (1 / 21) + 1e-9 for value in middle)
    assert smoothed[0][1] == noisy[0][1]  # the ends are not pulled towards later values
    assert smooth([(0, -1.0), (1, 1.0), (2, -1.0)])[1] == (1, pytest.approx(-1 / 3))  # linear


def test_the_runs_own_losses_are_found_and_epoch_means_only_without_step_values() -> None:
    series = {
        key: [(0, 1.0)]
        for key in (
            "loss",
            "train_loss_step",
            "train_loss_epoch",
            "val_loss",
            "valid/loss",
            "val_acc",
            "surgeon/loss",
            "surgeon/loss_smooth",
            "lr-SGD",
            "epoch",
        )
    }
    assert own_losses(series) == ["loss", "train_loss_step", "val_loss", "valid/loss"]
    del series["train_loss_step"]
    assert "train_loss_epoch" in own_losses(series)


# ------------------------------------------------------------------------------ LR and events


def test_param_groups_with_the_same_lr_share_a_line_and_the_highest_comes_first() -> None:
    low = [(0, 1e-4), (5, 2e-4)]
    high = [(0, 1e-2), (5, 2e-2)]
    series = {"lr-AdamW/backbone": low, "lr-AdamW/head": high, "lr-AdamW/no_decay": high}
    assert lr_lines(series) == [("AdamW/head, AdamW/no_decay", high), ("AdamW/backbone", low)]


def test_every_event_kind_has_a_colour_of_its_own() -> None:
    kinds = [kind.value for kind in EventKind]
    assert set(EVENT_COLORS) == set(kinds)
    colors = [event_style(kind)[0] for kind in kinds]
    assert len(set(colors)) == len(colors), "two kinds look the same"
    assert not set(colors) & {*PHASE_COLORS.values(), UNKNOWN_EVENT_COLOR}
    assert set(PHASE_COLORS) == {phase.value for phase in Phase}
    assert event_style("a_kind_from_the_future") == (UNKNOWN_EVENT_COLOR, False)


def test_events_at_one_step_take_turns_along_their_line() -> None:
    events = [event(3, "spike"), event(7, "spike"), event(7, "rollback"), event(7, "skipped_step")]
    assert event_dashes(events) == [
        (0.0, (4.0, 4.0)),  # alone: a plain dashed line
        (0.0, (4.0, 8.0)),  # three at step 7: each dash of a period of 12 points in turn
        (4.0, (4.0, 8.0)),
        (8.0, (4.0, 8.0)),
    ]


# ------------------------------------------------------------------------------ real runs


@pytest.mark.parametrize("logger_class", [CSVLogger, TensorBoardLogger])
def test_plot_of_a_real_run_marks_every_event(
    make_trainer: Any,
    tmp_path: Path,
    caught_figures: list[Any],
    capsys: pytest.CaptureFixture[str],
    logger_class: type,
) -> None:
    surgeon = fit(
        make_trainer,
        tmp_path,
        surgeon=new_surgeon(decay="wsd"),  # every phase: warmup, the stable hold, the decay
        logger_class=logger_class,
        model_class=LoggingRegressor,
        val_check_interval=20,
        check_val_every_n_epoch=None,
        fit={"val_dataloaders": make_loader(batches=2)},
    )
    records = events_file(tmp_path)
    kinds = [record["kind"] for record in records]
    assert {"warmup_end", "spike", "decay_start"} <= set(kinds)
    assert [(r["step"], r["kind"]) for r in records] == [
        (e.step, e.kind.value) for e in surgeon.events
    ]

    assert main(["plot", str(tmp_path)]) == 0
    out = tmp_path / "surgeon.png"
    assert f"wrote {out}" in capsys.readouterr().out
    assert png_size(out) == (11 * 110, 7 * 110)  # figsize x dpi of plot_run

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
    assert {"SGD", "phase: warmup", "phase: stable", "phase: decay"} <= set(labels)
    # each panel has one line per event at its step, in its kind's colour
    for ax in (ax_loss, ax_lr):
        marks = sorted(
            (line.get_xdata()[0], line.get_color())
            for line in ax.get_lines()
            if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]
        )
        assert marks == sorted((r["step"], EVENT_COLORS[r["kind"]]) for r in records)
    # the shading is the phase spans, which match the phase the callback logged at every step
    run = load_run(tmp_path)
    spans = phase_spans(run)
    shaded = sorted(
        (round(patch.get_x()), round(patch.get_x() + patch.get_width())) for patch in ax_lr.patches
    )
    assert shaded == [(start, end) for _, start, end in spans]
    names = {code: phase.value for phase, code in PHASE_CODES.items()}
    for step, code in run.series["surgeon/phase"]:
        inside = [name for name, start, end in spans if start <= step + 1 < end]
        assert inside in ([names[code]], []), step  # [] past the last step
    # the loss panel: every step's loss from losses.csv, its smoothed curve, the module's own
    drawn = {line.get_label(): line for line in ax_loss.get_lines()}
    assert {LOSSES_FILE, f"{LOSSES_FILE}, smoothed", "train_loss", "val_loss"} <= set(drawn)
    assert list(drawn[LOSSES_FILE].get_xdata()) == list(range(STEPS))
    assert list(drawn["val_loss"].get_xdata()) == [19, 39, 59]
    assert ax_loss.get_yscale() == "log" and ax_lr.get_yscale() == "linear"
    assert figure._suptitle.get_text().startswith(f"ScheduleSurgeon: {len(records)} events")


def test_phase_boundaries_are_exact_to_the_step_when_metrics_are_logged_sparsely(
    make_trainer: Any, tmp_path: Path
) -> None:
    surgeon = fit(make_trainer, tmp_path, log_every_n_steps=10)
    run = load_run(tmp_path)
    # rows at Lightning's logging steps, (step + 1) % log_every_n_steps == 0
    assert all((step + 1) % 10 == 0 for step, _ in run.series["surgeon/phase"])
    changes = [e for e in surgeon.events if e.kind.value in ("warmup_end", "decay_start")]
    assert [start for _, start, _ in phase_spans(run)[1:]] == [e.step + 1 for e in changes]
    assert any((e.step + 2) % 10 for e in changes)  # the old row-based spans were off here


def test_plot_log_lr_and_the_run_files_beside_the_metrics(
    make_trainer: Any, tmp_path: Path, caught_figures: list[Any]
) -> None:
    """``--log-lr``; with ``losses.csv`` and ``settings.json`` (as newer callbacks write them)
    the loss comes from the first and the planned end from the second."""
    fit(make_trainer, tmp_path, steps=20)
    with (tmp_path / LOSSES_FILE).open("w") as f:
        f.write("step,loss,update_skipped\n" + "".join(f"{s},{1 / (s + 1)},0\n" for s in range(20)))
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"total_steps": 30, "config": {}}))
    out = tmp_path / "figures" / "run.png"
    assert main(["plot", str(tmp_path), "--out", str(out), "--log-lr"]) == 0
    assert png_size(out)[0] > 0
    (figure,) = caught_figures
    ax_loss, ax_lr = figure.axes[:2]
    assert ax_lr.get_yscale() == "log"
    (raw,) = [line for line in ax_loss.get_lines() if line.get_label() == LOSSES_FILE]
    assert list(raw.get_ydata()) == [1 / (s + 1) for s in range(20)]
    assert any(list(line.get_xdata()) == [30, 30] for line in ax_lr.get_lines())  # planned end


def test_an_event_kind_this_version_does_not_know_is_drawn_neutral(
    make_trainer: Any, tmp_path: Path, caught_figures: list[Any]
) -> None:
    fit(make_trainer, tmp_path, steps=20)
    with (tmp_path / EVENTS_FILE).open("a") as f:
        f.write(json.dumps({**event(12, "a_kind_from_the_future", "stable")}) + "\n")
    assert main(["plot", str(tmp_path)]) == 0
    (figure,) = caught_figures
    (mark,) = [line for line in figure.axes[1].get_lines() if list(line.get_xdata()) == [12, 12]]
    assert mark.get_color() == UNKNOWN_EVENT_COLOR
    assert "a_kind_from_the_future (1)" in [
        text.get_text() for text in figure.axes[1].get_legend().get_texts()
    ]


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("missing", "{run_dir} is not a directory: pass the log directory of a run"),
        (
            "empty",
            "no metrics.csv, TensorBoard event file or surgeon run files (losses.csv, "
            "events.jsonl, settings.json) under {run_dir} (log the run with CSVLogger or "
            "TensorBoardLogger, or give the surgeon a log_dir=)",
        ),
        (
            "events only",
            "no metrics.csv, TensorBoard event file or surgeon run files (losses.csv, "
            "events.jsonl, settings.json) under {run_dir} (log the run with CSVLogger or "
            "TensorBoardLogger, or give the surgeon a log_dir=)",
        ),
        (
            "no surgeon",
            "{run_dir} holds a run logged without ScheduleSurgeon (no events.jsonl beside "
            "metrics.csv): train with Trainer(callbacks=[ScheduleSurgeon()]) and plot that "
            "run's log directory",
        ),
    ],
)
def test_a_directory_without_a_surgeon_run_exits_2_with_a_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str, message: str
) -> None:
    run_dir = tmp_path / "run"
    if what != "missing":
        run_dir.mkdir()
    if what == "events only":
        (run_dir / EVENTS_FILE).write_text("")  # events alone are not enough
    if what == "no surgeon":
        (run_dir / "metrics.csv").write_text("epoch,step,train_loss\n0,0,1.0\n")
    assert main(["plot", str(run_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"surgeon plot: error: {message.format(run_dir=run_dir)}\n"
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
    # fresh (no ckpt_path), with the same checkpoints (they drop the rollback snapshots)
    again = ModelCheckpoint(tmp_path / "ckpt-b", "{step}", every_n_train_steps=30, save_top_k=-1)
    fit(make_trainer, tmp_path / "b", surgeon=surgeon, callbacks=[again], enable_checkpointing=True)
    assert surgeon.step == STEPS
    assert surgeon.events == original  # the same run from scratch, not one resumed at step 30


def plain_loop_run(log_dir: Path, cool_down_at: int | None = None) -> tuple[list[float], list[Any]]:
    """A 120-step plain loop with ``Surgeon(log_dir=...)`` and a spike at steps 70-71 (and
    ``cool_down_now(20)`` at ``cool_down_at``): the LRs it ran at, and its events."""
    from surgeon import Surgeon

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    surgeon = Surgeon(optimizer, total_steps=120, log_dir=log_dir, verbose=False)
    ran = []
    for step in range(120):
        if step == cool_down_at:
            surgeon.cool_down_now(20)
        x = torch.randn(16, 4)
        y = x.sum(dim=1, keepdim=True) + 0.5 * torch.randn(16, 1)  # noise: a loss floor
        loss = (model(x) - y).pow(2).mean()
        loss = loss * 20.0 if step in (70, 71) else loss  # a spike: the replay follows its cut
        ran.append(optimizer.param_groups[0]["lr"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        surgeon.step(loss)
    surgeon.finish()
    return ran, surgeon.events


def test_a_run_only_the_surgeon_logged_is_plotted_with_its_replayed_lr(
    tmp_path: Path, caught_figures: list[Any]
) -> None:
    """A plain loop's ``log_dir`` holds no logger's metrics, only the surgeon's files: the plot
    draws ``losses.csv`` and the LR replayed from it with ``settings.json``, which is the LR
    the loop ran at, and marks every event."""
    ran, events = plain_loop_run(tmp_path)
    assert not list(tmp_path.rglob("metrics.csv"))
    run = load_run(tmp_path)
    assert main(["plot", str(tmp_path)]) == 0
    ((name, points),) = run.series.items()
    assert name == "lr-replayed" and [s for s, _ in points] == list(range(120))
    assert [lr for _, lr in points] == pytest.approx(ran, rel=1e-9)
    assert [e["kind"] for e in run.events] == [e.kind.value for e in events]
    assert EventKind.SPIKE in [e.kind for e in events]
    assert len(caught_figures) == 1


def test_the_replayed_lr_ends_at_a_decision_the_losses_did_not_make(tmp_path: Path) -> None:
    """``cool_down_now`` at step 90 is no decision of the losses: the replayed line ends there
    (and says why) instead of drawing an LR the run never ran at."""
    ran, _ = plain_loop_run(tmp_path, cool_down_at=90)
    ((name, points),) = load_run(tmp_path).series.items()
    assert name == "lr-replayed (to step 89: a cooldown is not in the losses)"
    assert [lr for _, lr in points] == pytest.approx(ran[:90], rel=1e-9)


def test_surgeon_files_that_cannot_be_replayed_are_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain_loop_run(tmp_path)
    settings = json.loads((tmp_path / SETTINGS_FILE).read_text())
    del settings["total_steps"]
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(settings))
    assert main(["plot", str(tmp_path)]) == 2
    assert "the surgeon's files cannot be replayed" in capsys.readouterr().err


def test_the_newest_run_is_drawn_whichever_kind_it_is(
    make_trainer: Any, tmp_path: Path, caught_figures: list[Any]
) -> None:
    """An older Lightning run (logged with the surgeon) beside a newer plain loop's files: the
    plain loop is the newest run, and it is drawn; touched, the Lightning run is."""
    fit(make_trainer, tmp_path / "lightning")
    plain_loop_run(tmp_path / "plain")
    assert load_run(tmp_path).directory == tmp_path / "plain"
    (metrics,) = (tmp_path / "lightning").rglob("metrics.csv")
    metrics.touch()
    assert load_run(tmp_path).directory == metrics.parent


def test_the_plot_marks_the_end_a_cooldown_moved(tmp_path: Path, caught_figures: list[Any]) -> None:
    """A 300-step plan cooled down at step 60 over 40 steps ends at 100: the ``cooldown``
    record carries the new length and the plot's "planned end" is there (not at 300)."""
    from surgeon import Surgeon

    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    surgeon = Surgeon(optimizer, 300, warmup=10, verbose=False, log_dir=tmp_path)
    for step in range(80):
        if step == 60:
            surgeon.cool_down_now(40)
        surgeon.step(1.0 / (1 + step))
    surgeon.finish()
    run = load_run(tmp_path)
    (cooldown,) = [e for e in run.events if e["kind"] == "cooldown"]
    assert cooldown["total_steps"] == 100 and run.settings["total_steps"] == 300
    assert run.planned_steps == 100 != run.last_step
    draw(run, tmp_path / "run.png")
    (figure,) = caught_figures
    assert any(list(line.get_xdata()) == [100, 100] for line in figure.axes[1].get_lines())
    assert not any(list(line.get_xdata()) == [300, 300] for line in figure.axes[1].get_lines())


def test_each_record_keeps_the_length_its_event_planned(tmp_path: Path) -> None:
    """Cooled down at step 30 (the plan ends at 50), then resumed into the same directory as a
    300-step run: the ``cooldown`` record still says 50, the ``replan`` 300 (a resume rewrites
    ``events.jsonl`` from the events kept in the state), and the plot's end is the last one."""
    from surgeon import Surgeon

    def loop(total: int) -> tuple[Surgeon, torch.optim.Optimizer]:
        model = nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return Surgeon(optimizer, total, warmup=5, verbose=False, log_dir=tmp_path), optimizer

    first, _ = loop(200)
    for step in range(40):
        if step == 30:
            first.cool_down_now(20)
        first.step(1.0 / (1 + step))
    second, _ = loop(300)
    second.load_state_dict(first.state_dict())
    for step in range(40, 60):
        second.step(1.0 / (1 + step))
    second.finish()
    run = load_run(tmp_path)
    moved = [(e["kind"], e["total_steps"]) for e in run.events if e["total_steps"] is not None]
    assert moved == [("cooldown", 50), ("replan", 300)]
    assert run.planned_steps == 300


class TestedRegressor(LoggingRegressor):  # type: ignore[misc, valid-type]
    """Logs ``test_loss`` in ``trainer.test``."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self.net(x), y))


def test_plot_of_a_log_root_after_fit_then_test_draws_the_fit(
    make_trainer: Any, tmp_path: Path, caught_figures: list[Any]
) -> None:
    """LightningCLI's ``fit`` then ``test``: the test run logs a newer version with its own
    ``metrics.csv`` and no surgeon files. ``surgeon plot`` on the logger's root draws the fit
    (it picked the test's version and said it was "logged without ScheduleSurgeon"), as
    ``surgeon replay`` does."""
    surgeon = new_surgeon()
    model = TestedRegressor(loss_hook=spike_at(SPIKE_AT))
    trainer = make_trainer([surgeon], max_steps=STEPS, logger=CSVLogger(tmp_path, name="runs"))
    trainer.fit(model, make_loader())
    tester = make_trainer([surgeon], logger=CSVLogger(tmp_path, name="runs"))
    tester.test(model, make_loader(batches=2))
    fit_dir, test_dir = Path(trainer.log_dir), Path(tester.log_dir)
    assert fit_dir != test_dir and (test_dir / "metrics.csv").exists()
    assert not (test_dir / EVENTS_FILE).exists()
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "plot.png")]) == 0
    assert load_run(tmp_path).directory == fit_dir
    assert main(["replay", str(tmp_path), "--out", str(tmp_path / "replay.png")]) == 0


def test_the_replay_figure_draws_a_loss_below_zero_on_a_linear_axis(
    tmp_path: Path, caught_figures: list[Any]
) -> None:
    """An NLL or ELBO below zero: the replay's loss panel was forced onto a log axis, which
    left every point out (an empty panel); it is linear where any loss is not positive."""
    path = tmp_path / "losses.csv"
    losses = [-1.0 - i / 100 + 0.01 * (i % 3) for i in range(200)]
    path.write_text("step,loss\n" + "".join(f"{i},{x!r}\n" for i, x in enumerate(losses)))
    assert main(["replay", str(path), "--out", str(tmp_path / "r.png")]) == 0
    (figure,) = caught_figures
    ax_loss = figure.axes[0]
    assert ax_loss.get_yscale() == "linear"
    (drawn, _) = ax_loss.get_lines()[:2]
    assert list(drawn.get_ydata()) == losses
