"""Surgeon variants against the fixed-schedule oracle on the dev tasks (paired by seed).

    python benchmarks/dev/compare.py --set "" --set "decay=cosine" [--tasks char,circle]

The oracle: the best mean final loss of warmup {0,1,2,5,10,20%} x {cosine, linear, wsd} to 0,
from the grid files of ``harness.py grid`` (runs/dev/grid_<task>_*.json)."""
import argparse, glob, json, math, statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
import harness

TUNED = {"char": 3e-2, "circle": 1.0, "digits": 1e-2, "teacher": 0.1, "teacher_sgd": 0.1}
HOT = {"char_3x": ("char", 0.1), "char_10x": ("char", 0.3), "teacher_3x": ("teacher", 0.3)}
ORACLE_SET = {f"{d}:{w}" for d in ("cosine", "linear", "wsd", "wsd0.2") for w in ("0", "0.01", "0.02", "0.05", "0.1", "0.2")}


def oracle(task):
    finals = {}
    for path in glob.glob(str(harness.OUT / f"grid_{task}_*.json")):
        for r in json.load(open(path)):
            if r["task"] != task or r["lr"] != TUNED[task] or r["schedule"] not in ORACLE_SET:
                continue
            key = r["schedule"].replace("wsd0.2", "wsd")
            finals.setdefault(key, {})[r["seed"]] = r["final"]
    most = max(len(v) for v in finals.values())
    full = {k: v for k, v in finals.items() if len(v) == most}
    best = min(full, key=lambda k: statistics.fmean(full[k].values()))
    return best, full[best]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--tasks", default="char,circle,digits,teacher,teacher_sgd")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, default=0)
    p.add_argument("--tag", default="")
    a = p.parse_args()
    variants = []
    for text in a.set or [""]:
        kw = dict(item.split("=", 1) for item in text.split(",") if item)
        variants.append({k: harness._parse_value(v) for k, v in kw.items()})
    tasks = a.tasks.split(",")
    jobs, orc = [], {}
    for task in tasks:
        base, lr = HOT.get(task, (task, TUNED.get(task)))
        orc[task] = oracle(base)
        seeds = sorted(orc[task][1]) if not a.seeds else range(a.seeds)
        for v in variants:
            for s in seeds:
                jobs.append((base, lr, v, s, 0))
    t0 = time.time()
    results = harness.run_all(jobs, a.workers)
    (harness.OUT / f"compare_{a.tag or int(t0)}.json").write_text(json.dumps(results))
    i = 0
    rows = {}
    for task in tasks:
        name, ofin = orc[task]
        for v in variants:
            rs = [r for r in results[i:] if True][: len(sorted(ofin)) if not a.seeds else a.seeds]
            i += len(rs)
            fin = [r["final"] for r in rs]
            mean = statistics.fmean(fin)
            ratio = mean / statistics.fmean(ofin.values())
            rb = sum(r.get("rollbacks", 0) for r in rs)
            kinds = {}
            for r in rs:
                for e in r.get("events", []):
                    kinds[e[1]] = kinds.get(e[1], 0) + 1
            wend = [e[0] for r in rs for e in r.get("events", []) if e[1] == "warmup_end"]
            rows.setdefault(json.dumps(v) if v else "defaults", []).append(ratio)
            print(f"{task:<12} {json.dumps(v) if v else 'defaults':<55} {mean:.4f} ratio {ratio:.3f} (oracle {name} {statistics.fmean(ofin.values()):.4f}) wu_end {sorted(wend)} rb {rb} {kinds}")
    for k, rs in rows.items():
        g = math.exp(statistics.fmean(math.log(x) for x in rs))
        print(f"GEOMEAN {k:<55} {g:.3f}  max {max(rs):.3f}")
    print(f"{len(jobs)} fits in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
