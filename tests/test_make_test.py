"""`make test` on a fresh machine installs what its tests need beyond Python
(Chromium and chromedriver for the dashboard's browser test, Node.js and npm
for the Node.js participant's) or says in one
line what to install; .ci/run leaves that to it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")

pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def _bare_path(tmp_path: Path) -> Path:
    """A PATH directory with `id` and nothing else: no chromium, no chromedriver, no apt-get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "id").symlink_to(shutil.which("id") or "/usr/bin/id")
    return bin_dir


def _make_browser(tmp_path: Path, bin_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    assert MAKE is not None
    return subprocess.run(
        [MAKE, "-s", "-C", str(REPO), "browser", f"APT_GET={env.pop('APT_GET', 'no-such-apt-get')}"],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path), **env}, capture_output=True, text=True, timeout=60,
    )


def test_the_test_target_installs_the_browser_first() -> None:
    assert MAKE is not None
    planned = subprocess.run([MAKE, "-n", "-C", str(REPO), "test"], capture_output=True, text=True, timeout=60)
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.index("chromium") < planned.stdout.index("pytest"), planned.stdout
    assert "apt-get" not in (REPO / ".ci" / "run").read_text()
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_without_chromium_and_a_way_to_install_it_ci_stops_with_one_line(tmp_path: Path) -> None:
    result = _make_browser(tmp_path, _bare_path(tmp_path), CI="true")
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == (
        "make test needs chromium and chromedriver (Debian/Ubuntu, as root: apt-get install chromium chromium-driver)"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="the install runs as root only")
def test_as_root_it_installs_chromium_and_chromedriver_with_apt_get(tmp_path: Path) -> None:
    bin_dir = _bare_path(tmp_path)
    calls = tmp_path / "apt-get-calls"
    fake = bin_dir / "fake-apt-get"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    result = _make_browser(tmp_path, bin_dir, CI="true", APT_GET="fake-apt-get")
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == [
        "update -q", "install -y -q --no-install-recommends chromium chromium-driver",
    ]


def test_without_node_and_a_way_to_install_it_ci_stops_with_one_line(tmp_path: Path) -> None:
    assert MAKE is not None
    result = subprocess.run(
        [MAKE, "-s", "-C", str(REPO), "node", "APT_GET=no-such-apt-get", f"NODE_TEST_MODULES={tmp_path / 'modules'}"],
        env={"PATH": str(_bare_path(tmp_path)), "HOME": str(tmp_path), "CI": "true"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == (
        "make test needs node and npm (Debian/Ubuntu, as root: apt-get install nodejs npm)"
    )
    planned = subprocess.run([MAKE, "-n", "-C", str(REPO), "test"], capture_output=True, text=True, timeout=60)
    assert planned.stdout.index("npm install") < planned.stdout.index("pytest"), planned.stdout
