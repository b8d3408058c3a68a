"""The one place where loss tensors become Python floats.

Per optimizer step the callback hands the feed the (detached) micro-batch losses
with :meth:`LossFeed.add` and closes the step with :meth:`LossFeed.close_step`.
Every ``readback_every`` closed steps the feed stacks the block of losses on
their device, averages it across ranks with one small collective (``reduce``),
and starts a non-blocking copy to host memory. The block is handed back as
floats when the *next* block closes, so a float is read ``readback_every`` to
``2 * readback_every - 1`` steps after its step ended: by then the copy has long
finished and reading it stalls nothing. The lag is the same on every device, so
CPU and GPU runs make identical decisions.

The same block carries the AMP loss scale of each step (when a GradScaler is
in use): a scale lower than the step before means GradScaler skipped that
optimizer step, and the caller does not count it. A step that produced no loss
(``training_step`` returned ``None``, Lightning's way to skip a batch) carries a
NaN scale and is not counted either. It also carries the
:class:`~surgeon.guard.NonFiniteGuard`'s flag of each step (when the guard acts):
the update of that step was not applied.
"""

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from surgeon._validate import check_positive_int

Reduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class StepLoss:
    """The mean loss of one optimizer step; whether the step is not to be counted (GradScaler
    skipped it, or it had no loss); whether the guard kept its update from being applied."""

    loss: float
    skipped: bool = False
    update_skipped: bool = False


class _Block:
    """One block of steps in flight from device to host.

    ``values`` is 1-D: the ``n`` losses, then their ``n`` loss scales when ``scaled``, then
    their ``n`` guard flags when ``flagged`` (one flat tensor: the cheapest to stack, reduce
    and copy).
    """

    def __init__(self, values: Tensor, scaled: bool, flagged: bool = False) -> None:
        self.scaled = scaled
        self.flagged = flagged
        if values.device.type == "cuda":
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.done: torch.cuda.Event | None = torch.cuda.Event()
            self.done.record()
        else:
            self.host, self.done = values, None

    def read(self) -> list[tuple[float, float, float]]:
        """``(loss, scale, flag)`` per step; scale 1.0 without a GradScaler, flag 0.0 unguarded."""
        if self.done is not None:
            self.done.synchronize()
        values = self.host.tolist()
        n = len(values) // (1 + self.scaled + self.flagged)
        losses = values[:n]
        scales = values[n : 2 * n] if self.scaled else [1.0] * n
        flags = values[len(values) - n :] if self.flagged else [0.0] * n
        return list(zip(losses, scales, flags, strict=True))

    @classmethod
    def from_rows(cls, rows: list[list[float]]) -> "_Block":
        """A block on the CPU from ``[[loss, scale, flag], ...]`` (a checkpoint's form; rows of
        older checkpoints have no flag)."""
        rows = [[*row, 0.0][:3] for row in rows]
        columns = [v for column in zip(*rows, strict=True) for v in column]
        return cls(torch.tensor(columns), scaled=True, flagged=True)


class LossFeed:
    """Collects per-step losses on device and returns them as floats, late and in blocks."""

    def __init__(self, readback_every: int = 4, reduce: Reduce | None = None) -> None:
        check_positive_int("readback_every", readback_every)
        self.readback_every = readback_every
        self.reduce = reduce
        self._micro: Tensor | None = None
        self._device: torch.device | None = None  # of the last loss added
        # per closed step: its loss, its loss scale (None: no GradScaler), its guard flag (None:
        # not guarded)
        self._rows: list[tuple[Tensor, Tensor | None, Tensor | None]] = []
        self._in_flight: deque[_Block] = deque()
        self._last_scale = -math.inf  # no step before the first: nothing to compare with

    def add(self, loss: Tensor) -> None:
        """Add one micro-batch loss (already divided by the accumulation count)."""
        if loss.requires_grad:  # Lightning's outputs["loss"] is detached already
            loss = loss.detach()
        self._device = loss.device
        self._micro = loss if self._micro is None else self._micro + loss

    def close_step(
        self, loss_scale: Tensor | None = None, update_skipped: Tensor | None = None
    ) -> list[StepLoss]:
        """End the current optimizer step; return the steps whose readback is now due.

        ``update_skipped``: the guard's flag for this step (a 1-element tensor, 1.0: the
        update was not applied). Per step this only keeps references (and copies the scale,
        which GradScaler updates in place); the tensor work happens once per block, in
        :meth:`_stack`.
        """
        loss = self._micro
        if loss is None:  # no loss this step (training_step returned None): a NaN scale marks it
            loss = torch.full((), math.nan, device=self._device)
            loss_scale = torch.full((1,), math.nan, device=self._device)
        self._micro = None
        scale = None if loss_scale is None else loss_scale.clone()
        self._rows.append((loss, scale, update_skipped))
        if len(self._rows) < self.readback_every:
            return []
        values, scaled, flagged = self._stack()
        self._rows = []
        if self.reduce is not None:
            values = self.reduce(values)
        self._in_flight.append(_Block(values, scaled, flagged))
        return self._read(self._in_flight.popleft()) if len(self._in_flight) > 1 else []

    def _stack(self) -> tuple[Tensor, bool, bool]:
        """The open rows as one flat float32 tensor on one device (see :class:`_Block`)."""
        device = self._device if self._device is not None else self._rows[-1][0].device
        losses = [row[0] if row[0].device == device else row[0].to(device) for row in self._rows]
        parts = [torch.stack([p if p.dim() == 0 else p.reshape(()) for p in losses]).float()]
        present = []
        for column, default in ((1, 1.0), (2, 0.0)):
            if all(row[column] is None for row in self._rows):
                present.append(False)
                continue
            present.append(True)
            filled = [
                torch.full((1,), default, device=device) if row[column] is None else row[column]
                for row in self._rows
            ]
            parts.append(  # one value per step (GradScaler's scale is 0-d on CPU, (1,) on CUDA)
                torch.cat([t.to(device).reshape(1) for t in filled]).float()
            )
        return torch.cat(parts) if len(parts) > 1 else parts[0], present[0], present[1]

    def _read(self, block: _Block) -> list[StepLoss]:
        out = []
        for loss, scale, flag in block.read():
            if math.isnan(scale):  # a step without a loss (on some rank): not counted
                out.append(StepLoss(loss, skipped=True))
                continue
            skipped = scale < self._last_scale
            out.append(StepLoss(loss, skipped=skipped, update_skipped=flag > 0 and not skipped))
            self._last_scale = scale
        return out

    def state_dict(self) -> dict[str, Any]:
        """Losses not yet handed out (read now: checkpoints are rare), so a resume loses none."""
        return {
            "in_flight": [[list(row) for row in block.read()] for block in self._in_flight],
            "rows": [list(row) for row in _Block(*self._stack()).read()] if self._rows else [],
            "last_scale": self._last_scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (as CPU tensors; moved on next use)."""
        self._micro = None
        self._in_flight = deque(_Block.from_rows(rows) for rows in state["in_flight"])
        self._rows = [
            (torch.tensor(row[0]), torch.tensor([row[1]]), torch.tensor([([*row, 0.0])[2]]))
            for row in state["rows"]
        ]
        self._last_scale = state["last_scale"]
