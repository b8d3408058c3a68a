"""``warmup`` takes a fraction of the run like every other length.

``warmup=0.1`` on a 200-step run is ``warmup=20``: the same LR at every step and the same
events, in the controller and in a real fit; bad values are refused naming the field.
"""

import math
from typing import Any

import pytest
from conftest import TinyRegressor, make_loader

from surgeon import Controller, SurgeonConfig
from surgeon.callback import ScheduleSurgeon
from surgeon.controller import EventKind

TOTAL = 200


@pytest.mark.parametrize(("fraction", "steps"), [(0.1, 20), (0.0125, 2), (1.0, TOTAL)])
def test_a_fractional_warmup_is_that_share_of_the_run(fraction: float, steps: int) -> None:
    by_fraction = Controller(TOTAL, SurgeonConfig(warmup=fraction))
    by_steps = Controller(TOTAL, SurgeonConfig(warmup=steps))
    assert by_fraction.max_warmup == by_fraction.min_warmup == steps
    scales = []
    for step in range(TOTAL):
        scales.append(by_fraction.lr_scale(step))
        assert scales[-1] == by_steps.lr_scale(step), step
        assert by_fraction.update(1.0) == by_steps.update(1.0), step
    ramp = scales[: steps + 1]
    assert ramp == sorted(ramp) and ramp[0] < 1.0  # a linear ramp
    assert ramp[-1] == 1.0 or steps == TOTAL  # ... to the peak, unless it is the whole run


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1, math.nan, math.inf, True, "10"])
def test_a_bad_warmup_is_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(ValueError, match=r"warmup.*got warmup="):
        SurgeonConfig(warmup=value)
    with pytest.raises(ValueError, match=r"got warmup="):
        ScheduleSurgeon(warmup=value)


def test_a_fractional_warmup_in_a_real_fit(make_trainer: Any) -> None:
    surgeon = ScheduleSurgeon(warmup=0.25)
    trainer = make_trainer([surgeon], max_steps=20)
    model = TinyRegressor()
    trainer.fit(model, make_loader())
    (end,) = [e for e in surgeon.events if e.kind is EventKind.WARMUP_END]
    assert end.step == 4 and "fixed warmup of 5 steps" in end.reason
    lrs = [record["lrs"][0][0] for record in model.records]
    assert lrs[:6] == pytest.approx([0.05 * (step + 1) / 6 for step in range(5)] + [0.05])
