"""The README and the changelog say what the code does: every knob of ``ScheduleSurgeon`` in the
README's table with its real default, the install line with the real distribution name, a
changelog entry for the current version."""

import ast
import inspect
import re
from pathlib import Path

import tomllib

import surgeon
from surgeon.callback import ScheduleSurgeon

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    """The README text under ``## title`` up to the next ``## ``."""
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_every_keyword_of_schedule_surgeon_is_in_the_readme_table_with_its_default() -> None:
    rows = re.findall(r"^\| `(\w+)` \| `([^`]+)` \| (.+) \|$", section("Every knob"), re.M)
    params = [p for p in inspect.signature(ScheduleSurgeon.__init__).parameters.values()]
    params = [p for p in params if p.name != "self"]
    assert [name for name, _, _ in rows] == [p.name for p in params]
    for (name, default, meaning), param in zip(rows, params, strict=True):
        assert ast.literal_eval(default) == param.default, name
        assert type(ast.literal_eval(default)) is type(param.default), name
        assert len(meaning) > 20, name


def test_the_install_line_names_the_distribution() -> None:
    name = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"]
    assert name == "schedule-surgeon"
    install = section("Install")
    assert f'pip install "{name}[plot]"' in install
    assert "imported as **`surgeon`**" in install


def test_the_changelog_has_the_current_version_and_an_unreleased_section() -> None:
    changelog = (REPO / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", changelog, re.M)
    assert headings[0] == "Unreleased"
    assert surgeon.__version__ in headings


def test_every_test_the_readme_names_exists() -> None:
    """The README backs its guarantees with named tests: each name must be a test function (or
    class) somewhere in tests/, so a renamed or deleted test cannot leave a claim unbacked."""
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"\b(test_[a-z0-9_]+|Test[A-Z][A-Za-z]+)\b", readme))
    sources = "\n".join(p.read_text() for p in (REPO / "tests").glob("*.py"))
    defined = set(re.findall(r"^\s*(?:def|class) ((?:test_|Test)\w*)", sources, re.MULTILINE))
    files = {p.stem for p in (REPO / "tests").glob("test_*.py")}
    assert named - defined - files == set()
    assert len(named & defined) >= 20  # the Guarantees section alone names more


def test_every_test_the_readme_places_in_a_file_is_in_that_file() -> None:
    """``tests/FILE.py::NAME`` names a test of that file; in *Guarantees*, a bare name is one of
    ``tests/test_faults.py``, as the section says (an audit found three named tests living
    elsewhere)."""
    readme = (REPO / "README.md").read_text()

    def defined_in(stem: str) -> set[str]:
        source = (REPO / "tests" / f"{stem}.py").read_text()
        return set(re.findall(r"^\s*(?:def|class) ((?:test_|Test)\w*)", source, re.MULTILINE))

    placed = re.findall(r"tests/(test_\w+)\.py::(?:Test\w+::)?(test_\w+|Test\w+)", readme)
    assert len(placed) >= 20
    assert [(f, n) for f, n in placed if n not in defined_in(f)] == []
    guarantees = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    without_files = re.sub(r"tests/test_\w+\.py::(?:Test\w+::)?\w+", "", guarantees)
    bare = set(re.findall(r"`(test_[a-z0-9_]+)(?:\[[^\]]*\])?`", without_files))
    assert len(bare) >= 10
    assert sorted(bare - defined_in("test_faults")) == []
