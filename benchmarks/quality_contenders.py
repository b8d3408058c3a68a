"""The contenders of the outcome benchmark (``benchmarks/quality.py``) and how each runs the LR.

* the **oracle grid**: linear warmup from 0 over {0, 1, 2, 5, 10, 20}% of the run, then one of
  three decays to 0: ``cosine``; ``linear``; ``wsd`` (hold the peak, then linear over the last
  20%, Hägele et al. 2024). 18 schedules; the best of them on a task is its **oracle**, the
  schedule a user would only find by sweeping. Warmup 0% + cosine is also the contender
  "cosine, no warmup" (one fit, not two);
* ``constant``; ``step`` (x0.1 at 1/3 and 2/3 of the run, the ResNet recipe's two drops);
  ``one_cycle`` (torch ``OneCycleLR``'s defaults: 30% rise from peak/25, cosine anneal to
  peak/25/1e4; the LR only, momentum is not cycled);
* ``plateau``: torch ``ReduceLROnPlateau`` with its defaults (factor 0.1, patience 10,
  threshold 1e-4 relative), stepped every ``steps // 50`` optimizer steps on the mean training
  loss of those steps (a "pseudo-epoch" of 2% of the run);
* ``schedule_free``: ``schedulefree.AdamWScheduleFree`` (``SGDScheduleFree`` with momentum 0.9
  on SGD tasks) with its defaults, at the task's peak LR and weight decay, in ``eval()`` mode
  for every validation;
* surgeons: ``surgeon`` is ``ScheduleSurgeon()``, ``surgeon_cosine`` is
  ``ScheduleSurgeon(decay="cosine")``, and ``--surgeon NAME:key=value,...`` adds others
  (:func:`parse_surgeon`).

The LambdaLR contenders come from ``configure_optimizers`` with a ``surgeon.schedules`` shape
divided by the peak, stepped every optimizer step. Contenders travel to worker processes, so
every shape is a ``functools.partial`` of a module-level function.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from quality_tasks import Task

from surgeon import ScheduleSurgeon, schedules

Kind = Literal["lambda", "plateau", "schedule_free", "surgeon"]
Decay = Literal["cosine", "linear", "wsd"]

WARMUPS = (0.0, 0.01, 0.02, 0.05, 0.10, 0.20)
"""Warmup fractions of the oracle grid."""
DECAYS: tuple[Decay, ...] = ("cosine", "linear", "wsd")
"""Decays of the oracle grid, each to 0 at the last step."""
WSD_DECAY = 0.2
"""The WSD decay's share of the run."""
SWEEP_WARMUP = 0.05
"""The LR sweep's schedule: warmup 5% + cosine."""
ROP_EVALUATIONS = 50
"""ReduceLROnPlateau is stepped this many times per run (every ``steps // 50`` steps)."""


@dataclass(frozen=True)
class Contender:
    """One way of running the LR: ``shape(peak, steps)`` for the LambdaLR kind, keyword
    arguments of ``ScheduleSurgeon`` for the surgeon kind."""

    name: str
    label: str
    kind: Kind
    shape: Callable[[float, int], schedules.Schedule] | None = None
    warmup: float | None = None
    """Oracle-grid members: the warmup fraction (``None`` for every other contender)."""
    decay: Decay | None = None
    """Oracle-grid members: the decay."""
    surgeon: tuple[tuple[str, Any], ...] = ()
    """Surgeons: ``ScheduleSurgeon(**dict(surgeon))``."""

    @property
    def in_grid(self) -> bool:
        return self.warmup is not None


# ---------------------------------------------------------------------------- shapes


def grid_schedule(warmup: float, decay: Decay, lr: float, steps: int) -> schedules.Schedule:
    """Linear warmup from 0 over ``round(warmup * steps)`` steps, then ``decay`` to 0."""
    ramp = round(warmup * steps)
    if decay == "cosine":
        return schedules.warmup_cosine(lr, ramp, steps, 0.0)
    if decay == "wsd":
        return schedules.wsd(lr, ramp, steps, decay_fraction=WSD_DECAY, min_lr=0.0)
    down = schedules.linear(lr, 0.0, steps - ramp)
    return schedules.join([schedules.linear(0.0, lr, ramp), down], [ramp]) if ramp else down


def _constant(lr: float, steps: int) -> schedules.Schedule:
    return schedules.constant(lr)


def _step_decay(lr: float, steps: int) -> schedules.Schedule:
    return schedules.step_decay(lr, math.ceil(steps / 3), 0.1)


def _one_cycle(lr: float, steps: int) -> schedules.Schedule:
    return schedules.one_cycle(lr, steps)


def grid_name(warmup: float, decay: Decay) -> str:
    return f"w{round(100 * warmup)}_{decay}"


def _grid_label(warmup: float, decay: Decay) -> str:
    text = {"cosine": "cosine", "linear": "linear to 0", "wsd": "WSD (20% linear decay)"}[decay]
    label = f"warmup {round(100 * warmup)}% + {text}"
    return label + " = cosine, no warmup" if (warmup, decay) == (0.0, "cosine") else label


GRID = tuple(
    Contender(
        grid_name(w, d),
        _grid_label(w, d),
        "lambda",
        partial(grid_schedule, w, d),
        warmup=w,
        decay=d,
    )
    for d in DECAYS
    for w in WARMUPS
)
"""The oracle grid, decay by decay."""
COSINE = grid_name(0.0, "cosine")
"""Cosine without warmup: a member of the grid."""
SWEEP = grid_name(SWEEP_WARMUP, "cosine")
"""Warmup 5% + cosine: the schedule the peak LR is swept for."""

SURGEON = Contender("surgeon", "ScheduleSurgeon()", "surgeon")
SURGEON_COSINE = Contender(
    "surgeon_cosine", "ScheduleSurgeon(decay='cosine')", "surgeon", surgeon=(("decay", "cosine"),)
)
CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        *GRID,
        Contender("constant", "constant", "lambda", _constant),
        Contender("step", "step decay (x0.1 at 1/3, 2/3)", "lambda", _step_decay),
        Contender("one_cycle", "1cycle (torch defaults)", "lambda", _one_cycle),
        Contender("plateau", "ReduceLROnPlateau (train loss)", "plateau"),
        Contender("schedule_free", "schedule-free (AdamW / SGD)", "schedule_free"),
        SURGEON,
        SURGEON_COSINE,
    )
}
"""The built-in contenders by name, in table order."""
OFF_LR = ("constant", COSINE, SWEEP, "one_cycle", "plateau", "schedule_free")
"""The fixed contenders run on a task at a multiple of another's tuned LR (and every surgeon)."""
QUICK = ("constant", COSINE, SWEEP, "surgeon")
"""``--quick``'s contenders: the oracle is then the better of the two grid members."""


def applies(contender: Contender, base: str | None) -> bool:
    """Every contender runs on a task at its tuned LR; at a multiple of another task's tuned LR
    (``base`` set) only the surgeons and :data:`OFF_LR`."""
    return base is None or contender.kind == "surgeon" or contender.name in OFF_LR


# ---------------------------------------------------------------------------- surgeon variants

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def _value(text: str) -> Any:
    """A Python literal (``0.05`` a float, ``100`` an int, ``True``, ``None``), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_surgeon(spec: str, taken: Iterable[str] = CONTENDERS) -> Contender:
    """``NAME:key=value,key=value`` (or ``NAME`` alone: the defaults) as a surgeon contender;
    the keywords are checked by building a ``ScheduleSurgeon`` with them."""
    name, _, body = spec.partition(":")
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"--surgeon NAME must be a letter then letters, digits, _ or -, got NAME={name!r} "
            f"in {spec!r}; write it as NAME:key=value,key=value"
        )
    if name in taken:
        raise ValueError(f"--surgeon NAME={name!r} is taken; pick another name")
    kwargs: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--surgeon {spec!r}: {item!r} is not key=value")
        kwargs[key.strip()] = _value(raw.strip())
    try:
        ScheduleSurgeon(**kwargs)
    except TypeError as error:
        raise ValueError(f"--surgeon {spec!r}: {error}; keywords are ScheduleSurgeon's") from None
    label = "ScheduleSurgeon(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    return Contender(name, label, "surgeon", surgeon=tuple(kwargs.items()))


# ---------------------------------------------------------------------------- optimizers


def make_optimizer(task: Task, params: Iterable[Any], lr: float, schedule_free: bool) -> Any:
    """The task's optimizer at ``lr`` (``foreach`` for speed; the math is the same)."""
    decay, betas = task.weight_decay, task.betas
    if schedule_free:
        import schedulefree

        if task.optimizer == "sgd":
            return schedulefree.SGDScheduleFree(params, lr=lr, momentum=0.9, weight_decay=decay)
        return schedulefree.AdamWScheduleFree(params, lr=lr, betas=betas, weight_decay=decay)
    if task.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=decay, foreach=True)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=decay, foreach=True)


def rop_window(steps: int) -> int:
    """ReduceLROnPlateau's window: its evaluations are this many steps apart."""
    return max(1, steps // ROP_EVALUATIONS)


def configure(task: Task, contender: Contender, lr: float, steps: int, module: Any) -> Any:
    """What the task's ``configure_optimizers`` returns for ``contender`` at peak ``lr``."""
    opt = make_optimizer(task, module.parameters(), lr, contender.kind == "schedule_free")
    if contender.kind == "lambda":
        assert contender.shape is not None
        shape = contender.shape(lr, steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: shape(step) / lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    if contender.kind == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min")
        config = {
            "scheduler": scheduler,
            "interval": "step",
            "frequency": rop_window(steps),
            "monitor": "train_loss_window",
        }
        return {"optimizer": opt, "lr_scheduler": config}
    return opt  # schedule_free, surgeon
