"""The shared headless-browser helper (tests/browser.py) against a real Debian chromium."""

from __future__ import annotations

from pathlib import Path

from tests.browser import open_page, render, require_chromium, screenshot_variance

PAGE = """<!doctype html><html><body style="margin:0;background:#fff">
<h1 id="title">static</h1><div style="width:600px;height:300px;background:#1a4f8b"></div>
<script>document.getElementById('title').textContent = 'rendered by script';</script></body></html>"""


def test_render_runs_scripts_and_screenshot_has_content(tmp_path: Path) -> None:
    # Prepare
    require_chromium()
    page = tmp_path / "page.html"
    page.write_text(PAGE, encoding="utf-8")
    blank = tmp_path / "blank.html"
    blank.write_text("<!doctype html><html><body style='background:#fff'></body></html>", encoding="utf-8")
    # Execute
    shot = render(page.as_uri(), tmp_path / "page.png")
    empty = render(blank.as_uri(), tmp_path / "blank.png")
    # Assert
    assert "rendered by script" in shot.dom
    assert screenshot_variance(shot.screenshot) > 100.0
    assert screenshot_variance(empty.screenshot) < 1.0


def test_open_page_interacts(tmp_path: Path) -> None:
    # Prepare
    page_file = tmp_path / "click.html"
    page_file.write_text("<button id='b' onclick=\"this.textContent='clicked'\">press</button>", encoding="utf-8")
    # Execute
    with open_page(page_file.as_uri()) as page:
        page.click("#b")
        text = page.text_content("#b")
    # Assert
    assert text == "clicked"
