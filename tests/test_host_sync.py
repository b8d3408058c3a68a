"""The surgeon's per-step hooks make no host sync; a readback step makes a bounded few.

A host sync is the CPU waiting on the device to learn a value. On CUDA it stalls the
pipeline; on CPU it costs nothing, so CI needs a way to *see* one without a GPU:

* ``aten._local_scalar_dense`` is what ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``,
  ``if t > 0:`` and ``math.isfinite(t)`` dispatch to (``aten.is_nonzero`` on some paths);
  a ``TorchDispatchMode`` sees it on any device.
* ``Tensor.tolist()``, ``.numpy()``, ``np.asarray(t)`` and ``.cpu()`` dispatch *nothing* on a
  CPU tensor (measured with torch 2.13: ``tolist`` reads the storage directly), yet each is
  a device-to-host copy, hence a sync, on CUDA. A ``TorchFunctionMode`` sees them as
  ``Tensor`` method calls.

:func:`count_host_syncs` enters both modes and records every such call. It is entered only
inside the callback's per-step hooks (``on_train_batch_start``, ``on_before_backward``,
``on_before_optimizer_step``, ``on_train_batch_end``; see :class:`CountingSurgeon`), so
``training_step``, the optimizer and Lightning's own loop are not counted. The model's
optimizer is fused SGD: the non-finite guard hands it ``found_inf`` and reads nothing, as
it does on CUDA (with a non-fused optimizer on CPU the guard reads its flag on the host,
free there; :func:`test_the_guard_reads_its_flag_only_where_that_is_free`). The rules
asserted, with ``R = readback_every`` and ``g`` the optimizer step count after the step
(``trainer.global_step`` in ``on_train_batch_end``):

* ``on_train_batch_start``, ``on_before_backward``, ``on_before_optimizer_step``: no sync
  (snapshot copies and the guard's flag stay on the device), except one read of the guard's
  flag before the very first optimizer step: the fused optimizer has no state yet, and a
  step skipped through ``found_inf`` would still create it (see :mod:`surgeon.guard`);
* ``on_train_batch_end`` where ``g`` is not a multiple of ``R`` (and every micro-batch that
  does not close an optimizer step): no sync;
* where ``g`` is a multiple of ``R``: at most :data:`MAX_SYNCS_PER_READBACK`, and the
  readback of the block before really is seen (one ``tolist``), so the counter is known to
  be looking at the right place.

``test_counter_catches_*`` prove the rules bite: the feed is patched to read the loss
synchronously each step, the way a careless change would, and the same check must fail.

On CUDA, :func:`test_cuda_hooks_do_not_sync` runs the hooks under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronizing CUDA call
(``cudaStreamSynchronize``, blocking copies, ``.item()``) made inside them. The feed's one
legitimate wait, ``torch.cuda.Event.synchronize`` on a copy finished steps ago, is not a
stream sync and is not flagged. ``16-mixed`` is included: the surgeon only stacks the
scaler's ``_scale`` tensor with the loss and reads it one block later. (With a non-fused
optimizer GradScaler itself reads ``found_inf`` with ``.item()`` inside ``scaler.step``:
torch's sync, outside the surgeon's hooks; the fused SGD used here avoids it.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyRegressor, make_loader
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from surgeon import ScheduleSurgeon
from surgeon.loss_feed import LossFeed

FLAG_READ = ["Tensor.item", "aten._local_scalar_dense"]
"""The guard's one read of its flag, or of the loss (``.item()``)."""

MAX_SYNCS_PER_READBACK = 2
"""Host reads allowed in a readback step's hooks: the block's ``tolist``, and once per snapshot
the ``tolist`` of its NaN/inf flag of what it copied (computed at the snapshot, steps before
the block's losses: on CUDA the block's read has waited for it already)."""

SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero"})
"""aten ops (overload packet names) that read a device value on the host."""

HOST_READ_METHODS = frozenset(
    {"tolist", "numpy", "__array__", "cpu", "item", "__float__", "__int__", "__bool__"}
)
"""``Tensor`` methods that copy a value to the host (on CPU some dispatch nothing)."""


# ---------------------------------------------------------------------------- the counter
class _DispatchCounter(TorchDispatchMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.seen.append(f"aten.{name}")
        return func(*args, **(kwargs or {}))


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READ_METHODS:
            self.seen.append(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_syncs() -> Iterator[list[str]]:
    """Yield a list that fills with one name per host read made inside the block.

    ``item()`` shows up twice (``Tensor.item`` and ``aten._local_scalar_dense``): the test
    counts calls that *exist*, and only a bound on readback steps cares about the number.
    """
    seen: list[str] = []
    with _FunctionCounter(seen), _DispatchCounter(seen):
        yield seen


def test_counter_sees_every_host_read_flavour() -> None:
    """Each way of pulling a value to the host is seen, on CPU, where none of them stalls."""
    t = torch.randn(3)
    reads: dict[str, Callable[[], Any]] = {
        "item": lambda: t[0].item(),
        "float": lambda: float(t[0]),
        "int": lambda: int(t[0]),
        "bool": lambda: bool(t[0] > 0),
        "if": lambda: 1 if t[0] > 0 else 0,
        "isfinite": lambda: math.isfinite(t[0]),
        "tolist": lambda: t.tolist(),
        "numpy": lambda: t.numpy(),
        "cpu": lambda: t.cpu(),
        "format": lambda: f"{t[0]:.3f}",
    }
    for name, read in reads.items():
        with count_host_syncs() as seen:
            read()
        assert seen, f"{name}: a host read the counter does not see"
    with count_host_syncs() as seen:  # device-side work is not a host read
        torch.stack([t.sum(), (t * 2).mean()]).float().reshape(2, 1)
    assert seen == []


# ---------------------------------------------------------------------------- the harness
@dataclass
class HookCall:
    """One hook call: which hook, the optimizer step count after it, what it read."""

    hook: str
    global_step: int
    closed_step: bool
    syncs: list[str] = field(default_factory=list)


class CountingSurgeon(ScheduleSurgeon):
    """``ScheduleSurgeon`` whose per-step hooks run inside :func:`count_host_syncs`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[HookCall] = []
        self._batch_start_step = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self._batch_start_step = trainer.global_step
        with count_host_syncs() as seen:
            super().on_train_batch_start(trainer, pl_module, batch, idx)
        self.calls.append(HookCall("start", trainer.global_step, False, seen))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        with count_host_syncs() as seen:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)
        closed = trainer.global_step != self._batch_start_step  # the optimizer stepped
        self.calls.append(HookCall("end", trainer.global_step, closed, seen))

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        with count_host_syncs() as seen:
            super().on_before_backward(trainer, pl_module, loss)
        self.calls.append(HookCall("before_backward", trainer.global_step, False, seen))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        with count_host_syncs() as seen:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.calls.append(HookCall("before_optimizer_step", trainer.global_step, False, seen))


def check_hook_syncs(calls: list[HookCall], readback_every: int) -> None:
    """The rules of the module docstring; raises ``AssertionError`` naming the offending call."""
    readbacks = []
    for call in calls:
        due = call.hook == "end" and call.closed_step and call.global_step % readback_every == 0
        if call.hook == "before_optimizer_step" and call.global_step == 0:
            assert call.syncs in ([], FLAG_READ), call  # the first step's, with no state yet
        elif due:
            assert len(call.syncs) <= MAX_SYNCS_PER_READBACK, call
            readbacks.append(call)
        else:
            assert call.syncs == [], call
    # blocks are read one block late: from the second block on, each readback step reads one
    late = [c for c in readbacks if c.global_step >= 2 * readback_every]
    assert late, "the run is too short to reach a readback"
    assert all("Tensor.tolist" in c.syncs for c in late), late


def run_counted(
    make_trainer: Callable[..., Any],
    *,
    readback_every: int,
    steps: int = 24,
    fused: bool = True,
    **trainer_kw: Any,
) -> CountingSurgeon:
    # snapshot_every=10 (the least): snapshots, and the guard every step, in the counted hooks
    surgeon = CountingSurgeon(readback_every=readback_every, snapshot_every=10)
    trainer = make_trainer([surgeon], max_steps=steps, **trainer_kw)
    trainer.fit(TinyRegressor(fused=fused), make_loader(batches=8))
    assert surgeon.step == steps
    assert surgeon.controller is not None
    assert surgeon.controller.good_snapshot_step is not None  # snapshots were taken, and kept
    return surgeon


@pytest.mark.parametrize(
    ("readback_every", "trainer_kw"),
    [
        (4, {}),
        (3, {"accumulate_grad_batches": 2}),
        (1, {}),
        (4, {"precision": "bf16-mixed"}),
        (5, {"logger": "csv"}),
    ],
    ids=["fp32", "accumulate", "every-step", "bf16-mixed", "with-logger"],
)
def test_hooks_make_no_host_sync_off_readback_steps(
    make_trainer: Callable[..., Any], tmp_path: Any, readback_every: int, trainer_kw: dict
) -> None:
    if trainer_kw.get("logger") == "csv":  # logging LRs and losses must not read tensors
        trainer_kw = {**trainer_kw, "logger": pl.loggers.CSVLogger(tmp_path)}
    surgeon = run_counted(make_trainer, readback_every=readback_every, **trainer_kw)
    check_hook_syncs(surgeon.calls, readback_every)
    assert any(c.closed_step for c in surgeon.calls)


def test_the_guard_reads_its_flag_only_where_that_is_free(make_trainer: Callable) -> None:
    """With a non-fused optimizer on CPU the guard reads one value per optimizer step (free
    on CPU): its flag on the steps whose gradients it checks, the loss on the others; on CUDA,
    mode ``auto`` leaves such optimizers unguarded instead."""
    surgeon = run_counted(make_trainer, readback_every=4, steps=12, fused=False)
    checks = [c for c in surgeon.calls if c.hook == "before_optimizer_step"]
    assert len(checks) == 12
    assert all(c.syncs == FLAG_READ for c in checks)
    others = [c for c in surgeon.calls if c.hook != "before_optimizer_step"]
    check_hook_syncs(others, 4)


# ---------------------------------------------------------------------------- it bites
_SYNCY_READS: dict[str, Callable[[torch.Tensor], Any]] = {
    "item": lambda loss: loss.item(),
    "float": lambda loss: float(loss),
    "tolist": lambda loss: loss.tolist(),
    "isfinite-branch": lambda loss: bool(torch.isfinite(loss)),
}


@pytest.mark.parametrize("read", list(_SYNCY_READS), ids=list(_SYNCY_READS))
def test_counter_catches_a_sync_added_to_the_per_step_path(
    make_trainer: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    """A feed that reads each loss on the host, as a careless change might, fails the check."""
    original_add = LossFeed.add

    def syncy_add(self: LossFeed, loss: torch.Tensor) -> None:
        _SYNCY_READS[read](loss.detach())
        original_add(self, loss)

    monkeypatch.setattr(LossFeed, "add", syncy_add)
    surgeon = run_counted(make_trainer, readback_every=4, steps=12)
    off_readback = [c for c in surgeon.calls if c.hook == "end" and c.global_step % 4]
    assert off_readback and all(c.syncs for c in off_readback)
    with pytest.raises(AssertionError):
        check_hook_syncs(surgeon.calls, 4)


def test_counter_catches_a_sync_in_the_lr_write(
    make_trainer: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start hook that reads a tensor (here: a tensor-valued LR scale) fails the check."""
    original = ScheduleSurgeon.on_train_batch_start

    def syncy_start(self: ScheduleSurgeon, trainer: Any, *args: Any) -> None:
        original(self, trainer, *args)
        float(torch.tensor(self.controller.lr_scale(self.step)))  # type: ignore[union-attr]

    monkeypatch.setattr(ScheduleSurgeon, "on_train_batch_start", syncy_start)
    surgeon = run_counted(make_trainer, readback_every=4, steps=8)
    assert all(c.syncs for c in surgeon.calls if c.hook == "start")
    with pytest.raises(AssertionError):
        check_hook_syncs(surgeon.calls, 4)


# ---------------------------------------------------------------------------- CUDA
class SyncDebugSurgeon(ScheduleSurgeon):
    """``ScheduleSurgeon`` whose per-step hooks run under ``set_sync_debug_mode("error")``."""

    @staticmethod
    @contextmanager
    def _no_sync() -> Iterator[None]:
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def on_train_batch_start(self, *args: Any) -> None:
        with self._no_sync():
            super().on_train_batch_start(*args)

    def on_train_batch_end(self, *args: Any) -> None:
        with self._no_sync():
            super().on_train_batch_end(*args)

    def on_before_backward(self, *args: Any) -> None:
        with self._no_sync():
            super().on_before_backward(*args)

    def on_before_optimizer_step(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == 0:  # the guard reads its flag once, before any state exists
            super().on_before_optimizer_step(trainer, *args)
            return
        with self._no_sync():
            super().on_before_optimizer_step(trainer, *args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_cuda_hooks_do_not_sync(make_trainer: Callable[..., Any], precision: str) -> None:
    """No synchronizing CUDA call inside the hooks (it would raise), including readbacks.

    Fused SGD takes the guard's ``found_inf`` on the device; ``16-mixed``: GradScaler skips
    non-finite steps itself (the guard stands aside) and the surgeon adds no sync.
    """
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("bf16 not supported on this device")
    surgeon = SyncDebugSurgeon(readback_every=4, snapshot_every=10)  # snapshots inside, too
    trainer = make_trainer(
        [surgeon], accelerator="gpu", devices=1, max_steps=40, precision=precision
    )
    model = TinyRegressor(fused=True)  # the guard hands fused SGD its flag: no read
    trainer.fit(model, make_loader(batches=8))
    assert surgeon.step + surgeon.skipped_steps == 40
    assert surgeon.controller is not None  # every block but the last two was read and fed:
    assert surgeon.controller.step + surgeon.skipped_steps >= 40 - 2 * 4
    # the LRs the model saw are the controller's, so the late floats did reach it
    lrs = [r["lrs"][0][0] for r in model.records]
    assert len(set(lrs)) > 1
