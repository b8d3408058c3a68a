"""The interactive pages: one self-contained HTML file each, no server, no network.

``surgeon preview --html`` writes a schedule explorer (sliders for the warmup, the planned
length, peak and floor, the decay shape; a marker that reads the LR at a step);
``surgeon replay --html`` writes a logged loss stream with the replayed LR and events, and
sliders for the main settings that re-run the decisions in the browser.

The browser runs a JavaScript port of the controller that lives beside this file, one file
per Python module with the same names (:data:`PORT_MODULES`: ``schedules.js`` ports
``surgeon/schedules.py``, ``detectors/spike.js`` ``surgeon/detectors/spike.py``, ...), each
adding its names to one ``globalThis.surgeon`` object, so the same files run in a page and
under ``node`` (``tests/test_web_port.py`` checks them against Python on recorded streams).
``page.js`` draws the page (inline SVG). The page is ``page.html`` with the scripts and the
data inlined.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict
from importlib import resources
from typing import Any

from surgeon.config import Steps, SurgeonConfig, resolve_steps

__all__ = ["PAGE_MODULES", "PORT_MODULES", "js_config", "js_value", "page", "source"]

PORT_MODULES: tuple[str, ...] = (
    "format.js",
    "config.js",
    "schedules.js",
    "detectors/__init__.js",
    "detectors/plateau.js",
    "detectors/spike.js",
    "detectors/stabilization.js",
    "controller.js",
    "replay.js",
)
"""The port's files in load order (each uses the names of those before it)."""
PAGE_MODULES: tuple[str, ...] = (*PORT_MODULES, "page.js")
"""What a page inlines."""

_STEPS_FIELDS = tuple(
    name for name, hint in typing.get_type_hints(SurgeonConfig).items() if hint == Steps
)


def source(name: str) -> str:
    """The text of one file of this folder (a name of :data:`PAGE_MODULES`, or ``page.html``)."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def js_config(config: SurgeonConfig, total_steps: int) -> dict[str, Any]:
    """``config`` as the port takes it: every length resolved to steps for ``total_steps``
    (a JavaScript number cannot tell the fraction ``1.0`` from the step count ``1``)."""
    data = asdict(config)
    for name in _STEPS_FIELDS:
        data[name] = resolve_steps(name, data[name], total_steps)
    return data


def js_value(value: Any) -> Any:
    """``value`` with every non-finite float as the string ``Number()`` reads back
    (``"NaN"``, ``"Infinity"``, ``"-Infinity"``): JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: js_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [js_value(item) for item in value]
    return value


def page(title: str, data: dict[str, Any]) -> str:
    """The page: ``page.html`` with the scripts of :data:`PAGE_MODULES` and ``data`` (what
    ``page.js`` draws: ``{"mode": "preview" | "replay", ...}``) inlined."""
    data_json = json.dumps(js_value(data), allow_nan=False, separators=(",", ":"))
    scripts = "\n".join(f"// ---- {name}\n{source(name)}" for name in PAGE_MODULES)
    html = source("page.html")
    for key, text in (
        ("TITLE", _escape_html(title)),
        ("DATA", data_json.replace("</", "<\\/")),  # no "</script>" inside the script
        ("SCRIPTS", scripts.replace("</", "<\\/")),
    ):
        html = html.replace(f"/*{key}*/", text)
    return html


def _escape_html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
