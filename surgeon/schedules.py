"""Pure learning-rate schedules: functions of the optimizer step, no torch, no state.

This module owns every *planned* LR curve in surgeon. A schedule is a plain function
``step -> lr`` (:data:`Schedule`) built by a factory that validates its arguments once
(raising :class:`ValueError` that names the argument and its value) and returns a closure
that only computes. Steps are optimizer steps (``trainer.global_step``) counted from 0;
every returned schedule rejects a negative step.

Shapes are composed, not subclassed: :func:`join` glues schedules end to end, each one
seeing a local step, so ``warmup_cosine`` and ``wsd`` are joins of the primitives
:func:`constant`, :func:`linear`, :func:`cosine` and :func:`decay_shape`. ``one_cycle`` is a
join of two ramps of the kind those primitives are made of, with torch's fractional phase
ends, which no integer-length primitive can express. Every cosine-shaped curve goes through
one interpolation helper, ``_cosine_interp``::

    end + (start - end) * (1 + cos(pi * t / T)) / 2

The factories reproduce ``torch.optim.lr_scheduler`` (StepLR, ExponentialLR, LinearLR,
CosineAnnealingLR, CosineAnnealingWarmRestarts, OneCycleLR with ``three_phase=False``) to
1e-9 relative (in practice within a few ulps); ``tests/test_schedules.py`` checks that
against the real schedulers. Ends of ramps (peaks, floors) are returned exactly, not
through the interpolation formula.
Where torch is undefined or periodic past its horizon, these schedules hold their final
value instead.

:data:`SCHEDULES` maps names to factories for the ``surgeon preview`` command.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Literal, NoReturn

from surgeon._validate import MAX_COUNT

__all__ = [
    "SCHEDULES",
    "Anneal",
    "DecayShape",
    "Schedule",
    "constant",
    "cosine",
    "cosine_restarts",
    "decay_shape",
    "exponential",
    "join",
    "linear",
    "one_cycle",
    "step_decay",
    "warmup_cosine",
    "wsd",
]

Schedule = Callable[[int], float]
"""A learning-rate schedule: optimizer step (>= 0) -> learning rate."""

DecayShape = Literal["cosine", "linear", "sqrt"]
"""Names of the decay curves understood by :func:`decay_shape` and :func:`wsd`."""

Anneal = Literal["cos", "linear"]
"""Annealing strategies of :func:`one_cycle` (torch ``OneCycleLR`` spelling)."""

# An interpolation from ``start`` (elapsed = 0) to ``end`` (elapsed = span).
_Interp = Callable[[float, float, float, float], float]


# --------------------------------------------------------------------------- validation


def _fail(message: str) -> NoReturn:
    raise ValueError(message)


def _as_int(field: str, value: object, minimum: int = 0) -> int:
    """``value`` as an int in ``[minimum, 2**53]``, or a ValueError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(f"{field} must be an integer, got {field}={value!r}")
    number = int(value)
    if number < minimum:
        _fail(f"{field} must be >= {minimum}, got {field}={value!r}")
    if number > MAX_COUNT:
        _fail(f"{field} must be at most 2**53, got {field}={value!r:.80}")
    return number


def _as_float(
    field: str, value: object, minimum: float | None = 0.0, maximum: float | None = None
) -> float:
    """``value`` as a finite float in ``[minimum, maximum]``, or a ValueError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(f"{field} must be a real number, got {field}={value!r}")
    try:
        result = float(value)
    except OverflowError:  # an int beyond the float range
        result = math.inf
    if not math.isfinite(result):
        _fail(f"{field} must be finite, got {field}={value!r}")
    if minimum is not None and result < minimum:
        _fail(f"{field} must be >= {minimum}, got {field}={value!r}")
    if maximum is not None and result > maximum:
        _fail(f"{field} must be <= {maximum}, got {field}={value!r}")
    return result


def _as_gamma(value: object) -> float:
    gamma = _as_float("gamma", value, minimum=None)
    if not 0.0 < gamma <= 1.0:
        _fail(f"gamma must be in (0, 1], got gamma={value!r}")
    return gamma


def _as_choice(field: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        _fail(f"{field} must be one of {allowed}, got {field}={value!r}")
    return value


def _check_floor(min_field: str, min_lr: float, lr_field: str, lr: float) -> None:
    if min_lr > lr:
        _fail(f"{min_field} must be <= {lr_field}, got {min_field}={min_lr!r}, {lr_field}={lr!r}")


def _check_step(step: int) -> None:
    if type(step) is not int and (isinstance(step, bool) or not isinstance(step, numbers.Integral)):
        _fail(f"step must be an integer >= 0, got step={step!r}")
    if step < 0:
        _fail(f"step must be an integer >= 0, got step={step!r}")
    if step > MAX_COUNT:
        _fail(f"step must be at most 2**53, got step={step!r:.80}")


# ------------------------------------------------------------------------ interpolation


def _lerp(start: float, end: float, elapsed: float, span: float) -> float:
    return start + (end - start) * (elapsed / span)


def _cosine_interp(start: float, end: float, elapsed: float, span: float) -> float:
    # The closed form with torch's operand order ``pi * t / T``: bit for bit the value of
    # CosineAnnealingLR._get_closed_form_lr and CosineAnnealingWarmRestarts. OneCycleLR
    # evaluates ``pi * (t / T)``, a few ulps away. Never the recursive (chainable) update.
    return end + (start - end) * (1.0 + math.cos(math.pi * elapsed / span)) / 2.0


def _sqrt_interp(start: float, end: float, elapsed: float, span: float) -> float:
    return end + (start - end) * (1.0 - math.sqrt(elapsed / span))


_SHAPES: dict[str, _Interp] = {"cosine": _cosine_interp, "linear": _lerp, "sqrt": _sqrt_interp}
_ANNEALS: dict[str, _Interp] = {"cos": _cosine_interp, "linear": _lerp}


def _ramp(start: float, end: float, begin: float, finish: float, interp: _Interp) -> Schedule:
    """``start`` up to time ``begin``, ``interp`` from start to end, ``end`` from ``finish``.

    ``begin`` and ``finish`` may be fractional (torch's OneCycleLR phase ends are); the
    endpoints are returned exactly rather than through the interpolation formula, so a
    peak or floor is hit bit for bit. ``finish <= begin`` means a jump to ``end``.
    """
    span = finish - begin

    def schedule(step: int) -> float:
        _check_step(step)
        if step >= finish:
            return end
        if step <= begin:
            return start
        return interp(start, end, step - begin, span)

    return schedule


def _decay(field: str, name: object, start_lr: object, end_lr: object, steps: object) -> Schedule:
    shape = _as_choice(field, name, tuple(_SHAPES))
    start = _as_float("start_lr", start_lr)
    end = _as_float("end_lr", end_lr)
    total = _as_int("total_steps", steps)
    _check_floor("end_lr", end, "start_lr", start)
    return _ramp(start, end, 0, total, _SHAPES[shape])


# --------------------------------------------------------------------------- primitives


def constant(lr: float) -> Schedule:
    """Constant schedule: ``lr(t) = lr``."""
    value = _as_float("lr", lr)

    def schedule(step: int) -> float:
        _check_step(step)
        return value

    return schedule


def step_decay(lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """Step decay (torch ``StepLR``): ``lr(t) = lr * gamma ** (t // step_size)``."""
    base = _as_float("lr", lr)
    size = _as_int("step_size", step_size, minimum=1)
    factor = _as_gamma(gamma)

    def schedule(step: int) -> float:
        _check_step(step)
        return base * factor ** (step // size)

    return schedule


def exponential(lr: float, gamma: float) -> Schedule:
    """Exponential decay (torch ``ExponentialLR``): ``lr(t) = lr * gamma ** t``."""
    base = _as_float("lr", lr)
    factor = _as_gamma(gamma)

    def schedule(step: int) -> float:
        _check_step(step)
        return base * factor**step

    return schedule


def linear(start_lr: float, end_lr: float, total_steps: int) -> Schedule:
    """Linear ramp: ``lr(t) = start_lr + (end_lr - start_lr) * min(t, T) / T``, T = total_steps."""
    start = _as_float("start_lr", start_lr)
    end = _as_float("end_lr", end_lr)
    total = _as_int("total_steps", total_steps)
    return _ramp(start, end, 0, total, _lerp)


def cosine(lr: float, total_steps: int, min_lr: float = 0.0) -> Schedule:
    """Cosine decay: ``lr(t) = min_lr + (lr - min_lr) * (1 + cos(pi * min(t, T) / T)) / 2``."""
    peak = _as_float("lr", lr)
    total = _as_int("total_steps", total_steps)
    floor = _as_float("min_lr", min_lr)
    _check_floor("min_lr", floor, "lr", peak)
    return _ramp(peak, floor, 0, total, _cosine_interp)


def decay_shape(name: DecayShape, start_lr: float, end_lr: float, total_steps: int) -> Schedule:
    """Decay over T steps, then hold: ``end_lr + (start_lr - end_lr) * s(min(t, T) / T)``.

    ``s(p)`` is ``1 - p`` (linear), ``(1 + cos(pi * p)) / 2`` (cosine) or ``1 - sqrt(p)``
    (sqrt); ``total_steps=0`` gives end_lr at once."""
    return _decay("name", name, start_lr, end_lr, total_steps)


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Concatenate schedules: for ``b[i-1] <= t < b[i]``, ``lr(t) = schedules[i](t - b[i-1])``."""
    parts = list(schedules)
    edges = list(boundaries)
    if not parts:
        _fail("schedules must not be empty, got schedules=[]")
    for index, part in enumerate(parts):
        if not callable(part):
            _fail(f"schedules[{index}] must be callable, got schedules[{index}]={part!r}")
    if len(edges) != len(parts) - 1:
        _fail(
            "boundaries must have len(schedules) - 1 entries, "
            f"got len(boundaries)={len(edges)}, len(schedules)={len(parts)}"
        )
    for index, edge in enumerate(edges):
        _as_int(f"boundaries[{index}]", edge)
    for index in range(1, len(edges)):
        if edges[index] <= edges[index - 1]:
            _fail(f"boundaries must be strictly increasing, got boundaries={edges!r}")
    offsets = [0, *(int(edge) for edge in edges)]
    starts = offsets[1:]

    def schedule(step: int) -> float:
        _check_step(step)
        index = bisect.bisect_right(starts, step)
        return parts[index](step - offsets[index])

    return schedule


# ------------------------------------------------------------------------------ compounds


def warmup_cosine(lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Schedule:
    """Warmup then cosine: ``lr * t / W`` for t < W, then ``cosine(lr, T - W, min_lr)(t - W)``.

    That is ``min_lr + (lr - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2``; min_lr is
    held from T on. Built as ``join([linear(0, lr, W), cosine(lr, T - W, min_lr)], [W])``."""
    peak = _as_float("lr", lr)
    warmup = _as_int("warmup_steps", warmup_steps)
    total = _as_int("total_steps", total_steps)
    floor = _as_float("min_lr", min_lr)
    _check_floor("min_lr", floor, "lr", peak)
    if warmup > total:
        _fail(
            "warmup_steps must be <= total_steps, "
            f"got warmup_steps={warmup_steps!r}, total_steps={total_steps!r}"
        )
    return join([linear(0.0, peak, warmup), cosine(peak, total - warmup, floor)], [warmup])


def one_cycle(
    lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal: Anneal = "cos",
) -> Schedule:
    """1cycle (torch ``OneCycleLR``): lr / div_factor -> lr -> lr / div_factor / final_div_factor.

    With ``a = lr / div_factor``, phase 1 owns the steps ``t <= e = pct_start * T - 1`` and
    anneals a -> lr over [0, e]; phase 2 anneals lr -> a / final_div_factor over [e, T - 1],
    held after. Each phase is ``anneal(start, end, (t - t0) / (t1 - t0))``, cosine (``cos``)
    or ``linear``."""
    peak = _as_float("lr", lr)
    total = _as_int("total_steps", total_steps, minimum=1)
    pct = _as_float("pct_start", pct_start, maximum=1.0)
    div = _as_float("div_factor", div_factor, minimum=1.0)
    final_div = _as_float("final_div_factor", final_div_factor, minimum=1.0)
    interp = _ANNEALS[_as_choice("anneal", anneal, tuple(_ANNEALS))]
    initial = peak / div
    floor = initial / final_div
    # torch's phase ends, kept as floats: phase 1 owns the integer steps t <= rise_end and
    # is interpolated over [0, rise_end]; phase 2 over [rise_end, total - 1]. The join
    # boundary is the first integer step past rise_end; the second piece keeps torch's
    # fractional start by measuring time from rise_end - boundary (in (-1, 0]).
    # When rise_end == 0 torch divides by zero at step 0; here step 0 is the phase end, lr.
    rise_end = float(pct * total) - 1
    boundary = math.floor(rise_end) + 1
    rise = _ramp(initial, peak, 0.0, rise_end, interp)
    if boundary > total - 1:  # pct_start=1: no fall phase; past the horizon the peak holds
        return join([rise, constant(peak)], [boundary])
    fall = _ramp(peak, floor, rise_end - boundary, (total - 1) - boundary, interp)
    return join([rise, fall], [boundary])


def cosine_restarts(
    lr: float, first_cycle_steps: int, cycle_mult: int = 1, min_lr: float = 0.0
) -> Schedule:
    """SGDR (torch ``CosineAnnealingWarmRestarts``): cosine from lr to min_lr, restarted.

    Cycle i lasts ``T_i = first_cycle_steps * cycle_mult ** i`` steps and gives
    ``min_lr + (lr - min_lr) * (1 + cos(pi * t_i / T_i)) / 2``, t_i the step within it."""
    peak = _as_float("lr", lr)
    first = _as_int("first_cycle_steps", first_cycle_steps, minimum=1)
    mult = _as_int("cycle_mult", cycle_mult, minimum=1)
    floor = _as_float("min_lr", min_lr)
    _check_floor("min_lr", floor, "lr", peak)

    def schedule(step: int) -> float:
        _check_step(step)
        local, period = step, first
        if mult == 1:
            local = step % first
        else:
            while local >= period:  # cycles grow geometrically: O(log step) iterations
                local -= period
                period *= mult
        return _cosine_interp(peak, floor, local, period)

    return schedule


WSD_DECAY_FRACTION = 0.2
"""The default share of a warmup-stable-decay run spent decaying, for :func:`wsd` (``surgeon
preview wsd``) and the callback's ``wsd_decay_fraction`` alike: a 20% cooldown matches cosine
(Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations")."""


def wsd(
    lr: float,
    warmup_steps: int,
    total_steps: int,
    decay_fraction: float = WSD_DECAY_FRACTION,
    min_lr: float = 0.0,
    decay_shape: DecayShape = "linear",
) -> Schedule:
    """Warmup-stable-decay: ``lr * t / W`` for t < W, ``lr`` until T - D, then decay to min_lr.

    The decay (``decay_shape``) runs over the last ``D = round(decay_fraction * T)`` steps,
    reaching min_lr at T, held after. D uses Python's ``round``, which rounds halves to
    even: T=25 and decay_fraction=0.1 give D=2, T=35 gives D=4. The sqrt shape is
    ``min_lr + (lr - min_lr) * (1 - sqrt((t - T + D) / D))``."""
    peak = _as_float("lr", lr)
    warmup = _as_int("warmup_steps", warmup_steps)
    total = _as_int("total_steps", total_steps)
    fraction = _as_float("decay_fraction", decay_fraction, maximum=1.0)
    floor = _as_float("min_lr", min_lr)
    _check_floor("min_lr", floor, "lr", peak)
    decay_steps = round(fraction * total)
    if warmup + decay_steps > total:
        _fail(
            "warmup_steps + round(decay_fraction * total_steps) must be <= total_steps, "
            f"got warmup_steps={warmup_steps!r}, decay_fraction={decay_fraction!r} "
            f"({decay_steps} decay steps), total_steps={total_steps!r}"
        )
    decay = _decay("decay_shape", decay_shape, peak, floor, decay_steps)
    decay_start = total - decay_steps
    # Zero-length phases are left out so that the boundaries stay strictly increasing.
    phases: list[tuple[int, Schedule]] = [
        (warmup, linear(0.0, peak, warmup)),
        (decay_start - warmup, constant(peak)),
    ]
    pieces: list[Schedule] = []
    boundaries: list[int] = []
    elapsed = 0
    for length, piece in phases:
        if length > 0:
            elapsed += length
            pieces.append(piece)
            boundaries.append(elapsed)
    return join([*pieces, decay], boundaries)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "step_decay": step_decay,
    "exponential": exponential,
    "linear": linear,
    "cosine": cosine,
    "warmup_cosine": warmup_cosine,
    "one_cycle": one_cycle,
    "cosine_restarts": cosine_restarts,
    "wsd": wsd,
}
"""Schedule factories by name, as used by ``surgeon preview NAME``."""
