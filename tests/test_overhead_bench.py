"""The overhead benchmarks on short runs, in a subprocess as CI would run them. No timing is
asserted.

* ``benchmarks/overhead.py``: what it times is the hooks each variant really has, its ratios
  are paired with the baseline, and it prints the table and the targets the README quotes.
* ``benchmarks/scaling.py``: every size gets its guard candidates and its fits, the guard is
  timed inside the hooks, and the snapshot's memory is that of the weights and momenta.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PER_STEP_HOOKS = {
    "on_train_batch_start",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
}


@pytest.mark.slow
def test_quick_run_times_the_right_hooks_and_prints_the_targets(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    variants = ["none", "empty", "lambdalr", "surgeon", "surgeon-unguarded"]
    argv = ["--quick", "--steps", "60", "--width", "16", "--variants", *variants]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "overhead.py"), *argv, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "Linear(16, 16), 60 steps/fit" in done.stdout
    assert "targets:" in done.stdout
    assert "ScheduleSurgeon: hook" in done.stdout and "fit-time ratio <= 1.05" in done.stdout

    result = json.loads(out.read_text())
    assert result["steps"] == 60 and result["width"] == 16
    rows = result["cpu"]
    assert list(rows) == variants
    assert rows["none"]["ratio"] == 1.0 and rows["none"]["step_ratio"] == 1.0
    for row in rows.values():
        assert len(row["wall_s"]) == len(row["step_us"]) == 2  # --quick: 2 rounds
        assert all(v > 0 and math.isfinite(v) for v in row["wall_s"] + row["step_us"])
    # each variant is timed in its own LR work, and only there
    assert rows["empty"]["per_hook_us_per_step"] == {}
    assert set(rows["lambdalr"]["per_hook_us_per_step"]) == {"LambdaLR.step"}
    for variant in ("surgeon", "surgeon-unguarded"):
        timed = {name.split(".")[1] for name in rows[variant]["per_hook_us_per_step"]}
        assert timed >= PER_STEP_HOOKS
        per_step = sum(
            us
            for name, us in rows[variant]["per_hook_us_per_step"].items()
            if name.split(".")[1] in PER_STEP_HOOKS
        )
        # the per-step total is the four per-step hooks, nothing else (with 2 rounds a median is
        # a mean, so the sum of the per-hook medians is the median of the per-round totals)
        assert per_step > 0
        assert math.isclose(per_step, rows[variant]["median_hook_us_per_step"], rel_tol=1e-9)


@pytest.mark.slow
def test_scaling_quick_run_measures_every_size(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "Guard candidates" in done.stdout and "Fits: ScheduleSurgeon" in done.stdout
    result = json.loads(out.read_text())
    candidates, fits = result["candidates"], result["fits"]
    assert [row["size"] for row in candidates] == [row["size"] for row in fits] == ["10K", "100K"]
    for row in candidates:
        assert set(row["us"]) == {"kernel", "foreach_norm", "sums", "loss only", "kernel / 8"}
        assert all(us > 0 and math.isfinite(us) for us in row["us"].values())
    for row in fits:
        assert row["params"] == 4 * (row["width"] ** 2 + row["width"])
        assert len(row["raw"]["plain"]) == len(row["raw"]["surgeon"]) == row["rounds"] == 2
        assert 0 < row["guard_us"] < row["hooks_us"]
        # two snapshots, each of the float32 weights and SGD's momentum buffers: nothing else
        assert row["snapshot_mb"] * 2**20 == 2 * 2 * 4 * row["params"]
        assert row["est_ratio"] > 1.0 and row["fit_ratio"] > 0
