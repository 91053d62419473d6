"""The dashboard in a real browser: headless Chromium driven through
chromedriver (selenium) against an orchestrator on PostgreSQL.

Signs in with a token, sees a saga's row change state live without a reload,
opens a saga page, resolves a saga as an operator and is refused as a reader.
Screenshots go to tests/artifacts/dashboard/ (ignored by git); their paths are
printed. Needs the Debian packages chromium and chromium-driver: under CI=true
a missing browser fails the test (.ci/run installs them); elsewhere it skips
with a loud message.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dashboard_rig import TOKENS, DashboardRig, bearer, dashboard_rig
from harness import REPO, checkout_input

from compensa.orchestrator.store import AuditFinding, AuditProgress
from compensa.v1 import orchestrator_pb2, saga_pb2

S = saga_pb2
ARTIFACTS = REPO / "tests" / "artifacts" / "dashboard"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1000",
)
#: How long the browser may take to show what the test waits for.
WAIT_SECONDS = 20


def _browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    message = (
        "!!! Chromium or chromedriver is missing: the dashboard's browser test did NOT run. "
        "Install them with: apt-get install -y chromium chromium-driver !!!"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)  # tests/conftest.py repeats it as a banner at the end


class Browser:
    """A headless Chromium; every call runs in a thread, so the orchestrator
    serving the pages keeps running in the test's event loop meanwhile."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.shots: list[Path] = []

    async def run(self, action: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(action, *args)

    async def open(self, url: str) -> None:
        await self.run(self.driver.get, url)

    async def wait_for(self, script: str, timeout: float = WAIT_SECONDS) -> Any:
        """Polls a JavaScript expression until it is truthy (WebDriverWait), and returns it."""
        from selenium.webdriver.support.ui import WebDriverWait

        def wait() -> Any:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
                lambda driver: driver.execute_script(f"return ({script});"),
                message=f"the page never satisfied: {script}",
            )

        return await self.run(wait)

    async def script(self, script: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, script, *args)

    async def fill_and_submit(self, field_selector: str, text: str, button_selector: str) -> None:
        from selenium.webdriver.common.by import By

        def act() -> None:
            field = self.driver.find_element(By.CSS_SELECTOR, field_selector)
            field.clear()
            field.send_keys(text)
            self.driver.find_element(By.CSS_SELECTOR, button_selector).click()

        await self.run(act)

    async def click(self, selector: str) -> None:
        from selenium.webdriver.common.by import By

        await self.run(lambda: self.driver.find_element(By.CSS_SELECTOR, selector).click())

    async def screenshot(self, name: str) -> Path:
        def shoot() -> Path:
            height = self.driver.execute_script("return document.body.scrollHeight")
            self.driver.set_window_size(1400, max(900, min(int(height) + 40, 4000)))
            path = ARTIFACTS / f"{name}.png"
            assert self.driver.save_screenshot(str(path)), path
            return path

        path: Path = await self.run(shoot)
        self.shots.append(path)
        print(f"screenshot: {path}")
        return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    chromium, driver_path = _browser_binaries()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield Browser(driver)
    finally:
        driver.quit()


async def _sign_in(browser: Browser, rig: DashboardRig, who: str) -> None:
    await browser.open(rig.url + "/")
    await browser.wait_for("document.querySelector('input[name=token]')")
    await browser.fill_and_submit("input[name=token]", TOKENS[who], "form.login button")
    await browser.wait_for("document.getElementById('sagas')")


def _row_state(saga_id: str) -> str:
    return (
        f"(document.querySelector('tr[data-saga-id=\"{saga_id}\"] [data-field=state]') || {{}}).textContent"
    )


async def test_the_dashboard_in_chromium_live_list_saga_page_and_actions_by_role(
    browser: Browser, tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url) as rig:
        await rig.failed_for_a_person("needs-a-person-1")
        await _sign_in(browser, rig, "operator")
        await browser.wait_for("document.getElementById('live-status').textContent === 'live'")
        # Set on this page only: still there later means the page was never reloaded.
        await browser.script("window.compensaNoReload = 'same page';")

        rig.participant.script("execute", "reserve", ("sleep", 1.5))
        await rig.begin("live-order-1")
        assert await browser.wait_for(f"{_row_state('live-order-1')} === 'running'")
        await browser.screenshot("1-list-running")
        assert await browser.wait_for(f"{_row_state('live-order-1')} === 'succeeded'")
        assert await browser.script("return window.compensaNoReload;") == "same page"
        # The counts follow a moment later.
        assert await browser.wait_for("document.getElementById('total-succeeded').textContent.trim() === '1'")
        await browser.screenshot("2-list-updated-live")

        await browser.click("tr[data-saga-id='needs-a-person-1'] a")
        await browser.wait_for("document.getElementById('resolve-form')")
        assert await browser.script("return document.querySelectorAll('.gantt .box').length;") >= 4
        await browser.screenshot("3-saga-page-failed")
        await browser.fill_and_submit("#resolve-note", "released the stock by hand", "#resolve-button")
        await browser.wait_for("document.getElementById('done')")
        assert "released the stock by hand" in await browser.script("return document.body.innerText;")
        await browser.screenshot("4-saga-resolved-by-operator")
        resolved = await rig.saga("needs-a-person-1")
        assert resolved.resolution_note == "released the stock by hand"
        actors = [e.actor for e in await rig.events("needs-a-person-1") if e.type == S.EVENT_TYPE_OPERATOR_RESOLVED]
        assert actors == ["token:alice"]

        # Signed out, then in as a reader: the same form is refused.
        await browser.open(rig.url + "/")
        await browser.click("form[action='/logout'] button")
        await browser.wait_for("document.querySelector('input[name=token]')")
        await rig.failed_for_a_person("needs-a-person-2")
        await _sign_in(browser, rig, "reader")
        await browser.open(rig.url + "/sagas/needs-a-person-2")
        await browser.wait_for("document.getElementById('resolve-form')")
        await browser.fill_and_submit("#resolve-note", "I am only a reader", "#resolve-button")
        message = await browser.wait_for("(document.getElementById('message') || {}).textContent")
        assert message == "ResolveSaga needs role operator; token viewer (role reader) lacks it"
        await browser.screenshot("5-resolve-refused-to-a-reader")
        assert (await rig.saga("needs-a-person-2")).resolution_note == ""
    assert all(path.stat().st_size > 10_000 for path in browser.shots)


WAITS = """\
name: waits
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - {name: reserve, participant: scripted, execute_timeout: 10s, compensate_timeout: 1s}
  - {name: approve, participant: scripted, long_running: true, step_timeout: 1h, execute_timeout: 10s,
     compensate_timeout: 1s}
"""
TICK = re.compile(r"^(\d+) (ms|s|min|h|d)$")
#: Steps between ticks: 1, 2 or 5 times a power of ten, or what clocks count in.
ROUND_STEPS = {1, 2, 5, 10, 15, 20, 30, 50, 100, 200, 500}


def _round_ticks(labels: list[str]) -> bool:
    """0 first, then equal steps of one round size, all in one unit."""
    parsed = [TICK.match(label) for label in labels]
    if len(labels) < 2 or not all(parsed):
        return False
    values = [int(match.group(1)) for match in parsed if match]
    steps = {later - earlier for earlier, later in itertools.pairwise(values)}
    return values[0] == 0 and len({match.group(2) for match in parsed if match}) == 1 and (
        len(steps) == 1 and steps <= ROUND_STEPS
    )


async def test_the_timeline_of_a_saga_cancelled_while_a_step_waited_ends_when_the_saga_did(
    browser: Browser, tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    (tmp_path / "waits.yaml").write_text(WAITS)
    async with dashboard_rig(
        tmp_path, make_postgres_url, definition_paths=(tmp_path / "board.yaml", tmp_path / "waits.yaml")
    ) as rig:
        rig.participant.script("execute", "approve", "pending")
        await rig.stub.StartSaga(
            orchestrator_pb2.StartSagaRequest(saga_id="waited-1", definition_name="waits", input=checkout_input()),
            metadata=bearer("starter"),
        )
        await rig.until("waited-1", lambda saga: saga.steps[1].state == S.STEP_STATE_WAITING)
        await rig.stub.CancelSaga(
            orchestrator_pb2.CancelSagaRequest(saga_id="waited-1", reason="nobody approves"),
            metadata=bearer("operator"),
        )
        ended = await rig.final("waited-1")
        assert ended.state == S.SAGA_STATE_COMPENSATED
        await _sign_in(browser, rig, "operator")
        await browser.open(rig.url + "/sagas/waited-1")
        await browser.wait_for("document.querySelectorAll('.gantt .box').length >= 4")
        boxes = await browser.script("""
            const track = document.querySelector('.lane-track').getBoundingClientRect();
            return [...document.querySelectorAll('.lane')].map(lane => ({
                step: lane.querySelector('.lane-name').textContent.trim(),
                boxes: [...lane.querySelectorAll('.box')].map(box => {
                    const r = box.getBoundingClientRect();
                    return {phase: box.classList.contains('compensate') ? 'compensate' : 'execute',
                            left: r.left - track.left, right: r.right - track.left, width: r.width};
                }),
            }));
        """)
        ticks = await browser.script(
            "return [...document.querySelectorAll('.gantt .axis span')].map(s => s.textContent.trim());"
        )
        await browser.screenshot("6-saga-cancelled-while-waiting")
        lanes = {lane["step"]: lane["boxes"] for lane in boxes}
        approve_execute = [box for box in lanes["approve"] if box["phase"] == "execute"]
        approve_compensate = [box for box in lanes["approve"] if box["phase"] == "compensate"]
        assert len(approve_execute) == 1 and len(approve_compensate) == 1, lanes
        # The waiting attempt ended when the saga stopped going forward, before its compensation.
        assert approve_execute[0]["right"] <= approve_compensate[0]["left"] + 1, lanes
        # Compensations last milliseconds in a chart of seconds: still boxes one can see and point at.
        compensations = [box for lane in lanes.values() for box in lane if box["phase"] == "compensate"]
        assert len(compensations) == 2 and all(box["width"] >= 16 for box in compensations), lanes
        assert _round_ticks(ticks), ticks


async def test_the_audit_page_from_the_menu_shows_a_discrepancy_and_the_watermarks(
    browser: Browser, tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url) as rig:
        await rig.begin("audited-1")
        done = await rig.final("audited-1")
        # What an audit run records (test_dashboard.py runs a real one): a clean
        # prefix for the participant, and a discrepancy with its alert.
        store = rig.orchestrator.engine.store
        created = done.create_time.ToNanoseconds() / 1e9
        await store.save_audit_progress(AuditProgress("scripted", (created, "audited-1"), created + 5))
        await store.record_audit_findings(
            [
                AuditFinding(
                    participant="scripted", saga_id="audited-1", step_name="charge", kind="ANSWER_DIFFERS",
                    message="ANSWER_DIFFERS: saga audited-1 step 'charge' at scripted: its Execute answered otherwise"
                    "; the log says: SUCCEEDED (sha256:0011223344556677); the participant says: Execute row"
                    " succeeded (sha256:8899aabbccddeeff)",
                )
            ],
            created + 5,
        )
        await _sign_in(browser, rig, "reader")
        await browser.click("nav a[href='/audit']")
        await browser.wait_for("document.querySelector('#audit-discrepancies tr[data-kind=ANSWER_DIFFERS]')")
        cells = await browser.script(
            "return [...document.querySelectorAll('#audit-discrepancies tbody td')].map(td => td.innerText.trim());"
        )
        assert "SUCCEEDED (sha256:0011223344556677)" in cells
        assert "Execute row succeeded (sha256:8899aabbccddeeff)" in cells
        assert "its Execute answered otherwise" in cells
        clean = await browser.script(
            "return document.querySelector('tr[data-participant=scripted] a[href^=\"/sagas/\"]').textContent;"
        )
        assert clean == "audited-1"
        await browser.screenshot("7-audit-discrepancies")
        await browser.click("#audit-discrepancies a[href='/sagas/audited-1']")
        await browser.wait_for("document.querySelector('.gantt')")
    assert all(path.stat().st_size > 10_000 for path in browser.shots)
