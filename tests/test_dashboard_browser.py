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
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dashboard_rig import TOKENS, DashboardRig, dashboard_rig
from harness import REPO

from compensa.v1 import saga_pb2

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
