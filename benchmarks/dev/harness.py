"""Dev harness for the controller's decisions: small tasks in plain torch loops, no Lightning.

The surgeon runs as :class:`surgeon.controller.Controller` fed the way the callback feeds it
(losses handed over in blocks of 4, 4-7 steps after their step; snapshots and rollbacks as the
caller makes them), so a fit costs only the model's own compute. Fixed schedules: linear
warmup from 0 over ``w`` of the run, then ``cosine`` or ``linear`` to 0, ``wsd`` (hold, linear
to 0 over the last 20%; ``wsd0.5``: the last 50%; ``wsq``: a 1-sqrt tail) or ``constant``.
Results go to ``runs/dev/``; ``compare.py`` scores surgeon variants against the grids.

These tasks are the *dev* set (the design was chosen on them); the outcome benchmark's tasks
(``benchmarks/quality_tasks.py``) are the held-out check.

    python benchmarks/dev/harness.py sweep char --lrs 1e-3,3e-3,1e-2 --seeds 2
    python benchmarks/dev/harness.py grid char --lr 3e-3 --seeds 3
    python benchmarks/dev/harness.py surgeon char --lr 3e-3 --seeds 3 --set decay=linear
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from surgeon.config import SurgeonConfig  # noqa: E402
from surgeon.controller import Controller  # noqa: E402

READBACK = 4
OUT = REPO / "runs" / "dev"

# ------------------------------------------------------------------------------ tasks


@dataclass
class Built:
    model: nn.Module
    batch: Callable[[int], tuple[Tensor, Tensor]]  # step -> (inputs, targets)
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]
    val: tuple[Tensor, Tensor]


def _ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    return nn.functional.cross_entropy(out.flatten(0, -2), y.flatten())


def _bce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)


def _mse(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.mse_loss(model(x).squeeze(-1), y)


def _batches(x: Tensor, y: Tensor, size: int, seed: int) -> Callable[[int], tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1000 + seed)
    order: list[Tensor] = []

    def batch(step: int) -> tuple[Tensor, Tensor]:
        per = len(x) // size
        while len(order) <= step // per:
            order.append(torch.randperm(len(x), generator=gen))
        idx = order[step // per][(step % per) * size : (step % per + 1) * size]
        return x[idx], y[idx]

    return batch


_CORPUS: tuple[Tensor, int] | None = None


def _corpus() -> tuple[Tensor, int]:
    global _CORPUS
    if _CORPUS is None:
        from surgeon.demo import encode, stdlib_text

        codes, vocab = encode(stdlib_text())
        _CORPUS = codes, len(vocab)
    return _CORPUS


def build_char(seed: int, width: int = 32, layers: int = 2, batch: int = 16) -> Built:
    from surgeon.demo import TinyCharLM

    codes, vocab = _corpus()
    context = 32
    split = int(0.9 * len(codes))
    torch.manual_seed(seed)
    model = TinyCharLM(vocab, context=context, width=width, layers=layers, heads=4)
    gen = torch.Generator().manual_seed(1000 + seed)
    offs = torch.arange(context + 1)

    def get(step: int) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, split - context - 1, (batch,), generator=gen)
        chunk = codes[starts[:, None] + offs]
        return chunk[:, :-1], chunk[:, 1:]

    vgen = torch.Generator().manual_seed(7)
    vstarts = torch.randint(split, len(codes) - context - 1, (256,), generator=vgen)
    vchunk = codes[vstarts[:, None] + offs]
    return Built(model, get, _ce, (vchunk[:, :-1], vchunk[:, 1:]))


def build_circle(seed: int) -> Built:
    sys.path.insert(0, str(REPO / "examples"))
    from toy_tasks import CircleNet, circle_points

    x, y = circle_points(4096, "uniform", 0)
    vx, vy = circle_points(1024, "uniform", 1)
    torch.manual_seed(seed)
    return Built(CircleNet(hidden=16).net, _batches(x, y, 64, seed), _bce, (vx, vy))


def _digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    sys.path.insert(0, str(REPO / "examples"))
    from toy_tasks import digit_splits

    s = digit_splits(0)
    x = torch.cat([s["upstream"][0], s["pool"][0]])
    y = torch.cat([s["upstream"][1], s["pool"][1]])
    return x, y, *s["val"]


def build_digits(seed: int, hidden: int = 128) -> Built:
    x, y, vx, vy = _digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    return Built(model, _batches(x, y, 32, seed), _ce, (vx, vy))


def build_teacher(seed: int, dim: int = 20, hidden: int = 64, train: int = 50_000) -> Built:
    """Teacher-student regression: a random tanh MLP teacher plus noise, a ReLU student."""
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(dim, 32, generator=gen) / math.sqrt(dim)
    w2 = torch.randn(32, generator=gen) * 2.0 / math.sqrt(32)

    def teach(x: Tensor) -> Tensor:
        return torch.tanh(2.0 * x @ w1) @ w2 + 0.5

    x = torch.randn(train, dim, generator=gen)
    vx = torch.randn(2000, dim, generator=gen)
    y = teach(x) + 0.1 * torch.randn(train, generator=gen)
    vy = teach(vx)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(dim, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 1),
    )
    return Built(model, _batches(x, y, 64, seed), _mse, (vx, vy))


def build_parity(seed: int, hidden: int = 64) -> Built:
    """Sparse parity (Barak et al. 2022): the label is the product of 3 of 30 +-1 bits."""
    gen = torch.Generator().manual_seed(0)

    def points(n: int) -> tuple[Tensor, Tensor]:
        bits = torch.randint(0, 2, (n, 30), generator=gen).float() * 2 - 1
        return bits, (bits[:, :3].prod(dim=1) > 0).float()

    x, y = points(50_000)
    vx, vy = points(2048)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    return Built(model, _batches(x, y, 64, seed), _bce, (vx, vy))


# Probe tasks: added after the design was fixed, to check that its decisions carry over to
# kinds of training it was not shaped on (a bottleneck autoencoder, a recurrent net needing
# memory, a convex problem under SGD, BatchNorm under SGD with weight decay).


def build_autoenc(seed: int) -> Built:
    """Digits through a 64-128-12-128-64 ReLU autoencoder, MSE on the pixels."""
    x, _, vx, _ = _digits()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 12), nn.ReLU(),
        nn.Linear(12, 128), nn.ReLU(), nn.Linear(128, 64),
    )  # fmt: skip
    return Built(
        model, _batches(x, x, 32, seed), lambda m, a, b: nn.functional.mse_loss(m(a), b), (vx, vx)
    )


class _RunningSum(nn.Module):
    """A GRU reading digits, predicting the running sum of the digits mod 10 at each position."""

    def __init__(self, hidden: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.gru = nn.GRU(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.gru(self.embed(x))[0])


def build_gru(seed: int, length: int = 16) -> Built:
    gen = torch.Generator().manual_seed(1000 + seed)

    def get(step: int) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, 10, (32, length), generator=gen)
        return x, x.cumsum(1) % 10

    vx = torch.randint(0, 10, (512, length), generator=torch.Generator().manual_seed(7))
    torch.manual_seed(seed)
    return Built(_RunningSum(), get, _ce, (vx, vx.cumsum(1) % 10))


def build_logreg(seed: int) -> Built:
    """Multinomial logistic regression on the digits' standardized pixels (convex)."""
    x, y, vx, vy = _digits()
    mean, std = x.mean(0), x.std(0) + 1e-3
    torch.manual_seed(seed)
    return Built(
        nn.Linear(64, 10), _batches((x - mean) / std, y, 32, seed), _ce, ((vx - mean) / std, vy)
    )


def build_bn(seed: int, dim: int = 24) -> Built:
    """A BatchNorm MLP on Gaussian clusters with label noise (10 classes, 20,000 points)."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(30, dim, generator=gen) * 1.2

    def points(n: int) -> tuple[Tensor, Tensor]:
        which = torch.randint(0, 30, (n,), generator=gen)
        x = centers[which] + torch.randn(n, dim, generator=gen)
        y = which % 10
        flip = torch.rand(n, generator=gen) < 0.1
        return x, torch.where(flip, torch.randint(0, 10, (n,), generator=gen), y)

    x, y = points(20_000)
    vx, vy = points(4000)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(dim, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    return Built(model, _batches(x, y, 64, seed), _ce, (vx, vy))


@dataclass(frozen=True)
class TaskSpec:
    build: Callable[[int], Built]
    steps: int
    optimizer: str  # "adamw" | "sgd"
    weight_decay: float = 0.01


TASKS: dict[str, TaskSpec] = {
    "char": TaskSpec(build_char, 800, "adamw"),
    "circle": TaskSpec(build_circle, 1000, "sgd", 0.0),
    "digits": TaskSpec(build_digits, 1000, "adamw"),
    "teacher": TaskSpec(build_teacher, 1500, "adamw"),
    "teacher_small": TaskSpec(functools.partial(build_teacher, train=4000), 1500, "adamw"),
    "teacher_sgd": TaskSpec(build_teacher, 1500, "sgd", 0.0),
    "parity": TaskSpec(build_parity, 2000, "adamw"),
    "autoenc": TaskSpec(build_autoenc, 1500, "adamw"),
    "gru": TaskSpec(build_gru, 1500, "adamw"),
    "logreg": TaskSpec(build_logreg, 1000, "sgd", 0.0),
    "bn": TaskSpec(build_bn, 1500, "sgd", 5e-4),
}

# ------------------------------------------------------------------------------ schedules


def fixed_scale(warmup: float, decay: str, steps: int) -> Callable[[int], float]:
    """Linear warmup from 0 over ``warmup`` of the run, then ``decay`` from the peak to 0."""
    w = round(warmup * steps)

    def scale(t: int) -> float:
        if t < w:
            return t / w
        if decay == "constant":
            return 1.0
        rest = steps - w
        u = (t - w) / max(1, rest)
        if decay == "cosine":
            return 0.5 * (1 + math.cos(math.pi * u))
        if decay == "linear":
            return 1.0 - u
        if decay.startswith(("wsd", "wsq")):  # wsd0.3: linear over the last 30%; wsq: 1-sqrt
            tail = round(float(decay[3:] or 0.2) * rest)
            v = min(1.0, (steps - t) / tail)
            return v if decay.startswith("wsd") else 1.0 - math.sqrt(1.0 - v)
        raise ValueError(decay)

    return scale


# ------------------------------------------------------------------------------ a fit


def fit(task: str, lr: float, schedule: str | dict[str, Any], seed: int, steps: int = 0) -> dict:
    """One fit; ``schedule``: ``"cosine:0.05"`` (decay:warmup) or a dict of SurgeonConfig kwargs."""
    torch.set_num_threads(1)
    spec = TASKS[task]
    steps = steps or spec.steps
    built = spec.build(seed)
    model = built.model
    if spec.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=spec.weight_decay)
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, weight_decay=spec.weight_decay
        )
    ctrl = None
    if isinstance(schedule, dict):
        ctrl = Controller(steps, SurgeonConfig(**schedule), lag=2 * READBACK)
        scale_of = ctrl.lr_scale
    else:
        decay, warm = schedule.split(":")
        scale_of = fixed_scale(float(warm), decay, steps)
    losses: list[float] = []
    lrs: list[float] = []
    diverged = False
    snaps: dict[int, tuple[dict, dict]] = {}
    rollbacks = 0
    for t in range(steps):
        if ctrl is not None and ctrl.snapshot_due(t):
            good = ctrl.good_snapshot_step
            snaps = {k: v for k, v in snaps.items() if k == good}
            snaps[t] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
            ctrl.snapshot_taken(t, 0)
        s = scale_of(t)
        lrs.append(s)
        for g in opt.param_groups:
            g["lr"] = lr * s
        x, y = built.batch(t)
        loss = built.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        value = loss.item()
        if math.isfinite(value):
            opt.step()
        losses.append(value)
        if ctrl is not None and (t + 1) % READBACK == 0 and t >= 2 * READBACK - 1:
            for v in losses[t + 1 - 2 * READBACK : t + 1 - READBACK]:
                ctrl.written_until = t + 1  # as the engine: the LRs up to step t are written
                ctrl.update(v, update_skipped=not math.isfinite(v))
                if ctrl.rollback_to is not None:
                    weights, state = snaps[ctrl.rollback_to]
                    model.load_state_dict(weights)
                    opt.load_state_dict(state)
                    ctrl.rolled_back(t + 1)
                    rollbacks += 1
        if not math.isfinite(value) and ctrl is None:
            diverged = True
            break
    model.eval()
    with torch.no_grad():
        final = built.loss(model, *built.val).item() if not diverged else math.inf
    if not math.isfinite(final):
        diverged = True
    out = {
        "task": task,
        "lr": lr,
        "seed": seed,
        "schedule": schedule,
        "final": final,
        "diverged": diverged,
        "losses": losses,
        "lrs": lrs,
    }
    if ctrl is not None:
        out["events"] = [(e.step, e.kind.value, e.reason) for e in ctrl.events]
        out["rollbacks"] = rollbacks
    return out


def _fit_star(args: tuple) -> dict:
    return fit(*args)


def run_all(jobs: list[tuple], workers: int) -> list[dict]:
    if workers <= 1:
        return [_fit_star(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_fit_star, jobs))


def summarize(results: list[dict], key: Callable[[dict], str]) -> dict[str, tuple[float, float]]:
    groups: dict[str, list[float]] = {}
    for r in results:
        groups.setdefault(key(r), []).append(r["final"])
    return {
        k: (
            statistics.fmean(v),
            statistics.stdev(v) if len(v) > 1 and all(map(math.isfinite, v)) else 0.0,
        )
        for k, v in groups.items()
    }


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["sweep", "grid", "surgeon"])
    p.add_argument("task")
    p.add_argument("--lrs", default="")
    p.add_argument("--lr", type=float, default=0.0)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="surgeon key=value,...")
    p.add_argument("--warmups", default="0,0.01,0.02,0.05,0.1,0.2")
    p.add_argument("--decays", default="cosine,linear,wsd")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    seeds = range(a.seeds)
    if a.mode == "sweep":
        jobs = [
            (a.task, float(lr), "cosine:0.05", s, a.steps) for lr in a.lrs.split(",") for s in seeds
        ]
        key = lambda r: f"lr={r['lr']:g}"  # noqa: E731
    elif a.mode == "grid":
        scheds = [f"{d}:{w}" for d in a.decays.split(",") for w in a.warmups.split(",")]
        jobs = [(a.task, a.lr, sch, s, a.steps) for sch in scheds for s in seeds]
        key = lambda r: r["schedule"]  # noqa: E731
    else:
        variants = []
        for text in a.set or [""]:
            kw = dict(item.split("=", 1) for item in text.split(",") if item)
            variants.append({k: _parse_value(v) for k, v in kw.items()})
        jobs = [(a.task, a.lr, v, s, a.steps) for v in variants for s in seeds]
        key = lambda r: json.dumps(r["schedule"]) if r["schedule"] else "defaults"  # noqa: E731
    t0 = time.time()
    results = run_all(jobs, a.workers)
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"{a.mode}_{a.task}_{a.tag or int(t0)}.json"
    (OUT / name).write_text(json.dumps(results))
    for k, (m, s) in sorted(summarize(results, key).items(), key=lambda kv: kv[1][0]):
        print(f"{k:<60} {m:.4f} ± {s:.4f}")
    print(f"{len(jobs)} fits in {time.time() - t0:.0f}s -> {OUT / name}")


if __name__ == "__main__":
    main()
