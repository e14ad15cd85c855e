"""Headless Chromium for the page's tests, screenshots and timings: Debian's
``chromium`` and ``chromedriver`` driven by Selenium (a test extra), never a download."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def available() -> bool:
    return Path(CHROMIUM).exists() and Path(DRIVER).exists()


def chromium(width: int = 1400, height: int = 1000) -> Any:
    """A headless Chromium that keeps the page's console log."""
    if not available():
        raise RuntimeError("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}",
              "--allow-file-access-from-files"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def open_view(driver: Any, url: str, timeout: float = 30.0) -> dict[str, Any]:
    """Load ``url`` and wait until the page has drawn its view; returns what the page
    measured: ``ms`` (drawing the view) and ``at`` (from navigation to drawn)."""
    driver.get("about:blank")
    driver.get(url)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done = driver.execute_script("return window.ponderRendered || null")
        if done:
            return done
        time.sleep(0.02)
    raise TimeoutError(f"{url} never finished drawing")


@contextlib.contextmanager
def served(db: str | Path, timeout: float = 20.0) -> Iterator[str]:
    """``ponder view --db DB`` on a free loopback port, for as long as the block runs;
    yields its URL once it answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ponder.cli", "view", "--db", str(db), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        end = time.monotonic() + timeout
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"ponder view did not start: {proc.stdout.read() if proc.stdout else ''}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
