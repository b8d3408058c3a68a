"""``Surgeon``: the surgeon for a plain PyTorch (or Lightning Fabric) training loop.

A scheduler-like front door over the same :class:`~surgeon.engine.StepEngine` the Lightning
callback drives, so the same losses give the same LRs and the same decisions::

    surgeon = Surgeon(optimizer, total_steps=1000, model=model)  # writes step 0's LR
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()
        surgeon.guard(loss)        # optional: a NaN/inf loss or gradient skips this update
        optimizer.step()
        optimizer.zero_grad()
        surgeon.step(loss)         # once per optimizer step: the loss, and the next step's LR

What the loop must call: :meth:`Surgeon.step` after every optimizer step, with that step's
loss (a tensor stays on its device: it is read back a few steps later, in blocks, so a GPU
loop never waits). :meth:`Surgeon.guard` between ``backward`` and ``optimizer.step``, if
non-finite updates are to be skipped. ``model=`` enables last-good snapshots and rollbacks
(weights, buffers and optimizer state are restored in place). Under ``torch.distributed``
(plain DDP or Fabric) losses are averaged across ranks before anything reads them, so every
rank makes the same decisions; call ``step`` and ``guard`` on every rank.
"""

import contextlib
import dataclasses
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from surgeon._validate import check_positive_int, plain_int
from surgeon.config import CONFIG_FIELDS, SurgeonConfig, resolve_steps
from surgeon.controller import Controller, Event, Phase
from surgeon.engine import (
    PEAK_LR_KEY,
    LossRow,
    SnapshotMode,
    StepEngine,
    configured_peak,
    distributed_max,
    distributed_mean,
    starting_scale,
    write_lr,
)
from surgeon.guard import NonFiniteGuard, SkipNonfinite
from surgeon.recorder import RunRecorder
from surgeon.schedules import WSD_DECAY_FRACTION


def _grads_synchronized(model: nn.Module | None) -> bool:
    """Whether ``model`` averages its gradients across ranks in ``backward`` (DDP, also inside
    Fabric's wrapper): then every rank sees the same gradients and the guard needs no
    collective of its own."""
    inner = getattr(model, "_forward_module", model)  # Fabric's _FabricModule wraps the DDP one
    return isinstance(inner, DistributedDataParallel)


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Surgeon:
    """Adaptive warmup, decay and recovery for a plain loop, with a scheduler's interface."""

    def __init__(
        self,
        optimizer: Optimizer | Sequence[Optimizer],
        total_steps: int,
        *,
        model: nn.Module | None = None,
        config: SurgeonConfig | None = None,
        skip_nonfinite: SkipNonfinite = "auto",
        grad_check_every: int = 1,
        snapshot: SnapshotMode = "cpu",
        readback_every: int = 4,
        scaler: Any = None,
        log_dir: str | Path | None = None,
        verbose: bool = True,
        **settings: Any,
    ) -> None:
        """Drive ``optimizer`` (or several) for ``total_steps`` optimizer steps.

        Args:
            optimizer: the optimizer(s) whose every param group's LR the surgeon writes; each
                group's configured ``lr`` is its peak.
            total_steps: the planned number of optimizer steps (calls of :meth:`step`).
            model: the module whose weights and buffers snapshots copy (with the optimizers'
                state); ``None``: no snapshots and no rollbacks.
            config: every decision knob at once; or pass the fields as keywords
                (``**settings``, e.g. ``decay="cosine"``), not both.
            skip_nonfinite: ``"auto"``, ``"always"`` or ``"off"``, as for ``ScheduleSurgeon``
                (acts only where the loop calls :meth:`guard`).
            grad_check_every: check the gradients every n-th step only (and the losses every
                step): cheaper on the CPU, weaker (see :mod:`surgeon.guard`).
            snapshot: ``"cpu"``, ``"device"`` or ``"off"``: where last-good copies live.
            readback_every: losses are read back in blocks of this many steps.
            scaler: the loop's ``torch.amp.GradScaler``, if any: it skips non-finite steps
                itself (the guard stands aside); a step it skips for a scale overflow is
                counted without its loss, one it skips for a NaN/inf loss is recorded.
            log_dir: where to write ``events.jsonl``, ``settings.json``, ``losses.csv`` and
                ``checkpoints.csv`` (rank zero), for ``surgeon plot`` and ``surgeon replay``;
                ``None``: nowhere.
            verbose: print each decision on rank zero as it is made.
        """
        if config is not None and settings:
            raise ValueError(
                f"Surgeon takes config=... or the settings as keywords, not both: got config "
                f"and {sorted(settings)}"
            )
        unknown = sorted(set(settings) - set(CONFIG_FIELDS))
        if unknown:
            raise ValueError(
                f"Surgeon got unknown setting(s) {unknown}; the settings are the fields of "
                f"surgeon.SurgeonConfig: {', '.join(CONFIG_FIELDS)}"
            )
        if not isinstance(verbose, bool):
            raise ValueError(f"verbose must be True or False, got verbose={verbose!r}")
        if config is not None and not isinstance(config, SurgeonConfig):
            raise ValueError(
                f"config must be a surgeon.SurgeonConfig (or pass its fields as keywords), got "
                f"{type(config).__name__}: {config!r:.80}"
            )
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(
                "model must be the torch.nn.Module whose weights snapshots copy, or None, got "
                f"{type(model).__name__}: {model!r:.80}"
            )
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise ValueError(
                "scaler must be the loop's torch.amp.GradScaler, or None, got "
                f"{type(scaler).__name__}: {scaler!r:.80}"
            )
        if log_dir is not None and not isinstance(log_dir, str | Path):
            raise ValueError(f"log_dir must be a path or None, got log_dir={log_dir!r}")
        total_steps, readback_every = plain_int(total_steps), plain_int(readback_every)
        grad_check_every = plain_int(grad_check_every)
        check_positive_int("total_steps", total_steps)
        check_positive_int("grad_check_every", grad_check_every)
        config = config if config is not None else SurgeonConfig(**settings)
        if config.peak_lr != "optimizer":
            raise ValueError(
                f"Surgeon takes each param group's lr as its peak; peak_lr={config.peak_lr!r} "
                "(an LR range test) is a ScheduleSurgeon feature: run a range test first and "
                "set the optimizer's lr"
            )
        if isinstance(optimizer, Optimizer):
            optimizers = [optimizer]
        else:  # a list of them; anything else (a model passed first, ...) is refused below
            optimizers = list(optimizer) if isinstance(optimizer, list | tuple) else []
        if not optimizers or not all(hasattr(o, "param_groups") for o in optimizers):
            raise ValueError(f"optimizer must be an optimizer or a list of them, got {optimizer!r}")
        self.verbose = verbose
        self.scaler = scaler
        self._rank_zero = _is_rank_zero()
        scheduled = [o for o in optimizers if any("initial_lr" in g for g in o.param_groups)]
        if scheduled:  # a torch LR scheduler was made on it: it left its LR, not the peak
            for scheduled_optimizer in scheduled:
                for group in scheduled_optimizer.param_groups:
                    write_lr(group, configured_peak(group))
            if self._rank_zero:
                warnings.warn(
                    "Surgeon: an LR scheduler was made on the optimizer, or its state restored "
                    "from a run that had one (its param groups hold initial_lr): the surgeon "
                    "sets every LR itself, from each group's configured LR (OneCycleLR's max_lr, "
                    "else initial_lr) as its peak; do not step another scheduler",
                    stacklevel=2,
                )
        # optimizer state saved from a run the surgeon drove: resumed only with its state too
        self._driven_before = any(PEAK_LR_KEY in g for o in optimizers for g in o.param_groups)
        self._optimizer_steps = 0  # optimizer steps since the last step() (counted by hooks)
        self._first_call = True  # no step() yet since the start or a load_state_dict
        self._warned_order = False
        self._step_hooks = self._watch_optimizer_steps(optimizers)
        self._recorder: RunRecorder | None = None
        self._warned_past_plan = False
        self._total_steps = total_steps  # the loop's length as given (a cooldown may move it)
        self.engine = StepEngine(
            config,
            snapshot=snapshot,
            readback_every=readback_every,
            on_event=self._report,
            on_losses=self._on_losses,
            on_warning=self._warn,
        )
        if _grads_synchronized(model):
            guard = NonFiniteGuard(skip_nonfinite, check_losses=False)
        else:
            every = grad_check_every if snapshot != "off" and model is not None else 1
            guard = NonFiniteGuard(skip_nonfinite, distributed_max(), grad_check_every=every)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            # GradScaler skips non-finite steps itself and must see the gradients it checks
            # (a guard that dropped them would leave it no inf check to record): stand aside
            guard = NonFiniteGuard("off")
        device = None
        if model is not None:
            device = next((p.device for p in model.parameters()), None)
        self._loss_device = device  # where a loss passed as a number is made
        self.engine.start(
            total_steps,
            optimizers,
            module=model,
            guard=guard,
            reduce=distributed_mean(),
            device=device,
            loss_scale=starting_scale(scaler),
            scaler=scaler,
        )
        if log_dir is not None and self._rank_zero:
            # opened at the first step or load_state_dict, whichever comes first: a loop that
            # resumes into the same directory keeps the rows of the steps before its resume
            self._recorder = RunRecorder(Path(log_dir))
        self._recorder_open = False
        self._checkpoints_before_open: list[int] = []  # state_dict() before the first step
        self._rewrite_hooks: list[Any] = []  # after a resume, until its first update
        self._rewrite_pending = False  # the hooks have not run yet (removed at the next step())
        self.engine.begin_step()  # step 0's LR, as a torch scheduler sets it when made

    # ------------------------------------------------------------------ the loop's calls
    def guard(self, loss: Tensor | None = None) -> None:
        """Before ``optimizer.step()``: flag the update when ``loss`` or a gradient is
        NaN/inf and make each optimizer skip it (free on CPU and for ``fused=True``
        optimizers; see :mod:`surgeon.guard`)."""
        if loss is not None:
            if not isinstance(loss, Tensor):
                raise ValueError(
                    f"guard(loss) takes the loss tensor backward() was called on, got "
                    f"{type(loss).__name__}"
                )
            self.engine.watch_loss(loss)
        if self._optimizer_steps and len(self.engine.optimizers) == 1 and self._step_hooks:
            self._warn_order(
                "guard() was called after an optimizer.step() that no surgeon.step() followed: "
                "call guard before the optimizer step and surgeon.step(loss) after it "
                "(loss.backward(); surgeon.guard(loss); optimizer.step(); surgeon.step(loss)), "
                "or a NaN update is applied before the guard can skip it (a rollback repairs it "
                "later, at best) and, without step(), the LR never moves on",
                stacklevel=3,
            )
        for optimizer in self.engine.optimizers:
            self.engine.before_optimizer_step(optimizer)

    def step(self, loss: Tensor | float) -> None:
        """After ``optimizer.step()``: this step's loss (a tensor is not read now), then the
        LR of the next step into every param group (and a snapshot, when one is due).

        Raises :class:`surgeon.engine.TrainingStalled` when the run can make no progress (every
        step non-finite for two snapshot intervals with nothing to roll back to)."""
        if not isinstance(loss, Tensor):
            if not isinstance(loss, numbers.Real) or isinstance(loss, bool):
                raise ValueError(
                    f"step(loss) takes the step's scalar loss (a tensor or a number), got "
                    f"{type(loss).__name__}: {loss!r:.80}"
                )
            loss = torch.tensor(float(loss), device=self._loss_device)
        elif loss.dim() and loss.numel() != 1:
            raise ValueError(
                f"step(loss) takes the step's scalar loss, got a tensor of shape "
                f"{tuple(loss.shape)}: pass its mean (or the value backward() was called on)"
            )
        if self._step_hooks:
            self._check_order()
        if self._rewrite_hooks and not self._rewrite_pending:
            self._rewrite_hooks = _removed(self._rewrite_hooks)
        if self._driven_before:
            self._driven_before = False
            if self._rank_zero:
                warnings.warn(
                    f"Surgeon: the optimizer's param groups hold {PEAK_LR_KEY}: its state comes "
                    "from a run a surgeon drove, but this Surgeon was given no state of that run "
                    "(load_state_dict), so its schedule starts again from step 0 (warmup "
                    "included); save surgeon.state_dict() with the optimizer's and load both to "
                    "resume the schedule",
                    stacklevel=2,
                )
        engine = self.engine
        if self._recorder is not None and not self._recorder_open:
            self._open_recorder()
        engine.add_loss(loss.detach())
        engine.end_step(getattr(self.scaler, "_scale", None))
        engine.begin_step()
        total = self.controller.total_steps
        if engine.step > total and not self._warned_past_plan and total == self._total_steps:
            # (a plan a cooldown moved ends where it was asked to: no warning then)
            self._warned_past_plan = True
            if self._rank_zero:
                warnings.warn(
                    f"Surgeon: step {engine.step - 1} is past the planned length of "
                    f"{total} steps: the LR stays at the floor "
                    f"({self.controller.floor:g} x the peak) from here; give Surgeon the loop's "
                    "real length as total_steps (a resumed run may plan a longer one)",
                    stacklevel=2,
                )

    def _hook_optimizers(
        self, optimizers: Sequence[Optimizer], kind: str, action: Callable[["Surgeon"], None]
    ) -> list[Any]:
        """A step hook (``kind``: ``"pre"`` or ``"post"``) on each optimizer that has them (a
        wrapper that never ran ``Optimizer.__init__`` has none) calling ``action(self)``; it
        holds this object weakly, so a ``Surgeon`` dropped while hooked is freed."""
        me = weakref.ref(self)

        def hook(*_: Any) -> None:
            surgeon = me()
            if surgeon is not None:
                action(surgeon)

        handles = []
        for optimizer in optimizers:
            with contextlib.suppress(AttributeError):  # a wrapper without Optimizer's hooks
                handles.append(getattr(optimizer, f"register_step_{kind}_hook")(hook))
        return handles

    def _watch_optimizer_steps(self, optimizers: list[Optimizer]) -> list[Any]:
        """Count optimizer steps between :meth:`step` calls (a post-hook on each)."""

        def count(surgeon: Surgeon) -> None:
            surgeon._optimizer_steps += 1
            if surgeon._optimizer_steps == len(surgeon.engine.optimizers) + 1:
                surgeon._warn_order(
                    "optimizer.step() ran again with no surgeon.step() since its last step: "
                    "call surgeon.step(loss) after every optimizer step (it writes the next "
                    "step's LR; without it the LR stays where it is)",
                    stacklevel=5,  # warn, count, hook, torch's step wrapper: the loop's call
                )

        return self._hook_optimizers(optimizers, "post", count)

    def _rewrite_lr_before_next_update(self) -> None:
        """A one-shot step pre-hook on each driven optimizer that writes this step's LR again
        (it runs once; the hooks go at the next :meth:`step` after, at :meth:`finish` or
        another load: removing a hook while the optimizer runs its hooks would break their
        iteration)."""

        def rewrite(surgeon: Surgeon) -> None:
            if not surgeon._rewrite_pending:
                return
            surgeon._rewrite_pending = False
            surgeon.engine.written_step = -1
            surgeon.engine.forget_written_lr()  # a state loaded after the surgeon's set them
            surgeon.engine.begin_step()

        _removed(self._rewrite_hooks)
        self._rewrite_hooks = self._hook_optimizers(self.engine.driven, "pre", rewrite)
        self._rewrite_pending = True

    def _unhook(self) -> None:
        self._step_hooks = _removed(self._step_hooks)

    def _check_order(self) -> None:
        """At each :meth:`step`: say so, once, if no optimizer stepped since the last one
        (``step`` called before ``optimizer.step()``: every LR would come a step early and the
        guard's flags be cleared before the update they guard; or twice for one optimizer step:
        the plan runs ahead of the loop). Under a GradScaler, whose steps may be skips, nothing
        is said."""
        stepped, self._optimizer_steps = self._optimizer_steps, 0
        first, self._first_call = self._first_call, False
        if stepped or self.scaler is not None:
            return
        if first:
            self._warn_order(
                "step() was called before any optimizer.step(): call it after, once per "
                "optimizer step (loss.backward(); surgeon.guard(loss); optimizer.step(); "
                "surgeon.step(loss)), or every LR comes a step early and the guard cannot "
                "skip a NaN update (a GradScaler that skipped the first step: pass it as "
                "scaler=)"
            )
        else:
            self._warn_order(
                f"step() was called again at step {self.engine.step} with no optimizer.step() "
                "since the last call: call it once per optimizer step, after it (each call "
                "counts a step, so the plan runs ahead of the loop; a GradScaler that skips "
                "steps: pass it as scaler=)"
            )

    def _warn_order(self, message: str, stacklevel: int = 4) -> None:
        """A misordered call, said once per run (on rank zero), at the loop's call."""
        if not self._warned_order and self._rank_zero:
            self._warned_order = True
            warnings.warn(f"Surgeon: {message}", stacklevel=stacklevel)

    def finish(self) -> None:
        """After the last step: read the losses still in flight and decide on them (a spike
        or NaN in the last steps is recorded, a rollback leaves the last good weights); a loop
        that ends before its plan gets a ``stopped`` event saying where the LR was left."""
        self._unhook()
        self._rewrite_hooks = _removed(self._rewrite_hooks)
        self.engine.finish()
        event = self.controller.ended_early(
            self.engine.step,
            "finish() was called before the plan's end (total_steps counts optimizer steps: "
            "with gradient accumulation, batches / accumulation; a loop that ends early on "
            "purpose calls cool_down_now() first, to end at the floor)",
        )
        if event is not None:
            self._report(event)
        if self._recorder is not None:
            self._recorder.close()

    def cool_down_now(self, steps: int | float | None = None) -> Event | None:
        """Bring the end of the run forward: from the current step, decay from the current LR
        to the floor over ``steps`` (an int, or a fraction of the planned run; default 20% of
        it, WSD's usual tail) and end the plan there (e.g. when a time budget or an
        early-stopping rule is about to end the loop). Under ``torch.distributed`` call it on
        every rank. Returns the ``cooldown`` event, ``None`` when the plan ends by then anyway."""
        steps = plain_int(steps)  # a numpy integer is an int
        length = WSD_DECAY_FRACTION if steps is None else steps
        n = resolve_steps("steps", length, self.controller.total_steps, 1)
        why = f"cool_down_now(steps={steps!r}) was called"
        return self.engine.cool_down(n, why)  # the LR already written is on the new curve

    # ------------------------------------------------------------------ scheduler interface
    @property
    def controller(self) -> Controller:
        """The decisions' phase machine."""
        assert self.engine.controller is not None
        return self.engine.controller

    @property
    def events(self) -> list[Event]:
        """Every decision so far, oldest first."""
        return self.engine.events

    @property
    def phase(self) -> Phase:
        return self.engine.phase

    @property
    def last_step(self) -> int:
        """Optimizer steps taken so far (the step whose LR is now in the param groups)."""
        return self.engine.step

    def get_last_lr(self) -> list[float | Tensor]:
        """The LR now in each driven param group, optimizer by optimizer (as torch's
        ``LRScheduler.get_last_lr``: a tensor LR as a copy, which later steps leave alone)."""
        return [
            lr.clone() if isinstance(lr, Tensor) else lr
            for o in self.engine.driven
            for g in o.param_groups
            for lr in (g["lr"],)
        ]

    def state_dict(self) -> dict[str, Any]:
        """Counters and the controller's state. It first reads the losses still in flight and
        decides on them (a spike among them is rolled back now, and the next step's LR is
        written again), so call it *before* taking the model's and optimizers' state dicts
        (save those too: the peaks live in the optimizers' param groups). Under
        ``torch.distributed`` call it on every rank."""
        state = self.engine.state_dict()
        # what it decided may move the LR already written for the next step: write it again
        # (no snapshot at the step a checkpoint starts at, as the resumed run's load_state_dict)
        self.engine.written_step = -1
        self.engine.begin_step()
        if self._recorder is not None:
            if self._recorder_open:
                self._recorder.flush()
                self._recorder.checkpoint(self.controller.step)  # where replay reads them too
            else:  # opened lazily (a resume must not truncate first): written when it opens
                self._checkpoints_before_open.append(self.controller.step)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the next LRs are those of the uninterrupted run."""
        self._optimizer_steps, self._first_call = 0, True  # the resumed loop's calls from here
        self._driven_before = False
        self.engine.load_state_dict(state)
        if self._recorder is not None:
            self._checkpoints_before_open = []  # of the state replaced by this one
            self._open_recorder()
        # the LR of the saving run's next step (no snapshot there, as in the saving run: the
        # model may be loaded after the surgeon), and again just before the first update: an
        # optimizer state loaded after this one, or saved before the surgeon's, carries an
        # older LR (fabric.save / fabric.load follow their dict's order)
        self.engine.begin_step()
        self._rewrite_lr_before_next_update()

    # ------------------------------------------------------------------ reporting
    def _open_recorder(self) -> None:
        assert self._recorder is not None
        self._recorder_open = True
        controller = self.controller
        self._recorder.start(
            config=self.engine.config,
            total_steps=controller.total_steps,
            readback_every=self.engine.readback_every,
            snapshot=self.engine.snapshot_mode,
            events=[self.engine.event_record(e) for e in self.events],
            next_loss_step=controller.step,
            peak_lrs=self.engine.peak_lrs(),
        )
        for step in self._checkpoints_before_open:
            self._recorder.checkpoint(step)
        self._checkpoints_before_open = []

    def _report(self, event: Event) -> None:
        if self._recorder is not None:
            if self._recorder_open:
                self._recorder.event(self.engine.event_record(event))
            else:  # the controller records an event before it is reported: this one among them
                self._open_recorder()
        if self.verbose and self._rank_zero:
            print(f"surgeon: step {event.step}: {event.kind.value}: {event.reason}", flush=True)

    def _warn(self, message: str) -> None:
        if self._rank_zero:
            warnings.warn(f"Surgeon: {message}", stacklevel=5)  # at the loop's state_dict()

    def _on_losses(self, rows: list[LossRow]) -> None:
        if self._recorder is not None:
            self._recorder.losses(rows)

    def __repr__(self) -> str:
        settings = {
            f.name: getattr(self.engine.config, f.name)
            for f in dataclasses.fields(self.engine.config)
            if getattr(self.engine.config, f.name) != f.default
        }
        lr = self.get_last_lr()[0] if self.get_last_lr() else math.nan
        return (
            f"Surgeon(step={self.last_step}, phase={self.phase.value}, lr={lr:.4g}, "
            f"settings={settings})"
        )


def _removed(handles: list[Any]) -> list[Any]:
    """Remove hooks by their handles; the empty list that replaces them."""
    for handle in handles:
        handle.remove()
    return []
