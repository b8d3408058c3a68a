"""The JavaScript port (``surgeon/web/*.js``) against the Python it ports, under ``node``.

The interactive replay page re-runs the decisions in the browser with a port of the
controller, its detectors, the schedule shapes and the replay's feed. Here both run on the
same streams, scripted (warmup that stabilizes, spikes, severe spikes, NaN/inf streaks,
skipped updates with finite losses, plateaus, a spike during the warmup ramp) and recorded
(a real ``Trainer.fit``), under several configs, read-back blocks and with snapshots on and
off: the events must be identical (step, kind, reason, phase), the LR scales, the event
scales and the smoothed loss equal to 1e-12 relative. The schedule shapes, the preview
page's curve and the port of Python's float formatting (the reasons' numbers) are checked
the same way.

When the controller changes, the port follows it file for file (same names); these tests
say where it no longer does.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import TinyRegressor, make_loader
from pytorch_lightning.loggers import CSVLogger

from surgeon import schedules
from surgeon.callback import ScheduleSurgeon
from surgeon.config import SurgeonConfig
from surgeon.controller import EventKind
from surgeon.replay import Replay, RunSettings, read_stream, replay
from surgeon.web import PAGE_MODULES, js_config, js_value

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(
    NODE is None,
    reason="node is not installed (the JS port is run under node: apt-get install nodejs)",
)
WEB = Path(__file__).resolve().parents[1] / "surgeon" / "web"
HARNESS = Path(__file__).resolve().parent / "js" / "run_port.js"
REL = 1e-12


def run_port(cases: list[dict[str, Any]]) -> list[Any]:
    """The port's answers to ``cases`` (see ``tests/js/run_port.js``)."""
    request = {"modules": [str(WEB / name) for name in PAGE_MODULES], "cases": js_value(cases)}
    done = subprocess.run(
        [NODE, str(HARNESS)],  # type: ignore[list-item]
        input=json.dumps(request, allow_nan=False),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(
        done.stdout,
        object_hook=lambda d: {k: _number(v) for k, v in d.items()},
    )


def _number(value: Any) -> Any:
    if value in ("NaN", "Infinity", "-Infinity"):
        return float(value.replace("Infinity", "inf"))
    if isinstance(value, list):
        return [_number(v) for v in value]
    return value


# ------------------------------------------------------------------------------ streams


def _noisy(values: list[float], sigma: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [v * (1.0 + sigma * rng.gauss(0.0, 1.0)) for v in values]


def _stabilizing(n: int = 1500) -> list[float]:
    return _noisy([1.5 * math.exp(-i / 60) + 0.4 for i in range(n)], 0.01, 1)


def _spiky(n: int = 1500) -> list[float]:
    """An isolated outlier (300), a severe spike its next loss confirms (700) and another while
    the LR is held (712), a mild one (1100), a severe one on the last step (no loss confirms
    it: rolled back as the fit ends)."""
    losses = _noisy([2.0 / (1 + i / 100) + 0.3 for i in range(n)], 0.02, 2)
    spikes = (
        *((300, 2.5), (700, 8.0), (701, 8.0), (712, 3.0), (713, 3.0), (1100, 2.0), (1101, 2.2)),
        (n - 1, 8.0),
    )
    for step, factor in spikes:
        losses[step] *= factor
    return losses


def _below_zero(n: int = 1500) -> list[float]:
    """A loss below 0 (a negative ELBO): a severe spike its next loss confirms (700), a mild one
    (1100), a severe one on the last step; the ratio tests and their words are of |mean|."""
    losses = _noisy([2.0 / (1 + i / 100) - 3.0 for i in range(n)], 0.02, 2)
    for step, jump in ((700, 10.0), (701, 10.0), (1100, 2.0), (1101, 2.2), (n - 1, 10.0)):
        losses[step] += jump
    return losses


def _nonfinite(n: int = 1500) -> tuple[list[float], list[bool]]:
    losses = _noisy([1.0 / (1 + i / 200) + 0.2 for i in range(n)], 0.02, 3)
    for step in (400, 402, 800, 1200, 1201, 1202, 1203):
        losses[step] = math.nan
    losses[401] = math.inf
    skipped = [not math.isfinite(x) for x in losses]
    skipped[600] = skipped[1000] = True  # finite losses whose gradients were not
    losses[599] *= 3.0  # spikes that the next step confirms: its gradients, then a NaN
    losses[1199] *= 3.0
    return losses, skipped


def _plateau(n: int = 2000) -> list[float]:
    return _noisy([1.0 + 0.5 * math.exp(-i / 30) for i in range(n)], 0.02, 4)


def _warmup_spike(n: int = 800) -> list[float]:
    losses = _noisy([3.0 / (1 + i / 20) + 0.5 for i in range(n)], 0.01, 5)
    losses[40] *= 6.0  # during the ramp, confirmed by the next: the ramp pauses, then resumes
    losses[41] *= 6.0
    return losses


def _catapult(n: int = 1500) -> list[float]:
    """A descent with a bump in it during warmup (the ramp pauses and resumes), then from step
    900 a climb to twice the level (the peak is lowered)."""
    trend = [
        (2.0 * math.exp(-i / 25) + 0.5)
        * (1.0 + math.exp(-(((i - 90) / 15) ** 2)))
        * (1.0 + min(1.0, max(0.0, (i - 900) / 80)))
        for i in range(n)
    ]
    return _noisy(trend, 0.005, 6)


def _passing(n: int = 600) -> tuple[list[float], list[bool], list[bool]]:
    """Steps counted without a loss (manual optimization returning none): the first, some in
    the warmup, one inside a spike's window, one in the decay."""
    losses = _noisy([2.0 / (1 + i / 50) + 0.3 for i in range(n)], 0.02, 7)
    losses[300] *= 8.0
    losses[302] *= 8.0
    passed = [i in (0, 1, 20, 21, 22, 301, 480) for i in range(n)]
    for i in range(n):
        if passed[i]:
            losses[i] = math.nan
    return losses, [False] * n, passed


def _idle_passes(n: int = 400) -> tuple[list[float], list[bool], list[bool]]:
    """Steps counted without an update (GradScaler's calibration skips: no loss, update
    skipped) across a snapshot's step, then three non-finite steps: the snapshot moves on to
    the next step's loss, and the idle steps do not count against the rollback's reach; one
    step counted with its update applied (manual optimization) among them."""
    losses = _noisy([2.0 / (1 + i / 50) + 0.3 for i in range(n)], 0.02, 8)
    passed = [i == 60 or 100 <= i < 116 or i == 250 for i in range(n)]
    skipped = [100 <= i < 119 or i == 250 for i in range(n)]
    for i in range(n):
        if passed[i] or 116 <= i < 119:
            losses[i] = math.nan
    return losses, skipped, passed


def _fast_descent(n: int = 300) -> list[float]:
    """The level 100x lower within 150 steps, noise 30% of it, a x10 spike right after: only
    the spike detector's window cap sees it (the noise EMA still holds the descent)."""
    losses = _noisy([0.01 ** min(1.0, i / 150) for i in range(n)], 0.3, 1)
    losses[150] *= 10.0
    losses[151] *= 10.0
    return losses


def _lowered_in_decay(n: int = 1000) -> list[float]:
    """Two confirmed spikes late in the decay (the second while the LR is cut): the peak is
    lowered, and the decay goes on from it."""
    losses = _noisy([2.0 / (1 + i / 50) + 0.3 for i in range(n)], 0.02, 8)
    for step in (800, 801, 806, 807):
        losses[step] *= 3.0  # below rollback_threshold: cut, not rolled back
    return losses


def _exploding_after_rollback(n: int = 1000) -> list[float]:
    """x50 from step 400, then x3 every step to 430 (weights diverging under bad data): one
    rollback, one level shift, then instability past it, the cut deepened again and again."""
    losses = _noisy([1.0 / (1 + i / 200) + 0.2 for i in range(n)], 0.02, 9)
    for step in range(400, 430):
        losses[step] *= 50 * 3 ** (step - 400)
    return losses


def _outlier_before_a_snapshot(n: int = 1000) -> list[float]:
    """An outlier at step 499, the step before a snapshot (which holds its update), then a
    severe spike its next loss confirms: the rollback goes to the snapshot before the
    outlier (490), not to the one after it (500)."""
    losses = _noisy([1.0 / (1 + i / 200) + 0.2 for i in range(n)], 0.02, 10)
    losses[499] *= 20.0
    for step in (503, 504):
        losses[step] *= 10.0
    return losses


def _bad_batches_at_the_end(n: int = 400) -> list[float]:
    """Late trouble: a mild spike its next loss confirms, back in band by the end (that cut did
    its work); a severe outlier 9 steps from the end, its next losses in band (left alone: a
    rollback would undo the decay's last steps); a spike 3 steps from the end that stays out of
    band (no step left for its cut to act: rolled back at the end)."""
    losses = _noisy([1.0 / (1 + i / 100) + 0.2 for i in range(n)], 0.02, 11)
    for step, factor in ((300, 2.0), (301, 2.0), (n - 9, 30.0)):
        losses[step] *= factor
    for step in range(n - 3, n):
        losses[step] *= 2.5
    return losses


def _stalling(n: int = 200) -> list[float]:
    """Non-finite from the first step on: nothing is ever good to roll back to."""
    return [math.nan] * n


STREAMS: dict[str, Any] = {
    "stabilizing": _stabilizing,
    "spiky": _spiky,
    "below_zero": _below_zero,
    "nonfinite": _nonfinite,
    "plateau": _plateau,
    "warmup_spike": _warmup_spike,
    "catapult": _catapult,
    "passing": _passing,
    "fast_descent": _fast_descent,
    "lowered_in_decay": _lowered_in_decay,
    "stalling": _stalling,
    "exploding_after_rollback": _exploding_after_rollback,
    "outlier_before_a_snapshot": _outlier_before_a_snapshot,
    "idle_passes": _idle_passes,
    "bad_batches_at_the_end": _bad_batches_at_the_end,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cosine-restart": {
        "decay": "cosine",
        "plateau_action": "restart",
        "plateau_patience": 0.05,
        "plateau_cooldown": 0.05,
        "min_warmup": 0.1,
        "max_warmup": 0.2,
    },
    "fixed-warmup-sqrt": {"warmup": 50, "decay": "sqrt", "spike_zscore": 3.0, "spike_ratio": 1.2},
    "no-warmup-linear": {
        "min_warmup": 0,
        "max_warmup": 0,
        "decay": "linear",
        "rollback_threshold": 2.0,
        "rollback_nonfinite": 1,
        "spike_cooldown": 25,
        "spike_recovery": 1,
    },
    "quick-wsd-to-zero": {
        "decay": "wsd",
        "min_warmup": 0.05,
        "max_warmup": 0.3,
        "stabilize_threshold": 0.05,
        "stabilize_patience": 3,
        "stabilize_window": 15,
        "wsd_decay_fraction": 0.5,
        "min_lr_ratio": 0.0,
        "restart_peak": 0.5,
        "plateau_patience": 100,
        "plateau_cooldown": 0,
        "snapshot_every": 1.0,
    },
}
RUNS = [  # (readback_every, snapshots): cycled through the cases
    (4, True),
    (1, True),
    (7, True),
    (4, False),
    (3, True),
]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], list[bool]]:
    """The loss stream of a real fit (a spike and a NaN in it), as its run directory has it."""
    import pytorch_lightning as pl

    def hook(step: int, batch_idx: int, loss: Any) -> Any:
        return loss * 30.0 if step == 70 else loss * math.nan if step == 120 else loss

    root = tmp_path_factory.mktemp("recorded")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=200,
        callbacks=[ScheduleSurgeon(min_warmup=10, max_warmup=40, snapshot_every=10)],
        logger=CSVLogger(root, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyRegressor(loss_hook=hook), make_loader())
    stream = read_stream(root)
    return stream.losses, stream.update_skipped


def _cases(recorded: tuple[list[float], list[bool]]) -> dict[str, dict[str, Any]]:
    streams = {name: make() for name, make in STREAMS.items()}
    streams["recorded"] = recorded
    cases = {}
    for index, (stream, config) in enumerate(
        (stream, config) for stream in streams for config in CONFIGS
    ):
        data = streams[stream]
        losses, skipped, passed = (
            (*data, None)[:3] if isinstance(data, tuple) else (data, None, None)
        )
        readback_every, snapshots = RUNS[index % len(RUNS)]
        cfg = SurgeonConfig(**CONFIGS[config])
        settings = RunSettings(len(losses), cfg, readback_every, snapshots)
        n = len(losses)  # every other case with checkpoints: at 0, twice at a third, near the end
        checkpoints = [0, n // 3, n // 3, n - 2] if index % 2 else []
        cases[f"{stream}/{config}"] = {
            "losses": losses,
            "update_skipped": skipped,
            "passed": passed,
            "settings": settings,
            "checkpoints": checkpoints,
            "end_read": index % 3 != 2,  # every third: a fit that raised, its end unread
        }
    return cases


@pytest.fixture(scope="module")
def both(recorded: tuple[list[float], list[bool]]) -> dict[str, tuple[Replay, dict[str, Any]]]:
    """Every case, replayed by Python and by the port (one node process for all)."""
    cases = _cases(recorded)
    requests = []
    for case in cases.values():
        settings: RunSettings = case["settings"]
        requests.append(
            {
                "kind": "replay",
                "losses": case["losses"],
                "update_skipped": case["update_skipped"],
                "passed": case["passed"],
                "checkpoints": case["checkpoints"],
                "end_read": case["end_read"],
                "steps": None,
                "settings": {
                    "total_steps": settings.total_steps,
                    "readback_every": settings.readback_every,
                    "snapshots": settings.snapshots,
                    "config": js_config(settings.config, settings.total_steps),
                },
            }
        )
    answers = run_port(requests)
    return {
        name: (
            replay(
                c["losses"],
                c["settings"],
                update_skipped=c["update_skipped"],
                passed=c["passed"],
                checkpoints=c["checkpoints"],
                end_read=c["end_read"],
            ),
            answer,
        )
        for (name, c), answer in zip(cases.items(), answers, strict=True)
    }


CASE_NAMES = [f"{s}/{c}" for s in [*STREAMS, "recorded"] for c in CONFIGS]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_the_port_makes_the_same_decisions(
    name: str, both: dict[str, tuple[Replay, dict[str, Any]]]
) -> None:
    py, js = both[name]
    assert [(e["step"], e["kind"]) for e in js["events"]] == [
        (e.step, e.kind.value) for e in py.events
    ]
    assert [(e["reason"], e["phase"]) for e in js["events"]] == [
        (e.reason, e.phase.value if e.phase else None) for e in py.events
    ]
    for mine, theirs in zip(py.events, js["events"], strict=True):
        assert theirs["scale_before"] == pytest.approx(mine.scale_before, rel=REL, abs=0)
        assert theirs["scale_after"] == pytest.approx(mine.scale_after, rel=REL, abs=0)
    assert js["lr_scales"] == pytest.approx(py.lr_scales, rel=REL, abs=0)
    assert js["smooth"] == pytest.approx(py.smooth, rel=REL, abs=0, nan_ok=True)  # unread: NaN
    assert js["phases"] == py.phases


def test_the_cases_exercise_every_decision(
    both: dict[str, tuple[Replay, dict[str, Any]]],
) -> None:
    """A parity test is only as good as what its streams make the controller do."""
    seen = {e.kind for py, _ in both.values() for e in py.events}
    callback_only = {
        EventKind.PEAK_LR,
        EventKind.REPLAN,
        EventKind.COOLDOWN,
        EventKind.STOPPED,
        EventKind.BUFFERS_RESTORED,
    }
    expected = set(EventKind) - callback_only
    assert seen == expected
    stabilized = [
        e
        for py, _ in both.values()
        for e in py.events
        if e.reason.startswith("the loss stabilized")
    ]
    assert stabilized and any(
        "warmup ramp resumed" in e.reason for py, _ in both.values() for e in py.events
    )
    exploding = [e.reason for e in both["exploding_after_rollback/defaults"][0].events]
    assert sum("a lasting level shift, not damage" in r for r in exploding) == 1
    assert any("not another level shift" in r for r in exploding)
    assert sum("still exploding, LR multiplier cut again" in r for r in exploding) >= 3
    after_outlier = both["outlier_before_a_snapshot/defaults"][0].events
    assert [e.kind for e in after_outlier if e.step == 500] == [EventKind.OUTLIER]
    (rollback,) = [e for e in after_outlier if e.kind is EventKind.ROLLBACK]
    assert "restored the snapshot of step 490" in rollback.reason
    idle = [e.reason for name, (py, _) in both.items() if "idle" in name for e in py.events]
    assert any(re.search(r"\(\d+ steps, \d+ with an update\)$", r) for r in idle), idle
    after_descent = both["fast_descent/defaults"][0].events
    assert any(e.kind is EventKind.SPIKE and 150 <= e.step <= 152 for e in after_descent)
    at_the_end = both["bad_batches_at_the_end/defaults"][0].events
    assert any(e.kind is EventKind.SPIKE and e.step == 301 for e in at_the_end)
    assert any(e.kind is EventKind.OUTLIER and e.step == 392 for e in at_the_end)
    (rollback,) = [e for e in at_the_end if e.kind is EventKind.ROLLBACK]
    assert rollback.step == 397
    assert "a spike at step 397 just before the end of the fit" in rollback.reason


def test_logged_steps_place_the_events() -> None:
    losses = _spiky()[:400]
    steps = [10 * i + 9 for i in range(400)]
    settings = RunSettings(400)
    py = replay(losses, settings, steps=steps)
    (js,) = run_port(
        [
            {
                "kind": "replay",
                "losses": losses,
                "update_skipped": None,
                "steps": steps,
                "settings": {
                    "total_steps": 400,
                    "readback_every": 4,
                    "snapshots": True,
                    "config": js_config(settings.config, 400),
                },
            }
        ]
    )
    assert [(e["step"], e["kind"]) for e in js["events"]] == [
        (e.step, e.kind.value) for e in py.events
    ]
    assert js["steps"] == steps


# ------------------------------------------------------------------- shapes and formats

STEPS = [0, 1, 2, 5, 9, 10, 11, 50, 99, 100, 101, 333, 500, 899, 900, 901, 999, 1000, 1001]
SCHEDULE_CASES: list[tuple[str, list[Any], Any]] = [
    ("constant", [0.3], schedules.constant(0.3)),
    ("linear", [0.0, 1.0, 100], schedules.linear(0.0, 1.0, 100)),
    ("cosine", [3e-4, 1000, 3e-5], schedules.cosine(3e-4, 1000, 3e-5)),
    ("decay_shape", ["sqrt", 1.0, 0.1, 900], schedules.decay_shape("sqrt", 1.0, 0.1, 900)),
    ("decay_shape", ["cosine", 0.7, 0.0, 333], schedules.decay_shape("cosine", 0.7, 0.0, 333)),
    ("warmup_cosine", [1e-3, 10, 1000, 1e-5], schedules.warmup_cosine(1e-3, 10, 1000, 1e-5)),
    ("warmup_cosine", [1e-3, 0, 1000, 0.0], schedules.warmup_cosine(1e-3, 0, 1000)),
    ("wsd", [0.1, 100, 1000, 0.25, 0.01], schedules.wsd(0.1, 100, 1000, 0.25, 0.01)),
    ("wsd", [0.1, 0, 1000, 0.1, 0.0, "sqrt"], schedules.wsd(0.1, 0, 1000, 0.1, 0.0, "sqrt")),
    ("wsd", [1.0, 5, 25, 0.1, 0.0, "cosine"], schedules.wsd(1.0, 5, 25, 0.1, 0.0, "cosine")),
]


def test_schedule_shapes_match() -> None:
    cases = [
        {"kind": "schedule", "name": n, "args": a, "steps": STEPS} for n, a, _ in SCHEDULE_CASES
    ]
    for (name, args, schedule), values in zip(SCHEDULE_CASES, run_port(cases), strict=True):
        assert values == pytest.approx([schedule(s) for s in STEPS], rel=REL, abs=0), (name, args)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {
                "shape": "cosine",
                "warmup_steps": 50,
                "total_steps": 1000,
                "peak": 3e-4,
                "floor": 0.1,
            },
            schedules.warmup_cosine(3e-4, 50, 1000, 3e-5),
        ),
        (
            {
                "shape": "wsd",
                "warmup_steps": 10,
                "total_steps": 1000,
                "peak": 1e-3,
                "floor": 0.2,
                "decay_fraction": 0.3,
            },
            schedules.wsd(1e-3, 10, 1000, 0.3, 2e-4),
        ),
        (
            {"shape": "sqrt", "warmup_steps": 0, "total_steps": 900, "peak": 1.0, "floor": 0.0},
            schedules.join(
                [schedules.linear(0.0, 1.0, 0), schedules.decay_shape("sqrt", 1.0, 0.0, 900)], [0]
            ),
        ),
    ],
)
def test_the_preview_curve_is_the_python_schedule(params: dict[str, Any], expected: Any) -> None:
    (values,) = run_port([{"kind": "preview", "params": params, "steps": STEPS}])
    assert values == pytest.approx([expected(s) for s in STEPS], rel=REL, abs=0)


def test_python_float_formatting_is_ported() -> None:
    rng = random.Random(7)
    values = [0.0, -0.0, 1.0, 0.125, 1.0625, 2.5, 0.5, 9.9996, 1e-5, 1e16, 1.5e300, 5e-324]
    values += [math.nan, math.inf, -math.inf, -3.25, 123456789.0, 0.1, 0.30000000000000004]
    values += [rng.lognormvariate(0.0, 4.0) * rng.choice((1, -1)) for _ in range(300)]
    values += [round(rng.uniform(0, 10), rng.randint(1, 5)) for _ in range(100)]  # short decimals
    specs = ["g", ".4g", ".3g", ".1g", ".1f", ".2f", ".2%", "str"]
    pairs = [(x, spec) for x in values for spec in specs]
    (answers,) = run_port([{"kind": "format", "values": [[x, s] for x, s in pairs]}])
    expected = [str(x) if spec == "str" else format(x, spec) for x, spec in pairs]
    mismatches = [
        (x, s, a, e) for (x, s), a, e in zip(pairs, answers, expected, strict=True) if a != e
    ]
    assert not mismatches
