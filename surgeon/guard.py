"""Keeps an optimizer step whose loss or gradients are NaN/inf from changing anything.

Before each ``optimizer.step`` applies its update (Lightning's
``on_before_optimizer_step``, which runs after backward), :meth:`NonFiniteGuard.check`
computes one device flag, 1.0 when any gradient or any micro-batch loss of the
step is non-finite, with the kernel GradScaler uses
(``torch._amp_foreach_non_finite_check_and_unscale_`` with a scale of 1: values
unchanged). Then it makes the optimizer skip the update, the whole of it: no
weight, moment or step counter changes. Two ways, chosen per optimizer:

* ``"found_inf"``, free of host syncs: optimizers that take GradScaler's
  ``found_inf`` (``fused=True`` Adam, AdamW, SGD, Adagrad; they set
  ``_step_supports_amp_scaling``) get the flag as ``optimizer.found_inf`` and their
  fused kernel skips the update on the device, as under GradScaler;
* ``"host"``: the flag is read on the host and, when set, every gradient of the
  optimizer is set to ``None``, so the step leaves every parameter alone (torch
  optimizers skip parameters without a gradient). Free on CPU; on CUDA a read is a
  host sync, so mode ``"auto"`` uses it there only when asked (``"always"``), and
  otherwise leaves such optimizers unguarded (the rollback still undoes the damage,
  a few steps later) and says so once.

Ranks must skip the same steps. Under DDP the gradients are already averaged across
ranks when the check runs, so a NaN on any rank is a NaN on all: the guard checks the
gradients alone (``check_losses=False``) and needs no collective; a loss that is
non-finite on one rank while all gradients stay finite is not skipped, but the loss feed
averages it into a NaN that every rank's controller sees. Where gradients are not
synchronized (FSDP shards them), the flag is all-reduced (max) instead, one 4-byte
collective per step that does not block the host on NCCL.
"""

import logging
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

log = logging.getLogger("surgeon")

SkipNonfinite = Literal["auto", "always", "off"]
SKIP_NONFINITE_MODES: tuple[str, ...] = ("auto", "always", "off")
Mechanism = Literal["found_inf", "host", "none"]


def mechanism_for(optimizer: Optimizer, mode: SkipNonfinite) -> Mechanism:
    """How the guard skips ``optimizer``'s update in ``mode`` (``"none"``: it does not)."""
    if mode == "off":
        return "none"
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        return "found_inf"
    on_cpu = all(p.device.type == "cpu" for g in optimizer.param_groups for p in g["params"])
    return "host" if on_cpu or mode == "always" else "none"


class NonFiniteGuard:
    """Per step: collect the micro-batch losses, then flag and skip a non-finite update."""

    def __init__(
        self,
        mode: SkipNonfinite = "auto",
        reduce_max: Callable[[Tensor], None] | None = None,
        check_losses: bool = True,
    ) -> None:
        if mode not in SKIP_NONFINITE_MODES:
            raise ValueError(
                f"skip_nonfinite must be one of {SKIP_NONFINITE_MODES}, got skip_nonfinite={mode!r}"
            )
        self.mode = mode
        self.reduce_max = reduce_max
        """In-place max across ranks (``None``: one process, or gradients synchronized)."""
        self.check_losses = check_losses
        self._losses: list[Tensor] = []
        self._mechanisms: dict[int, Mechanism] = {}
        self._armed: list[Optimizer] = []
        self._one: dict[torch.device, Tensor] = {}

    def mechanism(self, optimizer: Optimizer) -> Mechanism:
        """:func:`mechanism_for`, decided once per optimizer; unguarded ones are logged once."""
        key = id(optimizer)
        if key not in self._mechanisms:
            self._mechanisms[key] = found = mechanism_for(optimizer, self.mode)
            if found == "none" and self.mode == "auto":
                log.warning(
                    "ScheduleSurgeon: %s on CUDA is not fused, so skipping its non-finite steps "
                    "would cost a host sync per step; they are not skipped (a rollback undoes "
                    "them). Create it with fused=True for a sync-free skip, or pass "
                    "skip_nonfinite='always' to skip with a sync",
                    type(optimizer).__name__,
                )
        return self._mechanisms[key]

    def add_loss(self, loss: Tensor) -> None:
        """Keep one micro-batch loss of the coming step (a reference, no work)."""
        if self.check_losses:
            self._losses.append(loss.detach())

    def check(self, optimizer: Optimizer) -> Tensor | None:
        """Flag the step ``optimizer`` is about to take (1.0: non-finite) and arrange for the
        update to be skipped when set. ``None`` when this optimizer is not guarded."""
        how = self.mechanism(optimizer)
        losses, self._losses = self._losses, []
        if how == "none":
            return None
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        tensors = grads + [loss.reshape(1) for loss in losses]
        if not tensors:
            return None
        device = tensors[0].device
        flag = torch.zeros((), device=device)  # 0-d, as GradScaler makes it (fused Adam needs it)
        by_device: dict[torch.device, list[Tensor]] = {}
        for t in tensors:
            by_device.setdefault(t.device, []).append(t)
        for where, group in by_device.items():  # a model spread over devices: check on each
            local = flag if where == device else torch.zeros((), device=where)
            torch._amp_foreach_non_finite_check_and_unscale_(group, local, self._unit(where))
            if local is not flag:
                flag = torch.maximum(flag, local.to(device, non_blocking=True))
        if self.reduce_max is not None:
            self.reduce_max(flag)
        if how == "found_inf":
            optimizer.found_inf = flag  # type: ignore[attr-defined]
            self._armed.append(optimizer)
        elif flag.item():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        return flag

    def _unit(self, device: torch.device) -> Tensor:
        """A cached 1.0 on ``device``: the check's (un)scale factor."""
        if device not in self._one:
            self._one[device] = torch.ones((), device=device)
        return self._one[device]

    def release(self) -> None:
        """After the step: take ``found_inf`` back off the optimizers it was put on."""
        for optimizer in self._armed:
            if hasattr(optimizer, "found_inf"):
                del optimizer.found_inf
        self._armed = []
        self._losses = []
