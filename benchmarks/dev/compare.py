"""Surgeon variants against the fixed-schedule oracle on the dev tasks, paired by seed.

    python benchmarks/dev/compare.py --set "" --set "decay=cosine" --tasks char,circle

The oracle of a task: the best mean final loss of warmup {0, 1, 2, 5, 10, 20%} x {cosine,
linear, wsd} to 0 at the task's tuned LR, from the grid files ``harness.py grid`` wrote
(``runs/dev/grid_<task>_*.json``; the seeds of the grid with the most). ``char_3x``,
``char_10x`` and ``teacher_3x`` train at 3x / 10x the tuned LR and are scored against the
tuned oracle. Prints, per task and variant: mean final loss, its ratio to the oracle's, the
warmup_end steps, rollbacks and the events by kind; then the geometric mean per variant.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness

TUNED = {
    "char": 3e-2,
    "circle": 1.0,
    "digits": 1e-2,
    "teacher": 0.1,
    "teacher_sgd": 0.1,
    "autoenc": 3e-3,
    "gru": 1e-2,
    "logreg": 3e-2,
    "bn": 0.3,
}
"""Tuned LRs: the best of a x3 grid for warmup 5% + cosine (``harness.py sweep``); the last
four are the probe tasks (added after the design was fixed)."""
HOT = {"char_3x": ("char", 0.1), "char_10x": ("char", 0.3), "teacher_3x": ("teacher", 0.3)}
WARMUPS = ("0", "0.01", "0.02", "0.05", "0.1", "0.2")
ORACLE_SET = {f"{d}:{w}" for d in ("cosine", "linear", "wsd", "wsd0.2") for w in WARMUPS}


def oracle(task: str) -> tuple[str, dict[int, float]]:
    """The oracle schedule of ``task`` and its final loss per seed."""
    finals: dict[str, dict[int, float]] = {}
    for path in glob.glob(str(harness.OUT / f"grid_{task}_*.json")):
        for r in json.loads(Path(path).read_text()):
            if r["task"] != task or r["lr"] != TUNED[task] or r["schedule"] not in ORACLE_SET:
                continue
            finals.setdefault(r["schedule"].replace("wsd0.2", "wsd"), {})[r["seed"]] = r["final"]
    most = max(len(v) for v in finals.values())
    full = {k: v for k, v in finals.items() if len(v) == most}
    best = min(full, key=lambda k: statistics.fmean(full[k].values()))
    return best, full[best]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--set", action="append", default=[], help="SurgeonConfig key=value,...")
    p.add_argument("--tasks", default="char,circle,digits,teacher,teacher_sgd")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, default=0, help="0: the oracle's seeds")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    variants = []
    for text in a.set or [""]:
        pairs = dict(item.split("=", 1) for item in text.split(",") if item)
        variants.append({k: harness._parse_value(v) for k, v in pairs.items()})
    tasks = a.tasks.split(",")
    jobs, oracles, counts = [], {}, {}
    for task in tasks:
        base, lr = HOT.get(task, (task, TUNED.get(task)))
        oracles[task] = oracle(base)
        seeds = list(range(a.seeds)) if a.seeds else sorted(oracles[task][1])
        counts[task] = len(seeds)
        jobs += [(base, lr, v, s, 0) for v in variants for s in seeds]
    t0 = time.time()
    results = harness.run_all(jobs, a.workers)
    (harness.OUT / f"compare_{a.tag or int(t0)}.json").write_text(json.dumps(results))
    ratios: dict[str, list[float]] = {}
    i = 0
    for task in tasks:
        name, oracle_finals = oracles[task]
        oracle_mean = statistics.fmean(oracle_finals.values())
        for v in variants:
            runs = results[i : i + counts[task]]
            i += counts[task]
            mean = statistics.fmean(r["final"] for r in runs)
            kinds: dict[str, int] = {}
            for r in runs:
                for e in r.get("events", []):
                    kinds[e[1]] = kinds.get(e[1], 0) + 1
            ends = sorted(e[0] for r in runs for e in r["events"] if e[1] == "warmup_end")
            label = json.dumps(v) if v else "defaults"
            ratios.setdefault(label, []).append(mean / oracle_mean)
            print(
                f"{task:<12} {label:<50} {mean:.4f} ratio {mean / oracle_mean:.3f} "
                f"(oracle {name} {oracle_mean:.4f}) warmup_end {ends} "
                f"rollbacks {sum(r.get('rollbacks', 0) for r in runs)} {kinds}"
            )
    for label, rs in ratios.items():
        geo = math.exp(statistics.fmean(math.log(x) for x in rs))
        print(f"GEOMEAN {label:<50} {geo:.3f}  max {max(rs):.3f}")
    print(f"{len(jobs)} fits in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
