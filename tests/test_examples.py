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


def test_the_demo_shows_an_outlier_left_alone_and_a_spike_rolled_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``make demo``'s run (``surgeon demo``, 600 steps; README: the main job), in this process:
    it prints the events ``warmup_end``; an ``outlier`` for the one bad loss reading at step 250
    (confirmed at 251), nothing else, no LR change; a ``spike`` for the two bad batches at
    400-401, rolled back, the LR cut, then ``recovered`` back onto the plan; ``decay_start``
    and ``done``, as in ``events.jsonl``; and it writes ``surgeon.png`` in the run directory
    (with the ``plot`` extra, matplotlib; without it the command says so and exits 2)."""
    import importlib.util

    from surgeon.cli import main

    plotting = importlib.util.find_spec("matplotlib") is not None
    out_dir = tmp_path / "demo"
    assert main(["demo", "--out", str(out_dir)]) == (0 if plotting else 2)
    stdout = capsys.readouterr().out
    records = events(out_dir)
    assert printed_events(stdout) == [(r["step"], r["kind"]) for r in records]
    assert f"metrics and events.jsonl in {out_dir}" in stdout
    kinds = [(r["step"], r["kind"]) for r in records]
    assert kinds[0][1] == "warmup_end" and kinds[0][0] < 250
    assert kinds[-1] == (599, "done")
    decay_start = next(step for step, kind in kinds if kind == "decay_start")
    assert kinds[0][0] < decay_start < 599

    # the outlier: an event and nothing else (no LR change, no rollback) until the spike
    outlier = records[kinds.index((251, "outlier"))]
    assert outlier["lr_after"] == outlier["lr_before"] and "no action" in outlier["reason"]
    assert [kind for step, kind in kinds if 250 <= step < 400] == (
        ["outlier", "decay_start"] if 250 <= decay_start < 400 else ["outlier"]
    )

    # the spike: confirmed at 401, rolled back, the LR cut; recovered after it
    spike = records[kinds.index((401, "spike"))]
    assert (401, "rollback") in kinds and spike["lr_after"] < spike["lr_before"]
    recovered = next(r for r in records if r["kind"] == "recovered" and r["step"] > 401)
    assert [kind for step, kind in kinds if 401 <= step <= recovered["step"]] == [
        "spike",
        "rollback",
        "recovered",
    ]
    # the LRs the run logged (every 5 steps): on the linear decay's line before the spike,
    # half of it from the cut's first step until the ramp back, on it again after the ramp
    lrs = dict(column(metric_rows(out_dir), "lr-AdamW"))
    s0, s1 = [s for s in lrs if decay_start < s <= 401][-2:]
    slope = (lrs[s1] - lrs[s0]) / (s1 - s0)

    def plan(step: int) -> float:
        return lrs[s1] + slope * (step - s1)

    cut_from = int(re.search(r"cut x0\.5 to 0\.5 from step (\d+)", spike["reason"])[1])
    ramp = re.search(r"back to 1 over (\d+) steps from step (\d+)", recovered["reason"])
    ramp_end = int(ramp[2]) + int(ramp[1])
    cut = [s for s in lrs if cut_from <= s < int(ramp[2])]
    assert len(cut) >= 2 and all(lrs[s] == pytest.approx(plan(s) / 2, rel=1e-6) for s in cut)
    after = [s for s in lrs if ramp_end <= s < 595]
    assert len(after) > 20 and all(lrs[s] == pytest.approx(plan(s), rel=1e-6) for s in after)

    png = out_dir / "surgeon.png"
    if plotting:
        assert f"wrote {png}" in stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists()
