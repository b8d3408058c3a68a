"""The step engine: the per-step logic every front door shares.

The Lightning callback, the plain-PyTorch :class:`~surgeon.loop.Surgeon` and a Fabric loop
all drive one :class:`StepEngine` the same way, once per optimizer step:

1. :meth:`StepEngine.begin_step` writes ``peak x lr_scale(step)`` into every driven param
   group (once per step, however many micro-batches it has) and captures a last-good
   snapshot when the controller says one is due;
2. per micro-batch, :meth:`StepEngine.watch_loss` hands the loss to the non-finite guard
   (before backward) and :meth:`StepEngine.add_loss` to the loss feed;
3. :meth:`StepEngine.before_optimizer_step` flags the coming update on the device when a loss
   or gradient is non-finite, and makes the optimizer skip it;
4. :meth:`StepEngine.end_step` closes the step: the module's buffers are checked for NaN/inf on
   the device (one kernel, the flag travels with the loss), the feed hands back the losses whose
   readback is due (a few steps late, no host sync), the controller decides on them, and a
   rollback it asks for (or a repair of non-finite buffers) is carried out here, in place;
5. :meth:`StepEngine.finish` reads the losses still in flight when training ends;
   :meth:`StepEngine.state_dict` does the same before a checkpoint, so no checkpoint holds
   weights whose losses are unread.

A run whose every step is non-finite for two snapshot intervals, with nothing to roll back to,
cannot make progress: :class:`TrainingStalled` is raised (after the ``stalled`` event).

What an adapter adds: where the settings, the planned length, the optimizers, the cross-rank
mean and the guard's mode come from (:meth:`StepEngine.start`), and where the events and the
losses go (``on_event``; ``on_losses`` once per block read, ``on_loss`` for each loss where a
view needs the controller's state right after it). Nothing here imports Lightning.

Per step the engine does only what the step needs: the LR write, references kept for the
feed, and (with the guard and snapshots) their device work; everything that turns tensors
into floats or decisions runs once per block of ``readback_every`` steps, and so do the LR
scales: a block's are computed at once and kept while the controller's ``revision`` holds.
"""

import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer

from surgeon._validate import check_positive_int
from surgeon.config import SurgeonConfig
from surgeon.controller import Controller, Event, EventKind, Phase
from surgeon.guard import NonFiniteGuard
from surgeon.loss_feed import LossFeed, Reduce, StepLoss
from surgeon.recorder import event_record
from surgeon.snapshot import SNAPSHOT_LOCATIONS, Snapshot, SnapshotLocation

PEAK_LR_KEY = "surgeon_peak_lr"
"""Param-group key holding the group's configured (peak) LR; saved with the optimizer."""

_UNCOMPARED_SETTINGS = ("find_min_lr", "find_max_lr", "find_steps")
"""Settings of the LR range test, which a resumed fit does not run: free to differ."""

SnapshotMode = SnapshotLocation | Literal["off"]
EventSink = Callable[[Event], None]
LossRow = tuple[int, float | None, bool]
"""``(step, loss, update_skipped)``: a loss the controller consumed; ``loss`` is ``None`` for a
step it counted without a loss (manual optimization whose ``training_step`` returned none)."""
LossSink = Callable[[int, float, bool], None]
"""Called with each :data:`LossRow` that has a loss, right after the controller consumed it."""
LossesSink = Callable[[list[LossRow]], None]
"""Called with the losses the controller consumed, in step order, once per block read."""
WarningSink = Callable[[str], None]
"""Called with a warning for the user (a sentence), on every rank: the sink shows it once."""


def check_lr(lr: Any, group: str = "param group") -> float:
    """``lr`` as a float if it is a finite number > 0 (a param group's peak; a one-element
    tensor LR, as compiled optimizers take, counts by its value), else ``ValueError`` naming
    ``group``."""
    value = lr.item() if isinstance(lr, Tensor) and lr.numel() == 1 else lr
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy's too
    if not (number and math.isfinite(value) and value > 0):
        hint = (
            " (the peak the surgeon scales, so it keeps a group at LR 0 only once added "
            "during the fit; leave a frozen group out of the optimizer, or give it an LR > 0 "
            "and requires_grad=False)"
            if number and value == 0
            else ""
        )
        raise ValueError(f"{group} lr must be a finite number > 0, got lr={lr!r}{hint}")
    return value if isinstance(value, int) else float(value)


def group_label(optimizer: Optimizer, index: int) -> str:
    """``param group 1 ('embed') of AdamW``: a param group as messages name it."""
    name = optimizer.param_groups[index].get("name")
    named = f" ({name!r})" if name is not None else ""
    return f"param group {index}{named} of {type(optimizer).__name__}"


def write_lr(group: dict[str, Any], lr: float) -> None:
    """Set a param group's LR; a tensor LR is filled in place (as torch's schedulers do: a
    compiled optimizer step keeps reading the same tensor)."""
    current = group["lr"]
    if isinstance(current, Tensor):
        current.fill_(lr)
    else:
        group["lr"] = lr


def configured_peak(group: dict[str, Any]) -> Any:
    """A param group's configured peak as torch's schedulers leave it: ``OneCycleLR``'s
    ``max_lr`` (its ``initial_lr`` is ``max_lr / div_factor``), else ``initial_lr`` (the LR
    before any scheduler changed it), else ``lr``."""
    return group.get("max_lr", group.get("initial_lr", group["lr"]))


def check_snapshot_mode(snapshot: Any) -> None:
    """``ValueError`` unless ``snapshot`` is a snapshot location or ``"off"``."""
    if snapshot != "off" and snapshot not in SNAPSHOT_LOCATIONS:
        raise ValueError(
            f"snapshot must be one of {(*SNAPSHOT_LOCATIONS, 'off')}, got snapshot={snapshot!r}"
        )


def distributed_mean() -> Reduce | None:
    """The loss feed's ``reduce`` over ``torch.distributed``: the mean over ranks in one
    all-reduce (``None`` when not distributed or on one process).

    Not a framework's own reduce: Lightning's DDP reduce runs a ``barrier`` before its
    all-reduce, a second collective, and on NCCL a barrier blocks the host until the GPU has
    caught up, once per block: the stall the feed exists to avoid.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    world_size = dist.get_world_size()

    def reduce(block: Tensor) -> Tensor:
        dist.all_reduce(block, op=dist.ReduceOp.SUM)  # gloo has no AVG; same bits on all ranks
        return block / world_size

    return reduce


def distributed_max() -> Callable[[Tensor], None] | None:
    """In-place max over ranks for the guard's flag (``None`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    return lambda flag: dist.all_reduce(flag, op=dist.ReduceOp.MAX)


def starting_scale(scaler: Any) -> float | None:
    """GradScaler's scale before its first step (``None``: no scaler, or it already stepped)."""
    if scaler is None or getattr(scaler, "_scale", None) is not None:
        return None  # a scale tensor exists: reading it would be a host sync; the feed has it
    return float(scaler.get_scale())  # the initial scale, a Python float: no sync


def _ignore(*_: Any) -> None:
    """A sink that drops what it is given."""


_UNITS: dict[torch.device, Tensor] = {}


def _unit(device: torch.device) -> Tensor:
    """A cached 0-d 1.0 on ``device`` (the check's unscale factor; never written to)."""
    if device not in _UNITS:
        _UNITS[device] = torch.ones((), device=device)
    return _UNITS[device]


def _nonfinite_flag(tensors: list[Tensor]) -> Tensor | None:
    """A 0-d flag on the device, 1.0 when one of ``tensors`` (floating point) holds a NaN/inf
    (``None``: no tensor). One kernel per device (the one the guard uses, values unchanged);
    not read here. With devices mixed, the flag is on an accelerator (host-to-device copies,
    never a device-to-host one read at once)."""
    if not tensors:
        return None
    device = tensors[0].device
    if device.type == "cpu":
        device = next((t.device for t in tensors if t.device.type != "cpu"), device)
    flag = torch.zeros((), device=device)
    if all(t.device == device for t in tensors):
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, _unit(device))
        return flag
    groups: dict[torch.device, list[Tensor]] = defaultdict(list)
    for tensor in tensors:
        groups[tensor.device].append(tensor)
    for where, group in groups.items():
        local = flag if where == device else torch.zeros((), device=where)
        torch._amp_foreach_non_finite_check_and_unscale_(group, local, _unit(where))
        if local is not flag:
            torch.maximum(flag, local.to(device, non_blocking=True), out=flag)
    return flag


class TrainingStalled(RuntimeError):
    """Every step was non-finite for two snapshot intervals and nothing was left to roll back
    to: the run cannot make progress (the message says from which step and why)."""


_CHECKED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
"""The dtypes the NaN/inf checks look at (the non-finite kernel has no float8 kernel)."""


def _checked_buffers(module: nn.Module | None) -> list[Tensor]:
    """The buffers whose NaN/inf the engine looks for: floating-point (of
    :data:`_CHECKED_DTYPES`) and persistent (running statistics and the like; not caches such as
    masks), once materialized, and outside autograd (the check writes them back unchanged, in
    place)."""
    if module is None:
        return []
    found: dict[int, Tensor] = {}
    for sub in module.modules():
        for name, buffer in sub._buffers.items():
            if (
                buffer is not None
                and name not in sub._non_persistent_buffers_set
                and buffer.dtype in _CHECKED_DTYPES
                and not buffer.requires_grad
                and not is_lazy(buffer)
            ):
                found.setdefault(id(buffer), buffer)
    return list(found.values())


def _reset_nonfinite_statistics(module: nn.Module) -> None:
    """Without a snapshot: reset the running statistics of every module with a NaN/inf buffer
    that has ``reset_running_stats`` (BatchNorm, InstanceNorm; a rare path: host reads are
    fine)."""
    for sub in module.modules():
        reset = getattr(sub, "reset_running_stats", None)
        if callable(reset) and any(
            b is not None and b.is_floating_point() and not bool(torch.isfinite(b).all())
            for b in sub._buffers.values()
        ):
            reset()


class MoreState(Protocol):
    """More state than the module's and the optimizers' that a snapshot keeps and a rollback
    restores (an adapter's: the averaged copy a weight-averaging callback keeps)."""

    def tensors(self) -> list[Tensor]:
        """The tensors to copy and put back, found anew at each snapshot."""
        ...

    def before_restore(self) -> Any:
        """What :meth:`after_restore` compares with, read just before a rollback restores."""
        ...

    def after_restore(self, before: Any) -> None:
        """Mend what the restore left inconsistent (``before``: :meth:`before_restore`'s)."""
        ...


class StepEngine:
    """Loss feed, controller, non-finite guard and snapshots, driven once per optimizer step."""

    _NO_SNAPSHOTS = (
        "this run keeps no snapshots: snapshot='off', or a Surgeon without model=; with "
        "snapshots a non-finite streak rolls back, and with the guard (skip_nonfinite, or "
        "Surgeon.guard() before optimizer.step()) non-finite updates are skipped"
    )

    def __init__(
        self,
        config: SurgeonConfig,
        *,
        snapshot: SnapshotMode = "cpu",
        readback_every: int = 4,
        on_event: EventSink = _ignore,
        on_losses: LossesSink = _ignore,
        on_loss: LossSink | None = None,
        on_warning: WarningSink = _ignore,
    ) -> None:
        """``on_event``: each decision; ``on_losses``: the losses consumed, once per block;
        ``on_loss``: a loss right after it was consumed (``None``: none; see
        :attr:`on_loss_from`); ``on_warning``: a warning for the user (at most one per run)."""
        check_snapshot_mode(snapshot)
        check_positive_int("readback_every", readback_every)
        self.config = config
        self.snapshot = snapshot
        self.readback_every = readback_every
        self.on_event = on_event
        self.on_losses = on_losses
        self.on_loss = on_loss
        self.on_warning = on_warning
        self.on_loss_from = 0
        """``on_loss`` is called for the losses of the steps from this one on: a view that needs
        only some moves it ahead, the others cost no call."""
        self.controller: Controller | None = None
        self.planned = 0
        """The planned length this run was started with (a resume compares it with the
        checkpoint's: the same means the saved plan goes on, however it was adjusted)."""
        self.feed = LossFeed(readback_every)
        self.guard = NonFiniteGuard("off")
        self._guarded = False  # the guard acts (its mode is not "off"): read once per step
        self.module: nn.Module | None = None
        self.optimizers: list[Optimizer] = []
        """Every optimizer of the fit (snapshots and rollbacks cover them all)."""
        self.driven: list[Optimizer] = []
        """The optimizers whose LR the engine writes (not those left to their own scheduler)."""
        self.manual = False
        self.restores = 0
        """Rollbacks and buffer repairs so far (each changed the weights or buffers in place)."""
        self.changed_at_checkpoint = False
        """The last :meth:`state_dict` rolled back or repaired buffers before returning."""
        self._snapshots: list[Snapshot] = []
        self._dropped_at: int | None = None  # the checkpoint that last dropped the snapshots
        self._first_snapshot: int | None = None  # the step of the first one taken since then
        self._close_since: int | None = None  # the first of the checkpoints too close in a row
        self._warned_checkpoints = False
        self._scaler: Any = None
        self._buffers: list[Tensor] = []
        self._buffers_checked_from = 0  # flags of earlier steps were raised before a repair
        self._step_flag: Tensor | None = None
        self._snapshot_flag: Tensor | None = None  # the last snapshot's (see _state_flag),
        self._snapshot_flag_step = -1  # of the snapshot of this step
        self._checks_state = True  # until a rollback for it is refused (see _check_snapshot)
        self.more_state: MoreState | None = None
        """Set by an adapter: more state a snapshot keeps and a rollback restores with the
        weights (the averaged copy a weight-averaging callback keeps)."""
        self.step = 0
        """Optimizer steps so far, as the fit counts them (a step without an update included)."""
        self.skipped_steps = 0
        """Steps without an update, counted unwatched: GradScaler skipped them for a scale
        overflow, or (automatic optimization) their batch gave no loss."""
        self.written_step = -1
        """The step whose LR is in the param groups (-1: none yet, or to be written again)."""
        self.written_scale = 1.0
        self._expected: tuple[int, float] | None = None
        """``(step, scale)`` of the last write, which the param groups should still hold at the
        next one (``None``: nothing to compare with since a start, load, rollback or new group)."""
        self._warned_foreign_lr = False
        self._scales: list[float] = []  # lr_scale of the steps from _scales_from on, computed
        self._scales_from = 0  # at the controller's revision _scales_revision
        self._scales_revision = -1

    # ------------------------------------------------------------------ public surface
    @property
    def phase(self) -> Phase:
        """The controller's current phase (``Phase.WARMUP`` before the start)."""
        return self.controller.phase if self.controller is not None else Phase.WARMUP

    @property
    def events(self) -> list[Event]:
        """Every decision so far, oldest first."""
        return self.controller.events if self.controller is not None else []

    def start(
        self,
        total_steps: int,
        optimizers: list[Optimizer],
        *,
        module: nn.Module | None = None,
        driven: Iterable[Optimizer] | None = None,
        guard: NonFiniteGuard | None = None,
        reduce: Reduce | None = None,
        accumulate: int = 1,
        device: Any = None,
        loss_scale: float | None = None,
        manual: bool = False,
        scaler: Any = None,
    ) -> None:
        """Begin a run of ``total_steps`` planned optimizer steps from step 0.

        ``driven``: the optimizers whose LR to write (default: all); ``module``: what snapshots
        copy besides the optimizers, and whose buffers are checked for NaN/inf (``None``: no
        snapshots, no rollbacks); ``reduce``: the mean across ranks for the loss feed;
        ``accumulate``: what each micro-batch loss was divided by; ``loss_scale``: GradScaler's
        scale before its first step; ``manual``: a step without a loss still counts (the user
        stepped the optimizer anyway); ``scaler``: the GradScaler, whose scale snapshots keep
        (a rollback puts back the scale a collapse had driven towards 0).
        """
        self.controller = Controller(total_steps, self.config, lag=2 * self.readback_every)
        if self.snapshot == "off" or module is None:
            self.controller.snapshots_off()
        self.planned = total_steps
        self.optimizers = list(optimizers)
        self.driven = self.optimizers if driven is None else list(driven)
        self.module = module
        self.manual = manual
        self.guard = guard if guard is not None else NonFiniteGuard("off")
        self._guarded = self.guard.mode != "off"
        self.feed = LossFeed(
            self.readback_every, reduce, accumulate=accumulate, device=device, loss_scale=loss_scale
        )
        self._step_flag = self._snapshot_flag = None
        self._snapshot_flag_step, self._checks_state = -1, True
        keep = self.snapshot != "off" and module is not None
        self._snapshots = [Snapshot(self.snapshot) for _ in "ab"] if keep else []  # type: ignore[arg-type]
        self._dropped_at = self._first_snapshot = self._close_since = None
        self._warned_checkpoints = False
        self._scaler = scaler
        self._buffers = _checked_buffers(module)
        self._buffers_checked_from = 0
        self.step = self.skipped_steps = self.restores = 0
        self.written_step = -1
        self.written_scale = 1.0
        self._expected, self._warned_foreign_lr = None, False
        self.on_loss_from = 0
        self.adopt_new_param_groups()

    def event_record(self, event: Event) -> dict[str, Any]:
        """``event`` as a record of ``events.jsonl``, with the first driven param group's LR
        before and after it."""
        peak = self.driven[0].param_groups[0][PEAK_LR_KEY]
        return event_record(event, peak * event.scale_before, peak * event.scale_after)

    @property
    def snapshot_mode(self) -> SnapshotMode:
        """Where this run keeps snapshots (``"off"`` also when it has no module to copy)."""
        return self.snapshot if self.module is not None else "off"

    def release(self) -> None:
        """Free what the run holds (snapshot memory, the guard's flags) at its end."""
        self._snapshots = []
        self.guard.release()
        self.more_state = None

    def adopt_new_param_groups(self, scale: float | None = None) -> None:
        """Give each driven param group without a peak LR one.

        At the start (``scale=None``) a group's configured LR is its peak, a finite number > 0.
        A group added during the run (e.g. by ``BaseFinetuning``) was given the LR it should
        have now, beside LRs written with the scale ``scale``: its peak is that LR / ``scale``,
        so it follows the schedule from there. Added with LR 0 it stays at 0; added while the
        scale is 0 (past the plan with ``min_lr_ratio=0``) its LR is taken as its peak: a
        running fit never fails here. Added without an LR of its own (``add_param_group``
        gives it the optimizer's default, the constructor's ``lr``), that LR is its peak, as
        for the groups the optimizer was made with (not 5x it, a tenth of the way up a ramp).
        """
        for optimizer in self.driven:
            default = (getattr(optimizer, "defaults", None) or {}).get("lr")
            for index, group in enumerate(optimizer.param_groups):
                if PEAK_LR_KEY in group:
                    continue
                if scale is None:
                    group[PEAK_LR_KEY] = check_lr(group["lr"], group_label(optimizer, index))
                else:
                    lr = float(group["lr"])
                    as_made = default is not None and lr == float(default)
                    group[PEAK_LR_KEY] = lr / scale if scale > 0 and not as_made else lr

    # ------------------------------------------------------------------ per step
    def peak_lrs(self) -> list[float]:
        """The peak LR of each param group the surgeon drives, optimizer by optimizer."""
        return [g[PEAK_LR_KEY] for o in self.driven for g in o.param_groups if PEAK_LR_KEY in g]

    def begin_step(self) -> float | None:
        """Write the LR of the current step (once) and take a snapshot if one is due (none at
        the step a checkpoint or a resume starts at: a plain loop has written that step's LR,
        and could have snapshotted, before its checkpoint, and a resumed loop may load the
        model after the surgeon; every adapter and ``surgeon replay`` skip it alike).

        Returns the LR scale written, ``None`` when this step's LR was already in place."""
        step, controller = self.step, self.controller
        if self.written_step == step or controller is None:
            return None
        index = step - self._scales_from
        if controller.revision != self._scales_revision or not 0 <= index < len(self._scales):
            # the scales of this block's steps in one go: they hold until the controller decides
            # again, at the block's end
            block = range(
                step, max(step + 1, min(step + self.readback_every, controller.total_steps))
            )
            self._scales = [controller.lr_scale(s) for s in block]
            self._scales_from, self._scales_revision, index = step, controller.revision, 0
        scale = self._scales[index]
        expected = self._expected
        try:
            for optimizer in self.driven:
                for number, group in enumerate(optimizer.param_groups):
                    lr = group["lr"]
                    if type(lr) is float:
                        if expected is not None and lr != group[PEAK_LR_KEY] * expected[1]:
                            self._foreign_lr(optimizer, number, lr, expected)
                            expected = None
                        group["lr"] = group[PEAK_LR_KEY] * scale
                    else:
                        write_lr(group, group[PEAK_LR_KEY] * scale)
        except KeyError:  # a param group added during the run (e.g. by BaseFinetuning)
            # its LR was chosen beside the LRs of the last write: relative to that write's scale
            self._expected = None  # the groups before it were written already
            self.adopt_new_param_groups(self.written_scale)
            # snapshots taken with fewer groups cannot be restored into these optimizers
            controller.forget_snapshots()
            self._snapshots = [Snapshot(s.location) for s in self._snapshots]
            return self.begin_step()
        self.written_step, self.written_scale = step, scale
        self._expected = (step, scale)
        if self._snapshots and step != self._dropped_at and controller.snapshot_due(step):
            self._take_snapshot()
        return scale

    def _foreign_lr(
        self, optimizer: Optimizer, index: int, lr: float, expected: tuple[int, float]
    ) -> None:
        """A driven group's LR is not the one last written: something else writes LRs too.
        Said once per run; the surgeon writes its own at once (it owns every driven LR)."""
        if self._warned_foreign_lr:
            return
        self._warned_foreign_lr = True
        wrote = optimizer.param_groups[index][PEAK_LR_KEY] * expected[1]
        digits = next((d for d in range(4, 17) if f"{lr:.{d}g}" != f"{wrote:.{d}g}"), 17)
        self.on_warning(
            f"the LR of {group_label(optimizer, index)} was changed to {lr:.{digits}g} after the "
            f"surgeon wrote {wrote:.{digits}g} for step {expected[0]}: something else writes LRs "
            "too "
            "(an LR scheduler stepping this optimizer, a callback such as BackboneFinetuning or "
            "StochasticWeightAveraging, the loop itself). The surgeon writes every step's LR, so "
            "the two take turns: a step runs at whichever LR was written last before its "
            "update (in a loop that steps a scheduler after surgeon.step(), the scheduler's): "
            "leave each optimizer's LR to one of them (said once per run)"
        )

    def forget_written_lr(self) -> None:
        """The param groups' LRs were set from elsewhere on purpose (a loaded optimizer state,
        a rollback): the next write compares them with nothing."""
        self._expected = None

    def watch_loss(self, loss: Tensor) -> None:
        """A micro-batch loss, before its backward: the guard checks it with the gradients."""
        if self._guarded:
            self.guard.add_loss(loss)

    def add_loss(self, loss: Tensor) -> None:
        """A micro-batch loss for the controller (divided by the accumulation count)."""
        self.feed.add(loss)

    def before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Flag the update ``optimizer`` is about to apply when a loss or gradient is
        non-finite, and arrange for it to be skipped (see :mod:`surgeon.guard`)."""
        if not self._guarded:
            return
        flag = self.guard.check(optimizer)
        if flag is not None:  # several optimizers in one step: any one skipped flags the step
            self._step_flag = flag if self._step_flag is None else self._step_flag.maximum(flag)

    def end_step(self, loss_scale: Tensor | None = None) -> None:
        """Close the current optimizer step (``loss_scale``: GradScaler's scale after it) and,
        once per block, act on the losses whose readback is now due."""
        self.step += 1
        flag = self._step_flag
        if flag is not None:
            self._step_flag = None
        if self._guarded:
            self.guard.release()
        buffers_flag = _nonfinite_flag(self._buffers)  # travels with the loss, read with it
        due = self.feed.close_step(loss_scale, flag, buffers_flag)
        if due:
            self._consume(due)

    def finish(self, *, end_of_fit: bool = True) -> None:
        """Read the losses still in flight (the last ``readback_every`` to
        ``2 x readback_every - 1`` steps) and decide on them like any other: a spike or NaN at
        the very end is recorded, and a rollback leaves the last good weights (one for a severe
        spike in the last loss too, which no later loss can confirm, as before a checkpoint;
        at the ``end_of_fit`` also one for a spike whose cut has no steps left to act). Then the
        weights and optimizer state are checked for NaN/inf no snapshot has seen yet."""
        controller = self.controller
        if controller is not None:
            self._consume(self.feed.flush(end=end_of_fit))
            controller.before_checkpoint(end_of_fit=end_of_fit)
            if controller.rollback_to is None:
                self._check_state_now()
            if controller.rollback_to is not None:
                self._roll_back()

    def _check_state_now(self) -> None:
        """Before a checkpoint or the fit's end: NaN/inf in the trained weights or their
        optimizer state since the last snapshot (a finite gradient too large to square, in the
        last snapshot interval) is rolled back as a snapshot's check would (one host read, at a
        rare moment; one process, with snapshots)."""
        controller = self.controller
        assert controller is not None
        if self._state_checked():
            self._check_state(controller.step - 1, "before a checkpoint or the end of the fit")

    def _state_checked(self) -> bool:
        """Whether NaN/inf in the weights and optimizer state is looked for: with snapshots to
        roll back to, in one process (under torch.distributed, FSDP's shards would give each
        rank its own answer), until a rollback for it was refused."""
        return bool(self._snapshots) and self._checks_state and self.feed.reduce is None

    def _check_state(self, step: int, found: str) -> None:
        """Read the weights' and optimizer state's NaN/inf flag now (one host read) and, when
        set, roll back as a snapshot's check would; ``found``: when this was looked."""
        controller = self.controller
        assert controller is not None
        flag = self._state_flag()
        if flag is None or not flag.tolist():
            return
        why = controller.state_nonfinite(step, found)
        self._end_state_checks_if_refused(step, why)

    def _consume(self, due: list[StepLoss]) -> None:
        """Hand the controller the losses whose readback is due, in step order; carry out the
        rollbacks and buffer repairs it asks for; then the losses go to ``on_losses``."""
        controller = self.controller
        assert controller is not None
        on_event, on_loss = self.on_event, self.on_loss
        rows: list[LossRow] = []
        for loss, skipped, update_skipped, no_loss, buffers_nonfinite in due:
            if buffers_nonfinite and controller.step >= max(
                controller.ignore_until, self._buffers_checked_from
            ):  # (flags of steps before a rollback or a repair were raised before it)
                self._repair_buffers(controller.step)
            if self._snapshot_flag is not None and self._snapshot_flag_step == controller.step:
                # dropped since or not: the state it saw; a step whose loss or gradients were
                # non-finite is the non-finite rules' (their rollback, their reason)
                shown = update_skipped or not (no_loss or math.isfinite(loss))
                self._check_snapshot(controller.step, act=not shown)
            controller.written_until = self.step  # the LRs before it are written
            if skipped:  # counted, unwatched: the plan moves on as the fit's own count does
                # (no update: GradScaler skipped it for a scale overflow, or the batch gave no
                # loss; under manual optimization the user may have stepped anyway)
                applied = no_loss and self.manual
                self.skipped_steps += not applied
                step = controller.step
                rows.append((step, None, not applied))
                for event in controller.pass_step(applied):
                    on_event(event)
                if controller.pending_snapshot_step == step + 1:  # the weights it holds are
                    for snapshot in self._snapshots:  # the next step's: judged by its loss
                        if snapshot.step == step:
                            snapshot.step = step + 1
                continue
            loss_step = controller.step
            events = controller.update(loss, update_skipped=update_skipped)
            if events:
                for event in events:
                    on_event(event)
            outlier, controller.state_check_due = controller.state_check_due, None
            if outlier is not None and self._state_checked():
                # a severe outlier is where a gradient too large to square comes from: its
                # damage is found (and undone) now, not a snapshot interval later
                self._check_state(loss_step, f"right after the severe outlier at step {outlier}")
            if controller.rollback_to is not None:
                self._roll_back()
            rows.append((loss_step, loss, update_skipped))
            if on_loss is not None and loss_step >= self.on_loss_from:
                on_loss(loss_step, loss, update_skipped)
            if events:
                stalled = next((e for e in events if e.kind is EventKind.STALLED), None)
                if stalled is not None:
                    self.on_losses(rows)
                    hint = "" if self._snapshots else f" ({self._NO_SNAPSHOTS})"
                    raise TrainingStalled(f"step {stalled.step}: {stalled.reason}{hint}")
        if rows:
            self.on_losses(rows)

    def _repair_buffers(self, step: int) -> None:
        """Replace the NaN/inf in the module's buffers after ``step``: with the values of the
        good snapshot, else (none yet, or ``snapshot="off"``) by resetting the running
        statistics of the modules that hold them; recorded as a ``buffers_restored`` event.
        Every rank repairs its own buffers (they may differ); the event says nothing
        rank-specific, so every rank records the same."""
        assert self.controller is not None and self.module is not None
        good = self.controller.good_snapshot_step
        snapshot = next((s for s in self._snapshots if s.step == good), None)
        if good is not None and snapshot is not None:
            snapshot.repair_buffers(self.module)
            how = f"the NaN/inf entries restored from the snapshot of step {good}"
            if any(not bool(torch.isfinite(b).all()) for b in self._buffers):  # a rare path
                _reset_nonfinite_statistics(self.module)  # the copy held them too: never kept
                how += (
                    ", which held some too: the running statistics of the modules holding "
                    "them reset"
                )
        else:
            _reset_nonfinite_statistics(self.module)
            how = (
                "no snapshot to restore them from: the running statistics of the modules "
                "holding them reset (others have no reset_running_stats and stay as they are)"
            )
        self.on_event(self.controller.buffers_nonfinite(step, how))
        self.restores += 1
        self._buffers_checked_from = self.step

    # ------------------------------------------------------------------ snapshots
    def _take_snapshot(self) -> None:
        """Copy the weights as they are at the start of ``self.step`` into the spare slot (the
        one not holding the rollback target)."""
        assert self.controller is not None and self.module is not None
        good = self.controller.good_snapshot_step
        spare = next(s for s in self._snapshots if s.step is None or s.step != good)
        if spare.capture(self.module, self.optimizers, self.step, extra=self._extra_state()):
            self.controller.snapshot_taken(self.step, spare.nbytes)
            # what it copied is checked before it can become the target (one process: under
            # torch.distributed, FSDP's shards would give each rank its own answer)
            self._snapshot_flag = self._state_flag() if self._state_checked() else None
            self._snapshot_flag_step = self.step
            if self._first_snapshot is None:
                self._first_snapshot = self.step
        self._buffers = _checked_buffers(self.module)  # lazy modules materialize later

    def _state_flag(self) -> Tensor | None:
        """A device flag: NaN/inf in the trained weights or their optimizer state, as a
        snapshot copies them (a finite gradient too large to square makes Adam's second moment
        inf, and every later update of those weights 0, with normal losses). Frozen weights
        (a -inf mask kept as a parameter) and step counters are not looked at."""
        tensors: list[Tensor] = []
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if not param.requires_grad:
                        continue
                    tensors.append(param)
                    tensors += [
                        v
                        for v in optimizer.state.get(param, {}).values()
                        if isinstance(v, Tensor) and v.dim() > 0
                    ]
        return _nonfinite_flag([t for t in tensors if t.dtype in _CHECKED_DTYPES and t.numel()])

    def _check_snapshot(self, step: int, *, act: bool = True) -> None:
        """Before the loss of ``step`` is consumed: when what the snapshot of ``step`` copied
        held a NaN/inf, that snapshot never becomes the target and the run rolls back to the
        one before (a host read once per snapshot, with a read-back block). A rollback refused
        ends the checks for the run, with one warning (the state stays non-finite, so every
        later snapshot would be refused alike, and none could become a target again)."""
        flag, self._snapshot_flag = self._snapshot_flag, None
        controller = self.controller
        assert controller is not None and flag is not None
        # (computed at the snapshot, before the block's losses: read after them, no stall)
        if not act or step < controller.ignore_until or not flag.tolist():
            return
        self._end_state_checks_if_refused(step, controller.snapshot_nonfinite(step))

    def _end_state_checks_if_refused(self, step: int, why: str) -> None:
        """A rollback for non-finite state refused (``why``: why not; ``""``: asked): the state
        stays non-finite, so every later check would be refused alike; they end, said once."""
        if why:
            self._checks_state = False
            self.on_warning(
                f"step {step}: {why}the weights or optimizer state stay non-finite; later "
                "snapshots are not checked for it (each rollback would be refused alike)"
            )

    def _extra_state(self) -> list[Tensor]:
        """What a snapshot keeps beside the module and optimizers: GradScaler's scale and growth
        tracker, once it has made them (its first step), and :attr:`more_state`'s tensors."""
        scaler = self._scaler
        tensors = [getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None)]
        more = self.more_state.tensors() if self.more_state is not None else []
        return [t for t in tensors if isinstance(t, Tensor)] + more

    def _roll_back(self) -> None:
        """Restore the snapshot the controller asked for; the next step starts from it."""
        assert self.controller is not None and self.module is not None
        target = self.controller.rollback_to
        snapshot = next(s for s in self._snapshots if s.step == target)
        # optimizers left to their own LR schedulers keep their settings: their scheduler is
        # not rolled back, so it still owns their LR
        scheduled = [o for o in self.optimizers if not any(o is d for d in self.driven)]
        more = self.more_state
        before = more.before_restore() if more is not None else None
        snapshot.restore(
            self.module, self.optimizers, keep_settings_of=scheduled, extra=self._extra_state()
        )
        if more is not None:
            more.after_restore(before)
        self.on_event(self.controller.rolled_back(self.step))
        self.restores += 1
        self.written_step = -1  # the restored param groups hold an old LR: write it again
        self._expected = None

    # ------------------------------------------------------------------ plans
    def cool_down(self, steps: int, why: str) -> Event | None:
        """End the run early: from the current step decay from the current LR to the floor
        over ``steps`` steps (a ``cooldown`` event, also sent to ``on_event``); ``None`` when
        the plan already ends by then."""
        controller = self.controller
        assert controller is not None
        start = self.step
        if controller.phase is Phase.DONE or start + steps >= controller.total_steps:
            return None
        event = controller.cool_down(start, steps, why)
        self.on_event(event)
        return event

    def rewarm(self, total_steps: int, level: float, ramp: int, why: str) -> None:
        """From the current step, ramp back to LR scale ``level`` over ``ramp`` steps and plan
        the rest up to ``total_steps`` (:meth:`Controller.rewarm`; a ``replan`` event)."""
        assert self.controller is not None
        self.on_event(self.controller.rewarm(self.step, total_steps, level, ramp, why))
        self.written_step = -1

    def replan(self, total_steps: int, cause: str) -> None:
        """Plan for ``total_steps`` from the next step on: the run turned out to have another
        length than planned (``cause`` says how); a ``replan`` event, the LR goes on from where
        it is."""
        assert self.controller is not None
        self.on_event(self.controller.replan(total_steps, self.step, cause))
        self.written_step = -1

    def start_at(self, step: int) -> None:
        """Begin at ``step`` instead of 0: a resumed run whose checkpoint has no surgeon state
        (saved without it). The steps already done count; each driven group's
        :func:`configured_peak` is its peak."""
        assert self.controller is not None
        for optimizer in self.driven:
            for index, group in enumerate(optimizer.param_groups):
                peak = configured_peak(group)
                group[PEAK_LR_KEY] = check_lr(peak, group_label(optimizer, index))
        self.step = step
        self.on_event(self.controller.start_at(step))
        self.written_step, self._expected = -1, None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to go on exactly: the controller's state, the step counters,
        and the settings and planned length the run was started with (a resume compares them).

        No checkpoint holds weights whose losses are unread: first every loss in flight is read
        and decided on (a spike or NaN among them rolls back now, non-finite buffers are
        repaired; non-finite steps whose updates were applied roll back too), then the snapshots
        are forgotten, since the resumed run has none, so both go on alike. This runs the
        feed's collective: call it on every rank, before the weights and the optimizers' state
        are saved; :attr:`changed_at_checkpoint` says whether it changed them."""
        controller = self.controller
        assert controller is not None
        restores = self.restores
        self.finish(end_of_fit=False)  # every loss in flight read and decided on
        self._drop_snapshots_at_checkpoint()
        self.changed_at_checkpoint = self.restores != restores
        return {
            "controller": controller.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "feed": self.feed.state_dict(),
            "settings": asdict(self.config),
            "planned": self.planned,
        }

    def _drop_snapshots_at_checkpoint(self) -> None:
        """Forget the snapshots, as the resumed run has none (every loss has been read). A
        rollback refused for want of one says so. Two checkpoint intervals in a row too short
        for a snapshot taken after a checkpoint to guard any step (it guards the steps after its
        own, once its loss is read) warn, once: checkpoints this frequent leave nothing to roll
        back to (one such pair, e.g. a periodic checkpoint and an epoch's, is no pattern)."""
        controller = self.controller
        assert controller is not None
        if not self._snapshots:
            controller.snapshots_off()
            return
        before, step, first = self._dropped_at, self.step, self._first_snapshot
        if before is not None and before < step:
            close = first is None or first >= step - 1
            since = self._close_since
            self._close_since = (before if since is None else since) if close else None
            if close and since is not None and not self._warned_checkpoints:
                self._warned_checkpoints = True
                self.on_warning(
                    f"the checkpoints from step {since} to step {step} came too close for a "
                    "snapshot between two of them to guard any step, so no spike or NaN there "
                    "could be rolled back: every checkpoint drops the snapshots (a resumed run "
                    "has none, so both go on alike), and the first one after it guards the steps "
                    "after its own once the loss of its step is read and normal. Checkpoint less "
                    "often to keep rollbacks"
                )
        self._dropped_by_checkpoint(step)

    def _dropped_by_checkpoint(self, step: int) -> None:
        """The checkpoint at ``step`` dropped the snapshots: the controller forgets them, and a
        rollback refused for want of one says why."""
        assert self.controller is not None
        self._dropped_at, self._first_snapshot = step, None
        self._snapshot_flag = None  # its snapshot is gone (a resumed run has none either)
        for snapshot in self._snapshots:  # (their memory is kept for the next ones)
            snapshot.step = None
        self.controller.checkpoint_dropped_snapshots(step)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned into a started engine. Started with the
        checkpoint's planned length, the checkpoint's plan goes on (however the run adjusted
        it); with another length or other settings, the rest is re-planned over them (a
        ``replan`` event, to ``on_event``). ``ValueError`` for a ``peak_lr`` other than the
        checkpoint's: a resumed fit keeps its peaks and runs no range test."""
        controller = self.controller
        assert controller is not None
        if not isinstance(state, dict) or "controller" not in state:
            keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                "load_state_dict takes what the surgeon's state_dict() returned (a dict with "
                f"'controller'), got {keys}: an optimizer's or a model's state dict?"
            )
        saved = state.get("settings")
        if saved is not None and saved.get("peak_lr", self.config.peak_lr) != self.config.peak_lr:
            raise ValueError(
                f"peak_lr={self.config.peak_lr!r} differs from the checkpoint's "
                f"peak_lr={saved['peak_lr']!r}: a resumed fit keeps the checkpoint's peak LRs and "
                f"runs no LR range test; resume with peak_lr={saved['peak_lr']!r}, or start a "
                "fresh fit"
            )
        compared = None
        if saved is not None:
            compared = {k: v for k, v in saved.items() if k not in _UNCOMPARED_SETTINGS}
        saved_total = state["controller"].get("total_steps", self.planned)
        planned = state.get("planned", saved_total)
        controller.load_state_dict(
            state["controller"],
            next_step=state["step"],
            total_steps=saved_total if planned == self.planned else self.planned,
            saved_settings=compared,
        )
        for event in controller.events[len(state["controller"]["events"]) :]:
            self.on_event(event)
        self.step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.feed.load_state_dict(state["feed"])
        self._buffers_checked_from = 0
        self.written_step, self._expected = -1, None
        if self._snapshots:  # as the saving run dropped them: a refusal says the same
            self._dropped_by_checkpoint(self.step)
        else:
            controller.snapshots_off()
