"""The run files (``settings.json``, ``losses.csv``, ``events.jsonl``) of real fits.

``losses.csv`` must hold every step's loss as the controller consumed it, once, in step order,
also across a crash and a resume in the same directory; ``settings.json`` what the decisions
depend on, so a replay can re-run them.
"""

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyRegressor, make_loader
from pytorch_lightning.callbacks import ModelCheckpoint

from surgeon.callback import ScheduleSurgeon
from surgeon.recorder import LOSSES_FILE, SETTINGS_FILE


def read_losses(directory: Path) -> list[tuple[int, float, int]]:
    with (directory / LOSSES_FILE).open() as f:
        rows = list(csv.DictReader(f))
    return [(int(r["step"]), float(r["loss"]), int(r["update_skipped"])) for r in rows]


def test_losses_and_settings_of_a_fit(make_trainer: Any, tmp_path: Path) -> None:
    steps = 50

    def hook(step: int, batch_idx: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step == 20 else loss

    cb = ScheduleSurgeon(min_warmup=4, max_warmup=8, readback_every=3)
    model = TinyRegressor(loss_hook=hook)
    make_trainer([cb], max_steps=steps).fit(model, make_loader())

    (run_dir,) = cb.log_dirs  # no logger: default_root_dir/surgeon_logs/version_0
    assert run_dir == tmp_path / "surgeon_logs" / "version_0"
    rows = read_losses(run_dir)
    assert [r[0] for r in rows] == list(range(steps))  # every step once, the last ones too
    seen = {r["step"]: r["loss"] for r in model.records}
    for step, loss, skipped in rows:
        if step == 20:
            assert loss != loss and skipped == 1  # NaN, and the guard skipped the update
        else:
            assert loss == pytest.approx(seen[step], rel=1e-6) and skipped == 0
    settings = json.loads((run_dir / SETTINGS_FILE).read_text())
    config = asdict(cb.config)
    assert settings == {
        "total_steps": steps,
        "readback_every": 3,
        "snapshot": "cpu",
        "config": config,
        "peak_lrs": list(model.lrs),  # each group's configured LR, its peak
    }


@pytest.mark.parametrize("torn", [False, True], ids=["whole", "last-row-torn"])
def test_a_resume_after_a_crash_keeps_each_step_once(
    make_trainer: Any, tmp_path: Path, torn: bool
) -> None:
    """Run A checkpoints at step 20 and crashes at step 33 (its losses.csv then has rows past
    20); run B resumes from step 20 in the same directory (``log_dir``): the file holds 0..59
    once each, the rows of steps 20-32 being run B's. ``torn``: the crash cut the file in the
    middle of a row of a step before 20 (a full disk, a copy cut short): that row is dropped,
    not glued to the next one written."""
    steps = 60

    class Crash(RuntimeError):
        pass

    def crash(step: int, batch_idx: int, loss: torch.Tensor) -> torch.Tensor:
        if step == 33:
            raise Crash
        return loss

    ckpt = ModelCheckpoint(tmp_path / "ckpt", "{step}", every_n_train_steps=20, save_top_k=-1)
    cb_a = ScheduleSurgeon(min_warmup=4, max_warmup=8, log_dir=tmp_path)
    trainer = make_trainer([cb_a, ckpt], max_steps=steps, enable_checkpointing=True)
    with pytest.raises(Crash):
        trainer.fit(TinyRegressor(loss_hook=crash), make_loader())
    assert max(r[0] for r in read_losses(tmp_path)) > 20
    if torn:
        text = (tmp_path / LOSSES_FILE).read_text()
        cut = text.index("\n15,") + 4  # the file ends inside the row of step 15
        (tmp_path / LOSSES_FILE).write_text(text[:cut])

    cb_b, model_b = ScheduleSurgeon(min_warmup=4, max_warmup=8, log_dir=tmp_path), TinyRegressor()
    trainer = make_trainer([cb_b], max_steps=steps)
    trainer.fit(model_b, make_loader(), ckpt_path=tmp_path / "ckpt" / "step=20.ckpt")
    rows = read_losses(tmp_path)
    assert [r[0] for r in rows] == [s for s in range(steps) if not (torn and 15 <= s < 20)]
    resumed = {r["step"]: r["loss"] for r in model_b.records}
    assert all(loss == pytest.approx(resumed[step], rel=1e-6) for step, loss, _ in rows[20:])


def test_fits_without_a_logger_do_not_overwrite_each_other(
    make_trainer: Any, tmp_path: Path
) -> None:
    """``logger=False``: each fit gets its own ``default_root_dir/surgeon_logs/version_N``."""
    surgeons = [ScheduleSurgeon(min_warmup=4, max_warmup=8) for _ in range(2)]
    for steps, cb in zip((20, 30), surgeons, strict=True):
        make_trainer([cb], max_steps=steps).fit(TinyRegressor(), make_loader())
    dirs = [cb.log_dirs for cb in surgeons]
    assert dirs == [[tmp_path / "surgeon_logs" / f"version_{n}"] for n in (0, 1)]
    assert [len(read_losses(d[0])) for d in dirs] == [20, 30]


def test_a_fast_dev_run_writes_run_files_only_where_log_dir_asks(
    make_trainer: Any, tmp_path: Path
) -> None:
    """``fast_dev_run``: Lightning's loggers write nothing, and neither does the surgeon (it
    wrote ``surgeon_logs/version_0``), unless its ``log_dir`` names a directory."""
    quiet, asked = ScheduleSurgeon(), ScheduleSurgeon(log_dir=tmp_path / "asked")
    for cb in (quiet, asked):
        make_trainer([cb], fast_dev_run=3).fit(TinyRegressor(), make_loader())
        assert cb.engine.step == 3
    assert quiet.log_dirs == [] and not (tmp_path / "surgeon_logs").exists()
    assert asked.log_dirs == [tmp_path / "asked"] and len(read_losses(tmp_path / "asked")) == 3
