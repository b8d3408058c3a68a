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
  fused kernel skips the update on the device, as under GradScaler. Except while a
  parameter about to be updated has no state yet (the first step, or a group's first):
  a skipped first step would still create it, and fused SGD makes its momentum from
  uninitialised memory, so that step is checked the ``"host"`` way (one sync);
* ``"host"``: the flag is read on the host and, when set, every gradient of the
  optimizer is set to ``None``, so the step leaves every parameter alone (torch
  optimizers skip parameters without a gradient). Free on CPU; on CUDA a read is a
  host sync, so mode ``"auto"`` uses it there only when asked (``"always"``), and
  otherwise leaves such optimizers unguarded (the rollback still undoes the damage,
  a few steps later) and says so once.

Where reading the flag is free (the ``"host"`` way on the CPU, one process, losses checked),
the gradients may be checked every ``grad_check_every``-th step only: a full check reads every
gradient (on the CPU about as long as writing them, see ``benchmarks/scaling.py``), while the
step's losses are read on the host every step, which costs a few µs whatever the model's size.
What that leaves out is a non-finite gradient with a finite loss on a step whose gradients are
not checked: its update is applied. When the damaged weights make the next losses non-finite,
those steps are skipped and after ``rollback_nonfinite`` of them the surgeon restores its last
good snapshot; when they do not (an inf weight behind a saturating tanh), nothing notices. So
the surgeon's default is 1 (every step); without snapshots it checks every step regardless.

``torch.optim.LBFGS`` is not guarded: it evaluates its closure (where this check runs)
several times inside one step, after moving the weights, too late to skip anything; a
rollback undoes a bad LBFGS step instead.

Ranks must skip the same steps. Under DDP the gradients are already averaged across
ranks when the check runs, so a NaN on any rank is a NaN on all: the guard checks the
gradients alone (``check_losses=False``) and needs no collective; a loss that is
non-finite on one rank while all gradients stay finite is not skipped, but the loss feed
averages it into a NaN that every rank's controller sees. Where gradients are not
synchronized (FSDP shards them), the flag is all-reduced (max) instead, one 4-byte
collective per step that does not block the host on NCCL.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from surgeon._validate import check_positive_int

log = logging.getLogger("surgeon")

SkipNonfinite = Literal["auto", "always", "off"]
SKIP_NONFINITE_MODES: tuple[str, ...] = ("auto", "always", "off")
Mechanism = Literal["found_inf", "host", "none"]


def mechanism_for(optimizer: Optimizer, mode: SkipNonfinite) -> Mechanism:
    """How the guard skips ``optimizer``'s update in ``mode`` (``"none"``: it does not)."""
    if mode == "off" or isinstance(optimizer, torch.optim.LBFGS):
        # LBFGS evaluates its closure (and so this check) several times inside one step, after
        # it has moved the weights: too late to skip; a rollback undoes such a step instead
        return "none"
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        return "found_inf"
    on_cpu = all(p.device.type == "cpu" for g in optimizer.param_groups for p in g["params"])
    return "host" if on_cpu or mode == "always" else "none"


def _stateless_param_with_grad(optimizer: Optimizer, watched: "_Watched") -> bool:
    """Whether a parameter whose first step would create state from uninitialised memory
    (fused SGD's momentum) is about to take it: the whole optimizer's first step, or a
    group's added or unfrozen later."""
    if not watched.first_step_risk:
        return False
    state = optimizer.state
    if len(state) >= len(watched.params):  # every parameter has state: the usual case
        return False
    return any(p.grad is not None and p not in state for p in watched.first_step_risk)


def _warn_unguarded(optimizer: Optimizer) -> None:
    """Say once why ``optimizer``'s non-finite steps are not skipped."""
    if isinstance(optimizer, torch.optim.LBFGS):
        log.warning(
            "ScheduleSurgeon: LBFGS moves the weights while it evaluates its closure, before a "
            "non-finite step could be skipped; its non-finite steps are not skipped (a rollback "
            "undoes them)"
        )
        return
    log.warning(
        "ScheduleSurgeon: %s on CUDA is not fused, so skipping its non-finite steps would cost "
        "a host sync per step; they are not skipped (a rollback undoes them). Create it with "
        "fused=True for a sync-free skip, or pass skip_nonfinite='always' to skip with a sync",
        type(optimizer).__name__,
    )


def _first_step_risk(optimizer: Optimizer) -> list[Tensor]:
    """Parameters in groups of a fused SGD with momentum (its first step makes the buffer with
    ``empty_like``; fused Adam and friends start from zeros)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return []
    return [p for g in optimizer.param_groups if g.get("momentum", 0) for p in g["params"]]


@dataclass
class _Watched:
    """What the guard decided about one optimizer, once (again when a param group is added)."""

    mechanism: Mechanism
    groups: int
    """How many param groups the optimizer had: another count means the lists are stale."""
    params: list[Tensor]
    device: torch.device | None
    """The one device all parameters live on (``None``: several)."""
    first_step_risk: list[Tensor]
    """Parameters whose skipped first step would leave garbage state (see
    :func:`_first_step_risk`)."""
    sampled: bool = False
    """Its gradients are checked every ``grad_check_every``-th step only, its losses every step
    (the ``"host"`` way, on the CPU)."""
    convert: bool = False
    """Some gradients are sparse or complex, which the kernel does not take: check their
    (real) values."""


class NonFiniteGuard:
    """Per step: collect the micro-batch losses, then flag and skip a non-finite update."""

    def __init__(
        self,
        mode: SkipNonfinite = "auto",
        reduce_max: Callable[[Tensor], None] | None = None,
        check_losses: bool = True,
        grad_check_every: int = 1,
    ) -> None:
        if mode not in SKIP_NONFINITE_MODES:
            raise ValueError(
                f"skip_nonfinite must be one of {SKIP_NONFINITE_MODES}, got skip_nonfinite={mode!r}"
            )
        check_positive_int("grad_check_every", grad_check_every)
        self.mode = mode
        self.reduce_max = reduce_max
        """In-place max across ranks (``None``: one process, or gradients synchronized)."""
        self.check_losses = check_losses
        self.grad_check_every = grad_check_every
        """Check the gradients of every n-th step only, where the losses are read on the host
        (the ``"host"`` way on the CPU, one process, ``check_losses``); elsewhere every step."""
        self._steps = 0  # steps released so far: the gradients are checked when it divides
        self._in_step = False  # an optimizer was checked since the last release
        self._losses: list[Tensor] = []
        self._watched: dict[int, _Watched] = {}
        self._armed: list[Optimizer] = []
        self._constants: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def mechanism(self, optimizer: Optimizer) -> Mechanism:
        """:func:`mechanism_for`, decided once per optimizer; unguarded ones are logged once."""
        return self._watch(optimizer).mechanism

    def _watch(self, optimizer: Optimizer) -> _Watched:
        groups = optimizer.param_groups
        watched = self._watched.get(id(optimizer))
        if watched is not None and watched.groups == len(groups):
            return watched
        found = mechanism_for(optimizer, self.mode)
        if found == "none" and self.mode != "off" and watched is None:
            _warn_unguarded(optimizer)
        params = [p for group in groups for p in group["params"]]
        devices = {p.device for p in params}
        device = next(iter(devices)) if len(devices) == 1 else None
        risk = _first_step_risk(optimizer) if found == "found_inf" else []
        sampled = (
            self.grad_check_every > 1
            and self.check_losses
            and self.reduce_max is None
            and found == "host"
            and device is not None
            and device.type == "cpu"
        )
        watched = _Watched(found, len(groups), params, device, risk, sampled)
        self._watched[id(optimizer)] = watched
        return watched

    def add_loss(self, loss: Tensor) -> None:
        """Keep one micro-batch loss of the coming step (a reference, no work)."""
        if self.check_losses:
            self._losses.append(loss.detach())

    def check(self, optimizer: Optimizer) -> Tensor | None:
        """Flag the step ``optimizer`` is about to take (1.0: non-finite) and arrange for the
        update to be skipped when set. ``None`` when this optimizer is not guarded.

        The flag must not be written to: on the host path it is a shared constant.
        """
        watched = self._watched.get(id(optimizer))
        if watched is None or watched.groups != len(optimizer.param_groups):
            watched = self._watch(optimizer)
        losses = self._losses  # kept until release(): every optimizer of the step sees them
        if watched.mechanism == "none":
            return None
        self._in_step = True
        if watched.sampled and self._steps % self.grad_check_every:
            return self._check_losses_on_host(watched)
        tensors = [grad for p in watched.params if (grad := p.grad) is not None]
        tensors += losses
        if not tensors:
            return None
        one_device = watched.device
        for loss in losses:
            if loss.device != one_device:
                one_device = None
                break
        device = tensors[0].device if one_device is None else one_device
        # fused SGD's first step of a parameter creates its momentum even when found_inf skips
        # it (from uninitialised memory, applied by the next step): on such a step read the flag
        # and take the gradients away instead (one sync per parameter's first step)
        on_host = watched.mechanism == "host" or _stateless_param_with_grad(optimizer, watched)
        zero, one, scratch = self._constants_on(device)
        # 0-d, as GradScaler makes it (fused Adam needs it); found_inf: a fresh one per step
        # (the optimizer and the loss feed keep it), host: a scratch kept at 0 between checks
        flag = scratch if on_host else torch.zeros((), device=device)
        unit = one if one_device is not None else None
        try:
            self._find_nonfinite(tensors, flag, unit, watched.convert)
        except NotImplementedError:  # no sparse or complex version of the kernel: learn it once
            if watched.convert:
                raise
            watched.convert = True
            self._find_nonfinite(tensors, flag, unit, convert=True)
        if self.reduce_max is not None:
            self.reduce_max(flag)
        if not on_host:
            optimizer.found_inf = flag  # type: ignore[attr-defined]
            self._armed.append(optimizer)
            return flag
        if not flag.item():
            return zero
        flag.zero_()
        for p in watched.params:
            p.grad = None
        return one

    def _check_losses_on_host(self, watched: _Watched) -> Tensor:
        """A step whose gradients are not checked: its losses, read on the host (free on the
        CPU); the gradients are taken away when one is non-finite."""
        device = watched.device
        assert device is not None  # sampled: all on the CPU
        zero, one, _ = self._constants_on(device)
        for loss in self._losses:
            if not math.isfinite(loss.item()):
                for p in watched.params:
                    p.grad = None
                return one
        return zero

    def _find_nonfinite(
        self, tensors: list[Tensor], flag: Tensor, unit: Tensor | None, convert: bool
    ) -> None:
        """Set ``flag`` to 1 if any of ``tensors`` holds a NaN or inf (values unchanged);
        ``unit``: 1.0 on the one device of them all (``None``: they are on several)."""
        if convert:  # as GradScaler does for sparse: the values of the coalesced tensor
            tensors = [t.coalesce()._values() if t.is_sparse else t for t in tensors]
            tensors = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
        if unit is not None:
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, unit)
        else:
            self._check_on_each_device(tensors, flag)

    def _check_on_each_device(self, tensors: list[Tensor], flag: Tensor) -> None:
        """The check of a model spread over devices: per device, then the max into ``flag``."""
        by_device: dict[torch.device, list[Tensor]] = {}
        for t in tensors:
            by_device.setdefault(t.device, []).append(t)
        for where, group in by_device.items():
            local = flag if where == flag.device else torch.zeros((), device=where)
            unit = self._constants_on(where)[1]
            torch._amp_foreach_non_finite_check_and_unscale_(group, local, unit)
            if local is not flag:
                torch.maximum(flag, local.to(flag.device, non_blocking=True), out=flag)

    def _constants_on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Cached 0-d tensors on ``device``: 0.0 and 1.0 (the flags the host way returns, 1.0
        also the check's unscale factor; never written to), and the host way's scratch flag
        (kept at 0 between checks). One lookup per check."""
        found = self._constants.get(device)
        if found is None:
            found = self._constants[device] = (
                torch.zeros((), device=device),
                torch.ones((), device=device),
                torch.zeros((), device=device),
            )
        return found

    def release(self) -> None:
        """After the step: take ``found_inf`` back off the optimizers it was put on."""
        if self._in_step:
            self._steps += 1
            self._in_step = False
        if self._armed:
            for optimizer in self._armed:
                if hasattr(optimizer, "found_inf"):
                    del optimizer.found_inf
            self._armed = []
        if self._losses:
            self._losses = []
