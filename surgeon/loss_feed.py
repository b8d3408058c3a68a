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
optimizer step. When the loss itself is finite and the scale was above 1, that was an
overflow of the scaled gradients (GradScaler calibrating its scale): handed out as
``skipped``, which the caller counts without its loss (the plan moves on, no detector sees
it); when the loss is NaN/inf, or the scale was already at most 1 (the gradients
overflow unscaled: they are non-finite, and the scale would collapse towards 0), it is
handed out like a step the guard skipped (counted, ``update_skipped``), so the controller
records it and reacts. A step that produced no loss
(``training_step`` returned ``None``, Lightning's way to skip a batch) carries a
NaN scale and is handed out as ``skipped`` too. It also carries the
:class:`~surgeon.guard.NonFiniteGuard`'s flag of each step (when the guard acts):
the update of that step was not applied; and a flag per step set when the module's buffers
hold a NaN/inf after it (``buffers_nonfinite``: averaged across ranks like the rest, so a
non-zero value on any rank is seen by all).
"""

import math
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from surgeon._validate import check_positive_int

Reduce = Callable[[Tensor], Tensor]


class StepLoss(NamedTuple):
    """The mean loss of one optimizer step; whether the step is to be counted without its loss
    (GradScaler skipped it for a scale overflow, or it had no loss); whether the guard kept its
    update from being applied; whether it had no loss (on some rank); whether the buffers held
    a NaN/inf after it (on some rank).

    A named tuple: one is made per step, once per block, and a tuple is the cheapest to make."""

    loss: float
    skipped: bool = False
    update_skipped: bool = False
    no_loss: bool = False
    buffers_nonfinite: bool = False


_new = tuple.__new__  # a StepLoss without the call to its __new__ (of all fields: every block)

_Row = tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]
"""One closed step, on its device, 0-d each: its loss, its loss scale (``None``: no
GradScaler), its guard flag (``None``: not guarded) and its buffer flag (``None``: not
checked). A plain tuple: one is kept per step."""


class _Block:
    """One block of steps in flight from device to host.

    ``values`` is 1-D: the ``n`` losses, then their ``n`` loss scales when ``scaled``, then
    their ``n`` guard flags when ``flagged``, then their ``n`` buffer flags when ``buffered``
    (one flat tensor: the cheapest to stack, reduce and copy).
    """

    def __init__(
        self, values: Tensor, scaled: bool, flagged: bool = False, buffered: bool = False
    ) -> None:
        self.scaled = scaled
        self.flagged = flagged
        self.buffered = buffered
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.done: torch.cuda.Event | None = torch.cuda.Event()
            self.done.record()
        else:
            self.host, self.done = values, None

    def read(
        self,
    ) -> tuple[list[float], list[float] | None, list[float] | None, list[float] | None]:
        """The columns as floats: losses, then scales, guard flags and buffer flags (``None``
        where the block has none)."""
        if self.done is not None:
            self.done.synchronize()
        values = self.host.tolist()
        if not (self.scaled or self.flagged or self.buffered):
            return values, None, None, None
        n = len(values) // (1 + self.scaled + self.flagged + self.buffered)
        columns = iter(values[i : i + n] for i in range(0, len(values), n))
        losses = next(columns)
        scales = next(columns) if self.scaled else None
        flags = next(columns) if self.flagged else None
        return losses, scales, flags, next(columns) if self.buffered else None

    def rows(self) -> list[tuple[float, float, float, float]]:
        """``(loss, scale, flag, buffers)`` per step; scale 1.0 without a GradScaler, flags 0.0
        where not checked."""
        losses, scales, flags, buffers = self.read()
        n = len(losses)
        return list(
            zip(losses, scales or [1.0] * n, flags or [0.0] * n, buffers or [0.0] * n, strict=True)
        )

    @classmethod
    def from_rows(cls, rows: list[list[float]]) -> "_Block":
        """A block on the CPU from ``[[loss, scale, flag, buffers], ...]`` (a checkpoint's
        form; rows of older checkpoints lack the last values)."""
        rows = [_padded(row) for row in rows]
        columns = [v for column in zip(*rows, strict=True) for v in column]
        return cls(torch.tensor(columns), scaled=True, flagged=True, buffered=True)


def _padded(row: list[float]) -> list[float]:
    """A saved ``[loss, scale, flag, buffers]`` row, zeros for what older versions lack."""
    return [*row, 0.0, 0.0][:4]


class LossFeed:
    """Collects per-step losses on device and returns them as floats, late and in blocks."""

    def __init__(
        self,
        readback_every: int = 4,
        reduce: Reduce | None = None,
        *,
        accumulate: int = 1,
        device: torch.device | None = None,
        loss_scale: float | None = None,
    ) -> None:
        """``accumulate``: the count each micro-batch loss was divided by (Lightning's
        ``accumulate_grad_batches``; 1 under manual optimization): a step's loss is the mean of
        its micro-batches' undivided losses, also when it has another count of them (the short
        last window of an epoch, or a manual step over several batches); ``device``: where
        the losses live (a NaN for a step without a loss goes there before any loss is seen);
        ``loss_scale``: GradScaler's scale before the first step (so a first step it skips is
        recognized)."""
        check_positive_int("readback_every", readback_every)
        check_positive_int("accumulate", accumulate)
        self.readback_every = readback_every
        self.reduce = reduce
        self.accumulate = accumulate
        self.device = device
        self._micro: Tensor | None = None
        self._micro_count = 0
        self._last_loss: Tensor | None = None  # its device is where a loss-less step's NaN goes
        self._rows: list[_Row] = []
        self._kept = [0, 0, 0]  # scales, guard flags, buffer flags among the open rows
        self._closed = 0  # steps closed so far: blocks end at its multiples, also after a flush
        self._mixed_devices = False  # rows may sit on several devices (see _stack)
        self._restored_rows = 0  # the first open rows came from a checkpoint, averaged already
        self._constants: dict[tuple[torch.device, float], Tensor] = {}
        self._in_flight: deque[_Block] = deque()
        # no step before the first: nothing to compare with, unless GradScaler's start is known
        self._last_scale = -math.inf if loss_scale is None else loss_scale

    def add(self, loss: Tensor) -> None:
        """Add one micro-batch loss (already divided by the accumulation count)."""
        if loss.requires_grad:  # Lightning's outputs["loss"] is detached already
            loss = loss.detach()
        if loss.dim():
            loss = loss.reshape(())
        self._last_loss = loss
        self._micro = loss if self._micro is None else self._micro + loss
        self._micro_count += 1

    def close_step(
        self,
        loss_scale: Tensor | None = None,
        update_skipped: Tensor | None = None,
        buffers_nonfinite: Tensor | None = None,
    ) -> list[StepLoss]:
        """End the current optimizer step; return the steps whose readback is now due.

        ``update_skipped``: the guard's flag for this step (a 0-d tensor, 1.0: the
        update was not applied); ``buffers_nonfinite``: likewise, 1.0 when a buffer holds a
        NaN/inf after the step. Per step this only keeps references (and copies the scale,
        which GradScaler updates in place); the tensor work happens once per block, in
        :meth:`_stack`.
        """
        loss = self._micro
        if loss is None:  # no loss this step (training_step returned None): a NaN scale marks it
            device = self.device if self._last_loss is None else self._last_loss.device
            if device is None:
                self._mixed_devices = True  # on the CPU: the device of the losses is not known
            loss = loss_scale = torch.full((), math.nan, device=device)
        elif self._micro_count != self.accumulate:  # the mean over the step's micro-batches
            loss = loss * (self.accumulate / self._micro_count)
        self._micro, self._micro_count = None, 0
        if loss_scale is not None or update_skipped is not None or buffers_nonfinite is not None:
            kept = self._kept
            if loss_scale is not None:  # GradScaler updates it in place
                loss_scale = loss_scale.reshape(()).clone()
                kept[0] += 1
            if update_skipped is not None:
                kept[1] += 1
            if buffers_nonfinite is not None:
                kept[2] += 1
        self._rows.append((loss, loss_scale, update_skipped, buffers_nonfinite))
        self._closed += 1
        if self._closed % self.readback_every:
            return []
        self._send_block()
        return self._read(self._in_flight.popleft()) if len(self._in_flight) > 1 else []

    def flush(self, *, end: bool = True) -> list[StepLoss]:
        """Everything not yet handed out, oldest first: the blocks in flight and the closed
        steps of the open block (at the ``end`` of training, or before a checkpoint). The open
        block goes through ``reduce`` like any other, so every rank must flush. Blocks go on
        ending where they would have (every ``readback_every`` closed steps), so a flush changes
        when the flushed losses are read, and nothing after them. The micro-batch losses of a
        step still accumulating are kept for it, unless training ends (a checkpoint between
        micro-batches dropped them: the step's loss was its last micro-batches' alone)."""
        if end:
            self._micro, self._micro_count = None, 0  # of a step that never reached its update
        if self._rows:
            self._send_block()
        out: list[StepLoss] = []
        while self._in_flight:
            out += self._read(self._in_flight.popleft())
        return out

    def _send_block(self) -> None:
        """Stack the open rows, reduce them across ranks and start their copy to the host."""
        stacked = self._stack()
        if self.reduce is not None:
            stacked = self._reduced(*stacked)
        self._rows, self._kept = [], [0, 0, 0]
        self._restored_rows = 0
        self._in_flight.append(_Block(*stacked))

    def _reduced(self, values: Tensor, *kinds: bool) -> tuple[Tensor, bool, bool, bool]:
        """``values`` averaged across ranks, except the rows restored from a checkpoint: those
        were saved averaged already (a second mean could differ in the last bit). ``kinds``:
        which columns besides the losses there are (scaled, flagged, buffered)."""
        scaled, flagged, buffered = kinds
        if self.reduce is None:
            return values, scaled, flagged, buffered
        if not self._restored_rows:
            return self.reduce(values), scaled, flagged, buffered
        reduced = self.reduce(values.clone())  # a reduce may work in place
        columns = 1 + scaled + flagged + buffered
        n = len(values) // columns
        keep = torch.zeros(len(values), dtype=torch.bool)
        for column in range(columns):
            keep[column * n : column * n + self._restored_rows] = True
        return torch.where(keep.to(values.device), values, reduced), scaled, flagged, buffered

    def _stack(self) -> tuple[Tensor, bool, bool, bool]:
        """The open rows as one flat float32 tensor on one device (see :class:`_Block`)."""
        rows = self._rows
        if self._mixed_devices:  # restored from a checkpoint, or NaN rows before any loss
            device = self.device if self.device is not None else rows[-1][0].device
            rows = [tuple(None if t is None else t.to(device) for t in row) for row in rows]  # type: ignore[misc]
            self._rows = rows
            self._mixed_devices = self.device is None  # later rows may come from elsewhere
        kept = self._kept
        if not (kept[0] or kept[1] or kept[2]):  # losses only: no GradScaler, guard or buffers
            values = torch.stack([row[0] for row in rows])
            values = values if values.dtype == torch.float32 else values.float()
            return values, False, False, False
        losses, *others = zip(*rows, strict=True)
        columns, n = list(losses), len(losses)
        for column, count, default in zip(others, self._kept, (1.0, 0.0, 0.0), strict=True):
            if count == n:  # in every row (the usual case: a kind is kept every step or never)
                columns += column
            elif count:
                constant = self._constant(losses[0].device, default)
                columns += [constant if t is None else t for t in column]
        values = torch.stack(columns)
        if values.dtype != torch.float32:
            values = values.float()
        return values, kept[0] > 0, kept[1] > 0, kept[2] > 0

    def _constant(self, device: torch.device, value: float) -> Tensor:
        """A cached 0-d ``value`` on ``device`` (never written to)."""
        key = (device, value)
        if key not in self._constants:
            self._constants[key] = torch.full((), value, device=device)
        return self._constants[key]

    def _read(self, block: _Block) -> list[StepLoss]:
        losses, scales, flags, buffers = block.read()
        n = len(losses)
        if scales is None and self._last_scale <= 1.0:  # no GradScaler, no loss-less step
            self._last_scale = 1.0 if n else self._last_scale
            if flags is None and buffers is None:
                return [_new(StepLoss, (loss, False, False, False, False)) for loss in losses]
            pairs = zip(losses, flags or [0.0] * n, buffers or [0.0] * n, strict=True)
            return [_new(StepLoss, (x, False, flag > 0, False, b > 0)) for x, flag, b in pairs]
        out = []
        rows = zip(
            losses, scales or [1.0] * n, flags or [0.0] * n, buffers or [0.0] * n, strict=True
        )
        for loss, scale, flag, buffers_flag in rows:
            if math.isnan(scale):  # a step without a loss (on some rank): skipped
                out.append(StepLoss(loss, True, False, True, buffers_flag > 0))
                continue
            dropped = scale < self._last_scale  # GradScaler skipped the update
            # a NaN/inf loss, or gradients that overflow even unscaled (the scale was at most
            # 1 already): not calibration but a non-finite step, counted and skipped as guarded
            if dropped and (not math.isfinite(loss) or self._last_scale <= 1.0):
                out.append(StepLoss(loss, False, True, False, buffers_flag > 0))
            else:
                out.append(
                    StepLoss(loss, dropped, flag > 0 and not dropped, False, buffers_flag > 0)
                )
            self._last_scale = scale
        return out

    def state_dict(self) -> dict[str, Any]:
        """Losses not yet handed out (read now: checkpoints are rare), so a resume loses none.

        The open rows are saved averaged across ranks, as every rank would read them, so this
        runs the feed's collective: call it on every rank (Lightning's ``save_checkpoint``
        does, and must be called on every rank anyway)."""
        rows = _Block(*self._reduced(*self._stack())).rows() if self._rows else []
        return {
            "in_flight": [[list(row) for row in block.rows()] for block in self._in_flight],
            "rows": [list(row) for row in rows],
            "last_scale": self._last_scale,
            "closed": self._closed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (as CPU tensors; moved on next use)."""
        self._micro, self._micro_count = None, 0
        self._in_flight = deque(_Block.from_rows(rows) for rows in state["in_flight"])
        self._rows = [tuple(torch.tensor(v) for v in _padded(row)) for row in state["rows"]]  # type: ignore[misc]
        self._kept = [len(self._rows)] * 3
        self._mixed_devices = bool(self._rows)
        self._restored_rows = len(self._rows)
        self._last_scale = state["last_scale"]
        self._closed = state.get("closed", len(self._rows))
