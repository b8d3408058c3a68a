"""``benchmarks/gpu_check.py`` without a GPU: a clear skip, and its code path as a CPU dry run.

On the CPU the script's sync watch sees ``.item()``-style reads through a dispatch mode (the
stand-in for ``torch.cuda.set_sync_debug_mode``), so the dry run checks the same rules: no read
in a hook of a step without a read-back, reads allowed (and counted) in the read-back steps'
hooks. A read planted in the loss feed's per-step ``add`` must fail the run with exit code 1,
one planted in the per-block work must not.
"""

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from surgeon.loss_feed import LossFeed

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

DRY_RUN = ["--device", "cpu", "--tiny", "--rounds", "1"]
LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "surgeon")


@pytest.fixture(autouse=True)
def _restore_global_settings() -> Iterator[None]:
    """``main`` quiets the loggers and sets one torch thread: undo it for the other tests."""
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    threads = torch.get_num_threads()
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    torch.set_num_threads(threads)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")
def test_without_cuda_it_says_skip_and_exits_0() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("gpu_check: SKIP: no CUDA device")
    assert "--device cpu --tiny" in done.stdout


@pytest.mark.slow
def test_the_dry_run_passes_and_reports_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gpu.json"
    assert gpu_check.main([*DRY_RUN, "--json", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("gpu_check: PASS device='cpu' precision=bf16-mixed")
    result = json.loads(out.read_text())
    syncs = result["syncs"]
    steps = gpu_check.TINY.sync_steps
    readbacks = steps // gpu_check.READBACK_EVERY
    # every per-step hook the surgeon has, every step: watched, strictly except the exempt ones
    assert syncs["error"] is None and syncs["readback_syncs"] == 0
    assert syncs["exempt_calls"] == readbacks + 1  # + the first optimizer step's guard
    assert syncs["strict_calls"] + syncs["exempt_calls"] == 4 * steps
    assert len(result["none_steps_per_s"]) == len(result["surgeon_steps_per_s"]) == 1
    assert result["ratio"] > 0 and result["est_ratio"] <= result["ratio"]
    # the snapshot of the trained GPT: weights plus AdamW's two moments and step counters
    params = result["params"]
    assert params == gpu_check.count_params(gpu_check.TINY)
    assert 3 * params * 4 <= result["snapshot"]["mb"] * 2**20 <= 3 * params * 4 + 4096


def _plant_read(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    original = getattr(LossFeed, method)

    def reading(self: LossFeed, *args: Any) -> Any:
        torch.zeros(()).item()  # a host read, as a careless change might add
        return original(self, *args)

    monkeypatch.setattr(LossFeed, method, reading)


def test_a_host_read_in_every_step_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _plant_read(monkeypatch, "add")
    assert gpu_check.main(DRY_RUN) == 1
    out = capsys.readouterr().out
    assert "gpu_check: FAIL: host sync in on_train_batch_end at step 1" in out


@pytest.mark.slow
def test_a_host_read_in_the_read_back_steps_is_counted_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plant_read(monkeypatch, "_send_block")  # once per block: on read-back steps only
    out = tmp_path / "gpu.json"
    assert gpu_check.main([*DRY_RUN, "--json", str(out)]) == 0
    syncs = json.loads(out.read_text())["syncs"]
    assert syncs["readback_syncs"] == gpu_check.TINY.sync_steps // gpu_check.READBACK_EVERY
