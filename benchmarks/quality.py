"""Outcome benchmark: does ``ScheduleSurgeon()`` reach what a tuned LR schedule reaches?

The protocol, as practitioners tune (issue 13):

1. **Peak LR by a sweep.** For each task, warmup 5% + cosine is trained at the LRs of a x3
   grid (..., 1e-3, 3e-3, 1e-2, ...) with 2 seeds; the task's peak LR is the grid LR with the
   lowest mean final validation loss, and it must not be at the end of the swept range
   (``--sweep`` runs it; the figures are recorded in ``quality_tasks.py``, ``Task.sweep``,
   and quoted in ``results.md``). Every contender of a task trains at that LR;
2. **Oracle**: the best, by score, of 18 fixed schedules at that LR: warmup {0, 1, 2, 5, 10,
   20}% x decay {cosine, linear to 0, WSD} (``quality_contenders.py``);
3. **Keep rule**: a task counts only where the oracle beats constant LR by at least 3%
   (``oracle <= 0.97 x constant``); else it is not a scheduling task. A dropped task is still
   reported, outside the targets and the geometric mean;
4. **Score**: the final validation loss (after the last step) averaged over the seeds; infinite
   if any seed's is not finite. A contender's **ratio** is its score over the oracle's; the
   tasks at 3x and 10x the LM's tuned LR (``char_3x``, ``char_10x``) are scored against the
   *tuned* oracle (``char``'s), and count as kept when ``char`` is;
5. **Diverged**: (a) a non-finite training loss (also one the surgeon skipped and recovered
   from), (b) a non-finite final validation loss, or (c) a final training loss (mean of the
   last 5% of the steps) above the initial one (mean of the first 10): the run ended worse than
   it started. A run that stalls on its initial plateau ends a little below it: not diverged.

Targets (issue 13), for every surgeon contender, each met or missed with its numbers: at most
1.00x the oracle on every kept task at its tuned LR; geometric mean of those ratios at most
0.98; at 3x and 10x the tuned LR no seed diverges and the score is at most 1.10x the tuned
oracle; on the plateau task (``parity``) a score below constant's and cosine's. Beside them,
never judged (``quality_score.context``): the **held-out oracle** (leave-one-seed-out: each
seed scored by the grid schedule best on the other seeds; the in-sample oracle, the minimum of
18 noisy means, is biased low), the **best single fixed recipe** (the grid schedule with the
lowest geometric mean ratio over the kept tasks) and each ratio's standard error over seeds.

Contenders (``quality_contenders.py``): the grid, ``constant``, ``step``, ``one_cycle``,
``plateau`` (ReduceLROnPlateau), ``schedule_free``, ``surgeon`` (``ScheduleSurgeon()``),
``surgeon_cosine`` (``decay="cosine"``) and any ``--surgeon NAME:key=value,...``. At a multiple
of the tuned LR only constant, cosine, warmup 5% + cosine, 1cycle, ReduceLROnPlateau,
schedule-free and the surgeons run.

Outputs in ``--out`` (default ``runs/quality``): ``results.md``, ``results.json`` (everything;
curves binned to at most 200 points; non-finite numbers as ``null``), ``runs.jsonl`` (every
fit's raw curves, appended as the fits finish) and ``<task>.png``.

Reproduce::

    OMP_NUM_THREADS=1 python benchmarks/quality.py              # full (make quality)
    OMP_NUM_THREADS=1 python benchmarks/quality.py --quick      # CI smoke (make quality-quick)
    python benchmarks/quality.py --surgeon fast:min_warmup=0.01,max_warmup=0.05 \\
        --reuse runs/quality --out runs/quality-fast        # a variant; fixed fits reused
    python benchmarks/quality.py --sweep --tasks mlp            # the LR sweep of a task
    OMP_NUM_THREADS=1 python benchmarks/quality.py --probes     # the probe tasks, scored alone

The probe tasks (``Task.probe``: added after the controller's defaults were chosen, kinds of
training they were not shaped on) run only with ``--probes`` or when ``--tasks`` names them,
so that a run scores them apart: its geometric mean is over them alone.

Every fit uses one torch thread; ``--workers N`` runs fits in N spawned processes (default 2
on >= 2 CPUs, else 1). The numbers do not depend on ``--workers``.
``--reuse DIR`` takes the fits of the fixed contenders (everything but the surgeons) from
``DIR/runs.jsonl`` when the task, contender, seed, budget, LR and the code they depend on
(``quality_fit.fingerprint``) are the same: a surgeon change then costs only the surgeons'
fits."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the quality_* modules, from anywhere
import pytorch_lightning as pl
import quality_report
import quality_tasks
import torch
from quality_contenders import CONTENDERS, QUICK, SWEEP, Contender, applies, parse_surgeon
from quality_fit import Job, fingerprint, quiet, run_job
from quality_score import (
    SWEEP_POINTS,
    context,
    final_val_loss,
    geomeans,
    lr_grid,
    summarize,
    sweep_summary,
    targets,
)
from quality_tasks import VAL_POINTS, Task

QUICK_VAL_POINTS = 10
"""Validations per run in ``--quick`` mode."""


# ---------------------------------------------------------------------------- the run


def _init_worker() -> None:
    quiet()


def run_jobs(
    jobs: Sequence[Job],
    workers: int,
    tasks: dict[str, Task] | None = None,
    log: Path | None = None,
    reused: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every job, in-process (``workers <= 1``) or in spawned worker processes, or taken from
    ``reused`` (by :meth:`Job.key`); prints progress and appends each result to ``log``."""
    results: list[dict[str, Any]] = []
    start = time.perf_counter()

    def report(result: dict[str, Any], note: str = "") -> None:
        results.append(result)
        if log is not None:  # every finished fit, raw, as it comes: a crash loses none
            with log.open("a") as f:
                f.write(json.dumps(result) + "\n")
        print(
            f"[{len(results):>3}/{len(jobs)} {time.perf_counter() - start:6.0f}s] "
            f"{result['task']:<10} {result['contender']:<16} seed {result['seed']} "
            f"lr {result['peak_lr']:<7.3g} {result['wall_s']:5.1f}s  "
            f"final val {final_val_loss(result):.4g}{note}",
            flush=True,
        )

    todo = []
    for job in jobs:
        if reused and job.contender.kind != "surgeon" and job.key() in reused:
            report({**reused[job.key()], "reused": True}, " (reused)")
        else:
            todo.append(job)
    if workers <= 1:
        for job in todo:
            report(run_job(job, tasks))
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        futures = [pool.submit(run_job, job) for job in todo]
        for future in as_completed(futures):
            report(future.result())
    return results


def load_reusable(directory: Path) -> dict[str, dict[str, Any]]:
    """The fits in ``directory/runs.jsonl`` by key (a missing file: none)."""
    path = directory / "runs.jsonl"
    if not path.exists():
        return {}
    runs = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {run["key"]: run for run in runs if "key" in run}


# ---------------------------------------------------------------------------- main


def git_state() -> dict[str, Any]:
    """The checkout the surgeon was imported from: HEAD and its uncommitted ``surgeon/`` and
    ``benchmarks/`` files (the code under test is the working tree's)."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=quality_tasks.REPO, capture_output=True, text=True, timeout=30
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "surgeon", "benchmarks")
    return {"git_head": git("rev-parse", "HEAD"), "uncommitted": changed.splitlines()}


def _parser(all_tasks: dict[str, Task]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"CI smoke: short runs, 1 seed, contenders {','.join(QUICK)}",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="the LR sweep: warmup 5%% + cosine at each task's x3-grid LRs",
    )
    parser.add_argument(
        "--sweep-lrs",
        default=None,
        help="comma-separated LRs to sweep (default: the task's LR and "
        f"{SWEEP_POINTS // 2} grid neighbours each side)",
    )
    parser.add_argument(
        "--tasks", default=None, help=f"comma-separated subset of {','.join(all_tasks)}"
    )
    parser.add_argument(
        "--probes",
        action="store_true",
        help="the probe tasks (added after the defaults were chosen) instead of the others",
    )
    parser.add_argument(
        "--contenders", default=None, help=f"comma-separated subset of {','.join(CONTENDERS)}"
    )
    parser.add_argument(
        "--surgeon",
        action="append",
        default=[],
        metavar="NAME:key=value,...",
        help="an extra surgeon contender, ScheduleSurgeon(key=value, ...) (repeatable)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds 0..N-1 (3; --quick: 1; --sweep: the task's sweep_seeds)",
    )
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
        help="worker processes, 1: in-process (default: 2 on >= 2 CPUs, else 1)",
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        metavar="DIR",
        help="take the fixed contenders' fits from DIR/runs.jsonl where they match",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (runs/quality; --sweep: runs/quality-sweep)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    return parser


def plan(
    chosen: dict[str, Task],
    contenders: dict[str, Contender],
    budgets: dict[str, int],
    seeds: int,
    val_points: int,
    code: str,
) -> list[Job]:
    """Every fit of a benchmark run, the longest first (so that the workers finish together)."""
    jobs = [
        Job(name, c, s, budgets[name], task.lr, val_points, code)
        for name, task in chosen.items()
        for c in contenders.values()
        if applies(c, task.base)
        for s in range(seeds)
    ]
    return sorted(jobs, key=lambda j: -j.steps * chosen[j.task].cost_ms)


def task_selection(tasks: dict[str, Task], names: str | None, probes: bool) -> list[str]:
    """The tasks a run plans: those ``names`` lists (comma-separated), else the probe tasks
    with ``probes``, else the others."""
    if names:
        return names.split(",")
    return [name for name, task in tasks.items() if task.probe == probes]


def plan_sweep(
    chosen: dict[str, Task],
    budgets: dict[str, int],
    seeds: int | None,
    lrs: list[float] | None,
    val_points: int,
    code: str,
) -> list[Job]:
    """Warmup 5% + cosine at each LR (default: :func:`lr_grid` of the task's) and seed (default:
    the task's ``sweep_seeds``), for every task at its own tuned LR."""
    return [
        Job(name, CONTENDERS[SWEEP], s, budgets[name], lr, val_points, code)
        for name, task in chosen.items()
        if task.base is None
        for lr in lrs or lr_grid(task.lr)
        for s in range(seeds if seeds is not None else task.sweep_seeds)
    ]


def write(
    out: Path,
    runs: list[dict[str, Any]],
    chosen: dict[str, Task],
    contenders: dict[str, Contender],
    meta: dict[str, Any],
    plots: bool,
) -> dict[str, Any]:
    """``results.md``, ``results.json`` and (not for a sweep) a PNG per task; returns them."""
    if meta["mode"] == "sweep":
        summary = sweep_summary(runs, chosen)
        text = quality_report.sweep_markdown(summary, meta)
        (out / "results.json").write_text(quality_report.dumps({"meta": meta, "sweep": summary}))
        result = {"meta": meta, "sweep": summary}
    else:
        summary = summarize(runs, chosen, contenders)
        goals, means, ctx = targets(summary), geomeans(summary), context(summary)
        text = quality_report.markdown(summary, goals, means, ctx, meta)
        (out / "results.json").write_text(quality_report.to_json(summary, goals, means, ctx, meta))
        if plots:
            for name, task in summary.items():
                quality_report.plot_task(name, task, out / f"{name}.png")
        result = {
            "meta": meta,
            "summary": summary,
            "targets": goals,
            "geomeans": means,
            "context": ctx,
        }
    (out / "results.md").write_text(text + "\n")
    print(text, flush=True)
    return result


def main(argv: list[str] | None = None, tasks: dict[str, Task] | None = None) -> dict[str, Any]:
    """Run the benchmark (or its LR sweep); write ``results.md``, ``results.json``, the PNGs.

    ``tasks`` replaces :data:`quality_tasks.TASKS` (tests; in-process only)."""
    all_tasks = tasks if tasks is not None else quality_tasks.TASKS
    parser = _parser(all_tasks)
    args = parser.parse_args(argv)

    task_names = task_selection(all_tasks, args.tasks, args.probes)
    unknown = [t for t in task_names if t not in all_tasks]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; tasks: {', '.join(all_tasks)}")
    chosen = {t: all_tasks[t] for t in all_tasks if t in task_names}
    names = (
        args.contenders.split(",") if args.contenders else list(QUICK if args.quick else CONTENDERS)
    )
    unknown = [c for c in names if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; contenders: {', '.join(CONTENDERS)}")
    contenders = {n: c for n, c in CONTENDERS.items() if n in names}
    for spec in args.surgeon:
        try:
            variant = parse_surgeon(spec, taken=[*CONTENDERS, *contenders])
        except ValueError as error:
            parser.error(str(error))
        contenders[variant.name] = variant
    try:
        sweep_lrs = [float(x) for x in args.sweep_lrs.split(",")] if args.sweep_lrs else None
    except ValueError:
        parser.error(f"--sweep-lrs must be comma-separated numbers, got {args.sweep_lrs!r}")
    val_points = QUICK_VAL_POINTS if args.quick else VAL_POINTS
    budgets = {
        n: args.steps or (t.quick_steps if args.quick else t.steps) for n, t in chosen.items()
    }
    for name, steps in budgets.items():
        if steps <= 0 or steps % val_points:
            parser.error(f"{name}: {steps} steps is not a positive multiple of {val_points}")
    if args.workers is None:
        args.workers = 2 if tasks is None and (os.cpu_count() or 1) >= 2 else 1
    if tasks is not None and args.workers > 1:
        parser.error("tasks passed to main() run in-process only: use --workers 1")
    out = args.out or Path("runs/quality-sweep" if args.sweep else "runs/quality")

    code, checkout = fingerprint(), git_state()  # the code under test, before it can change
    if args.sweep:
        jobs = plan_sweep(chosen, budgets, args.seeds, sweep_lrs, val_points, code)
    else:
        seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
        jobs = plan(chosen, contenders, budgets, seeds, val_points, code)
    quiet()
    reused = load_reusable(args.reuse) if args.reuse else None
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "runs.jsonl"
    raw.unlink(missing_ok=True)
    start = time.perf_counter()
    runs = run_jobs(jobs, args.workers, tasks, raw, reused)
    wall = time.perf_counter() - start
    meta = {
        "mode": "sweep" if args.sweep else "quick" if args.quick else "full",
        "seeds": sorted({r["seed"] for r in runs}),
        "runs": len(runs),
        "reused": sum(1 for r in runs if r.get("reused")),
        "workers": args.workers,
        "wall_s": wall,
        "fit_s_total": sum(r["wall_s"] for r in runs),
        "load_average_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "argv": sys.argv[1:] if argv is None else list(argv),
        **checkout,
    }
    result = write(out, runs, chosen, contenders, meta, plots=not args.no_plots)
    print(f"\nwrote {out}/results.md, results.json in {wall:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
