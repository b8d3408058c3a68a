"""The demo: a tiny character-level transformer trained on Python's own standard library.

No download: the corpus is a fixed list of standard-library source files. The
run uses ``ScheduleSurgeon()`` with its defaults, injects an ``outlier`` (one batch whose
loss reads ``spike_factor`` x, its gradient its own: a hard batch that does no damage, so
the next loss is normal and nothing is done) and two bad batches in a row (loss and
gradients x ``spike_factor``: a ``spike`` the second confirms, rolled back, the LR cut and
recovered), prints the controller's events, and writes ``metrics.csv``,
``events.jsonl`` and a PNG of loss and LR. On a CUDA machine it uses the GPU.
"""

import math
import sysconfig
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from surgeon.callback import ScheduleSurgeon

CORPUS_FILES = (
    "argparse.py",
    "dataclasses.py",
    "functools.py",
    "json/decoder.py",
    "json/encoder.py",
    "textwrap.py",
    "pathlib.py",
    "enum.py",
)
"""Standard-library sources that make the corpus (those missing in a Python are skipped)."""


def stdlib_text(files: tuple[str, ...] = CORPUS_FILES) -> str:
    """The concatenated sources of ``files`` from this interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [(root / name).read_text(encoding="utf-8") for name in files if (root / name).exists()]
    if not parts:
        raise FileNotFoundError(f"none of {files} found under {root}")
    return "\n".join(parts)


class CharWindows(Dataset):
    """``count`` random windows of ``context + 1`` characters (input and shifted target)."""

    def __init__(self, codes: Tensor, context: int, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.codes, self.context = codes, context
        self.starts = torch.randint(0, len(codes) - context - 1, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = int(self.starts[index])
        chunk = self.codes[start : start + self.context + 1]
        return chunk[:-1], chunk[1:]


def encode(text: str) -> tuple[Tensor, list[str]]:
    """Character codes of ``text`` and the vocabulary (sorted characters)."""
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long), vocab


def spiked(step: int, spike_at: int | None) -> bool:
    """Whether step ``step`` gets a bad batch for a spike at ``spike_at``: that step and the
    next, a spike that the next loss confirms (one bad batch alone is an ``outlier``)."""
    return spike_at is not None and spike_at <= step <= spike_at + 1


class TinyCharLM(pl.LightningModule):
    """A small causal transformer over characters; ``spike_at`` injects two bad batches in a
    row (:func:`spiked`), ``outlier_at`` one loss reading ``spike_factor`` x (its gradient its
    own)."""

    causal_mask: Tensor  # a buffer

    def __init__(
        self,
        vocab_size: int,
        context: int = 64,
        width: int = 64,
        layers: int = 2,
        heads: int = 4,
        lr: float = 3e-3,
        spike_at: int | None = None,
        spike_factor: float = 20.0,
        outlier_at: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab_size)
        mask = torch.triu(torch.full((context, context), -math.inf), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, codes: Tensor) -> Tensor:
        n = codes.shape[1]
        h = self.embed(codes) + self.position[:n]
        return self.head(self.blocks(h, mask=self.causal_mask[:n, :n], is_causal=True))

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        logits = self(inputs)
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        step = self.global_step
        if spiked(step, self.hparams["spike_at"]):  # bad batches: loss and gradients x factor
            loss = loss * self.hparams["spike_factor"]
        elif step == self.hparams["outlier_at"]:  # the loss reads x factor, its gradient its own
            loss = loss + (self.hparams["spike_factor"] - 1.0) * loss.detach()
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=0.01)


def run_demo(
    out_dir: Path = Path("runs/demo"),
    steps: int = 600,
    spike_at: int | None = 400,
    outlier_at: int | None = 250,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[ScheduleSurgeon, Path]:
    """Train the demo model with the surgeon; return the callback and the run's log directory."""
    pl.seed_everything(seed, verbose=False)
    codes, vocab = encode(stdlib_text())
    split = int(0.9 * len(codes))
    context = 64
    train = CharWindows(codes[:split], context, steps * batch_size, seed)
    val = CharWindows(codes[split:], context, 8 * batch_size, seed + 1)
    model = TinyCharLM(len(vocab), context=context, spike_at=spike_at, outlier_at=outlier_at)
    surgeon = ScheduleSurgeon()
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[surgeon],
        logger=pl.loggers.CSVLogger(out_dir, name="", version=""),
        log_every_n_steps=5,
        val_check_interval=max(1, steps // 4),
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="auto",
        devices=1,
    )
    trainer.fit(
        model,
        DataLoader(train, batch_size=batch_size, shuffle=False),
        DataLoader(val, batch_size=batch_size),
    )
    return surgeon, Path(trainer.log_dir or out_dir)
