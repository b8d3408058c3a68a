"""The files a run leaves in its log directory, for plots, replays and people.

* ``events.jsonl``: one JSON record per decision (:meth:`surgeon.controller.Event.to_dict`
  plus the first driven param group's LR before and after);
* ``settings.json``: what the decisions depend on: the planned length, the read-back block,
  where snapshots were kept (``"off"``: no rollbacks) and every
  :class:`~surgeon.config.SurgeonConfig` field, so ``surgeon replay`` can re-run them, and
  each driven param group's peak LR (``peak_lrs``, for the plot's LR lines); those the run
  started with: a run resumed into the same directory keeps them (a resume with other
  settings or another length re-plans with a ``replan`` event, where a replay stops
  comparing; one with another read-back block or snapshot mode, which no event marks,
  rewrites them, and replays close, not exactly);
* ``losses.csv``: ``step,loss,update_skipped``, every loss as the controller consumed it, in
  step order (a logger only keeps one row per ``log_every_n_steps``); a step counted without a
  loss (manual optimization whose ``training_step`` returned none) has an empty ``loss``;
* ``checkpoints.csv``: ``step``, one row per checkpoint the run wrote: how many steps' losses
  it had read (a checkpoint first reads every loss in flight and drops the snapshots, so
  ``surgeon replay`` does the same there to reproduce the run exactly);
* ``lr_find.csv`` (written by the callback when ``peak_lr="find"`` ran a range test): ``lr,loss``,
  each step of the test.

These names and the logged phase and event codes live here, with no torch or Lightning
import, so that ``surgeon plot`` and the command line read a run without them.

Written by rank zero only, into every directory the run logs to (each logger's, so a plot of
either finds them beside its metrics). Lines are appended as they come (the loss files are
buffered and flushed at checkpoints and at the end); a resumed run first rewrites the files of
each directory to what its checkpoint had seen, so a crash leaves no step twice.
"""

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from surgeon.config import SurgeonConfig
from surgeon.controller import Event, EventKind, Phase

EVENTS_FILE = "events.jsonl"
SETTINGS_FILE = "settings.json"
LOSSES_FILE = "losses.csv"
LR_FIND_FILE = "lr_find.csv"
CHECKPOINTS_FILE = "checkpoints.csv"
PHASE_CODES = {Phase.WARMUP: 0.0, Phase.STABLE: 1.0, Phase.DECAY: 2.0, Phase.DONE: 3.0}
"""Numeric phase logged as ``surgeon/phase`` (loggers take numbers)."""
EVENT_CODES = {kind: float(code) for code, kind in enumerate(EventKind)}
"""Numeric event kind (its place in :class:`~surgeon.controller.EventKind`), logged as
``surgeon/event`` and kept as ``surgeon/last_event`` in ``trainer.callback_metrics``."""
LOSSES_HEADER = "step,loss,update_skipped\n"
CHECKPOINTS_HEADER = "step\n"
LOSS_ROWS_PER_WRITE = 256
"""Loss rows are formatted and written this many at a time (and at every flush)."""


def read_text(path: Path) -> str:
    """A text file's content (UTF-8, a byte-order mark dropped); one that is not UTF-8 text is
    a ``ValueError`` naming it (a spreadsheet's UTF-16 export, a binary file)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
        ) from None


def parse_number(path: Path, line: int, column: int, text: str | None) -> float:
    """``text``, the value at ``line`` and (1-based) ``column`` of ``path``, as a float; one that
    is not a number (``None``: the row has no such column) is a ``ValueError`` naming where."""
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        field = "nothing" if text is None else repr(text)
        raise ValueError(
            f"{path}, line {line}: column {column} holds {field}, not a number"
        ) from None


def parse_step(path: Path, line: int, column: int, text: str | None) -> int:
    """As :func:`parse_number`, for a step: a whole number (``49.0`` too)."""
    value = parse_number(path, line, column, text)
    if not (math.isfinite(value) and value == int(value)):
        raise ValueError(
            f"{path}, line {line}: column {column} holds {text!r}, not a step (a whole number)"
        )
    return int(value)


def whole_lines(path: Path) -> list[str]:
    """The lines of a run file, each whole: the recorder writes whole lines, so a last line
    without its newline is one a crash, a full disk or a copy cut short, and is left out."""
    text = read_text(path)
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()
    return lines


def read_events(path: Path | None) -> list[dict[str, Any]]:
    """The JSON records of an ``events.jsonl`` (an empty list without the file), up to its last
    whole line; a line that is not a JSON record is an error naming it."""
    if path is None:
        return []
    events = []
    for number, line in enumerate(whole_lines(path), 1):
        if line.strip():
            try:
                events.append(json.loads(line))
            except ValueError as err:
                raise ValueError(
                    f"{path}, line {number}: not a JSON event record ({err})"
                ) from None
    return events


def event_record(event: Event, lr_before: float, lr_after: float) -> dict[str, Any]:
    """``event`` as the JSON record of ``events.jsonl``."""
    return {**event.to_dict(), "lr_before": lr_before, "lr_after": lr_after}


def run_settings(
    config: SurgeonConfig, total_steps: int, readback_every: int, snapshot: str
) -> dict[str, Any]:
    """What the decisions depend on (``settings.json``; the loggers' hyperparameters)."""
    return {
        "total_steps": total_steps,
        "readback_every": readback_every,
        "snapshot": snapshot,
        "config": asdict(config),
    }


class RunRecorder:
    """Writes ``events.jsonl``, ``settings.json``, ``losses.csv`` and ``checkpoints.csv`` into
    each of its directories (the same lines in each)."""

    def __init__(self, *directories: Path) -> None:
        self.directories = [Path(d) for d in directories]
        self._losses: list[IO[str]] = []
        self._pending: list[tuple[int, float | None, bool]] = []

    def start(
        self,
        *,
        config: SurgeonConfig,
        total_steps: int,
        readback_every: int,
        snapshot: str,
        events: list[dict[str, Any]],
        next_loss_step: int,
        peak_lrs: list[float] | None = None,
    ) -> None:
        """Open the run: the settings, the events so far (none when fresh, the restored ones on
        a resume) and the losses of steps before ``next_loss_step`` (and the checkpoints up to
        it) kept from an earlier run in each directory (a resume; a fresh run keeps none).
        ``peak_lrs``: each driven param group's peak LR, in ``settings.json`` for the plot (one
        LR line per distinct peak)."""
        self.close()
        settings = run_settings(config, total_steps, readback_every, snapshot)
        if peak_lrs:
            settings["peak_lrs"] = list(peak_lrs)
        text = json.dumps(settings, indent=2) + "\n"
        lines = "".join(json.dumps(e) + "\n" for e in events)
        for directory in self.directories:
            directory.mkdir(parents=True, exist_ok=True)
            settings_path = directory / SETTINGS_FILE
            if not self._keeps_settings(settings_path, next_loss_step, settings):
                settings_path.write_text(text)
            (directory / EVENTS_FILE).write_text(lines)
            losses_path, checkpoints_path = directory / LOSSES_FILE, directory / CHECKPOINTS_FILE
            kept = self._kept_rows(losses_path, next_loss_step, through=False)
            checkpoints = self._kept_rows(checkpoints_path, next_loss_step, through=True)
            losses = losses_path.open("w")
            losses.write(LOSSES_HEADER + "".join(kept))
            self._losses.append(losses)
            checkpoints_path.write_text(CHECKPOINTS_HEADER + "".join(checkpoints))

    @staticmethod
    def _kept_rows(path: Path, next_loss_step: int, *, through: bool) -> list[str]:
        """The rows of a run file (header left out, each starting with its step) that a run
        resumed at ``next_loss_step`` keeps: of the steps before it (``through``: up to it, a
        checkpoint's own); a fresh run keeps none."""
        if next_loss_step <= 0 or not path.exists():
            return []
        last = next_loss_step if through else next_loss_step - 1
        rows = whole_lines(path)[1:]
        return [row + "\n" for row in rows if row.strip() and int(row.split(",", 1)[0]) <= last]

    @staticmethod
    def _keeps_settings(path: Path, next_loss_step: int, settings: dict[str, Any]) -> bool:
        """A resume keeps the settings its run started with (a replay of the stream follows
        them up to the resume's ``replan``), unless the read-back block or the snapshot mode
        changed: no event marks those, so the file says what the run goes on with."""
        if next_loss_step <= 0 or not path.exists():
            return False
        try:
            kept = json.loads(read_text(path))
        except ValueError:
            return False
        return all(kept.get(key) == settings[key] for key in ("readback_every", "snapshot"))

    def checkpoint(self, step: int) -> None:
        """Append a checkpoint written after the losses of ``step`` steps were read."""
        for directory in self.directories:
            with (directory / CHECKPOINTS_FILE).open("a") as f:
                f.write(f"{step}\n")

    def event(self, record: dict[str, Any]) -> None:
        """Append one event record."""
        line = json.dumps(record) + "\n"
        for directory in self.directories:
            with (directory / EVENTS_FILE).open("a") as f:
                f.write(line)

    def losses(self, rows: list[tuple[int, float | None, bool]]) -> None:
        """Append the losses the controller consumed, ``(step, loss, update_skipped)`` each
        (kept, then formatted and written :data:`LOSS_ROWS_PER_WRITE` at a time)."""
        pending = self._pending
        pending += rows
        if len(pending) >= LOSS_ROWS_PER_WRITE:
            self._write_losses()

    def _write_losses(self) -> None:
        if not self._pending:
            return
        text = "".join(
            [
                f"{step},{'' if loss is None else repr(loss)},{int(skipped)}\n"
                for step, loss, skipped in self._pending
            ]
        )
        self._pending = []
        for losses in self._losses:
            losses.write(text)

    def flush(self) -> None:
        """Push the loss rows so far to disk (at checkpoints, at the end)."""
        self._write_losses()
        for losses in self._losses:
            losses.flush()

    def close(self) -> None:
        """Write what is kept, and close the loss files."""
        self._write_losses()
        for losses in self._losses:
            losses.close()
        self._losses = []
