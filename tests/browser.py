"""Shared headless-browser helper for page tests (the serving page, the report pages).

Uses Debian's ``chromium`` (``apt-get install chromium``; `.ci/run` installs it) and never downloads a
browser: Playwright for Python is launched with ``executable_path`` set to that binary. When Playwright
is not installed, :func:`render` falls back to Chromium's own ``--headless --screenshot --dump-dom``
(enough for static pages, no interaction). A test that needs a browser calls :func:`require_chromium`
(or uses the :func:`chromium_path` fixture-style helper) and is skipped with a clear message when the
binary is absent.

Typical use::

    from tests.browser import open_page, require_chromium, screenshot_variance

    def test_page(tmp_path):
        require_chromium()
        with open_page("http://127.0.0.1:8000/") as page:   # a Playwright Page
            page.wait_for_selector("#list li")
            page.screenshot(path=tmp_path / "page.png")
        assert screenshot_variance(tmp_path / "page.png") > 10.0

    def test_static_report(tmp_path):
        result = render((tmp_path / "report.html").as_uri(), tmp_path / "shot.png")
        assert "Privacy" in result.dom
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Flags a container needs: no sandbox (often running as root), no /dev/shm limits, no GPU.
CHROMIUM_ARGS = ("--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--no-default-browser-check", "--disable-extensions")
SKIP_MESSAGE = ("Debian's chromium is not installed (`apt-get install -y chromium`; .ci/run installs it): "
                "browser test skipped")


def find_chromium() -> str | None:
    """The chromium executable: ``$FEDSOCIAL_CHROMIUM`` if set, else ``chromium`` / ``chromium-browser`` on PATH."""
    override = os.environ.get("FEDSOCIAL_CHROMIUM")
    if override:
        return override if Path(override).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    """The chromium path, or skip the calling test with a message saying how to install it."""
    path = find_chromium()
    if path is None:
        pytest.skip(SKIP_MESSAGE)
    return path


def has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def open_page(url: str, *, width: int = 1280, height: int = 900, timeout_ms: int = 15000,
              bypass_csp: bool = True) -> Iterator[Any]:
    """A Playwright ``Page`` at ``url`` in headless Debian chromium; browser closed on exit.

    ``bypass_csp``: the test's own ``wait_for_function`` strings are evaluated in the page, which the service's
    Content-Security-Policy (no ``unsafe-eval``) forbids; ``tests/test_serve_http.py`` also loads the page with the
    policy enforced and checks that the page itself breaks none of it.

    Skips the test when chromium or Playwright is missing (Playwright: ``pip install playwright``;
    never ``playwright install``, which downloads another browser).
    """
    exe = require_chromium()
    if not has_playwright():
        pytest.skip("playwright for Python is not installed (pip install playwright): interactive browser test skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, bypass_csp=bypass_csp)
            page.set_default_timeout(timeout_ms)
            page.goto(url)
            yield page
        finally:
            browser.close()


@dataclass(frozen=True)
class Rendered:
    dom: str  # the DOM after scripts ran (serialised HTML)
    screenshot: Path


def render(url: str, screenshot: Path, *, width: int = 1280, height: int = 900, timeout_s: float = 60.0,
           virtual_time_ms: int = 3000) -> Rendered:
    """Load ``url`` in headless chromium, return its DOM and write a PNG screenshot (no interaction).

    Uses Playwright when installed, else two runs of Chromium's own ``--headless`` mode
    (``--dump-dom`` and ``--screenshot``), letting scripts run for ``virtual_time_ms``.
    """
    exe = require_chromium()
    screenshot = Path(screenshot)
    if has_playwright():
        with open_page(url, width=width, height=height, timeout_ms=int(timeout_s * 1000)) as page:
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(screenshot), full_page=False)
            return Rendered(page.content(), screenshot)
    with tempfile.TemporaryDirectory(prefix="fedsocial-chromium-") as profile:
        base = [exe, "--headless", *CHROMIUM_ARGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                f"--virtual-time-budget={virtual_time_ms}"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=timeout_s,
                             check=True).stdout
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=timeout_s,
                       check=True)
    if not screenshot.is_file():
        raise AssertionError(f"chromium wrote no screenshot for {url}")
    return Rendered(dom, screenshot)


def screenshot_variance(path: Path) -> float:
    """Variance of the gray levels of a screenshot (Pillow): about 0 for a blank page."""
    from PIL import Image, ImageStat

    with Image.open(path) as img:
        return float(ImageStat.Stat(img.convert("L")).var[0])
