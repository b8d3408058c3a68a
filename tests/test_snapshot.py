"""``Snapshot``: capture, train on, restore -> weights, buffers and optimizer state as captured."""

import pytest
import torch
from torch import Tensor, nn

from surgeon.snapshot import Snapshot


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def train(model: nn.Module, optimizers: list[torch.optim.Optimizer], steps: int) -> None:
    model.train()
    for i in range(steps):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(i))
        for opt in optimizers:
            opt.zero_grad()
        model(x).pow(2).mean().backward()
        for opt in optimizers:
            opt.step()


def everything(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[object]:
    """Parameters, buffers, and per optimizer its groups' settings and state, cloned."""
    out: list[object] = [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]
    for opt in optimizers:
        out.append([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
        params = [p for g in opt.param_groups for p in g["params"]]
        for p in params:
            state = opt.state.get(p, {})
            out.append({k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()})
    return out


def equal(a: list[object], b: list[object]) -> bool:
    def eq(x: object, y: object) -> bool:
        if isinstance(x, Tensor):
            return isinstance(y, Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, list):
            return isinstance(y, list) and len(x) == len(y) and all(map(eq, x, y))
        return x == y

    return eq(a, b)


def two_optimizers(model: nn.Module) -> list[torch.optim.Optimizer]:
    head = list(model[3].parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    return [
        torch.optim.AdamW(body, lr=1e-2, weight_decay=0.1),
        torch.optim.SGD(head, lr=1e-2, momentum=0.9),
    ]


@pytest.mark.parametrize("location", ["cpu", "device"])
def test_restore_brings_back_exactly_what_was_captured(location: str) -> None:
    model = make_model()
    optimizers = two_optimizers(model)
    train(model, optimizers, 3)
    snap = Snapshot(location)  # type: ignore[arg-type]
    snap.capture(model, optimizers, step=3)
    captured = everything(model, optimizers)
    params = list(model.parameters())
    for opt in optimizers:  # settings change too (schedule-free keeps state in its groups)
        opt.param_groups[0]["lr"] = 123.0
        opt.param_groups[0]["extra_state"] = 7
    train(model, optimizers, 5)
    assert not equal(everything(model, optimizers), captured)
    snap.restore(model, optimizers)
    for opt in optimizers:
        opt.param_groups[0].pop("extra_state")  # not there at capture: left as the caller set it
    assert equal(everything(model, optimizers), captured)
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True))  # in place
    assert snap.step == 3


def test_state_created_after_the_capture_is_dropped_on_restore() -> None:
    """An optimizer without state at capture (before its first step) has none after restore."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    snap = Snapshot()
    snap.capture(model, [optimizer], step=0)
    before = everything(model, [optimizer])
    train(model, [optimizer], 2)
    assert optimizer.state
    snap.restore(model, [optimizer])
    assert not optimizer.state
    assert equal(everything(model, [optimizer]), before)


def test_a_restored_run_continues_as_the_original_did() -> None:
    """Restore, then train: the same weights as training on from the capture point."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, [optimizer], 2)
    snap = Snapshot()
    snap.capture(model, [optimizer], step=2)
    train(model, [optimizer], 4)
    reference = everything(model, [optimizer])
    snap.restore(model, [optimizer])
    train(model, [optimizer], 4)
    assert equal(everything(model, [optimizer]), reference)


def buffer_pointers(snap: Snapshot) -> list[int]:
    return sorted(b.data_ptr() for b in snap._buffers)


def test_buffers_are_reused_and_nbytes_counts_them() -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, [optimizer], 1)
    snap = Snapshot()
    snap.capture(model, [optimizer], step=1)
    pointers = buffer_pointers(snap)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    steps = sum(s["step"].numel() * s["step"].element_size() for s in optimizer.state.values())
    assert snap.nbytes == weights + moments + steps
    train(model, [optimizer], 1)
    snap.capture(model, [optimizer], step=2)
    assert buffer_pointers(snap) == pointers  # no new allocation


def test_bad_location_and_empty_restore_raise() -> None:
    with pytest.raises(ValueError, match=r"snapshot location.*'gpu'"):
        Snapshot("gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty snapshot"):
        Snapshot().restore(make_model(), [])


def test_a_lazy_module_is_not_captured_until_its_tensors_exist() -> None:
    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = Snapshot()
    assert snap.capture(model, [optimizer], 0) is False and snap.step is None
    model(torch.ones(2, 5))  # materializes the lazy weights
    assert snap.capture(model, [optimizer], 1) is True and snap.step == 1


def test_restore_can_leave_an_optimizers_settings_to_its_scheduler() -> None:
    """An optimizer whose LR a scheduler owns (the surgeon left it alone): its state goes back,
    its LR stays where the scheduler has it, since the scheduler is not rolled back."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    snap = Snapshot()
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    snap.capture(model, [optimizer], 1)
    weights = [p.detach().clone() for p in model.parameters()]
    momenta = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    snap.restore(model, [optimizer], keep_settings_of=[optimizer])
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    restored = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(m, r) for m, r in zip(momenta, restored, strict=True))
    assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0] == 0.1 * 0.5**3
    snap.restore(model, [optimizer])  # without: the captured LR comes back
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_extra_tensors_travel_with_the_snapshot() -> None:
    """GradScaler's scale (an extra tensor) comes back with the weights; a restore not given it
    leaves it alone. One made after the capture (an averaging callback's count at its start)
    stays as it is while the captured ones still come back (a review: a count that changed
    made the restore skip every extra, the average and GradScaler's scale alike)."""
    model = make_model()
    optimizers = two_optimizers(model)
    scale, average = torch.tensor(65536.0), torch.zeros(3)
    snapshot = Snapshot()
    snapshot.capture(model, optimizers, step=3, extra=[scale, average])
    scale.fill_(0.0625)
    average.fill_(7.0)
    snapshot.restore(model, optimizers, extra=[])
    assert scale.item() == 0.0625 and average.sum().item() == 21.0
    made_since = torch.tensor(5)
    snapshot.restore(model, optimizers, extra=[scale, made_since, average])
    assert scale.item() == 65536.0 and average.sum().item() == 0.0 and made_since.item() == 5


def test_repair_buffers_puts_back_only_the_non_finite_entries() -> None:
    model = make_model()
    optimizers = two_optimizers(model)
    train(model, optimizers, 2)
    snapshot = Snapshot()
    snapshot.capture(model, optimizers, step=2)
    saved_mean = model[1].running_mean.clone()
    train(model, optimizers, 3)
    weights = [p.detach().clone() for p in model.parameters()]
    live_var = model[1].running_var.clone()
    model[1].running_mean[[0, 5]] = torch.tensor([float("nan"), float("inf")])
    expected_mean = model[1].running_mean.clone()
    expected_mean[[0, 5]] = saved_mean[[0, 5]]
    assert snapshot.repair_buffers(model) == 1  # one buffer had any
    assert torch.equal(model[1].running_mean, expected_mean)
    assert torch.equal(model[1].running_var, live_var)  # finite: untouched
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    with pytest.raises(ValueError, match="other than the captured"):
        snapshot.repair_buffers(nn.Sequential(nn.Linear(4, 8)))
