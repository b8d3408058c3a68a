"""``NonFiniteGuard``: a step with a non-finite loss or gradient changes no weight and no state.

Each optimizer is stepped twice normally (so it has state: momentum, moments, step counts),
then once with a NaN/inf planted in a gradient or in the loss; every parameter and every
state tensor must be bit-for-bit what it was before that step, and a following finite step
must be applied again.
"""

import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import TinyRegressor, make_loader
from torch import Tensor, nn

from surgeon import ScheduleSurgeon
from surgeon.controller import EventKind
from surgeon.guard import NonFiniteGuard, mechanism_for

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=0.01, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
}
EXPECTED_MECHANISM = {
    "sgd-momentum": "host",
    "sgd-fused": "found_inf",
    "adamw-foreach": "host",
    "adam-fused": "found_inf",
    "adamw-fused": "found_inf",
}


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter and every tensor of the optimizer state, cloned."""
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
    return [t.detach().clone() for t in [*model.parameters(), *state]]


def same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def guarded_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    guard: NonFiniteGuard,
    poison: str | None = None,
) -> Tensor:
    """One forward/backward/step through the guard; ``poison`` plants NaN in the gradient, the
    loss, or inf in the gradient. Returns the guard's flag."""
    optimizer.zero_grad()
    loss = model(torch.ones(4, 3)).pow(2).mean()
    loss.backward()
    if poison == "grad-nan":
        model.weight.grad[0, 0] = math.nan
    if poison == "grad-inf":
        model.bias.grad[0] = math.inf
    # "loss-nan": the loss the hook sees is NaN while the gradients stay finite
    guard.add_loss(loss.detach() + math.nan if poison == "loss-nan" else loss)
    flag = guard.check(optimizer)
    assert flag is not None
    optimizer.step()
    guard.release()
    return flag


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("poison", ["grad-nan", "grad-inf", "loss-nan"])
def test_a_non_finite_step_changes_nothing(name: str, poison: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = OPTIMIZERS[name](model.parameters())
    guard = NonFiniteGuard("auto")
    assert guard.mechanism(optimizer) == EXPECTED_MECHANISM[name]
    for _ in range(2):
        assert guarded_step(model, optimizer, guard).item() == 0.0
    before = snapshot(model, optimizer)
    assert guarded_step(model, optimizer, guard, poison).item() == 1.0
    assert same(snapshot(model, optimizer), before), "the non-finite step changed something"
    assert not hasattr(optimizer, "found_inf")  # released: a later step is not skipped
    assert guarded_step(model, optimizer, guard).item() == 0.0
    assert not same(snapshot(model, optimizer), before), "the next finite step was not applied"
    assert all(torch.isfinite(t).all() for t in snapshot(model, optimizer))


def test_without_the_guard_the_same_step_poisons_the_weights() -> None:
    """The control for the test above: the planted NaN does reach the weights unguarded."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = NonFiniteGuard("off")
    assert guard.mechanism(optimizer) == "none"
    model(torch.ones(4, 3)).pow(2).mean().backward()
    model.weight.grad[0, 0] = math.nan
    assert guard.check(optimizer) is None
    optimizer.step()
    assert torch.isnan(model.weight).any()


def test_the_flag_is_reduced_across_ranks_before_it_is_used() -> None:
    """A rank whose own step is finite still skips when another rank's was not (the max)."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[float] = []

    def other_rank_was_bad(flag: Tensor) -> None:
        seen.append(flag.item())
        flag.fill_(1.0)

    guard = NonFiniteGuard("auto", reduce_max=other_rank_was_bad)
    before = snapshot(model, optimizer)
    flag = guarded_step(model, optimizer, guard)
    assert seen == [0.0] and flag.item() == 1.0
    assert same(snapshot(model, optimizer), before)


def test_cuda_optimizers_that_are_not_fused_are_left_alone_in_auto_mode() -> None:
    """Skipping them would need a host sync per step: ``auto`` does not, ``always`` does."""
    param = nn.Parameter(torch.zeros(2, device="meta"))
    optimizer = torch.optim.SGD([param], lr=0.1)
    # the rule only looks at devices: a parameter that is not on the CPU stands in for CUDA
    assert mechanism_for(optimizer, "auto") == "none"
    assert mechanism_for(optimizer, "always") == "host"
    assert mechanism_for(optimizer, "off") == "none"


def test_bad_mode_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"skip_nonfinite.*'sometimes'"):
        NonFiniteGuard("sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["SGD", "SGD-fused"])
def test_a_param_group_added_later_is_checked_and_skipped_too(name: str) -> None:
    """``add_param_group`` mid-fit (``BaseFinetuning`` does): the guard sees the new group."""
    torch.manual_seed(0)
    head, backbone = nn.Linear(3, 2), nn.Linear(3, 2)
    fused = name == "SGD-fused"
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, fused=fused)
    guard = NonFiniteGuard("auto")
    guard.check(optimizer)  # watched with one group
    optimizer.add_param_group({"params": list(backbone.parameters()), "lr": 0.01})
    (head(torch.ones(4, 3)) + backbone(torch.ones(4, 3))).pow(2).mean().backward()
    backbone.weight.grad[0, 0] = math.nan
    before = [t.detach().clone() for t in [*head.parameters(), *backbone.parameters()]]
    flag = guard.check(optimizer)
    assert flag is not None and flag.item() == 1.0
    optimizer.step()
    guard.release()
    after = [*head.parameters(), *backbone.parameters()]
    assert same([t.detach() for t in after], before)


def test_a_skipped_first_step_of_a_fused_optimizer_leaves_no_state_behind() -> None:
    """Fused SGD creates its momentum (from uninitialised memory) even on a step ``found_inf``
    skips; the guard checks a stateless optimizer on the host and takes the gradients away, so
    the first good step after it is exactly a first step."""
    for _ in range(3):  # uninitialised memory: garbage shows up on some allocations only
        garbage = torch.full((1000,), 123.0)
        del garbage
        p = nn.Parameter(torch.ones(1000))
        optimizer = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
        guard = NonFiniteGuard("auto")
        assert guard.mechanism(optimizer) == "found_inf"
        p.grad = torch.full((1000,), math.nan)
        flag = guard.check(optimizer)
        assert flag is not None and flag.item() == 1.0
        optimizer.step()
        guard.release()
        assert not optimizer.state and torch.equal(p.detach(), torch.ones(1000))
        p.grad = torch.ones(1000)
        guard.check(optimizer)
        assert hasattr(optimizer, "found_inf") is False  # still stateless: checked on the host
        optimizer.step()
        guard.release()
        assert torch.allclose(p.detach(), torch.full((1000,), 0.9))
        p.grad = torch.ones(1000)
        guard.check(optimizer)
        assert hasattr(optimizer, "found_inf")  # state exists now: back to the sync-free path
        optimizer.step()
        guard.release()


def test_sparse_gradients_are_checked_by_their_values() -> None:
    """``nn.Embedding(sparse=True)``: the check kernel has no sparse version; the guard checks
    the coalesced values, as GradScaler does, and skips a step whose sparse gradient has a NaN."""
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 4, sparse=True)
    optimizer = torch.optim.SGD(embedding.parameters(), lr=0.1)
    guard = NonFiniteGuard("auto")
    ids = torch.tensor([1, 2, 2, 7])
    for poison, expected in ((False, 0.0), (True, 1.0), (False, 0.0)):
        optimizer.zero_grad()
        loss = embedding(ids).pow(2).mean()
        loss.backward()
        grad = embedding.weight.grad
        assert grad is not None and grad.is_sparse
        if poison:
            grad._values()[0, 0] = math.nan
        before = embedding.weight.detach().clone()
        guard.add_loss(loss)
        flag = guard.check(optimizer)
        assert flag is not None and flag.item() == expected
        optimizer.step()
        guard.release()
        assert torch.equal(embedding.weight.detach(), before) == poison  # skipped <=> flagged


def test_a_group_that_first_gets_gradients_at_a_skipped_step_gets_no_state() -> None:
    """The optimizer has state, but a group (a backbone unfrozen later) gets its first gradient
    at a non-finite step: fused SGD would create that group's momentum from uninitialised memory
    even though ``found_inf`` skips the step; the guard checks it on the host instead."""
    a, b = nn.Parameter(torch.ones(1000)), nn.Parameter(torch.ones(1000))
    optimizer = torch.optim.SGD(
        [{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9, fused=True
    )
    guard = NonFiniteGuard("auto")

    def step(grad_a: float, grad_b: float | None) -> float:
        a.grad = torch.full((1000,), grad_a)
        b.grad = None if grad_b is None else torch.full((1000,), grad_b)
        flag = guard.check(optimizer)
        assert flag is not None
        optimizer.step()
        guard.release()
        return flag.item()

    assert step(1.0, None) == 0.0 and b not in optimizer.state  # b frozen
    assert step(1.0, math.nan) == 1.0  # b's first gradient, non-finite: skipped
    assert b not in optimizer.state and torch.equal(b.detach(), torch.ones(1000))
    assert step(1.0, 1.0) == 0.0
    assert torch.allclose(b.detach(), torch.full((1000,), 0.9))  # a clean first step for b


def test_every_optimizer_of_a_step_sees_its_losses() -> None:
    """Manual optimization, one backward, two optimizers stepped: a NaN loss with finite
    gradients flags both, not only the first one checked."""
    first, second = nn.Linear(3, 2), nn.Linear(3, 2)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (first, second)]
    guard = NonFiniteGuard("auto")
    loss = (first(torch.ones(4, 3)) + second(torch.ones(4, 3))).pow(2).mean()
    loss.backward()
    guard.add_loss(loss.detach() + math.nan)
    flags = [guard.check(optimizer) for optimizer in optimizers]
    assert [f.item() for f in flags if f is not None] == [1.0, 1.0]
    guard.release()
    assert guard.check(optimizers[0]) is None  # released: no gradients, no losses left


def test_lbfgs_is_left_to_the_rollback_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """LBFGS runs the check inside its own step, after moving the weights: too late to skip."""
    optimizer = torch.optim.LBFGS(nn.Linear(3, 2).parameters())
    for mode in ("auto", "always"):
        assert mechanism_for(optimizer, mode) == "none"  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="surgeon"):
        NonFiniteGuard("auto").mechanism(optimizer)
    assert "LBFGS" in caplog.text and "rollback" in caplog.text


def test_complex_gradients_are_checked_by_their_real_and_imaginary_parts() -> None:
    weight = nn.Parameter(torch.ones(4, dtype=torch.complex64))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    guard = NonFiniteGuard("auto")
    for poison in (None, complex(0.0, math.inf), complex(math.nan, 1.0)):
        weight.grad = torch.ones(4, dtype=torch.complex64)
        if poison is not None:
            weight.grad[1] = poison
        flag = guard.check(optimizer)
        assert flag is not None and flag.item() == (poison is not None), poison
        guard.release()


def test_fused_sgd_without_momentum_stays_on_the_sync_free_path() -> None:
    """It keeps no state at all, so there is no first step to fear: ``found_inf`` every step."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    guard = NonFiniteGuard("auto")
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.ones(4, 3)).pow(2).mean().backward()
        guard.check(optimizer)
        assert hasattr(optimizer, "found_inf")  # armed: nothing read on the host
        optimizer.step()
        guard.release()


# ---------------------------------------------------------------------------- sampled gradients
def test_on_the_cpu_gradients_are_checked_every_nth_step_and_losses_every_step() -> None:
    """``grad_check_every=4``: steps 0, 4, 8 read every gradient; the others read the loss
    alone. A NaN loss is skipped on any step, a NaN gradient with a finite loss only on a
    checked one (elsewhere it is applied: the gap a rollback closes, tested below)."""
    guard = NonFiniteGuard("auto", grad_check_every=4)
    plan = {1: "loss-nan", 2: "grad-nan", 4: "grad-nan", 6: "grad-inf", 8: "grad-inf"}
    skipped, changed, optimizers = [], [], []
    for step in range(9):
        torch.manual_seed(0)  # finite weights again each step: the steps are independent
        model = nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        optimizers.append(optimizer)  # alive: a new one each step, the same guard's count goes on
        assert guard.mechanism(optimizer) == "host"
        before = snapshot(model, optimizer)
        if guarded_step(model, optimizer, guard, plan.get(step)).item() == 1.0:
            skipped.append(step)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            changed.append(step)
        assert not same(snapshot(model, optimizer), before) or step in skipped
    assert skipped == [1, 4, 8]
    assert changed == [2, 6]  # applied: the weights went non-finite


@pytest.mark.parametrize("where", ["fused", "no-losses", "reduced"])
def test_the_gradients_are_checked_every_step_where_the_loss_is_not_read_on_the_host(
    where: str,
) -> None:
    """Sampling needs the loss read on the host every step: a fused optimizer (``found_inf``,
    no read), DDP (``check_losses=False``: the gradients carry every rank's loss) and a flag
    reduced across ranks get every gradient checked on every step."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=where == "fused")
    guard = NonFiniteGuard(
        "auto",
        reduce_max=(lambda flag: None) if where == "reduced" else None,
        check_losses=where != "no-losses",
        grad_check_every=8,
    )
    guarded_step(model, optimizer, guard)  # step 0 (state exists from here)
    before = snapshot(model, optimizer)
    assert guarded_step(model, optimizer, guard, "grad-nan").item() == 1.0  # step 1: checked
    assert same(snapshot(model, optimizer), before)


def test_bad_grad_check_every_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"grad_check_every must be an integer >= 1.*=0"):
        NonFiniteGuard("auto", grad_check_every=0)


class GradPoisoner(TinyRegressor):
    """Plants a NaN in one gradient at ``bad_step`` while the loss stays finite."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.bad_step = bad_step

    def on_after_backward(self) -> None:
        if self.global_step == self.bad_step:
            self.net[0].weight.grad[0, 0] = math.nan


def events_at(surgeon: ScheduleSurgeon, step: int) -> list[EventKind]:
    """The decisions at ``step`` (the plan's own phase changes left out: one may share it)."""
    plan = (EventKind.DECAY_START, EventKind.DONE)
    return [e.kind for e in surgeon.events if e.step == step and e.kind not in plan]


def test_a_nan_gradient_on_an_unchecked_step_is_rolled_back(make_trainer: Callable) -> None:
    """``grad_check_every=8`` (gradients every 8th step on the CPU): a NaN gradient with a
    finite loss at step 30 is applied; the three NaN losses after it are skipped, then the last
    good snapshot is restored. The fit ends with finite weights that kept training."""
    surgeon = ScheduleSurgeon(grad_check_every=8)
    model = GradPoisoner(bad_step=30)
    make_trainer([surgeon], max_steps=80).fit(model, make_loader())
    assert events_at(surgeon, 30) == []  # not seen: its update was applied
    for step in (31, 32, 33):
        assert events_at(surgeon, step)[:2] == [EventKind.NONFINITE, EventKind.SKIPPED_STEP]
    rollback = next(e for e in surgeon.events if e.kind is EventKind.ROLLBACK)
    assert rollback.step == 33 and "3 non-finite steps in a row" in rollback.reason
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(model.records[-1]["loss"]) and model.records[-1]["loss"] < 1.0


@pytest.mark.parametrize(
    ("kwargs", "bad_step"),
    [({}, 32), ({"snapshot": "off"}, 30)],
    ids=["checked-step", "no-snapshots-every-step"],
)
def test_a_nan_gradient_on_a_checked_step_is_skipped(
    make_trainer: Callable, kwargs: dict[str, Any], bad_step: int
) -> None:
    """Step 32 is a checked step; without snapshots (no rollback to repair a miss) every step
    is, step 30 included: the update is skipped, nothing is rolled back."""
    surgeon = ScheduleSurgeon(**kwargs)
    model = GradPoisoner(bad_step=bad_step)
    make_trainer([surgeon], max_steps=60).fit(model, make_loader())
    assert events_at(surgeon, bad_step) == [EventKind.NONFINITE, EventKind.SKIPPED_STEP]
    assert EventKind.ROLLBACK not in [e.kind for e in surgeon.events]
    assert all(torch.isfinite(p).all() for p in model.parameters())
