"""The wheel users install: built from a copy of the sources, offline, with what it must hold.

``pip wheel --no-deps --no-build-isolation --no-index`` builds it with the setuptools already
installed (no download). The wheel must carry the LICENSE (PEP 639 ``license-files``),
``surgeon/py.typed`` (so type checkers use the annotations), every module of the package, the
``surgeon`` console script, and metadata naming the distribution ``schedule-surgeon`` at the
version of ``surgeon.__version__`` with its licence expression and project URLs.
"""

import email.parser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import surgeon

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "surgeon", source / "surgeon", ignore=skip)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    command += ["--no-index", "--quiet", "--wheel-dir", str(root / "dist"), str(source)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (path,) = (root / "dist").glob("*.whl")
    assert path.name == f"schedule_surgeon-{surgeon.__version__}-py3-none-any.whl"
    return zipfile.ZipFile(path)


def test_the_wheel_holds_the_license_py_typed_and_every_module(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    dist_info = f"schedule_surgeon-{surgeon.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    assert wheel.read(f"{dist_info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
    assert "surgeon/py.typed" in names
    modules = {str(p.relative_to(REPO)) for p in (REPO / "surgeon").rglob("*.py")}
    assert modules <= names
    assert not {name for name in names if "__pycache__" in name or name.startswith("tests/")}


def test_the_wheel_metadata_and_console_script(wheel: zipfile.ZipFile) -> None:
    dist_info = f"schedule_surgeon-{surgeon.__version__}.dist-info"
    entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    assert "[console_scripts]\nsurgeon = surgeon.cli:main" in entry_points
    metadata = email.parser.Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
    assert metadata["Name"] == "schedule-surgeon"
    assert metadata["Version"] == surgeon.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL"))
    home = "https://github.com/schedule-surgeon/schedule-surgeon"
    assert urls["Homepage"] == home and all(url.startswith(home) for url in urls.values())
    assert "Typing :: Typed" in metadata.get_all("Classifier")
