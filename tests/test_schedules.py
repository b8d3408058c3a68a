"""Tests for surgeon.schedules: validation, parity with torch's schedulers, shapes, join.

Parity is checked against the real ``torch.optim.lr_scheduler`` classes stepped on a dummy
SGD optimizer, one ``optimizer.step(); scheduler.step()`` per step, reading
``param_groups[0]["lr"]`` before each: that is what a training loop sees. Tolerance is
``math.isclose(rel_tol=1e-9, abs_tol=1e-12)`` everywhere. What we found (torch 2.13):

* CosineAnnealingLR. ``.step()`` runs the recursive (chainable) ``get_lr``; its
  ``_get_closed_form_lr`` is ``eta_min + (base - eta_min) * (1 + cos(pi * t / T_max)) / 2``.
  ``schedules.cosine`` uses that closed form with the same operand order (``pi * t / T``,
  not ``pi * (t / T)``) and equals ``_get_closed_form_lr`` bit for bit (asserted here to
  4 ulps so that a torch reordering does not break the suite). The recursive path drifts
  from it, but only by a few ulps per step in absolute terms: measured 5e-14 relative over
  T <= 2000, 5e-14 relative / 2e-15 absolute at T = 100000. So the stepped scheduler meets
  1e-9 relative with a wide margin; the closed form is the exact match.
* OneCycleLR. torch evaluates ``pi * (t / T)`` and phase ends ``pct_start * T - 1`` that
  are fractional; ``one_cycle`` keeps those fractional ends, so every integer step falls in
  the same phase with the same interpolation fraction. Measured worst 1e-12 relative (cos).
  With linear annealing torch returns its final lr as ``max + (min - max) * 1.0``, which
  loses the low bits of a small ``min`` (relative error up to ulp(max) / min, ~6e-10 for
  div_factor * final_div_factor ~ 1e7); ``one_cycle`` returns ``min`` exactly, and the
  absolute tolerance covers torch's rounding.
* StepLR, ExponentialLR, LinearLR also step recursively (multiplying the previous lr);
  the drift is ulps (<= 2e-14 relative over a few hundred steps).
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from surgeon import schedules
from surgeon.schedules import (
    SCHEDULES,
    Schedule,
    constant,
    cosine,
    cosine_restarts,
    decay_shape,
    exponential,
    join,
    linear,
    one_cycle,
    step_decay,
    warmup_cosine,
    wsd,
)

REL_TOL = 1e-9
ABS_TOL = 1e-12

# Deterministic property runs: same examples on every machine, nothing written to disk.
PARITY = settings(max_examples=50, deadline=None, derandomize=True, database=None)
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None)

lrs = st.floats(min_value=1e-6, max_value=1.0)
fractions = st.floats(min_value=0.0, max_value=1.0)


def torch_lrs(make: Callable[[torch.optim.Optimizer], Any], lr: float, steps: int) -> list[float]:
    """The lr a training loop sees at steps 0 .. steps-1 under torch's real scheduler."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = make(optimizer)
        seen = [optimizer.param_groups[0]["lr"]]
        for _ in range(steps - 1):
            optimizer.step()
            scheduler.step()
            seen.append(optimizer.param_groups[0]["lr"])
    return seen


def assert_matches(ours: Schedule, reference: Sequence[float], **tol: float) -> None:
    rel_tol, abs_tol = tol.get("rel_tol", REL_TOL), tol.get("abs_tol", ABS_TOL)
    for step, expected in enumerate(reference):
        got = ours(step)
        assert math.isclose(got, expected, rel_tol=rel_tol, abs_tol=abs_tol), (
            f"step {step}: ours {got!r}, torch {expected!r}"
        )


def curve(schedule: Schedule, steps: int) -> list[float]:
    return [schedule(step) for step in range(steps)]


def non_decreasing(values: Sequence[float]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(values))


def non_increasing(values: Sequence[float]) -> bool:
    return all(a >= b for a, b in itertools.pairwise(values))


def max_jump_at(values: Sequence[float], boundary: int) -> tuple[float, float]:
    """(|change from boundary-1 to boundary|, the largest change between any other pair)."""
    diffs = [abs(b - a) for a, b in itertools.pairwise(values)]
    at = diffs[boundary - 1]
    elsewhere = max(d for i, d in enumerate(diffs) if i != boundary - 1)
    return at, elsewhere


# Small valid arguments for every registered factory.
EXAMPLES: dict[str, dict[str, Any]] = {
    "constant": {"lr": 0.1},
    "step_decay": {"lr": 0.1, "step_size": 3},
    "exponential": {"lr": 0.1, "gamma": 0.9},
    "linear": {"start_lr": 0.0, "end_lr": 0.1, "total_steps": 10},
    "cosine": {"lr": 0.1, "total_steps": 10},
    "warmup_cosine": {"lr": 0.1, "warmup_steps": 2, "total_steps": 10},
    "one_cycle": {"lr": 0.1, "total_steps": 10},
    "cosine_restarts": {"lr": 0.1, "first_cycle_steps": 4},
    "wsd": {"lr": 0.1, "warmup_steps": 2, "total_steps": 10},
}


class TestValidation:
    @pytest.mark.parametrize(
        ("factory", "kwargs", "field"),
        [
            (constant, {"lr": -1.0}, "lr"),
            (constant, {"lr": math.nan}, "lr"),
            (constant, {"lr": math.inf}, "lr"),
            (constant, {"lr": "0.1"}, "lr"),
            (step_decay, {"lr": 0.1, "step_size": 0}, "step_size"),
            (step_decay, {"lr": 0.1, "step_size": 2.5}, "step_size"),
            (step_decay, {"lr": 0.1, "step_size": 1, "gamma": 1.5}, "gamma"),
            (step_decay, {"lr": 0.1, "step_size": 1, "gamma": 0.0}, "gamma"),
            (exponential, {"lr": 0.1, "gamma": -0.5}, "gamma"),
            (exponential, {"lr": 0.1, "gamma": math.nan}, "gamma"),
            (linear, {"start_lr": 0.0, "end_lr": 0.1, "total_steps": -1}, "total_steps"),
            (linear, {"start_lr": 0.0, "end_lr": 0.1, "total_steps": True}, "total_steps"),
            (linear, {"start_lr": math.nan, "end_lr": 0.1, "total_steps": 3}, "start_lr"),
            (linear, {"start_lr": 0.0, "end_lr": -0.1, "total_steps": 3}, "end_lr"),
            (cosine, {"lr": 0.1, "total_steps": -3}, "total_steps"),
            (cosine, {"lr": 0.1, "total_steps": 10, "min_lr": 0.2}, "min_lr"),
            (cosine, {"lr": 0.1, "total_steps": 10, "min_lr": -0.01}, "min_lr"),
            (warmup_cosine, {"lr": 0.1, "warmup_steps": -1, "total_steps": 10}, "warmup_steps"),
            (warmup_cosine, {"lr": 0.1, "warmup_steps": 11, "total_steps": 10}, "warmup_steps"),
            (
                warmup_cosine,
                {"lr": 0.1, "warmup_steps": 1, "total_steps": 10, "min_lr": 1.0},
                "min_lr",
            ),
            (one_cycle, {"lr": 0.1, "total_steps": 0}, "total_steps"),
            (one_cycle, {"lr": 0.1, "total_steps": 10, "pct_start": 1.5}, "pct_start"),
            (one_cycle, {"lr": 0.1, "total_steps": 10, "pct_start": -0.1}, "pct_start"),
            (one_cycle, {"lr": 0.1, "total_steps": 10, "div_factor": 0.5}, "div_factor"),
            (one_cycle, {"lr": 0.1, "total_steps": 10, "final_div_factor": 0}, "final_div_factor"),
            (one_cycle, {"lr": 0.1, "total_steps": 10, "anneal": "cosine"}, "anneal"),
            (cosine_restarts, {"lr": 0.1, "first_cycle_steps": 0}, "first_cycle_steps"),
            (cosine_restarts, {"lr": 0.1, "first_cycle_steps": 5, "cycle_mult": 0}, "cycle_mult"),
            (cosine_restarts, {"lr": 0.1, "first_cycle_steps": 5, "cycle_mult": 1.5}, "cycle_mult"),
            (cosine_restarts, {"lr": 0.1, "first_cycle_steps": 5, "min_lr": 0.5}, "min_lr"),
            (wsd, {"lr": 0.1, "warmup_steps": 5, "total_steps": 4}, "warmup_steps"),
            (
                wsd,
                {"lr": 0.1, "warmup_steps": 0, "total_steps": 10, "decay_fraction": 1.5},
                "decay_fraction",
            ),
            (
                wsd,
                {"lr": 0.1, "warmup_steps": 0, "total_steps": 10, "decay_shape": "exp"},
                "decay_shape",
            ),
            (wsd, {"lr": 0.1, "warmup_steps": 0, "total_steps": 10, "min_lr": 0.2}, "min_lr"),
            (decay_shape, {"name": "exp", "start_lr": 1, "end_lr": 0, "total_steps": 3}, "name"),
            (
                decay_shape,
                {"name": "sqrt", "start_lr": 0.1, "end_lr": 0.2, "total_steps": 3},
                "end_lr",
            ),
        ],
    )
    def test_error_names_field_and_value(
        self, factory: Callable[..., Schedule], kwargs: dict[str, Any], field: str
    ) -> None:
        with pytest.raises(ValueError, match=re.escape(field)) as info:
            factory(**kwargs)
        assert f"{field}={kwargs[field]!r}" in str(info.value)

    def test_warmup_longer_than_total_message(self) -> None:
        message = "warmup_steps must be <= total_steps, got warmup_steps=200, total_steps=100"
        with pytest.raises(ValueError, match=re.escape(message)):
            warmup_cosine(1e-3, warmup_steps=200, total_steps=100)

    def test_wsd_overlap_names_both_fields(self) -> None:
        with pytest.raises(ValueError, match="warmup_steps") as info:
            wsd(0.1, warmup_steps=95, total_steps=100, decay_fraction=0.1)
        assert "decay_fraction=0.1" in str(info.value)
        assert "10 decay steps" in str(info.value)

    @pytest.mark.parametrize("name", sorted(EXAMPLES))
    @pytest.mark.parametrize("step", [-1, math.nan, 2.5, True, "3", None])
    def test_a_step_that_is_not_an_int_from_0_is_rejected(self, name: str, step: object) -> None:
        """Never a NaN LR or a bare TypeError from inside: a ValueError naming ``step``."""
        schedule = SCHEDULES[name](**EXAMPLES[name])
        message = f"step must be an integer >= 0, got step={step!r}"
        with pytest.raises(ValueError, match=re.escape(message)):
            schedule(step)  # type: ignore[arg-type]

    @pytest.mark.parametrize("name", sorted(EXAMPLES))
    def test_a_step_or_length_beyond_2_53_is_a_value_error(self, name: str) -> None:
        """Ints beyond 2**53 are not exact as floats: a ValueError naming the argument, never an
        OverflowError from inside (``10**400`` steps overflowed exponential, step decay and
        the restarts; ``10**400`` total steps overflowed cosine at its first call)."""
        schedule = SCHEDULES[name](**EXAMPLES[name])
        with pytest.raises(ValueError, match=r"step must be at most 2\*\*53"):
            schedule(10**400)
        lengths = [k for k in EXAMPLES[name] if k.endswith("steps")]
        for key in lengths:
            with pytest.raises(ValueError, match=rf"{key} must be at most 2\*\*53"):
                SCHEDULES[name](**{**EXAMPLES[name], key: 10**400})

    def test_a_numpy_int_step_is_a_step(self) -> None:
        np = pytest.importorskip("numpy")
        assert cosine(1.0, 10)(np.int64(3)) == cosine(1.0, 10)(3)

    def test_one_cycle_with_no_fall_phase_holds_its_peak_past_the_horizon(self) -> None:
        schedule = one_cycle(1.0, 10, pct_start=1.0)
        assert [schedule(t) for t in (9, 10, 11, 100)] == [1.0] * 4

    def test_every_registered_factory_has_an_example(self) -> None:
        assert set(EXAMPLES) == set(SCHEDULES)
        for name, factory in SCHEDULES.items():
            value = factory(**EXAMPLES[name])(3)
            assert isinstance(value, float), name

    def test_registry_holds_factories_not_join(self) -> None:
        assert SCHEDULES["wsd"] is wsd
        assert "join" not in SCHEDULES

    def test_module_is_torch_free(self) -> None:
        source = Path(schedules.__file__).read_text(encoding="utf-8")
        assert "import torch" not in source


class TestTorchParity:
    @PARITY
    @given(
        lr=lrs,
        step_size=st.integers(1, 40),
        gamma=st.floats(min_value=0.05, max_value=1.0),
    )
    def test_step_lr(self, lr: float, step_size: int, gamma: float) -> None:
        ref = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size, gamma), lr, 300)
        assert_matches(step_decay(lr, step_size, gamma), ref)

    @PARITY
    @given(lr=lrs, gamma=st.floats(min_value=0.9, max_value=1.0))
    def test_exponential_lr(self, lr: float, gamma: float) -> None:
        ref = torch_lrs(lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma), lr, 300)
        assert_matches(exponential(lr, gamma), ref)

    @PARITY
    @given(
        lr=lrs,
        start_factor=st.floats(min_value=1e-3, max_value=1.0),
        end_factor=fractions,
        total=st.integers(1, 200),
    )
    def test_linear_lr(self, lr: float, start_factor: float, end_factor: float, total: int) -> None:
        ref = torch_lrs(
            lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor, end_factor, total),
            lr,
            total + 20,
        )
        assert_matches(linear(lr * start_factor, lr * end_factor, total), ref)

    def test_linear_zero_steps_differs_from_torch_on_purpose(self) -> None:
        # torch's LinearLR(total_iters=0) holds start_factor forever; we jump to end_lr.
        assert linear(0.5, 0.1, 0)(0) == 0.1
        assert linear(0.5, 0.1, 0)(7) == 0.1

    @PARITY
    @given(lr=lrs, total=st.integers(1, 400), floor=fractions)
    def test_cosine_annealing_lr_stepped(self, lr: float, total: int, floor: float) -> None:
        # Up to T_max only: past it torch's curve is periodic, ours holds min_lr.
        eta_min = lr * floor
        ref = torch_lrs(
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, total, eta_min), lr, total + 1
        )
        assert_matches(cosine(lr, total, eta_min), ref)

    @PARITY
    @given(lr=lrs, total=st.integers(1, 400), floor=fractions)
    def test_cosine_annealing_lr_closed_form(self, lr: float, total: int, floor: float) -> None:
        eta_min = lr * floor
        param = torch.nn.Parameter(torch.zeros(1))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            torch.optim.SGD([param], lr=lr), total, eta_min
        )
        if not hasattr(scheduler, "_get_closed_form_lr"):
            pytest.skip("this torch has no CosineAnnealingLR._get_closed_form_lr")
        ours = cosine(lr, total, eta_min)
        for step in range(total + 1):
            scheduler.last_epoch = step
            expected = scheduler._get_closed_form_lr()[0]
            # Same expression and operand order: equal to a few ulps (bit for bit today).
            assert math.isclose(ours(step), expected, rel_tol=4 * 2.0**-52, abs_tol=0.0), step

    @PARITY
    @given(
        lr=lrs,
        first=st.integers(1, 40),
        mult=st.integers(1, 3),
        floor=st.sampled_from([0.0, 1e-3, 0.5]),
    )
    def test_cosine_annealing_warm_restarts(
        self, lr: float, first: int, mult: int, floor: float
    ) -> None:
        eta_min = lr * floor
        ref = torch_lrs(
            lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, first, mult, eta_min),
            lr,
            400,
        )
        assert_matches(cosine_restarts(lr, first, mult, eta_min), ref)

    @PARITY
    @given(
        lr=lrs,
        total=st.integers(1, 300),
        pct_start=st.one_of(fractions, st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.9, 1.0])),
        div_factor=st.floats(min_value=1.0, max_value=100.0),
        final_div_factor=st.one_of(st.just(1e4), st.floats(min_value=1.0, max_value=1e5)),
        anneal=st.sampled_from(["cos", "linear"]),
    )
    def test_one_cycle_lr(
        self,
        lr: float,
        total: int,
        pct_start: float,
        div_factor: float,
        final_div_factor: float,
        anneal: str,
    ) -> None:
        # torch divides by zero at step 0 when pct_start * total_steps == 1 (covered below).
        assume(float(pct_start * total) - 1 != 0)
        ref = torch_lrs(
            lambda o: torch.optim.lr_scheduler.OneCycleLR(
                o,
                max_lr=lr,
                total_steps=total,
                pct_start=float(pct_start),
                anneal_strategy=anneal,
                div_factor=div_factor,
                final_div_factor=final_div_factor,
                cycle_momentum=False,
                three_phase=False,
            ),
            lr,
            total,  # torch's last defined step is total_steps - 1
        )
        ours = one_cycle(lr, total, pct_start, div_factor, final_div_factor, anneal)  # type: ignore[arg-type]
        assert_matches(ours, ref)
        if float(pct_start * total) - 1 > 0:  # step 0 is in the rising phase
            assert ours(0) == lr / div_factor

    def test_one_cycle_fractional_phase_end(self) -> None:
        # pct_start * T = 3.3: torch's phase 1 ends at 2.3, so step 2 still rises (2 / 2.3 of
        # the way) and step 3 is already in phase 2 (0.7 / (9 - 2.3) of the way down).
        lr, total = 1.0, 10
        initial, floor = lr / 25.0, lr / 25.0 / 1e4
        ours = one_cycle(lr, total, pct_start=0.33, anneal="linear")
        rise_end = float(0.33 * total) - 1
        assert ours(2) == pytest.approx(initial + (lr - initial) * 2 / rise_end, rel=1e-12)
        down = (3 - rise_end) / (total - 1 - rise_end)
        assert ours(3) == pytest.approx(lr + (floor - lr) * down, rel=1e-12)
        assert ours(total - 1) == floor
        assert ours(total + 50) == floor

    def test_one_cycle_single_warmup_step_is_the_peak(self) -> None:
        # pct_start * T == 1 puts torch's phase-1 end at step 0 and torch raises
        # ZeroDivisionError there; here step 0 is the end of phase 1, i.e. the peak.
        ours = one_cycle(0.5, 10, pct_start=0.1)
        assert ours(0) == 0.5
        assert ours(1) < 0.5


class TestShapes:
    @PROPERTY
    @given(
        lr=lrs,
        warmup=st.integers(2, 50),
        extra=st.integers(2, 200),
        floor=fractions,
    )
    def test_warmup_cosine(self, lr: float, warmup: int, extra: int, floor: float) -> None:
        total, min_lr = warmup + extra, lr * floor
        schedule = warmup_cosine(lr, warmup, total, min_lr)
        values = curve(schedule, total + 20)
        rising, falling = values[: warmup + 1], values[warmup:]
        assert values[0] == 0.0
        assert non_decreasing(rising), "warmup must not decrease"
        assert values[warmup] == lr, "peak exactly at warmup_steps"
        assert max(values) == lr
        assert non_increasing(falling), "decay must not increase"
        assert all(v == min_lr for v in values[total:]), "floor held after total_steps"
        at, elsewhere = max_jump_at(values, warmup)
        assert at <= elsewhere * (1 + 1e-9) + 1e-15, "discontinuity at the join"

    @PROPERTY
    @given(
        lr=lrs,
        warmup=st.integers(0, 50),
        total=st.integers(1, 300),
        floor=fractions,
    )
    def test_warmup_cosine_against_reference(
        self, lr: float, warmup: int, total: int, floor: float
    ) -> None:
        assume(warmup <= total)
        min_lr = lr * floor

        def reference(step: int) -> float:  # nanoGPT's get_lr, with our endpoints
            if step < warmup:
                return lr * step / warmup
            if step >= total:
                return min_lr
            ratio = (step - warmup) / (total - warmup)
            return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * ratio)) / 2

        ours = warmup_cosine(lr, warmup, total, min_lr)
        for step in range(total + 5):
            assert math.isclose(ours(step), reference(step), rel_tol=1e-12, abs_tol=1e-15)

    def test_warmup_cosine_equals_join_of_primitives(self) -> None:
        joined = join([linear(0.0, 3e-4, 100), cosine(3e-4, 900, 3e-5)], [100])
        built = warmup_cosine(3e-4, 100, 1000, 3e-5)
        assert curve(built, 1100) == curve(joined, 1100)

    def test_cosine_endpoints_and_midpoint(self) -> None:
        schedule = cosine(1.0, 100, 0.2)
        assert schedule(0) == 1.0
        assert schedule(50) == pytest.approx(0.6, rel=1e-15)
        assert schedule(100) == 0.2
        assert schedule(10_000) == 0.2

    @PROPERTY
    @given(
        lr=lrs,
        warmup=st.integers(2, 40),
        stable=st.integers(1, 100),
        decay_steps=st.integers(2, 100),
        floor=fractions,
        shape=st.sampled_from(["linear", "cosine", "sqrt"]),
    )
    def test_wsd(
        self, lr: float, warmup: int, stable: int, decay_steps: int, floor: float, shape: str
    ) -> None:
        total, min_lr = warmup + stable + decay_steps, lr * floor
        fraction = decay_steps / total  # round(fraction * total) == decay_steps
        schedule = wsd(lr, warmup, total, fraction, min_lr, shape)  # type: ignore[arg-type]
        values = curve(schedule, total + 10)
        decay_start = total - decay_steps
        rising = values[: warmup + 1]
        assert non_decreasing(rising), "warmup must not decrease"
        assert values[warmup] == lr, "peak exactly at warmup_steps"
        assert all(v == lr for v in values[warmup : decay_start + 1]), "stable phase"
        falling = values[decay_start:]
        assert non_increasing(falling), "decay must not increase"
        assert all(v == min_lr for v in values[total:]), "floor held after total_steps"
        for boundary in (warmup, decay_start):
            at, elsewhere = max_jump_at(values, boundary)
            assert at <= elsewhere * (1 + 1e-9) + 1e-15, f"discontinuity at {boundary}"

    def test_wsd_sqrt_formula(self) -> None:
        lr, min_lr, total = 1.0, 0.1, 100
        schedule = wsd(lr, 10, total, decay_fraction=0.2, min_lr=min_lr, decay_shape="sqrt")
        for step in range(80, 101):
            progress = (step - 80) / 20
            expected = min_lr + (lr - min_lr) * (1 - math.sqrt(progress))
            assert schedule(step) == pytest.approx(expected, rel=1e-14)

    @pytest.mark.parametrize(
        ("total", "fraction", "decay_steps"),
        [(25, 0.1, 2), (35, 0.1, 4), (45, 0.1, 4), (100, 0.1, 10), (10, 1.0, 10)],
    )
    def test_wsd_decay_steps_round_half_to_even(
        self, total: int, fraction: float, decay_steps: int
    ) -> None:
        # D = round(fraction * T), Python's round: 2.5 -> 2, 3.5 -> 4, 4.5 -> 4.
        schedule = wsd(1.0, 0, total, decay_fraction=fraction, min_lr=0.0)
        decay_start = total - decay_steps
        assert schedule(decay_start) == 1.0
        assert schedule(decay_start + 1) < 1.0
        assert schedule(total) == 0.0

    def test_wsd_zero_decay_fraction_drops_at_total_steps(self) -> None:
        schedule = wsd(1.0, 2, 10, decay_fraction=0.0, min_lr=0.1)
        assert schedule(9) == 1.0
        assert schedule(10) == 0.1

    def test_wsd_without_warmup_or_stable_phase(self) -> None:
        schedule = wsd(1.0, 0, 10, decay_fraction=1.0, min_lr=0.0, decay_shape="cosine")
        assert curve(schedule, 12) == curve(cosine(1.0, 10), 12)

    @pytest.mark.parametrize("name", ["linear", "cosine", "sqrt"])
    def test_decay_shape_endpoints_and_monotone(self, name: str) -> None:
        schedule = decay_shape(name, 1.0, 0.25, 40)  # type: ignore[arg-type]
        values = curve(schedule, 60)
        assert values[0] == 1.0
        assert non_increasing(values)
        assert all(v == 0.25 for v in values[40:])

    def test_decay_shapes_differ_in_the_middle(self) -> None:
        middle = {
            name: decay_shape(name, 1.0, 0.0, 100)(25) for name in ("linear", "cosine", "sqrt")
        }
        assert middle["linear"] == pytest.approx(0.75)
        assert middle["cosine"] == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
        assert middle["sqrt"] == pytest.approx(0.5)

    def test_linear_holds_end(self) -> None:
        schedule = linear(0.1, 0.3, 4)
        assert curve(schedule, 7)[4:] == [0.3, 0.3, 0.3]

    @PROPERTY
    @given(
        lr=lrs,
        total=st.integers(20, 300),
        pct_start=st.floats(min_value=0.1, max_value=0.9),
        anneal=st.sampled_from(["cos", "linear"]),
    )
    def test_one_cycle_continuous_at_phase_change(
        self, lr: float, total: int, pct_start: float, anneal: str
    ) -> None:
        schedule = one_cycle(lr, total, pct_start, anneal=anneal)  # type: ignore[arg-type]
        values = curve(schedule, total + 5)
        boundary = math.floor(float(pct_start * total) - 1) + 1
        at, elsewhere = max_jump_at(values, boundary)
        assert at <= elsewhere * (1 + 1e-9) + 1e-15
        assert max(values) <= lr
        assert all(v == values[total - 1] for v in values[total - 1 :]), "floor held"

    def test_cosine_restarts_cycles(self) -> None:
        schedule = cosine_restarts(1.0, 4, cycle_mult=2, min_lr=0.0)
        restarts = [s for s in range(1, 60) if schedule(s) > schedule(s - 1)]
        assert restarts == [4, 12, 28]  # cycles of 4, 8, 16, ...
        assert all(schedule(s) == 1.0 for s in [0, *restarts])
        assert schedule(2) == pytest.approx(0.5)
        assert schedule(4 + 4) == pytest.approx(0.5)

    def test_step_decay_and_exponential(self) -> None:
        assert curve(step_decay(1.0, 2, 0.5), 6) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
        assert exponential(2.0, 0.5)(3) == 0.25


class TestJoin:
    def test_each_schedule_sees_its_local_step(self) -> None:
        schedule = join([lambda s: 100.0 + s, lambda s: 200.0 + s, lambda s: 300.0 + s], [3, 7])
        assert curve(schedule, 10) == [100, 101, 102, 200, 201, 202, 203, 300, 301, 302]

    def test_single_schedule_needs_no_boundary(self) -> None:
        assert join([constant(0.5)], [])(10) == 0.5

    def test_boundary_zero_skips_the_first(self) -> None:
        schedule = join([constant(1.0), linear(0.0, 1.0, 4)], [0])
        assert curve(schedule, 5) == [0.0, 0.25, 0.5, 0.75, 1.0]

    def test_nested_joins(self) -> None:
        inner = join([constant(1.0), constant(2.0)], [2])
        schedule = join([inner, constant(3.0)], [4])
        assert curve(schedule, 6) == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]

    def test_negative_step_rejected(self) -> None:
        with pytest.raises(ValueError, match="step"):
            join([constant(1.0), constant(2.0)], [2])(-1)

    @pytest.mark.parametrize(
        ("schedules_", "boundaries", "field"),
        [
            ([], [], "schedules"),
            ([constant(1.0), "x"], [3], r"schedules\[1\]"),
            ([constant(1.0), constant(2.0)], [], "boundaries"),
            ([constant(1.0), constant(2.0)], [1, 2], "boundaries"),
            ([constant(1.0), constant(2.0), constant(3.0)], [5, 5], "boundaries"),
            ([constant(1.0), constant(2.0), constant(3.0)], [5, 3], "boundaries"),
            ([constant(1.0), constant(2.0)], [-1], r"boundaries\[0\]"),
            ([constant(1.0), constant(2.0)], [1.5], r"boundaries\[0\]"),
        ],
    )
    def test_validation(self, schedules_: list[Any], boundaries: list[Any], field: str) -> None:
        with pytest.raises(ValueError, match=field):
            join(schedules_, boundaries)
