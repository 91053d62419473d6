"""The wheel a user installs holds one top-level name, `compensa`: nothing of
ours can shadow a service's own `orchestrator` or `participants` package. It
carries every module and data file of the three source roots."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = ("generated", "orchestrator", "participants")
DATA_SUFFIXES = {".py", ".pyi", ".typed", ".html", ".js", ".css", ".svg", ".mako", ".yaml"}


def test_the_wheel_installs_only_names_under_compensa(tmp_path: Path) -> None:
    # Built from a copy: setuptools leaves a build/ directory behind, and one
    # from an older layout would end up in the wheel.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for root in SOURCE_ROOTS:
        shutil.copytree(ROOT / root, source / root, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = tmp_path.glob("compensa-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"compensa"}

    expected = {
        path.relative_to(ROOT / root).as_posix()
        for root in SOURCE_ROOTS
        for path in (ROOT / root / "compensa").rglob("*")
        if path.is_file() and path.suffix in DATA_SUFFIXES and "__pycache__" not in path.parts
    }
    missing = expected - set(names)
    assert not missing, f"not in the wheel: {sorted(missing)}"
    console_scripts = zipfile.ZipFile(wheel).read(
        next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    ).decode()
    assert "compensa = compensa.orchestrator.cli:main" in console_scripts
    assert "protoc-gen-compensa_python = compensa.participants.codegen:main" in console_scripts
