"""The interactive pages in a real headless browser (Debian's Chromium, driven by Selenium).

``surgeon replay --html``: the page loads from a ``file://`` URL with no network, re-runs the
decisions in the browser (the same events as the Python replay printed), and when a
detector's slider moves the events, the LR curve and the drawn SVG change; a screenshot of
it is a real picture. ``surgeon preview --html``: moving the warmup slider changes the curve
to the Python schedule of the new settings, and the marker reads the LR at its step.

The browser is found at ``chromium`` / ``chromedriver`` (``make browser``, a dependency of
``make test``, installs them with apt-get where it can); the tests skip where they are not.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from surgeon import schedules
from surgeon.cli import main
from surgeon.config import SurgeonConfig
from surgeon.controller import EventKind
from surgeon.replay import RunSettings, replay

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM_FLAGS = (  # headless, and nothing that reaches for the network
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
)
N = 400
SPIKE_AT = 250
DECIDED_AT = SPIKE_AT + 1
"""The loss after the spike confirms it: the decision is made on it."""


def spiky_csv(path: Path) -> list[float]:
    """A plain ``step,loss`` CSV: a falling loss with a 3x spike of two steps (a confirmed
    spike, not a rollback)."""
    losses = [1.0 / (1 + i / 80) + 0.3 + 0.01 * ((i * 7) % 5) for i in range(N)]
    losses[SPIKE_AT] *= 3.0
    losses[DECIDED_AT] *= 3.0
    path.write_text("step,loss\n" + "".join(f"{i},{x!r}\n" for i, x in enumerate(losses)))
    return losses


def test_a_page_is_one_file_that_loads_nothing(tmp_path: Path) -> None:
    """No server, no network, no CDN: the only URL in the page is the SVG namespace."""
    spiky_csv(tmp_path / "losses.txt")
    for argv in (
        ["preview", "--html", str(tmp_path / "preview.html")],
        ["replay", str(tmp_path / "losses.txt"), "--html", str(tmp_path / "replay.html")],
    ):
        assert main(argv) == 0
        html = Path(argv[argv.index("--html") + 1]).read_text()
        assert set(re.findall(r"https?://[^\s\"'<>`]+", html)) <= {"http://www.w3.org/2000/svg"}
        assert not re.search(r"<(script|img|iframe)[^>]*\ssrc=|<link\b|@import|url\(", html)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "no chromium/chromedriver on PATH: `make browser` installs Debian's chromium and "
            "chromium-driver (apt-get, as root)"
        )
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed: pip install -e '.[dev]'"
    )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def press(browser: Any, element_id: str, key: str, times: int = 1) -> None:
    """Move a slider as a person would with the keyboard (focus, then keys)."""
    element = browser.find_element("id", element_id)
    for _ in range(times):  # send_keys focuses the slider (a click would move it)
        element.send_keys(key)


def page_state(browser: Any) -> dict[str, Any]:
    return browser.execute_script(
        "const p = window.surgeonPage; return {error: p.error, events: p.events.map("
        "e => [e.step, e.kind, e.reason]), lr: p.lr_scales, "
        "drawn: document.getElementById('lr-curve').getAttribute('points'), "
        "rows: document.querySelectorAll('#event-table tbody tr').length};"
    )


def assert_a_picture(path: Path) -> None:
    """A real screenshot: a PNG of the window's size whose pixels are not all alike."""
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 30_000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 500 and pixels.shape[1] > 1000
    assert pixels[..., :3].std() > 0.05


@pytest.mark.slow
def test_the_replay_page_reruns_the_decisions_when_a_slider_moves(
    browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.keys import Keys

    losses = spiky_csv(tmp_path / "losses.txt")
    page = tmp_path / "replay.html"
    assert main(["replay", str(tmp_path / "losses.txt"), "--html", str(page)]) == 0
    browser.get(page.as_uri())
    before = page_state(browser)
    assert before["error"] is None
    python = replay(losses, RunSettings(N))
    assert before["events"] == [[e.step, e.kind.value, e.reason] for e in python.events]
    assert [DECIDED_AT, EventKind.SPIKE.value] in [e[:2] for e in before["events"]]
    assert before["lr"] == pytest.approx(python.lr_scales, rel=1e-12, abs=0)
    assert before["rows"] == len(python.events)

    press(browser, "spike_ratio", Keys.END)  # 5x the mean: a 3x loss is no spike any more
    after = page_state(browser)
    assert browser.find_element("id", "spike_ratio-value").text == "5"
    assert after["error"] is None
    assert [DECIDED_AT, EventKind.SPIKE.value] not in [e[:2] for e in after["events"]]
    assert after["lr"] != before["lr"] and after["drawn"] != before["drawn"]
    assert after["rows"] == len(after["events"]) < before["rows"]
    # the spike's LR cut is gone from the curve: the plan's LR right after the spike was read,
    # as Python's replay with the same setting has it
    read_at = (DECIDED_AT // 4 + 2) * 4
    python = replay(losses, RunSettings(N, SurgeonConfig(spike_ratio=5.0)))
    assert after["lr"] == pytest.approx(python.lr_scales, rel=1e-12, abs=0)
    assert before["lr"][read_at] < after["lr"][read_at]

    shot = tmp_path / "replay-page.png"
    assert browser.save_screenshot(str(shot))
    assert_a_picture(shot)


def assert_curve(curve: list[list[float]], schedule: Any) -> None:
    """The page's ``[step, lr]`` points are the Python schedule's, over the whole run."""
    steps = [step for step, _ in curve]
    assert steps[0] == 0 and steps[-1] == 1000 and len(steps) > 500
    assert [lr for _, lr in curve] == pytest.approx([schedule(s) for s in steps], rel=1e-12)


@pytest.mark.slow
def test_the_preview_page_follows_its_sliders(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    page = tmp_path / "preview.html"
    argv = ["preview", "--html", str(page), "wsd", "--lr", "0.01", "--warmup-steps", "100"]
    assert main([*argv, "--total-steps", "1000", "--decay-fraction", "0.3"]) == 0
    browser.get(page.as_uri())
    assert_curve(
        browser.execute_script("return window.surgeonPage.curve"),
        schedules.wsd(0.01, 100, 1000, 0.3),
    )

    press(browser, "warmup_steps", Keys.ARROW_RIGHT, times=20)  # 100 -> 120 steps
    state = browser.execute_script("return window.surgeonPage")
    assert state["state"]["warmup_steps"] == 120
    expected = schedules.wsd(0.01, 120, 1000, 0.3)
    assert_curve(state["curve"], expected)
    drawn = browser.find_element("id", "lr-curve").get_attribute("points")

    press(browser, "marker", Keys.END)  # read the LR at the last step, then 10 steps before
    press(browser, "marker", Keys.ARROW_LEFT, times=10)
    marker = browser.execute_script("return window.surgeonPage.marker")
    assert marker == {"step": 990, "lr": pytest.approx(expected(990), rel=1e-12)}
    assert "step 990: LR" in browser.find_element("id", "readout").text
    assert browser.find_element("id", "lr-curve").get_attribute("points") == drawn

    shot = tmp_path / "preview-page.png"
    assert browser.save_screenshot(str(shot))
    assert_a_picture(shot)


@pytest.mark.slow
def test_the_replay_page_compares_with_the_run_up_to_its_first_outside_decision(
    browser: Any, tmp_path: Path
) -> None:
    """A run directory whose log has a ``replan`` (a resume for another length) after the
    decisions the losses made, and a checkpoint among them: the page replays with the
    checkpoint and says its events are the run's up to the replan, as ``surgeon replay`` does."""
    import json

    losses = spiky_csv(tmp_path / "plain.txt")
    settings = RunSettings(N)
    python = replay(losses, settings, checkpoints=[DECIDED_AT + 1])  # right after the spike
    assert python.events != replay(losses, settings).events  # the checkpoint matters here
    run = tmp_path / "run"
    run.mkdir()
    (run / "losses.csv").write_text(
        "step,loss,update_skipped\n" + "".join(f"{i},{x!r},0\n" for i, x in enumerate(losses))
    )
    (run / "settings.json").write_text(json.dumps(settings.to_json()))
    (run / "checkpoints.csv").write_text(f"step\n{DECIDED_AT + 1}\n")
    replan_at = DECIDED_AT + 60
    logged = [e.to_dict() for e in python.events if e.step < replan_at]
    logged.append({"step": replan_at, "kind": "replan", "reason": "resumed for 800 steps"})
    (run / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
    page = tmp_path / "run.html"
    assert main(["replay", str(run), "--html", str(page)]) == 0
    browser.get(page.as_uri())
    state = page_state(browser)
    assert state["error"] is None
    assert state["events"] == [[e.step, e.kind.value, e.reason] for e in python.events]
    summary = browser.find_element("id", "summary").text
    assert summary.endswith(f"(the same as the run logged up to its replan at step {replan_at})")


@pytest.mark.slow
@pytest.mark.parametrize("stream", ["long", "negative"])
def test_the_replay_page_draws_long_runs_and_losses_that_are_not_positive(
    browser: Any, tmp_path: Path, stream: str
) -> None:
    """70,000 steps (the axis range was taken by spreading every value as an argument: a
    stack overflow past ~65,000 left the page blank) and a loss below zero (an NLL: the loss
    panel's log axis had no value to span, also a blank page): drawn, on a linear axis for the
    second, with every event in the table."""
    n = 70_000 if stream == "long" else N
    losses = [1.0 / (1 + i / (n / 5)) + 0.3 + 0.01 * ((i * 7) % 5) for i in range(n)]
    losses[n // 2] *= 3.0
    losses[n // 2 + 1] *= 3.0
    if stream == "negative":  # an NLL rising from -0.95 to about 0: a tick at 0
        losses = [-0.95 + 0.002325 * i for i in range(n)]
    csv_path = tmp_path / "losses.txt"
    csv_path.write_text("step,loss\n" + "".join(f"{i},{x!r}\n" for i, x in enumerate(losses)))
    page = tmp_path / "replay.html"
    assert main(["replay", str(csv_path), "--html", str(page)]) == 0
    browser.get(page.as_uri())
    state = page_state(browser)
    python = replay(losses, RunSettings(n))
    assert state["error"] is None and state["drawn"]
    assert state["rows"] == len(python.events) > 0
    assert state["events"] == [[e.step, e.kind.value, e.reason] for e in python.events]
    drawn = browser.find_element("id", "loss-curve").get_attribute("points")
    assert drawn and "NaN" not in drawn
    labels = browser.execute_script(
        "return [...document.querySelectorAll('svg text')].map(t => t.textContent);"
    )
    assert not [label for label in labels if re.search(r"\de-\d", label)], labels  # -5.55e-17
    if stream == "negative":
        assert "0" in labels
