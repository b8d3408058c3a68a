"""Plot a run: loss and LR on one step axis, phases shaded, the surgeon's events marked.

Reads what a run leaves in its log directory: Lightning ``CSVLogger``'s ``metrics.csv`` or, with
``tensorboard`` installed, ``TensorBoardLogger``'s event file, and the files the callback writes
beside it (:mod:`surgeon.recorder`): ``events.jsonl`` (required: it is what makes a run a
surgeon run), and when present ``losses.csv`` (every step's loss), ``settings.json`` (the
planned length) and ``lr_find.csv`` (the range test of ``peak_lr="find"``, drawn in a third
panel).

What is drawn, and from where (each a function of :class:`Run` tested on its own):

* **phases** (:func:`phase_spans`): from the events, each of which records the phase the run is
  in after its step (``phase``), so a boundary is exact to the step; runs written before events
  had it fall back to the logged ``surgeon/phase`` rows (exact to ``log_every_n_steps``);
* **loss** (:func:`loss_source`): ``losses.csv``, else the logged ``surgeon/loss``, else the run's
  own logged training loss; its **smoothed** curve (:func:`smooth`) is a centred moving average
  of the log loss over ``SMOOTH_FRACTION`` of the run (no lag, unlike the spike detector's EMA);
  the run's own logged validation and training losses are overlaid (:func:`own_losses`);
* **LR** (:func:`lr_lines`): one line per distinct LR curve (param groups with identical LRs
  share one), labelled by group; ``log_lr`` puts it on a log axis;
* **events**: one dashed line per event in its kind's colour (:data:`EVENT_COLORS`; kinds this
  version does not know get a neutral dotted style); events at one step interleave their dashes
  (:func:`event_dashes`) so none hides another; the legend counts each kind.

:func:`plot_replay` draws a ``surgeon replay`` the same way (its loss, smoothed alike, the
replayed LR scale, its phases and events).

Only the standard library is imported at module level: matplotlib (the ``plot`` extra) is
imported by :func:`plot_run`, so a missing or foreign run directory is reported at once.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgeon.lr_find import smooth_log
from surgeon.recorder import (
    EVENTS_FILE,
    LOSSES_FILE,
    LR_FIND_FILE,
    PHASE_CODES,
    SETTINGS_FILE,
    parse_number,
    parse_step,
    read_events,
    read_text,
    whole_lines,
)

__all__ = [
    "EVENT_COLORS",
    "PHASE_COLORS",
    "Run",
    "RunError",
    "event_dashes",
    "event_style",
    "find_run_files",
    "load_run",
    "loss_source",
    "lr_lines",
    "own_losses",
    "phase_spans",
    "plot_replay",
    "plot_run",
    "read_metrics",
    "smooth",
]

PHASE_COLORS = {
    "warmup": "#fde2b3",
    "stable": "#d9f2d0",
    "decay": "#d7e8f7",
    "done": "#e6e6e6",
}
"""Background of each phase (light, so that lines stay readable over it)."""
EVENT_COLORS = {
    "peak_lr": "#ff7f0e",
    "warmup_end": "#2ca02c",
    "decay_start": "#1f77b4",
    "done": "#7f7f7f",
    "plateau": "#9467bd",
    "restart": "#e377c2",
    "replan": "#17becf",
    "spike": "#d62728",
    "outlier": "#ff9896",
    "nonfinite": "#000000",
    "recovered": "#bcbd22",
    "skipped_step": "#8c564b",
    "rollback": "#393b79",
    "cooldown": "#e6550d",
    "stopped": "#843c39",
    "buffers_restored": "#637939",
    "stalled": "#e7298a",
    "ramp_pause": "#fdae6b",
    "ramp_resume": "#74c476",
    "climb": "#a50f15",
}
"""A colour per event kind, all distinct (matplotlib's tab10 and nine more)."""
UNKNOWN_EVENT_COLOR = "#555555"
"""Kinds written by a later version: a neutral grey, dotted."""
SMOOTH_FRACTION = 0.02
"""The smoothed loss averages over this share of the run's points (at least 5)."""
MAX_LR_LABELS = 6
"""More distinct LR curves than this share one legend entry."""
_DASH = 4.0
_UNKNOWN_DASHES = (0.0, (1.0, 2.0))
_OWN_LOSS_COLORS = ["#e76f51", "#6a4c93", "#2a9d8f", "#8d99ae"]
_PHASE_NAMES = {code: phase.value for phase, code in PHASE_CODES.items()}

Points = list[tuple[int, float]]


class RunError(ValueError):
    """A directory that holds no run ``surgeon plot`` can draw; the message says what to do."""


@dataclass
class Run:
    """Everything read from one run's log directory."""

    directory: Path
    """The directory of the metrics file and the surgeon's files."""
    metrics_path: Path
    series: dict[str, Points]
    """Every numeric series the logger recorded, as ``(step, value)`` pairs."""
    events: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    losses: Points | None = None
    """``losses.csv``: every step's loss (non-finite ones included), if the run wrote it."""
    lr_find: list[tuple[float, float]] = field(default_factory=list)
    lr_note: str | None = None
    """Why the LR panel has no line, written in it (a surgeon-only run that cannot be replayed)."""

    @property
    def last_step(self) -> int:
        """The last step anything was recorded at."""
        steps = [points[-1][0] for points in self.series.values() if points]
        steps += [event["step"] + 1 for event in self.events]
        if self.losses:
            steps.append(self.losses[-1][0])
        return max(steps, default=0)

    @property
    def planned_steps(self) -> int | None:
        """The planned length: the last one an event moved it to (a ``cooldown``, a ``replan``),
        else ``settings.json``'s (``None`` without either)."""
        moved = [e["total_steps"] for e in self.events if isinstance(e.get("total_steps"), int)]
        total = moved[-1] if moved else self.settings.get("total_steps")
        return total if isinstance(total, int) else None


# ------------------------------------------------------------------------------ reading


def find_run_files(run_dir: Path) -> tuple[Path, Path | None]:
    """The newest metrics file under ``run_dir`` (``metrics.csv``, or a TensorBoard
    ``events.out.tfevents.*``) with the surgeon's ``events.jsonl`` beside it, else the newest
    of any (a ``trainer.test`` after the fit logs a newer version without one), and that
    ``events.jsonl`` (if any)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a directory: pass the log directory of a run")
    candidates = [*run_dir.rglob("metrics.csv"), *run_dir.rglob("events.out.tfevents.*")]
    if not candidates:
        raise RunError(
            f"no metrics.csv, TensorBoard event file or surgeon run files (losses.csv, "
            f"events.jsonl, settings.json) under {run_dir} (log the run with CSVLogger or "
            "TensorBoardLogger, or give the surgeon a log_dir=)"
        )
    surgeons = [c for c in candidates if (c.parent / EVENTS_FILE).exists()]
    metrics = max(surgeons or candidates, key=lambda p: p.stat().st_mtime)
    events = metrics.parent / EVENTS_FILE
    return metrics, events if events.exists() else None


def read_metrics(path: Path) -> dict[str, Points]:
    """Every numeric series of a metrics file as ``(step, value)`` pairs."""
    if Path(path).name.startswith("events.out.tfevents."):
        return _read_tensorboard(Path(path))
    series: dict[str, Points] = {}
    reader = csv.DictReader(read_text(Path(path)).splitlines())
    columns = {name: index for index, name in enumerate(reader.fieldnames or [], 1)}
    if "step" not in columns:
        raise ValueError(f"{path} has no 'step' column (columns: {', '.join(columns)})")
    for row in reader:
        line = reader.line_num
        step = parse_step(path, line, columns["step"], row["step"])
        for key, value in row.items():
            if key != "step" and value not in ("", None):
                point = (step, parse_number(path, line, columns.get(key, 0), value))
                series.setdefault(key, []).append(point)
    return series


def _read_tensorboard(path: Path) -> dict[str, Points]:
    """The scalars of one TensorBoard event file (needs the ``tensorboard`` package)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:
        raise RunError(
            f"{path} is a TensorBoard event file; reading it needs: pip install tensorboard"
        ) from err
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def read_lr_find(path: Path) -> list[tuple[float, float]]:
    """The ``(lr, loss)`` rows of an ``lr_find.csv``, non-finite losses dropped."""
    reader = csv.DictReader(read_text(path).splitlines())
    if not {"lr", "loss"} <= set(reader.fieldnames or []):
        raise ValueError(f"{path} has no 'lr' and 'loss' columns")
    rows = [
        (
            parse_number(path, reader.line_num, 1, row["lr"]),
            parse_number(path, reader.line_num, 2, row["loss"]),
        )
        for row in reader
    ]
    return [(lr, loss) for lr, loss in rows if math.isfinite(lr) and math.isfinite(loss)]


def read_losses(path: Path) -> Points:
    """The ``(step, loss)`` rows of a ``losses.csv``, in step order (a step counted without a
    loss, an empty one, is left out)."""
    points = []
    reader = csv.DictReader(whole_lines(path))
    if not {"step", "loss"} <= set(reader.fieldnames or []):
        raise ValueError(f"{path} has no 'step' and 'loss' columns")
    for row in reader:
        if row["loss"]:
            line = reader.line_num
            points.append(
                (parse_step(path, line, 1, row["step"]), parse_number(path, line, 2, row["loss"]))
            )
    return sorted(points)


def load_run(run_dir: Path) -> Run:
    """Read the newest run under ``run_dir`` the plot can draw: a logger's metrics file with the
    surgeon's files beside it, or the surgeon's files alone (:func:`_load_surgeon_files`);
    :class:`RunError` when there is none."""
    run_dir = Path(run_dir)
    own = _surgeon_only_runs(run_dir) if run_dir.is_dir() else []
    try:
        metrics_path, events_path = find_run_files(run_dir)
    except RunError:
        if not own:
            raise
        return _load_surgeon_files(own[0])
    directory = metrics_path.parent
    if own and (events_path is None or own[0].stat().st_mtime > metrics_path.stat().st_mtime):
        return _load_surgeon_files(own[0])
    if events_path is None:
        raise RunError(
            f"{directory} holds a run logged without ScheduleSurgeon (no {EVENTS_FILE} beside "
            f"{metrics_path.name}): train with Trainer(callbacks=[ScheduleSurgeon()]) and plot "
            "that run's log directory"
        )
    settings_path, losses_path = directory / SETTINGS_FILE, directory / LOSSES_FILE
    lr_find_path = directory / LR_FIND_FILE
    settings = _reading(settings_path, lambda p: json.loads(read_text(p)), {})
    if not isinstance(settings, dict):
        raise RunError(
            f"{settings_path}: not the surgeon's settings ({type(settings).__name__}): "
            "settings.json is written by it"
        )
    return Run(
        directory=directory,
        metrics_path=metrics_path,
        series=_reading(metrics_path, read_metrics, {}),
        events=_reading(events_path, read_events, []),
        settings=settings,
        losses=_reading(losses_path, read_losses, None),
        lr_find=_reading(lr_find_path, read_lr_find, []),
    )


def _reading(path: Path, read: Callable[[Path], Any], missing: Any) -> Any:
    """``read(path)`` (``missing`` when there is no such file); a file that cannot be read as
    one of its kind (not UTF-8, a value that does not parse) is a :class:`RunError` naming it."""
    if not path.exists():
        return missing
    try:
        return read(path)
    except ValueError as err:  # (UnicodeDecodeError and json's errors are ValueErrors too)
        message = str(err)
        raise RunError(message if str(path) in message else f"{path}: {message}") from None


def _surgeon_only_runs(run_dir: Path) -> list[Path]:
    """The ``losses.csv`` of runs under ``run_dir`` that only the surgeon logged (its three
    files, no logger's metrics beside them), newest first."""
    found = [
        losses
        for losses in run_dir.rglob(LOSSES_FILE)
        if (losses.parent / EVENTS_FILE).exists()
        and (losses.parent / SETTINGS_FILE).exists()
        and not (losses.parent / "metrics.csv").exists()
        and not any(losses.parent.glob("events.out.tfevents.*"))
    ]
    return sorted(found, key=lambda p: -p.stat().st_mtime)


def _load_surgeon_files(losses_path: Path) -> Run:
    """A run only the surgeon logged (a plain loop's ``log_dir``, a fit without a logger):
    ``losses.csv``, ``events.jsonl`` and ``settings.json``. Its LR is replayed from the losses
    with the run's settings (``surgeon replay`` reproduces a run's own events), in LRs where an
    event gives the peak, else as the scale of the peak; up to the first decision the losses
    did not make (a cooldown, a replan, a stop), which a replay cannot follow."""
    from surgeon.replay import before_outside_decision, read_stream

    directory = losses_path.parent
    try:
        stream = read_stream(losses_path)
        if stream.settings is None:
            raise ValueError(f"{directory / SETTINGS_FILE} could not be read")
        settings = json.loads(read_text(directory / SETTINGS_FILE))
    except ValueError as err:
        raise RunError(f"{directory}: the surgeon's files cannot be replayed: {err}") from None
    events = read_events(directory / EVENTS_FILE)
    lr_find_path = directory / LR_FIND_FILE
    run = Run(
        directory=directory,
        metrics_path=losses_path,
        series={},
        events=events,
        settings=settings,
        losses=sorted(
            (step, loss)
            for step, loss, gone in zip(
                stream.steps, stream.losses, stream.passed or itertools.repeat(False), strict=False
            )
            if not gone  # a step counted without a loss
        ),
        lr_find=read_lr_find(lr_find_path) if lr_find_path.exists() else [],
    )
    try:
        stream.check_from_the_start()  # a resumed run's part: a replay starts at step 0
    except ValueError:
        run.lr_note = (
            f"LR not drawn: the losses start at step {stream.steps[0]} (a run resumed into this "
            "directory), and replaying them from a fresh controller would draw an LR the run "
            "never had; the events are the run's own"
        )
        return run
    try:
        replayed = stream.replayed(stream.settings)
    except ValueError as err:
        raise RunError(f"{directory}: the surgeon's files cannot be replayed: {err}") from None
    _, first = before_outside_decision(events)
    until = (
        ""
        if first is None
        else f" (to step {first['step']}: a {first['kind']} is not in the losses)"
    )
    for name, peak in _replayed_lines(settings, events):
        run.series[name + until] = [
            (step, peak * scale)
            for step, scale in zip(replayed.steps, replayed.lr_scales, strict=True)
            if first is None or step <= first["step"]
        ]
    return run


def _replayed_lines(
    settings: dict[str, Any], events: list[dict[str, Any]]
) -> list[tuple[str, float]]:
    """``(series name, peak LR)`` per replayed LR line: one per distinct param group peak in
    ``settings.json`` (the groups named by index when the peaks differ), else the peak an
    event gives, else the scale of the peak."""
    peaks = settings.get("peak_lrs") or []
    distinct = sorted(set(peaks), reverse=True)
    if len(distinct) > 1:
        return [
            (
                f"lr-replayed group {','.join(str(i) for i, p in enumerate(peaks) if p == peak)}",
                peak,
            )
            for peak in distinct
        ]
    if distinct:
        return [("lr-replayed", distinct[0])]
    from_events = [
        e["lr_after"] / e["scale_after"] for e in events if e.get("scale_after") and "lr_after" in e
    ]
    if from_events:
        return [("lr-replayed", from_events[0])]
    return [("lr-replayed scale of the peak", 1.0)]


# ------------------------------------------------------------------------------ what is drawn


def phase_spans(run: Run) -> list[tuple[str, int, int]]:
    """``(phase, start, end)`` spans, half-open, covering ``[0, last step)``.

    An event at step ``s`` records the phase after that step's decisions, which holds from
    ``s + 1``. Without ``phase`` in the events (files of older versions), the logged
    ``surgeon/phase`` rows stand in for them (exact only to the logging interval)."""
    if any(event.get("phase") for event in run.events):
        changes = [(e["step"] + 1, e["phase"]) for e in run.events if e.get("phase")]
    else:
        changes = [
            (step + 1, _PHASE_NAMES.get(round(code), "?"))
            for step, code in run.series.get("surgeon/phase", [])
        ]
    end = max(run.last_step, 1)
    bounds = [(0, "warmup")]
    for step, phase in sorted(changes, key=lambda change: change[0]):
        if phase != bounds[-1][1]:
            bounds.append((min(step, end), phase))
    spans: list[tuple[str, int, int]] = []
    for (start, name), (stop, _) in zip(bounds, [*bounds[1:], (end, "")], strict=True):
        if stop <= start:
            continue
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], stop)
        else:
            spans.append((name, start, stop))
    return spans


def loss_source(run: Run) -> tuple[str, Points]:
    """The training loss to draw, and its name: ``losses.csv`` (every step), else the logged
    ``surgeon/loss``, else the run's own logged training loss (non-finite values dropped)."""
    own_train = [key for key in own_losses(run.series) if not _is_validation(key)]
    candidates = [
        (LOSSES_FILE, run.losses or []),
        ("surgeon/loss", run.series.get("surgeon/loss", [])),
        *((key, run.series[key]) for key in own_train),
    ]
    for name, points in candidates:
        finite = [(step, value) for step, value in points if math.isfinite(value)]
        if finite:
            return name, finite
    return "", []


def smooth(points: Points, fraction: float = SMOOTH_FRACTION) -> Points:
    """A centred moving average over ``fraction`` of the points (at least 5, odd), shrunk
    symmetrically at both ends so that it never lags; of the log values when all are positive
    (losses on a log axis), else of the values."""
    if not points:
        return []
    values = [value for _, value in points]
    log = all(value > 0 for value in values)
    if log:
        values = [math.log(value) for value in values]
    half = max(2, round(fraction * len(values) / 2))
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + value)
    smoothed = []
    for i, (step, _) in enumerate(points):
        width = min(half, i, len(values) - 1 - i)
        mean = (prefix[i + width + 1] - prefix[i - width]) / (2 * width + 1)
        smoothed.append((step, math.exp(mean) if log else mean))
    return smoothed


def _is_validation(key: str) -> bool:
    return key.lower().startswith(("val", "valid"))


def own_losses(series: dict[str, Points]) -> list[str]:
    """The run's own logged loss series: keys holding ``loss`` that start with ``val``/``valid``
    or ``train`` (or are ``loss``), not the surgeon's, and an ``_epoch`` mean only without its
    ``_step`` twin."""
    keys = []
    for key in sorted(series):
        lower = key.lower()
        if key.startswith("surgeon/") or "loss" not in lower:
            continue
        if not (_is_validation(key) or lower.startswith("train") or lower == "loss"):
            continue
        if lower.endswith("_epoch") and key[: -len("_epoch")] + "_step" in series:
            continue
        keys.append(key)
    return keys


def lr_lines(series: dict[str, Points]) -> list[tuple[str, Points]]:
    """One ``(label, points)`` per distinct logged LR curve, highest first: param groups with
    identical LRs share a line labelled with all their names (``lr-`` dropped)."""
    by_curve: dict[tuple[tuple[int, float], ...], list[str]] = defaultdict(list)
    for key in sorted(series):
        if key.startswith("lr-") and series[key]:
            by_curve[tuple(series[key])].append(key[len("lr-") :])
    lines = [(", ".join(names), list(curve)) for curve, names in by_curve.items()]
    return sorted(lines, key=lambda line: -max(value for _, value in line[1]))


def event_style(kind: str) -> tuple[str, bool]:
    """``(colour, known)`` for an event kind; unknown kinds get :data:`UNKNOWN_EVENT_COLOR`."""
    color = EVENT_COLORS.get(kind)
    return (color, True) if color is not None else (UNKNOWN_EVENT_COLOR, False)


def event_dashes(events: list[dict[str, Any]]) -> list[tuple[float, tuple[float, float]]]:
    """A dash pattern ``(offset, (on, off))`` per event: the ``m`` events at one step take turns
    along the line (dash ``k`` of each period is event ``k``'s), so every colour shows."""
    at_step = Counter(event["step"] for event in events)
    seen: Counter[int] = Counter()
    dashes = []
    for event in events:
        count, k = at_step[event["step"]], seen[event["step"]]
        seen[event["step"]] += 1
        off = _DASH if count == 1 else _DASH * (count - 1)
        dashes.append((_DASH * k, (_DASH, off)))
    return dashes


# ------------------------------------------------------------------------------ drawing


def plot_run(run_dir: Path, out: Path | None = None, *, log_lr: bool = False) -> Path:
    """Write a PNG of the run in ``run_dir`` (default: ``surgeon.png`` beside its metrics);
    ``log_lr``: the LR on a log axis (for LRs that span decades, e.g. param groups 100x apart)."""
    return draw(load_run(run_dir), out, log_lr=log_lr)


def draw(run: Run, out: Path | None = None, *, log_lr: bool = False) -> Path:
    """Write the PNG of a loaded :class:`Run` (see :func:`plot_run`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out) if out is not None else run.directory / "surgeon.png"
    if run.lr_find:
        fig = plt.figure(figsize=(11, 9.5))
        grid = fig.add_gridspec(3, 1, height_ratios=[3, 3, 2])
        ax_loss = fig.add_subplot(grid[0])
        ax_lr = fig.add_subplot(grid[1], sharex=ax_loss)
        _draw_lr_find(fig.add_subplot(grid[2]), run.lr_find, run.events)
    else:
        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)

    spans = phase_spans(run)
    for ax in (ax_loss, ax_lr):
        for name, start, end in spans:
            ax.axvspan(start, end, color=PHASE_COLORS.get(name, "#eeeeee"), lw=0, zorder=0)
    _draw_losses(ax_loss, run)
    _draw_lrs(ax_lr, run, log_lr)
    planned = run.planned_steps
    if planned is not None and planned != run.last_step:
        for ax in (ax_loss, ax_lr):
            ax.axvline(planned, color="#999999", ls=":", lw=1.0)
        ax_lr.annotate(
            "planned end",
            (planned, 0.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="bottom",
            ha="right",
            fontsize=8,
            color="#777777",
        )
    _draw_events(ax_loss, ax_lr, run.events)

    phase_handles = [
        plt.Rectangle((0, 0), 1, 1, color=color, label=f"phase: {name}")
        for name, color in PHASE_COLORS.items()
        if any(span[0] == name for span in spans)
    ]
    outside: dict[str, Any] = {"loc": "upper left", "bbox_to_anchor": (1.005, 1.0), "fontsize": 8}
    ax_loss.legend(**outside)
    handles, _ = ax_lr.get_legend_handles_labels()
    ax_lr.legend(handles=handles + phase_handles, **outside)
    fig.suptitle(f"ScheduleSurgeon: {len(run.events)} events — {run.directory}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _draw_losses(ax: Any, run: Run) -> None:
    """The training loss, its smoothed curve and the run's own logged losses."""
    name, points = loss_source(run)
    if points:
        ax.plot(*zip(*points, strict=True), lw=0.7, alpha=0.45, color="#1f77b4", label=name)
        smoothed = smooth(points)
        ax.plot(*zip(*smoothed, strict=True), lw=1.6, color="#0b3d91", label=f"{name}, smoothed")
    colors = iter(_OWN_LOSS_COLORS * 4)
    for key in own_losses(run.series):
        if key == name:
            continue
        finite = [(s, v) for s, v in run.series[key] if math.isfinite(v)]
        if finite:
            style = {"marker": "o", "ms": 3} if _is_validation(key) else {"lw": 0.8}
            ax.plot(*zip(*finite, strict=True), label=key, color=next(colors), **style)
    values = [v for line in ax.get_lines() for v in line.get_ydata()]
    if values and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_ylabel("loss")


def _draw_lrs(ax: Any, run: Run, log_lr: bool) -> None:
    """One line per distinct LR curve; one shared legend entry past ``MAX_LR_LABELS``."""
    import matplotlib.pyplot as plt

    lines = lr_lines(run.series)
    colors = plt.get_cmap("viridis")
    for i, (name, points) in enumerate(lines):
        color = colors(i / max(1, len(lines) - 1) * 0.85) if len(lines) > 1 else "#333333"
        label: str | None = name
        if len(lines) > MAX_LR_LABELS:
            label = f"{len(lines)} LR curves (param groups)" if i == 0 else None
        ax.plot(*zip(*points, strict=True), color=color, lw=1.3, label=label)
    if not lines and run.lr_note:
        ax.text(
            0.5,
            0.5,
            run.lr_note,
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=8,
            color="#777777",
            wrap=True,
        )
    if log_lr and lines:
        ax.set_yscale("log")
    ax.set_ylabel("learning rate" + (" (log)" if log_lr else ""))
    ax.set_xlabel("optimizer step")


def _draw_events(ax_loss: Any, ax_lr: Any, events: list[dict[str, Any]]) -> None:
    """A vertical line per event on both panels, its kind written on the loss panel."""
    from matplotlib.lines import Line2D

    counts = Counter(event["kind"] for event in events)
    at_step: Counter[int] = Counter()  # labels already written at a step: side by side
    for event, dashes in zip(events, event_dashes(events), strict=True):
        kind = event["kind"]
        color, known = event_style(kind)
        for ax in (ax_loss, ax_lr):
            ax.axvline(event["step"], color=color, ls=dashes if known else _UNKNOWN_DASHES, lw=1.2)
        ax_loss.annotate(
            kind,
            (event["step"], 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-10 * at_step[event["step"]], 0),
            textcoords="offset points",
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
            color=color,
        )
        at_step[event["step"]] += 1
    for kind, count in counts.items():  # a legend entry per kind, in order of appearance
        color, known = event_style(kind)
        style = "--" if known else _UNKNOWN_DASHES
        ax_lr.add_line(Line2D([], [], color=color, ls=style, lw=1.2, label=f"{kind} ({count})"))


def _draw_lr_find(ax: Any, curve: list[tuple[float, float]], events: list[dict[str, Any]]) -> None:
    """The range test: each step's loss against its LR (log axis), the smoothed curve that
    :func:`surgeon.lr_find.suggest_lr` reads, and the chosen peak."""
    lrs, losses = zip(*curve, strict=True)
    ax.plot(lrs, losses, color="#264653", lw=0.7, alpha=0.5, label="LR range test")
    if all(loss > 0 for loss in losses):
        smoothed = [math.exp(value) for value in smooth_log(losses)]
        ax.plot(lrs, smoothed, color="#264653", lw=1.6, label="smoothed")
        ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (range test)")
    ax.set_ylabel("loss")
    for event in events:
        scale = event.get("scale_after") or 0.0
        if event["kind"] == "peak_lr" and "lr_after" in event and scale > 0:
            peak = event["lr_after"] / scale  # lr_after is the peak x the next step's scale
            ax.axvline(peak, color=EVENT_COLORS["peak_lr"], ls="--", label=f"peak LR {peak:.3g}")
    ax.legend(loc="upper left", fontsize=8)


def plot_replay(result: Any, out: Path, title: str) -> Path:
    """Write a PNG of a :class:`surgeon.replay.Replay`: the loss stream and its smoothed value,
    the replayed LR scale, phases shaded and events marked, as :func:`plot_run` draws a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    steps = result.steps
    spans: list[tuple[str, int, int]] = []
    for step, phase in zip(steps, result.phases, strict=True):
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], step)
        else:
            spans.append((phase, spans[-1][2] if spans else step, step))
    for ax in (ax_loss, ax_lr):
        for name, start, end in spans:
            ax.axvspan(start, end, color=PHASE_COLORS.get(name, "#eeeeee"), lw=0, zorder=0)
    pairs = zip(steps, result.losses, strict=True)
    points = [(s, v) for s, v in pairs if math.isfinite(v)]
    if points:
        ax_loss.plot(*zip(*points, strict=True), lw=0.7, alpha=0.45, color="#1f77b4", label="loss")
        smoothed = smooth(points)
        ax_loss.plot(*zip(*smoothed, strict=True), lw=1.6, color="#0b3d91", label="loss, smoothed")
    ax_loss.set_ylabel("training loss")
    if points and all(v > 0 for _, v in points):  # (a loss may be negative: an NLL, an ELBO)
        ax_loss.set_yscale("log")
    ax_lr.plot(steps, result.lr_scales, color="#264653", label="replayed LR scale")
    ax_lr.set_ylabel("LR scale (x each group's peak LR)")
    ax_lr.set_xlabel("optimizer step")
    _draw_events(ax_loss, ax_lr, [event.to_dict() for event in result.events])
    phase_handles = [
        plt.Rectangle((0, 0), 1, 1, color=PHASE_COLORS.get(n, "#eeeeee"), label=f"phase: {n}")
        for n in dict.fromkeys(span[0] for span in spans)
    ]
    outside = {"loc": "upper left", "bbox_to_anchor": (1.005, 1.0), "fontsize": 8}
    ax_loss.legend(**outside)
    handles, _ = ax_lr.get_legend_handles_labels()
    ax_lr.legend(handles=handles + phase_handles, **outside)
    fig.suptitle(f"surgeon replay: {len(result.events)} events — {title}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
