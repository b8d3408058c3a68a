"""The ``surgeon`` command line starts light: ``--help``, ``--version`` and usage errors import
neither torch, Lightning nor matplotlib (what made ``surgeon plot`` take 7 s to say anything).

Each command runs as users run it, ``python -m surgeon ...``, under ``-X importtime``, whose
report on stderr lists every module imported. The time itself is measured by
``benchmarks/cli_startup.py`` (target: under 1 s), not asserted here.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import surgeon

HEAVY = {"torch", "pytorch_lightning", "lightning", "lightning_fabric", "matplotlib"}


def run_cli(*argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``python -X importtime -m surgeon argv``: the result and the top-level packages imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "surgeon", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return result, imported


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--help"], 0),
        (["--version"], 0),
        (["plot", "--help"], 0),
        (["preview", "--help"], 0),
        (["preview", "cosine", "--lr", "fast"], 2),
        (["plot"], 2),
        (["nope"], 2),
    ],
)
def test_help_version_and_usage_errors_import_no_heavy_package(argv: list[str], code: int) -> None:
    result, imported = run_cli(*argv)
    assert result.returncode == code, result.stderr[-2000:]
    assert "surgeon" in imported  # the report did list the imports
    assert not imported & HEAVY


def test_plot_of_a_directory_without_a_surgeon_run_says_so_without_heavy_imports(
    tmp_path: Path,
) -> None:
    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss\n0,0,1.0\n")
    for run_dir in (tmp_path, tmp_path / "missing"):
        result, imported = run_cli("plot", str(run_dir))
        assert result.returncode == 2
        assert result.stderr.splitlines()[-1].startswith(f"surgeon plot: error: {run_dir}")
        assert not imported & HEAVY


def test_version_is_the_installed_distributions() -> None:
    result, _ = run_cli("--version")
    assert result.stdout == f"surgeon {surgeon.__version__}\n"
    assert surgeon.__version__ == importlib.metadata.version("schedule-surgeon")
