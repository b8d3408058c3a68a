"""Shared tiny models and data for the tests: CPU only, deterministic, a fit takes about a second.

* :func:`make_loader`: a fixed linear-regression data set with noise, never shuffled.
* :func:`regressor_class`: a two-layer MLP ``LightningModule`` for either Lightning namespace
  (``pytorch_lightning`` or ``lightning.pytorch``). It records, per ``training_step``, the
  step, the batch, every param group's LR as ``training_step`` sees it and the loss returned;
  ``loss_hook(step, batch_idx, loss)`` replaces the loss it returns (inject spikes or known
  values). With ``manual=True`` it drives one optimizer per layer itself.
* :func:`spike_at`: a ``loss_hook`` for a spike that the next loss confirms.
* :data:`TinyRegressor`: that class for ``pytorch_lightning``.
* the ``make_trainer`` fixture: a quiet ``Trainer`` rooted in ``tmp_path``.
* the ``info_lines`` fixture: the messages sent through Lightning's rank-zero info channel
  (``rank_zero_info``), as a user's console shows them.
"""

import logging
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

IN_FEATURES = 8
LossHook = Callable[[int, int, Tensor], Tensor]


def spike_at(step: int, factor: float = 20.0) -> LossHook:
    """A ``loss_hook`` that multiplies the losses of optimizer steps ``step`` and ``step + 1``
    by ``factor``: a spike that the next loss confirms (the surgeon acts at ``step + 1``)."""

    def hook(global_step: int, batch_idx: int, loss: Tensor) -> Tensor:
        return loss * factor if global_step in (step, step + 1) else loss

    return hook


def make_loader(batches: int = 10, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """``batches`` fixed batches of ``y = x @ w + 0.5 noise`` (``|w| ~ 1``), in one order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, IN_FEATURES, generator=g)
    w = torch.randn(IN_FEATURES, 1, generator=g) / IN_FEATURES**0.5
    y = x @ w + 0.5 * torch.randn(len(x), 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def regressor_class(namespace: ModuleType = pl) -> type:
    """The tiny MLP as a subclass of ``namespace.LightningModule``."""

    class TinyRegressor(namespace.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(
            self,
            lrs: tuple[float, ...] = (0.05,),
            *,
            loss_hook: LossHook | None = None,
            manual: bool = False,
            scheduled: bool = False,
            fused: bool = False,
            seed: int = 0,
        ) -> None:
            """``lrs``: one LR (one group) or one per layer (automatic: param groups of one
            SGD; manual: one SGD per layer). ``scheduled``: a ``StepLR`` on the first optimizer.
            ``fused``: fused SGD (takes GradScaler's ``found_inf``, as the guard uses it)."""
            super().__init__()
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))
            self.lrs = lrs
            self.loss_hook = loss_hook
            self.automatic_optimization = not manual
            self.scheduled = scheduled
            self.fused = fused or None  # None: torch's default implementation
            self.records: list[dict[str, Any]] = []
            """Per training_step: step, batch_idx, lrs (per optimizer, per group), loss."""

        def _param_sets(self) -> list[list[nn.Parameter]]:
            if len(self.lrs) == 1:
                return [list(self.net.parameters())]
            layers = [self.net[0], self.net[2]]
            assert len(self.lrs) == len(layers), "one LR, or one per layer"
            return [list(layer.parameters()) for layer in layers]

        def configure_optimizers(self) -> Any:
            sets = self._param_sets()
            if self.automatic_optimization:
                groups = [{"params": p, "lr": lr} for p, lr in zip(sets, self.lrs, strict=True)]
                optimizers = [
                    torch.optim.SGD(groups, lr=self.lrs[0], momentum=0.9, fused=self.fused)
                ]
            else:
                optimizers = [
                    torch.optim.SGD(p, lr=lr, momentum=0.9, fused=self.fused)
                    for p, lr in zip(sets, self.lrs, strict=True)
                ]
            if not self.scheduled:
                return optimizers
            scheduler = torch.optim.lr_scheduler.StepLR(optimizers[0], step_size=3, gamma=0.5)
            return optimizers, [{"scheduler": scheduler, "interval": "step"}]

        def _optimizers(self) -> list[Any]:
            opts = self.optimizers()
            return list(opts) if isinstance(opts, list | tuple) else [opts]

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            lrs = [[g["lr"] for g in opt.param_groups] for opt in self._optimizers()]
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            if self.loss_hook is not None:
                loss = self.loss_hook(self.global_step, batch_idx, loss)
            self.records.append(
                {"step": self.global_step, "batch_idx": batch_idx, "lrs": lrs, "loss": loss.item()}
            )
            if not self.automatic_optimization:
                opts = self._optimizers()
                self.manual_backward(loss)
                for opt in opts:
                    opt.step()
                    opt.zero_grad()
                if self.scheduled:
                    self.lr_schedulers().step()
            return loss

    return TinyRegressor


TinyRegressor = regressor_class(pl)


@pytest.fixture
def make_trainer(tmp_path: Any) -> Callable[..., Any]:
    """``make_trainer(callbacks, **overrides)``: a quiet CPU Trainer in ``tmp_path``.

    Defaults: no logger, no checkpoints, no progress bar or summary, ``log_every_n_steps=1``;
    ``namespace=`` picks the Lightning package (``pytorch_lightning`` unless given).
    """

    def make(callbacks: list[Any], namespace: ModuleType = pl, **overrides: Any) -> Any:
        kwargs: dict[str, Any] = {
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": tmp_path,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
        }
        kwargs.update(overrides)
        return namespace.Trainer(callbacks=callbacks, **kwargs)

    return make


@pytest.fixture
def info_lines() -> Iterator[list[str]]:
    """Every ``rank_zero_info`` message while the test runs (Lightning logs them on the rank-zero
    logger of one namespace or the other, whichever its pointer names then: a fit points it
    at its Trainer's, so both are watched)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(logging.INFO)
    loggers = [
        logging.getLogger(f"{namespace}.utilities.rank_zero")
        for namespace in ("pytorch_lightning", "lightning.pytorch")
    ]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield lines
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
