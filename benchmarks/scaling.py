"""How the surgeon's per-step cost grows with the model, on the CPU: 10K to 100M parameters.

The model is ``DEPTH`` layers of ``Linear(width, width)`` + ``Tanh`` (width chosen for the
parameter count), regressing one fixed batch of 64 rows (``overhead.FixedBatches``), SGD with
momentum 0.9; one torch thread. Every time is CPU time of the training thread
(``time.thread_time``; the whole fit's: ``time.process_time``), so that other load on a shared
host, which preempts this process, does not count. Two parts, in one run:

1. **Guard candidates** (``--sizes`` up to 25M by default): what checking a step's gradients
   for NaN/inf costs, timed right after ``backward`` (the gradients as hot in the caches as in
   a fit), per step and as a share of the step (forward + backward + ``optimizer.step``):

   * ``kernel``: GradScaler's ``_amp_foreach_non_finite_check_and_unscale_`` over every
     gradient and the loss (one fused pass that reads and writes them; the guard's check);
   * ``foreach_norm``: ``torch._foreach_norm`` (L2) of every gradient, stacked with the loss,
     ``isfinite().all()`` (read-only);
   * ``sums``: ``g.sum()`` per gradient, stacked with the loss, ``isfinite().all()``
     (read-only, one call per tensor);
   * ``loss only``: the loss read on the host (``.item()``);
   * ``kernel / 8``: the kernel every 8th step, the loss alone on the others (the guard's
     ``grad_check_every=8`` option), amortized:
     ``(kernel + 7 x loss only) / 8``.

2. **Fits**: whole Lightning fits without a callback and with ``ScheduleSurgeon()`` (defaults
   but a planned ``total_steps=10_000``, so snapshots come every 100 steps as in a 10K-step
   run: each fit takes its first at step 0), interleaved, ``rounds`` of each. Columns: the
   step time without a callback (median step-to-step); the surgeon's per-step hooks without
   its snapshot captures (``hooks``), of which its non-finite guard (``guard``); one snapshot
   capture of the trained weights and optimizer state, buffers reused, as mid-run (median of
   3, after the fit) and the memory of the surgeon's two (the rollback target and the one
   waiting for its loss); that capture amortized over ``snapshot_every=100`` steps; the
   fit-time ratio measured (median over rounds of the paired whole-fit CPU times; the first
   capture, at step 0, weighs more in these few steps than in a real run) and estimated for
   a 10K-step run, ``1 + (hooks + Lightning's dispatch of them + capture / 100) / step``.

Usage::

    python benchmarks/scaling.py                 # the README table: ~5 min on a quiet 2-core CPU
    python benchmarks/scaling.py --quick         # smoke run: 10K and 100K, a few seconds
    python benchmarks/scaling.py --sizes 10K 1M --json out.json
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer import call as pl_call
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # overhead.py beside this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from overhead import BATCH, FixedBatches, HookTimer, bare_trainer, time_hooks

from surgeon import ScheduleSurgeon
from surgeon.guard import NonFiniteGuard
from surgeon.snapshot import Snapshot

CLOCK = time.thread_time_ns
DEPTH = 4
PLANNED_STEPS = 10_000
"""The surgeon's ``total_steps``: ``snapshot_every`` is 1% of it, 100 steps."""
SNAPSHOT_EVERY = PLANNED_STEPS // 100
GRAD_CHECK_EVERY = 8
"""The sampled guard candidate: ``grad_check_every=8``."""


@dataclass(frozen=True)
class Size:
    """A model size and how long to measure it: optimizer steps per fit, rounds of fits,
    rounds of the guard candidates."""

    params: int
    steps: int
    rounds: int
    candidate_rounds: int


SIZES = {
    "10K": Size(10_000, steps=400, rounds=3, candidate_rounds=200),
    "100K": Size(100_000, steps=200, rounds=3, candidate_rounds=100),
    "1M": Size(1_000_000, steps=200, rounds=3, candidate_rounds=40),
    "25M": Size(25_000_000, steps=24, rounds=3, candidate_rounds=6),
    "100M": Size(100_000_000, steps=16, rounds=2, candidate_rounds=3),
}
FULL = ["10K", "1M", "25M", "100M"]
QUICK = ["10K", "100K"]
CANDIDATE_LIMIT = 25_000_000
"""Sizes above this get no guard-candidate rows by default (the fits still run)."""


def width_for(params: int) -> int:
    """The width whose ``DEPTH`` layers hold about ``params`` parameters."""
    return max(2, round(math.sqrt(params / DEPTH)))


def make_net(width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(DEPTH) for m in (nn.Linear(width, width), nn.Tanh())])


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


# ---------------------------------------------------------------------------- 1. candidates
_ONE = torch.ones(())


def _kernel(grads: list[Tensor], loss: Tensor) -> bool:
    flag = torch.zeros(())
    torch._amp_foreach_non_finite_check_and_unscale_([*grads, loss], flag, _ONE)
    return bool(flag.item())


def _foreach_norm(grads: list[Tensor], loss: Tensor) -> bool:
    return not torch.stack([*torch._foreach_norm(grads), loss]).isfinite().all().item()


def _sums(grads: list[Tensor], loss: Tensor) -> bool:
    return not torch.stack([*(g.sum() for g in grads), loss]).isfinite().all().item()


def _loss_only(grads: list[Tensor], loss: Tensor) -> bool:
    return not math.isfinite(loss.item())


CANDIDATES: dict[str, Callable[[list[Tensor], Tensor], bool]] = {
    "kernel": _kernel,
    "foreach_norm": _foreach_norm,
    "sums": _sums,
    "loss only": _loss_only,
}


@dataclass
class CandidateRow:
    size: str
    params: int
    step_us: float
    us: dict[str, float] = field(default_factory=dict)


def measure_candidates(name: str, size: Size) -> CandidateRow:
    """Each candidate, timed right after a backward, in rotation; medians over the rounds."""
    width = width_for(size.params)
    net = make_net(width)
    optimizer = make_optimizer(net.parameters())
    x = torch.randn(BATCH, width)
    y = torch.randn(BATCH, width)
    timings: dict[str, list[float]] = {c: [] for c in CANDIDATES}
    steps: list[float] = []
    for r in range(size.candidate_rounds + 1):  # the first round warms up
        for candidate, check in CANDIDATES.items():
            start = CLOCK()
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            checked = CLOCK()
            assert not check(grads, loss.detach())
            done = CLOCK()
            optimizer.step()
            if r:
                timings[candidate].append((done - checked) / 1e3)
                steps.append((CLOCK() - start - (done - checked)) / 1e3)
    row = CandidateRow(name, sum(p.numel() for p in net.parameters()), statistics.median(steps))
    row.us = {c: statistics.median(v) for c, v in timings.items()}
    k = GRAD_CHECK_EVERY
    row.us[f"kernel / {k}"] = (row.us["kernel"] + (k - 1) * row.us["loss only"]) / k
    return row


def format_candidates(rows: list[CandidateRow]) -> str:
    names = list(rows[0].us)
    head = f"{'params':>11} {'step ms':>8} " + " ".join(f"{n:>20}" for n in names)
    lines = [
        "Guard candidates: µs per step (share of the step), checked right after backward",
        head,
        "-" * len(head),
    ]
    for row in rows:
        cells = " ".join(f"{f'{row.us[n]:.1f} ({row.us[n] / row.step_us:.2%})':>20}" for n in names)
        lines.append(f"{row.params:>11,} {row.step_us / 1e3:>8.2f} {cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- 2. fits
class Regressor(pl.LightningModule):
    """The ``DEPTH``-layer MLP on ``overhead.FixedBatches``; stamps each ``training_step``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = make_net(width)
        self.stamps: list[int] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.stamps.append(CLOCK())
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters())


@dataclass
class Fit:
    cpu_s: float  # the whole fit, this process's CPU time
    step_s: float  # median step-to-step time
    hooks_s: float  # the surgeon's per-step hooks, snapshot captures included
    dispatch_s: float  # Lightning's callback dispatch, the hooks themselves excluded
    guard_s: float
    captures_s: list[float]  # in the fit (the first, at step 0: weights only, buffers made)
    capture_s: float = 0.0  # after the fit: weights and optimizer state, buffers reused
    snapshot_bytes: int = 0


class _Parts:
    """Times ``NonFiniteGuard.check`` and ``Snapshot.capture`` (class-level wrappers, removed
    after the fit)."""

    def __init__(self) -> None:
        self.guard_ns = 0
        self.captures_ns: list[int] = []

    def __enter__(self) -> _Parts:
        self._check, self._capture = NonFiniteGuard.check, Snapshot.capture
        check, capture = self._check, self._capture

        def timed_check(guard: NonFiniteGuard, *args: Any) -> Any:
            start = CLOCK()
            try:
                return check(guard, *args)
            finally:
                self.guard_ns += CLOCK() - start

        def timed_capture(snapshot: Snapshot, *args: Any, **kwargs: Any) -> Any:
            start = CLOCK()
            try:
                return capture(snapshot, *args, **kwargs)
            finally:
                self.captures_ns.append(CLOCK() - start)

        NonFiniteGuard.check = timed_check  # type: ignore[method-assign]
        Snapshot.capture = timed_capture  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        NonFiniteGuard.check = self._check  # type: ignore[method-assign]
        Snapshot.capture = self._capture  # type: ignore[method-assign]


def run_fit(width: int, steps: int, surgeon: bool, root: Path) -> Fit:
    timer = HookTimer(CLOCK)
    callbacks: list[pl.Callback] = [ScheduleSurgeon(total_steps=PLANNED_STEPS)] if surgeon else []
    time_hooks(callbacks, timer)
    model = Regressor(width)
    trainer = bare_trainer(callbacks, steps, root)
    machinery = HookTimer(CLOCK)
    dispatch = pl_call._call_callback_hooks
    pl_call._call_callback_hooks = machinery.wrap(dispatch, "callback dispatch")
    gc.collect()
    try:
        with _Parts() as parts:
            start = time.process_time()
            trainer.fit(model, FixedBatches(steps, width))
            cpu = time.process_time() - start
    finally:
        pl_call._call_callback_hooks = dispatch
    assert trainer.global_step == steps
    capture_s, nbytes = time_capture(model, trainer.optimizers[0]) if surgeon else (0.0, 0)
    step = statistics.median(b - a for a, b in itertools.pairwise(model.stamps)) / 1e9
    hooks = timer.seconds(per_step=True)
    all_hooks = hooks + timer.seconds(per_step=False)
    return Fit(
        cpu_s=cpu,
        step_s=step,
        hooks_s=hooks,
        dispatch_s=sum(machinery.ns.values()) / 1e9 - all_hooks,
        guard_s=parts.guard_ns / 1e9,
        captures_s=[ns / 1e9 for ns in parts.captures_ns],
        capture_s=capture_s,
        snapshot_bytes=nbytes,
    )


def time_capture(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[float, int]:
    """A snapshot of the trained model and its optimizer state, as the surgeon takes them
    mid-run (buffers reused): the median of 3 captures, and its size in bytes."""
    snapshot = Snapshot("cpu")
    snapshot.capture(module, [optimizer], 0)  # makes the buffers
    times = []
    for step in range(1, 4):
        start = CLOCK()
        snapshot.capture(module, [optimizer], step)
        times.append((CLOCK() - start) / 1e9)
    return statistics.median(times), snapshot.nbytes


@dataclass
class FitRow:
    size: str
    params: int
    width: int
    steps: int
    rounds: int
    step_ms: float = 0.0  # no callback
    hooks_us: float = 0.0  # per step, snapshot captures excluded
    guard_us: float = 0.0
    capture_ms: float = 0.0
    snapshot_mb: float = 0.0  # two slots of weights and optimizer state
    capture_us_amortized: float = 0.0  # one capture per SNAPSHOT_EVERY steps
    fit_ratio: float = 1.0  # measured, paired
    est_ratio: float = 1.0  # a PLANNED_STEPS-step run
    raw: dict[str, list[Any]] = field(default_factory=dict)


def measure_fits(name: str, size: Size, root: Path) -> FitRow:
    width = width_for(size.params)
    params = sum(p.numel() for p in make_net(width).parameters())
    row = FitRow(name, params, width, size.steps, size.rounds)
    run_fit(width, min(size.steps, 12), surgeon=True, root=root)  # warm-up: first-call paths
    fits: dict[bool, list[Fit]] = {False: [], True: []}
    for r in range(size.rounds):
        for surgeon in (False, True) if r % 2 == 0 else (True, False):
            fits[surgeon].append(run_fit(width, size.steps, surgeon, root))
    plain, mine = fits[False], fits[True]
    steps = size.steps
    row.step_ms = statistics.median(f.step_s for f in plain) * 1e3
    row.capture_ms = statistics.median(f.capture_s for f in mine) * 1e3
    row.hooks_us = statistics.median((f.hooks_s - sum(f.captures_s)) / steps for f in mine) * 1e6
    row.guard_us = statistics.median(f.guard_s / steps for f in mine) * 1e6
    row.snapshot_mb = 2 * mine[-1].snapshot_bytes / 2**20
    row.capture_us_amortized = row.capture_ms * 1e3 / SNAPSHOT_EVERY
    row.fit_ratio = statistics.median(m.cpu_s / p.cpu_s for m, p in zip(mine, plain, strict=True))
    dispatch = [statistics.median(f.dispatch_s for f in group) for group in (mine, plain)]
    dispatch_us = (dispatch[0] - dispatch[1]) / steps * 1e6
    added = row.hooks_us + max(0.0, dispatch_us) + row.capture_us_amortized
    row.est_ratio = 1.0 + added / (row.step_ms * 1e3)
    row.raw = {
        "plain": [asdict(f) for f in plain],
        "surgeon": [asdict(f) for f in mine],
    }
    return row


def format_fits(rows: list[FitRow]) -> str:
    head = (
        f"{'params':>11} {'width':>5} {'steps x rounds':>14} {'step ms':>8} {'hooks µs':>9}"
        f" {'guard µs':>9} {'capture ms':>10} {'snap. MB':>9} {'capture/100 µs':>14}"
        f" {'fit ratio':>9} {'est. ratio':>10}"
    )
    lines = [
        f"Fits: ScheduleSurgeon(total_steps={PLANNED_STEPS}) vs no callback, per step",
        head,
        "-" * len(head),
    ]
    for r in rows:
        lines.append(
            f"{r.params:>11,} {r.width:>5} {f'{r.steps} x {r.rounds}':>14} {r.step_ms:>8.2f}"
            f" {r.hooks_us:>9.1f} {r.guard_us:>9.1f} {r.capture_ms:>10.2f}"
            f" {r.snapshot_mb:>9.1f} {r.capture_us_amortized:>14.1f}"
            f" {r.fit_ratio:>9.3f} {r.est_ratio:>10.3f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), help=f"default: {FULL}")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}, short fits")
    parser.add_argument("--no-candidates", action="store_true", help="skip the guard candidates")
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    args = parser.parse_args(argv)
    names = args.sizes or (QUICK if args.quick else FULL)
    sizes = {n: SIZES[n] for n in names}
    if args.quick:
        sizes = {n: Size(s.params, 30, 2, 10) for n, s in sizes.items()}
    torch.set_num_threads(1)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "surgeon"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    started = time.perf_counter()
    title = (
        f"CPU ({platform.processor() or platform.machine()}), 1 thread, torch {torch.__version__},"
        f" pytorch_lightning {pl.__version__}; MLP of {DEPTH} x Linear(width, width) + Tanh,"
        f" batch {BATCH}, SGD momentum 0.9"
    )
    print(title, flush=True)
    result: dict[str, Any] = {"title": title, "candidates": [], "fits": []}
    if not args.no_candidates:
        in_range = {n: s for n, s in sizes.items() if s.params <= CANDIDATE_LIMIT or args.sizes}
        candidates = [measure_candidates(n, s) for n, s in in_range.items()]
        if candidates:
            print(format_candidates(candidates), flush=True)
        result["candidates"] = [asdict(r) for r in candidates]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure_fits(n, s, Path(tmp)) for n, s in sizes.items()]
    print(format_fits(rows))
    result["fits"] = [asdict(r) for r in rows]
    result["seconds"] = time.perf_counter() - started
    print(f"({result['seconds']:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
