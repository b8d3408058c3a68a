"""One fit of the outcome benchmark: a contender trains a task with one seed, through a real
Lightning ``Trainer.fit``, and the per-step curves come back (``benchmarks/quality.py``).

:func:`fingerprint` hashes everything a fixed contender's fit depends on (this module, the
tasks, the contenders, the schedules, the models of the examples, torch and Lightning), so
``quality.py --reuse`` takes earlier fits of the fixed contenders only when none of it changed.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytorch_lightning as pl
import quality_tasks
import torch
from quality_contenders import Contender, configure, rop_window
from quality_tasks import REPO, VAL_POINTS, Task

from surgeon import ScheduleSurgeon


@dataclass(frozen=True)
class Job:
    """``contender`` trains ``task`` for ``steps`` steps at peak ``lr``, seeded by ``seed``."""

    task: str
    contender: Contender
    seed: int
    steps: int
    lr: float
    val_points: int = VAL_POINTS
    """Validations, every ``steps // val_points`` steps (``steps`` is a multiple)."""
    code: str = ""
    """:func:`fingerprint` of the code, taken once when the run starts."""

    def key(self) -> str:
        """What identifies the fit for ``--reuse``."""
        return (
            f"{self.task}|{self.contender.name}|{self.seed}|{self.steps}|{self.lr!r}|"
            f"{self.val_points}|{self.code}"
        )


FIT_SOURCES = (
    "benchmarks/quality_fit.py",
    "benchmarks/quality_tasks.py",
    "benchmarks/quality_contenders.py",
    "examples/toy_tasks.py",
    "surgeon/demo.py",
    "surgeon/schedules.py",
)


def fingerprint() -> str:
    """A hash of the sources and versions a fixed contender's fit depends on."""
    digest = hashlib.sha256(f"{torch.__version__} {pl.__version__}".encode())
    for path in FIT_SOURCES:
        digest.update((REPO / path).read_bytes())
    return digest.hexdigest()[:16]


class Recorder(pl.Callback):
    """Per step: the training loss and the LR the optimizer step used; each validation loss."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self.val: list[tuple[int, float]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach())

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(trainer.callback_metrics["val_loss"])))


def quiet() -> None:
    """One torch thread, no Lightning chatter, no warnings."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "surgeon"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_job(job: Job, tasks: dict[str, Task] | None = None) -> dict[str, Any]:
    """Train one contender on one task with one seed; return its raw curves and events."""
    task = (tasks or quality_tasks.TASKS)[job.task]
    contender = job.contender
    pl.seed_everything(job.seed, verbose=False)
    model, data = task.build(job.seed, job.steps)
    model.bench_configure = partial(configure, task, contender, job.lr, job.steps)
    if contender.kind == "plateau":
        model.rop_window = rop_window(job.steps)
    recorder = Recorder()
    surgeon = ScheduleSurgeon(**dict(contender.surgeon)) if contender.kind == "surgeon" else None
    callbacks = [recorder] if surgeon is None else [surgeon, recorder]
    with tempfile.TemporaryDirectory() as root:  # the surgeon's events.jsonl lands here
        trainer = pl.Trainer(
            max_steps=job.steps,
            callbacks=callbacks,
            logger=False,
            default_root_dir=root,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            val_check_interval=max(1, job.steps // job.val_points),
            check_val_every_n_epoch=None,
            accelerator="cpu",
            devices=1,
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        wall = time.perf_counter() - start
    events = [
        {
            "step": e.step,
            "kind": e.kind.value,
            "reason": e.reason,
            "lr_before": job.lr * e.scale_before,
            "lr_after": job.lr * e.scale_after,
        }
        for e in (surgeon.events if surgeon is not None else [])
    ]
    return {
        "task": job.task,
        "contender": contender.name,
        "seed": job.seed,
        "steps": job.steps,
        "peak_lr": job.lr,
        "train_loss": torch.stack(recorder.losses).tolist() if recorder.losses else [],
        "lr": recorder.lrs,
        "val": recorder.val,
        "events": events,
        "wall_s": wall,
        "key": job.key(),
    }
