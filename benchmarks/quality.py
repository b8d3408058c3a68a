"""Outcome benchmark: does training with ``ScheduleSurgeon()`` beat fixed LR schedules?

Five small CPU tasks (``benchmarks/quality_tasks.py``; no download), each trained by every
contender through a real Lightning ``Trainer.fit`` of the same LightningModule on the same
data, with the same optimizer and peak LR (chosen per task, up front: ``Task.why``):

1. ``circle``: two-layer net on the circle data set (SGD, momentum 0.9, LR 0.1, 1000 steps);
2. ``digits``: MLP on scikit-learn's bundled digits (AdamW, LR 1e-3, 1000 steps);
3. ``char``: tiny char-level transformer on Python stdlib source (AdamW, LR 3e-3, 400 steps);
4. ``char_hot``: task 3 with the peak LR 10x too high: 0.1, 10x the best constant LR of that
   model (~1e-2; 3e-2, 10x task 3's own LR, showed no instability at all);
5. ``parity``: sparse parity, a long loss plateau at ln 2 (AdamW, LR 1e-3, 2000 steps).

Contenders (``CONTENDERS``): the LambdaLR ones come from ``configure_optimizers`` with a
``surgeon.schedules`` shape divided by the peak, stepped every optimizer step:

* ``constant``;
* ``step``: step decay, x0.1 every third of the run (torch ``StepLR`` with ``gamma=0.1``, the
  ResNet recipe's two drops);
* ``cosine``: cosine from the peak to 0 over the run, no warmup (torch ``CosineAnnealingLR``'s
  default ``eta_min=0``); it is also the 0% member of the warmup sweep;
* ``warmup_cosine_1/5/10/20``: linear warmup from 0 over 1/5/10/20% of the run, then cosine to
  0. The best of the sweep (0% included) by mean final validation loss is the **oracle**, the
  schedule a user would only find by sweeping;
* ``one_cycle``: 1cycle with torch ``OneCycleLR``'s defaults (30% rise from peak/25, cosine
  anneal to peak/25/1e4; LR only, momentum is not cycled);
* ``wsd``: warmup-stable-decay, 5% linear warmup, linear decay to 0 over the last 20%
  (Hägele et al. 2024: a 20% cooldown matches cosine);
* ``plateau``: torch ``ReduceLROnPlateau`` with its defaults (factor 0.1, patience 10,
  threshold 1e-4 relative), stepped every ``steps // 50`` optimizer steps (a "pseudo-epoch" of
  2% of the run) on the mean training loss of those steps (logged as ``train_loss_window``,
  Lightning ``interval="step"``, ``frequency=steps // 50``). Stepping it on single-batch losses
  would cut on noise within a few dozen steps; once per real epoch would give it too few
  looks on the short runs;
* ``schedule_free``: ``schedulefree.AdamWScheduleFree`` with its defaults (no warmup) at the
  task's peak LR and weight decay, switched to ``eval()`` for every validation; only on the
  Adam-like tasks (not ``circle``, which uses SGD);
* ``surgeon``: ``callbacks=[ScheduleSurgeon()]``, no arguments; the optimizer at the peak LR.

Measured, over ``--seeds`` seeds (model init and batch order; the data sets are fixed):

* **final validation loss**: the validation loss after the last step (mean ± sample std over
  the seeds with a finite value). Validation runs ``VAL_POINTS = 20`` times per run
  (``--quick``: 10), evenly spaced, the last at the final step. For ranking (the oracle, the
  targets) a contender's score is the mean over *all* seeds, infinite if any seed's final
  loss is not finite;
* **steps to target**: the first validation step at which the validation loss is at or below
  the task's target, ``TARGET_FACTOR = 1.1`` x the best score of any contender on that task
  (so: 10% above the best final loss seen); reported as the mean over the seeds that reached
  it, with how many did;
* **diverged**: a run diverges when (a) any training loss is non-finite, or (b) its final
  validation loss is non-finite, or (c) its final training loss (the mean of the last 5% of
  the step losses) is above its initial training loss (the mean of the first 10 step
  losses): it ended worse than it started. A run that stalls at its initial loss (parity's
  plateau) ends a little below it and does not count. (a) holds for a run whose non-finite
  step the surgeon skipped and recovered from, too; ``results.json`` counts each run's
  non-finite steps (``nonfinite_steps``).

Targets (from the issue), each reported as met or missed with its numbers:

* on tasks 1-3 the surgeon's score is within 2% of the oracle's (``surgeon <= 1.02 x oracle``);
* on every task the surgeon's score is below both ``constant``'s and ``cosine``'s;
* on task 4 no surgeon seed diverges while at least one fixed (LambdaLR) schedule diverges in
  some seed or ends more than 10% worse than the surgeon (score > 1.1 x the surgeon's);
* on task 5 the surgeon's score is below ``cosine``'s.

Outputs in ``--out`` (default ``runs/quality``): ``results.md`` (a table per task, the targets,
the surgeon's events), ``results.json`` (everything, curves binned to at most 200 points;
non-finite numbers as ``null``), ``runs.jsonl`` (each fit's raw per-step curves, appended as
the fits finish) and ``<task>.png`` (validation loss of every contender, the
smoothed training loss of a few, and the surgeon's LR with its events beside the oracle's LR).

Reproduce::

    OMP_NUM_THREADS=1 python benchmarks/quality.py              # full: 177 fits, 2 processes
    OMP_NUM_THREADS=1 python benchmarks/quality.py --quick      # CI smoke, < 2 min: short
        # runs, 1 seed; constant, cosine, warmup+cosine 5/10/20% (an oracle) and the surgeon
    python benchmarks/quality.py --tasks circle,parity --contenders constant,surgeon --seeds 2

``tests/test_quality_bench.py`` runs slices of it, and ``--quick`` itself (marked slow).

Every fit uses one torch thread; ``--workers N`` runs fits in N spawned processes (default 2
for a full run, 1 for ``--quick``). The numbers do not depend on ``--workers``. Measured on a
2-core machine shared with another job (load average 2-3): full mode 16 min with 2 workers
(the fits alone add up to 31 min), ``--quick`` 84 s."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality_tasks, from anywhere
import quality_tasks
from quality_tasks import VAL_POINTS, Task

from surgeon import ScheduleSurgeon, schedules

TARGET_FACTOR = 1.1
"""Steps to target: the target is this factor times the task's best final validation loss."""
ORACLE_TOLERANCE = 1.02
"""Target on tasks 1-3: the surgeon's final loss at most this factor times the oracle's."""
WORSE_FACTOR = 1.1
"""Target on task 4: a fixed schedule "ends worse" when its loss exceeds this x the surgeon's."""
INITIAL_STEPS = 10
"""Initial training loss: the mean of this many first step losses."""
FINAL_FRACTION = 0.05
"""Final training loss: the mean of this last fraction of the step losses."""
ROP_EVALUATIONS = 50
"""ReduceLROnPlateau is stepped this many times per run (every ``steps // 50`` steps)."""
CURVE_POINTS = 200
"""Per-step curves are binned to at most this many points in ``results.json``."""
QUICK_VAL_POINTS = 10
"""Validations per run in ``--quick`` mode."""
ORACLE_TASKS = ("circle", "digits", "char")
HOT_TASK = "char_hot"
PLATEAU_TASK = "parity"

Kind = Literal["lambda", "plateau", "schedule_free", "surgeon"]


# ---------------------------------------------------------------------------- contenders


@dataclass(frozen=True)
class Contender:
    """One way of running the LR: ``shape(peak, steps)`` for the LambdaLR kinds."""

    name: str
    label: str
    kind: Kind
    shape: Callable[[float, int], schedules.Schedule] | None = None
    warmup: float | None = None
    """Warmup fraction of the warmup+cosine sweep (the oracle's candidates), else ``None``."""
    surgeon_kwargs: dict[str, Any] | None = None
    """For experiments with non-default surgeons (the benchmark's own ``surgeon`` has none)."""


def _warmup_cosine(fraction: float, lr: float, steps: int) -> schedules.Schedule:
    return schedules.warmup_cosine(lr, round(fraction * steps), steps, 0.0)


def _step_decay(lr: float, steps: int) -> schedules.Schedule:
    return schedules.step_decay(lr, math.ceil(steps / 3), 0.1)


def _wsd(lr: float, steps: int) -> schedules.Schedule:
    return schedules.wsd(lr, round(0.05 * steps), steps, decay_fraction=0.2, min_lr=0.0)


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("constant", "constant", "lambda", lambda lr, steps: schedules.constant(lr)),
        Contender("step", "step decay (x0.1 at 1/3, 2/3)", "lambda", _step_decay),
        Contender(
            "cosine",
            "cosine, no warmup (= warmup+cosine 0%)",
            "lambda",
            partial(_warmup_cosine, 0.0),
            warmup=0.0,
        ),
        *(
            Contender(
                f"warmup_cosine_{pct}",
                f"warmup+cosine {pct}%",
                "lambda",
                partial(_warmup_cosine, pct / 100),
                warmup=pct / 100,
            )
            for pct in (1, 5, 10, 20)
        ),
        Contender(
            "one_cycle",
            "1cycle (torch defaults)",
            "lambda",
            lambda lr, steps: schedules.one_cycle(lr, steps),
        ),
        Contender("wsd", "WSD (5% warmup, 20% linear decay)", "lambda", _wsd),
        Contender("plateau", "ReduceLROnPlateau (train loss)", "plateau"),
        Contender("schedule_free", "schedule-free AdamW", "schedule_free"),
        Contender("surgeon", "ScheduleSurgeon()", "surgeon"),
    )
}
"""Every contender by name, in table order."""
QUICK_CONTENDERS = (
    "constant",
    "cosine",
    "warmup_cosine_5",
    "warmup_cosine_10",
    "warmup_cosine_20",
    "surgeon",
)
"""``--quick``: the untuned defaults, the warmup sweep but its 1% (within a step or two of 0% on
the short quick runs), so an oracle, and the surgeon."""
FIXED = tuple(name for name, c in CONTENDERS.items() if c.kind == "lambda")


def applies(contender: Contender, task: Task) -> bool:
    """Schedule-free AdamW only where the task's optimizer is Adam-like."""
    return contender.kind != "schedule_free" or task.adam_like


def make_optimizer(task: Task, params: Iterable[Any], schedule_free: bool = False) -> Any:
    """The task's optimizer at its peak LR (``foreach`` for speed; the math is the same)."""
    if schedule_free:
        import schedulefree

        return schedulefree.AdamWScheduleFree(params, lr=task.lr, weight_decay=task.weight_decay)
    if task.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=task.lr, momentum=0.9, weight_decay=task.weight_decay, foreach=True
        )
    return torch.optim.AdamW(params, lr=task.lr, weight_decay=task.weight_decay, foreach=True)


def configure(task: Task, contender: Contender, steps: int, module: pl.LightningModule) -> Any:
    """What the task's ``configure_optimizers`` returns for ``contender``."""
    optimizer = make_optimizer(task, module.parameters(), contender.kind == "schedule_free")
    if contender.kind == "lambda":
        assert contender.shape is not None
        shape = contender.shape(task.lr, steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: shape(step) / task.lr)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
    if contender.kind == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min")
        config = {
            "scheduler": scheduler,
            "interval": "step",
            "frequency": rop_window(steps),
            "monitor": "train_loss_window",
        }
        return {"optimizer": optimizer, "lr_scheduler": config}
    return optimizer  # schedule_free, surgeon


def rop_window(steps: int) -> int:
    return max(1, steps // ROP_EVALUATIONS)


# ---------------------------------------------------------------------------- one fit


@dataclass(frozen=True)
class Job:
    task: str
    contender: str
    seed: int
    steps: int
    val_points: int = VAL_POINTS
    """Validations, every ``steps // val_points`` steps (``steps`` is a multiple)."""


class Recorder(pl.Callback):
    """Per step: the training loss and the LR the optimizer step used; each validation loss."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self.val: list[tuple[int, float]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach())

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(trainer.callback_metrics["val_loss"])))


def quiet() -> None:
    """One torch thread, no Lightning chatter, no warnings."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "surgeon"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_job(job: Job, tasks: dict[str, Task] | None = None) -> dict[str, Any]:
    """Train one contender on one task with one seed; return its raw curves and events."""
    task = (tasks or quality_tasks.TASKS)[job.task]
    contender = CONTENDERS[job.contender]
    pl.seed_everything(job.seed, verbose=False)
    model, data = task.build(job.seed, job.steps)
    model.bench_configure = partial(configure, task, contender, job.steps)
    if contender.kind == "plateau":
        model.rop_window = rop_window(job.steps)
    recorder = Recorder()
    surgeon = None
    if contender.kind == "surgeon":
        surgeon = ScheduleSurgeon(**(contender.surgeon_kwargs or {}))
    callbacks = [recorder] if surgeon is None else [surgeon, recorder]
    with tempfile.TemporaryDirectory() as root:  # the surgeon's events.jsonl lands here
        trainer = pl.Trainer(
            max_steps=job.steps,
            callbacks=callbacks,
            logger=False,
            default_root_dir=root,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            val_check_interval=max(1, job.steps // job.val_points),
            check_val_every_n_epoch=None,
            accelerator="cpu",
            devices=1,
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        wall = time.perf_counter() - start
    losses = torch.stack(recorder.losses).tolist() if recorder.losses else []
    events = [
        {
            "step": e.step,
            "kind": e.kind.value,
            "reason": e.reason,
            "lr_before": task.lr * e.scale_before,
            "lr_after": task.lr * e.scale_after,
        }
        for e in (surgeon.events if surgeon is not None else [])
    ]
    return {
        "task": job.task,
        "contender": job.contender,
        "seed": job.seed,
        "steps": job.steps,
        "train_loss": losses,
        "lr": recorder.lrs,
        "val": recorder.val,
        "events": events,
        "wall_s": wall,
    }


def _init_worker() -> None:
    quiet()


def run_jobs(
    jobs: Sequence[Job],
    workers: int,
    tasks: dict[str, Task] | None = None,
    log: Path | None = None,
) -> list[dict[str, Any]]:
    """Every job, in-process (``workers <= 1``) or in spawned worker processes; prints progress
    and appends each raw result to ``log`` (JSON lines) when given."""
    results: list[dict[str, Any]] = []
    start = time.perf_counter()

    def report(result: dict[str, Any]) -> None:
        results.append(result)
        if log is not None:  # every finished fit, raw, as it comes: a crash loses none
            with log.open("a") as f:
                f.write(json.dumps(result) + "\n")
        print(
            f"[{len(results):>3}/{len(jobs)} {time.perf_counter() - start:6.0f}s] "
            f"{result['task']:<9} {result['contender']:<17} seed {result['seed']} "
            f"{result['wall_s']:5.1f}s  final val {final_val_loss(result):.4g}",
            flush=True,
        )

    if workers <= 1:
        for job in jobs:
            report(run_job(job, tasks))
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        futures = [pool.submit(run_job, job) for job in jobs]
        for future in as_completed(futures):
            report(future.result())
    return results


# ---------------------------------------------------------------------------- measures


def final_val_loss(run: dict[str, Any]) -> float:
    """The validation loss at the run's last step (NaN if the last validation is missing)."""
    if not run["val"] or run["val"][-1][0] != run["steps"]:
        return math.nan
    return float(run["val"][-1][1])


def diverged(train_loss: Sequence[float], final_val: float) -> bool:
    """Non-finite training loss, non-finite final validation loss, or a final training loss
    (mean of the last ``FINAL_FRACTION``) above the initial one (mean of the first
    ``INITIAL_STEPS``)."""
    if not train_loss or not math.isfinite(final_val):
        return True
    if not all(math.isfinite(x) for x in train_loss):
        return True
    initial = statistics.fmean(train_loss[:INITIAL_STEPS])
    tail = max(1, round(FINAL_FRACTION * len(train_loss)))
    return statistics.fmean(train_loss[-tail:]) > initial


def steps_to(val: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first validation step whose loss is at or below ``target``."""
    for step, loss in val:
        if math.isfinite(loss) and loss <= target:
            return step
    return None


def score(finals: Sequence[float]) -> float:
    """Mean final loss over all seeds; infinite if any is not finite (a diverged run)."""
    if not finals or not all(math.isfinite(x) for x in finals):
        return math.inf
    return statistics.fmean(finals)


def binned(values: Sequence[float], points: int = CURVE_POINTS) -> list[float]:
    """``values`` averaged over at most ``points`` equal bins (a NaN in a bin makes it NaN)."""
    if len(values) <= points:
        return list(values)
    edges = [round(i * len(values) / points) for i in range(points + 1)]
    return [statistics.fmean(values[a:b]) for a, b in itertools.pairwise(edges)]


def summarize(runs: list[dict[str, Any]], tasks: dict[str, Task]) -> dict[str, Any]:
    """Per task and contender: finals, mean ± std, score, divergences, steps to target, oracle."""
    out: dict[str, Any] = {}
    for task_name, task in tasks.items():
        task_runs = [r for r in runs if r["task"] == task_name]
        if not task_runs:
            continue
        names = [n for n in CONTENDERS if any(r["contender"] == n for r in task_runs)]
        entries: dict[str, Any] = {}
        for name in names:
            mine = sorted((r for r in task_runs if r["contender"] == name), key=lambda r: r["seed"])
            finals = [final_val_loss(r) for r in mine]
            finite = [x for x in finals if math.isfinite(x)]
            entries[name] = {
                "label": CONTENDERS[name].label,
                "seeds": [r["seed"] for r in mine],
                "final_val_loss": finals,
                "mean": statistics.fmean(finite) if finite else math.nan,
                "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
                "finite": len(finite),
                "score": score(finals),
                "diverged": sum(
                    diverged(r["train_loss"], f) for r, f in zip(mine, finals, strict=True)
                ),
                "wall_s": statistics.fmean(r["wall_s"] for r in mine),
                "runs": mine,
            }
        scores = [e["score"] for e in entries.values() if math.isfinite(e["score"])]
        target = TARGET_FACTOR * min(scores) if scores else math.nan
        for entry in entries.values():
            reached = [steps_to(r["val"], target) for r in entry["runs"]]
            entry["steps_to_target"] = reached
            hits = [s for s in reached if s is not None]
            entry["steps_to_target_mean"] = statistics.fmean(hits) if hits else None
        sweep = [n for n in names if CONTENDERS[n].warmup is not None]
        oracle = min(sweep, key=lambda n: entries[n]["score"]) if sweep else None
        out[task_name] = {
            "title": task.title,
            "steps": task_runs[0]["steps"],
            "optimizer": task.optimizer,
            "lr": task.lr,
            "weight_decay": task.weight_decay,
            "why": task.why,
            "target_loss": target,
            "oracle": oracle,
            "contenders": entries,
        }
    return out


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "inf" if x == math.inf else "nan"
    return f"{x:.{digits}g}"


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: met (True/False) or not run (None), with the numbers."""
    rows: list[dict[str, Any]] = []

    def get(task: str, name: str) -> dict[str, Any] | None:
        return summary.get(task, {}).get("contenders", {}).get(name)

    for task in ORACLE_TASKS:
        surgeon, oracle_name = get(task, "surgeon"), summary.get(task, {}).get("oracle")
        oracle = get(task, oracle_name) if oracle_name else None
        if surgeon is None or oracle is None:
            rows.append(
                {
                    "target": "within 2% of the oracle",
                    "task": task,
                    "met": None,
                    "detail": "not run",
                }
            )
            continue
        ratio = surgeon["score"] / oracle["score"] if math.isfinite(oracle["score"]) else math.nan
        rows.append(
            {
                "target": "within 2% of the oracle",
                "task": task,
                "met": bool(ratio <= ORACLE_TOLERANCE),
                "detail": (
                    f"surgeon {_fmt(surgeon['score'])} vs oracle {oracle['label']} "
                    f"{_fmt(oracle['score'])}: ratio {_fmt(ratio, 4)} (need <= {ORACLE_TOLERANCE})"
                ),
            }
        )
    for task in summary:
        surgeon, constant, cosine = (get(task, n) for n in ("surgeon", "constant", "cosine"))
        if surgeon is None or constant is None or cosine is None:
            rows.append(
                {
                    "target": "better than constant and cosine",
                    "task": task,
                    "met": None,
                    "detail": "not run",
                }
            )
            continue
        met = surgeon["score"] < constant["score"] and surgeon["score"] < cosine["score"]
        rows.append(
            {
                "target": "better than constant and cosine",
                "task": task,
                "met": bool(met),
                "detail": (
                    f"surgeon {_fmt(surgeon['score'])}, constant {_fmt(constant['score'])}, "
                    f"cosine {_fmt(cosine['score'])}"
                ),
            }
        )
    surgeon = get(HOT_TASK, "surgeon")
    fixed = {n: get(HOT_TASK, n) for n in FIXED if get(HOT_TASK, n) is not None}
    if surgeon is None or not fixed:
        rows.append(
            {
                "target": "LR 10x too high: surgeon never diverges, a fixed schedule fails",
                "task": HOT_TASK,
                "met": None,
                "detail": "not run",
            }
        )
    else:
        failing = [
            n
            for n, e in fixed.items()
            if e["diverged"] > 0 or e["score"] > WORSE_FACTOR * surgeon["score"]
        ]
        runs = len(surgeon["runs"])
        met = surgeon["diverged"] == 0 and bool(failing)
        failing_text = (
            ", ".join(
                f"{n} ({fixed[n]['diverged']} diverged, {_fmt(fixed[n]['score'])})" for n in failing
            )
            or "none"
        )
        rows.append(
            {
                "target": "LR 10x too high: surgeon never diverges, a fixed schedule fails",
                "task": HOT_TASK,
                "met": met,
                "detail": (
                    f"surgeon diverged in {surgeon['diverged']}/{runs} seeds, final "
                    f"{_fmt(surgeon['score'])}; fixed schedules that diverged or ended > "
                    f"{WORSE_FACTOR}x the surgeon's loss: {failing_text}"
                ),
            }
        )
    surgeon, cosine = get(PLATEAU_TASK, "surgeon"), get(PLATEAU_TASK, "cosine")
    if surgeon is None or cosine is None:
        rows.append(
            {
                "target": "plateau: better than cosine",
                "task": PLATEAU_TASK,
                "met": None,
                "detail": "not run",
            }
        )
    else:
        rows.append(
            {
                "target": "plateau: better than cosine",
                "task": PLATEAU_TASK,
                "met": bool(surgeon["score"] < cosine["score"]),
                "detail": f"surgeon {_fmt(surgeon['score'])} vs cosine {_fmt(cosine['score'])}",
            }
        )
    return rows


# ---------------------------------------------------------------------------- outputs


def markdown(summary: dict[str, Any], goals: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Outcome benchmark: ScheduleSurgeon() vs fixed LR schedules",
        "",
        f"Mode **{meta['mode']}**, seeds {meta['seeds']}, {meta['runs']} fits in "
        f"{meta['wall_s'] / 60:.1f} min with {meta['workers']} worker(s) "
        f"(sum of the fits: {meta.get('fit_s_total', math.nan) / 60:.1f} min; "
        f"load average {meta.get('load_average_at_end') or math.nan:.1f} at the end) "
        f"({meta['machine']}, torch {meta['torch']}, "
        f"pytorch_lightning {meta['pytorch_lightning']}; surgeon from "
        f"{(meta.get('git_head') or 'unknown')[:10]}"
        f"{' + uncommitted changes' if meta.get('surgeon_uncommitted') else ''}). "
        "Final val loss: mean ± std over seeds (lower is better). Steps to target: first "
        f"validation step at or below {TARGET_FACTOR} x the best final loss on the task, mean over "
        "the seeds that reached it (how many did). Diverged: non-finite loss, or the final "
        "training loss above the initial one. Produced by `benchmarks/quality.py`.",
        "",
    ]
    for task in summary.values():
        lines += [
            f"## {task['title']}",
            "",
            f"{task['steps']} steps, {task['optimizer']} at peak LR {task['lr']:g}; "
            f"target loss {_fmt(task['target_loss'])}. {task['why']}.",
            "",
            "| contender | final val loss | steps to target | diverged | s/fit |",
            "|---|---|---|---|---|",
        ]
        best = min(task["contenders"].values(), key=lambda e: e["score"])
        for cname, e in task["contenders"].items():
            label = e["label"]
            if cname == task["oracle"]:
                label += " **(oracle)**"
            runs = len(e["runs"])
            if e["finite"] == 0:
                loss = f"non-finite ({runs}/{runs})"
            else:
                loss = f"{_fmt(e['mean'])} ± {_fmt(e['std'], 2)}"
                if e["finite"] < runs:
                    loss += f" (+{runs - e['finite']} non-finite)"
            if e is best:
                loss = f"**{loss}**"
            hits = [s for s in e["steps_to_target"] if s is not None]
            reach = (
                f"{_fmt(e['steps_to_target_mean'], 4)} ({len(hits)}/{len(e['runs'])})"
                if hits
                else f"- (0/{len(e['runs'])})"
            )
            lines.append(
                f"| {label} | {loss} | {reach} | {e['diverged']}/{len(e['runs'])} "
                f"| {e['wall_s']:.1f} |"
            )
        lines.append("")
    lines += ["## Targets", "", "| target | task | met | numbers |", "|---|---|---|---|"]
    for goal in goals:
        met = {True: "**met**", False: "**missed**", None: "not run"}[goal["met"]]
        lines.append(f"| {goal['target']} | {goal['task']} | {met} | {goal['detail']} |")
    lines += ["", "## The surgeon's decisions", ""]
    for name, task in summary.items():
        entry = task["contenders"].get("surgeon")
        if entry is None:
            continue
        oracle = task["contenders"].get(task["oracle"]) if task["oracle"] else None
        lines.append(f"**{name}**")
        lines.append("")
        for run in entry["runs"]:
            kinds = ", ".join(f"{e['kind']}@{e['step']}" for e in run["events"]) or "none"
            end_lr = run["lr"][-1] if run["lr"] else math.nan
            mean_lr = statistics.fmean(run["lr"]) if run["lr"] else math.nan
            text = (
                f"- seed {run['seed']}: {kinds}; final LR {_fmt(end_lr, 3)}, mean LR "
                f"{_fmt(mean_lr, 3)}"
            )
            if oracle is not None:
                match = [r for r in oracle["runs"] if r["seed"] == run["seed"]]
                if match and match[0]["lr"]:
                    text += f" (oracle's mean LR {_fmt(statistics.fmean(match[0]['lr']), 3)})"
            lines.append(text)
        lines.append("")
    return "\n".join(lines)


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_or_none(v) for v in x]
    return x


def to_json(summary: dict[str, Any], goals: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    tasks: dict[str, Any] = {}
    for name, task in summary.items():
        contenders = {}
        for cname, e in task["contenders"].items():
            runs = [
                {
                    "seed": r["seed"],
                    "final_val_loss": final_val_loss(r),
                    "diverged": diverged(r["train_loss"], final_val_loss(r)),
                    "nonfinite_steps": sum(not math.isfinite(x) for x in r["train_loss"]),
                    "steps_to_target": s,
                    "wall_s": r["wall_s"],
                    "val": [list(v) for v in r["val"]],
                    "train_loss": binned(r["train_loss"]),
                    "lr": binned(r["lr"]),
                    "events": r["events"],
                }
                for r, s in zip(e["runs"], e["steps_to_target"], strict=True)
            ]
            contenders[cname] = {k: v for k, v in e.items() if k not in ("runs",)} | {"runs": runs}
        tasks[name] = {k: v for k, v in task.items() if k != "contenders"} | {
            "contenders": contenders
        }
    return json.dumps(_finite_or_none({"meta": meta, "targets": goals, "tasks": tasks}), indent=1)


EVENT_STYLE = {
    "warmup_end": ("^", "tab:green"),
    "plateau": ("v", "tab:orange"),
    "restart": ("D", "tab:purple"),
    "spike": ("x", "tab:red"),
    "nonfinite": ("X", "black"),
    "recovered": ("o", "tab:blue"),
    "skipped_step": ("|", "tab:red"),
    "rollback": ("P", "tab:brown"),
    "peak_lr": ("*", "tab:gray"),
}


def _ema(values: Sequence[float], span: int) -> list[float]:
    alpha, out, ema = 2.0 / (span + 1), [], None
    for v in values:
        if not math.isfinite(v):
            ema = None
            out.append(math.nan)
            continue
        ema = v if ema is None else ema + alpha * (v - ema)
        out.append(ema)
    return out


def plot_task(name: str, task: dict[str, Any], path: Path) -> None:
    """Validation loss of every contender (mean over seeds), smoothed training loss of the
    surgeon, the oracle and the untuned defaults (first seed), the surgeon's LR with events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = task["contenders"]
    fig, (ax_val, ax_train, ax_lr) = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    colors = [*plt.get_cmap("tab10").colors, "gold", "magenta"]
    for i, (cname, e) in enumerate(entries.items()):
        steps = [s for s, _ in e["runs"][0]["val"]]
        curves = [[v for _, v in r["val"]] for r in e["runs"] if len(r["val"]) == len(steps)]
        mean = [statistics.fmean(col) for col in zip(*curves, strict=True)]
        highlight = cname in ("surgeon", task["oracle"])
        style = {
            "lw": 2.5 if highlight else 1.0,
            "color": "black" if cname == "surgeon" else colors[i % len(colors)],
        }
        label = e["label"] + (" (oracle)" if cname == task["oracle"] else "")
        ax_val.plot(steps, mean, marker=".", label=label, **style)
    ax_val.set_yscale("log")
    ax_val.set_ylabel("validation loss (mean over seeds)")
    ax_val.set_title(task["title"])
    ax_val.legend(fontsize=7, ncol=2)
    shown = ["surgeon", task["oracle"], "constant", "cosine"]
    for cname in dict.fromkeys(n for n in shown if n in entries):
        run = entries[cname]["runs"][0]
        span = max(5, len(run["train_loss"]) // 50)
        ax_train.plot(
            _ema(run["train_loss"], span),
            label=f"{entries[cname]['label']}",
            color="black" if cname == "surgeon" else None,
        )
    ax_train.set_yscale("log")
    ax_train.set_ylabel(
        f"training loss (EMA, seed {entries['surgeon']['runs'][0]['seed']})"
        if "surgeon" in entries
        else "training loss (EMA)"
    )
    ax_train.legend(fontsize=7)
    if task["oracle"] in entries:
        run = entries[task["oracle"]]["runs"][0]
        ax_lr.plot(
            run["lr"], "--", color="gray", label=f"oracle: {entries[task['oracle']]['label']}"
        )
    seen: set[str] = set()
    for run in entries.get("surgeon", {}).get("runs", []):
        ax_lr.plot(run["lr"], lw=1.2, label=f"surgeon seed {run['seed']}")
        for event in run["events"]:
            marker, color = EVENT_STYLE.get(event["kind"], ("s", "gray"))
            ax_lr.scatter(
                event["step"],
                event["lr_after"],
                marker=marker,
                color=color,
                s=60,
                zorder=5,
                label=event["kind"] if event["kind"] not in seen else None,
            )
            seen.add(event["kind"])
    ax_lr.set_ylabel("LR")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def git_state() -> dict[str, Any]:
    """The checkout the surgeon was imported from: HEAD and its uncommitted ``surgeon/`` files
    (the defaults under test are the working tree's, not necessarily a commit's)."""
    import subprocess

    repo = quality_tasks.REPO

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "surgeon")
    return {"git_head": git("rev-parse", "HEAD"), "surgeon_uncommitted": changed.splitlines()}


def main(argv: list[str] | None = None, tasks: dict[str, Task] | None = None) -> dict[str, Any]:
    """Run the benchmark; write ``results.md``, ``results.json`` and a PNG per task to ``--out``.

    ``tasks`` replaces :data:`quality_tasks.TASKS` (tests; in-process only)."""
    all_tasks = tasks if tasks is not None else quality_tasks.TASKS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke: short runs, 1 seed, constant, the warmup sweep, surgeon",
    )
    parser.add_argument(
        "--tasks",
        default=",".join(all_tasks),
        help=f"comma-separated subset of {','.join(all_tasks)}",
    )
    parser.add_argument(
        "--contenders", default=None, help=f"comma-separated subset of {','.join(CONTENDERS)}"
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (3; --quick: 1)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"every task's budget (a multiple of {VAL_POINTS}; --quick: of {QUICK_VAL_POINTS})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes, 1: in-process (default: 2 for a full run on >= 2 CPUs, else 1)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/quality"), help="output directory")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    args = parser.parse_args(argv)

    task_names = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in task_names if t not in all_tasks]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; tasks: {', '.join(all_tasks)}")
    if args.contenders:
        contender_names = [c for c in args.contenders.split(",") if c]
    else:
        contender_names = list(QUICK_CONTENDERS if args.quick else CONTENDERS)
    unknown = [c for c in contender_names if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; contenders: {', '.join(CONTENDERS)}")
    contender_names = [c for c in CONTENDERS if c in contender_names]  # table order
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    chosen = {t: all_tasks[t] for t in task_names}

    if args.workers is None:
        full = not args.quick and tasks is None
        args.workers = 2 if full and (os.cpu_count() or 1) >= 2 else 1
    if tasks is not None and args.workers > 1:
        parser.error("tasks passed to main() run in-process only: use --workers 1")
    val_points = QUICK_VAL_POINTS if args.quick else VAL_POINTS
    budgets = {
        n: args.steps or (t.quick_steps if args.quick else t.steps) for n, t in chosen.items()
    }
    for name, steps in budgets.items():
        if steps <= 0 or steps % val_points:
            parser.error(f"{name}: {steps} steps is not a positive multiple of {val_points}")

    quiet()
    jobs = []
    for name, task in chosen.items():
        for contender in contender_names:
            if applies(CONTENDERS[contender], task):
                jobs += [Job(name, contender, seed, budgets[name], val_points) for seed in seeds]
    # the longest fits first, so that worker processes finish together
    jobs.sort(key=lambda j: -j.steps * chosen[j.task].cost_ms)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "runs.jsonl"
    raw.unlink(missing_ok=True)
    start = time.perf_counter()
    runs = run_jobs(jobs, args.workers, tasks, raw)
    wall = time.perf_counter() - start

    meta = {
        "mode": "quick" if args.quick else "full",
        "seeds": seeds,
        "runs": len(runs),
        "workers": args.workers,
        "wall_s": wall,
        "fit_s_total": sum(r["wall_s"] for r in runs),
        "load_average_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "argv": sys.argv[1:] if argv is None else list(argv),
        **git_state(),
    }
    summary = summarize(runs, chosen)
    goals = targets(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(summary, goals, meta)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(to_json(summary, goals, meta))
    if not args.no_plots:
        for name, task in summary.items():
            plot_task(name, task, args.out / f"{name}.png")
    print(text, flush=True)
    print(f"\nwrote {args.out}/results.md, results.json and the plots in {wall:.0f} s", flush=True)
    return {"meta": meta, "summary": summary, "targets": goals}


if __name__ == "__main__":
    main()
