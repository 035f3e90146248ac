"""Open a page in a real headless browser: Debian's chromium driven by Selenium through
Debian's chromium-driver (same version by construction; nothing downloaded). `make venv`
installs both with apt; without them the calling test is skipped, saying so."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from environment import missing

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def open_page(path: Path, timeout: float = 60) -> dict:
    """{"title", "images": [(alt, complete, naturalWidth)], "errors": console entries of level SEVERE}."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        missing("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))
    try:
        browser.set_page_load_timeout(timeout)
        browser.get(Path(path).resolve().as_uri())
        deadline = time.monotonic() + timeout
        script = "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
        while True:  # data: URLs decode asynchronously; wait until every image has settled
            images = browser.execute_script(script)
            if all(done for _, done, _ in images) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return {
            "title": browser.title,
            "images": [tuple(i) for i in images],
            "errors": [e for e in browser.get_log("browser") if e["level"] == "SEVERE"],
        }
    finally:
        browser.quit()
