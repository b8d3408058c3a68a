"""Replay: a logged loss stream fed through a fresh controller the way the callback feeds it.

Time, as in :class:`surgeon.callback.ScheduleSurgeon`: the LR of step ``s`` is
``lr_scale(s)`` asked when step ``s`` starts; losses reach the controller in blocks of
``readback_every`` steps, each block when the next one closes (``readback_every`` to
``2 x readback_every - 1`` steps late), and the last ones when the stream ends. The LRs
depend on that lag, and so do the snapshots (below), hence the rollbacks: replay
reproduces it step for step. A checkpoint reads every loss in flight at once (and decides
on a last spike no loss confirms yet), then drops the snapshots; a run records after how
many steps it wrote each (``checkpoints.csv``), and replay does the same there.

Snapshots and rollbacks: at the start of every step where the controller says a snapshot is
due, the callback copies the weights; replay tells the controller it did
(``snapshot_taken(step, 0)``: there are no weights, so a rollback's reason says 0 bytes).
When a loss makes the controller ask for a rollback, replay does what the callback does
after restoring the snapshot: ``rolled_back(now)``, ``now`` the next step to start, so the
losses of the undone steps still in flight are ignored as in the real run. The stream goes
on with the losses that were logged: for a surgeon run those are the losses after its
rollback; for a run logged without the surgeon they are the losses of weights that were
never rolled back (replay says what the surgeon would have decided, not what the run would
have become).

Inputs (:func:`read_stream`): a surgeon run directory (``losses.csv``: every loss as the
controller saw it, with ``settings.json``, ``events.jsonl`` and ``checkpoints.csv`` beside
it), a Lightning
``CSVLogger`` ``metrics.csv`` or TensorBoard event file (a ``loss``-like series, or the one
named), or a two-column ``step,loss`` CSV from any framework. A stream logged every ``k``
steps (Lightning's ``log_every_n_steps``) is replayed as it is: one logged point is one
controller step, so ``total_steps`` and every length in steps count logged points (lengths
given as fractions of the run mean the same as on the full stream); events and LRs are
placed back at the logged steps. Without an ``update_skipped`` column a non-finite loss
counts as a skipped update (what the surgeon's guard does with it). A step the surgeon counted
without a loss (a ``training_step`` that returned none, a step GradScaler skipped for a scale
overflow) is a ``losses.csv`` row with an empty loss: replay counts it the same way
(``passed``); in a metrics file such steps are missing, so such a run replays with a lag
shifted by their count.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from surgeon._validate import check_positive_int
from surgeon.config import SurgeonConfig
from surgeon.controller import END_UNREAD_MARK, STATE_ROLLBACK_MARK, Controller, Event
from surgeon.recorder import (
    CHECKPOINTS_FILE,
    EVENTS_FILE,
    LOSSES_FILE,
    SETTINGS_FILE,
    parse_number,
    parse_step,
    read_events,
    read_text,
    whole_lines,
)

__all__ = [
    "LossStream",
    "Replay",
    "RunSettings",
    "feed",
    "read_stream",
    "replay",
]

LOSS_METRICS = ("surgeon/loss", "train_loss_step", "train_loss", "train/loss", "loss")
"""Series taken from a metrics file without ``--metric``, first found first."""
_NOT_TRAINING = ("val", "test", "epoch", "smooth", "lr")

OUTSIDE_DECISIONS = ("cooldown", "replan", "stopped")
"""Event kinds a run's plan changes by from outside its losses (a time budget, EarlyStopping,
a request, a resume with other settings, a manual run's optimizer calls): a replay of the
losses does not make them, so from the first of them on its plan is not the run's."""


def before_outside_decision(
    logged: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The logged event records a replay can make (before the run's first decision from
    outside its losses, :data:`OUTSIDE_DECISIONS`; ``peak_lr``, set before step 0, left out),
    and that decision's record (``None``: the run made none)."""
    kept: list[dict[str, Any]] = []
    for record in logged:
        state_check = record["kind"] == "rollback" and STATE_ROLLBACK_MARK in record["reason"]
        if record["kind"] in OUTSIDE_DECISIONS or state_check:
            return kept, record
        if record["kind"] != "peak_lr":  # the settings carry the peak
            kept.append(record)
    return kept, None


@dataclass(frozen=True)
class RunSettings:
    """What a replay needs besides the losses: the run's plan, its read-back lag, its config,
    and whether it kept snapshots (``snapshot="off"``: no rollbacks)."""

    total_steps: int
    config: SurgeonConfig = field(default_factory=SurgeonConfig)
    readback_every: int = 4
    snapshots: bool = True

    def __post_init__(self) -> None:
        check_positive_int("total_steps", self.total_steps)
        check_positive_int("readback_every", self.readback_every)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSettings:
        """Settings from a ``settings.json`` object (an absent ``snapshot`` means on); one that
        is not an object, or lacks ``total_steps`` or ``config``, is a ``ValueError``."""
        known = {f.name for f in fields(SurgeonConfig)}
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            what = type(data).__name__ if not isinstance(data, dict) else "no 'config' object"
            raise ValueError(f"not the surgeon's settings ({what}): settings.json is written by it")
        if "total_steps" not in data:
            raise ValueError("not the surgeon's settings (no 'total_steps')")
        config = data["config"]
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"settings config has fields SurgeonConfig does not know: {unknown}; "
                "replay it with a surgeon version that has them"
            )
        return cls(
            total_steps=data["total_steps"],
            config=SurgeonConfig(**config),
            readback_every=data.get("readback_every", 4),
            snapshots=data.get("snapshot", "cpu") != "off",
        )

    def to_json(self) -> dict[str, Any]:
        """The ``settings.json`` form (inverse of :meth:`from_json`)."""
        return {
            "total_steps": self.total_steps,
            "readback_every": self.readback_every,
            "snapshot": "cpu" if self.snapshots else "off",
            "config": asdict(self.config),
        }


@dataclass(frozen=True)
class LossStream:
    """A logged loss stream: the step of each point, its loss, whether its update was skipped;
    the file it came from and a description (file and series), and the run's settings and
    events when they were logged beside it; which points the run counted without a loss."""

    steps: list[int]
    losses: list[float]
    update_skipped: list[bool]
    path: Path
    source: str
    settings: RunSettings | None = None
    logged_events: list[dict[str, Any]] | None = None
    passed: list[bool] | None = None
    """Per point: counted without a loss (its loss is NaN); ``None``: no such point."""
    checkpoints: list[int] | None = None
    """The run's checkpoints (``checkpoints.csv``): after how many points each was written."""

    def check_from_the_start(self) -> None:
        """``ValueError`` for a surgeon run's ``losses.csv`` that does not start at step 0: the
        part of a run resumed into a new log directory, which alone cannot be replayed (a
        replay starts from step 0, with a fresh controller)."""
        first = self.steps[0]
        if self.settings is None or first == 0:
            return
        raise ValueError(
            f"{self.path} holds the losses from step {first} on: it is the part of a run "
            f"resumed at step {first} into a new log directory, and a replay needs the whole "
            "stream from step 0; replay the directory of the run's first part, or put that "
            f"losses.csv's rows of the steps before {first} at the top of this one (and its "
            f"checkpoints.csv rows up to {first} at the top of this one's)"
        )

    def replayed(self, settings: RunSettings) -> Replay:
        """This stream through a fresh controller with ``settings``: its update flags, logged
        steps, steps without a loss and checkpoints as recorded."""
        return replay(
            self.losses,
            settings,
            update_skipped=self.update_skipped,
            steps=self.steps,
            passed=self.passed,
            checkpoints=self.checkpoints or (),
            end_read=self.end_read,
        )

    @property
    def end_read(self) -> bool:
        """Whether the run's end read its last losses and decided on them, as a fit's end
        does: not when its ``stopped`` event says the fit raised with its end unread."""
        marks = (END_UNREAD_MARK, "were not read")  # (the second: older runs' words)
        return not any(
            r["kind"] == "stopped" and any(mark in r["reason"] for mark in marks)
            for r in self.logged_events or []
        )

    @property
    def stride(self) -> int:
        """The smallest gap between logged steps (1: every step was logged)."""
        gaps = [b - a for a, b in zip(self.steps, self.steps[1:], strict=False)]
        return min(gaps, default=1)


@dataclass(frozen=True)
class Replay:
    """What the controller decided on a stream: per point its step, loss, the LR scale of its
    step, the smoothed loss and phase after it; the events (at logged steps)."""

    steps: list[int]
    losses: list[float]
    lr_scales: list[float]
    smooth: list[float]
    phases: list[str]
    events: list[Event]


def feed(
    controller: Controller,
    losses: Sequence[float],
    update_skipped: Sequence[bool],
    *,
    readback_every: int = 4,
    snapshots: bool = True,
    passed: Sequence[bool] | None = None,
    checkpoints: Sequence[int] = (),
    end_read: bool = True,
) -> tuple[list[float], list[float], list[str]]:
    """Run ``controller`` over ``losses`` with the callback's timing (see the module doc);
    returns the LR scale of each step, and the smoothed loss and phase after each loss.
    ``passed``: the steps counted without a loss (``pass_step``, their loss ignored);
    ``checkpoints``: after how many steps the run wrote a checkpoint (each reads every loss
    in flight, decides on a last unconfirmed spike, and drops the snapshots); ``end_read``:
    the fit's end read its last losses and decided at the end of the fit (not one that
    raised: the losses it logged were read as the block after each closed, and nothing was
    decided at its end)."""
    n = len(losses)
    passed = passed or [False] * n
    scales: list[float] = []
    smooth = [math.nan] * n
    phases = [""] * n
    in_flight: list[range] = []
    read_until = 0  # the losses before it were read early, by a checkpoint
    at_checkpoint = set(checkpoints)
    no_snapshot_at = None  # the step a checkpoint starts at takes no snapshot

    def consume(block: range, now: int) -> None:
        controller.written_until = now  # the LRs before `now` are written
        for i in block:
            if passed[i]:
                controller.pass_step(applied=not update_skipped[i])
            else:
                controller.update(losses[i], update_skipped=update_skipped[i])
            if controller.rollback_to is not None:
                controller.rolled_back(now)
            smooth[i], phases[i] = controller.spike.mean, controller.phase.value

    def read_all(now: int, end_of_fit: bool = False) -> None:
        nonlocal read_until  # a checkpoint or the fit's end: every loss so far
        in_flight.append(range(max(now - now % readback_every, read_until), now))
        for block in in_flight:
            consume(block, now)
        in_flight.clear()
        read_until = now
        controller.before_checkpoint(end_of_fit=end_of_fit)  # no loss confirms the last one
        if controller.rollback_to is not None:
            controller.rolled_back(now)

    def checkpoint(now: int) -> None:  # read everything, then drop the snapshots
        nonlocal no_snapshot_at
        no_snapshot_at = now
        read_all(now)
        if snapshots:
            controller.checkpoint_dropped_snapshots(now)
        else:
            controller.snapshots_off()

    if not snapshots:
        controller.snapshots_off()
    if 0 in at_checkpoint:
        checkpoint(0)
    for step in range(n):  # on_train_batch_start, then on_train_batch_end of step `step`
        scales.append(controller.lr_scale(step))
        if snapshots and step != no_snapshot_at and controller.snapshot_due(step):
            controller.snapshot_taken(step, 0)
        if (step + 1) % readback_every == 0:  # a block closes; the one before it is read
            block = range(max(step + 1 - readback_every, read_until), step + 1)
            if block:
                in_flight.append(block)
            if len(in_flight) > 1:
                consume(in_flight.pop(0), step + 1)
        if step + 1 in at_checkpoint and (step + 1 < n or not end_read):
            checkpoint(step + 1)  # (at n: the fit's end reads them, unless the fit raised)
    if end_read:
        read_all(n, end_of_fit=True)  # on_train_end: the open block and those in flight
    else:  # a fit that raised: its losses on file were read as the next block closed
        for block in in_flight:
            consume(block, block.stop + readback_every)
    return scales, smooth, phases


def replay(
    losses: Sequence[float],
    settings: RunSettings,
    *,
    update_skipped: Sequence[bool] | None = None,
    steps: Sequence[int] | None = None,
    passed: Sequence[bool] | None = None,
    checkpoints: Sequence[int] = (),
    end_read: bool = True,
) -> Replay:
    """Feed ``losses`` through a fresh ``Controller`` as the callback would; ``update_skipped``
    defaults to "the loss is non-finite", ``steps`` (the logged step of each loss) to 0..n-1,
    ``passed`` (steps counted without a loss) to none, ``checkpoints`` (after how many losses
    the run wrote one) to none."""
    losses = [float(x) for x in losses]
    skipped = (
        [not math.isfinite(x) for x in losses] if update_skipped is None else list(update_skipped)
    )
    at = list(range(len(losses))) if steps is None else list(steps)
    if not len(skipped) == len(at) == len(losses):
        raise ValueError(
            "losses, update_skipped and steps must have one entry per step, got "
            f"{len(losses)}, {len(skipped)} and {len(at)}"
        )
    # as the callback's engine plans: losses arrive up to 2 blocks after their step's LR
    controller = Controller(settings.total_steps, settings.config, lag=2 * settings.readback_every)
    scales, smooth, phases = feed(
        controller,
        losses,
        skipped,
        readback_every=settings.readback_every,
        snapshots=settings.snapshots,
        passed=passed,
        checkpoints=checkpoints,
        end_read=end_read,
    )
    events = [replace(e, step=at[e.step]) if e.step < len(at) else e for e in controller.events]
    return Replay(at, losses, scales, smooth, phases, events)


# ------------------------------------------------------------------------------ reading


def read_stream(path: Path, metric: str | None = None) -> LossStream:
    """The loss stream at ``path``: a run directory, a ``losses.csv``, a ``metrics.csv`` or
    any ``step,loss`` CSV, or a TensorBoard event file (``metric``: the series to take)."""
    path = Path(path)
    if path.is_dir():
        runs = sorted(path.rglob(LOSSES_FILE), key=lambda p: p.stat().st_mtime)
        if runs and metric is None:
            path = runs[-1]
        else:
            from surgeon.plot import find_run_files

            path = find_run_files(path)[0]
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.name.startswith("events.out.tfevents."):
        steps, losses, source = _pick_series(path, _read_metrics(path), metric)
        skipped = None
        passed = None
    else:
        steps, losses, skipped, passed, source = _read_csv(path, metric)
    if not losses:
        raise ValueError(f"{source} holds no loss values")
    order = sorted(range(len(steps)), key=steps.__getitem__)
    if any(steps[a] == steps[b] for a, b in itertools.pairwise(order)):
        raise ValueError(f"{source} logs a step more than once; pass one value per step")
    settings, events, checkpoints = (
        _run_files(path) if path.name == LOSSES_FILE else (None, None, None)
    )
    flags = [not math.isfinite(x) for x in losses] if skipped is None else skipped
    return LossStream(
        steps=[steps[i] for i in order],
        losses=[losses[i] for i in order],
        update_skipped=[flags[i] for i in order],
        path=path,
        source=source,
        settings=settings,
        logged_events=events,
        passed=[passed[i] for i in order] if passed is not None and any(passed) else None,
        checkpoints=checkpoints,
    )


def _run_files(
    losses: Path,
) -> tuple[RunSettings | None, list[dict[str, Any]] | None, list[int] | None]:
    """The settings, events and checkpoints a surgeon run wrote beside its ``losses.csv`` (they
    describe that stream: a metrics file beside them may be logged every k steps, and is read
    alone)."""
    folder = losses.parent
    settings_path, events_path = folder / SETTINGS_FILE, folder / EVENTS_FILE
    settings = events = checkpoints = None
    if settings_path.exists():
        try:
            settings = RunSettings.from_json(json.loads(read_text(settings_path)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{settings_path}: {err}") from None
    if events_path.exists():
        events = read_events(events_path)
    checkpoints_path = folder / CHECKPOINTS_FILE
    if checkpoints_path.exists():
        rows = whole_lines(checkpoints_path)[1:]
        try:
            checkpoints = [int(row) for row in rows if row.strip()]
        except ValueError:
            raise ValueError(f"{checkpoints_path}: not one step count per row") from None
    return settings, events, checkpoints


def _read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    from surgeon.plot import read_metrics  # lazily: it brings Lightning in

    return read_metrics(path)


def _read_csv(
    path: Path, metric: str | None
) -> tuple[list[int], list[float], list[bool] | None, list[bool] | None, str]:
    """A ``step,loss[,update_skipped]`` CSV (with or without a header) or a metrics CSV: steps,
    losses, update flags, which steps were counted without a loss (an empty loss: NaN here),
    and a description. A run's own ``losses.csv`` (``settings.json`` beside it) is read up to
    its last whole line (see :func:`~surgeon.recorder.whole_lines`); a value that is not a
    number is an error naming its line."""
    own = path.name == LOSSES_FILE and (path.parent / SETTINGS_FILE).exists()  # a run's own
    lines = whole_lines(path) if own else read_text(path).splitlines()
    rows = [(number, row) for number, row in enumerate(csv.reader(lines), 1) if row]
    if not rows:
        raise ValueError(f"{path} is empty")

    def number(line: int, row: list[str], column: int) -> float:  # (column from 0)
        return parse_number(path, line, column + 1, row[column] if column < len(row) else None)

    def step_number(line: int, row: list[str], column: int) -> int:
        return parse_step(path, line, column + 1, row[column] if column < len(row) else None)

    header = [name.strip() for name in rows[0][1]]
    if len(header) == 2 and _is_number(header[0]) and metric is None:  # no header: step,loss
        return (
            [step_number(n, r, 0) for n, r in rows],
            [number(n, r, 1) for n, r in rows],
            None,
            None,
            str(path),
        )
    if "step" not in header:
        raise ValueError(f"{path} has no 'step' column (columns: {', '.join(header)})")
    body = rows[1:]
    if header[:2] == ["step", "loss"] and len(header) <= 3 and metric in (None, "loss"):
        flags = None
        if header[2:] == ["update_skipped"]:
            flags = [
                r[2].strip().lower() in ("1", "true", "1.0") if len(r) > 2 else False
                for _, r in body
            ]
        steps = [step_number(n, r, 0) for n, r in body]
        passed = [len(r) > 1 and not r[1].strip() for _, r in body]
        losses = [
            math.nan if gone else number(n, r, 1) for (n, r), gone in zip(body, passed, strict=True)
        ]
        return steps, losses, flags, passed, f"{path} (loss)"
    series: dict[str, list[tuple[int, float]]] = {}
    column = header.index("step")
    for n, row in body:
        for index, (key, value) in enumerate(zip(header, row, strict=False)):
            if key != "step" and value.strip():
                point = (step_number(n, row, column), number(n, row, index))
                series.setdefault(key, []).append(point)
    steps, losses, source = _pick_series(path, series, metric)
    return steps, losses, None, None, source


def _pick_series(
    path: Path, series: dict[str, list[tuple[int, float]]], metric: str | None
) -> tuple[list[int], list[float], str]:
    """The series ``metric``, else the first of :data:`LOSS_METRICS`, else the only
    training-loss-like one."""
    if metric is None:
        found = [name for name in LOSS_METRICS if name in series]
        if not found:
            found = [
                name
                for name in series
                if "loss" in name.lower() and not any(w in name.lower() for w in _NOT_TRAINING)
            ]
            if len(found) != 1:
                raise ValueError(
                    f"{path}: cannot tell which series is the training loss "
                    f"(candidates: {', '.join(found) or 'none'}; all: {', '.join(series)}); "
                    "name it with --metric"
                )
        metric = found[0]
    if metric not in series:
        raise ValueError(
            f"{path} has no series {metric!r} (it has: {', '.join(series) or 'none'}); "
            "pick one with --metric"
        )
    points = series[metric]
    return [s for s, _ in points], [v for _, v in points], f"{path} ({metric})"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
