"""Replay (``surgeon/replay.py``, ``surgeon replay``): a logged loss stream through a fresh
controller, fed the way the callback feeds it.

The acceptance test is a real ``Trainer.fit`` with spikes, a severe spike (rollback) and a
run of NaN losses (skipped steps, rollback): its own loss stream (``surgeon/loss`` logged at
every step, as the controller saw it) replayed with its own settings gives exactly its events
(step, kind, reason; a rollback's snapshot size is unknown to a replay) and exactly the LR
scale of every step it logged. The same run is also read back as a run directory
(``losses.csv`` + ``settings.json``), a TensorBoard event file, and a plain ``step,loss``
CSV. The read-back lag itself is checked on scripted streams: a decision on the loss of step
``s`` changes the LR from the step after the block that holds ``s`` is read.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyRegressor, make_loader
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor

from surgeon import Surgeon
from surgeon.callback import EVENTS_FILE, ScheduleSurgeon
from surgeon.cli import main
from surgeon.config import SurgeonConfig
from surgeon.controller import Controller, EventKind
from surgeon.plot import load_run, read_metrics
from surgeon.recorder import LOSSES_FILE, SETTINGS_FILE
from surgeon.replay import RunSettings, feed, read_stream, replay

STEPS = 240
SURGEON_KW: dict[str, Any] = {
    "min_warmup": 10,
    "max_warmup": 30,
    "spike_cooldown": 4,
    "spike_recovery": 8,
    "snapshot_every": 10,
    "plateau_patience": 40,
    "plateau_cooldown": 20,
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def troubled(step: int, batch_idx: int, loss: Tensor) -> Tensor:
    """A 2.5x spike (cut only), a 30x spike (rollback), three NaN steps (rollback)."""
    if step == 90:
        return loss * 2.5
    if step == 130:
        return loss * 30.0
    if step in (180, 181, 182):
        return loss * math.nan
    return loss


def settings_of(surgeon: ScheduleSurgeon, total_steps: int) -> RunSettings:
    return RunSettings(total_steps, surgeon.config, surgeon.engine.readback_every)


def real_run(make_trainer: Callable[..., Any], root: Path, logger_class: type = CSVLogger) -> Any:
    """A logged fit of the tiny MLP with every kind of trouble; returns the surgeon."""
    surgeon = ScheduleSurgeon(**SURGEON_KW)
    trainer = make_trainer(
        [surgeon],
        max_steps=STEPS,
        logger=logger_class(root, name="", version=""),
    )
    trainer.fit(TinyRegressor(loss_hook=troubled), make_loader())
    return surgeon


def without_sizes(reason: str) -> str:
    """A rollback's reason without the snapshot size (a replay has no weights to measure)."""
    return re.sub(r"snapshot of step (\d+) \([^)]*\)", r"snapshot of step \1", reason)


def comparable(events: list[Any]) -> list[tuple[int, str, str]]:
    return [(e.step, e.kind.value, without_sizes(e.reason)) for e in events]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ScheduleSurgeon, Path]:
    """One real run for the tests of this module (CSVLogger, log_every_n_steps=1)."""
    import pytorch_lightning as pl

    root = tmp_path_factory.mktemp("run")
    surgeon = ScheduleSurgeon(**SURGEON_KW)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        callbacks=[surgeon],
        logger=CSVLogger(root, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(TinyRegressor(loss_hook=troubled), make_loader())
    return surgeon, root


def test_the_run_has_every_kind_of_trouble(logged_run: tuple[ScheduleSurgeon, Path]) -> None:
    surgeon, _ = logged_run
    kinds = {e.kind for e in surgeon.events}
    assert {
        EventKind.WARMUP_END,
        EventKind.SPIKE,
        EventKind.ROLLBACK,
        EventKind.NONFINITE,
        EventKind.SKIPPED_STEP,
        EventKind.RECOVERED,
    } <= kinds
    assert sum(e.kind is EventKind.ROLLBACK for e in surgeon.events) == 2


def test_replaying_a_real_run_with_its_settings_reproduces_its_events_and_lrs(
    logged_run: tuple[ScheduleSurgeon, Path],
) -> None:
    surgeon, root = logged_run
    stream = read_stream(root / "metrics.csv", metric="surgeon/loss")
    assert stream.steps == list(range(STEPS))  # every update the controller saw
    result = replay(stream.losses, settings_of(surgeon, STEPS), steps=stream.steps)

    assert comparable(result.events) == comparable(surgeon.events)
    logged = [json.loads(line) for line in (root / EVENTS_FILE).read_text().splitlines()]
    assert [(e.step, e.kind.value) for e in result.events] == [
        (r["step"], r["kind"]) for r in logged
    ]
    for mine, theirs in zip(result.events, surgeon.events, strict=True):
        assert (mine.scale_before, mine.scale_after) == (theirs.scale_before, theirs.scale_after)
    # the LR scale the callback wrote at the start of each step, bit for bit
    written = dict(read_metrics(root / "metrics.csv")["surgeon/lr_scale"])
    assert sorted(written) == list(range(STEPS))
    assert result.lr_scales == [written[s] for s in range(STEPS)]
    smooth = dict(read_metrics(root / "metrics.csv")["surgeon/loss_smooth"])
    assert result.smooth == [smooth[s] for s in range(STEPS)]


def test_other_settings_change_the_decisions(logged_run: tuple[ScheduleSurgeon, Path]) -> None:
    surgeon, root = logged_run
    stream = read_stream(root / "metrics.csv", metric="surgeon/loss")
    lenient = replace(surgeon.config, spike_ratio=40.0, rollback_nonfinite=5)
    result = replay(stream.losses, RunSettings(STEPS, lenient))
    kinds = [e.kind for e in result.events]
    assert EventKind.SPIKE not in kinds and EventKind.ROLLBACK not in kinds
    assert kinds.count(EventKind.NONFINITE) == 3  # NaNs are still seen, not rolled back
    no_snapshots = replay(stream.losses, RunSettings(STEPS, surgeon.config, snapshots=False))
    assert EventKind.ROLLBACK not in {e.kind for e in no_snapshots.events}
    assert EventKind.SPIKE in {e.kind for e in no_snapshots.events}


def test_the_run_directory_replays_with_its_own_settings_by_default(
    logged_run: tuple[ScheduleSurgeon, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``surgeon replay LOG_DIR``: the callback's own ``losses.csv`` and ``settings.json``."""
    surgeon, root = logged_run
    assert (root / LOSSES_FILE).exists() and (root / SETTINGS_FILE).exists()
    stream = read_stream(root)
    assert stream.source.startswith(str(root / LOSSES_FILE))
    assert stream.settings == settings_of(surgeon, STEPS)
    assert stream.steps == list(range(STEPS))
    assert sum(stream.update_skipped) == 3  # the NaN steps, as the guard flagged them

    out = tmp_path / "replay.png"
    assert main(["replay", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for event in surgeon.events:
        assert re.search(rf"^\s*{event.step}\s+{event.kind.value}\s", printed, re.M), event
    assert f"reproduces the {len(surgeon.events)} logged events" in printed
    assert out.read_bytes().startswith(PNG_SIGNATURE) and out.stat().st_size > 20_000

    # a setting on the command line overrides the run's own
    assert main(["replay", str(root), "--spike-ratio", "40", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert not re.search(r"^\s*\d+\s+spike\s", printed, re.M)
    assert "differs from the logged events" in printed


@pytest.mark.parametrize("logger_class", [TensorBoardLogger])
def test_a_tensorboard_run_replays_like_its_csv(
    make_trainer: Callable[..., Any], tmp_path: Path, logger_class: type
) -> None:
    surgeon = real_run(make_trainer, tmp_path, logger_class)
    (event_file,) = tmp_path.rglob("events.out.tfevents.*")
    stream = read_stream(event_file, metric="surgeon/loss")
    result = replay(stream.losses, settings_of(surgeon, STEPS))
    assert comparable(result.events) == comparable(surgeon.events)


def test_a_plain_step_loss_csv_without_a_header(tmp_path: Path) -> None:
    path = tmp_path / "losses.txt"
    losses = [1.0 + 0.01 * (i % 3) for i in range(100)]
    losses[60:62] = [9.0, 9.0]  # a spike and the loss that confirms it
    path.write_text("".join(f"{i},{x!r}\n" for i, x in enumerate(losses)))
    stream = read_stream(path)
    assert stream.losses == losses and stream.steps == list(range(100))
    assert stream.settings is None
    kinds = [(e.step, e.kind) for e in replay(stream.losses, RunSettings(100)).events]
    assert (61, EventKind.SPIKE) in kinds


def test_a_lightning_metrics_csv_picks_the_training_loss(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    rows = ["epoch,step,train_loss_step,val_loss,train_loss_epoch"]
    rows += [f"0,{s},{1.0 / (s + 1)!r},," for s in range(49, 1000, 50)]
    rows += ["0,999,,0.5,0.7"]
    path.write_text("\n".join(rows) + "\n")
    stream = read_stream(path)
    assert stream.source.endswith("(train_loss_step)")
    assert stream.steps == list(range(49, 1000, 50)) and stream.stride == 50
    assert stream.losses[0] == 1.0 / 50
    with pytest.raises(ValueError, match=r"no series 'nope'.*--metric"):
        read_stream(path, metric="nope")
    path.write_text("step,loss_a,loss_b\n0,1,2\n")
    with pytest.raises(ValueError, match=r"cannot tell which.*loss_a, loss_b.*--metric"):
        read_stream(path)


def test_a_subsampled_stream_counts_logged_points_and_places_events_at_logged_steps() -> None:
    losses = [1.0 + 0.01 * (i % 2) for i in range(200)]
    losses[150:152] = [10.0, 10.0]  # confirmed by the next logged point
    steps = [50 * i + 49 for i in range(200)]
    result = replay(losses, RunSettings(200), steps=steps)
    spikes = [e.step for e in result.events if e.kind is EventKind.SPIKE]
    assert spikes == [steps[151]]
    assert result.steps == steps and len(result.lr_scales) == 200


# -------------------------------------------------------------- the read-back lag, scripted


@pytest.mark.parametrize("readback_every", [1, 3, 4, 7])
def test_a_decision_changes_the_lr_once_its_block_is_read(readback_every: int) -> None:
    """The loss of step s is read at the end of step (b + 2) x R - 1, b = s // R: the LR of
    steps up to there is the old plan's, from the next step on the decision's (made on the
    loss of 202, which confirms the spike of 201)."""
    total, spike = 400, 201
    losses = [1.0 + 0.001 * (i % 5) for i in range(total)]
    losses[spike : spike + 2] = [5.0, 5.0]  # a spike (a rollback request: no snapshot taken)
    config = SurgeonConfig(min_warmup=0, max_warmup=0, spike_cooldown=50)
    settings = RunSettings(total, config, readback_every, snapshots=False)
    result = replay(losses, settings)
    calm = replay([min(x, 1.01) for x in losses], settings)
    read_at = ((spike + 1) // readback_every + 2) * readback_every - 1
    assert result.lr_scales[: read_at + 1] == calm.lr_scales[: read_at + 1]
    assert result.lr_scales[read_at + 1] == calm.lr_scales[read_at + 1] * 0.5


def test_losses_in_flight_at_the_end_are_decided_on() -> None:
    losses = [1.0] * 50 + [1.0 + 0.001 * (i % 3) for i in range(47)] + [math.nan]
    result = replay(losses, RunSettings(100))
    assert [e.kind for e in result.events if e.step == 97] == [
        EventKind.NONFINITE,
        EventKind.SKIPPED_STEP,
    ]


def test_a_severe_spike_on_the_last_step_rolls_back_as_the_fit_ends() -> None:
    """No loss confirms the last one: as the engine does at the end of a fit, a spike of at
    least ``rollback_threshold x`` its mean is rolled back (a milder one is left alone)."""
    calm = [1.0 + 0.01 * ((i * 7) % 5) for i in range(99)]
    severe = replay([*calm, 50.0], RunSettings(100))
    assert [(e.step, e.kind) for e in severe.events if e.step == 99] == [
        (99, EventKind.DONE),
        (99, EventKind.ROLLBACK),
    ]
    mild = replay([*calm, 2.0], RunSettings(100))
    assert [e.kind for e in mild.events if e.step == 99] == [EventKind.DONE]


def test_a_fit_that_raised_replays_without_a_decision_at_its_end(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """A fit that raises (not Ctrl-C) while a confirmed spike's loss is still out of its band
    reads no loss at its end and so makes no end-of-fit rollback; its ``stopped`` event says
    its end was not read, and the replay of its directory decides nothing there either (it made
    the rollback the run never made, and called its own run different). The same losses
    ending as a fit does are rolled back at the end."""

    def spike_then_raise(step: int, batch_idx: int, loss: Tensor) -> Tensor:
        if step == 156:
            raise RuntimeError("the data loader died")
        return loss * 3.0 if step >= 148 else loss

    surgeon = ScheduleSurgeon(verbose=False, rollback_threshold=10.0)  # the spike is cut
    trainer = make_trainer(
        [surgeon], max_steps=300, logger=CSVLogger(tmp_path, name="", version="")
    )
    with pytest.raises(RuntimeError, match="the data loader died"):
        trainer.fit(TinyRegressor(loss_hook=spike_then_raise), make_loader())
    kinds = [e.kind for e in surgeon.events]
    assert EventKind.SPIKE in kinds and EventKind.ROLLBACK not in kinds
    assert "its end was not read" in surgeon.events[-1].reason
    stream = read_stream(tmp_path)
    assert stream.settings is not None and not stream.end_read
    replayed = stream.replayed(stream.settings)
    assert comparable(replayed.events) == comparable(surgeon.events[:-1])  # not the stopped
    ended = replay(stream.losses, stream.settings, update_skipped=stream.update_skipped)
    assert [e.kind for e in ended.events][-1] is EventKind.ROLLBACK
    assert "its loss still out of its band" in ended.events[-1].reason


def test_a_fit_that_raised_right_after_a_checkpoint_replays_the_checkpoints_decision() -> None:
    """A fit that checkpointed at its last logged step and then raised: the checkpoint read
    every loss and rolled back the severe last one; the replay of its unread end makes that
    checkpoint's decision too (it skipped it, as the end of a finished fit makes it)."""
    calm = [1.0 + 0.01 * ((i * 7) % 5) for i in range(149)]
    raised = replay([*calm, 200.0], RunSettings(300), checkpoints=[150], end_read=False)
    assert [e.kind for e in raised.events if e.step == 149] == [EventKind.ROLLBACK]
    assert not any(math.isnan(x) for x in raised.smooth)


def test_feed_matches_a_controller_fed_without_lag_on_the_events() -> None:
    """Events depend on the losses only (no rollback): lag or not, the same decisions."""
    losses = [2.0 / (1 + i / 50) + 0.01 * ((i * 7) % 5) for i in range(600)]
    losses[300] = 4.0
    direct = Controller(600)
    for x in losses:
        direct.update(x)
    lagged = Controller(600)
    feed(lagged, losses, [False] * 600, readback_every=4, snapshots=False)
    assert [(e.step, e.kind) for e in lagged.events] == [(e.step, e.kind) for e in direct.events]


def test_settings_round_trip_and_reject_unknown_fields() -> None:
    settings = RunSettings(500, SurgeonConfig(max_warmup=1.0, min_warmup=1), 3, snapshots=False)
    assert RunSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings
    data = settings.to_json()
    data["config"]["spike_sigma"] = 3.0
    with pytest.raises(ValueError, match=r"\['spike_sigma'\]"):
        RunSettings.from_json(data)
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1"):
        RunSettings(0)


# ------------------------------------------------------------------------ the command line


def plain_csv(path: Path, n: int = 100, spike_at: int | None = None) -> Path:
    """A flat noisy stream; ``spike_at``: that loss and the next (which confirms it) x9."""
    losses = [1.0 + 0.01 * (i % 3) for i in range(n)]
    if spike_at is not None:
        losses[spike_at : spike_at + 2] = [9.0, 9.0]
    path.write_text("step,loss\n" + "".join(f"{i},{x!r}\n" for i, x in enumerate(losses)))
    return path


def replayed(capsys: pytest.CaptureFixture[str], *argv: str) -> list[tuple[int, str, str]]:
    """``surgeon replay ARGV``'s printed events as (step, kind, reason)."""
    assert main(["replay", *argv]) == 0
    rows = re.findall(r"^\s*(\d+)  (\w+)\s+(.*)$", capsys.readouterr().out, re.M)
    return [(int(step), kind, reason) for step, kind, reason in rows]


def test_config_options_parse_lengths_as_steps_or_fractions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = plain_csv(tmp_path / "l.csv")
    png = ["--out", str(tmp_path / "r.png")]
    (end, *_) = replayed(capsys, str(csv_path), "--warmup", "7", *png)
    assert end[:2] == (6, "warmup_end") and "fixed warmup of 7 steps" in end[2]
    (end, *_) = replayed(capsys, str(csv_path), "--min-warmup", "0.5", "--max-warmup", "0.5", *png)
    assert end[:2] == (49, "warmup_end")  # half of the 100 steps
    (end, *_) = replayed(capsys, str(csv_path), "--min_warmup", "3", "--max-warmup", "3", *png)
    assert end[:2] == (2, "warmup_end")
    events = replayed(capsys, str(csv_path), "--total-steps", "60", *png)
    assert events[-1][:2] == (59, "done")


def test_snapshot_off_replays_a_run_without_rollbacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = plain_csv(tmp_path / "l.csv", n=300, spike_at=200)
    png = ["--out", str(tmp_path / "r.png")]
    kinds = [kind for _, kind, _ in replayed(capsys, str(csv_path), *png)]
    assert "spike" in kinds and "rollback" in kinds
    kinds = [kind for _, kind, _ in replayed(capsys, str(csv_path), "--snapshot", "off", *png)]
    assert "spike" in kinds and "rollback" not in kinds


def test_a_subsampled_stream_says_how_it_is_replayed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("step,train_loss\n" + "".join(f"{50 * i + 49},1.0\n" for i in range(40)))
    assert main(["replay", str(path), "--out", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "logged every 50 steps: one point is one step of the replay" in out
    assert "(train_loss): 40 losses, steps 49 to 1999" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--spike-zscore", "-1"], "spike_zscore must be a finite number in (0.0, inf)"),
        (["--decay", "nope"], "invalid 'cosine' or 'linear' or 'sqrt' or 'wsd' value: 'nope'"),
        (["--min-warmup", "5", "--max-warmup", "1"], "min_warmup must be <= max_warmup"),
        (["--max-warmup", "500"], "max_warmup must be <= total_steps"),
        (["--metric", "val_loss"], "has no series 'val_loss'"),
    ],
)
def test_bad_settings_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    csv_path = plain_csv(tmp_path / "l.csv")
    assert main(["replay", str(csv_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("surgeon replay: error: ") and message in err


def test_a_malformed_checkpoints_file_is_a_usage_error_naming_it(
    logged_run: tuple[ScheduleSurgeon, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``checkpoints.csv`` whose rows are not step counts is refused by name (exit code 2),
    not replayed as if the run had none."""
    _, root = logged_run
    run = tmp_path / "run"
    run.mkdir()
    for name in (LOSSES_FILE, SETTINGS_FILE):
        (run / name).write_text((root / name).read_text())
    (run / "checkpoints.csv").write_text("step\n40\nforty\n")
    assert main(["replay", str(run)]) == 2
    err = capsys.readouterr().err
    assert "checkpoints.csv: not one step count per row" in err


def _copy_run(root: Path, run: Path) -> Path:
    run.mkdir()
    for name in (LOSSES_FILE, SETTINGS_FILE, EVENTS_FILE):
        (run / name).write_text((root / name).read_text())
    return run


def test_run_files_cut_short_inside_their_last_line_are_read_up_to_it(
    logged_run: tuple[ScheduleSurgeon, Path], tmp_path: Path
) -> None:
    """A crash, a full disk or a copy cut short can end a run file inside a line; the recorder
    writes whole lines, so a last line without its newline is left out: ``read_stream`` and
    ``surgeon plot`` read the rest (before: an IndexError traceback)."""
    _, root = logged_run
    run = _copy_run(root, tmp_path / "run")
    losses = (root / LOSSES_FILE).read_text()
    (run / LOSSES_FILE).write_text(losses[: losses.rindex("\n", 0, -1) + 3])  # inside the last row
    (run / EVENTS_FILE).write_text((root / EVENTS_FILE).read_text() + '{"step": 9')
    whole, cut = read_stream(root / LOSSES_FILE), read_stream(run / LOSSES_FILE)
    assert cut.steps == whole.steps[:-1]
    assert cut.logged_events == whole.logged_events
    assert main(["plot", str(run), "--out", str(tmp_path / "cut.png")]) == 0
    assert (tmp_path / "cut.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        (
            LOSSES_FILE,
            lambda text: re.sub(r"\n5,[^,]*,", "\n5,abc,", text, count=1),
            "losses.csv, line 7: column 2 holds 'abc', not a number",
        ),
        (
            LOSSES_FILE,
            lambda text: re.sub(r"\n5,", "\ninf,", text, count=1),
            "losses.csv, line 7: column 1 holds 'inf', not a step (a whole number)",
        ),
        (
            EVENTS_FILE,
            lambda text: text.replace("\n", '\n{"step": 3, \n', 1),
            "events.jsonl, line 2: not a JSON event record",
        ),
        (SETTINGS_FILE, lambda text: "[1, 2]", "settings.json: not the surgeon's settings (list)"),
        (
            SETTINGS_FILE,
            lambda text: '{"total_steps": 240}',
            "settings.json: not the surgeon's settings (no 'config' object)",
        ),
        (
            LOSSES_FILE,
            lambda text: text.replace("\n5,", "\n5\udcff,", 1),
            "losses.csv is not UTF-8",
        ),
    ],
    ids=["loss", "step", "event", "settings-list", "settings-without-config", "not-utf8"],
)
@pytest.mark.parametrize("command", ["replay", "plot"])
def test_a_damaged_line_inside_a_run_file_is_a_usage_error_naming_it(
    logged_run: tuple[ScheduleSurgeon, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    damage: Callable[[str], str],
    message: str,
    command: str,
) -> None:
    """A value that does not parse, anywhere but a torn last line, is an error (exit code 2)
    naming the file and the line, from ``surgeon replay`` and ``surgeon plot`` alike."""
    _, root = logged_run
    run = _copy_run(root, tmp_path / "run")
    (run / name).write_bytes(damage((run / name).read_text()).encode("utf-8", "surrogateescape"))
    assert main([command, str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"surgeon {command}: error: ") and message in err


def test_a_missing_stream_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", str(tmp_path / "nothing.csv")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_preview_needs_a_schedule_or_a_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["preview"]) == 2
    assert "name a schedule (see --help), or write a page with --html FILE" in (
        capsys.readouterr().err
    )
    page = tmp_path / "page.html"
    assert main(["preview", "--html", str(page), "one_cycle", "--total-steps", "100"]) == 2
    assert "start it from one of warmup_cosine, cosine, wsd" in capsys.readouterr().err
    assert not page.exists()


def test_a_run_without_snapshots_replays_without_rollbacks_from_its_settings(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """``settings.json`` says the run kept no snapshots: replaying its directory with no
    options makes no rollback (its 30x spike and NaN streak only cut) and reproduces it."""
    surgeon = ScheduleSurgeon(**SURGEON_KW, snapshot="off")
    trainer = make_trainer([surgeon], max_steps=STEPS)
    trainer.fit(TinyRegressor(loss_hook=troubled), make_loader())
    kinds = {e.kind.value for e in surgeon.events}
    assert "rollback" not in kinds and "spike" in kinds
    stream = read_stream(tmp_path)
    assert not stream.settings.snapshots
    replayed = replay(stream.losses, stream.settings, update_skipped=stream.update_skipped)
    assert comparable(replayed.events) == comparable(surgeon.events)


def test_a_resumed_runs_own_directory_is_refused_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plain loop logging to ``first/``, checkpointed at step 60 and resumed logging to
    ``second/``: ``second/losses.csv`` starts at step 60 (its events.jsonl holds the events
    from step 0), so replaying it alone is refused (exit code 2) with what to do instead;
    ``first/`` replays."""
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = [1.0 / (1.0 + 0.05 * t) for t in range(100)]
    surgeon = Surgeon(optimizer, 100, model=model, verbose=False, log_dir=tmp_path / "first")
    for step in range(60):
        surgeon.step(losses[step])
    saved = surgeon.state_dict()
    surgeon.finish()
    resumed = Surgeon(optimizer, 100, model=model, verbose=False, log_dir=tmp_path / "second")
    resumed.load_state_dict(saved)
    for step in range(60, 100):
        resumed.step(losses[step])
    resumed.finish()
    assert read_stream(tmp_path / "second").steps[0] == 60

    assert main(["replay", str(tmp_path / "second"), "--out", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("surgeon replay: error: ")
    assert "holds the losses from step 60 on: it is the part of a run resumed at step 60" in err
    assert "replay the directory of the run's first part" in err
    assert main(["replay", str(tmp_path / "first"), "--out", str(tmp_path / "r.png")]) == 0


def test_a_manual_run_with_steps_without_a_loss_replays_exactly(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """Manual optimization whose ``training_step`` returns none on some steps (the first one
    among them): the surgeon counts those steps without a loss, ``losses.csv`` keeps them as rows
    with an empty loss, and the run directory replays to the run's own events and LRs (it was
    refused as "resumed at step 1" before)."""
    no_loss = {0, 57, 58, 150}

    class Sometimes(TinyRegressor):  # type: ignore[misc, valid-type]
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
            loss = super().training_step(batch, batch_idx)
            return None if self.global_step - 1 in no_loss else loss

    surgeon = ScheduleSurgeon(**SURGEON_KW)
    trainer = make_trainer(
        [surgeon], max_steps=STEPS, logger=CSVLogger(tmp_path, name="", version="")
    )
    trainer.fit(Sometimes(loss_hook=troubled, manual=True), make_loader())
    rows = (tmp_path / LOSSES_FILE).read_text().splitlines()[1:]
    assert len(rows) == STEPS and [r for r in rows if ",," in r] == [f"{s},,0" for s in no_loss]
    stream = read_stream(tmp_path)
    assert stream.steps == list(range(STEPS)) and stream.passed is not None
    assert [s for s, gone in zip(stream.steps, stream.passed, strict=True) if gone] == sorted(
        no_loss
    )
    result = replay(
        stream.losses,
        settings_of(surgeon, STEPS),
        update_skipped=stream.update_skipped,
        passed=stream.passed,
    )
    assert {EventKind.SPIKE, EventKind.ROLLBACK} <= {e.kind for e in surgeon.events}
    assert comparable(result.events) == comparable(surgeon.events)
    written = dict(read_metrics(tmp_path / "metrics.csv")["surgeon/lr_scale"])
    assert [result.lr_scales[s] for s in sorted(written)] == [written[s] for s in sorted(written)]
    assert main(["replay", str(tmp_path), "--out", str(tmp_path / "replay.png")]) == 0
    run = load_run(tmp_path)  # the plot draws the steps that had a loss, and the replayed LR
    assert [step for step, _ in run.losses or []] == [s for s in range(STEPS) if s not in no_loss]
    assert run.lr_note is None and any(key.startswith("lr-") for key in run.series)
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "plot.png")]) == 0


def test_the_comparison_with_the_log_reads_reasons_and_stops_at_outside_decisions() -> None:
    """``surgeon replay`` compares step, kind and reason (a snapshot's size aside: a replay has
    no weights), and only up to the first decision the run made from outside the losses (an
    EarlyStopping cooldown: the plans differ from there)."""
    from surgeon.cli import _compare_with_log
    from surgeon.controller import Event

    def event(step: int, kind: str, reason: str) -> Event:
        return Event(step, EventKind(kind), reason, 1.0, 1.0)

    rollback = "restored the snapshot of step 90 ({} KiB), undoing 12 steps"
    replayed = [event(9, "warmup_end", "a"), event(101, "rollback", rollback.format(0))]
    logged = [
        {"step": 9, "kind": "warmup_end", "reason": "a"},
        {"step": 101, "kind": "rollback", "reason": rollback.format("1.3")},
        {"step": 150, "kind": "cooldown", "reason": "EarlyStopping(...)"},
        {"step": 170, "kind": "stopped", "reason": "..."},
    ]
    same = _compare_with_log([*replayed, event(199, "done", "z")], logged)
    assert same.startswith("the replay reproduces the 2 logged events up to the cooldown at")
    other = [replayed[0], event(101, "rollback", "restored the snapshot of step 96 (0 B)")]
    differs = _compare_with_log(other, logged)
    assert "differs" in differs and "event 2" in differs and "another reason" in differs
    assert "replays close" not in differs  # the run's checkpoints are known: no excuse
    older = _compare_with_log(other, logged, checkpoints_known=False)
    assert "no checkpoints.csv" in older and "replays close, not exactly" in older
    extra = [*replayed, event(120, "spike", "b"), event(199, "done", "z")]  # before the cooldown
    assert "differs" in _compare_with_log(extra, logged)
    # a run killed before writing its last loss rows: the replay says why it has fewer events
    # (it blamed its own decisions)
    cut_short = _compare_with_log(replayed[:1], logged, losses_end=95)
    assert "nothing more replayed. The losses end at step 95, before the logged events do" in (
        cut_short
    )
    assert "The losses end" not in _compare_with_log(replayed[:1], logged, losses_end=199)
    # a difference inside the losses is the replay's own, whatever was logged after them
    spiked = [*logged[:2], {"step": 140, "kind": "spike", "reason": "c"}]
    inside = _compare_with_log(other, spiked, losses_end=120)
    assert "event 2" in inside and "The losses end" not in inside
    # a replan (a resume with another length, a time budget) changes the plan from outside
    # the losses too: compared up to it, as the plot's replayed LR line ends there
    replanned = [logged[0], {"step": 60, "kind": "replan", "reason": "resumed for 400 steps"}]
    later = [replayed[0], event(101, "rollback", rollback.format(0))]
    assert _compare_with_log(later, replanned).startswith(
        "the replay reproduces the 1 logged events up to the replan at step 60"
    )


@pytest.mark.parametrize("every", [44, 31])
def test_a_run_with_checkpoints_near_its_decisions_replays_exactly(
    make_trainer: Callable[..., Any], tmp_path: Path, every: int
) -> None:
    """A checkpoint reads every loss in flight early (a spike before it is decided on then)
    and drops the snapshots. The run records where (``checkpoints.csv``), and the replay does
    the same there: events and every step's LR scale are the run's own. Without the record the
    same stream replays otherwise (what the check is worth)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    surgeon = ScheduleSurgeon(**SURGEON_KW)
    saver = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)
    trainer = make_trainer(
        [surgeon, saver],
        max_steps=STEPS,
        enable_checkpointing=True,
        logger=CSVLogger(tmp_path, name="", version=""),
    )
    trainer.fit(TinyRegressor(loss_hook=troubled), make_loader())
    stream = read_stream(tmp_path)
    assert stream.checkpoints == list(range(every, STEPS + 1, every))
    assert {EventKind.SPIKE, EventKind.ROLLBACK} <= {e.kind for e in surgeon.events}
    settings = settings_of(surgeon, STEPS)
    result = replay(stream.losses, settings, checkpoints=stream.checkpoints)
    assert comparable(result.events) == comparable(surgeon.events)
    written = dict(read_metrics(tmp_path / "metrics.csv")["surgeon/lr_scale"])
    assert result.lr_scales == [written[s] for s in range(STEPS)]
    blind = replay(stream.losses, settings)
    assert (comparable(blind.events), blind.lr_scales) != (
        comparable(surgeon.events),
        result.lr_scales,
    )
    assert main(["replay", str(tmp_path), "--out", str(tmp_path / "replay.png")]) == 0


def test_a_plain_loops_checkpoints_are_recorded_and_replayed(tmp_path: Path) -> None:
    """``Surgeon.state_dict()`` is the plain loop's checkpoint: recorded as such (one before
    the first step too), so its run directory replays exactly, a checkpoint taken right after
    a severe spike included."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    surgeon = Surgeon(optimizer, 200, model=model, log_dir=tmp_path, verbose=False, **SURGEON_KW)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    scales = []
    surgeon.state_dict()  # a checkpoint before the first step (the run files open later)
    for step in range(200):
        scales.append(surgeon.controller.lr_scale(step))
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        surgeon.guard(loss)
        optimizer.step()
        optimizer.zero_grad()
        surgeon.step(loss * 30.0 if step in (101, 150) else loss)
        if step + 1 in (102, 151, 160):  # checkpoints right after the spikes, and one later
            surgeon.state_dict()
    surgeon.finish()
    stream = read_stream(tmp_path)
    assert stream.checkpoints == [0, 102, 151, 160]
    assert EventKind.ROLLBACK in {e.kind for e in surgeon.events}
    result = replay(stream.losses, stream.settings, checkpoints=stream.checkpoints)  # type: ignore[arg-type]
    assert comparable(result.events) == comparable(surgeon.events)


def test_a_run_resumed_for_another_length_replays_exactly_up_to_its_replan(
    make_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    """A fit of 150 steps, resumed from its checkpoint for 300 into the same log directory:
    ``settings.json`` keeps the settings the run started with, so the replay reproduces every
    event up to the resume's ``replan`` (from there the plans differ, and it stops comparing)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    def fit(steps: int, ckpt: Path | None) -> ScheduleSurgeon:
        surgeon = ScheduleSurgeon(**SURGEON_KW)
        saver = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
        trainer = make_trainer(
            [surgeon, saver],
            max_steps=steps,
            enable_checkpointing=True,
            logger=CSVLogger(tmp_path, name="", version=""),
        )
        trainer.fit(TinyRegressor(loss_hook=troubled), make_loader(), ckpt_path=ckpt)
        return surgeon

    first = fit(150, None)
    resumed = fit(300, tmp_path / "ckpt" / "last.ckpt")
    replan = next(e for e in resumed.events if e.kind is EventKind.REPLAN)
    assert "does not re-warm a finished run" in replan.reason  # it stays at the floor
    assert replan.scale_after == 0.0 and resumed.events[-1].kind is EventKind.DONE
    assert replan.step == 150 and {EventKind.OUTLIER, EventKind.CLIMB} <= {
        e.kind for e in first.events
    }
    settings = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert settings["total_steps"] == 150  # the run's first plan
    stream = read_stream(tmp_path)
    assert stream.steps == list(range(300))
    result = replay(stream.losses, stream.settings, checkpoints=stream.checkpoints)  # type: ignore[arg-type]
    before = [e for e in comparable(first.events) if e[0] < replan.step]
    assert [e for e in comparable(result.events) if e[0] < replan.step] == before
    from surgeon.cli import _compare_with_log

    logged = [json.loads(line) for line in (tmp_path / EVENTS_FILE).read_text().splitlines()]
    said = _compare_with_log(result.events, logged)
    assert said.startswith(f"the replay reproduces the {len(before)} logged events up to the")
    assert "replan at step 150" in said


def test_a_rollback_for_a_snapshots_non_finite_state_is_a_decision_from_outside_the_losses() -> (
    None
):
    """A rollback the snapshot check asked for (NaN/inf weights or optimizer state behind normal
    losses) is not made by a replay of the losses: the comparison, and the plot's replayed LR
    line, stop there, as at a cooldown; an ordinary rollback is compared like any decision."""
    from surgeon.controller import STATE_ROLLBACK_MARK
    from surgeon.replay import before_outside_decision

    logged = [
        {"step": 5, "kind": "warmup_end", "reason": "..."},
        {"step": 40, "kind": "rollback", "reason": "3 non-finite steps in a row: restored"},
        {"step": 90, "kind": "rollback", "reason": f"snapshot of step 90 {STATE_ROLLBACK_MARK}"},
        {"step": 99, "kind": "done", "reason": "..."},
    ]
    kept, outside = before_outside_decision(logged)
    assert [r["step"] for r in kept] == [5, 40]
    assert outside is not None and outside["step"] == 90


def test_a_csv_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Spreadsheets save UTF-8 with a byte-order mark: its header was read as '\\ufeffstep' and
    refused as having no 'step' column."""
    path = tmp_path / "exported.csv"
    losses = [1.0 / (1 + i / 20) for i in range(60)]
    text = "step,loss\n" + "".join(f"{i},{x!r}\n" for i, x in enumerate(losses))
    path.write_bytes(text.encode("utf-8-sig"))
    stream = read_stream(path)
    assert stream.steps == list(range(60)) and stream.losses == losses


def test_a_replay_piped_into_head_still_writes_its_files(tmp_path: Path) -> None:
    """``surgeon replay RUN --html ... --out ... | head -1``: the reader leaves after a line while
    the event table (here ~100 KB, more than a pipe holds) is still being printed. The command
    goes on quietly and writes both files (it ended with a BrokenPipeError traceback, or, caught
    at the top, without writing them)."""
    losses = [1.0 / (1 + i / 500) + 0.3 + 0.01 * ((i * 7) % 5) for i in range(8000)]
    for at in range(400, 8000, 40):  # a confirmed spike every 40 steps: hundreds of events
        losses[at] *= 3.0
        losses[at + 1] *= 3.0
    stream = tmp_path / "losses.txt"
    stream.write_text("step,loss\n" + "".join(f"{i},{x!r}\n" for i, x in enumerate(losses)))
    html, png = tmp_path / "page.html", tmp_path / "replay.png"
    command = f"{sys.executable} -m surgeon replay {stream} --html {html} --out {png} | head -1"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=300
    )
    assert done.stdout.startswith("replaying ") and done.stdout.count("\n") == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 0
    assert html.stat().st_size > 0 and png.stat().st_size > 0


def test_run_files_saved_with_a_byte_order_mark_plot_and_replay_as_before(
    logged_run: tuple[ScheduleSurgeon, Path], tmp_path: Path
) -> None:
    """A run directory whose files were re-saved by an editor or a spreadsheet with a UTF-8
    byte-order mark: ``settings.json`` was "Unexpected UTF-8 BOM", and ``metrics.csv`` lost its
    first column's name (a KeyError for 'step', or an LR series left out of the plot)."""
    _, root = logged_run
    run = _copy_run(root, tmp_path / "run")
    (run / "metrics.csv").write_text((root / "metrics.csv").read_text())
    clean = load_run(run)
    for name in (SETTINGS_FILE, "metrics.csv", LOSSES_FILE, EVENTS_FILE):
        (run / name).write_bytes((run / name).read_text().encode("utf-8-sig"))
    marked = load_run(run)
    assert repr(marked.series) == repr(clean.series)  # (repr: the run's NaN losses compare)
    assert marked.settings == clean.settings and "lr-SGD" in marked.series
    assert repr(marked.events) == repr(clean.events) and repr(marked.losses) == repr(clean.losses)
    assert read_stream(run).settings == read_stream(root).settings
    assert main(["plot", str(run), "--out", str(tmp_path / "plot.png")]) == 0


def test_a_bad_step_in_a_metrics_file_is_named_by_its_line_and_column(
    logged_run: tuple[ScheduleSurgeon, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lightning's ``metrics.csv`` has ``step`` in another column than the first, and a blank
    line moves every later line's number: the error names the line and column as an editor
    shows them (it said column 1, and a line one too low)."""
    _, root = logged_run
    run = _copy_run(root, tmp_path / "run")
    lines = (root / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index("step")
    row = lines[5].split(",")
    row[column] = "4.5"
    damaged = [*lines[:3], "", *lines[3:5], ",".join(row), *lines[6:]]
    (run / "metrics.csv").write_text("\n".join(damaged) + "\n")
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"metrics.csv, line 7: column {column + 1} holds '4.5', not a step" in err
