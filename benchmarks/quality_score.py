"""The outcome benchmark's scoring (``benchmarks/quality.py``): final losses, divergence, the
oracle (in-sample and held out), ratios, their spread over seeds and their geometric mean, the
keep rule, the targets and the context beside them, the LR sweep's grid and choice. Everything
here works on lists of floats and the raw run records, no training."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from quality_contenders import COSINE, Contender
from quality_tasks import Task

KEEP_GAP = 0.03
"""Keep rule: the oracle's score at most ``1 - KEEP_GAP`` times constant's."""
ORACLE_TARGET = 1.00
"""Target: a surgeon's ratio to the oracle on every kept task at its tuned LR."""
GEOMEAN_TARGET = 0.98
"""Target: the geometric mean of those ratios."""
OFF_LR_TARGET = 1.10
"""Target: at 3x and 10x the tuned LR, the ratio to the tuned oracle."""
PLATEAU_TASK = "parity"
INITIAL_STEPS = 10
"""Initial training loss: the mean of this many first step losses."""
FINAL_FRACTION = 0.05
"""Final training loss: the mean of this last fraction of the step losses."""
SWEEP_POINTS = 5
"""LRs per sweep: the task's LR and two grid neighbours on each side."""


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


def score(finals: Sequence[float]) -> float:
    """Mean final loss over all seeds; infinite if any is not finite (a diverged run)."""
    if not finals or not all(math.isfinite(x) for x in finals):
        return math.inf
    return statistics.fmean(finals)


def ratio(value: float, reference: float) -> float:
    """``value / reference``; NaN without a finite positive reference (infinite value: inf)."""
    if not (math.isfinite(reference) and reference > 0) or math.isnan(value):
        return math.nan
    return value / reference


def geometric_mean(values: Sequence[float]) -> float:
    """The geometric mean; NaN if empty or any value is NaN, inf if any is inf."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    if any(math.isinf(v) for v in values):
        return math.inf
    return math.exp(statistics.fmean(math.log(v) for v in values))


def oracle_of(scores: dict[str, float], grid: Sequence[str]) -> str | None:
    """The grid member with the lowest score (the first on a tie), of those that ran."""
    ran = [name for name in grid if name in scores]
    return min(ran, key=lambda name: scores[name]) if ran else None


def heldout_oracle(
    entries: dict[str, dict[str, Any]], grid: Sequence[str]
) -> dict[str, Any] | None:
    """Leave-one-seed-out: for each seed, the grid member with the best score over the other
    seeds (:func:`oracle_of`), scored on that seed; the held-out oracle's score is
    :func:`score` of those held-out finals (infinite if a pick's is not finite). ``None`` under
    2 seeds that every grid member ran. Free of the in-sample oracle's winner's curse: the
    minimum of 18 noisy means is biased low."""
    finals = {c: _by_seed(entries[c]) for c in grid if c in entries}
    seeds = sorted(set.intersection(*map(set, finals.values()))) if finals else []
    if len(seeds) < 2:
        return None
    picks = []
    for held in seeds:
        others = {c: score([f[s] for s in seeds if s != held]) for c, f in finals.items()}
        pick = oracle_of(others, grid)
        picks.append({"seed": held, "contender": pick, "final_val_loss": finals[pick][held]})
    return {"picks": picks, "score": score([p["final_val_loss"] for p in picks])}


def ratio_se(finals: dict[int, float], reference: dict[int, float]) -> float:
    """The standard error of the per-seed paired ratios ``finals[s] / reference[s]`` over the
    seeds both ran: how much of a ratio is seed noise. NaN under 2 seeds or with a non-finite
    final (the ratio is then infinite or NaN anyway)."""
    seeds = [s for s in finals if s in reference]
    values = [finals[s] / reference[s] for s in seeds]
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return math.nan
    return statistics.stdev(values) / math.sqrt(len(values))


def constant_gap(oracle: float, constant: float) -> float:
    """How much lower the oracle's score is than constant's, as a fraction of constant's (1.0
    when constant diverged and the oracle did not)."""
    if math.isinf(constant) and math.isfinite(oracle):
        return 1.0
    return 1.0 - ratio(oracle, constant)


def kept(gap: float) -> bool:
    """The keep rule: the oracle beats constant LR by at least ``KEEP_GAP``."""
    return gap >= KEEP_GAP


def lr_grid(center: float, half: int = SWEEP_POINTS // 2) -> list[float]:
    """``center`` (1 or 3 times a power of ten) and ``half`` x3-grid neighbours each side:
    ``lr_grid(1e-3, 1) == [3e-4, 1e-3, 3e-3]``."""
    exponent = math.floor(math.log10(center) + 1e-9)
    mantissa = center / 10**exponent
    if not (math.isclose(mantissa, 1.0) or math.isclose(mantissa, 3.0)):
        raise ValueError(
            f"lr must be 1 or 3 times a power of ten to center a sweep on, got lr={center!r}"
        )
    index = 2 * exponent + (mantissa > 2)
    return [float(f"{(3 if i % 2 else 1)}e{i // 2}") for i in range(index - half, index + half + 1)]


# ---------------------------------------------------------------------------- summary


def _by_seed(entry: dict[str, Any]) -> dict[int, float]:
    return dict(zip(entry["seeds"], entry["final_val_loss"], strict=True))


def _entry(contender: Contender, runs: list[dict[str, Any]]) -> dict[str, Any]:
    runs = sorted(runs, key=lambda r: r["seed"])
    finals = [final_val_loss(r) for r in runs]
    finite = [x for x in finals if math.isfinite(x)]
    flags = [diverged(r["train_loss"], f) for r, f in zip(runs, finals, strict=True)]
    return {
        "label": contender.label,
        "kind": contender.kind,
        "in_grid": contender.in_grid,
        "seeds": [r["seed"] for r in runs],
        "final_val_loss": finals,
        "mean": statistics.fmean(finite) if finite else math.nan,
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "finite": len(finite),
        "score": score(finals),
        "diverged": sum(flags),
        "diverged_seeds": [r["seed"] for r, f in zip(runs, flags, strict=True) if f],
        "wall_s": statistics.fmean(r["wall_s"] for r in runs),
        "runs": runs,
    }


def summarize(
    runs: list[dict[str, Any]], tasks: dict[str, Task], contenders: dict[str, Contender]
) -> dict[str, Any]:
    """Per task: each contender's entry, the oracle and the held-out oracle, the reference
    oracle (a task at a multiple of another's tuned LR: that task's), the constant-vs-oracle
    gap, kept or not; per contender its ratio, its ratio to the reference's held-out oracle and
    the ratio's standard error over seeds (paired with the reference oracle's seeds)."""
    grid = [name for name, c in contenders.items() if c.in_grid]
    out: dict[str, Any] = {}
    for name, task in tasks.items():
        mine = [r for r in runs if r["task"] == name]
        if not mine:
            continue
        entries = {
            c: _entry(contenders[c], [r for r in mine if r["contender"] == c])
            for c in contenders
            if any(r["contender"] == c for r in mine)
        }
        scores = {c: e["score"] for c, e in entries.items()}
        oracle = None if task.base else oracle_of(scores, grid)
        gap = (
            constant_gap(scores[oracle], scores["constant"])
            if oracle and "constant" in scores
            else math.nan
        )
        out[name] = {
            "title": task.title,
            "steps": mine[0]["steps"],
            "optimizer": task.optimizer,
            "lr": task.lr,
            "weight_decay": task.weight_decay,
            "betas": list(task.betas),
            "why": task.why,
            "sweep": [list(point) for point in task.sweep],
            "sweep_seeds": task.sweep_seeds,
            "base": task.base,
            "lr_factor": task.lr_factor,
            "oracle": oracle,
            "heldout": None if task.base else heldout_oracle(entries, grid),
            "constant_gap": gap,
            "kept": None if math.isnan(gap) else kept(gap),
            "contenders": entries,
        }
    for task in out.values():
        home = out.get(task["base"]) if task["base"] else task
        ref = home["contenders"][home["oracle"]] if home and home["oracle"] else None
        if task["base"]:
            task["constant_gap"] = home["constant_gap"] if home else math.nan
            task["kept"] = home["kept"] if home else None
        task["reference"] = (
            {
                "task": task["base"] or None,
                "contender": home["oracle"],
                "label": ref["label"],
                "score": ref["score"],
            }
            if ref
            else None
        )
        heldout = home["heldout"]["score"] if home and home["heldout"] else math.nan
        if task["heldout"]:
            task["heldout"]["ratio"] = ratio(heldout, ref["score"]) if ref else math.nan
        for entry in task["contenders"].values():
            entry["ratio"] = ratio(entry["score"], ref["score"]) if ref else math.nan
            entry["heldout_ratio"] = ratio(entry["score"], heldout)
            entry["ratio_se"] = ratio_se(_by_seed(entry), _by_seed(ref)) if ref else math.nan
    return out


def surgeon_names(summary: dict[str, Any]) -> list[str]:
    """Every surgeon contender that ran, in first-seen order."""
    names: dict[str, None] = {}
    for task in summary.values():
        for name, entry in task["contenders"].items():
            if entry["kind"] == "surgeon":
                names[name] = None
    return list(names)


def geomeans(
    summary: dict[str, Any], names: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Per surgeon (or per contender of ``names``): the geometric mean of its ratios over the
    kept tasks at their tuned LR (NaN when one of them lacks it or a reference), the same of its
    ratios to the held-out oracle, and over how many tasks."""
    tuned = [t for t in summary.values() if not t["base"] and t["kept"]]
    out = {}
    for name in surgeon_names(summary) if names is None else names:
        entries = [t["contenders"].get(name, {}) for t in tuned]
        out[name] = {
            "geomean": geometric_mean([e.get("ratio", math.nan) for e in entries]),
            "heldout": geometric_mean([e.get("heldout_ratio", math.nan) for e in entries]),
            "tasks": len(entries),
        }
    return out


def best_fixed(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The one oracle-grid schedule with the lowest geometric mean ratio over the kept tasks
    (first on a tie): what one recipe used everywhere gets, with no per-task choice. ``None``
    when none ran on every kept task."""
    grid = {
        n: e["label"] for t in summary.values() for n, e in t["contenders"].items() if e["in_grid"]
    }
    means = {n: m for n, m in geomeans(summary, list(grid)).items() if not math.isnan(m["geomean"])}
    if not means:
        return None
    name = min(means, key=lambda n: means[n]["geomean"])
    return {"contender": name, "label": grid[name], **means[name]}


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, per surgeon: met (True/False) or not measured (None), with numbers.

    Each row is ``{"target": text, "results": {surgeon: {"met": ..., "detail": ...}}}``."""
    surgeons = surgeon_names(summary)
    tuned = {n: t for n, t in summary.items() if not t["base"] and t["kept"]}
    off = {n: t for n, t in summary.items() if t["base"] and t["kept"]}
    means = geomeans(summary)
    rows: list[dict[str, Any]] = []

    def row(target: str, judge: Any) -> None:
        rows.append({"target": target, "results": {s: judge(s) for s in surgeons}})

    def every_task(s: str) -> dict[str, Any]:
        ratios = {n: t["contenders"][s]["ratio"] for n, t in tuned.items() if s in t["contenders"]}
        if not tuned or len(ratios) < len(tuned) or any(math.isnan(r) for r in ratios.values()):
            return {"met": None, "detail": "not measured on every kept task"}
        over = {n: r for n, r in ratios.items() if r > ORACLE_TARGET}
        worst = max(ratios, key=ratios.__getitem__)
        detail = f"worst {worst} {_fmt(ratios[worst], 4)}x; " + (
            "over on " + ", ".join(f"{n} {_fmt(r, 4)}x" for n, r in over.items())
            if over
            else f"all {len(ratios)} tasks at or under"
        )
        return {"met": not over, "detail": detail}

    def geomean(s: str) -> dict[str, Any]:
        value = means[s]["geomean"]
        if math.isnan(value):
            return {"met": None, "detail": "not measured on every kept task"}
        return {
            "met": value <= GEOMEAN_TARGET,
            "detail": f"{_fmt(value, 4)}x over {means[s]['tasks']} tasks",
        }

    def off_lr(s: str) -> dict[str, Any]:
        if not off or any(s not in t["contenders"] or not t["reference"] for t in off.values()):
            return {"met": None, "detail": "not measured (run char, char_3x, char_10x)"}
        parts, met = [], True
        for n, t in off.items():
            e = t["contenders"][s]
            ok = e["diverged"] == 0 and e["ratio"] <= OFF_LR_TARGET
            met = met and ok
            parts.append(f"{n}: {e['diverged']}/{len(e['runs'])} diverged, {_fmt(e['ratio'], 4)}x")
        return {"met": met, "detail": "; ".join(parts)}

    def plateau(s: str) -> dict[str, Any]:
        t = summary.get(PLATEAU_TASK)
        if not t or any(n not in t["contenders"] for n in (s, "constant", COSINE)):
            return {
                "met": None,
                "detail": f"not measured (run {PLATEAU_TASK} with constant, {COSINE})",
            }
        mine, const, cos = (t["contenders"][n]["score"] for n in (s, "constant", COSINE))
        return {
            "met": mine < const and mine < cos,
            "detail": f"{_fmt(mine)} vs constant {_fmt(const)}, cosine {_fmt(cos)}",
        }

    row(f"<= {ORACLE_TARGET:.2f}x the oracle on every kept task", every_task)
    row(f"geometric mean <= {GEOMEAN_TARGET:.2f}x the oracle", geomean)
    row(f"3x and 10x the tuned LR: no divergence, <= {OFF_LR_TARGET:.2f}x the tuned oracle", off_lr)
    row(f"plateau task ({PLATEAU_TASK}): below constant and cosine", plateau)
    return rows


def context(summary: dict[str, Any]) -> dict[str, Any]:
    """Figures beside the targets, never judged: the held-out oracle over the in-sample one
    (the winner's curse: geometric mean over the kept tasks), :func:`best_fixed`, and rows for
    the targets table in the shape of :func:`targets`' (``met`` always ``None``): per surgeon,
    its ratios to the held-out oracle, the single recipe's geometric mean beside its own, and
    which of its ratios over 1.00x are more than 2 standard errors over."""
    tuned = {n: t for n, t in summary.items() if not t["base"] and t["kept"]}
    means, best = geomeans(summary), best_fixed(summary)
    rows: list[dict[str, Any]] = []

    def row(target: str, describe: Any) -> None:
        results = {s: {"met": None, "detail": describe(s)} for s in means}
        rows.append({"target": f"context, not a target: {target}", "results": results})

    def mine(s: str) -> dict[str, dict[str, Any]]:
        return {n: t["contenders"][s] for n, t in tuned.items() if s in t["contenders"]}

    def heldout(s: str) -> str:
        ratios = {n: e["heldout_ratio"] for n, e in mine(s).items()}
        if not tuned or len(ratios) < len(tuned) or any(math.isnan(r) for r in ratios.values()):
            return "n/a (needs 2 or more seeds on every kept task)"
        worst = max(ratios, key=ratios.__getitem__)
        return f"geometric mean {_fmt(means[s]['heldout'])}x; worst {worst} {_fmt(ratios[worst])}x"

    def single(s: str) -> str:
        if best is None:
            return "n/a (no grid schedule ran on every kept task)"
        text = f"{_fmt(means[s]['geomean'])}x vs {_fmt(best['geomean'])}x"
        if math.isnan(means[s]["heldout"]) or math.isnan(best["heldout"]):
            return text
        return f"{text}; held out {_fmt(means[s]['heldout'])}x vs {_fmt(best['heldout'])}x"

    def noise(s: str) -> str:
        entries = mine(s)
        if all(math.isnan(e["ratio_se"]) for e in entries.values()):
            return "n/a (needs 2 or more seeds)"
        over = {
            n: e
            for n, e in entries.items()
            if e["ratio"] > ORACLE_TARGET and not math.isnan(e["ratio_se"])
        }
        clear = {n for n, e in over.items() if e["ratio"] - 2 * e["ratio_se"] > ORACLE_TARGET}

        def listed(names: Sequence[str]) -> str:
            cells = [
                f"{n} {_fmt(over[n]['ratio'])} ± {_fmt(over[n]['ratio_se'], 2)}" for n in names
            ]
            return ", ".join(cells) or "none"

        within = [n for n in over if n not in clear]
        return (
            f"more than 2 standard errors over: {listed([n for n in over if n in clear])}; "
            f"less (noise): {listed(within)}"
        )

    row(
        "ratio to the held-out oracle (each seed scored by the schedule its other seeds chose)",
        heldout,
    )
    if best is not None:
        row(f"geometric mean beside the best single fixed recipe, {best['label']}", single)
    row("ratios over 1.00x, by their standard error over seeds", noise)
    curse = [t["heldout"]["ratio"] if t["heldout"] else math.nan for t in tuned.values()]
    return {
        "heldout_oracle": {"geomean": geometric_mean(curse), "tasks": len(curse)},
        "best_fixed": best,
        "rows": rows,
    }


def sweep_summary(runs: list[dict[str, Any]], tasks: dict[str, Task]) -> dict[str, Any]:
    """Per task: each swept LR's mean ± std final validation loss, and the protocol's choice
    (the lowest mean; ``edge`` when it is the smallest or largest LR swept)."""
    out: dict[str, Any] = {}
    for name, task in tasks.items():
        mine = [r for r in runs if r["task"] == name]
        if not mine:
            continue
        points = []
        for lr in sorted({r["peak_lr"] for r in mine}):
            finals = [final_val_loss(r) for r in mine if r["peak_lr"] == lr]
            finite = [x for x in finals if math.isfinite(x)]
            points.append(
                {
                    "lr": lr,
                    "finals": finals,
                    "score": score(finals),
                    "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
                }
            )
        best = min(points, key=lambda p: p["score"])
        out[name] = {
            "title": task.title,
            "steps": mine[0]["steps"],
            "seeds": sorted({r["seed"] for r in mine}),
            "points": points,
            "choice": best["lr"],
            "edge": best is points[0] or best is points[-1],
            "recorded_lr": task.lr,
        }
    return out
