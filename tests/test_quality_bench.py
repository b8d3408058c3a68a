"""The outcome benchmark (``benchmarks/quality.py``) on tiny slices, through its ``main``.

The fast tests run a few contenders for a few dozen steps in-process: the outputs' structure,
the table's rows, the oracle, what the LR of each contender looks like step by step, the
``ReduceLROnPlateau`` wiring, and the divergence flag on a run whose loss turns NaN. The slow
test runs ``--quick`` itself, as CI does, in a subprocess.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import quality  # noqa: E402
import quality_tasks  # noqa: E402

SLICE = [
    "constant",
    "cosine",
    "warmup_cosine_5",
    "warmup_cosine_20",
    "plateau",
    "schedule_free",
    "surgeon",
]


@pytest.fixture(scope="module")
def sliced(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """circle (SGD) and digits (AdamW), 7 contenders, 40 steps, 2 seeds."""
    out = tmp_path_factory.mktemp("quality")
    argv = ["--quick", "--tasks", "circle,digits", "--contenders", ",".join(SLICE)]
    result = quality.main([*argv, "--steps", "40", "--seeds", "2", "--out", str(out)])
    return result, out


def test_outputs_have_every_task_contender_and_seed(sliced: tuple[dict[str, Any], Path]) -> None:
    _, out = sliced
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["mode"] == "quick" and data["meta"]["seeds"] == [0, 1]
    assert set(data["tasks"]) == {"circle", "digits"}
    # schedule-free AdamW only where the task's optimizer is Adam-like
    assert list(data["tasks"]["circle"]["contenders"]) == [c for c in SLICE if c != "schedule_free"]
    assert list(data["tasks"]["digits"]["contenders"]) == SLICE
    for task in data["tasks"].values():
        assert task["steps"] == 40 and math.isfinite(task["target_loss"])
        for entry in task["contenders"].values():
            assert [run["seed"] for run in entry["runs"]] == [0, 1]
            assert len(entry["final_val_loss"]) == 2 and entry["diverged"] == 0
            for run in entry["runs"]:
                # 10 validations in --quick mode, the last one at the final step
                assert [step for step, _ in run["val"]] == list(range(4, 41, 4))
                assert run["final_val_loss"] == run["val"][-1][1]
                assert len(run["train_loss"]) == 40 and len(run["lr"]) == 40
    for name in ("circle", "digits"):
        assert (out / f"{name}.png").stat().st_size > 10_000


def test_table_lists_every_contender(sliced: tuple[dict[str, Any], Path]) -> None:
    _, out = sliced
    text = (out / "results.md").read_text()
    circle, digits = text.split("## 2. ")[0], text.split("## 2. ")[1].split("## Targets")[0]
    for name in SLICE:
        label = quality.CONTENDERS[name].label
        assert f"| {label}" in digits
        assert (f"| {label}" in circle) is (name != "schedule_free")
    assert "## Targets" in text and "## The surgeon's decisions" in text


def test_oracle_is_the_best_of_the_warmup_sweep(sliced: tuple[dict[str, Any], Path]) -> None:
    result, _ = sliced
    for task in result["summary"].values():
        entries = task["contenders"]
        sweep = {
            n: e["score"] for n, e in entries.items() if quality.CONTENDERS[n].warmup is not None
        }
        assert set(sweep) == {"cosine", "warmup_cosine_5", "warmup_cosine_20"}
        assert task["oracle"] == min(sweep, key=sweep.__getitem__)
        for entry in entries.values():
            assert entry["score"] == pytest.approx(sum(entry["final_val_loss"]) / 2)


def test_targets_report_met_missed_or_not_run(sliced: tuple[dict[str, Any], Path]) -> None:
    result, _ = sliced
    by_key = {(g["target"], g["task"]): g for g in result["targets"]}
    summary = result["summary"]
    oracle_goal = by_key[("within 2% of the oracle", "circle")]
    circle = summary["circle"]["contenders"]
    ratio = circle["surgeon"]["score"] / circle[summary["circle"]["oracle"]]["score"]
    assert oracle_goal["met"] is (ratio <= quality.ORACLE_TOLERANCE)
    assert by_key[("within 2% of the oracle", "char")]["met"] is None  # not run
    beat = by_key[("better than constant and cosine", "digits")]
    digits = summary["digits"]["contenders"]
    expected = digits["surgeon"]["score"] < min(digits[n]["score"] for n in ("constant", "cosine"))
    assert beat["met"] is expected
    assert by_key[("plateau: better than cosine", "parity")]["met"] is None


def test_each_contender_drives_the_lr_it_should(sliced: tuple[dict[str, Any], Path]) -> None:
    result, _ = sliced
    for task_name, task in result["summary"].items():
        peak = quality_tasks.TASKS[task_name].lr
        runs = {n: e["runs"][0] for n, e in task["contenders"].items()}
        assert runs["constant"]["lr"] == pytest.approx([peak] * 40)
        cosine = runs["cosine"]["lr"]
        assert cosine[0] == pytest.approx(peak) and cosine == sorted(cosine, reverse=True)
        warm = runs["warmup_cosine_20"]["lr"]  # 8 warmup steps from 0, the peak at step 8
        assert warm[0] == 0.0 and warm[8] == pytest.approx(peak) and max(warm) == warm[8]
        surgeon = runs["surgeon"]["lr"]
        assert surgeon[0] < peak and max(surgeon) == pytest.approx(peak)
        assert surgeon[-1] >= 0.1 * peak * (1 - 1e-9)  # its floor, min_lr_ratio
        if "schedule_free" in runs:
            assert runs["schedule_free"]["lr"] == pytest.approx([peak] * 40)
        # every contender of a task starts from the same weights: the same first loss
        first = {n: r["train_loss"][0] for n, r in runs.items()}
        assert len({round(x, 6) for x in first.values()}) == 1, first


@pytest.mark.parametrize("name", list(quality_tasks.TASKS))
def test_every_task_module_runs_the_mixins_hooks(name: str) -> None:
    """A task module's own ``training_step`` (say) placed before the mixin in the MRO would
    silently drop ``train_loss_window``, and ReduceLROnPlateau would fail mid-benchmark."""
    model, _ = quality_tasks.TASKS[name].build(0, 20)
    mixin = quality_tasks.BenchMixin
    for hook in (
        "configure_optimizers",
        "training_step",
        "on_train_batch_end",
        "on_train_start",
        "on_validation_epoch_start",
        "on_validation_epoch_end",
    ):
        assert getattr(type(model), hook) is getattr(mixin, hook), hook


# ---------------------------------------------------------------------------- divergence


class _NaNCircle(quality_tasks.CircleNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step >= 5 else loss


class _FlatCircle(quality_tasks.CircleNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * 0.0 + 1.0


class NaNCircleNet(quality_tasks.BenchMixin, _NaNCircle):
    """The circle net whose loss turns NaN from step 5 on."""


class FlatCircleNet(quality_tasks.BenchMixin, _FlatCircle):
    """A training loss that cannot improve: 1.0, whatever the weights."""


def _task_with(module: type, name: str) -> dict[str, quality_tasks.Task]:
    def build(seed: int, steps: int) -> quality_tasks.Built:
        return module(hidden=16), quality_tasks.BenchCircleData(steps, seed)

    return {name: dataclasses.replace(quality_tasks.TASKS["circle"], name=name, build=build)}


def test_a_run_whose_loss_turns_nan_is_diverged(tmp_path: Path) -> None:
    tasks = _task_with(NaNCircleNet, "nan_circle")
    argv = ["--quick", "--contenders", "constant,surgeon", "--steps", "20", "--out", str(tmp_path)]
    result = quality.main([*argv, "--no-plots"], tasks=tasks)
    entries = result["summary"]["nan_circle"]["contenders"]
    for entry in entries.values():  # a non-finite step loss is a divergence, rescued or not
        assert entry["diverged"] == 1
        assert all(math.isnan(x) for x in entry["runs"][0]["train_loss"][5:])
    constant = entries["constant"]
    assert constant["finite"] == 0 and constant["score"] == math.inf
    assert math.isnan(constant["final_val_loss"][0])
    data = json.loads((tmp_path / "results.json").read_text())  # strict JSON: NaN as null
    run = data["tasks"]["nan_circle"]["contenders"]["constant"]["runs"][0]
    assert run["final_val_loss"] is None and run["diverged"] is True
    assert run["nonfinite_steps"] == 15
    assert "| constant | non-finite (1/1) |" in (tmp_path / "results.md").read_text()
    # the surgeon saw the non-finite losses and said so
    assert any(e["kind"] == "nonfinite" for e in entries["surgeon"]["runs"][0]["events"])


def test_diverged_definition() -> None:
    falling = [1.0 - 0.01 * i for i in range(100)]
    assert not quality.diverged(falling, 0.5)
    assert quality.diverged(falling, math.nan)  # final validation loss not finite
    assert quality.diverged([*falling[:50], math.inf, *falling[51:]], 0.5)
    rising = [1.0 + 0.01 * i for i in range(100)]
    assert quality.diverged(rising, 0.5)  # ends above where it started
    stalled = [0.70] * 10 + [0.693] * 90  # parity's plateau: not a divergence
    assert not quality.diverged(stalled, 0.693)


def test_reduce_on_plateau_steps_on_the_windowed_training_loss(tmp_path: Path) -> None:
    """100 steps: a window of 100 // 50 = 2 steps; torch's defaults (patience 10, factor 0.1)
    cut at the 12th evaluation (11 without improvement after the first), at the end of step 23:
    step 24 is the first to run at a tenth of the peak."""
    tasks = _task_with(FlatCircleNet, "flat_circle")
    argv = ["--contenders", "plateau", "--steps", "100", "--seeds", "1", "--out", str(tmp_path)]
    result = quality.main([*argv, "--no-plots"], tasks=tasks)
    lrs = result["summary"]["flat_circle"]["contenders"]["plateau"]["runs"][0]["lr"]
    peak = quality_tasks.TASKS["circle"].lr
    assert lrs[:24] == pytest.approx([peak] * 24)
    assert lrs[24] == pytest.approx(0.1 * peak)


def test_unknown_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        quality.main(["--tasks", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        quality.main(["--contenders", "constant,nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # not a multiple of the 20 validations
        quality.main(["--tasks", "circle", "--steps", "30", "--out", str(tmp_path)])


# ---------------------------------------------------------------------------- --quick, as CI


@pytest.mark.slow
def test_quick_mode_runs_every_task(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--quick"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert list(data["tasks"]) == list(quality_tasks.TASKS)
    for name, task in data["tasks"].items():
        assert list(task["contenders"]) == list(quality.QUICK_CONTENDERS)
        assert task["oracle"] in quality.QUICK_CONTENDERS
        assert (tmp_path / f"{name}.png").exists()
    assert len(data["targets"]) == 10 and all(g["met"] is not None for g in data["targets"])
