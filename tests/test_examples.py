"""The example scripts, run as a user runs them (``python examples/x.py``), shortened.

Each runs in a subprocess with the repository on ``PYTHONPATH`` (so an uninstalled checkout
works) and one CPU thread; each checks what the run printed and what it left in its log
directory (``metrics.csv``, ``events.jsonl``), not just the exit code. About 10 s each, most
of it importing torch and Lightning, hence ``slow``.
"""

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CONFIGS = REPO / "configs"

pytestmark = pytest.mark.slow


def run_example(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python examples/<script> args...`` in ``cwd``; fails the test on a non-zero exit."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, f"{script} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def log_dir_of(stdout: str) -> Path:
    """The run directory the script reported."""
    match = re.search(r"metrics\.csv and events\.jsonl in (\S+);", stdout)
    assert match, f"no run directory in the output:\n{stdout[-2000:]}"
    return Path(match[1])


def events(log_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (log_dir / "events.jsonl").read_text().splitlines()]


def metric_rows(log_dir: Path) -> list[dict[str, str]]:
    with (log_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]


def printed_events(stdout: str) -> list[tuple[int, str]]:
    """(step, kind) of the event table the scripts print at the end."""
    table = stdout.split("ScheduleSurgeon events (", 1)[1]
    return [(int(s), k) for s, k in re.findall(r"^  step +(\d+)  (\w+)", table, re.MULTILINE)]


def test_circle_learns_and_reports_the_injected_spike(tmp_path: Path) -> None:
    result = run_example(
        "circle.py", "--steps", "200", "--spike-at", "120", "--out", str(tmp_path), cwd=tmp_path
    )
    accuracy = float(re.search(r"validation accuracy after 200 steps: ([\d.]+)", result.stdout)[1])
    assert accuracy > 0.9  # the majority class alone is ~0.71
    log_dir = log_dir_of(result.stdout)
    records = events(log_dir)
    assert printed_events(result.stdout) == [(r["step"], r["kind"]) for r in records]
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "warmup_end"
    spike = kinds.index("spike")
    assert (
        records[spike]["step"] == 121 and records[spike]["lr_after"] < records[spike]["lr_before"]
    )
    assert "recovered" in kinds[spike:]
    lrs = column(metric_rows(log_dir), "lr-SGD")
    assert max(lr for _, lr in lrs) <= 0.1 and lrs[-1][1] < 0.1  # peak = the optimizer's LR


def test_char_gpt_trains_samples_and_reports_the_spike(tmp_path: Path) -> None:
    result = run_example(
        "char_gpt.py",
        *("--steps", "40", "--spike-at", "30", "--batch-size", "16", "--sample", "30"),
        *("--out", str(tmp_path)),
        cwd=tmp_path,
    )
    loss = float(re.search(r"validation loss after 40 steps: ([\d.]+) nats/char", result.stdout)[1])
    assert loss < math.log(60)  # below a uniform guess over any plausible vocabulary (~100)
    sample = result.stdout.split("sample:\n", 1)[1]
    assert sample.startswith("def ")
    assert len(sample.split("\n\nScheduleSurgeon events")[0]) == 4 + 30
    records = events(log_dir_of(result.stdout))
    assert any(r["kind"] == "spike" and r["step"] == 31 for r in records)  # 31 confirms 30
    assert printed_events(result.stdout) == [(r["step"], r["kind"]) for r in records]


def test_finetune_keeps_the_group_ratio_and_freezes_the_backbone_first(tmp_path: Path) -> None:
    steps, freeze = 120, 40
    result = run_example(
        "finetune.py",
        *("--steps", str(steps), "--freeze-steps", str(freeze), "--out", str(tmp_path)),
        cwd=tmp_path,
    )
    assert f"backbone frozen for steps 0-{freeze - 1}, trained from step {freeze}" in result.stdout
    log_dir = log_dir_of(result.stdout)
    assert printed_events(result.stdout) == [(r["step"], r["kind"]) for r in events(log_dir)]
    rows = metric_rows(log_dir)

    # every logged step: head LR = 10 x backbone LR, while frozen and after
    head = dict(column(rows, "lr-AdamW/head"))
    backbone = dict(column(rows, "lr-AdamW/backbone"))
    assert head.keys() == backbone.keys() and len(head) >= steps // 5
    assert min(head) < freeze <= max(head)
    for step in head:
        assert head[step] / backbone[step] == pytest.approx(10.0, rel=1e-12), step
    assert len(set(head.values())) > 5  # the surgeon moved the LRs (warmup, decay)

    # the backbone does not move while frozen, and does after
    frozen = dict(column(rows, "backbone_frozen"))
    shift = dict(column(rows, "backbone_shift"))
    assert {s for s, f in frozen.items() if f == 1.0} and {s for s, f in frozen.items() if f == 0}
    assert all(shift[s] == 0.0 for s, f in frozen.items() if f == 1.0)
    assert shift[max(shift)] > 0.0


def test_cli_runs_a_config_with_a_preset_layered_over_it(tmp_path: Path) -> None:
    result = run_example(
        "cli.py",
        "fit",
        *("--config", str(CONFIGS / "circle.yaml")),
        *("--config", str(CONFIGS / "presets" / "vision_from_scratch.yaml")),
        *("--trainer.max_steps=40", f"--trainer.logger.init_args.save_dir={tmp_path}"),
        "--trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )
    log_dir = log_dir_of(result.stdout)
    assert log_dir == tmp_path / "circle" / "version_0"
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    (callback,) = saved["trainer"]["callbacks"]
    assert callback["class_path"] == "surgeon.ScheduleSurgeon"
    assert {k: callback["init_args"][k] for k in ("min_warmup", "max_warmup", "min_lr_ratio")} == {
        "min_warmup": 0.02,
        "max_warmup": 0.05,
        "min_lr_ratio": 0.0,
    }
    records = events(log_dir)
    assert records and records[0]["kind"] == "warmup_end"
    assert printed_events(result.stdout) == [(r["step"], r["kind"]) for r in records]
    assert column(metric_rows(log_dir), "lr-SGD")[-1][0] >= 35


def test_plain_loop_learns_recovers_and_leaves_run_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_example(
        "plain_loop.py",
        *("--steps", "400", "--spike-at", "200", "--nan-at", "300", "--out", str(out)),
        cwd=tmp_path,
    )
    accuracy = float(re.search(r"validation accuracy after 400 steps: ([\d.]+)", result.stdout)[1])
    assert accuracy > 0.9
    kinds = [(e["step"], e["kind"]) for e in events(out)]
    assert (201, "spike") in kinds and (201, "rollback") in kinds  # 201 confirms 200
    assert (300, "nonfinite") in kinds and (300, "skipped_step") in kinds
    assert "surgeon: step 201: rollback:" in result.stdout  # decisions are printed
    assert (out / "losses.csv").read_text().count("\n") == 401  # header + every step


def test_the_demo_shows_an_outlier_left_alone_and_a_spike_rolled_back(tmp_path: Path) -> None:
    """``make demo``'s run (README: the main job): the one bad loss reading at step 250 is an
    ``outlier`` and nothing else; the two bad batches at 400-401 are a spike, rolled back, the
    LR cut and recovered; warmup ends, the decay starts, the plan finishes."""
    from surgeon.controller import EventKind
    from surgeon.demo import run_demo

    surgeon, run_dir = run_demo(tmp_path / "demo")
    kinds = [(e.step, e.kind) for e in surgeon.events]
    assert (251, EventKind.OUTLIER) in kinds
    assert not [
        k
        for s, k in kinds
        if 250 <= s < 400 and k is not EventKind.OUTLIER and k is not EventKind.DECAY_START
    ]
    assert (401, EventKind.SPIKE) in kinds and (401, EventKind.ROLLBACK) in kinds
    assert any(k is EventKind.RECOVERED and s > 401 for s, k in kinds)
    assert [k for _, k in kinds][-1] is EventKind.DONE
    assert (run_dir / "events.jsonl").exists()
