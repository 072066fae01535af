"""`fedsocial serve` as a real process on a free loopback port, driven over HTTP and in headless chromium."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.browser import open_page, require_chromium, screenshot_variance
from tests.serving_run import ROOT, make_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(base: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method="POST" if data is not None else "GET",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    run_dir = make_run(tmp_path_factory.mktemp("serve") / "run")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(run_dir / "serve.log", "w")  # noqa: SIM115 (closed below, after the process)
    proc = subprocess.Popen([sys.executable, "-m", "fedsocial.simulations.serve", str(run_dir), "--partner",
                             "partner-0", "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {(run_dir / 'serve.log').read_text()}")
            try:
                if call(base, "/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not come up in 120 s")
            time.sleep(0.3)
        yield base, run_dir
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def first_user(base: str) -> Any:
    return call(base, "/users?limit=1")[1]["users"][0]


def test_ten_items_then_purchases_change_the_list_and_are_excluded(server: tuple[str, Path]) -> None:
    # Prepare
    base, run_dir = server
    user = first_user(base)
    status, first = call(base, f"/users/{user}/recommendations?k=10")
    bought = [x["item"] for x in first["items"][:3]]
    # Execute
    post = call(base, "/events", [{"user": user, "item": i, "type": "purchase"} for i in bought])
    status2, second = call(base, f"/users/{user}/recommendations?k=10")
    # Assert
    assert status == 200 and len(first["items"]) == 10 and first["user"] == user
    assert all({"item", "score", "probability", "explanation"} <= set(x) for x in first["items"])
    assert first["calibration"]["method"] == "platt"  # a non-private run: fitted on validation data (auto)
    assert post == (200, {"accepted": 3, "created_users": 0, "durable": True})
    after = [x["item"] for x in second["items"]]
    assert status2 == 200 and len(after) == 10 and after != [x["item"] for x in first["items"]]
    assert not set(bought) & set(after)
    lines = (run_dir / "partners" / "partner-0" / "events.jsonl").read_text().splitlines()
    assert [json.loads(x)["item"] for x in lines[-3:]] == bought  # appended durably for the next round


def test_unknown_user_with_friends_gets_a_list(server: tuple[str, Path]) -> None:
    # Prepare
    base, _ = server
    friend = first_user(base)
    # Execute
    status, created = call(base, "/events", {"user": "newcomer-1", "neighbour": friend, "type": "follow"})
    code, answer = call(base, "/users/newcomer-1/recommendations?k=10")
    # Assert
    assert status == 200 and created["created_users"] == 1
    assert code == 200 and len(answer["items"]) == 10
    assert answer["items"][0]["explanation"]["friends"][0]["user"] == friend  # served from the friend


@pytest.mark.parametrize(("path", "body", "raw", "code", "words"), [
    ("/events", None, b"{not json", 400, "JSON"),
    ("/events", {"user": 1, "item": 1, "type": "like"}, None, 422, "type"),
    ("/events", {"user": 1, "type": "purchase"}, None, 422, "item"),
    ("/events", {"user": 1, "item": 10**9, "type": "purchase"}, None, 422, "unknown item"),
    ("/events", {"user": 1, "neighbour": "ghost", "type": "follow"}, None, 422, "neighbour"),
    ("/events", [], None, 422, "list"),
    ("/users/1/recommendations?k=0", None, None, 422, "k"),
    ("/users/1/recommendations?k=ten", None, None, 422, "k"),
    ("/users/1/recommendations?category=nonsense", None, None, 422, "no category 'nonsense' in this catalogue"),
    ("/users/nobody-at-all/recommendations", None, None, 404, "unknown user"),
    ("/no/such/route", None, None, 404, "Not Found"),
    # regression: these were 500s (RecursionError in the JSON parser, ValueError from int() of an id)
    ("/events", None, b"[" * 100_000, 400, "nested too deeply"),
    ("/events", None, b'{"a":' * 50_000, 400, "nested too deeply"),
    ("/users/--5/recommendations", None, None, 404, "unknown user"),
    ("/users/%C2%B2/recommendations", None, None, 404, "unknown user"),
    ("/users/" + "1" * 5000 + "/recommendations", None, None, 404, "unknown user"),
    ("/events", {"user": "--5", "item": 10**9, "type": "view"}, None, 422, "unknown item"),
    # regression: a body of any size was read into memory whole before any check
    ("/events", None, b" " * (9 << 20), 413, "larger than"),
])
def test_malformed_requests_get_a_clear_4xx(server: tuple[str, Path], path: str, body: Any, raw: bytes | None,
                                            code: int, words: str) -> None:
    # Execute
    status, doc = call(server[0], path, body, raw)
    # Assert
    assert status == code and words in doc["detail"]


def test_health_says_what_privacy_let_serving_use(server: tuple[str, Path]) -> None:
    # Execute
    status, doc = call(server[0], "/health")
    # Assert: the served run is non-private, so exact counts rank cold users and Platt is fitted on validation
    assert status == 200 and doc["status"] == "ok" and doc["partner"] == "partner-0"
    assert (doc["privacy_scope"], doc["cold_start"], doc["ranking"]) == ("none", "training_counts", "model")
    assert doc["calibration"]["method"] == "platt" and "reason" not in doc["calibration"]
    assert doc["categories"] and all(isinstance(c, str) for c in doc["categories"])  # what ?category= takes


def test_openapi_schema_lists_the_contract(server: tuple[str, Path]) -> None:
    # Execute
    status, schema = call(server[0], "/openapi.json")
    # Assert
    assert status == 200
    assert {"/health", "/users/{user}/recommendations", "/events", "/social", "/users/{user}"} <= set(schema["paths"])
    assert "post" in schema["paths"]["/events"]


def test_page_shows_the_list_an_event_changes_it_and_social_view(server: tuple[str, Path], tmp_path: Path) -> None:
    # Prepare
    require_chromium()
    base, _ = server
    user = first_user(base)
    # Execute
    with open_page(f"{base}/?user={user}") as page:
        page.wait_for_function("document.querySelectorAll('#list li').length === 10")
        meta = page.inner_text("#meta")
        before = page.eval_on_selector_all("#list li", "els => els.map(e => e.dataset.item)")
        page.fill("#etarget", before[0])
        page.select_option("#etype", "purchase")
        page.click("#post")
        page.wait_for_function(f"document.querySelector('#list li').dataset.item !== '{before[0]}'")
        after = page.eval_on_selector_all("#list li", "els => els.map(e => e.dataset.item)")
        page.screenshot(path=str(tmp_path / "list.png"))
        offered = page.eval_on_selector_all("#categories option", "els => els.map(e => e.value)")
        page.fill("#category", offered[-1])  # a category the page offers (GET /health's categories)
        page.evaluate("document.querySelector('#status').textContent = ''")  # wait for this list, not the last
        page.click("#show")
        page.wait_for_function("document.querySelector('#list-title').textContent.includes('ms)') && "
                               "document.querySelector('#status').textContent.endsWith('items')")
        in_category = page.eval_on_selector_all("#list li", "els => els.map(e => e.dataset.item)")
        page.fill("#category", "")
        page.click("#tab-social")
        page.wait_for_selector("#communities tbody tr")
        communities = page.eval_on_selector_all("#communities tbody tr", "els => els.length")
        page.screenshot(path=str(tmp_path / "social.png"))
    # Assert
    assert len(after) == 10 and before[0] not in after
    _, health = call(base, "/health")
    _, listed = call(base, f"/users/{user}/recommendations?k=10&category={offered[-1]}")
    assert offered == health["categories"] and in_category == [str(x["item"]) for x in listed["items"]] != after
    assert communities >= 1
    # the operator sees what privacy let serving use (a non-private run: exact counts, Platt on validation)
    assert "privacy scope: none (a non-private run)" in meta and "cold users ranked by: exact training counts" in meta
    assert "probabilities: platt" in meta
    assert screenshot_variance(tmp_path / "list.png") > 50.0
    assert screenshot_variance(tmp_path / "social.png") > 50.0


def _request(base: str, path: str, method: str = "GET", data: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_cross_site_posts_foreign_hosts_and_cdn_pages_are_refused(server: tuple[str, Path]) -> None:
    # Regression (adversarial review): a page on another origin created users and events with a text/plain POST
    # (no CORS preflight), a foreign Host header was answered (DNS rebinding), /docs and /redoc loaded a CDN
    base, run_dir = server
    user = first_user(base)
    event = json.dumps({"user": "csrf-victim", "item": 0, "type": "purchase"}).encode()
    events = run_dir / "partners" / "partner-0" / "events.jsonl"
    before = events.read_bytes() if events.exists() else b""
    # Execute
    plain = _request(base, "/events", "POST", event, {"content-type": "text/plain"})
    foreign_origin = _request(base, "/events", "POST", event, {"content-type": "application/json",
                                                               "origin": "http://evil.example:8766"})
    foreign_host = _request(base, "/health", headers={"host": "attacker.example"})
    docs, redoc = _request(base, "/docs"), _request(base, "/redoc")
    page = _request(base, "/")
    # Assert: nothing stored; the service's own page and JSON carry the security headers
    assert plain[0] == 415 and foreign_origin[0] == 403 and foreign_host[0] == 400
    assert (events.read_bytes() if events.exists() else b"") == before
    assert call(base, "/users?prefix=csrf")[1]["users"] == []
    assert docs[0] == 404 and redoc[0] == 404 and _request(base, "/openapi.json")[0] == 200
    headers = {k.lower(): v for k, v in page[1].items()}
    assert "frame-ancestors 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert b"https://" not in page[2] and b"http://" not in page[2]  # nothing loaded from elsewhere
    assert call(base, f"/users/{user}")[0] == 200


def test_the_page_runs_under_its_own_content_security_policy(server: tuple[str, Path]) -> None:
    # The policy enforced (no bypass): the page's own script, styles and requests break none of it
    require_chromium()
    base, _ = server
    user = first_user(base)
    violations: list[str] = []
    with open_page(f"{base}/?user={user}", bypass_csp=False) as page:
        page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
        page.wait_for_selector("#list li")
        shown = page.eval_on_selector_all("#list li", "els => els.length")
    assert shown == 10 and violations == []


def test_an_id_holding_a_slash_is_served(tmp_path: Path) -> None:
    # Regression (adversarial review): /users/a%2Fb matched no route (404), so such users had no list or profile
    from fastapi.testclient import TestClient

    from fedsocial.shared.config import ModelConfig
    from fedsocial.shared.serving import Recommender
    from fedsocial.simulations.serve import create_app
    from tests.test_serving import randomised_model, tiny_split

    split = tiny_split()
    ids = np.array([f"a/{u}" for u in range(split.n_users)], dtype=object)
    split = dataclasses.replace(split, dataset=dataclasses.replace(split.dataset, user_ids=ids))
    rec = Recommender(randomised_model(ModelConfig(dim=8), split, 1), split,  # type: ignore[arg-type]
                      calibration="none", privacy_scope="none")
    client = TestClient(create_app(rec, "partner-0"))
    listed = client.get("/users/a%2F3/recommendations?k=3")
    profile = client.get("/users/a%2F3")
    assert listed.status_code == 200 and listed.json()["user"] == "a/3" and len(listed.json()["items"]) == 3
    assert profile.status_code == 200
