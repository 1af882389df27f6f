"""Headless Chromium for the web page's tests, driven by Selenium through Debian's chromedriver.

Nothing is downloaded: the browser and its driver come from the system's packages (``.ci/run``
installs them). Without them the tests fail, naming the install command, rather than skip, so CI
cannot pass without running them.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

INSTALL = "apt-get install -y chromium chromium-driver"
T = TypeVar("T")


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), or an AssertionError saying how to install them."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert browser and driver, f"the web page tests need Chromium and its driver: {INSTALL} (.ci/run does)"
    return browser, driver


@contextmanager
def headless_chromium(width: int = 1400, height: int = 1800) -> Iterator[WebDriver]:
    browser, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-proxy-server",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(
    driver: WebDriver, condition: Callable[[WebDriver], T], timeout_s: float = 20.0, what: str = ""
) -> T:
    """``condition``'s first truthy value, polled; on timeout the assertion names ``what`` and the
    browser's console."""
    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(condition)
    except Exception as error:
        console = [entry.get("message") for entry in driver.get_log("browser")]
        raise AssertionError(f"timed out waiting for {what or condition}; console: {console}") from error
