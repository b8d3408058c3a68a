"""The ``surgeon`` command line: one argparse subcommand per task.

This module owns argument parsing and the console entry point :func:`main`. Each
subcommand is one ``_add_<name>(subparsers)`` function, listed in :data:`SUBCOMMANDS`,
that builds its parser and sets ``handler`` to a ``_run_<name>(args) -> int`` function
(and ``usage_prog=parser.prog``, so that stray arguments are reported under the command).
Parsers raise :class:`UsageError` instead of exiting; handlers do the same for bad input.

``surgeon preview NAME --key value ...`` builds the schedule ``NAME`` from
:data:`surgeon.schedules.SCHEDULES`; its options are derived from the factory's signature
(names, types, defaults, ``Literal`` choices), with ``--warmup-steps`` and
``--warmup_steps`` both accepted. It prints a table of step -> lr and, with ``--out``,
writes a PNG of the curve (needs matplotlib: ``pip install 'schedule-surgeon[plot]'``).

``surgeon preview --html FILE [NAME ...]`` writes the interactive schedule page and
``surgeon replay RUN_OR_CSV [--<SurgeonConfig field> value ...]`` re-runs the surgeon's
decisions on a logged loss stream (:mod:`surgeon.replay`; its options are derived from the
``SurgeonConfig`` fields), with ``--html`` the interactive replay page (:mod:`surgeon.web`).

Usage errors (unknown schedule or option, bad value, a ValueError from a factory) print
``surgeon <command>: error: <message>`` to stderr and return exit code 2, no traceback.

``surgeon --version`` prints ``surgeon.__version__``. Torch, Lightning and matplotlib are
imported only by the handlers that need them (``surgeon plot`` reads the run before it imports
matplotlib), so ``--help``, ``--version`` and usage errors answer at once
(``tests/test_cli_startup.py``, ``benchmarks/cli_startup.py``).
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeAlias

from surgeon import __version__
from surgeon.schedules import SCHEDULES, Schedule

__all__ = ["SUBCOMMANDS", "UsageError", "build_parser", "main"]

EXIT_USAGE = 2
PLOT_EXTRA = "schedule-surgeon[plot]"

# Defaults for factory arguments that have none in the signature.
_CLI_DEFAULTS: dict[str, Any] = {"lr": 1e-3}
# Horizon for schedules without a total_steps argument, unless --steps is given.
_DEFAULT_HORIZON = 100
# A plot evaluates at most this many steps (evenly spaced beyond it).
_MAX_PLOT_POINTS = 5000
# Prefix of the namespace attributes that hold factory arguments.
_KW = "kw_"


class UsageError(Exception):
    """A bad command line: reported as ``{prog}: error: {message}``, exit code 2."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog
        self.message = message


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`UsageError` instead of exiting.

    ``error_prog`` and ``error_prefix`` let a nested parser report under its command
    (``surgeon preview: error: cosine: ...``) rather than its full prog.
    """

    def __init__(self, *args: Any, error_prog: str = "", error_prefix: str = "", **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.error_prog = error_prog
        self.error_prefix = error_prefix

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.error_prog or self.prog, self.error_prefix + message)


# ----------------------------------------------------------------------------- preview


Subparsers: TypeAlias = "argparse._SubParsersAction[_Parser]"
"""What each ``_add_<name>`` function adds its subcommand to."""


def _converter(annotation: Any) -> tuple[Callable[[str], Any], tuple[str, ...] | None]:
    """(argparse type, choices) for a factory parameter's annotation."""
    if typing.get_origin(annotation) is Literal:
        return str, tuple(str(choice) for choice in typing.get_args(annotation))
    if annotation in (int, float, str):
        return annotation, None
    raise TypeError(f"cannot expose a parameter annotated {annotation!r} on the command line")


def _add_factory_options(parser: argparse.ArgumentParser, factory: Callable[..., Schedule]) -> None:
    """One ``--key`` option per parameter of ``factory``; the signature is the only source."""
    names = []
    for param in inspect.signature(factory, eval_str=True).parameters.values():
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            raise TypeError(f"cannot expose {param.kind.description} parameter {param.name!r}")
        convert, choices = _converter(param.annotation)
        kind = "one of " + ", ".join(choices) if choices else convert.__name__
        flags = [f"--{param.name.replace('_', '-')}"]
        if "_" in param.name:
            flags.append(f"--{param.name}")
        default = _CLI_DEFAULTS.get(param.name) if param.default is param.empty else param.default
        required = param.default is param.empty and param.name not in _CLI_DEFAULTS
        parser.add_argument(
            *flags,
            dest=_KW + param.name,
            type=convert,
            choices=choices,
            default=default,
            required=required,
            metavar=None if choices else param.name.upper(),
            help=f"{kind}, required" if required else f"{kind}, default: {default!r}",
        )
        names.append(param.name)
    parser.set_defaults(factory_params=tuple(names))


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


# argparse names the type in "invalid ... value" messages.
_non_negative_int.__name__ = "non-negative int"
_positive_int.__name__ = "positive int"


def _add_preview(subparsers: Subparsers) -> None:
    preview = subparsers.add_parser(
        "preview",
        help="print (and optionally plot) a learning-rate schedule",
        description="Print a table of step -> lr for a schedule, optionally plot it; or write an "
        "interactive page of a warmup + decay schedule (--html).",
    )
    preview.set_defaults(handler=_run_preview, usage_prog=preview.prog)
    preview.add_argument(
        "--html",
        type=Path,
        metavar="FILE",
        help="write an interactive page (sliders for the warmup, length, peak, floor and decay "
        "shape; starts from NAME's values when given): one self-contained HTML file",
    )
    names = preview.add_subparsers(
        dest="schedule", metavar="NAME", required=False, parser_class=_Parser
    )
    for name, factory in SCHEDULES.items():
        doc = inspect.getdoc(factory) or name
        parser = names.add_parser(
            name,
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            error_prog=preview.prog,
            error_prefix=f"{name}: ",
        )
        _add_factory_options(parser, factory)
        _add_view_options(parser)
        parser.set_defaults(usage_prefix=f"{name}: ")


def _add_view_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``preview`` itself, shared by every schedule."""
    view = parser.add_argument_group("preview options")
    view.add_argument(
        "--steps",
        type=_non_negative_int,
        metavar="N",
        help=f"last step to show (default: total_steps, else {_DEFAULT_HORIZON})",
    )
    view.add_argument(
        "--points",
        type=_positive_int,
        default=8,
        metavar="K",
        help="evenly spaced rows in the table (default: 8)",
    )
    view.add_argument("--out", type=Path, metavar="PNG", help="write a plot of the curve here")


def _table_rows(horizon: int, warmup: int | None, points: int) -> dict[int, list[str]]:
    """Steps to tabulate with their labels: start, end of warmup, middle, end, and evenly
    spaced points in between."""
    rows: dict[int, list[str]] = {}
    for step in (round(i * horizon / points) for i in range(points + 1)):
        rows.setdefault(step, [])
    marks = [(0, "start"), (horizon // 2, "middle"), (horizon, "end")]
    if warmup is not None and 0 < warmup <= horizon:
        marks.append((warmup, "end of warmup"))
    for step, label in marks:
        rows.setdefault(step, []).append(label)
    return dict(sorted(rows.items()))


def _plot(schedule: Schedule, horizon: int, warmup: int | None, title: str, path: Path) -> None:
    from matplotlib.figure import Figure  # lazily: matplotlib is the optional [plot] extra

    count = min(horizon + 1, _MAX_PLOT_POINTS)
    steps = sorted({round(i * horizon / max(count - 1, 1)) for i in range(count)})
    figure = Figure(figsize=(7, 3.5), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(steps, [schedule(step) for step in steps], linewidth=1.5)
    if warmup is not None and 0 < warmup <= horizon:
        axes.axvline(warmup, color="grey", linestyle="--", linewidth=0.8, label="end of warmup")
        axes.legend(loc="best", fontsize=8)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("learning rate")
    axes.set_title(textwrap.fill(title, width=80), fontsize=9)
    axes.grid(alpha=0.3)
    kind = Path(path).suffix.lower().lstrip(".")  # .svg, .pdf, .jpg ...; else (none) a PNG
    known = kind in figure.canvas.get_supported_filetypes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # as every other file the CLI writes
    figure.savefig(path, dpi=100, format=kind if known else "png")


def _run_preview(args: argparse.Namespace) -> int:
    name: str | None = args.schedule
    prog: str = args.usage_prog
    if name is None:
        if args.html is None:
            raise UsageError(prog, "name a schedule (see --help), or write a page with --html FILE")
        return _write_preview_page(prog, args.html, None, {})
    kwargs = {param: getattr(args, _KW + param) for param in args.factory_params}
    if args.html is not None:
        _write_preview_page(prog, args.html, name, kwargs)
    try:
        schedule = SCHEDULES[name](**kwargs)
    except ValueError as err:
        raise UsageError(prog, f"{name}: {err}") from None
    horizon = args.steps if args.steps is not None else kwargs.get("total_steps", _DEFAULT_HORIZON)
    warmup = kwargs.get("warmup_steps")
    title = f"{name}({', '.join(f'{key}={value!r}' for key, value in kwargs.items())})"

    if args.out is not None:
        try:
            import matplotlib  # noqa: F401  (fail before printing anything)
        except ImportError:
            raise UsageError(
                prog, f"--out needs matplotlib; install it with: pip install '{PLOT_EXTRA}'"
            ) from None

    width = max(len(str(horizon)), len("step"))
    print(title)
    print(f"{'step':>{width}}  lr")
    for step, labels in _table_rows(horizon, warmup, args.points).items():
        print(f"{step:>{width}}  {schedule(step):.6e}  {', '.join(labels)}".rstrip())

    if args.out is not None:
        try:
            _plot(schedule, horizon, warmup, title, args.out)
        except OSError as err:
            raise UsageError(prog, f"cannot write {str(args.out)!r}: {err.strerror}") from None
        print(f"wrote {args.out}")
    return 0


# The preview page's starting point, the shape of ScheduleSurgeon()'s defaults (a floor of 0;
# the wsd tail over wsd_decay_fraction of the steps after warmup, the page's share being of the
# whole run), and the schedules whose arguments it can start from (a warmup, then a decay to a
# floor): name -> the page's decay shape.
_PAGE_START: dict[str, Any] = {
    "total_steps": 1000,
    "warmup_steps": 50,
    "peak": 1e-3,
    "floor": 0.0,
    "shape": "wsd",
    "decay_fraction": 0.475,
}
_PAGE_SHAPES = {"warmup_cosine": "cosine", "cosine": "cosine", "wsd": "wsd"}


def _write_preview_page(prog: str, path: Path, name: str | None, kwargs: dict[str, Any]) -> int:
    """The interactive schedule page, starting from ``name``'s arguments when given."""
    from surgeon import web

    start = dict(_PAGE_START)
    if name is not None:
        if name not in _PAGE_SHAPES or kwargs.get("decay_shape", "linear") != "linear":
            raise UsageError(
                prog,
                f"--html draws a warmup then a decay to a floor: start it from one of "
                f"{', '.join(_PAGE_SHAPES)} (wsd with its linear decay), or give no NAME; "
                f"got {name}",
            )
        start["shape"] = _PAGE_SHAPES[name]
        start["peak"] = kwargs["lr"]
        start["floor"] = kwargs.get("min_lr", 0.0) / kwargs["lr"] if kwargs["lr"] else 0.0
        for key in ("total_steps", "warmup_steps", "decay_fraction"):
            start[key] = kwargs.get(key, start[key] if key != "warmup_steps" else 0)
    start["marker"] = start["warmup_steps"]
    title = "surgeon preview: " + (name or "a warmup + decay schedule")
    _write_text(prog, path, web.page(title, {"mode": "preview", "start": start}))
    print(f"wrote {path}")
    return 0


def _write_text(prog: str, path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise UsageError(prog, f"cannot write {str(path)!r}: {err.strerror}") from None


# -------------------------------------------------------------------------------- demo


def _add_demo(subparsers: Subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="train a tiny char-level transformer with ScheduleSurgeon and plot the run",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory")
    demo.add_argument("--steps", type=_positive_int, default=600, help="optimizer steps")
    demo.add_argument(
        "--spike-at",
        type=_non_negative_int,
        default=400,
        help="the batches of this step and the next are made 20x worse: a spike and its recovery",
    )
    demo.add_argument(
        "--outlier-at",
        type=_non_negative_int,
        default=250,
        help="the batch of this step alone is made 20x worse: an outlier, left alone",
    )
    demo.add_argument("--no-spike", action="store_true", help="inject no bad batch")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_run_demo, usage_prog=demo.prog)


def _run_demo(args: argparse.Namespace) -> int:
    import logging

    from surgeon.demo import run_demo

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    spike_at, outlier_at = (None, None) if args.no_spike else (args.spike_at, args.outlier_at)
    surgeon, log_dir = run_demo(
        args.out, steps=args.steps, spike_at=spike_at, outlier_at=outlier_at, seed=args.seed
    )
    print(f"\nScheduleSurgeon events ({len(surgeon.events)}), final phase {surgeon.phase.value}:")
    for event in surgeon.events:
        print(f"  step {event.step:>5}  {event.kind.value:<11} {event.reason}")
    print(f"metrics and events.jsonl in {log_dir}")
    return _write_plot(args.usage_prog, log_dir, None)


# -------------------------------------------------------------------------------- plot


def _add_plot(subparsers: Subparsers) -> None:
    plot = subparsers.add_parser(
        "plot",
        help="plot loss and LR of a logged run with the surgeon's events marked",
        description=(
            "Write a PNG of a run trained with ScheduleSurgeon: loss (smoothed, and the run's own "
            "val/train losses), LR per param group, phases shaded, every event marked."
        ),
    )
    plot.add_argument(
        "run_dir",
        type=Path,
        help="directory holding the run's metrics.csv (CSVLogger) or TensorBoard event file",
    )
    plot.add_argument("--out", type=Path, default=None, help="PNG path (default: in the run)")
    plot.add_argument(
        "--log-lr",
        action="store_true",
        help="LR on a log axis (param groups whose LRs are decades apart)",
    )
    plot.set_defaults(handler=_run_plot, usage_prog=plot.prog)


def _run_plot(args: argparse.Namespace) -> int:
    return _write_plot(args.usage_prog, args.run_dir, args.out, log_lr=args.log_lr)


def _write_plot(prog: str, run_dir: Path, out: Path | None, *, log_lr: bool = False) -> int:
    from surgeon.plot import RunError, draw, load_run  # no matplotlib yet: errors come fast

    try:
        run = load_run(run_dir)
    except (RunError, ValueError) as err:  # no run there, or its files do not parse
        raise UsageError(prog, str(err)) from None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(prog, f"plotting needs matplotlib: pip install '{PLOT_EXTRA}'") from None
    print(f"wrote {draw(run, out, log_lr=log_lr)}")
    return 0


# ------------------------------------------------------------------------------ replay


def _config_type(name: str, annotation: Any) -> Callable[[str], Any]:
    """The argparse type of a SurgeonConfig field: Literal choices, int, float, or a length
    (an int counts steps, a number with a point is a fraction of the run)."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) else (annotation,)
    choices = [
        c
        for option in options
        if typing.get_origin(option) is Literal
        for c in typing.get_args(option)
    ]
    if typing.get_origin(annotation) is Literal:
        choices = list(options)
    kinds = [option for option in options if option in (int, float)]

    def convert(text: str) -> Any:
        if text in choices:
            return text
        if int in kinds:
            try:
                return int(text)
            except ValueError:
                pass
        if float in kinds:
            return float(text)
        raise ValueError(text)

    described = [*(repr(c) for c in choices), *(kind.__name__ for kind in kinds)]
    convert.__name__ = " or ".join(described)  # argparse names it in "invalid ... value"
    return convert


def _add_replay(subparsers: Subparsers) -> None:
    from surgeon.config import SurgeonConfig

    replay = subparsers.add_parser(
        "replay",
        help="re-run the surgeon's decisions on a logged loss stream with chosen settings",
        description=(
            "Feed a logged loss stream through the controller as the callback would (losses read "
            "in blocks, a few steps late; snapshots and rollbacks as in a run), print the "
            "decisions with their reasons and plot the LR it would have set. RUN_OR_CSV is a "
            "surgeon run directory (losses.csv, settings.json), a Lightning metrics.csv or "
            "TensorBoard event file, or a step,loss CSV. Settings default to the run's "
            "settings.json, else to SurgeonConfig's defaults."
        ),
    )
    replay.add_argument("run", type=Path, metavar="RUN_OR_CSV", help="what to replay")
    replay.add_argument("--metric", help="the series to replay (default: a training loss)")
    replay.add_argument(
        "--out", type=Path, metavar="PNG", help="plot (default: replay.png beside the stream)"
    )
    replay.add_argument(
        "--html",
        type=Path,
        metavar="FILE",
        help="write an interactive page: sliders re-run the decisions",
    )
    run = replay.add_argument_group("run settings (default: the run's settings.json)")
    run.add_argument(
        "--total-steps",
        "--total_steps",
        type=_positive_int,
        metavar="N",
        help="planned length (default: the run's, else the stream's length)",
    )
    run.add_argument(
        "--readback-every",
        "--readback_every",
        type=_positive_int,
        metavar="N",
        help="losses read back per block (default: the run's, else 4)",
    )
    run.add_argument(
        "--snapshot",
        choices=("on", "off"),
        help="whether snapshots were kept, so rollbacks happen (default: on)",
    )
    config = replay.add_argument_group(
        "SurgeonConfig fields (default: the run's settings.json, else SurgeonConfig's)"
    )
    defaults = SurgeonConfig()
    for name, annotation in typing.get_type_hints(SurgeonConfig).items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        config.add_argument(
            *flags,
            dest=_KW + name,
            type=_config_type(name, annotation),
            metavar=name.upper(),
            help=f"default: {getattr(defaults, name)!r}",
        )
    replay.set_defaults(handler=_run_replay, usage_prog=replay.prog)


def _run_replay(args: argparse.Namespace) -> int:
    import dataclasses

    from surgeon.config import SurgeonConfig
    from surgeon.replay import RunSettings, read_stream

    prog: str = args.usage_prog
    if args.out is not None:
        _need_matplotlib(prog, "--out")
    try:
        stream = read_stream(args.run, args.metric)
        stream.check_from_the_start()
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(prog, str(err)) from None
    base = stream.settings or RunSettings(len(stream.losses))
    overrides = {
        name: getattr(args, _KW + name)
        for name in (f.name for f in dataclasses.fields(SurgeonConfig))
        if getattr(args, _KW + name) is not None
    }
    try:
        settings = RunSettings(
            total_steps=args.total_steps or base.total_steps,
            config=dataclasses.replace(base.config, **overrides),
            readback_every=args.readback_every or base.readback_every,
            snapshots=base.snapshots if args.snapshot is None else args.snapshot == "on",
        )
        result = stream.replayed(settings)
    except ValueError as err:
        raise UsageError(prog, str(err)) from None

    changed = [f"{key}={value!r}" for key, value in overrides.items()]
    print(
        f"replaying {stream.source}: {len(stream.losses)} losses, steps {stream.steps[0]} to "
        f"{stream.steps[-1]}"
    )
    if stream.stride > 1:
        print(
            f"  logged every {stream.stride} steps: one point is one step of the replay, so "
            "--total-steps and lengths in steps count points (fractions keep their meaning)"
        )
    origin = "the run's settings.json" if stream.settings else "SurgeonConfig defaults"
    print(
        f"  settings: {origin}"
        f"{' with ' + ', '.join(changed) if changed else ''}; total_steps="
        f"{settings.total_steps}, readback_every={settings.readback_every}, snapshots "
        f"{'on' if settings.snapshots else 'off'}"
    )
    width = max(len(str(stream.steps[-1])), 4)
    print(f"{'step':>{width}}  {'event':<12}  reason")
    for event in result.events:
        print(
            f"{event.step:>{width}}  {event.kind.value:<12}  {event.reason} (LR scale "
            f"{event.scale_before:.3g} -> {event.scale_after:.3g})"
        )
    if stream.logged_events is not None:
        known = stream.checkpoints is not None
        print(
            _compare_with_log(
                result.events,
                stream.logged_events,
                checkpoints_known=known,
                losses_end=stream.steps[-1],
            )
        )

    if args.html is not None:
        _write_text(prog, args.html, _replay_page(stream, settings))
        print(f"wrote {args.html}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"(no plot: it needs matplotlib: pip install '{PLOT_EXTRA}')")
        return 0
    from surgeon.plot import plot_replay

    out = args.out or stream.path.parent / "replay.png"
    try:
        plot_replay(result, out, stream.source)
    except OSError as err:
        raise UsageError(prog, f"cannot write {str(out)!r}: {err.strerror}") from None
    print(f"wrote {out}")
    return 0


def _without_sizes(reason: str) -> str:
    """A reason without a snapshot's size (a replay has no weights to measure)."""
    return re.sub(r"snapshot of step (\d+) \([^)]*\)", r"snapshot of step \1", reason)


def _compare_with_log(
    events: list[Any],
    logged: list[dict[str, Any]],
    *,
    checkpoints_known: bool = True,
    losses_end: int | None = None,
) -> str:
    """A line saying whether the replayed events (step, kind and reason) are those the run
    logged, up to the first decision the run made from outside the losses;
    ``checkpoints_known``: the run recorded its checkpoints (else a difference may be theirs);
    ``losses_end``: the last step of the stream (a run that stopped without finishing logged
    events past the rows it wrote)."""
    from surgeon.recorder import LOSS_ROWS_PER_WRITE
    from surgeon.replay import before_outside_decision

    comparable, cut = before_outside_decision(logged)
    theirs = [(r["step"], r["kind"], _without_sizes(r["reason"])) for r in comparable]
    mine = [(e.step, e.kind.value, _without_sizes(e.reason)) for e in events]
    until = ""
    if cut is not None:
        until = (
            f" up to the {cut['kind']} at step {cut['step']} (made from outside the losses, as "
            "a time budget, EarlyStopping, a resume with other settings or a request; the plans "
            "differ from there)"
        )
        # the replay goes on with the old plan: what follows is not comparable
        mine = [event for event in mine if event[0] < cut["step"]]
    if mine == theirs:
        return f"the replay reproduces the {len(theirs)} logged events{until}"
    pairs = zip(mine, theirs, strict=False)
    at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(mine), len(theirs)))
    first = (
        f"logged {theirs[at][1]} at step {theirs[at][0]}"
        if at < len(theirs)
        else "nothing more logged"
    )
    then = (
        f"replayed {mine[at][1]} at step {mine[at][0]}"
        if at < len(mine)
        else "nothing more replayed"
    )
    reasons = at < min(len(mine), len(theirs)) and mine[at][:2] == theirs[at][:2]
    what = " (the same step and kind, another reason)" if reasons else ""
    if losses_end is not None and at < len(theirs) and theirs[at][0] > losses_end:
        what += (
            f". The losses end at step {losses_end}, before the logged events do (step "
            f"{theirs[-1][0]}): the run stopped without finishing (killed, or a plain loop "
            f"without finish()), before it wrote its last rows ({LOSS_ROWS_PER_WRITE} are "
            "written at a time), so the events after them cannot be replayed"
        )
    return (
        f"the replay differs from the logged events{until} ({len(theirs)} logged, {len(mine)} "
        f"replayed); first difference, event {at + 1}: {first}, {then}{what}"
        + (
            ""
            if checkpoints_known
            else ". A checkpoint near a decision reads the losses in flight early and drops the "
            "snapshots, and this run's directory has no checkpoints.csv (an older surgeon's run) "
            "to say where: such a run replays close, not exactly"
        )
    )


def _replay_page(stream: Any, settings: Any) -> str:
    """The interactive replay page of ``stream`` (its data, the run settings, the colors)."""
    from surgeon import web
    from surgeon.plot import EVENT_COLORS, PHASE_COLORS
    from surgeon.replay import before_outside_decision

    logged, logged_until = None, None
    if stream.logged_events is not None:  # compared up to the first outside decision
        comparable, cut = before_outside_decision(stream.logged_events)
        logged = [[r["step"], r["kind"]] for r in comparable]
        logged_until = None if cut is None else [cut["step"], cut["kind"]]
    peaks = [
        r["lr_after"] / r["scale_after"]
        for r in stream.logged_events or []
        if r.get("scale_after") and r.get("lr_after") is not None
    ]
    data = {
        "mode": "replay",
        "source": stream.source,
        "steps": stream.steps,
        "losses": stream.losses,
        "update_skipped": stream.update_skipped,
        "passed": stream.passed,
        "checkpoints": stream.checkpoints or [],
        "end_read": stream.end_read,
        "stride": stream.stride,
        "settings": {
            "total_steps": settings.total_steps,
            "readback_every": settings.readback_every,
            "snapshots": settings.snapshots,
            "config": web.js_config(settings.config, settings.total_steps),
        },
        "logged_events": logged,
        "logged_until": logged_until,
        "peak_lr": peaks[0] if peaks else None,
        "colors": {"events": EVENT_COLORS, "phases": PHASE_COLORS},
    }
    return web.page(f"surgeon replay: {stream.source}", data)


def _need_matplotlib(prog: str, option: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(prog, f"{option} needs matplotlib: pip install '{PLOT_EXTRA}'") from None


# -------------------------------------------------------------------------------- main

SUBCOMMANDS: dict[str, Callable[[Subparsers], None]] = {
    "preview": _add_preview,
    "demo": _add_demo,
    "plot": _add_plot,
    "replay": _add_replay,
}
"""Subcommand name -> function adding its parser (and ``handler``) to the subparsers."""


def build_parser() -> argparse.ArgumentParser:
    """The ``surgeon`` parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = _Parser(
        prog="surgeon",
        description="schedule-surgeon: an adaptive learning-rate controller for Lightning.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    for add in SUBCOMMANDS.values():
        add(subparsers)
    return parser


class _StdoutWhileRead:
    """``sys.stdout`` until its reader goes away (``surgeon replay RUN | head``), then nothing:
    the command goes on and writes the files it was asked for, quietly."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _reader_gone(self) -> None:
        if sys.__stdout__ is not None:  # (fd 1 too: Python flushes it once more at exit)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())
        self._stream = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the command)

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            self._reader_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run one subcommand and return its exit code (2: usage error)."""
    parser = build_parser()
    stdout, sys.stdout = sys.stdout, _StdoutWhileRead(sys.stdout)
    try:
        try:
            args, extras = parser.parse_known_args(argv)
        except SystemExit as done:  # --help
            return done.code if isinstance(done.code, int) else 0
        if extras:
            prog = getattr(args, "usage_prog", parser.prog)
            prefix = getattr(args, "usage_prefix", "")
            raise UsageError(prog, f"{prefix}unrecognized arguments: {' '.join(extras)}")
        return int(args.handler(args))
    except UsageError as err:
        print(f"{err.prog}: error: {err.message}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        sys.stdout.flush()
        sys.stdout = stdout
