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
optimizer step, and the caller does not count it.
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
    """The mean loss of one optimizer step, and whether GradScaler skipped that step."""

    loss: float
    skipped: bool = False


class _Block:
    """One block of steps in flight from device to host."""

    def __init__(self, values: Tensor) -> None:
        if values.device.type == "cuda":
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.done: torch.cuda.Event | None = torch.cuda.Event()
            self.done.record()
        else:
            self.host, self.done = values, None

    def read(self) -> list[list[float]]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


class LossFeed:
    """Collects per-step losses on device and returns them as floats, late and in blocks."""

    def __init__(self, readback_every: int = 4, reduce: Reduce | None = None) -> None:
        check_positive_int("readback_every", readback_every)
        self.readback_every = readback_every
        self.reduce = reduce
        self._micro: Tensor | None = None
        self._rows: list[Tensor] = []
        self._in_flight: deque[_Block] = deque()
        self._last_scale = -math.inf  # no step before the first: nothing to compare with

    def add(self, loss: Tensor) -> None:
        """Add one micro-batch loss (already divided by the accumulation count)."""
        loss = loss.detach()
        self._micro = loss if self._micro is None else self._micro + loss

    def close_step(self, loss_scale: Tensor | None = None) -> list[StepLoss]:
        """End the current optimizer step; return the steps whose readback is now due."""
        loss = self._micro if self._micro is not None else torch.tensor(math.nan)
        self._micro = None
        scale = loss_scale if loss_scale is not None else torch.ones((), device=loss.device)
        row = torch.stack([loss.float().reshape(()), scale.to(loss.device).float().reshape(())])
        self._rows.append(row)
        if len(self._rows) < self.readback_every:
            return []
        block = torch.stack([r.to(row.device) for r in self._rows])
        self._rows = []
        if self.reduce is not None:
            block = self.reduce(block)
        self._in_flight.append(_Block(block))
        return self._read(self._in_flight.popleft()) if len(self._in_flight) > 1 else []

    def _read(self, block: _Block) -> list[StepLoss]:
        out = []
        for loss, scale in block.read():
            out.append(StepLoss(loss, skipped=scale < self._last_scale))
            self._last_scale = scale
        return out

    def state_dict(self) -> dict[str, Any]:
        """Losses not yet handed out (read now: checkpoints are rare), so a resume loses none."""
        return {
            "in_flight": [block.read() for block in self._in_flight],
            "rows": [row.tolist() for row in self._rows],
            "last_scale": self._last_scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (as CPU tensors; moved on next use)."""
        self._micro = None
        self._in_flight = deque(_Block(torch.tensor(b)) for b in state["in_flight"])
        self._rows = [torch.tensor(row) for row in state["rows"]]
        self._last_scale = state["last_scale"]
