"""The tasks of the outcome benchmark (``benchmarks/quality.py``): models, data, per-task choices.

Nothing is downloaded. Each task is a :class:`Task`: a LightningModule and a data module built
for one seed and one budget, the optimizer family, the peak LR and the budget, each chosen
once, up front, with the reason in :attr:`Task.why` (they were not picked by looking at the
surgeon's results). The models and data of ``examples/toy_tasks.py`` and ``surgeon/demo.py``
are reused where they fit:

1. ``circle``: :class:`~toy_tasks.CircleNet` (2 -> 16 -> 1) on :class:`~toy_tasks.CircleData`,
   SGD with momentum, as in the classic learning-rate-schedule lesson;
2. ``digits``: an MLP (64 -> 128 -> 10) trained from scratch on scikit-learn's bundled
   ``load_digits`` (split by :func:`toy_tasks.digit_splits`: the 1397 upstream+pool digits for
   training, the 400 held-out ones for validation), AdamW;
3. ``char``: :class:`~surgeon.demo.TinyCharLM` (2 layers, width 48, context 32) on the
   standard-library corpus of ``surgeon.demo`` (fixed file list; first 90% train, last 10%
   validation), AdamW;
4. ``char_hot``: task 3 with the peak LR 10x too high (10x the model's best constant LR);
5. ``parity``: sparse parity (the label is the product of 3 of 30 random +-1 bits) with a
   one-hidden-layer MLP, AdamW: the loss sits on a plateau at ln 2 for a long stretch
   (30-50% of the budget at constant LR) before it suddenly falls (Barak et al. 2022,
   "Hidden progress in deep learning: SGD learns parities near the computational limit").

Every module here mixes in :class:`BenchMixin`, which hands ``configure_optimizers`` to the
benchmark (so every contender of a task trains the same module on the same data) and adds
what some contenders need: the windowed training loss that ``ReduceLROnPlateau`` monitors, and
the ``train()``/``eval()`` switches of schedule-free optimizers around validation.

Training data are served as one long epoch covering the whole budget (a sampler over repeated
permutations), so ``batch_idx == global_step`` and step-interval scheduler frequencies and
``val_check_interval`` count optimizer steps.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "examples"):  # `surgeon` from the checkout, `toy_tasks` from examples/
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from toy_tasks import CharData, CircleData, CircleNet, circle_points, digit_splits  # noqa: E402

from surgeon.demo import CharWindows, TinyCharLM  # noqa: E402

VAL_POINTS = 20
"""Validations per full-mode run, evenly spaced, the last at the final step (``--quick``: 10);
every budget is a multiple of both."""

Configure = Callable[[pl.LightningModule], Any]
"""What ``configure_optimizers`` returns, built by the benchmark for one contender."""


# ------------------------------------------------------------------------------ the mixin


class BenchMixin:
    """Mixed into a task's LightningModule (before the LightningModule class).

    * ``bench_configure(module)`` is what ``configure_optimizers`` returns (set by the
      benchmark before ``fit``);
    * ``rop_window > 0``: logs ``train_loss_window``, the mean training loss of the current
      window of ``rop_window`` steps (the windows align with ``global_step``), for a
      ``ReduceLROnPlateau`` stepped every ``rop_window`` steps;
    * schedule-free optimizers (anything with ``train``/``eval`` methods) are put in train mode
      when training starts and after each validation, in eval mode for each validation.
    """

    bench_configure: Configure | None = None
    rop_window: int = 0
    _window_sum: Tensor | None = None
    _window_count: int = 0

    def configure_optimizers(self) -> Any:
        if self.bench_configure is None:
            return super().configure_optimizers()  # type: ignore[misc]
        return self.bench_configure(self)  # type: ignore[arg-type]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)  # type: ignore[misc]
        if self.rop_window:
            detached = loss.detach()
            self._window_sum = detached if self._window_sum is None else self._window_sum + detached
            self._window_count += 1
            mean = self._window_sum / self._window_count
            self.log("train_loss_window", mean, on_step=True, on_epoch=False, logger=False)  # type: ignore[attr-defined]
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning steps a plateau scheduler after this hook, with the value logged above
        if self.rop_window and self._window_count >= self.rop_window:
            self._window_sum, self._window_count = None, 0

    def _schedule_free_mode(self, mode: Literal["train", "eval"]) -> None:
        for optimizer in self.trainer.optimizers:  # type: ignore[attr-defined]
            switch = getattr(optimizer, mode, None)
            if callable(switch):
                switch()

    def on_train_start(self) -> None:
        self._schedule_free_mode("train")

    def on_validation_epoch_start(self) -> None:
        self._schedule_free_mode("eval")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.training or self.trainer.state.fn == "fit":  # type: ignore[attr-defined]
            self._schedule_free_mode("train")


def one_epoch_loader(dataset: TensorDataset, batch_size: int, steps: int, seed: int) -> DataLoader:
    """``steps`` batches of ``batch_size`` rows, fetched with one tensor index each, in one epoch:
    consecutive random permutations of ``dataset`` (seeded), so no epoch boundary falls inside
    the budget."""
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, num_samples=steps * batch_size, generator=generator)
    return DataLoader(
        dataset, sampler=BatchSampler(sampler, batch_size, drop_last=True), batch_size=None
    )


# ------------------------------------------------------------------------------ task 1: circle


class BenchCircleData(CircleData):
    """:class:`toy_tasks.CircleData` (4096 train / 1024 val points, fixed with ``seed=0``) with the
    batches drawn as one epoch over the budget, in an order seeded by ``order_seed``."""

    def __init__(self, steps: int, order_seed: int, batch_size: int = 64) -> None:
        super().__init__(batch_size=batch_size, seed=0)
        self.steps, self.order_seed = steps, order_seed

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.train = TensorDataset(*circle_points(hp.train_size, hp.distribution, hp.seed))
        self.val = TensorDataset(*circle_points(hp.val_size, hp.distribution, hp.seed + 1))

    def train_dataloader(self) -> DataLoader:
        return one_epoch_loader(self.train, self.hparams.batch_size, self.steps, self.order_seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=len(self.val))


class BenchCircleNet(BenchMixin, CircleNet):
    """:class:`toy_tasks.CircleNet` under the benchmark's optimizer and schedule."""


# ------------------------------------------------------------------------------ task 2: digits


class DigitsAllData(pl.LightningDataModule):
    """All of scikit-learn's 1797 digits: the 1397 of :func:`toy_tasks.digit_splits`'s
    ``upstream`` and ``pool`` parts to train on, its 400 ``val`` digits to validate on (split
    fixed by ``split_seed=0``)."""

    def __init__(self, steps: int, order_seed: int, batch_size: int = 32) -> None:
        super().__init__()
        self.steps, self.order_seed, self.batch_size = steps, order_seed, batch_size

    def setup(self, stage: str) -> None:
        splits = digit_splits(0)
        pixels = torch.cat([splits["upstream"][0], splits["pool"][0]])
        labels = torch.cat([splits["upstream"][1], splits["pool"][1]])
        self.train = TensorDataset(pixels, labels)
        self.val = TensorDataset(*splits["val"])

    def train_dataloader(self) -> DataLoader:
        return one_epoch_loader(self.train, self.batch_size, self.steps, self.order_seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=len(self.val))


class PlainMLPClassifier(pl.LightningModule):
    """``inputs -> hidden -> ReLU -> outputs``; cross-entropy over ``outputs`` classes, or binary
    cross-entropy on one logit when ``outputs == 1`` (labels 0/1). Logs ``val_loss``."""

    def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, labels = batch
        logits = self.net(inputs)
        if self.hparams.outputs == 1:
            return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), labels)
        return nn.functional.cross_entropy(logits, labels)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._loss(batch)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))


class MLPClassifier(BenchMixin, PlainMLPClassifier):
    """:class:`PlainMLPClassifier` under the benchmark's optimizer and schedule (the mixin's hooks
    must come first in the MRO: a ``training_step`` defined on this class would hide its)."""


# ------------------------------------------------------------------------------ tasks 3-4: chars

CHAR_CONTEXT = 32
CHAR_VAL_WINDOWS = 256


class BenchCharData(CharData):
    """:class:`toy_tasks.CharData` with fixed validation windows (``CHAR_VAL_WINDOWS`` windows of
    the last 10% of the corpus, seed 0, one batch) and one epoch of ``steps x batch_size``
    training windows drawn with ``order_seed``."""

    def __init__(self, steps: int, order_seed: int, batch_size: int = 32) -> None:
        super().__init__(context=CHAR_CONTEXT, batch_size=batch_size, seed=order_seed)
        self.steps = steps

    def setup(self, stage: str) -> None:
        hp = self.hparams
        split = int(0.9 * len(self.codes))
        count = self.steps * hp.batch_size
        self.train = CharWindows(self.codes[:split], hp.context, count, hp.seed)
        self.val = CharWindows(self.codes[split:], hp.context, CHAR_VAL_WINDOWS, 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=CHAR_VAL_WINDOWS)


class BenchCharLM(BenchMixin, TinyCharLM):
    """:class:`surgeon.demo.TinyCharLM` under the benchmark's optimizer and schedule."""


# ------------------------------------------------------------------------------ task 5: parity

PARITY_BITS = 30
PARITY_K = 3
PARITY_TRAIN = 50_000
PARITY_VAL = 2048


def parity_points(count: int, seed: int) -> tuple[Tensor, Tensor]:
    """``count`` points of {-1, +1}^PARITY_BITS and labels: 1.0 where the product of the first
    ``PARITY_K`` coordinates is +1, else 0.0."""
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (count, PARITY_BITS), generator=generator).float() * 2 - 1
    return bits, (bits[:, :PARITY_K].prod(dim=1) > 0).float()


class ParityData(pl.LightningDataModule):
    """Sparse parity: ``PARITY_TRAIN`` training points (fixed, seed 0), ``PARITY_VAL`` validation
    points (seed 1), batches of 64 in an order seeded by ``order_seed``."""

    def __init__(self, steps: int, order_seed: int, batch_size: int = 64) -> None:
        super().__init__()
        self.steps, self.order_seed, self.batch_size = steps, order_seed, batch_size

    def setup(self, stage: str) -> None:
        self.train = TensorDataset(*parity_points(PARITY_TRAIN, 0))
        self.val = TensorDataset(*parity_points(PARITY_VAL, 1))

    def train_dataloader(self) -> DataLoader:
        return one_epoch_loader(self.train, self.batch_size, self.steps, self.order_seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=len(self.val))


# ------------------------------------------------------------------------------ the tasks

Built = tuple[pl.LightningModule, pl.LightningDataModule]


@dataclass(frozen=True)
class Task:
    """One benchmark task: what to build for a seed and a budget, and the fixed choices."""

    name: str
    title: str
    steps: int
    """Optimizer steps of a full-mode run."""
    quick_steps: int
    """Optimizer steps in ``--quick`` mode."""
    optimizer: Literal["sgd", "adamw"]
    """SGD with momentum 0.9, or AdamW (betas 0.9/0.999); both with ``weight_decay``."""
    lr: float
    """Peak LR, the same for every contender."""
    weight_decay: float
    build: Callable[[int, int], Built]
    """``build(seed, steps)``: the module (initialised after ``seed_everything(seed)``) and data."""
    why: str
    """Why this optimizer, peak LR and budget (chosen before any result was seen)."""
    cost_ms: float = 1.5
    """Rough CPU milliseconds per step, to start the longest fits first."""

    @property
    def adam_like(self) -> bool:
        return self.optimizer == "adamw"


def build_circle(seed: int, steps: int) -> Built:
    return BenchCircleNet(hidden=16), BenchCircleData(steps, seed)


def build_digits(seed: int, steps: int) -> Built:
    return MLPClassifier(64, 128, 10), DigitsAllData(steps, seed)


def build_char(seed: int, steps: int) -> Built:
    data = BenchCharData(steps, seed)
    model = BenchCharLM(data.vocab_size, context=CHAR_CONTEXT, width=48, layers=2, heads=4)
    return model, data


def build_parity(seed: int, steps: int) -> Built:
    return MLPClassifier(PARITY_BITS, 64, 1), ParityData(steps, seed)


CHAR_LR = 3e-3
"""Task 3's peak LR (the demo's)."""
HOT_LR = 0.1
"""Task 4's peak LR: 10x the best constant LR of the char model (about 1e-2)."""

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="circle",
            title="1. two-layer net on the circle data set (SGD)",
            steps=1000,
            quick_steps=150,
            optimizer="sgd",
            lr=0.1,
            weight_decay=0.0,
            build=build_circle,
            why=(
                "CircleNet's own optimizer as the examples configure it: SGD, momentum 0.9, "
                "LR 0.1 (a standard SGD LR for a small net on inputs of unit scale); 1000 steps "
                "of 64 points, ~16 passes over the 4096 training points"
            ),
        ),
        Task(
            name="digits",
            title="2. MLP on scikit-learn's digits (AdamW)",
            steps=1000,
            quick_steps=150,
            optimizer="adamw",
            lr=1e-3,
            weight_decay=0.01,
            build=build_digits,
            why=(
                "Adam's default LR 1e-3 (Kingma & Ba) with torch AdamW's default weight decay "
                "0.01; 1000 steps of 32, ~23 passes over the 1397 training digits"
            ),
        ),
        Task(
            name="char",
            title="3. char-level transformer on stdlib source (AdamW)",
            steps=400,
            quick_steps=60,
            optimizer="adamw",
            lr=CHAR_LR,
            weight_decay=0.01,
            build=build_char,
            cost_ms=25.0,
            why=(
                "LR 3e-3, the LR surgeon/demo.py trains TinyCharLM with (a usual AdamW LR for a "
                "~70k-parameter transformer; nanoGPT's 10M-parameter char model uses 1e-3), weight "
                "decay 0.01; 400 steps of 32 windows of 32 characters, kept short for CPU time "
                "(~30 ms a step on a shared 2-core machine)"
            ),
        ),
        Task(
            name="char_hot",
            title="4. task 3 with the peak LR 10x too high (AdamW, LR 0.1)",
            steps=400,
            quick_steps=60,
            optimizer="adamw",
            lr=HOT_LR,
            weight_decay=0.01,
            build=build_char,
            cost_ms=25.0,
            why=(
                "task 3 at LR 0.1: 10x the best constant LR of this model (constant-LR check, 600 "
                "steps, seed 0, final val loss: 3e-3 1.588, 1e-2 1.475, 3e-2 1.634, 1e-1 2.097 "
                "with a training-loss spike to 229 at step ~15, 3e-1 2.553). 10x task 3's LR "
                "(3e-2) is only 3x the best and showed no spike or instability at all, so it "
                "could not test what task 4 is for"
            ),
        ),
        Task(
            name="parity",
            title="5. sparse parity (3 of 30 bits), a long plateau at ln 2 (AdamW)",
            steps=2000,
            quick_steps=300,
            optimizer="adamw",
            lr=1e-3,
            weight_decay=0.01,
            build=build_parity,
            why=(
                "Adam's default LR 1e-3, weight decay 0.01, MLP 30 -> 64 -> 1; 2000 steps of "
                "64. Verified with constant LR (3 seeds) before any other contender was run: "
                "the loss sits at ln 2 = 0.693 for 600-1000 steps, then falls to 0.06-0.09"
            ),
        ),
    )
}
"""The benchmark's tasks by name, in the issue's order."""
