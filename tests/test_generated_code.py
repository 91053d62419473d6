"""The committed generated/ is exactly what protoc makes from protos/ (see `make proto`)."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GENERATED = ROOT / "generated"
# Ours, not protoc's: committed by hand so that generated/ is an import root.
NOT_GENERATED = frozenset({"__init__.py", "py.typed"})


def _generated_files(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): path.read_text()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name not in NOT_GENERATED and "__pycache__" not in path.parts
    }


def _regenerate(out: Path) -> None:
    protos = sorted(path.relative_to(ROOT).as_posix() for path in PROTOS.rglob("*.proto"))
    assert protos, f"no .proto files under {PROTOS}"
    # protoc-gen-mypy, protoc-gen-mypy_grpc and protoc-gen-compensa_python are scripts next to this interpreter.
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [
        sys.executable, "-m", "grpc_tools.protoc", "--proto_path=protos",
        f"--python_out={out}", f"--grpc_python_out={out}", f"--mypy_out={out}", f"--mypy_grpc_out={out}",
        f"--compensa_python_out={out}", *protos,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"protoc failed ({result.returncode}):\n{result.stderr}"


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    _regenerate(tmp_path)
    fresh = _generated_files(tmp_path)
    committed = _generated_files(GENERATED)
    assert fresh, "protoc generated nothing"

    problems: list[str] = []
    for name in sorted(fresh.keys() - committed.keys()):
        problems.append(f"missing from generated/: {name}")
    for name in sorted(committed.keys() - fresh.keys()):
        problems.append(f"in generated/ but not generated from protos/: {name}")
    for name in sorted(fresh.keys() & committed.keys()):
        if fresh[name] != committed[name]:
            diff = difflib.unified_diff(
                committed[name].splitlines(keepends=True),
                fresh[name].splitlines(keepends=True),
                fromfile=f"generated/{name} (committed)",
                tofile=f"generated/{name} (from protos/)",
            )
            problems.append("".join(diff))
    if problems:
        pytest.fail("generated/ is stale; run `make proto` and commit:\n\n" + "\n".join(problems), pytrace=False)
