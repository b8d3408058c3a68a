"""Plot a run: loss and LR on one step axis, phases shaded, the surgeon's events marked.

Reads what a run leaves in its log directory: Lightning ``CSVLogger``'s
``metrics.csv`` or, with ``tensorboard`` installed, ``TensorBoardLogger``'s event
file (series ``surgeon/loss``, ``surgeon/loss_smooth``, ``surgeon/phase``, ``lr-*``)
and the callback's ``events.jsonl``; when the run began with an LR range test
(``peak_lr="find"``), its ``lr_find.csv`` curve goes in a small third panel. Needs
the ``plot`` extra (matplotlib).
"""

import csv
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from surgeon.callback import EVENTS_FILE, LR_FIND_FILE, PHASE_CODES

_PHASE_COLORS = {"warmup": "#fde2b3", "decay": "#d7e8f7", "done": "#e6e6e6"}
_EVENT_COLORS = {
    "warmup_end": "#2a9d8f",
    "plateau": "#8d5bd6",
    "restart": "#b5179e",
    "spike": "#e63946",
    "nonfinite": "#000000",
    "recovered": "#43aa8b",
    "peak_lr": "#f4a261",
    "skipped_step": "#6c757d",
    "rollback": "#1d3557",
    "replan": "#264653",
}
_PHASE_NAMES = {code: phase.value for phase, code in PHASE_CODES.items()}


def find_run_files(run_dir: Path) -> tuple[Path, Path | None]:
    """The newest metrics file under ``run_dir`` (``metrics.csv``, or a TensorBoard
    ``events.out.tfevents.*``) and the ``events.jsonl`` beside it (if any)."""
    run_dir = Path(run_dir)
    candidates = [*run_dir.rglob("metrics.csv"), *run_dir.rglob("events.out.tfevents.*")]
    if not candidates:
        raise FileNotFoundError(
            f"no metrics.csv or TensorBoard event file under {run_dir} "
            "(log the run with CSVLogger or TensorBoardLogger)"
        )
    metrics = max(candidates, key=lambda p: p.stat().st_mtime)
    events = metrics.parent / EVENTS_FILE
    return metrics, events if events.exists() else None


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric series of a metrics file as ``(step, value)`` pairs."""
    if Path(path).name.startswith("events.out.tfevents."):
        return _read_tensorboard(Path(path))
    series: dict[str, list[tuple[int, float]]] = {}
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def _read_tensorboard(path: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of one TensorBoard event file (needs the ``tensorboard`` package)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:
        raise FileNotFoundError(
            f"{path} is a TensorBoard event file; reading it needs: pip install tensorboard"
        ) from err
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def read_events(path: Path | None) -> list[dict[str, Any]]:
    """The JSON records of ``events.jsonl`` (an empty list without the file)."""
    if path is None:
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_lr_find(path: Path) -> list[tuple[float, float]]:
    """The ``(lr, loss)`` rows of an ``lr_find.csv``, non-finite losses dropped."""
    with path.open(newline="") as f:
        rows = [(float(row["lr"]), float(row["loss"])) for row in csv.DictReader(f)]
    return [(lr, loss) for lr, loss in rows if math.isfinite(lr) and math.isfinite(loss)]


def _phase_spans(phase: list[tuple[int, float]]) -> list[tuple[str, int, int]]:
    spans: list[tuple[str, int, int]] = []
    for step, code in phase:
        name = _PHASE_NAMES.get(round(code), "?")
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], step)
        else:
            spans.append((name, spans[-1][2] if spans else step, step))
    return spans


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write a PNG of the run in ``run_dir`` (default: ``surgeon.png`` beside metrics.csv)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path, events_path = find_run_files(run_dir)
    series = read_metrics(metrics_path)
    events = read_events(events_path)
    out = Path(out) if out is not None else metrics_path.parent / "surgeon.png"

    lr_find_path = metrics_path.parent / LR_FIND_FILE
    curve = read_lr_find(lr_find_path) if lr_find_path.exists() else []
    if curve:
        fig = plt.figure(figsize=(11, 9.5))
        grid = fig.add_gridspec(3, 1, height_ratios=[3, 3, 2])
        ax_loss = fig.add_subplot(grid[0])
        ax_lr = fig.add_subplot(grid[1], sharex=ax_loss)
        _plot_lr_find(fig.add_subplot(grid[2]), curve, events)
    else:
        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    spans = _phase_spans(series.get("surgeon/phase", []))
    for ax in (ax_loss, ax_lr):
        for name, start, end in spans:
            ax.axvspan(start, end, color=_PHASE_COLORS.get(name, "#eeeeee"), lw=0, zorder=0)
    for key, style in (("surgeon/loss", {"lw": 0.7, "alpha": 0.5}), ("surgeon/loss_smooth", {})):
        points = [(s, v) for s, v in series.get(key, []) if math.isfinite(v)]
        if points:
            ax_loss.plot(*zip(*points, strict=True), label=key.split("/")[1], **style)
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    for key in sorted(k for k in series if k.startswith("lr-")):
        ax_lr.plot(*zip(*series[key], strict=True), label=key)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")

    counts = Counter(event["kind"] for event in events)
    labelled: set[str] = set()
    at_step: Counter[int] = Counter()  # events already marked at a step: their labels side by side
    for event in events:
        kind = event["kind"]
        color = _EVENT_COLORS.get(kind, "#555555")
        for ax in (ax_loss, ax_lr):
            label = f"{kind} ({counts[kind]})" if ax is ax_lr and kind not in labelled else None
            ax.axvline(event["step"], color=color, ls="--", lw=1.2, label=label)
        labelled.add(kind)
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
    phase_handles = [
        plt.Rectangle((0, 0), 1, 1, color=color, label=f"phase: {name}")
        for name, color in _PHASE_COLORS.items()
        if any(span[0] == name for span in spans)
    ]
    ax_loss.legend(loc="upper right", fontsize=8)
    handles, _ = ax_lr.get_legend_handles_labels()
    ax_lr.legend(handles=handles + phase_handles, loc="upper right", fontsize=8)
    fig.suptitle(f"ScheduleSurgeon: {len(events)} events — {metrics_path.parent}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_lr_find(ax: Any, curve: list[tuple[float, float]], events: list[dict[str, Any]]) -> None:
    """The range test: loss against LR (log axis), the chosen peak marked."""
    ax.plot(*zip(*curve, strict=True), color="#264653", lw=1.0, label="LR range test")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (range test)")
    ax.set_ylabel("loss")
    for event in events:
        scale = event.get("scale_after") or 0.0
        if event["kind"] == "peak_lr" and "lr_after" in event and scale > 0:
            peak = event["lr_after"] / scale  # lr_after is the peak x the next step's scale
            ax.axvline(peak, color=_EVENT_COLORS["peak_lr"], ls="--", label=f"peak LR {peak:.3g}")
    ax.legend(loc="upper left", fontsize=8)


def _mark_events(ax_loss: Any, ax_lr: Any, events: list[dict[str, Any]]) -> None:
    """A dashed line per event on both panels, its kind written at the top of the loss panel
    (side by side at a shared step) and counted once per kind in the LR panel's legend."""
    counts = Counter(event["kind"] for event in events)
    labelled: set[str] = set()
    at_step: Counter[int] = Counter()
    for event in events:
        kind = event["kind"]
        color = _EVENT_COLORS.get(kind, "#555555")
        for ax in (ax_loss, ax_lr):
            label = f"{kind} ({counts[kind]})" if ax is ax_lr and kind not in labelled else None
            ax.axvline(event["step"], color=color, ls="--", lw=1.2, label=label)
        labelled.add(kind)
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
            ax.axvspan(start, end, color=_PHASE_COLORS.get(name, "#eeeeee"), lw=0, zorder=0)
    for values, label, style in (
        (result.losses, "loss", {"lw": 0.7, "alpha": 0.5}),
        (result.smooth, "loss_smooth", {}),
    ):
        points = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v) and v > 0]
        if points:
            ax_loss.plot(*zip(*points, strict=True), label=label, **style)
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_lr.plot(steps, result.lr_scales, color="#264653", label="replayed LR scale")
    ax_lr.set_ylabel("LR scale (x each group's peak LR)")
    ax_lr.set_xlabel("optimizer step")
    _mark_events(ax_loss, ax_lr, [event.to_dict() for event in result.events])
    phase_handles = [
        plt.Rectangle((0, 0), 1, 1, color=_PHASE_COLORS.get(n, "#eeeeee"), label=f"phase: {n}")
        for n in dict.fromkeys(span[0] for span in spans)
    ]
    ax_loss.legend(loc="upper right", fontsize=8)
    handles, _ = ax_lr.get_legend_handles_labels()
    ax_lr.legend(handles=handles + phase_handles, loc="upper right", fontsize=8)
    fig.suptitle(f"surgeon replay: {len(result.events)} events — {title}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
