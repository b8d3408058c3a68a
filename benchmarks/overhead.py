"""Per-step overhead of LR control in a Lightning fit: what the surgeon costs next to the usual.

A model so small (``Linear(32, 32)`` on one fixed in-memory batch) that the per-step work of
Lightning and of the callbacks dominates (``--width`` makes it bigger, for the same table at a
longer step). The same ``pytorch_lightning`` Trainer for all variants:

* ``none``: no callback, constant LR (the baseline of every ratio);
* ``empty``: one ``Callback()`` that overrides nothing, constant LR. A reference, not a
  contender: Lightning's price for having *any* callback (per hook call: a ``getattr``, the
  ``state_key``, an f-string and a profiler context), the floor of every callback below;
* ``lambdalr``: warmup-cosine ``LambdaLR`` from ``configure_optimizers`` (``interval="step"``);
* ``monitor+spike``: Lightning's ``LearningRateMonitor`` + ``SpikeDetection``
  (``pytorch_lightning.callbacks.spike``; it exists in ``pytorch_lightning`` 2.6 as well as
  ``lightning.pytorch``, so no namespace switch is needed);
* ``surgeon``: ``ScheduleSurgeon()`` with its defaults;
* ``surgeon-unguarded``: ``ScheduleSurgeon(skip_nonfinite="off", snapshot="off")``, the
  controller alone: what the non-finite guard and the snapshots cost is the difference.

In one process: one warm-up round of every variant (discarded), then ``--repeats`` rounds,
each running every variant once, in a rotated order (so no variant always runs first).
Columns, per variant (medians over the rounds):

* ``wall s`` / ``ratio`` / ``+µs/step``: whole ``trainer.fit`` wall time, and its ratio to
  and difference from ``none`` per step. Ratio and difference are paired: the median over
  rounds of (this fit / ``none``'s fit in the same round), which cancels slow spells of a
  shared host better than a ratio of medians;
* ``step µs`` / ``ratio``: the median time from one ``training_step`` to the next (a whole
  loop iteration, hooks included), and its paired ratio to ``none``: the median over the
  steps ignores the fit's setup and the odd preempted step, the steadiest of the three;
* ``hook µs/step``: time inside the LR work itself, timed with ``perf_counter_ns`` wrappers:
  ``scheduler.step`` for ``lambdalr``, the per-step hooks the two callbacks override for
  ``monitor+spike``, the per-step hooks the surgeon overrides for ``surgeon``; ``setup ms``:
  the once-per-fit hooks (``on_fit_start``, ...). A wrapper adds about 0.1 µs per call.
  Below the table, the same split by callable;
* ``+PL µs/step``: the time Lightning's own machinery around that work takes, beyond what it
  takes for ``none``: its callback dispatch (``call._call_callback_hooks``) and scheduler
  updates (``update_lr_schedulers``), timed the same way, the LR work subtracted;
* ``est. ratio``: ``1 + (hook + PL µs/step) / step µs of none``, the ratio the variant costs
  as timed from inside the loop. On a quiet host it agrees with the measured ratios; on a
  shared, noisy one (where a 3 % difference drowns in the fit-to-fit spread) it is the
  number to trust. The CPU-time (``time.process_time``) ratio is in the JSON output.

Below the table, the targets of issue 17 against this run: the surgeon's hook cost against
``LambdaLR``'s, and its fit-time ratio against 1.05 (with the empty callback's beside it, the
floor of any callback). Beside each surgeon variant's hook cost, the share of it that is the
decisions themselves (``Controller.update`` and ``Controller.lr_scale``, timed in one extra fit
of that variant with those two wrapped, so the measured fits stay unwrapped).

Every variant gets the same no-op logger (``DummyLogger``): ``LearningRateMonitor`` refuses
to run without one. Progress bar, model summary, checkpointing and sanity checks are off;
torch runs one intra-op thread (``--threads``).

On CUDA (when available, or ``--device cuda``) the same table is measured on the GPU, with
steps/s relative to ``none`` (from the median step times) and host syncs per step, counted
in one extra fit per variant under ``torch.cuda.set_sync_debug_mode("warn")`` (whole fit,
and inside the LR work alone).

``--clock cpu`` times everything on the CPU in CPU time (the fit: ``time.process_time``; steps
and hooks: ``time.thread_time``, the clock's own cost per reading subtracted), so that other
load on a shared host, which preempts the fits, does not count; its ratios are then CPU-time
ratios.

``--profile`` replaces the table by one fit of each surgeon variant under ``cProfile``: the
surgeon's functions by cumulative and own time per step (the profiler adds its own cost to
every call, about doubling these small figures: read them as shares).

Usage::

    python benchmarks/overhead.py                 # full run (a minute or two on CPU)
    python benchmarks/overhead.py --quick         # smoke run, < 30 s
    python benchmarks/overhead.py --width 1024    # a 7 ms step instead of 0.8 ms
    python benchmarks/overhead.py --json out.json # also write the numbers
    python benchmarks/overhead.py --profile --steps 2000 --variants surgeon
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import itertools
import json
import logging
import math
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.callbacks.spike import SpikeDetection
from pytorch_lightning.loggers.logger import DummyLogger
from pytorch_lightning.trainer import call as pl_call
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
import surgeon
from surgeon import ScheduleSurgeon
from surgeon.controller import Controller

VARIANTS = ("none", "empty", "lambdalr", "monitor+spike", "surgeon", "surgeon-unguarded")
LABELS = {
    "none": "none (constant LR)",
    "empty": "empty Callback (reference)",
    "lambdalr": "LambdaLR warmup-cosine",
    "monitor+spike": "LRMonitor + SpikeDetection",
    "surgeon": "ScheduleSurgeon",
    "surgeon-unguarded": "  no NaN guard, no snapshots",
}
WIDTH, BATCH, LR = 32, 64, 0.01
"""Default model width (``--width``), batch size, SGD learning rate."""


# ---------------------------------------------------------------------------- timing
PER_STEP = ("batch", "optimizer", "backward", "step")
"""A timed callable whose name contains one of these runs every step (else once per fit)."""


CLOCKS: dict[str, tuple[Callable[[], int], Callable[[], float]]] = {
    "wall": (time.perf_counter_ns, time.perf_counter),
    "cpu": (time.thread_time_ns, time.process_time),
}
"""``--clock``: (the steps' and hooks' clock in ns, the whole fit's clock in s). ``cpu`` counts
only the CPU time of this process (its training thread for steps and hooks), so that other
load on a shared host, which preempts the fits, does not count."""


@functools.cache
def clock_cost_ns(clock: Callable[[], int]) -> int:
    """What one reading of ``clock`` adds to an interval it closes (the median of back-to-back
    readings): subtracted from every timed call."""
    samples = []
    for _ in range(2000):
        start = clock()
        samples.append(clock() - start)
    return int(statistics.median(samples))


class HookTimer:
    """Accumulates the time (and, on CUDA, host syncs) spent inside wrapped callables, by
    ``clock`` (ns), less the clock's own cost per call."""

    def __init__(self, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.clock = clock
        self.cost = clock_cost_ns(clock)
        self.ns: dict[str, int] = {}
        self.sync_log: list[Any] | None = None  # the recorded-warnings list, when counting
        self.syncs = 0

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        self.ns.setdefault(name, 0)
        clock, cost = self.clock, self.cost

        def timed(*args: Any, **kwargs: Any) -> Any:
            before = len(self.sync_log) if self.sync_log is not None else 0
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ns[name] += clock() - start - cost
                if self.sync_log is not None:
                    self.syncs += len(self.sync_log) - before

        return timed

    def seconds(self, per_step: bool) -> float:
        """Time in the per-step callables (or in the once-per-fit ones)."""
        hits = (ns for n, ns in self.ns.items() if any(p in n for p in PER_STEP) == per_step)
        return sum(hits) / 1e9


def overridden_hooks(callback: pl.Callback) -> list[str]:
    """The ``Callback`` hooks ``callback``'s class overrides."""
    names = [n for n in dir(pl.Callback) if n.startswith("on_") or n in ("setup", "teardown")]
    return [n for n in names if getattr(type(callback), n) is not getattr(pl.Callback, n)]


def time_hooks(callbacks: list[pl.Callback], timer: HookTimer) -> None:
    """Replace each overridden hook of each callback by a timed wrapper (instance attribute)."""
    for callback in callbacks:
        for name in overridden_hooks(callback):
            label = f"{type(callback).__name__}.{name}"
            setattr(callback, name, timer.wrap(getattr(callback, name), label))


# ---------------------------------------------------------------------------- the model
def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """``LambdaLR`` factor: linear warmup to 1 over ``warmup`` steps, cosine to 0.1 by ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Tiny(pl.LightningModule):
    """``Linear(width, width)`` regressing a fixed batch; SGD, optionally with a LambdaLR."""

    def __init__(
        self, total_steps: int, width: int, scheduler_timer: HookTimer | None = None
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(width, width)
        self.total_steps = total_steps
        self.scheduler_timer = scheduler_timer
        self.clock: Callable[[], int] = time.perf_counter_ns  # run_fit sets the one it uses
        self.stamps: list[int] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.stamps.append(self.clock())  # step to step: a whole loop iteration
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)
        if self.scheduler_timer is None:
            return optimizer
        factor = warmup_cosine(self.total_steps, max(1, self.total_steps // 10))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        timed = self.scheduler_timer.wrap(scheduler.step, "LambdaLR.step")
        scheduler.step = timed  # type: ignore[method-assign]
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class FixedBatches:
    """One fixed batch, ``steps`` times: no data loading cost, one epoch is the whole fit.

    An iterable, not a list: Lightning would take a list for a list of dataloaders.
    """

    def __init__(self, steps: int, width: int) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, width, generator=g)
        y = x @ torch.randn(width, width, generator=g) / width**0.5
        self.batch, self.steps = (x, y), steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return itertools.repeat(self.batch, self.steps)


# ---------------------------------------------------------------------------- one fit
@dataclass
class Fit:
    wall_s: float  # trainer.fit, wall clock
    step_s: float  # median time from one training_step to the next
    cpu_s: float  # trainer.fit, this process's CPU time (robust to other load on the host)
    step_hook_s: float  # in the per-step LR work
    fit_hook_s: float  # in the once-per-fit hooks
    lightning_s: float  # in Lightning's callback dispatch and scheduler updates, LR work excluded
    per_hook_s: dict[str, float]
    syncs: int | None = None  # whole fit, when counted
    hook_syncs: int | None = None
    controller_s: float | None = None  # in Controller.update and lr_scale, when timed


def make_callbacks(variant: str) -> list[pl.Callback]:
    if variant == "monitor+spike":
        return [LearningRateMonitor(logging_interval="step"), SpikeDetection()]
    if variant == "surgeon":
        return [ScheduleSurgeon()]
    if variant == "surgeon-unguarded":  # what the NaN guard and the snapshots cost
        return [ScheduleSurgeon(skip_nonfinite="off", snapshot="off")]
    if variant == "empty":
        return [pl.Callback()]
    return []


def bare_trainer(
    callbacks: list[pl.Callback],
    steps: int,
    root: Path,
    device: str = "cpu",
    precision: str = "32-true",
) -> pl.Trainer:
    """A one-device Trainer with nothing of its own around the fit (no logger output,
    checkpointing, progress bar, summary or sanity check), so timings see only the fit."""
    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        max_steps=steps,
        callbacks=callbacks,
        logger=DummyLogger(),
        default_root_dir=root,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def run_fit(
    variant: str,
    steps: int,
    width: int,
    device: str,
    root: Path,
    count_syncs: bool = False,
    clock: str = "wall",
    time_controller: bool = False,
) -> Fit:
    """One fit; with ``clock="cpu"`` its "wall" time is the process's CPU time.
    ``time_controller``: also time the controller's per-step calls (wrapped for this fit)."""
    step_clock, fit_clock = CLOCKS[clock]
    timer = HookTimer(step_clock)
    decisions = HookTimer(step_clock)
    methods = {name: getattr(Controller, name) for name in ("update", "lr_scale")}
    if time_controller:
        for name, method in methods.items():
            setattr(Controller, name, decisions.wrap(method, f"Controller.{name}"))
    callbacks = make_callbacks(variant)
    time_hooks(callbacks, timer)
    model = Tiny(steps, width, timer if variant == "lambdalr" else None)
    model.clock = step_clock
    trainer = bare_trainer(callbacks, steps, root, device)
    batches = FixedBatches(steps, width)
    # Lightning's own machinery around the LR work: callback dispatch and scheduler updates
    machinery = HookTimer(step_clock)
    dispatch = pl_call._call_callback_hooks
    pl_call._call_callback_hooks = machinery.wrap(dispatch, "callback dispatch")
    loop = trainer.fit_loop.epoch_loop
    loop.update_lr_schedulers = machinery.wrap(loop.update_lr_schedulers, "scheduler updates")
    gc.collect()
    syncs = None
    with warnings.catch_warnings(record=True) as caught:
        if count_syncs:
            warnings.simplefilter("always")
            timer.sync_log = caught
            torch.cuda.set_sync_debug_mode("warn")
        try:
            wall, cpu = fit_clock(), time.process_time()
            trainer.fit(model, batches)
        finally:
            pl_call._call_callback_hooks = dispatch
            for name, method in methods.items():
                setattr(Controller, name, method)
            if count_syncs:
                torch.cuda.set_sync_debug_mode("default")
                syncs = sum("synchronizing" in str(w.message) for w in caught)
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = fit_clock() - wall, time.process_time() - cpu
    assert trainer.global_step == steps, (variant, trainer.global_step)
    per_hook = {name: ns / 1e9 for name, ns in timer.ns.items()}
    in_steps, in_setup = timer.seconds(per_step=True), timer.seconds(per_step=False)
    step = statistics.median(b - a for a, b in itertools.pairwise(model.stamps)) / 1e9
    hook_syncs = timer.syncs if count_syncs else None
    lightning = sum(machinery.ns.values()) / 1e9 - in_steps - in_setup
    controller = sum(decisions.ns.values()) / 1e9 if time_controller else None
    return Fit(
        wall, step, cpu, in_steps, in_setup, lightning, per_hook, syncs, hook_syncs, controller
    )


# ---------------------------------------------------------------------------- a table
@dataclass
class Row:
    variant: str
    wall_s: list[float] = field(default_factory=list)
    step_us: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    hook_us_per_step: list[float] = field(default_factory=list)
    setup_ms: list[float] = field(default_factory=list)
    lightning_us_per_step: list[float] = field(default_factory=list)
    per_hook_us_per_step: dict[str, float] = field(default_factory=dict)  # medians
    median_wall_s: float = 0.0
    median_step_us: float = 0.0
    step_ratio: float = 1.0  # median step time / that of "none"
    median_cpu_s: float = 0.0
    ratio: float = 1.0  # median wall time / that of "none"
    cpu_ratio: float = 1.0  # median CPU time / that of "none"
    added_us_per_step: float = 0.0  # from the wall times
    median_hook_us_per_step: float = 0.0
    median_setup_ms: float = 0.0
    added_lightning_us_per_step: float = 0.0  # vs "none"
    estimated_ratio: float = 1.0  # 1 + (hook + added Lightning time) / step time of "none"
    steps_per_s_ratio: float = 1.0
    syncs_per_step: float | None = None
    hook_syncs_per_step: float | None = None
    controller_us_per_step: float | None = None  # of the hook time: the decisions (extra fit)


def measure(
    device: str,
    variants: list[str],
    steps: int,
    width: int,
    repeats: int,
    warmup_steps: int,
    root: Path,
    clock: str = "wall",
) -> list[Row]:
    rows = {v: Row(v) for v in variants}
    per_hook: dict[tuple[str, str], list[float]] = {}
    for variant in variants:  # warm-up: imports, allocator, first-call paths
        run_fit(variant, warmup_steps, width, device, root, clock=clock)
    for r in range(repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for variant in order:
            fit = run_fit(variant, steps, width, device, root, clock=clock)
            row = rows[variant]
            row.wall_s.append(fit.wall_s)
            row.step_us.append(fit.step_s * 1e6)
            row.cpu_s.append(fit.cpu_s)
            row.hook_us_per_step.append(fit.step_hook_s / steps * 1e6)
            row.setup_ms.append(fit.fit_hook_s * 1e3)
            row.lightning_us_per_step.append(fit.lightning_s / steps * 1e6)
            for name, seconds in fit.per_hook_s.items():
                per_hook.setdefault((variant, name), []).append(seconds / steps * 1e6)
    base = rows[variants[0]]
    for row in rows.values():
        # paired: each round's fit against the baseline's fit of the same round, so a slow
        # spell of the host (other load, clock changes) cancels instead of landing on one row
        row.median_wall_s = statistics.median(row.wall_s)
        row.median_cpu_s = statistics.median(row.cpu_s)
        row.median_step_us = statistics.median(row.step_us)
        pairs = zip(row.step_us, base.step_us, strict=True)
        row.step_ratio = statistics.median(v / b for v, b in pairs)
        row.ratio = statistics.median(v / b for v, b in zip(row.wall_s, base.wall_s, strict=True))
        row.cpu_ratio = statistics.median(v / b for v, b in zip(row.cpu_s, base.cpu_s, strict=True))
        row.steps_per_s_ratio = 1.0 / row.step_ratio
        diffs = (v - b for v, b in zip(row.wall_s, base.wall_s, strict=True))
        row.added_us_per_step = statistics.median(diffs) / steps * 1e6
        row.median_hook_us_per_step = statistics.median(row.hook_us_per_step)
        row.median_setup_ms = statistics.median(row.setup_ms)
        row.added_lightning_us_per_step = statistics.median(row.lightning_us_per_step) - (
            statistics.median(base.lightning_us_per_step)
        )
        added = row.median_hook_us_per_step + row.added_lightning_us_per_step
        row.estimated_ratio = 1.0 + added / statistics.median(base.step_us)
    for (variant, name), values in per_hook.items():
        rows[variant].per_hook_us_per_step[name] = statistics.median(values)
    for variant in (v for v in variants if v.startswith("surgeon")):
        fit = run_fit(variant, steps, width, device, root, clock=clock, time_controller=True)
        rows[variant].controller_us_per_step = (fit.controller_s or 0.0) / steps * 1e6
    if device == "cuda":
        for variant, row in rows.items():
            fit = run_fit(variant, steps, width, device, root, count_syncs=True)
            row.syncs_per_step = (fit.syncs or 0) / steps
            row.hook_syncs_per_step = (fit.hook_syncs or 0) / steps
    return list(rows.values())


def format_table(title: str, rows: list[Row], cuda: bool) -> str:
    head = (
        f"{'variant':<27} {'fit s':>6} {'ratio':>6} {'+µs/step':>8} {'step µs':>7} {'ratio':>6}"
        f" {'hook µs/step':>12} {'+PL µs/step':>11} {'est. ratio':>10} {'setup ms':>8}"
    )
    if cuda:
        head += f" {'steps/s ratio':>13} {'syncs/step':>10} {'in hooks':>8}"
    lines = [title, head, "-" * len(head)]
    for row in rows:
        none = row.variant == "none"
        hook = "-" if none else f"{row.median_hook_us_per_step:.1f}"
        setup = "-" if none else f"{row.median_setup_ms:.2f}"
        line = (
            f"{LABELS[row.variant]:<27} {row.median_wall_s:>6.3f} {row.ratio:>6.3f}"
            f" {row.added_us_per_step:>8.1f} {row.median_step_us:>7.1f} {row.step_ratio:>6.3f}"
            f" {hook:>12} {row.added_lightning_us_per_step:>11.1f}"
            f" {row.estimated_ratio:>10.3f} {setup:>8}"
        )
        if cuda:
            line += (
                f" {row.steps_per_s_ratio:>13.3f} {row.syncs_per_step:>10.2f}"
                f" {row.hook_syncs_per_step:>8.2f}"
            )
        lines.append(line)
    lines.append("hook µs/step by callable (median):")
    for row in rows:
        for name, us in row.per_hook_us_per_step.items():
            lines.append(f"  {row.variant + ': ' + name:<64} {us:>8.2f}")
    lines += targets(rows)
    return "\n".join(lines)


HOOK_TARGETS = {"surgeon": 2.0, "surgeon-unguarded": 1.0}
"""Issue 17: the surgeon's per-step hook cost at most this many times ``LambdaLR``'s."""
RATIO_TARGET = 1.05
"""Issue 17: the fit-time ratio with the defaults."""


def targets(rows: list[Row]) -> list[str]:
    """The issue's targets against this table: hook cost against ``LambdaLR``'s (at most as
    much without the guard and snapshots, twice with the defaults), fit-time ratio <= 1.05
    (with the floor any callback pays, the empty one's, beside it)."""
    by = {row.variant: row for row in rows}
    if "surgeon" not in by:
        return []
    surgeon, lines = by["surgeon"], ["targets:"]
    for variant, times in HOOK_TARGETS.items():
        if variant in by and "lambdalr" in by:
            mine, theirs = (
                by[variant].median_hook_us_per_step,
                by["lambdalr"].median_hook_us_per_step,
            )
            verdict = "met" if mine <= times * theirs else "missed"
            decisions = by[variant].controller_us_per_step
            share = "" if decisions is None else f"; the controller's calls {decisions:.1f} of it"
            lines.append(
                f"  {LABELS[variant].strip()}: hook {mine:.1f} µs/step, x{mine / theirs:.1f} "
                f"LambdaLR's {theirs:.1f} (target <= x{times:g}): {verdict}{share}"
            )
    floor = f" (an empty Callback: {by['empty'].estimated_ratio:.3f})" if "empty" in by else ""
    met = "met" if max(surgeon.ratio, surgeon.estimated_ratio) <= RATIO_TARGET else "missed"
    lines.append(
        f"  fit-time ratio <= {RATIO_TARGET}: {met}: measured {surgeon.ratio:.3f}, est. "
        f"{surgeon.estimated_ratio:.3f}{floor}"
    )
    return lines


def profile(variant: str, steps: int, width: int, root: Path, top: int = 30) -> str:
    """One fit of ``variant`` under ``cProfile``: the surgeon's functions, per step."""
    run_fit(variant, min(steps, 50), width, "cpu", root)  # warm-up
    profiler = cProfile.Profile()
    profiler.enable()
    run_fit(variant, steps, width, "cpu", root)
    profiler.disable()
    package = str(Path(surgeon.__file__).parent)
    rows = [
        (cumulative / steps * 1e6, own / steps * 1e6, calls / steps, f"{Path(file).name}:{func}")
        for (file, _, func), (_, calls, own, cumulative, _) in pstats.Stats(profiler).stats.items()
        if file.startswith(package)
    ]
    lines = [
        f"{variant}: cProfile of one {steps}-step fit, the surgeon's functions per step",
        f"{'cumulative µs':>13} {'own µs':>7} {'calls':>6}  function",
    ]
    for cumulative, own, calls, name in sorted(rows, reverse=True)[:top]:
        lines.append(f"{cumulative:>13.2f} {own:>7.2f} {calls:>6.2f}  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="optimizer steps per fit (500; --quick: 100)")
    parser.add_argument(
        "--repeats", type=int, help="measured rounds of all variants (5; --quick: 2)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer steps and repeats")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CPU, and CUDA too when available",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="cpu: CPU time only (a shared, loaded host); CUDA is always timed by the wall clock",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=WIDTH,
        help="model width (Linear(width, width), batch 64): larger means a longer step",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="which variants (the first is the baseline of the ratios)",
    )
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    parser.add_argument(
        "--profile", action="store_true", help="instead: cProfile one fit of each surgeon variant"
    )
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 100 if args.quick else 500
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    warmup_steps = 20 if args.quick else min(args.steps, 100)
    devices = ["cpu"] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append("cuda")
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "surgeon"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    result: dict[str, Any] = {
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "width": args.width,
        "clock": args.clock,
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if args.profile:
        with tempfile.TemporaryDirectory() as tmp:
            for variant in (v for v in args.variants if v.startswith("surgeon")):
                print(profile(variant, args.steps, args.width, Path(tmp)), end="\n\n")
        return result
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            rows = measure(
                device,
                args.variants,
                args.steps,
                args.width,
                args.repeats,
                warmup_steps,
                Path(tmp),
                clock="wall" if device == "cuda" else args.clock,
            )
            where = torch.cuda.get_device_name() if device == "cuda" else platform.processor()
            title = (
                f"{device.upper()} ({where or platform.machine()}), Linear({args.width}, "
                f"{args.width}), {args.steps} steps/fit, "
                f"median of {args.repeats}, torch {torch.__version__}, "
                f"pytorch_lightning {pl.__version__}, {args.threads} thread(s)"
                + (", CPU time" if device == "cpu" and args.clock == "cpu" else "")
            )
            print(format_table(title, rows, cuda=device == "cuda"), flush=True)
            print()
            result[device] = {row.variant: asdict(row) for row in rows}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
