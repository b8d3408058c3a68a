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
import sys
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn

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


def _add_preview(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    preview = subparsers.add_parser(
        "preview",
        help="print (and optionally plot) a learning-rate schedule",
        description="Print a table of step -> lr for a schedule, optionally plot it.",
    )
    preview.set_defaults(handler=_run_preview, usage_prog=preview.prog)
    names = preview.add_subparsers(
        dest="schedule", metavar="NAME", required=True, parser_class=_Parser
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
    figure.savefig(path, dpi=100, format="png")


def _run_preview(args: argparse.Namespace) -> int:
    name: str = args.schedule
    prog: str = args.usage_prog
    kwargs = {param: getattr(args, _KW + param) for param in args.factory_params}
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


# -------------------------------------------------------------------------------- demo


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        help="step whose batch is made 20x worse, to show a spike and its recovery",
    )
    demo.add_argument("--no-spike", action="store_true", help="inject no bad batch")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_run_demo, usage_prog=demo.prog)


def _run_demo(args: argparse.Namespace) -> int:
    import logging

    from surgeon.demo import run_demo

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    spike_at = None if args.no_spike else args.spike_at
    surgeon, log_dir = run_demo(args.out, steps=args.steps, spike_at=spike_at, seed=args.seed)
    print(f"\nScheduleSurgeon events ({len(surgeon.events)}), final phase {surgeon.phase.value}:")
    for event in surgeon.events:
        print(f"  step {event.step:>5}  {event.kind.value:<11} {event.reason}")
    print(f"metrics and events.jsonl in {log_dir}")
    return _write_plot(args.usage_prog, log_dir, None)


# -------------------------------------------------------------------------------- plot


def _add_plot(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    except RunError as err:
        raise UsageError(prog, str(err)) from None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(prog, f"plotting needs matplotlib: pip install '{PLOT_EXTRA}'") from None
    print(f"wrote {draw(run, out, log_lr=log_lr)}")
    return 0


# -------------------------------------------------------------------------------- main

SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = {
    "preview": _add_preview,
    "demo": _add_demo,
    "plot": _add_plot,
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


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run one subcommand and return its exit code (2: usage error)."""
    parser = build_parser()
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
