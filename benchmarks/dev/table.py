"""Print a grid result file as a warmup x decay table of mean final losses (paired ratios to the best)."""
import json, math, statistics, sys
from collections import defaultdict
for path in sys.argv[1:]:
    rs = json.load(open(path))
    by = defaultdict(dict)
    for r in rs:
        by[r["schedule"] if isinstance(r["schedule"], str) else json.dumps(r["schedule"])][r["seed"]] = r["final"]
    means = {k: statistics.fmean(v.values()) for k, v in by.items()}
    best = min(means, key=means.get)
    print(path, "best", best, round(means[best], 4))
    decays = sorted({k.split(":")[0] for k in by if ":" in k and not k.startswith("{")})
    warms = sorted({float(k.split(":")[1]) for k in by if ":" in k and not k.startswith("{")})
    print("warmup  " + "".join(f"{d:>10}" for d in decays))
    for w in warms:
        row = []
        for d in decays:
            k = f"{d}:{w:g}" if f"{d}:{w:g}" in means else f"{d}:{w}"
            row.append(f"{means[k]/means[best]:10.3f}" if k in means else " " * 10)
        print(f"{w:<8g}" + "".join(row))
