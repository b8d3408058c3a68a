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
4. :meth:`StepEngine.end_step` closes the step: the feed hands back the losses whose readback
   is due (a few steps late, no host sync), the controller decides on them, and a rollback it
   asks for is carried out here, in place;
5. :meth:`StepEngine.finish` reads the losses still in flight when training ends.

What an adapter adds: where the settings, the planned length, the optimizers, the cross-rank
mean and the guard's mode come from (:meth:`StepEngine.start`), and where the events and the
losses go (``on_event`` / ``on_loss``). Nothing here imports Lightning.
"""

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from surgeon._validate import check_positive_int
from surgeon.config import SurgeonConfig
from surgeon.controller import Controller, Event, Phase
from surgeon.guard import NonFiniteGuard
from surgeon.loss_feed import LossFeed, Reduce, StepLoss
from surgeon.snapshot import SNAPSHOT_LOCATIONS, Snapshot, SnapshotLocation

PEAK_LR_KEY = "surgeon_peak_lr"
"""Param-group key holding the group's configured (peak) LR; saved with the optimizer."""

SnapshotMode = SnapshotLocation | Literal["off"]
EventSink = Callable[[Event], None]
LossSink = Callable[[int, float, bool], None]
"""``(step, loss, update_skipped)`` for every loss the controller consumed, in step order."""


def check_lr(lr: Any) -> float:
    """``lr`` if it is a finite number > 0 (a param group's peak), else ``ValueError``."""
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"param group lr must be a finite number > 0, got lr={lr!r}")
    return lr


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


class StepEngine:
    """Loss feed, controller, non-finite guard and snapshots, driven once per optimizer step."""

    def __init__(
        self,
        config: SurgeonConfig,
        *,
        snapshot: SnapshotMode = "cpu",
        readback_every: int = 4,
        on_event: EventSink = _ignore,
        on_loss: LossSink = _ignore,
    ) -> None:
        check_snapshot_mode(snapshot)
        check_positive_int("readback_every", readback_every)
        self.config = config
        self.snapshot = snapshot
        self.readback_every = readback_every
        self.on_event = on_event
        self.on_loss = on_loss
        self.controller: Controller | None = None
        self.feed = LossFeed(readback_every)
        self.guard = NonFiniteGuard("off")
        self.module: nn.Module | None = None
        self.optimizers: list[Optimizer] = []
        """Every optimizer of the fit (snapshots and rollbacks cover them all)."""
        self.driven: list[Optimizer] = []
        """The optimizers whose LR the engine writes (not those left to their own scheduler)."""
        self.manual = False
        self._snapshots: list[Snapshot] = []
        self._step_flag: Tensor | None = None
        self.step = 0
        """Optimizer steps applied so far (GradScaler-skipped steps excluded once known)."""
        self.skipped_steps = 0
        """Steps GradScaler skipped for a scale overflow (not counted)."""
        self.written_step = -1
        """The step whose LR is in the param groups (-1: none yet, or to be written again)."""
        self.written_scale = 1.0

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
    ) -> None:
        """Begin a run of ``total_steps`` planned optimizer steps from step 0.

        ``driven``: the optimizers whose LR to write (default: all); ``module``: what snapshots
        copy besides the optimizers (``None``: no snapshots, no rollbacks); ``reduce``: the
        mean across ranks for the loss feed; ``accumulate``: what each micro-batch loss was
        divided by; ``loss_scale``: GradScaler's scale before its first step; ``manual``: a
        step without a loss still counts (the user stepped the optimizer anyway).
        """
        self.controller = Controller(total_steps, self.config)
        self.optimizers = list(optimizers)
        self.driven = self.optimizers if driven is None else list(driven)
        self.module = module
        self.manual = manual
        self.guard = guard if guard is not None else NonFiniteGuard("off")
        self.feed = LossFeed(
            self.readback_every, reduce, accumulate=accumulate, device=device, loss_scale=loss_scale
        )
        self._step_flag = None
        keep = self.snapshot != "off" and module is not None
        self._snapshots = [Snapshot(self.snapshot) for _ in "ab"] if keep else []  # type: ignore[arg-type]
        self.step = self.skipped_steps = 0
        self.written_step = -1
        self.written_scale = 1.0
        self.adopt_new_param_groups()

    @property
    def snapshot_mode(self) -> SnapshotMode:
        """Where this run keeps snapshots (``"off"`` also when it has no module to copy)."""
        return self.snapshot if self.module is not None else "off"

    def release(self) -> None:
        """Free what the run holds (snapshot memory, the guard's flags) at its end."""
        self._snapshots = []
        self.guard.release()

    def adopt_new_param_groups(self, scale: float = 1.0) -> None:
        """Give each driven param group without a peak LR one.

        At the start a group's configured LR is its peak. A group added during the run (e.g. by
        ``BaseFinetuning``) was given the LR it should have now, beside LRs written with the
        scale ``scale``: its peak is that LR / ``scale``, so it follows the schedule from there.
        """
        for optimizer in self.driven:
            for group in optimizer.param_groups:
                if PEAK_LR_KEY not in group:
                    group[PEAK_LR_KEY] = check_lr(group["lr"]) / scale

    # ------------------------------------------------------------------ per step
    def begin_step(self) -> float | None:
        """Write the LR of the current step (once) and take a snapshot if one is due.

        Returns the LR scale written, ``None`` when this step's LR was already in place."""
        controller = self.controller
        if controller is None or self.written_step == self.step:
            return None
        scale = controller.lr_scale(self.step)
        try:
            for optimizer in self.driven:
                for group in optimizer.param_groups:
                    group["lr"] = group[PEAK_LR_KEY] * scale
        except KeyError:  # a param group added during the run (e.g. by BaseFinetuning)
            # its LR was chosen beside the LRs of the last write: relative to that write's scale
            self.adopt_new_param_groups(self.written_scale)
            # snapshots taken with fewer groups cannot be restored into these optimizers
            controller.forget_snapshots()
            self._snapshots = [Snapshot(s.location) for s in self._snapshots]
            return self.begin_step()
        self.written_step, self.written_scale = self.step, scale
        if self._snapshots and controller.snapshot_due(self.step):
            self._take_snapshot()
        return scale

    def watch_loss(self, loss: Tensor) -> None:
        """A micro-batch loss, before its backward: the guard checks it with the gradients."""
        if self.guard.mode != "off":
            self.guard.add_loss(loss)

    def add_loss(self, loss: Tensor) -> None:
        """A micro-batch loss for the controller (divided by the accumulation count)."""
        self.feed.add(loss)

    def before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Flag the update ``optimizer`` is about to apply when a loss or gradient is
        non-finite, and arrange for it to be skipped (see :mod:`surgeon.guard`)."""
        if self.guard.mode == "off":
            return
        flag = self.guard.check(optimizer)
        if flag is not None:  # several optimizers in one step: any one skipped flags the step
            self._step_flag = flag if self._step_flag is None else self._step_flag.maximum(flag)

    def end_step(self, loss_scale: Tensor | None = None) -> None:
        """Close the current optimizer step (``loss_scale``: GradScaler's scale after it) and
        act on the losses whose readback is now due."""
        self.step += 1
        flag, self._step_flag = self._step_flag, None
        self.guard.release()
        self._consume(self.feed.close_step(loss_scale, flag))

    def finish(self) -> None:
        """Read the losses still in flight (the last ``readback_every`` to
        ``2 x readback_every - 1`` steps) and decide on them like any other: a spike or NaN at
        the very end is recorded, and a rollback leaves the last good weights."""
        if self.controller is not None:
            self._consume(self.feed.flush())

    def _consume(self, due: list[StepLoss]) -> None:
        controller = self.controller
        assert controller is not None
        for item in due:
            if item.no_loss and self.manual:  # the user stepped anyway: count it, unwatched
                for event in controller.pass_step():
                    self.on_event(event)
                continue
            if item.skipped:
                self.skipped_steps += 1
                self.step -= 1
                continue
            loss_step = controller.step
            for event in controller.update(item.loss, update_skipped=item.update_skipped):
                self.on_event(event)
            if controller.rollback_to is not None:
                self._roll_back()
            self.on_loss(loss_step, item.loss, item.update_skipped)

    # ------------------------------------------------------------------ snapshots
    def _take_snapshot(self) -> None:
        """Copy the weights as they are at the start of ``self.step`` into the spare slot (the
        one not holding the rollback target)."""
        assert self.controller is not None and self.module is not None
        good = self.controller.good_snapshot_step
        spare = next(s for s in self._snapshots if s.step is None or s.step != good)
        if spare.capture(self.module, self.optimizers, self.step):
            self.controller.snapshot_taken(self.step, spare.nbytes)

    def _roll_back(self) -> None:
        """Restore the snapshot the controller asked for; the next step starts from it."""
        assert self.controller is not None and self.module is not None
        target = self.controller.rollback_to
        snapshot = next(s for s in self._snapshots if s.step == target)
        # optimizers left to their own LR schedulers keep their settings: their scheduler is
        # not rolled back, so it still owns their LR
        scheduled = [o for o in self.optimizers if not any(o is d for d in self.driven)]
        snapshot.restore(self.module, self.optimizers, keep_settings_of=scheduled)
        self.on_event(self.controller.rolled_back(self.step))
        self.written_step = -1  # the restored param groups hold an old LR: write it again

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The controller's state, the step counters and the losses not yet read (the feed's
        collective runs here: call it on every rank)."""
        assert self.controller is not None
        return {
            "controller": self.controller.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "feed": self.feed.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned into a started engine; events the load
        itself made (a ``replan`` for another planned length) go to ``on_event``."""
        controller = self.controller
        assert controller is not None
        controller.load_state_dict(state["controller"], next_step=state["step"])
        for event in controller.events[len(state["controller"]["events"]) :]:
            self.on_event(event)
        self.step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.feed.load_state_dict(state["feed"])
        self.written_step = -1
