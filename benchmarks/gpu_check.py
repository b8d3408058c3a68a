"""GPU check: ``ScheduleSurgeon()`` in a real bf16 fit on one CUDA device makes no host sync
and costs no throughput. Prints one line of figures; exits 1 on a host sync in a step without
a read-back.

What it runs (``pytorch_lightning`` Trainer, one device, ``bf16-mixed``; ``32-true`` where the
device has no native bf16, said in the line), a GPT of ~25M parameters (5 pre-norm blocks,
width 512, vocabulary 8192, 512 tokens of context; batches of 32 sequences of random tokens
that stay on the device), fused AdamW (the guard hands it ``found_inf``, no read):

1. **Syncs.** One fit with ``ScheduleSurgeon`` whose per-step hooks run under
   ``torch.cuda.set_sync_debug_mode("error")``: a synchronizing CUDA call inside them raises,
   and the run exits 1 naming the hook and the step. Exempt, and counted instead (``"warn"``):
   the hook that ends a step whose losses are read back (every ``readback_every``-th step) and
   the guard's one read before the first optimizer step (no optimizer state exists yet, see
   ``surgeon.guard``). Outside the hooks the whole fit runs under ``"warn"``, and the syncs
   of Lightning and torch themselves are counted, in this fit and in one without the
   surgeon: more of them with the surgeon also exits 1.
2. **Throughput.** Fits without a callback and with ``ScheduleSurgeon(total_steps=100_000)``
   (its defaults for a 100K-step run: a snapshot every 1000 steps, so only the first, at step
   0, falls in a fit), interleaved, ``--rounds`` of each (3; 2 on a slow device); steps/s over
   the steps after the first ``WARMUP_STEPS``, timed with CUDA events. The steps per fit (30
   to 400) are sized from the sync fits' pace so that the whole check stays within
   ``TIME_BUDGET_S``.
3. **Snapshot copy.** The default snapshot (``"cpu"``: pinned host memory) of the trained
   model and optimizer, captured ``SNAPSHOT_REPEATS`` times: the time until the copy is done,
   the time the host spends in ``capture``, the size; and what that costs per step at one
   capture per 1000 steps (``est. ratio``) and per 10 (the least ``snapshot_every``, in runs
   under 1000 steps: the copy runs on the training stream, so it delays the steps).

Targets: 0 syncs per step, steps/s ratio >= 0.99 (reported as met or missed; only syncs fail
the run). Runs in well under 5 minutes on one CUDA device. Without CUDA it prints a skip and
exits 0; ``--device cpu --tiny`` runs the same code path on the CPU as a dry run (a tiny GPT,
syncs seen as ``.item()``-style reads by a dispatch mode instead of the CUDA sync debug mode,
host timers instead of CUDA events), which the tests use.

Usage::

    python benchmarks/gpu_check.py                      # on a CUDA machine
    python benchmarks/gpu_check.py --json gpu.json      # also write the figures
    python benchmarks/gpu_check.py --device cpu --tiny  # dry run of the code path
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # overhead.py beside this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from overhead import bare_trainer

from surgeon import ScheduleSurgeon
from surgeon.snapshot import Snapshot

PLANNED_STEPS = 100_000
"""The surgeon's ``total_steps`` in the timed fits: snapshots every 1000 steps."""
SNAPSHOT_EVERY = PLANNED_STEPS // 100
SHORTEST_SNAPSHOT_EVERY = 10
"""The surgeon's least ``snapshot_every`` (runs under 1000 steps): the copy's worst weight."""
WARMUP_STEPS = 10
"""Steps at the start of each timed fit left out of its steps/s."""
TIME_BUDGET_S = 240.0
"""The whole check, the interpreter's start aside: the timed fits get what the sync fits left."""
FIT_OVERHEAD_S = 3.0
"""A fit's own cost beside its steps (Lightning's setup and teardown), for the budget."""
SNAPSHOT_REPEATS = 5
RATIO_TARGET = 0.99
PER_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)
READBACK_EVERY = inspect.signature(ScheduleSurgeon).parameters["readback_every"].default


@dataclass(frozen=True)
class Config:
    vocab: int
    width: int
    blocks: int
    heads: int
    context: int
    batch: int
    sync_steps: int  # the sync-check fit
    rounds: int
    min_steps: int
    max_steps: int


FULL = Config(8192, 512, 5, 8, 512, 32, sync_steps=32, rounds=3, min_steps=30, max_steps=400)
TINY = Config(64, 32, 2, 2, 16, 4, sync_steps=24, rounds=2, min_steps=24, max_steps=24)


# ---------------------------------------------------------------------------- the model
class Block(nn.Module):
    """Pre-norm causal self-attention and MLP (``scaled_dot_product_attention``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(pl.LightningModule):
    """A small GPT on random tokens (embedded with ``index_select``, whose backward is an
    ``index_add_``: no host sync, where ``nn.Embedding``'s sorting backward may sync)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.position = nn.Parameter(torch.zeros(cfg.context, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.blocks))
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        embedded = self.embed.weight.index_select(0, tokens.flatten()).view(*tokens.shape, -1)
        x = embedded + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, targets = batch
        logits = self(tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4, weight_decay=0.1, fused=True)


class Batches:
    """``steps`` batches of random tokens, made once on the device (8 distinct ones, cycled)."""

    def __init__(self, cfg: Config, steps: int, device: torch.device) -> None:
        g = torch.Generator(device="cpu").manual_seed(0)
        data = torch.randint(cfg.vocab, (8, cfg.batch, cfg.context + 1), generator=g)
        self.data = data.to(device)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(self.steps):
            chunk = self.data[i % len(self.data)]
            yield chunk[:, :-1], chunk[:, 1:]


def count_params(cfg: Config) -> int:
    return sum(p.numel() for p in GPT(cfg).parameters())


# ---------------------------------------------------------------------------- timing
class StepClock(pl.Callback):
    """Time from the start of step ``start`` to the end of training (after the surgeon's own
    ``on_train_end``, before anything after it): CUDA events on CUDA (the device's timeline),
    ``perf_counter`` on the CPU."""

    def __init__(self, start: int, cuda: bool) -> None:
        self.start, self.cuda = start, cuda
        self.first: Any = None
        self.last: Any = None

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.start:
            self.first = self._now()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last = self._now()

    def seconds(self) -> float:
        if not self.cuda:
            return self.last - self.first
        torch.cuda.synchronize()
        return self.first.elapsed_time(self.last) / 1e3


# ---------------------------------------------------------------------------- syncs
class HostSync(RuntimeError):
    """A host sync where none may be (raised by the CPU stand-in; CUDA raises RuntimeError)."""


class _ReadCounter(TorchDispatchMode):
    """The CPU stand-in for the CUDA sync debug mode: ``.item()``, ``float(t)``, ``bool(t)``
    and friends dispatch ``_local_scalar_dense`` (``is_nonzero``); raise or count them."""

    def __init__(self, strict: bool, seen: list[str]) -> None:
        super().__init__()
        self.strict, self.seen = strict, seen

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "is_nonzero"):
            if self.strict:
                raise HostSync(f"host read (aten.{name})")
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


class SyncWatch:
    """Where syncs are errors (``strict``), counted (``lenient``), or counted as the fit's own
    (everything else, CUDA only: ``fit``)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.log: list[Any] = []  # CUDA: the recorded warnings of the whole fit
        self.lenient_syncs = 0
        self.in_hooks = 0  # syncs recorded inside the (lenient) hooks
        self.marks: list[tuple[int, int]] = []

    @contextmanager
    def fit(self) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            self.log = log
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")

    def mark_step(self) -> None:
        """At the start of each step: the syncs so far, and those inside the hooks."""
        if self.cuda:
            self.marks.append((self._syncs(self.log), self.in_hooks))

    def syncs_between_steps(self) -> float:
        """The fit's own syncs (outside the surgeon's hooks) per step, from the start of the
        first step to the start of the last: setup and teardown left out."""
        (total0, hooks0), (total1, hooks1) = self.marks[0], self.marks[-1]
        return ((total1 - total0) - (hooks1 - hooks0)) / (len(self.marks) - 1)

    @staticmethod
    def _syncs(log: list[Any]) -> int:
        return sum("synchronizing" in str(w.message) for w in log)

    @contextmanager
    def strict(self) -> Iterator[None]:
        if not self.cuda:
            with _ReadCounter(strict=True, seen=[]):
                yield
            return
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("warn")

    @contextmanager
    def lenient(self) -> Iterator[None]:
        if not self.cuda:
            seen: list[str] = []
            with _ReadCounter(strict=False, seen=seen):
                yield
            self.lenient_syncs += len(seen)
            return
        before = len(self.log)
        try:
            yield
        finally:
            new = self._syncs(self.log[before:])
            self.lenient_syncs += new
            self.in_hooks += new


@dataclass
class SyncReport:
    steps: int
    error: str | None = None  # the sync that stopped the fit: hook, step, message
    strict_calls: int = 0  # hook calls run under "error"
    readback_syncs: int = 0  # syncs in the exempt calls (read-backs, first-step guard read)
    exempt_calls: int = 0
    fit_syncs_per_step: float | None = None  # CUDA: outside the surgeon's hooks, with it
    baseline_syncs_per_step: float | None = None  # the same fit without the surgeon
    seconds: float = 0.0  # the fit's wall time (an upper bound of steps x step time)


class _StepMarks(pl.Callback):
    """Tells the watch where each step starts."""

    def __init__(self, watch: SyncWatch) -> None:
        self.watch = watch

    def on_train_batch_start(self, *args: Any) -> None:
        self.watch.mark_step()


def watch_hooks(
    surgeon: ScheduleSurgeon, trainer_ref: list[pl.Trainer], watch: SyncWatch, report: SyncReport
) -> None:
    """Run each per-step hook the surgeon overrides under ``strict`` (or ``lenient`` where
    exempt), recording where a sync stopped the fit."""
    for name in PER_STEP_HOOKS:
        if getattr(type(surgeon), name) is getattr(pl.Callback, name):
            continue
        hook = getattr(surgeon, name)

        def watched(*args: Any, _hook: Callable[..., Any] = hook, _name: str = name) -> Any:
            step = trainer_ref[0].global_step
            exempt = (_name == "on_train_batch_end" and step % READBACK_EVERY == 0) or (
                _name == "on_before_optimizer_step" and step == 0
            )
            region: AbstractContextManager[None] = watch.lenient() if exempt else watch.strict()
            if exempt:
                report.exempt_calls += 1
            else:
                report.strict_calls += 1
            try:
                with region:
                    return _hook(*args)
            except RuntimeError as error:
                if report.error is None:
                    report.error = f"{_name} at step {step}: {error}".splitlines()[0]
                raise

        setattr(surgeon, name, watched)


# ---------------------------------------------------------------------------- fits
def sync_fit(cfg: Config, device: str, precision: str, root: Path, surgeon: bool) -> SyncReport:
    """The sync check: a fit with the surgeon's hooks watched (or the same fit without it,
    for the count of the fit's own syncs)."""
    cuda = device == "cuda"
    watch = SyncWatch(cuda)
    report = SyncReport(cfg.sync_steps)
    callbacks: list[pl.Callback] = [_StepMarks(watch)]
    trainer_ref: list[pl.Trainer] = []
    if surgeon:
        callback = ScheduleSurgeon()
        watch_hooks(callback, trainer_ref, watch, report)
        callbacks.append(callback)
    trainer = bare_trainer(callbacks, cfg.sync_steps, root, device, precision)
    trainer_ref.append(trainer)
    model = GPT(cfg)
    start = time.perf_counter()
    with watch.fit():
        try:
            trainer.fit(model, Batches(cfg, cfg.sync_steps, torch.device(device)))
        except RuntimeError:
            if report.error is None:
                raise  # not the surgeon's: let it show
    report.seconds = time.perf_counter() - start
    report.readback_syncs = watch.lenient_syncs
    if cuda and report.error is None:
        report.fit_syncs_per_step = watch.syncs_between_steps()
    return report


class _SnapshotProbe(pl.Callback):
    """Times the snapshot copy once training is over, before Lightning moves the model and
    optimizer state off the device."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.copy: SnapshotCopy | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.copy = snapshot_copy(pl_module, trainer.optimizers[0], self.cuda)


def timed_fit(
    cfg: Config, steps: int, device: str, precision: str, root: Path, surgeon: bool
) -> tuple[float, SnapshotCopy | None]:
    """Steps/s of one fit (after ``WARMUP_STEPS``); with the surgeon, its snapshot copy."""
    cuda = device == "cuda"
    clock, probe = StepClock(WARMUP_STEPS, cuda), _SnapshotProbe(cuda)
    # in this order: the clock stops after the surgeon's on_train_end, before the probe's
    callbacks = [ScheduleSurgeon(total_steps=PLANNED_STEPS), clock, probe] if surgeon else [clock]
    trainer = bare_trainer(callbacks, steps, root, device, precision)
    trainer.fit(GPT(cfg), Batches(cfg, steps, torch.device(device)))
    return (steps - WARMUP_STEPS) / clock.seconds(), probe.copy


@dataclass
class SnapshotCopy:
    mb: float
    copy_ms: float  # capture until the copy is complete
    host_ms: float  # the host's time inside capture()


def snapshot_copy(module: nn.Module, optimizer: torch.optim.Optimizer, cuda: bool) -> SnapshotCopy:
    snapshot = Snapshot("cpu")
    snapshot.capture(module, [optimizer], 0)  # allocates the (pinned) buffers
    copies, hosts = [], []
    for step in range(1, SNAPSHOT_REPEATS + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        snapshot.capture(module, [optimizer], step)
        hosts.append(time.perf_counter() - start)
        if cuda:
            torch.cuda.synchronize()
        copies.append(time.perf_counter() - start)
    return SnapshotCopy(
        snapshot.nbytes / 2**20, statistics.median(copies) * 1e3, statistics.median(hosts) * 1e3
    )


@dataclass
class Result:
    device: str
    precision: str
    params: int
    steps_per_fit: int
    rounds: int
    none_steps_per_s: list[float] = field(default_factory=list)
    surgeon_steps_per_s: list[float] = field(default_factory=list)
    ratio: float = math.nan  # median of the paired ratios
    est_ratio: float = math.nan  # with one snapshot copy per SNAPSHOT_EVERY steps
    est_ratio_short: float = math.nan  # ... per SHORTEST_SNAPSHOT_EVERY steps
    syncs: SyncReport | None = None
    snapshot: SnapshotCopy | None = None
    seconds: float = 0.0
    ok: bool = True

    def line(self) -> str:
        s, snap = self.syncs, self.snapshot
        assert s is not None and snap is not None
        none = statistics.median(self.none_steps_per_s)
        mine = statistics.median(self.surgeon_steps_per_s)
        met = "met" if self.ratio >= RATIO_TARGET else "missed"

        def per_step(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.2f}"

        syncs = (
            f"syncs/step in the surgeon's hooks: 0 over {s.strict_calls} non-read-back calls"
            if s.error is None
            else f"HOST SYNC in {s.error}"
        )
        return (
            f"gpu_check: {'PASS' if self.ok else 'FAIL'} device={self.device!r} "
            f"precision={self.precision} params={self.params / 1e6:.3g}M; {syncs}; "
            f"read-back and first-step calls: {s.readback_syncs} syncs in {s.exempt_calls}; "
            f"fit's own syncs/step {per_step(s.baseline_syncs_per_step)} without the surgeon, "
            f"{per_step(s.fit_syncs_per_step)} with it; "
            f"steps/s {none:.2f} without, {mine:.2f} with: ratio {self.ratio:.3f} "
            f"(target >= {RATIO_TARGET}: {met}; {self.rounds} interleaved rounds of "
            f"{self.steps_per_fit} steps); snapshot {snap.mb:.3g} MB: copy {snap.copy_ms:.2f} ms, "
            f"host {snap.host_ms:.2f} ms; est. ratio with a snapshot every {SNAPSHOT_EVERY} steps "
            f"{self.est_ratio:.3f}, every {SHORTEST_SNAPSHOT_EVERY} {self.est_ratio_short:.3f}; "
            f"{self.seconds:.0f} s"
        )


def timed_steps(cfg: Config, seconds: float, step_s: float, rounds: int) -> int:
    """Steps to time per fit, for ``2 x rounds`` fits to take ``seconds`` at ``step_s``
    (within the config's bounds)."""
    per_fit = seconds / (2 * rounds) - FIT_OVERHEAD_S
    steps = int(per_fit / step_s) - WARMUP_STEPS
    return min(cfg.max_steps, max(cfg.min_steps, steps))


def run(device: str, tiny: bool, rounds: int | None, root: Path) -> Result:
    cfg = TINY if tiny else FULL
    cuda = device == "cuda"
    bf16 = not cuda or torch.cuda.is_bf16_supported(including_emulation=False)
    precision = "bf16-mixed" if bf16 else "32-true"
    result = Result(
        torch.cuda.get_device_name() if cuda else "cpu",
        precision,
        count_params(cfg),
        cfg.min_steps,
        rounds or cfg.rounds,
    )
    started = time.perf_counter()
    # 1. syncs: with the surgeon's hooks watched, and the fit's own without it
    result.syncs = sync_fit(cfg, device, precision, root, surgeon=True)
    if result.syncs.error is not None:
        result.ok = False
        result.seconds = time.perf_counter() - started
        return result
    baseline = sync_fit(cfg, device, precision, root, surgeon=False)
    result.syncs.baseline_syncs_per_step = baseline.fit_syncs_per_step
    if cuda and (result.syncs.fit_syncs_per_step or 0) > (baseline.fit_syncs_per_step or 0):
        result.ok = False  # the surgeon made the fit itself sync more (outside its hooks)
    # 2. throughput: the sync fits (which warmed the device up) size the timed ones
    step_s = max(result.syncs.seconds, baseline.seconds) / cfg.sync_steps
    left = TIME_BUDGET_S - (time.perf_counter() - started)
    result.steps_per_fit = timed_steps(cfg, left, step_s, result.rounds) + WARMUP_STEPS
    if rounds is None and result.steps_per_fit - WARMUP_STEPS < cfg.min_steps + 1:
        result.rounds = 2  # a slow device: fewer rounds of the least steps
        result.steps_per_fit = timed_steps(cfg, left, step_s, result.rounds) + WARMUP_STEPS
    for r in range(result.rounds):
        for surgeon in (False, True) if r % 2 == 0 else (True, False):
            rate, copy = timed_fit(cfg, result.steps_per_fit, device, precision, root, surgeon)
            (result.surgeon_steps_per_s if surgeon else result.none_steps_per_s).append(rate)
            result.snapshot = copy or result.snapshot
    pairs = zip(result.surgeon_steps_per_s, result.none_steps_per_s, strict=True)
    result.ratio = statistics.median(m / n for m, n in pairs)
    # 3. the snapshot copy (of the last surgeon fit's model and optimizer), per step
    assert result.snapshot is not None
    step_ms = 1e3 / statistics.median(result.none_steps_per_s)
    copy_ms = result.snapshot.copy_ms
    result.est_ratio = result.ratio / (1.0 + copy_ms / SNAPSHOT_EVERY / step_ms)
    result.est_ratio_short = result.ratio / (1.0 + copy_ms / SHORTEST_SNAPSHOT_EVERY / step_ms)
    result.seconds = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto: CUDA, or a skip without it; cpu: a dry run of the code path",
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny GPT (for a dry run)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of timed fits")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print(
            f"gpu_check: SKIP: no CUDA device (torch {torch.__version__}, "
            f"torch.cuda.is_available() is False); run it on a CUDA machine, or pass "
            f"--device cpu --tiny for a dry run of its code path"
        )
        return 0
    device = "cpu" if args.device == "cpu" else "cuda"
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "surgeon"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if device == "cpu":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(device, args.tiny, args.rounds, Path(tmp))
    if result.syncs is not None and result.syncs.error is not None:
        print(f"gpu_check: FAIL: host sync in {result.syncs.error}")
    else:
        print(result.line())
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=2))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
