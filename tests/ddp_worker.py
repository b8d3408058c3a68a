"""A two-process DDP fit on CPU (gloo) with the surgeon; run by ``tests/test_ddp.py``.

Usage: ``python tests/ddp_worker.py OUT_DIR [--steps N] [--spike-step S] [--spike-rank R]
[--nan-step S] [--batchnorm] [--nan-input-step S] [--max-time SECONDS] [--early-stopping]
[--strategy ddp|ddp_spawn]`` (``--max-time``: the fit ends by time, not steps;
``--early-stopping``: an ``EarlyStopping`` on a scripted val_loss that differs between the
ranks; ``--strategy ddp_spawn``: Lightning pickles the callbacks into two new processes).
Needs ``MASTER_ADDR``/``MASTER_PORT`` in the environment and ``surgeon`` importable.

Lightning's ``ddp`` strategy re-runs this script for rank 1 (``_SubprocessScriptLauncher``),
so both ranks execute everything below. Each rank sees its own half of the data
(``DistributedSampler``), so the local losses differ; at ``--spike-step`` and the step after
it (which confirms the spike) the loss of ``--spike-rank`` alone is multiplied by
``--spike-factor``, and at ``--nan-step`` the loss
of that rank alone is multiplied by NaN; with ``--batchnorm`` the model has a BatchNorm layer,
and at ``--nan-input-step`` one input value of that rank alone is NaN (its running statistics
go NaN in the forward pass). Each rank writes ``OUT_DIR/rank{r}.json`` at the end of its fit:

* ``lrs``: ``[step, lr]`` per ``training_step``, the LR read inside ``training_step``;
* ``losses``: ``[step, loss]``, the rank's *local* loss (before DDP averaging);
* ``events``: ``[step, kind]`` of every surgeon decision, in order; ``reasons``: their reasons;
* ``controller``: the controller's ``state_dict()`` at the end, as JSON text
  (``sort_keys``; compared as text so NaN and the float repr are compared exactly);
* ``collectives``: ``[hook, global_step, [[name, numel], ...]]`` for every per-step hook call
  of the surgeon that called a ``torch.distributed`` collective (see :class:`CountingSurgeon`;
  ``numel``: the size of the tensor it was given);
* ``weights``: the final parameters, flattened; ``nan_step_changed_weights``: whether the
  parameters at the start of ``--nan-step + 1`` differ from those at the start of
  ``--nan-step`` (the guard must have skipped that update);
* ``buffers_finite``: whether every floating-point buffer is finite at the end;
  ``eval_loss``: the mean squared error of the final model over the whole data set, in eval
  mode.
"""

import argparse
import functools
import gc
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import EarlyStopping
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from surgeon import ScheduleSurgeon

FEATURES = 8
COLLECTIVES = (
    "all_reduce",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "all_gather",
    "all_gather_object",
    "reduce",
    "gather",
    "scatter",
    "reduce_scatter",
)


@contextmanager
def count_collectives() -> Iterator[list[list[Any]]]:
    """Yield a list that fills with ``[name, numel]`` for each ``torch.distributed`` collective
    called (``numel``: of its tensor argument, ``None`` without one)."""
    seen: list[list[Any]] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counted(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tensor = args[0] if args and isinstance(args[0], Tensor) else None
            seen.append([name, None if tensor is None else tensor.numel()])
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, counted(name, fn))
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


class CountingSurgeon(ScheduleSurgeon):
    """``ScheduleSurgeon`` that records the collectives its per-step hooks call."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.collectives: list[list[Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        with count_collectives() as seen:
            super().on_train_batch_start(trainer, *args)
        if seen:
            self.collectives.append(["start", trainer.global_step, seen])

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        with count_collectives() as seen:
            super().on_train_batch_end(trainer, *args)
        if seen:
            self.collectives.append(["end", trainer.global_step, seen])

    def on_before_backward(self, trainer: pl.Trainer, *args: Any) -> None:
        with count_collectives() as seen:
            super().on_before_backward(trainer, *args)
        if seen:
            self.collectives.append(["before_backward", trainer.global_step, seen])

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        with count_collectives() as seen:
            super().on_before_optimizer_step(trainer, *args)
        if seen:
            self.collectives.append(["before_optimizer_step", trainer.global_step, seen])


class Regressor(pl.LightningModule):
    """A two-layer MLP on a fixed linear-regression task, recording the LR it trains with."""

    def __init__(
        self,
        spike_step: int,
        spike_rank: int,
        spike_factor: float,
        nan_step: int,
        batchnorm: bool = False,
        nan_input_step: int = -1,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        norm = [nn.BatchNorm1d(16)] if batchnorm else []
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), *norm, nn.Tanh(), nn.Linear(16, 1))
        self.spike_step, self.spike_rank, self.spike_factor = spike_step, spike_rank, spike_factor
        self.nan_step = nan_step
        self.nan_input_step = nan_input_step
        self.around_nan: list[Tensor] = []  # weights at the start of nan_step and the step after
        self.lrs: list[list[float]] = []
        self.losses: list[Tensor] = []

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step in (self.nan_step, self.nan_step + 1):
            self.around_nan.append(torch.cat([p.detach().flatten() for p in self.parameters()]))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.lrs.append([self.global_step, self.optimizers().param_groups[0]["lr"]])
        x, y = batch
        if self.global_step == self.nan_input_step and self.global_rank == self.spike_rank:
            x = x.clone()
            x[0, 0] = float("nan")
        loss = nn.functional.mse_loss(self.net(x), y)
        spiked = self.global_step in (self.spike_step, self.spike_step + 1)
        if spiked and self.global_rank == self.spike_rank:
            loss = loss * self.spike_factor
        if self.global_step == self.nan_step and self.global_rank == self.spike_rank:
            loss = loss * float("nan")
        self.losses.append(loss.detach())
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        pass  # the monitored value is scripted per rank (on_validation_epoch_end)

    def on_validation_epoch_end(self) -> None:
        """``--early-stopping``: rank 0's val_loss stops improving after epoch 2, rank 1's keeps
        improving, logged unsynced: the ranks' EarlyStopping wait counts differ."""
        epoch = self.current_epoch
        value = max(1.0, 3.0 - epoch) if self.global_rank == 0 else 3.0 - 0.1 * epoch
        self.log("val_loss", value, sync_dist=False)


def make_loader(batches: int, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, FEATURES, generator=g)
    w = torch.randn(FEATURES, 1, generator=g) / FEATURES**0.5
    y = x @ w + 0.5 * torch.randn(len(x), 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class RecordAtFitEnd(pl.Callback):
    """Writes the rank's record at the end of the fit, in the process that trained (under
    ``ddp_spawn`` the launching process gets back the weights only, not the callbacks' state)."""

    def __init__(self, surgeon: CountingSurgeon, out_dir: Path) -> None:
        self.surgeon, self.out_dir = surgeon, out_dir

    def on_fit_end(self, trainer: pl.Trainer, model: "Regressor") -> None:  # type: ignore[override]
        surgeon = self.surgeon
        data = make_loader(batches=32)
        model.eval()
        with torch.no_grad():
            x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
            eval_loss = nn.functional.mse_loss(model.net(x), y).item()

        assert surgeon.controller is not None
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "steps": surgeon.step,
            "lrs": model.lrs,
            "losses": [
                [step, loss.item()] for (step, _), loss in zip(model.lrs, model.losses, strict=True)
            ],
            "events": [[event.step, event.kind.value] for event in surgeon.events],
            "reasons": [event.reason for event in surgeon.events],
            "collectives": surgeon.collectives,
            "weights": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
            "nan_step_changed_weights": (
                len(model.around_nan) == 2 and not torch.equal(*model.around_nan)
            ),
            "controller": json.dumps(surgeon.controller.state_dict(), sort_keys=True),
            "buffers_finite": all(
                bool(torch.isfinite(b).all()) for b in model.buffers() if b.is_floating_point()
            ),
            "eval_loss": eval_loss,
        }
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--spike-step", type=int, default=40)
    parser.add_argument("--spike-rank", type=int, default=1)
    parser.add_argument("--spike-factor", type=float, default=20.0)
    parser.add_argument("--nan-step", type=int, default=-1)
    parser.add_argument("--readback-every", type=int, default=4)
    parser.add_argument("--batchnorm", action="store_true")
    parser.add_argument("--nan-input-step", type=int, default=-1)
    parser.add_argument("--max-time", type=float, default=0.0)
    parser.add_argument("--early-stopping", action="store_true")
    parser.add_argument("--strategy", choices=("ddp", "ddp_spawn"), default="ddp")
    args = parser.parse_args()

    surgeon = CountingSurgeon(readback_every=args.readback_every, log_dir=args.out_dir)
    model = Regressor(
        args.spike_step,
        args.spike_rank,
        args.spike_factor,
        args.nan_step,
        args.batchnorm,
        args.nan_input_step,
    )
    trainer = pl.Trainer(
        strategy=args.strategy,
        accelerator="cpu",
        devices=2,
        max_steps=-1 if args.max_time else args.steps,
        max_time={"seconds": args.max_time} if args.max_time else None,
        callbacks=[surgeon, RecordAtFitEnd(surgeon, args.out_dir)]
        + ([EarlyStopping(monitor="val_loss", patience=3)] if args.early_stopping else []),
        default_root_dir=args.out_dir,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    val = make_loader(batches=2) if args.early_stopping else None
    trainer.fit(model, make_loader(batches=32), val_dataloaders=val)


def exit_cleanly() -> None:
    """Leave without the interpreter's teardown: free the DDP reducer, wait for both ranks,
    close the group, then exit at once (gloo's threads aborted the process at interpreter exit
    now and then, "terminate called without an active exception", after a fit that passed)."""
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    exit_cleanly()
