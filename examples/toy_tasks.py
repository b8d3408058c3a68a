"""Models and data modules of the examples, shared with ``configs/*.yaml`` and the tests.

Importable as ``toy_tasks`` when ``examples/`` is on ``sys.path``; ``python examples/x.py``
puts it there, and that is how the configs name the classes
(``class_path: toy_tasks.CircleNet``). Nothing is downloaded: the circle points are
generated, the characters are this Python's standard library (``surgeon.demo``), the
digits ship with scikit-learn.

* circle: :class:`CircleData`, :class:`CircleNet` (a two-layer network; is a 2-D point
  inside the circle of radius sqrt(1.5)?);
* characters: :class:`CharData` around ``surgeon.demo``'s corpus and windows (the model is
  ``surgeon.demo.TinyCharLM``);
* digits: :class:`DigitsData`, :class:`DigitsFinetuner` (an MLP backbone pretrained on 1000
  digits, fine-tuned with a new head on 100 others: two param groups, backbone frozen at
  first);
* what the example scripts share: :func:`preset` (a ``ScheduleSurgeon`` from
  ``configs/presets``), :func:`add_run_args`, :func:`make_trainer`, :func:`print_events`,
  :func:`show_logs`.
"""

import argparse
import logging
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from surgeon import ScheduleSurgeon
from surgeon.demo import CharWindows, encode, spiked, stdlib_text

log = logging.getLogger("toy_tasks")

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "presets"


# ------------------------------------------------------------------------------ shared


def preset(name: str) -> ScheduleSurgeon:
    """The ``ScheduleSurgeon`` that ``configs/presets/<name>.yaml`` configures; ``"defaults"``:
    ``ScheduleSurgeon()``."""
    if name == "defaults":
        return ScheduleSurgeon()
    path = PRESETS / f"{name}.yaml"
    if not path.exists():
        names = ["defaults", *sorted(p.stem for p in PRESETS.glob("*.yaml"))]
        raise ValueError(f"no preset {name!r}; presets: {', '.join(names)}")
    (callback,) = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
    if not callback["class_path"].endswith("ScheduleSurgeon"):
        raise ValueError(f"{path}: the callback is {callback['class_path']}, not ScheduleSurgeon")
    return ScheduleSurgeon(**callback.get("init_args", {}))


def add_run_args(
    parser: argparse.ArgumentParser, *, steps: int, preset_name: str, out: str
) -> None:
    """The options every example script has: --steps, --spike-at, --preset, --out, --seed."""
    parser.add_argument("--steps", type=int, default=steps, help=f"optimizer steps ({steps})")
    parser.add_argument(
        "--spike-at",
        type=int,
        default=None,
        help="make the batches of this step and the next 20x worse (the second confirms the spike)",
    )
    parser.add_argument(
        "--preset",
        default=preset_name,
        help=f"'defaults' or a configs/presets/NAME.yaml name ({preset_name})",
    )
    parser.add_argument("--out", type=Path, default=Path(out), help=f"log directory ({out})")
    parser.add_argument("--seed", type=int, default=0)


def make_trainer(
    out_dir: Path, steps: int, surgeon: ScheduleSurgeon, **overrides: Any
) -> pl.Trainer:
    """A ``max_steps`` Trainer that logs to ``out_dir/version_N/`` (``surgeon plot`` reads it)."""
    kwargs: dict[str, Any] = {
        "max_steps": steps,
        "callbacks": [surgeon],
        "logger": pl.loggers.CSVLogger(out_dir, name=""),
        "log_every_n_steps": 5,
        "val_check_interval": max(1, steps // 4),
        "check_val_every_n_epoch": None,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "accelerator": "auto",
        "devices": 1,
    }
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def print_events(surgeon: ScheduleSurgeon, log_dir: Path) -> None:
    """The surgeon's decisions, and where the run's files are."""
    print(f"\nScheduleSurgeon events ({len(surgeon.events)}), final phase {surgeon.phase.value}:")
    for event in surgeon.events:
        print(f"  step {event.step:>5}  {event.kind.value:<11} {event.reason}")
    print(f"metrics.csv and events.jsonl in {log_dir}; plot them with: surgeon plot {log_dir}")


def show_logs() -> None:
    """Print the surgeon's decisions (and this module's notes) as they happen."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    for name in ("surgeon", "toy_tasks"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(handler)


# ------------------------------------------------------------------------------ circle

CIRCLE_RADIUS_SQUARED = 1.5


def circle_points(
    count: int, distribution: Literal["uniform", "gaussian"], seed: int
) -> tuple[Tensor, Tensor]:
    """``count`` points (uniform in [-2, 2]^2 or standard normal) and their labels:
    1.0 inside the circle ``x^2 + y^2 < 1.5``, else 0.0."""
    generator = torch.Generator().manual_seed(seed)
    if distribution == "uniform":
        points = 4.0 * torch.rand(count, 2, generator=generator) - 2.0
    elif distribution == "gaussian":
        points = torch.randn(count, 2, generator=generator)
    else:
        raise ValueError(f"distribution must be 'uniform' or 'gaussian', got {distribution!r}")
    labels = (points.square().sum(dim=1) < CIRCLE_RADIUS_SQUARED).float()
    return points, labels


class CircleData(pl.LightningDataModule):
    """The circle data set: a fixed training and validation sample of labelled points."""

    def __init__(
        self,
        train_size: int = 4096,
        val_size: int = 1024,
        batch_size: int = 64,
        distribution: Literal["uniform", "gaussian"] = "uniform",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.train = TensorDataset(*circle_points(hp.train_size, hp.distribution, hp.seed))
        self.val = TensorDataset(*circle_points(hp.val_size, hp.distribution, hp.seed + 1))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=1024)


class CircleNet(pl.LightningModule):
    """Two layers, ``2 -> hidden -> 1`` with a ReLU between, trained with SGD + momentum."""

    def __init__(
        self,
        hidden: int = 16,
        lr: float = 0.1,
        momentum: float = 0.9,
        spike_at: int | None = None,
        spike_factor: float = 20.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, points: Tensor) -> Tensor:
        return self.net(points).squeeze(-1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        points, labels = batch
        loss = nn.functional.binary_cross_entropy_with_logits(self(points), labels)
        if spiked(self.global_step, self.hparams.spike_at):  # bad batches, to show a spike
            loss = loss * self.hparams.spike_factor
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        points, labels = batch
        logits = self(points)
        self.log("val_loss", nn.functional.binary_cross_entropy_with_logits(logits, labels))
        self.log("val_acc", ((logits > 0).float() == labels).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum)


# ------------------------------------------------------------------------------ characters


class CharData(pl.LightningDataModule):
    """Random ``context``-character windows of the standard-library corpus of ``surgeon.demo``:
    the first 90% for training, the rest for validation. ``vocab_size`` is known on init (the
    CLI links it into the model's ``vocab_size``)."""

    def __init__(
        self,
        context: int = 64,
        batch_size: int = 32,
        train_windows: int = 64_000,
        val_windows: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.codes, self.vocab = encode(stdlib_text())
        self.vocab_size = len(self.vocab)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        split = int(0.9 * len(self.codes))
        self.train = CharWindows(self.codes[:split], hp.context, hp.train_windows, hp.seed)
        self.val = CharWindows(self.codes[split:], hp.context, hp.val_windows, hp.seed + 1)

    def train_dataloader(self) -> DataLoader:
        # the windows are drawn at random already; shuffle=False keeps the order seed-fixed
        return DataLoader(self.train, batch_size=self.hparams.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.hparams.batch_size)


# ------------------------------------------------------------------------------ digits

UPSTREAM_DIGITS = 1000
"""Digits the backbone is pretrained on; the fine-tuning task draws from the other 797."""
DIGITS_VAL = 400
"""Held-out digits the fine-tuning is validated on."""


def digit_splits(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's 1797 8x8 digits (flat pixels in [0, 1], labels 0-9), shuffled with
    ``seed`` and split: ``upstream`` (1000, for pretraining), ``pool`` (397, the fine-tuning
    training data is drawn from it) and ``val`` (400)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = torch.tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    parts = order[:UPSTREAM_DIGITS], order[UPSTREAM_DIGITS:-DIGITS_VAL], order[-DIGITS_VAL:]
    return {
        name: (pixels[part], labels[part])
        for name, part in zip(("upstream", "pool", "val"), parts, strict=True)
    }


class DigitsData(pl.LightningDataModule):
    """The fine-tuning task: classify digits from ``train_size`` labelled examples (the
    few-shot end of fine-tuning), none of them seen in pretraining; validated on 400 others."""

    def __init__(self, train_size: int = 100, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        splits = digit_splits(self.hparams.seed)
        pixels, labels = splits["pool"]
        if not 0 < self.hparams.train_size <= len(labels):
            raise ValueError(
                f"train_size must be in [1, {len(labels)}], got {self.hparams.train_size}"
            )
        size = self.hparams.train_size
        self.train = TensorDataset(pixels[:size], labels[:size])
        self.val = TensorDataset(*splits["val"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=len(self.val))


class DigitsFinetuner(pl.LightningModule):
    """An MLP backbone pretrained on 1000 digits, fine-tuned with a fresh head on a few others.

    ``setup`` pretrains the backbone for ``pretrain_steps`` Adam steps on the upstream digits
    (a plain loop standing in for loading a pretrained checkpoint). The optimizer has two
    named param groups, ``backbone`` at ``backbone_lr`` and ``head`` at ``head_lr``; the
    backbone is frozen (``requires_grad=False``) for the first ``freeze_steps`` optimizer steps
    (the new head learns on fixed features first) and trained from then on. Logged per step:
    ``backbone_shift``, the L2 distance of the backbone's weights from where the fine-tuning
    started (0 while frozen), and ``backbone_frozen``. ``spike_at``: the step whose loss and
    the next one's are multiplied by ``spike_factor``.
    """

    def __init__(
        self,
        hidden: int = 64,
        head_lr: float = 1e-2,
        backbone_lr: float = 1e-3,
        weight_decay: float = 0.01,
        freeze_steps: int = 60,
        pretrain_steps: int = 300,
        seed: int = 0,
        spike_at: int | None = None,
        spike_factor: float = 20.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, 10)
        self.backbone_frozen = False
        self.unfrozen_at: int | None = None
        self._start: list[Tensor] = []

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.pretrain_steps:
            self._pretrain_backbone()

    def _pretrain_backbone(self) -> None:
        pixels, labels = digit_splits(self.hparams.seed)["upstream"]
        head = nn.Linear(self.hparams.hidden, 10)
        params = [*self.backbone.parameters(), *head.parameters()]
        optimizer = torch.optim.Adam(params, lr=3e-3)
        generator = torch.Generator().manual_seed(self.hparams.seed)
        for _ in range(self.hparams.pretrain_steps):
            batch = torch.randint(0, len(labels), (64,), generator=generator)
            loss = nn.functional.cross_entropy(head(self.backbone(pixels[batch])), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (head(self.backbone(pixels)).argmax(1) == labels).float().mean()
        log.info("pretrained the backbone on %d digits: accuracy %.3f", len(labels), accuracy)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.backbone(pixels))

    def on_train_start(self) -> None:
        self._start = [p.detach().clone() for p in self.backbone.parameters()]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        frozen = self.global_step < self.hparams.freeze_steps
        if frozen != self.backbone_frozen:
            self.backbone.requires_grad_(not frozen)
            self.backbone_frozen = frozen
            if not frozen:
                self.unfrozen_at = self.global_step
                log.info("step %d: backbone unfrozen", self.global_step)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        pixels, labels = batch
        loss = nn.functional.cross_entropy(self(pixels), labels)
        if spiked(self.global_step, self.hparams.spike_at):  # bad batches, to show a spike
            loss = loss * self.hparams.spike_factor
        moved = zip(self.backbone.parameters(), self._start, strict=True)
        shift = torch.stack([(p.detach() - p0).square().sum() for p, p0 in moved]).sum().sqrt()
        self.log("backbone_shift", shift)
        self.log("backbone_frozen", float(self.backbone_frozen))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        pixels, labels = batch
        logits = self(pixels)
        self.log("val_loss", nn.functional.cross_entropy(logits, labels))
        self.log("val_acc", (logits.argmax(1) == labels).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        groups = [
            {"params": self.backbone.parameters(), "lr": hp.backbone_lr, "name": "backbone"},
            {"params": self.head.parameters(), "lr": hp.head_lr, "name": "head"},
        ]
        return torch.optim.AdamW(groups, weight_decay=hp.weight_decay)
