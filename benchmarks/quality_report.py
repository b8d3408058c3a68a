"""The outcome benchmark's outputs (``benchmarks/quality.py``): ``results.md``, ``results.json``
and a PNG per task, from the summary that ``quality_score.summarize`` builds and the targets
and context that ``quality_score`` derives from it."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quality_score import (
    GEOMEAN_TARGET,
    KEEP_GAP,
    OFF_LR_TARGET,
    ORACLE_TARGET,
    diverged,
    final_val_loss,
)

CURVE_POINTS = 200
"""Per-step curves are binned to at most this many points in ``results.json``."""


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def _pct(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:+.1f}%"


def _goal_cell(result: dict[str, Any]) -> str:
    if result["met"] is None:
        return result["detail"]
    return f"{'**met**' if result['met'] else '**missed**'}: {result['detail']}"


def _geomean_cell(mean: dict[str, Any], key: str = "geomean") -> str:
    if math.isnan(mean[key]):
        return f"n/a ({mean['tasks']} tasks)"
    return f"**{_fmt(mean[key], 4)}x** ({mean['tasks']} tasks)"


def _times(x: float) -> str:
    """``1.004x``; ``n/a`` for NaN (not measured)."""
    return "n/a" if math.isnan(x) else f"{_fmt(x, 4)}x"


def _ratio_cell(entry: dict[str, Any] | None) -> str:
    """``ratio x ± standard error`` (the error left out under 2 seeds); ``-`` if not run."""
    if entry is None:
        return "-"
    spread = "" if math.isnan(entry["ratio_se"]) else f" ± {_fmt(entry['ratio_se'], 2)}"
    return f"{_times(entry['ratio'])}{spread}"


def _heldout_line(task: dict[str, Any]) -> str:
    """Each seed's pick of the held-out oracle and its loss there, and the resulting score."""
    held = task["heldout"]
    if held is None:
        return "Held-out oracle: n/a (needs 2 or more seeds)."
    labels = {n: e["label"] for n, e in task["contenders"].items()}
    picks = "; ".join(
        f"seed {p['seed']}: {labels[p['contender']]} ({_fmt(p['final_val_loss'])})"
        for p in held["picks"]
    )
    return (
        f"Held-out oracle (each seed scored by the best of the grid on the other seeds): {picks}; "
        f"mean {_fmt(held['score'])}, {_times(held['ratio'])} the oracle."
    )


def _commit(meta: dict[str, Any]) -> str:
    head = (meta.get("git_head") or "unknown")[:10]
    dirty = meta.get("uncommitted")
    return f"{head}" + (f" + uncommitted changes ({len(dirty)} files)" if dirty else "")


def _header(title: str, meta: dict[str, Any]) -> list[str]:
    return [
        f"# {title}",
        "",
        f"Mode **{meta['mode']}**, seeds {meta['seeds']}, {meta['runs']} fits "
        f"({meta.get('reused', 0)} reused) in {meta['wall_s'] / 60:.1f} min with "
        f"{meta['workers']} worker(s) (sum of the fits: {meta['fit_s_total'] / 60:.1f} min; "
        f"load average {meta.get('load_average_at_end') or math.nan:.1f} at the end); "
        f"{meta['machine']}, Python {meta['python']}, torch {meta['torch']}, "
        f"pytorch_lightning {meta['pytorch_lightning']}; commit {_commit(meta)}. "
        "Produced by `benchmarks/quality.py`"
        + (f" `{' '.join(meta['argv'])}`." if meta.get("argv") else "."),
        "",
    ]


def sweep_line(task: dict[str, Any]) -> str:
    """The task's recorded LR sweep, its choice in bold."""
    if not task["sweep"]:
        return "no sweep recorded"
    best = min(task["sweep"], key=lambda p: p[1])
    points = ", ".join(
        f"**{lr:g}: {_fmt(loss)}**" if [lr, loss] == list(best) else f"{lr:g}: {_fmt(loss)}"
        for lr, loss in task["sweep"]
    )
    return (
        f"LR sweep (warmup 5% + cosine, mean final val loss over {task['sweep_seeds']} seeds): "
        f"{points}"
    )


def _events(run: dict[str, Any]) -> str:
    """``kind@step`` for each event; a run of more than 3 of a kind as ``kind@first..last (n)``."""
    parts = []
    for kind, group in itertools.groupby(run["events"], key=lambda e: e["kind"]):
        steps = [e["step"] for e in group]
        if len(steps) > 3:
            parts.append(f"{kind}@{steps[0]}..{steps[-1]} ({len(steps)})")
        else:
            parts += [f"{kind}@{s}" for s in steps]
    return ", ".join(parts) or "none"


def markdown(
    summary: dict[str, Any],
    goals: list[dict[str, Any]],
    means: dict[str, dict[str, Any]],
    context: dict[str, Any],
    meta: dict[str, Any],
) -> str:
    """``results.md``: the protocol, a summary table, the targets and their context, a section
    per task, the surgeons' events."""
    surgeons = list(means)
    lines = _header("Outcome benchmark: ScheduleSurgeon vs tuned LR schedules", meta)
    lines += [
        "## Protocol",
        "",
        "- **Peak LR per task, as practitioners tune**: warmup 5% + cosine at the LRs of a x3 "
        "grid (..., 1e-3, 3e-3, 1e-2, ...), 2 seeds; the task's LR is the grid LR with the "
        "lowest mean final validation loss, and it is inside the swept range "
        "(`quality.py --sweep`; the figures are in each task's section). Every contender "
        "trains at that LR.",
        "- **Oracle**: the best of 18 fixed schedules at that LR: linear warmup from 0 over "
        "{0, 1, 2, 5, 10, 20}% of the run x decay to 0 by {cosine, linear, WSD (hold, then "
        "linear over the last 20%)}; warmup 0% + cosine is the contender *cosine, no warmup*.",
        f"- **Keep rule**: a task counts where the oracle beats constant LR by >= "
        f"{100 * KEEP_GAP:.0f}% (gap = 1 - oracle/constant); the LM at 3x and 10x its tuned LR "
        "is scored against the tuned oracle and counts where the LM does.",
        "- **Score**: final validation loss, mean over seeds (infinite if a seed's is not "
        "finite); ratio = score / oracle score, lower is better. **Diverged**: a non-finite "
        "training loss (skipped or not), a non-finite final validation loss, or a final "
        "training loss (last 5% of steps) above the initial one (first 10 steps).",
        "- **Context, not in the targets**: the oracle is the best of 18 noisy means on the "
        "same seeds it is scored on, so it is biased low (the winner's curse). The **held-out "
        "oracle** (2 or more seeds) chooses the grid schedule on all seeds but one and scores "
        "it on that one, for each seed in turn (a held-out loss that is not finite makes its "
        "score infinite, as above); its mean over the seeds is what choosing by a sweep "
        "delivers. **± x**: the standard error over seeds of the per-seed ratio (a seed's "
        "final loss over the oracle's on that seed), a rough guide with few seeds. The **best "
        "single fixed recipe**: the one grid schedule with the lowest geometric mean ratio "
        "over the kept tasks, what one recipe used everywhere gets.",
        "",
        "## Summary",
        "",
        "| task | peak LR | oracle | oracle loss | held-out oracle / oracle | constant | gap | "
        "kept | " + " | ".join(f"{s} / oracle | {s} / held-out oracle" for s in surgeons) + " |",
        "|---|---|---|---|---|---|---|---|" + "---|---|" * len(surgeons),
    ]
    for name, task in summary.items():
        entries = task["contenders"]
        ref = task["reference"]
        oracle = (
            f"{ref['label']}" + (f" (of {ref['task']})" if ref["task"] else "") if ref else "n/a"
        )
        constant = entries.get("constant", {}).get("score", math.nan)
        kept = {True: "yes", False: "**dropped**", None: "n/a"}[task["kept"]]
        cells = [
            f"{_ratio_cell(entries.get(s))} | "
            + (_times(entries[s]["heldout_ratio"]) if s in entries else "-")
            for s in surgeons
        ]
        held = task["heldout"]["ratio"] if task["heldout"] else math.nan
        lines.append(
            f"| {name} | {task['lr']:g} | {oracle} | {_fmt(ref['score']) if ref else 'nan'} "
            f"| {_times(held)} "
            f"| {_fmt(constant)} | {_pct(task['constant_gap'])} | {kept} | "
            + " | ".join(cells)
            + " |"
        )
    lines.append(
        "| **geometric mean** (kept tasks at their tuned LR) | | | | "
        f"{_geomean_cell(context['heldout_oracle'])} | | | | "
        + " | ".join(
            f"{_geomean_cell(means[s])} | {_geomean_cell(means[s], 'heldout')}" for s in surgeons
        )
        + " |"
    )
    best = context["best_fixed"]
    lines += [
        "",
        "Best single fixed recipe: "
        + (
            f"**{best['label']}**, geometric mean {_times(best['geomean'])} the oracle, "
            f"{_times(best['heldout'])} the held-out oracle ({best['tasks']} tasks); "
            + ", ".join(
                f"{s} {_times(means[s]['geomean'])}, {_times(means[s]['heldout'])}"
                for s in surgeons
            )
            + "."
            if best
            else "n/a (no grid schedule ran on every kept task)."
        ),
    ]
    lines += [
        "",
        "## Targets",
        "",
        f"Issue 13: <= {ORACLE_TARGET:.2f}x the oracle on every kept task, geometric mean <= "
        f"{GEOMEAN_TARGET:.2f}x, at 3x and 10x the tuned LR no divergence and <= "
        f"{OFF_LR_TARGET:.2f}x the tuned oracle, on the plateau task below constant and cosine.",
        "",
        "| target | " + " | ".join(surgeons) + " |",
        "|---|" + "---|" * len(surgeons),
    ]
    for goal in [*goals, *context["rows"]]:
        cells = [_goal_cell(goal["results"][s]) for s in surgeons]
        lines.append(f"| {goal['target']} | " + " | ".join(cells) + " |")
    lines += ["", "## Tasks", ""]
    for name, task in summary.items():
        lines += _task_section(name, task)
    lines += [
        "## The surgeons' events",
        "",
        "Per seed: `kind@step` (the step the decision was made at).",
        "",
    ]
    for name, task in summary.items():
        for s in surgeons:
            entry = task["contenders"].get(s)
            if entry is None:
                continue
            for run in entry["runs"]:
                lines.append(f"- {name}, {s}, seed {run['seed']}: {_events(run)}")
    return "\n".join(lines)


def _task_section(name: str, task: dict[str, Any]) -> list[str]:
    entries = task["contenders"]
    ref = task["reference"]
    betas = f", betas {tuple(task['betas'])}" if task["optimizer"] == "adamw" else ""
    lines = [
        f"### {name}: {task['title']}",
        "",
        f"{task['why']}. {task['steps']} steps, {task['optimizer']} at peak LR {task['lr']:g}, "
        f"weight decay {task['weight_decay']:g}{betas}.",
        "",
    ]
    if task["base"]:
        lines.append(
            f"Peak LR {task['lr_factor']:g}x {task['base']}'s tuned LR; ratios are to "
            + (
                f"{task['base']}'s oracle, {ref['label']} ({_fmt(ref['score'])})."
                if ref
                else f"{task['base']}'s oracle, which was not run."
            )
        )
    else:
        lines.append(sweep_line(task) + ".")
        if ref:
            constant = entries.get("constant", {}).get("score", math.nan)
            verdict = {True: "kept", False: "**dropped**", None: "not judged"}[task["kept"]]
            lines.append(
                f"Oracle: {ref['label']} ({_fmt(ref['score'])}); constant {_fmt(constant)}: "
                f"gap {_pct(task['constant_gap'])}, {verdict}."
            )
            lines.append(_heldout_line(task))
    lines += [
        "",
        "| contender | final val loss | / oracle | diverged | s/fit |",
        "|---|---|---|---|---|",
    ]
    best = min(entries.values(), key=lambda e: e["score"])
    for cname, e in entries.items():
        label = e["label"] + (" **(oracle)**" if cname == task["oracle"] else "")
        runs = len(e["runs"])
        if e["finite"] == 0:
            loss = f"non-finite ({runs}/{runs})"
        else:
            loss = f"{_fmt(e['mean'])} ± {_fmt(e['std'], 2)}"
            if e["finite"] < runs:
                loss += f" (+{runs - e['finite']} non-finite)"
        if e is best:
            loss = f"**{loss}**"
        div = f"{e['diverged']}/{runs}" + (
            f" (seeds {', '.join(map(str, e['diverged_seeds']))})" if e["diverged"] else ""
        )
        lines.append(f"| {label} | {loss} | {_fmt(e['ratio'], 4)} | {div} | {e['wall_s']:.1f} |")
    return [*lines, ""]


def sweep_markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """The sweep's ``results.md``: per task the final loss at each LR, the choice, and the
    ``sweep=`` line to record in ``quality_tasks.py``."""
    lines = _header("LR sweep: warmup 5% + cosine on a x3 grid", meta)
    lines += [
        "Rule: the task's peak LR is the grid LR with the lowest mean final validation loss; "
        "a choice at the end of the swept range needs a wider sweep.",
        "",
    ]
    for name, task in summary.items():
        lines += [
            f"## {name}: {task['title']}",
            "",
            f"{task['steps']} steps, seeds {task['seeds']}.",
            "",
            "| LR | final val loss (mean ± std) | per seed |",
            "|---|---|---|",
        ]
        for p in task["points"]:
            text = f"{_fmt(p['score'])} ± {_fmt(p['std'], 2)}"
            if p["lr"] == task["choice"]:
                text = f"**{text}**"
            per_seed = ", ".join(_fmt(x) for x in p["finals"])
            lines.append(f"| {p['lr']:g} | {text} | {per_seed} |")
        note = " **at the edge of the range: sweep wider**" if task["edge"] else ""
        recorded = (
            "the LR recorded in quality_tasks.py"
            if task["choice"] == task["recorded_lr"]
            else f"quality_tasks.py has {task['recorded_lr']:g}"
        )
        record = ", ".join(f"({p['lr']:g}, {p['score']:.4g})" for p in task["points"])
        lines += [
            "",
            f"Choice: **{task['choice']:g}**{note} ({recorded}). Record: `sweep=({record})`",
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- results.json


def binned(values: Sequence[float], points: int = CURVE_POINTS) -> list[float]:
    """``values`` averaged over at most ``points`` equal bins (a NaN in a bin makes it NaN)."""
    if len(values) <= points:
        return list(values)
    edges = [round(i * len(values) / points) for i in range(points + 1)]
    return [statistics.fmean(values[a:b]) for a, b in itertools.pairwise(edges)]


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_or_none(v) for v in x]
    return x


def dumps(data: Any) -> str:
    """Strict JSON: non-finite numbers as ``null``."""
    return json.dumps(_finite_or_none(data), indent=1)


def to_json(
    summary: dict[str, Any],
    goals: list[dict[str, Any]],
    means: dict[str, dict[str, Any]],
    context: dict[str, Any],
    meta: dict[str, Any],
) -> str:
    """``results.json``: everything in the summary, each run's curves binned."""
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
                    "wall_s": r["wall_s"],
                    "val": [list(v) for v in r["val"]],
                    "train_loss": binned(r["train_loss"]),
                    "lr": binned(r["lr"]),
                    "events": r["events"],
                }
                for r in e["runs"]
            ]
            contenders[cname] = {k: v for k, v in e.items() if k != "runs"} | {"runs": runs}
        tasks[name] = {k: v for k, v in task.items() if k != "contenders"} | {
            "contenders": contenders
        }
    return dumps(
        {"meta": meta, "targets": goals, "geomeans": means, "context": context, "tasks": tasks}
    )


# ---------------------------------------------------------------------------- plots

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
    """Validation loss (mean over seeds) of the oracle, the non-grid contenders and cosine;
    the smoothed training loss of a few (first seed); the surgeons' LR with their events
    beside the oracle's LR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = task["contenders"]
    surgeons = [n for n, e in entries.items() if e["kind"] == "surgeon"]
    shown = [
        n
        for n, e in entries.items()
        if n == task["oracle"] or not n.startswith("w") or n == "w0_cosine"
    ]
    fig, (ax_val, ax_train, ax_lr) = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    colors = itertools.cycle([*plt.get_cmap("tab10").colors, "gold", "magenta"])
    for cname in shown:
        e = entries[cname]
        steps = [s for s, _ in e["runs"][0]["val"]]
        curves = [[v for _, v in r["val"]] for r in e["runs"] if len(r["val"]) == len(steps)]
        mean = [statistics.fmean(col) for col in zip(*curves, strict=True)]
        style = {"lw": 2.5 if cname in (*surgeons, task["oracle"]) else 1.0}
        label = e["label"] + (" (oracle)" if cname == task["oracle"] else "")
        ax_val.plot(steps, mean, marker=".", label=label, color=next(colors), **style)
    ax_val.set_yscale("log")
    ax_val.set_ylabel("validation loss (mean over seeds)")
    ax_val.set_title(f"{name}: {task['title']}", fontsize=10)
    ax_val.legend(fontsize=7, ncol=2)
    for cname in dict.fromkeys([*surgeons, task["oracle"], "constant"]):
        if cname not in entries:
            continue
        run = entries[cname]["runs"][0]
        span = max(5, len(run["train_loss"]) // 50)
        ax_train.plot(_ema(run["train_loss"], span), label=entries[cname]["label"])
    ax_train.set_yscale("log")
    ax_train.set_ylabel("training loss (EMA, first seed)")
    ax_train.legend(fontsize=7)
    if task["oracle"] in entries:
        run = entries[task["oracle"]]["runs"][0]
        ax_lr.plot(
            run["lr"], "--", color="gray", label=f"oracle: {entries[task['oracle']]['label']}"
        )
    seen: set[str] = set()
    for cname in surgeons:
        for run in entries[cname]["runs"]:
            ax_lr.plot(run["lr"], lw=1.2, label=f"{cname} seed {run['seed']}")
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
