"""A real browser (headless Chromium via Selenium) labels examples in the UI; the votes must land in the database.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/services.sh`` installs them). The driver path is
passed explicitly so selenium-manager never tries to download anything. Set ``RLFT_LABEL_SCREENSHOT=path.png`` to
keep a screenshot of the labeling page.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from rlft.label import queries, store
from rlft.label.db import open_database
from rlft.label.importing import PairRecord
from tests.conftest import require_service

from .conftest import chromium_paths

EXAMPLES = [
    PairRecord(
        [{"role": "user", "content": "Name the largest planet in the Solar System."}],
        "Jupiter is the largest planet; it is more than 300 times as massive as Earth.",
        "Saturn, because of its rings.",
        "model-x",
        "model-y",
    ),
    PairRecord(
        [{"role": "user", "content": "Write a haiku about autumn."}],
        "Red leaves drift and fall\nwhispering to the cold ground\nthe year exhales slow",
        "Autumn is a season that comes after summer.",
        "model-x",
        "model-y",
    ),
    PairRecord([{"role": "user", "content": "Is 17 prime?"}], "Yes.", "No, 17 = 3 x 6.", "model-x", "model-y"),
]


@pytest.fixture
def browser():
    chromium, driver_path = chromium_paths()
    require_service(bool(chromium and driver_path), "headless Chromium + chromedriver")
    selenium = pytest.importorskip("selenium", reason="selenium is in the 'dev' extra")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1100",
    ):
        options.add_argument(arg)
    del selenium
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(predicate, timeout: float = 30.0, what: str = "condition", on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}{on_timeout()}")


def test_label_two_examples_in_the_browser(tmp_path, serve, browser):
    from selenium.webdriver.common.by import By

    db = str(tmp_path / "labels.db")
    engine = open_database(db)
    store.import_records(engine, EXAMPLES, overlap=1)
    store.add_labeler(engine, "root", admin=True)
    token = store.add_labeler(engine, "dana")
    server = serve(db)

    browser.get(f"{server.url}/ui/")
    token_input = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#token input, #token textarea"), what="UI")[0]
    token_input.send_keys(token)
    browser.find_element(By.ID, "start").click()

    def status_text() -> str:
        return browser.find_element(By.ID, "status").text

    def shown() -> tuple[str, str, str]:
        return tuple(browser.find_element(By.ID, i).text for i in ("prompt", "response-a", "response-b"))

    _wait(lambda: "labeled 0" in status_text(), what="first example", on_timeout=lambda: f": {status_text()!r}")
    prompt1, left1, right1 = _wait(lambda: shown() if shown()[0] else None, what="prompt text")
    assert "largest planet" in prompt1 and {left1, right1} == {EXAMPLES[0].response_a, EXAMPLES[0].response_b}
    if os.environ.get("RLFT_LABEL_SCREENSHOT"):
        browser.save_screenshot(os.environ["RLFT_LABEL_SCREENSHOT"])

    # Example 1: click "A is better" with the default confidence.
    browser.find_element(By.ID, "choose-a").click()
    _wait(lambda: "labeled 1" in status_text(), what="first vote")
    prompt2, left2, right2 = _wait(lambda: shown() if shown()[0] != prompt1 else None, what="second example")
    assert "haiku" in prompt2

    # Example 2: confidence 5 and a reason, then click "B is better".
    browser.find_element(By.CSS_SELECTOR, '#confidence input[value="5"]').click()
    browser.find_element(By.CSS_SELECTOR, "#reasoning textarea").send_keys("B is not a haiku")
    browser.find_element(By.ID, "choose-b").click()
    _wait(lambda: "labeled 2" in status_text(), what="second vote")

    # Example 3 by keyboard shortcut: "t" = tie (focus must be outside the text boxes).
    browser.find_element(By.ID, "prompt").click()
    browser.switch_to.active_element.send_keys("t")
    _wait(lambda: "labeled 3" in status_text(), what="keyboard vote")
    _wait(lambda: "Nothing left" in status_text(), what="end of queue")

    votes = {v.example_id: v for v in queries.load_votes(engine)}
    assert sorted(votes) == [1, 2, 3] and {v.labeler for v in votes.values()} == {"dana"}
    first, second, third = votes[1], votes[2], votes[3]
    assert first.shown_choice == "left" and first.confidence == 3
    assert first.choice == ("a" if left1 == EXAMPLES[0].response_a else "b")
    assert second.shown_choice == "right" and second.confidence == 5
    assert second.choice == ("b" if right2 == EXAMPLES[1].response_b else "a")
    assert third.choice == "tie"
    with engine.connect() as conn:
        from sqlalchemy import select

        from rlft.label.db import Preference

        reasoning = conn.execute(select(Preference.reasoning).where(Preference.example_id == 2)).scalar_one()
    assert reasoning == "B is not a haiku"
    assert all(v.time_spent_s is not None and v.time_spent_s > 0 for v in votes.values())

    # A reload remembers the token (browser storage), on both tabs.
    browser.refresh()
    _wait(
        lambda: any(e.get_attribute("value") == token for e in browser.find_elements(By.CSS_SELECTOR, "#token input")),
        what="token restored after reload",
    )

    # The statistics tab renders the report for a valid token.
    tabs = browser.find_elements(By.XPATH, "//button[contains(., 'Statistics')]")
    [tab for tab in tabs if tab.is_displayed()][0].click()
    stats_input = _wait(
        lambda: [e for e in browser.find_elements(By.CSS_SELECTOR, "#stats-token input") if e.is_displayed()],
        what="stats tab",
    )[0]
    assert stats_input.get_attribute("value") == token
    browser.find_element(By.ID, "refresh-stats").click()
    _wait(lambda: "Fleiss" in browser.find_element(By.ID, "stats").text, what="statistics")
    assert "model-x" in browser.find_element(By.ID, "stats").text
    if os.environ.get("RLFT_LABEL_SCREENSHOT"):
        browser.save_screenshot(str(Path(os.environ["RLFT_LABEL_SCREENSHOT"]).with_suffix(".stats.png")))
    engine.dispose()
