"""The wheel a user installs holds one top-level name, `compensa`: nothing of
ours can shadow a service's own `orchestrator` or `participants` package. It
carries every module and data file of the three source roots, and the .proto
files a participant's contract imports, so that protoc compiles a contract
with nothing but the installed wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = ("generated", "orchestrator", "participants")
DATA_SUFFIXES = {".py", ".pyi", ".typed", ".html", ".js", ".css", ".svg", ".mako", ".yaml"}
#: The contract protos, at the place in the wheel `compensa codegen --include-path` names.
CONTRACT_PROTOS = {
    f"compensa/protos/{path.relative_to(ROOT / 'protos').as_posix()}"
    for path in (ROOT / "protos" / "compensa" / "v1").glob("*.proto")
}
COMMAND_TIMEOUT_SECONDS = 300

#: A participant's contract, in its own directory, importing compensa's and a well-known type.
HOTEL_CONTRACT = """
syntax = "proto3";
package hotel.v1;

import "compensa/v1/contract.proto";
import "google/protobuf/timestamp.proto";

message StayInput { string guest = 1; google.protobuf.Timestamp check_in = 2; }
message Booking { string booking_id = 1; }

service HotelParticipant {
  rpc BookRoom(StayInput) returns (Booking) {
    option (compensa.v1.step) = {kind: STEP_KIND_COMPENSABLE};
  }
}
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """compensa's wheel, built from a copy of the source: setuptools leaves a
    build/ directory behind, and one from an older layout would end up in it."""
    built_in = tmp_path_factory.mktemp("wheel")
    source = built_in / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for root in (*SOURCE_ROOTS, "protos"):
        shutil.copytree(ROOT / root, source / root, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(built_in)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = built_in.glob("compensa-*.whl")
    return found


def test_the_wheel_installs_only_names_under_compensa(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"compensa"}

    expected = {
        path.relative_to(ROOT / root).as_posix()
        for root in SOURCE_ROOTS
        for path in (ROOT / root / "compensa").rglob("*")
        if path.is_file() and path.suffix in DATA_SUFFIXES and "__pycache__" not in path.parts
    }
    assert "compensa/protos/compensa/v1/contract.proto" in CONTRACT_PROTOS
    missing = (expected | CONTRACT_PROTOS) - set(names)
    assert not missing, f"not in the wheel: {sorted(missing)}"
    console_scripts = (
        zipfile.ZipFile(wheel)
        .read(next(name for name in names if name.endswith(".dist-info/entry_points.txt")))
        .decode()
    )
    assert "compensa = compensa.orchestrator.cli:main" in console_scripts
    assert "protoc-gen-compensa_python = compensa.participants.codegen:main" in console_scripts


def _installed(wheel: Path, prefix: Path) -> Path:
    """A new virtualenv at `prefix` holding the wheel (scripts included) and,
    through a .pth file, the libraries of this test's own environment, whose
    compensa (an editable install, found by a .pth hook of its site-packages
    that this one does not run) stays out. Its bin directory."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    python = prefix / "bin" / "python"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site_packages, "libraries-of-the-tests.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return prefix / "bin"


def test_raw_protoc_compiles_a_contract_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    bin_dir = _installed(wheel, tmp_path / "venv")
    python = str(bin_dir / "python")
    project = tmp_path / "project"
    (project / "out").mkdir(parents=True)
    (project / "hotel.proto").write_text(HOTEL_CONTRACT)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)

    def run(*command: str) -> str:
        ran = subprocess.run(
            command, cwd=project, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS
        )
        assert ran.returncode == 0, f"{' '.join(command)}:\n{ran.stdout}{ran.stderr}"
        return ran.stdout

    include = Path(run(str(bin_dir / "compensa"), "codegen", "--include-path").strip())
    assert include.is_relative_to(tmp_path / "venv"), f"not the wheel's: {include}"
    assert (include / "compensa" / "v1" / "contract.proto").is_file()
    # What a participant's developer types (README, "Generated code"); the
    # plugin is the wheel's script, found on PATH.
    run(
        python,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        f"-I{include}",
        "--python_out=out",
        "--compensa_python_out=out",
        "hotel.proto",
    )
    assert (project / "out" / "hotel_compensa.py").is_file()
    imported = run(
        python,
        "-c",
        "import sys; sys.path.insert(0, 'out'); import compensa.v1, hotel_compensa;"
        " print(compensa.v1.__file__); print(*hotel_compensa.HotelParticipantBase.steps)",
    )
    module_file, steps = imported.splitlines()
    assert Path(module_file).is_relative_to(tmp_path / "venv"), f"compensa came from elsewhere: {module_file}"
    assert steps == "book_room"
