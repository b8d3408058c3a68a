"""What users of the Lightning callback see, and where.

* each event as a line through Lightning's rank-zero info channel (``verbose``), as text in
  TensorBoard and as ``surgeon/event`` (its code) in every logger, at Lightning's step;
* the run files (:mod:`surgeon.recorder`) in every logger's directory;
* the LRs (named as ``LearningRateMonitor`` names them, left to it when it runs), the losses,
  their smoothed value and the phase at Lightning's logging cadence and steps;
* the LR, phase and last event in ``trainer.callback_metrics``, the phase in the progress bar;
* the settings among every logger's hyperparameters.

Only rank zero logs and writes files; ``callback_metrics`` are kept on every rank.
"""

import csv
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from surgeon._lightning.trainer import is_a, lr_metric_names
from surgeon.config import SurgeonConfig
from surgeon.controller import Event, Phase
from surgeon.engine import PEAK_LR_KEY, StepEngine
from surgeon.recorder import (
    EVENT_CODES,
    LR_FIND_FILE,
    PHASE_CODES,
    RunRecorder,
    run_settings,
)

log = logging.getLogger("surgeon")
"""Warnings (events and notices go through Lightning's rank-zero info channel)."""
SURGEON_LOGS = "surgeon_logs"
"""Without a logger or ``log_dir``, run files go to ``default_root_dir/surgeon_logs/version_N``."""
NEVER = 2**62
"""A step no fit reaches (an integer, so the per-step comparisons stay integer ones)."""


def _versioned_dir(root: Path) -> Path:
    """``root/version_N`` for the first N not taken (as Lightning's loggers number runs)."""
    taken = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    return root / f"version_{max(taken, default=-1) + 1}"


def _write_lr_find(path: Path, curve: list[tuple[float, float]] | None) -> None:
    """The range test's curve as ``lr,loss`` rows (no curve: no file)."""
    if curve is None:
        path.unlink(missing_ok=True)
        return
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lr", "loss"])
        writer.writerows(curve)


class Reporter:
    """The events, losses, LRs and state of one :class:`~surgeon.engine.StepEngine`, where a
    Lightning user looks (see the module)."""

    def __init__(
        self, engine: StepEngine, config: SurgeonConfig, *, verbose: bool, log_dir: Path | None
    ) -> None:
        self.engine, self.config = engine, config
        self.verbose, self.log_dir = verbose, log_dir
        self.trainer: Any = None
        self.is_global_zero = True
        self.loggers: list[Any] = []
        self.log_dirs: list[Path] = []
        self.recorder: RunRecorder | None = None
        self.lr_names: list[list[str]] = []
        self.lr_monitored = False
        self.log_every = 0
        self.next_log = NEVER
        """Lightning's next step at whose start the LRs are logged (its cadence)."""
        self.step_offset: int | None = None
        """Lightning's logging step of the surgeon's step 0 (known at the first batch)."""
        self.plan_end = NEVER
        self.done_shown = False
        self._shown_phase: str | None = None

    # ------------------------------------------------------------------ a fit's course
    def begin_fit(self, trainer: pl.Trainer) -> None:
        """``on_fit_start``: this fit's Trainer and loggers; no run files yet."""
        self.recorder = None  # opened in begin_training, once a checkpoint is restored
        self.trainer = trainer
        self.is_global_zero = trainer.is_global_zero
        self.loggers = list(trainer.loggers)
        self.log_dirs = []
        self._shown_phase = None

    def watch_lrs(self, trainer: pl.Trainer, callback: pl.Callback) -> None:
        """The LR metric names of the driven optimizers, whether a ``LearningRateMonitor``
        logs them (then ``callback`` goes ahead of it), and Lightning's logging cadence."""
        self.lr_names = lr_metric_names(self.engine.driven)
        self.lr_monitored = self._go_before_lr_monitors(trainer, callback)
        self.log_every = trainer.log_every_n_steps  # type: ignore[attr-defined]

    def begin_training(
        self, trainer: pl.Trainer, lr_find_curve: list[tuple[float, float]] | None, resuming: bool
    ) -> None:
        """``on_train_start``, after a checkpoint is restored: open the run files on rank zero
        (they hold this run's events and losses: none when it starts fresh, as a reused log
        directory keeps no older run's, the restored ones when it resumes, none twice after a
        crash) and show the state. A ``fast_dev_run`` writes none (Lightning's loggers write
        nothing then either) unless ``log_dir`` asks for them."""
        self.step_offset = None
        self.next_log = 0 if self.log_every else NEVER
        controller = self.engine.controller
        assert controller is not None
        self.plan_end, self.done_shown = controller.total_steps, False
        self._shown_phase = None  # Lightning cleared the progress bar's metrics after sanity
        if self.is_global_zero and (self.log_dir is not None or not trainer.fast_dev_run):  # type: ignore[attr-defined]
            self.log_dirs = self._run_directories(trainer)
            self.recorder = RunRecorder(*self.log_dirs)
            self.recorder.start(
                config=self.config,
                total_steps=controller.total_steps,
                readback_every=self.engine.readback_every,
                snapshot=self.engine.snapshot_mode,
                events=[self.engine.event_record(event) for event in self.engine.events],
                next_loss_step=controller.step,
                peak_lrs=self.engine.peak_lrs(),
            )
            if not resuming:  # a reused directory keeps no old curve
                for directory in self.log_dirs:
                    _write_lr_find(directory / LR_FIND_FILE, lr_find_curve)
        self.publish()

    def flush(self) -> None:
        """The loss rows so far onto disk (checkpoints, the end of training)."""
        if self.recorder is not None:
            self.recorder.flush()

    def checkpoint(self, step: int) -> None:
        """A checkpoint written after the losses of ``step`` steps were read: into
        ``checkpoints.csv``."""
        if self.recorder is not None:
            self.recorder.checkpoint(step)

    def close(self) -> None:
        """Close the run files (teardown, or a fault: what was decided stays on disk)."""
        if self.recorder is not None:
            self.recorder.close()

    def end_fit(self) -> None:
        """``teardown``: the Trainer is no longer this fit's."""
        self.trainer = None
        self.close()

    # ------------------------------------------------------------------ per step
    def log_lrs(self, step: int) -> None:
        """At the start of Lightning's step ``step`` (due: ``step >= next_log``; micro-batches
        share it): when Lightning logs that step (its ``should_update_logs``), the LRs in place
        for it, named as ``LearningRateMonitor`` names them (left to it when it runs), the
        scale, and the state in ``callback_metrics``."""
        every = self.log_every
        self.next_log = ((step + 1) // every + 1) * every - 1
        if (step + 1) % every:
            return
        written = self.engine.written_scale
        metrics = {"surgeon/lr_scale": written}
        driven = self.engine.driven
        if not self.lr_monitored:
            pairs = zip(driven, self.lr_names, strict=True)
            if any(len(optimizer.param_groups) != len(names) for optimizer, names in pairs):
                # groups restored after on_fit_start (a resumed BaseFinetuning), or added with a
                # copied peak: name them now
                self.lr_names = lr_metric_names(driven)
            for optimizer, names in zip(driven, self.lr_names, strict=True):
                for group, name in zip(optimizer.param_groups, names, strict=True):
                    lr = group["lr"]  # a tensor LR (compiled optimizers): the value written
                    # into it, not read back (on a GPU, reading it would wait for the device)
                    metrics[name] = (
                        lr if not isinstance(lr, torch.Tensor) else group[PEAK_LR_KEY] * written
                    )
        if self.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)
        self.publish()

    def losses(self, rows: list[tuple[int, float | None, bool]]) -> None:
        """Losses the controller consumed, ``(step, loss, update_skipped)``: into ``losses.csv``."""
        if self.recorder is not None:
            self.recorder.losses(rows)

    def loss(self, step: int, loss: float, update_skipped: bool) -> None:
        """A loss the controller has just consumed: into the loggers at its own step when
        Lightning logs that step, with its smoothed value and the phase (rank zero, with
        loggers: see :meth:`watches_losses`). The engine calls it again at the next such step."""
        engine, every, offset = self.engine, self.log_every, self.step_offset or 0
        at = step + offset  # Lightning's step
        engine.on_loss_from = ((at + 1) // every + 1) * every - 1 - offset
        if (at + 1) % every == 0:
            controller = engine.controller
            assert controller is not None
            metrics = {
                "surgeon/loss": loss,
                "surgeon/loss_smooth": controller.spike.mean,
                "surgeon/phase": PHASE_CODES[controller.phase],
            }
            for logger in self.loggers:
                logger.log_metrics(metrics, step=at)

    @property
    def watches_losses(self) -> bool:
        """Whether :meth:`loss` has anything to do (rank zero, loggers, a logging cadence)."""
        return bool(self.is_global_zero and self.loggers and self.log_every)

    @property
    def next_done(self) -> int:
        """The step from which the planned steps have run (:meth:`done` is due; once a plan)."""
        return NEVER if self.done_shown else self.plan_end

    def follow_plan(self) -> None:
        """The plan's end may have moved (an event, or a ``max_time`` cooldown moved without
        one): :meth:`done` is due at the new end."""
        controller = self.engine.controller
        if controller is not None and controller.total_steps != self.plan_end:
            self.plan_end, self.done_shown = controller.total_steps, False

    def done(self) -> None:
        """The planned steps have run: the bar and ``callback_metrics`` say ``done`` at once."""
        self.done_shown = True
        self.publish()

    # ------------------------------------------------------------------ events and state
    def notice(self, message: str) -> None:
        """A one-off line through Lightning's rank-zero info channel (``verbose``)."""
        if self.verbose:
            rank_zero_info(f"ScheduleSurgeon: {message}")

    def warn_no_loss(self, manual: bool) -> None:
        """Say (once: the caller's) that a ``training_step`` output had no loss."""
        how = "the user's opt.step() may still update" if manual else "Lightning skips the update"
        log.warning(
            "ScheduleSurgeon found no loss in a training_step output; steps without a loss are "
            f"counted (the plan moves on; {how}), but no spike, plateau or stabilization can be "
            "seen in them: return the loss, or a dict with 'loss'"
        )

    def report(self, event: Event) -> None:
        """``event`` where users look: a line through Lightning's rank-zero info channel
        (``verbose``), its record in ``events.jsonl``, ``surgeon/event`` (its code) in every
        logger and its sentence as TensorBoard text, at Lightning's step; the state in
        ``callback_metrics`` and the progress bar."""
        record = self.engine.event_record(event)
        line = f"step {event.step}: {event.kind.value}: {event.reason} "
        line += f"(lr {record['lr_before']:.3g} -> {record['lr_after']:.3g})"
        self.notice(line)
        if self.recorder is not None:
            self.recorder.event(record)
        self.follow_plan()
        if self.is_global_zero and self.loggers:
            step = event.step + (self.step_offset or 0)
            for logger in self.loggers:
                logger.log_metrics({"surgeon/event": EVENT_CODES[event.kind]}, step=step)
                if is_a(logger, "TensorBoardLogger"):
                    logger.experiment.add_text("surgeon/events", line, global_step=step)
        self.publish()

    def publish(self, trainer: Any = None) -> None:
        """The state where Lightning users look: ``surgeon/lr`` (the first param group's, for
        the current step), ``surgeon/lr_scale``, ``surgeon/phase``, ``surgeon/last_event`` and
        its step in ``trainer.callback_metrics`` (monitorable, usable in checkpoint names), and
        the phase's name in the progress bar (``done`` once the planned steps have run).
        ``trainer``: a hook's (default: this fit's)."""
        controller = self.engine.controller
        trainer = self.trainer if trainer is None else trainer
        if controller is None or trainer is None or not self.engine.driven:
            return
        step = self.engine.step
        shown = Phase.DONE if step >= controller.total_steps else controller.phase
        scale = controller.lr_scale(step)  # the current step's, written or about to be
        values = {
            "surgeon/lr": self.engine.driven[0].param_groups[0][PEAK_LR_KEY] * scale,
            "surgeon/lr_scale": scale,
            "surgeon/phase": PHASE_CODES[shown],
        }
        if controller.events:
            last = controller.events[-1]
            values["surgeon/last_event"] = EVENT_CODES[last.kind]
            values["surgeon/last_event_step"] = float(last.step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        if shown.value != self._shown_phase:  # the bar reads trainer.progress_bar_metrics
            self._shown_phase = shown.value
            trainer.progress_bar_metrics["phase"] = shown.value

    def log_hyperparams(self, trainer: pl.Trainer) -> None:
        """The run's settings (``settings.json``) among every logger's hyperparameters, as
        ``surgeon/...``, before Lightning logs the model's (rank zero). TensorBoard shows the
        first set a run was given: it gets the model's (and datamodule's) with them."""
        if not self.is_global_zero:
            return
        controller, engine = self.engine.controller, self.engine
        assert controller is not None
        settings = run_settings(
            self.config, controller.total_steps, engine.readback_every, engine.snapshot_mode
        )
        flat = {**{k: v for k, v in settings.items() if k != "config"}, **settings["config"]}
        theirs: dict[str, Any] = {}
        for owner in (trainer.lightning_module, trainer.datamodule):  # type: ignore[attr-defined]
            if owner is not None and getattr(owner, "_log_hyperparams", False):
                theirs.update(owner.hparams_initial)
        theirs.pop("_class_path", None)  # as Lightning leaves LightningCLI's out
        for logger in self.loggers:
            first = theirs if is_a(logger, "TensorBoardLogger") else {}
            logger.log_hyperparams({**first, "surgeon": flat})
            logger.save()

    # ------------------------------------------------------------------ setup
    def _run_directories(self, trainer: pl.Trainer) -> list[Path]:
        """``log_dir``, else every logger's directory (``log_dir`` where it has one, as
        Lightning's ``trainer.log_dir`` takes it, else ``save_dir``), else a new
        ``default_root_dir/surgeon_logs/version_N``."""
        if self.log_dir is not None:
            return [self.log_dir]
        directories: list[Path] = []
        for logger in self.loggers:
            found = getattr(logger, "log_dir", None) or logger.save_dir
            if found is not None and Path(found) not in directories:
                directories.append(Path(found))
        return directories or [_versioned_dir(Path(trainer.default_root_dir) / SURGEON_LOGS)]

    def _go_before_lr_monitors(self, trainer: pl.Trainer, callback: pl.Callback) -> bool:
        """Whether a ``LearningRateMonitor`` logs the LRs. If so the surgeon leaves the ``lr-*``
        series to it and moves ``callback`` ahead of it in ``trainer.callbacks``: both act in
        ``on_train_batch_start``, the surgeon's write must come first for the monitor to log the
        LR the step uses (Lightning calls the hooks in list order)."""
        # called from on_fit_start, while Lightning iterates this list: moving an element to an
        # earlier place neither skips nor repeats the callbacks after it
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        monitors = [i for i, cb in enumerate(callbacks) if is_a(cb, "LearningRateMonitor")]
        if not monitors or not self.loggers:
            return False
        moved = ""
        if callbacks.index(callback) > monitors[0]:
            callbacks.remove(callback)
            callbacks.insert(monitors[0], callback)
            moved = " (moved ahead of it in trainer.callbacks, so it logs the LR each step uses)"
        names = ", ".join(name for names in self.lr_names for name in names)
        self.notice(
            f"LearningRateMonitor logs the learning rates ({names}){moved}; the surgeon leaves "
            "those series to it and logs surgeon/lr_scale beside them"
        )
        return True
