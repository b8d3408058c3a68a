"""Record LR range tests and the peak LR that trains best, for ``surgeon.lr_find``'s tests.

For each task (the outcome benchmark's tasks, and the ``circle`` and ``finetune`` examples):

* **range tests**: Lightning's LR finder exactly as ``ScheduleSurgeon(peak_lr="find")`` runs it
  (``find_min_lr=1e-7`` to ``find_max_lr=1.0`` over ``find_steps=100`` steps, exponential,
  stopped when its own smoothed loss passes 4x its best), on ``--seeds`` seeds (model init and
  batch order): the LRs of ``finder.results``, each step's loss as the callback records it for
  :func:`surgeon.lr_find.suggest_lr`, and Lightning's ``finder.suggestion()`` for comparison;
* **sweep**: ``ScheduleSurgeon()`` (defaults, the optimizer's LR as its peak) trained for the
  task's full budget at three peak LRs a decade (1, 2, 5 x 10^k), seeds 0 and 1: the mean final
  validation loss at each. The LR with the lowest is the one that trains best; every LR within
  ``NEAR_BEST`` of that loss is near best.

Writes ``tests/data/lr_find_curves.json`` (``--out``) and prints, per task and seed, what
``suggest_lr`` and Lightning's ``suggestion()`` pick: the LR, as a factor of the best LR, and
the final validation loss it trains to (interpolated in the sweep) as a factor of the best one.
CPU only, one torch thread; 5-12 minutes on a shared 2-core machine (``--tasks`` for fewer).

    python benchmarks/lr_find_curves.py
    python benchmarks/lr_find_curves.py --report-only              # the table of the stored file
    python benchmarks/lr_find_curves.py --tasks circle_example --seeds 1 --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks", REPO / "examples"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import quality_contenders  # noqa: E402
import quality_tasks  # noqa: E402
from toy_tasks import CircleData, CircleNet, DigitsData, DigitsFinetuner  # noqa: E402

from surgeon import ScheduleSurgeon  # noqa: E402
from surgeon._lightning.range_test import (  # noqa: E402  (what the callback records)
    range_test_losses as _range_test_losses,
)
from surgeon.lr_find import suggest_lr  # noqa: E402

FIND = {"min_lr": 1e-7, "max_lr": 1.0, "num_training": 100}
"""The range test of ``ScheduleSurgeon(peak_lr="find")`` with its defaults."""
NEAR_BEST = 0.05
"""A peak LR whose final validation loss is within 5% of the best one's is near best."""
SWEEP_SEEDS = 2
"""Each peak LR of the sweep is scored by its mean final validation loss over seeds 0 and 1."""
OUT = REPO / "tests" / "data" / "lr_find_curves.json"

Build = Callable[[int, float], tuple[pl.LightningModule, Any]]
"""``build(seed, lr)``: a module whose optimizer is configured at peak ``lr``, and its data."""


@dataclass(frozen=True)
class Case:
    """A task as the range test and the sweep see it."""

    name: str
    lr: float
    """The configured peak LR (the task's or the example's default)."""
    steps: int
    grid: tuple[float, ...]
    build: Build
    metric: str = "val_loss"


def grid(low: int, high: int, top: float | None = None) -> tuple[float, ...]:
    """1, 2 and 5 x 10**k for k in [low, high), then ``top``: three peak LRs a decade."""
    values = [m * 10.0**k for k in range(low, high) for m in (1, 2, 5)]
    return tuple(float(f"{v:.0e}") for v in [*values, *([top] if top else [])])


def bench_case(name: str, grid: tuple[float, ...]) -> Case:
    task = quality_tasks.TASKS[name]

    def build(seed: int, lr: float) -> tuple[pl.LightningModule, Any]:
        model, data = task.build(seed, task.steps)
        model.bench_configure = lambda module: quality_contenders.make_optimizer(
            task, module.parameters(), lr, schedule_free=False
        )
        return model, data

    return Case(name, task.lr, task.steps, grid, build)


def build_circle_example(seed: int, lr: float) -> tuple[pl.LightningModule, Any]:
    return CircleNet(hidden=16, lr=lr), CircleData(seed=seed)


def build_finetune_example(seed: int, lr: float) -> tuple[pl.LightningModule, Any]:
    """``examples/finetune.py``'s defaults (head LR ``lr``, backbone a tenth, 100 of 600 steps
    frozen)."""
    model = DigitsFinetuner(head_lr=lr, backbone_lr=lr / 10, freeze_steps=100, seed=seed)
    return model, DigitsData(train_size=100, seed=seed)


CASE_NAMES = (
    "circle",
    "mlp",
    "conv",
    "regression",
    "char",
    "finetune",
    "parity",
    "circle_example",
    "finetune_example",
)


def make_case(name: str) -> Case:
    """The recording of ``name``: a benchmark task at its own budget, or an example."""
    if name == "circle_example":
        return Case(name, 0.1, 1000, grid(-3, 1, 10.0), build_circle_example)
    if name == "finetune_example":
        return Case(name, 1e-2, 600, grid(-4, 0, 1.0), build_finetune_example)
    top = 10.0 if name == "circle" else 1.0
    return bench_case(name, grid(-3 if name == "circle" else -4, 1 if name == "circle" else 0, top))


def trainer(steps: int, callbacks: list[Any], root: str, val_every: int | None = None) -> Any:
    return pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        default_root_dir=root,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=val_every or steps,
        check_val_every_n_epoch=None,
        limit_val_batches=0 if val_every is None else None,
        accelerator="cpu",
        devices=1,
    )


def range_test(case: Case, seed: int) -> dict[str, Any]:
    """Lightning's range test on a fresh model; its results and the raw per-step losses."""
    from pytorch_lightning.tuner.lr_finder import _lr_find

    pl.seed_everything(seed, verbose=False)
    model, data = case.build(seed, case.lr)
    found: dict[str, Any] = {}

    class RunFinder(pl.Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            with _range_test_losses(trainer, pl_module) as losses:
                found["finder"] = _lr_find(trainer, pl_module, **FIND)
            found["losses"] = losses
            trainer.should_stop = True

    with tempfile.TemporaryDirectory() as root:
        trainer(1, [RunFinder()], root).fit(model, datamodule=data)
    finder = found["finder"]
    return {
        "seed": seed,
        "lr": [float(f"{x:.6g}") for x in finder.results["lr"]],
        "loss": [float(f"{x:.6g}") for x in found["losses"]],
        "lightning_suggestion": finder.suggestion(),
    }


def sweep_point(case: Case, lr: float, seed: int) -> float:
    """Final validation ``case.metric`` of a ``ScheduleSurgeon()`` fit at peak ``lr``."""
    pl.seed_everything(seed, verbose=False)
    model, data = case.build(seed, lr)
    with tempfile.TemporaryDirectory() as root:
        fit = trainer(case.steps, [ScheduleSurgeon()], root, val_every=case.steps)
        fit.fit(model, datamodule=data)
        value = fit.callback_metrics.get(case.metric)
    return float(value) if value is not None else math.nan


def record(case: Case, seeds: int) -> dict[str, Any]:
    start = time.perf_counter()
    curves = [range_test(case, seed) for seed in range(seeds)]
    losses = [
        statistics.fmean(sweep_point(case, lr, seed) for seed in range(SWEEP_SEEDS))
        for lr in case.grid
    ]
    finite = [(loss, lr) for lr, loss in zip(case.grid, losses, strict=True) if math.isfinite(loss)]
    best_loss, best_lr = min(finite)
    near = [lr for loss, lr in finite if loss <= best_loss * (1 + NEAR_BEST)]
    print(f"{case.name}: {time.perf_counter() - start:.0f} s", flush=True)
    return {
        "configured_lr": case.lr,
        "steps": case.steps,
        "curves": curves,
        "sweep": {"lr": list(case.grid), case.metric: losses},
        "best_lr": best_lr,
        "near_best": [min(near), max(near)],
    }


def interpolated_loss(task: dict[str, Any], lr: float) -> float:
    """The sweep's final validation loss at ``lr`` (linear in log LR between its points, the end
    values beyond them) divided by the best one's."""
    (metric,) = [key for key in task["sweep"] if key != "lr"]
    points = list(zip(map(math.log, task["sweep"]["lr"]), task["sweep"][metric], strict=True))
    best = min(loss for _, loss in points if math.isfinite(loss))
    x = min(max(math.log(lr), points[0][0]), points[-1][0])
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return (y0 + (y1 - y0) * (x - x0) / (x1 - x0)) / best
    raise AssertionError("unreachable: x is clamped into the sweep")


def suggested_lr(curve: dict[str, Any]) -> float | None:
    found = suggest_lr(curve["lr"], curve["loss"])
    return None if found is None else found.lr


def report(tasks: dict[str, Any]) -> None:
    """Per task: the best LR, and on each seed's curve what ``suggest_lr`` and Lightning's
    ``suggestion()`` pick, as a factor of the best LR and the validation loss it trains to."""
    print(f"\n{'task':<17} {'best LR':>8} {'configured (loss)':>18}  rule: LR (x best LR, x loss)")
    for name, task in tasks.items():
        configured = task["configured_lr"]
        ratio = interpolated_loss(task, configured)
        head = f"{name:<17} {task['best_lr']:>8.0e} {configured:>9.0e} (x{ratio:<5.2f})"
        for rule, pick in (
            ("suggest_lr", suggested_lr),
            ("Lightning", lambda curve: curve["lightning_suggestion"]),
        ):
            cells = []
            for curve in task["curves"]:
                lr = pick(curve)
                if lr is None:
                    cells.append("none")
                    continue
                factor, ratio = lr / task["best_lr"], interpolated_loss(task, lr)
                cells.append(f"{lr:.2g} (x{factor:.2g}, x{ratio:.2f})")
            print(f"{head}  {rule:<10}  " + " | ".join(cells))
            head = " " * len(head)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=CASE_NAMES, default=list(CASE_NAMES))
    parser.add_argument("--seeds", type=int, default=3, help="range tests per task (3)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--report-only", action="store_true", help="print the table of an existing --out file"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        report(json.loads(args.out.read_text())["tasks"])
        return
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "surgeon"):
        logging.getLogger(name).setLevel(logging.ERROR)
    tasks = {name: record(make_case(name), args.seeds) for name in args.tasks}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    meta = {"commit": commit, "range_test": FIND, "near_best": NEAR_BEST}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "tasks": tasks}, indent=1) + "\n")
    print(f"wrote {args.out}")
    report(tasks)


if __name__ == "__main__":
    main()
