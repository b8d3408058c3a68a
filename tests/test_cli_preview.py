"""Tests for ``surgeon preview``: the table, the PNG, usage errors, ``python -m surgeon``."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from surgeon.cli import main
from surgeon.config import SurgeonConfig
from surgeon.schedules import (
    SCHEDULES,
    WSD_DECAY_FRACTION,
    cosine,
    exponential,
    warmup_cosine,
    wsd,
)

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s*(.*)$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table(stdout: str) -> dict[int, tuple[float, str]]:
    """step -> (lr, labels) from the rows printed by ``surgeon preview``."""
    rows = {}
    for line in stdout.splitlines():
        match = ROW.match(line)
        if match:
            rows[int(match[1])] = (float(match[2]), match[3])
    return rows


def assert_rows_match(rows: dict[int, tuple[float, str]], schedule: object) -> None:
    assert rows
    for step, (lr, _) in rows.items():
        # The table prints 7 significant digits.
        assert lr == pytest.approx(schedule(step), rel=1e-6, abs=1e-15), step  # type: ignore[operator]


class TestTable:
    def test_warmup_cosine_rows_and_labels(self, capsys: pytest.CaptureFixture[str]) -> None:
        argv = ["preview", "warmup_cosine", "--lr", "0.01", "--warmup-steps", "10"]
        code = main([*argv, "--total_steps", "100", "--min-lr", "1e-4"])
        out = capsys.readouterr().out
        assert code == 0
        rows = table(out)
        assert_rows_match(rows, warmup_cosine(0.01, 10, 100, 1e-4))
        assert "start" in rows[0][1]
        assert "end of warmup" in rows[10][1]
        assert "middle" in rows[50][1]
        assert "end" in rows[100][1]
        assert len(rows) >= 8  # plus evenly spaced points
        assert out.splitlines()[0].startswith("warmup_cosine(lr=0.01, warmup_steps=10")

    def test_lr_defaults_to_1e_3(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["preview", "cosine", "--total-steps", "40"]) == 0
        assert_rows_match(table(capsys.readouterr().out), cosine(1e-3, 40))

    def test_steps_sets_the_horizon_without_total_steps(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code = main(["preview", "exponential", "--gamma", "0.95", "--steps", "30", "--points", "3"])
        assert code == 0
        rows = table(capsys.readouterr().out)
        assert sorted(rows) == [0, 10, 15, 20, 30]
        assert_rows_match(rows, exponential(1e-3, 0.95))

    def test_literal_option(self, capsys: pytest.CaptureFixture[str]) -> None:
        argv = ["preview", "wsd", "--warmup_steps", "5", "--total-steps", "50"]
        assert main([*argv, "--decay-shape", "sqrt", "--decay_fraction", "0.4"]) == 0
        schedule = wsd(1e-3, 5, 50, decay_fraction=0.4, decay_shape="sqrt")
        assert_rows_match(table(capsys.readouterr().out), schedule)

    def test_wsd_decays_over_the_callbacks_share_by_default(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``preview wsd`` and ``schedules.wsd`` decay over WSD's usual last 20% of the run;
        the surgeon's own default tail is half the steps after warmup (its default shape)."""
        argv = ["preview", "wsd", "--lr", "1", "--warmup-steps", "0", "--total-steps", "100"]
        assert main([*argv, "--points", "10"]) == 0
        rows = table(capsys.readouterr().out)
        assert [rows[step][0] for step in (70, 80, 90, 100)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
        assert WSD_DECAY_FRACTION == 0.2 and SurgeonConfig().wsd_decay_fraction == 0.5
        assert inspect.signature(wsd).parameters["decay_fraction"].default == WSD_DECAY_FRACTION

    def test_the_schedule_page_starts_from_the_surgeons_default_shape(self, tmp_path: Path) -> None:
        """``preview --html`` without a schedule opens on ScheduleSurgeon()'s shape: a floor of
        0 and the wsd tail over ``wsd_decay_fraction`` of the steps after warmup (it opened on
        a floor of 0.1 and WSD's usual 20% of the run)."""
        import json

        page = tmp_path / "preview.html"
        assert main(["preview", "--html", str(page)]) == 0
        data = re.search(r'id="surgeon-data"[^>]*>(.*?)</script>', page.read_text(), re.S)
        assert data is not None
        start = json.loads(data.group(1))["start"]
        defaults = SurgeonConfig()
        assert start["shape"] == defaults.decay and start["floor"] == defaults.min_lr_ratio
        after_warmup = start["total_steps"] - start["warmup_steps"]
        assert start["decay_fraction"] * start["total_steps"] == pytest.approx(
            defaults.wsd_decay_fraction * after_warmup
        )

    @pytest.mark.parametrize("name", sorted(SCHEDULES))
    def test_every_schedule_has_a_subcommand(
        self, name: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["preview", name, "--help"]) == 0
        assert f"surgeon preview {name}" in capsys.readouterr().out


class TestPlot:
    def test_png_written(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        pytest.importorskip("matplotlib")
        out = tmp_path / "curve.png"
        argv = ["preview", "one_cycle", "--lr", "0.1", "--total-steps", "200", "--out", str(out)]
        assert main(argv) == 0
        assert out.exists()
        data = out.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 5_000
        assert f"wrote {out}" in capsys.readouterr().out

    def test_the_file_name_picks_the_format(self, tmp_path: Path) -> None:
        """``--out curve.svg`` is an SVG (it was PNG bytes under any name); a name without a
        format matplotlib knows stays a PNG."""
        pytest.importorskip("matplotlib")
        for name, starts in (("curve.svg", b"<?xml"), ("curve.pdf", b"%PDF"), ("curve", PNG_MAGIC)):
            assert (
                main(["preview", "cosine", "--total-steps", "100", "--out", str(tmp_path / name)])
                == 0
            )
            assert (tmp_path / name).read_bytes().startswith(starts), name

    def test_missing_matplotlib(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        for module in [m for m in sys.modules if m.split(".")[0] == "matplotlib"]:
            monkeypatch.delitem(sys.modules, module)
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
        out = tmp_path / "curve.png"
        assert main(["preview", "cosine", "--total-steps", "10", "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert "schedule-surgeon[plot]" in captured.err
        assert captured.err.startswith("surgeon preview: error:")
        assert captured.out == ""
        assert not out.exists()

    def test_unwritable_path(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A folder that does not exist yet is made (as for every file the CLI writes: it was
        an error here alone); one that cannot be, under a file, is a usage error."""
        pytest.importorskip("matplotlib")
        out = tmp_path / "missing-dir" / "curve.png"
        assert main(["preview", "cosine", "--total-steps", "10", "--out", str(out)]) == 0
        assert out.read_bytes().startswith(PNG_MAGIC)
        (tmp_path / "a-file").write_text("")
        out = tmp_path / "a-file" / "curve.png"
        assert main(["preview", "cosine", "--total-steps", "10", "--out", str(out)]) == 2
        assert "cannot write" in capsys.readouterr().err


class TestErrors:
    @pytest.mark.parametrize(
        ("argv", "named"),
        [
            (["nope"], "nope"),
            (["cosine", "--total-steps", "10", "--bogus", "1"], "--bogus"),
            (["cosine", "--total-steps", "10", "--total", "3"], "--total"),
            (["cosine"], "--total-steps"),
            (["cosine", "--total-steps", "ten"], "--total-steps"),
            (["cosine", "--total-steps", "10", "--min-lr", "-1"], "min_lr"),
            (["warmup_cosine", "--warmup-steps", "200", "--total-steps", "100"], "warmup_steps"),
            (["wsd", "--warmup-steps", "1", "--total-steps", "9", "--decay-shape", "exp"], "exp"),
            (["one_cycle", "--total-steps", "10", "--pct-start", "nan"], "pct_start"),
            (["cosine", "--total-steps", "10", "--steps", "-5"], "--steps"),
        ],
    )
    def test_usage_error_exit_2(
        self, argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["preview", *argv]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("surgeon preview: error: ")
        assert named in captured.err
        assert "Traceback" not in captured.err
        assert captured.out == ""

    def test_factory_message_is_passed_through(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["preview", "warmup_cosine", "--warmup-steps", "200", "--total-steps", "100"])
        expected = "warmup_steps must be <= total_steps, got warmup_steps=200, total_steps=100"
        assert expected in capsys.readouterr().err

    def test_no_subcommand(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main([]) == 2
        assert capsys.readouterr().err.startswith("surgeon: error:")


def test_python_dash_m_surgeon() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [
        sys.executable,
        "-m",
        "surgeon",
        "preview",
        "cosine",
        "--lr",
        "0.5",
        "--total-steps",
        "8",
    ]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert_rows_match(table(done.stdout), cosine(0.5, 8))
