"""``Controller.cool_down``: the end of the run brought forward (a time budget, an EarlyStopping
about to stop the fit, a request), on scripted loss streams.

The caller reads losses late: it asks for a cooldown from ``start``, the first step whose LR it
has not written yet, while the controller's next loss is a few steps behind. The LR at ``start``
must not move, the decay must reach the floor at the new end, and the losses still to come for
the steps before ``start`` must not turn the phase back or re-plan the cooldown away.
"""

import itertools
import math

import pytest

from surgeon.config import SurgeonConfig
from surgeon.controller import Controller, EventKind, Phase

LAG = 6
"""Steps the caller is ahead of the controller's next loss (the feed's lag is 4-7)."""


def flat(n: int, level: float = 1.0) -> list[float]:
    """A loss stream with a little deterministic wiggle (no spikes, no plateau cuts soon)."""
    return [level + 0.01 * math.sin(t) for t in range(n)]


def run(controller: Controller, losses: list[float]) -> list[float]:
    """Feed ``losses``; the LR scale of each step, asked ``LAG`` steps ahead (as the callback)."""
    scales = []
    for loss in losses:
        scales.append(controller.lr_scale(controller.step + LAG))
        controller.update(loss)
    return scales


@pytest.mark.parametrize("decay", ["wsd", "cosine", "linear", "sqrt"])
def test_the_lr_goes_on_from_where_it_is_to_the_floor_at_the_new_end(decay: str) -> None:
    config = SurgeonConfig(warmup=20, decay=decay, min_lr_ratio=0.1, plateau_patience=1.0)
    c = Controller(1000, config)
    for loss in flat(300):
        c.update(loss)
    start, steps = c.step + LAG, 50
    level = c.lr_scale(start)
    event = c.cool_down(start, steps, "requested")
    assert event.kind is EventKind.COOLDOWN and event.step == start - 1
    assert event.scale_before == event.scale_after == pytest.approx(level)
    assert f"over {steps} steps; the plan now ends at step {start + steps}" in event.reason
    assert c.total_steps == start + steps and c.phase is Phase.DECAY
    curve = [c.lr_scale(t) for t in range(start, start + steps + 5)]
    assert curve[0] == pytest.approx(level)
    assert curve == sorted(curve, reverse=True) and curve[1] < level
    assert curve[steps:] == [pytest.approx(c.floor)] * 5
    if decay == "wsd":  # its linear tail: equal steps down
        diffs = [a - b for a, b in itertools.pairwise(curve[: steps + 1])]
        assert diffs == [pytest.approx(diffs[0])] * steps


def test_the_losses_still_to_come_keep_the_phase_and_end_the_plan() -> None:
    """The losses of the steps before ``start`` arrive after the decision: the phase stays
    ``decay`` (no turn back to ``stable``, no ``decay_start``), and ``done`` comes at the end."""
    c = Controller(1000, SurgeonConfig(warmup=20, plateau_patience=1.0))
    for loss in flat(300):
        c.update(loss)
    start = c.step + LAG
    c.cool_down(start, 40, "requested")
    phases = []
    for loss in flat(60):
        c.update(loss)
        phases.append(c.phase)
    kinds = [e.kind for e in c.events]
    assert kinds == [EventKind.WARMUP_END, EventKind.COOLDOWN, EventKind.DONE]
    assert set(phases[: start + 40 - 301]) == {Phase.DECAY} and phases[-1] is Phase.DONE
    assert c.events[-1].step == start + 40 - 1


def test_a_cooldown_in_warmup_ends_it() -> None:
    """No ``warmup_end`` follows (at ``max_warmup`` or on stabilization): the decay goes on from
    the ramp's level, which the floor bounds from below."""
    c = Controller(10_000, SurgeonConfig(min_warmup=1000, max_warmup=2000, min_lr_ratio=0.1))
    for loss in flat(60):
        c.update(loss)
    start = c.step + LAG
    ramp_level = c.lr_scale(start)
    assert ramp_level < c.floor  # early in the ramp
    c.cool_down(start, 30, "requested")
    assert c.phase is Phase.DECAY
    for loss in flat(100):
        c.update(loss)
    assert [e.kind for e in c.events] == [EventKind.COOLDOWN, EventKind.DONE]
    assert c.lr_scale(start + 1) == c.floor  # the floor from the first step after


def test_a_spike_cut_in_force_stays_and_recovers_over_the_decay() -> None:
    c = Controller(1000, SurgeonConfig(warmup=20, spike_cooldown=5, spike_recovery=10))
    losses = flat(300)
    losses[295:297] = [20.0, 20.0]  # a spike and the loss that confirms it
    for loss in losses:
        c.update(loss)
    assert c.intervention.mode != "normal"
    start = c.step + LAG
    before = c.lr_scale(start)
    c.cool_down(start, 100, "requested")
    assert c.lr_scale(start) == pytest.approx(before)  # the cut multiplier still applies
    for loss in flat(120):
        c.update(loss)
    assert c.intervention.mode == "normal"  # recovered
    assert c.lr_scale(start + 100) == pytest.approx(c.floor)


def test_a_second_cooldown_moves_the_end_from_the_current_level() -> None:
    """A time budget re-plans its cooldown as the step rate changes: later or sooner, from the
    LR where it is."""
    c = Controller(1000, SurgeonConfig(warmup=20, plateau_patience=1.0))
    for loss in flat(300):
        c.update(loss)
    c.cool_down(c.step + LAG, 100, "first")
    for loss in flat(40):
        c.update(loss)
    start = c.step + LAG
    level = c.lr_scale(start)
    c.cool_down(start, 150, "later")
    assert c.lr_scale(start) == pytest.approx(level) and c.total_steps == start + 150
    assert c.lr_scale(start + 149) > c.floor == pytest.approx(c.lr_scale(start + 150))


def test_a_cooled_down_state_resumes_exactly() -> None:
    """Saved after a cooldown, loaded into a controller planned for the cooled-down length
    (the callback plans a resumed fit with the checkpoint's): the same LRs and events follow."""
    config = SurgeonConfig(warmup=20, plateau_patience=1.0)
    c = Controller(1000, config)
    for loss in flat(300):
        c.update(loss)
    c.cool_down(c.step + LAG, 80, "requested")
    for loss in flat(10):
        c.update(loss)
    resumed = Controller(c.total_steps, config)
    resumed.load_state_dict(c.state_dict())
    tail = flat(100)
    assert run(resumed, tail) == run(c, tail)
    assert resumed.events == c.events and c.phase is Phase.DONE


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_cooldown_length_must_be_a_positive_int(steps: object) -> None:
    c = Controller(100)
    with pytest.raises(ValueError, match=r"steps="):
        c.cool_down(10, steps, "requested")  # type: ignore[arg-type]


def time_planned_run(record_every_move: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """A plain loop whose steps take 1 ms at first and speed up to 0.5 ms by the end (+- 30%
    jitter, seeded), only a 2.5 s budget bounding it (as ``max_time``: a ``TimePlanner`` checked
    every 4 steps on this clock); ``record_every_move``: every re-planned cooldown is recorded,
    as before ``RECORDED_MOVE``. Returns each step's LR, the cooldown events, the planned end."""
    import random

    import torch

    from surgeon import Surgeon, planning

    if record_every_move:
        monkeypatch.setattr(planning, "RECORDED_MOVE", 0.0)
    rng, clock, budget = random.Random(0), [0.0], 2.5
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    surgeon = Surgeon(optimizer, planning.OPEN_ENDED, verbose=False, warmup=50)
    planner = planning.TimePlanner(
        surgeon.engine,
        surgeon.engine.config,
        elapsed=lambda: clock[0],
        remaining=lambda: budget - clock[0],
        every=4,
        plan_cap=None,
        probing=False,
    )
    lrs = []
    while clock[0] < budget:
        lrs.append(surgeon.get_last_lr()[0])
        speed = 1.0 - 0.5 * clock[0] / budget
        clock[0] += 1e-3 * speed * (1.0 + 0.3 * rng.gauss(0.0, 1.0))
        surgeon.step(1.0)
        if surgeon.last_step >= planner.next_check:
            planner.check()
    cooldowns = [e for e in surgeon.events if e.kind is EventKind.COOLDOWN]
    return lrs, cooldowns, surgeon.controller.total_steps


def test_a_max_time_cooldown_records_only_moves_of_its_end_over_two_percent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host that speeds up moves the estimated end at check after check: the cooldown follows
    it exactly as when each move was recorded (the same LR every step, the same end), but
    records a move only when the end moved by more than 2% of the run since the last record."""
    lrs, few, end = time_planned_run(False, monkeypatch)
    same_lrs, every, same_end = time_planned_run(True, monkeypatch)
    assert lrs == same_lrs and end == same_end
    assert len(every) >= 12 and len(few) <= 8
    ends = [int(e.reason.rsplit("ends at step ", 1)[1]) for e in few]
    assert all(abs(b - a) > 0.02 * b for a, b in itertools.pairwise(ends))
    assert abs(end - ends[-1]) <= 0.02 * end  # the last record says where the run ends


def test_an_unrecorded_cooldown_moves_the_plan_alike_and_adds_no_event() -> None:
    """``record=False`` (a move too small to report): the same plan and returned event as a
    recorded cooldown, but nothing added to the controller's events."""
    recorded, quiet = (Controller(1000, SurgeonConfig(warmup=20)) for _ in range(2))
    for c in (recorded, quiet):
        for loss in flat(300):
            c.update(loss)
    before = list(quiet.events)
    event = quiet.cool_down(quiet.step + LAG, 100, "moved", record=False)
    assert event == recorded.cool_down(recorded.step + LAG, 100, "moved")
    assert quiet.events == before and recorded.events[-1] == event
    assert [quiet.lr_scale(s) for s in range(300, 420)] == [
        recorded.lr_scale(s) for s in range(300, 420)
    ]
