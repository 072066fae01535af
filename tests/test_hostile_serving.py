"""Hostile requests to a partner's service and tampered serving files: a clear 4xx or a one-line error naming
the field or the file's line, never a 500, a traceback, or a user the service can no longer answer for."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from fedsocial.shared.config import ModelConfig
from fedsocial.shared.data import SplitData
from fedsocial.shared.events import EventError, parse_event, read_events
from fedsocial.shared.serving import Recommender
from fedsocial.shared.social_analysis import analyse
from fedsocial.simulations.serve import create_app
from tests.test_serving import randomised_model, tiny_split

with warnings.catch_warnings():  # starlette's TestClient warns that it wants httpx2; httpx is what is installed
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def client_of(rec: Recommender) -> TestClient:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TestClient(create_app(rec, "partner-0"), raise_server_exceptions=False)


def service_of(tmp_path: Path) -> tuple[SplitData, Recommender, TestClient, Path]:
    """(split, recommender, client, events file) of a tiny served model whose events go to a file."""
    split = tiny_split()
    events = tmp_path / "events.jsonl"
    rec = Recommender(randomised_model(ModelConfig(dim=8), split, 1), split,  # type: ignore[arg-type]
                      calibration="none", privacy_scope="none", events_path=events)
    return split, rec, client_of(rec), events


@pytest.mark.parametrize(("user", "code"), [("\ud800", "D800"), ("a\nb", "000A"), ("tab\there", "0009"),
                                           ("nul\x00", "0000"), ("line\u2028sep", "2028"), ("del\x7f", "007F"),
                                           ("\u200b1", "200B"), ("x\ufeff", "FEFF"),
                                           # found by a red team: a soft hyphen, a right-to-left override (shows
                                           # "3" as another id), an isolate, a tag character, noncharacters
                                           ("\xad3", "00AD"), ("\u202e3", "202E"), ("\u20663", "2066"),
                                           ("3\U000e0041", "E0041"), ("\ufffe", "FFFE"), ("\U0010ffff", "10FFFF")])
def test_an_event_id_no_data_set_can_hold_is_refused_and_never_breaks_the_service(tmp_path: Path, user: str,
                                                                                  code: str) -> None:
    # Prepare: a service whose events go to a file (a lone surrogate was accepted, appended to events.jsonl, and
    # from then on GET /users answered 500 and `fedsocial recommend --out x.csv` died in a UnicodeEncodeError)
    split, rec, client, events = service_of(tmp_path)
    # Execute
    headers = {"content-type": "application/json"}  # json.dumps escapes as "\\ud800", as a hostile client sends it
    posted = client.post("/events", content=json.dumps({"user": user, "item": 3, "type": "view"}), headers=headers)
    follow = client.post("/events", content=json.dumps({"user": 3, "neighbour": user, "type": "follow"}),
                         headers=headers)
    listed = client.get("/users?limit=1000")
    # Assert
    assert posted.status_code == 422 and follow.status_code == 422
    assert posted.json()["detail"] == (f"field 'user': an id may not hold the character U+{code} "
                                       "(a control character, line break, invisible format character or lone "
                                       "surrogate)")
    assert follow.json()["detail"].startswith(f"field 'neighbour': an id may not hold the character U+{code} ")
    assert not events.exists() and listed.status_code == 200 and len(listed.json()["users"]) == split.n_users


def test_a_tampered_events_file_is_an_error_naming_its_line(tmp_path: Path) -> None:
    # Prepare: one good event, then lines an attacker (or a torn disk) left: each was a raw UnicodeDecodeError,
    # ValueError or RecursionError traceback out of `fedsocial recommend` / `serve` before
    path = tmp_path / "events.jsonl"
    good = b'{"item": 3, "type": "view", "user": 1}\n'
    cases = {
        good + b"\n\xff\xfe\n": r"events.jsonl:3: not UTF-8 text \(invalid start byte at byte 40\)",
        good + b'{"user": ' + b"9" * 5000 + b', "item": 1, "type": "view"}\n':
            r"events.jsonl:2: not an event \(ValueError",
        good + b"[" * 100_000 + b"\n": r"events.jsonl:2: not an event \(RecursionError",
        good + b'{"user": "\\ud800", "item": 1, "type": "view"}\n':
            r"events.jsonl:2: field 'user': an id may not hold the character U\+D800",
        good + b'{"user": 1, "item": 3, "type": "view"}\xe2\x80\xa8{"user": 2, "item": 3, "type": "view"}\n':
            r"events.jsonl:2: not JSON",
    }
    for body, message in cases.items():
        path.write_bytes(body)
        # Execute / Assert
        with pytest.raises(EventError, match=message):
            read_events(path)
    path.write_bytes(good + b"\r\n" + good)  # CRLF line ends are only whitespace
    assert read_events(path) == [parse_event({"item": 3, "type": "view", "user": 1})] * 2


@pytest.mark.parametrize(("variant", "ranking"), [({}, "prior"), ({"use_social": False}, "model")],
                         ids=["dp-prior-served", "no-social-table"])
def test_the_social_analysis_of_a_score_without_friend_terms_answers_not_500(variant: dict[str, object],
                                                                              ranking: str) -> None:
    # Prepare: users with friends, served by a score with no friend term: the DP selection chose the prior
    # (joint scope), or the model has no social table (was: GET /social answered 500, "zip() argument 2 is
    # shorter than argument 1", on every DP run whose partner serves the prior)
    split = tiny_split()
    rec = Recommender(randomised_model(ModelConfig(dim=8, **variant), split, 1), split,  # type: ignore[arg-type]
                      calibration="none", privacy_scope="none", ranking=ranking)
    assert any(rec.friends)
    # Execute
    doc = analyse(rec, k=5)
    reply = client_of(rec).get("/social?k=5")
    # Assert
    assert reply.status_code == 200 and reply.json()["influencers"] == [] and doc["influencers"] == []
    assert doc["social_share"] == 0.0 and doc["analysed_users"] == split.n_users


def test_a_json_integer_beyond_int64_names_the_user_the_loader_keeps_as_a_string(tmp_path: Path) -> None:
    # Prepare: ids beyond int64, which the CSV loader keeps as strings (was: {"user": 100000000000000000001} in
    # an event created a second user next to "100000000000000000001"; a 5,000-digit integer body answered 500)
    split = tiny_split(n_users=3)
    wide = ["100000000000000000001", "100000000000000000002", "-9223372036854775809"]
    split = SplitData(dataclasses.replace(split.dataset, user_ids=np.array(wide, dtype=object)), split.train_users,
                      split.train_items, split.val_users, split.val_items, split.test_users, split.test_items)
    events = tmp_path / "events.jsonl"
    rec = Recommender(randomised_model(ModelConfig(dim=8), split, 1), split,  # type: ignore[arg-type]
                      calibration="none", privacy_scope="none", events_path=events)
    client = client_of(rec)
    headers = {"content-type": "application/json"}
    # Execute
    same = client.post("/events", content='[{"user": 100000000000000000001, "item": 3, "type": "view"}, '
                                          '{"user": -9223372036854775809, "neighbour": 100000000000000000002, '
                                          '"type": "follow"}]', headers=headers)
    huge = client.post("/events", content='{"user": ' + "9" * 5000 + ', "item": 3, "type": "view"}', headers=headers)
    long = client.post("/events", content='{"user": ' + "9" * 2000 + ', "item": 3, "type": "view"}', headers=headers)
    # Assert
    assert same.status_code == 200 and same.json()["created_users"] == 0 and len(rec.users) == 3
    assert [e.user for e in read_events(events)] == ["100000000000000000001", "-9223372036854775809"]
    assert 1 in rec.friends[2]
    assert huge.status_code == 400 and huge.json()["detail"].startswith("body: not valid JSON (Exceeds the limit")
    assert long.status_code == 422 and long.json()["detail"] == "field 'user': an id of 2000 characters (at most 1024)"
    assert parse_event({"user": 2**63 - 1, "item": 1, "type": "view"}).user == 2**63 - 1  # int64 stays an integer


def test_a_huge_integer_value_or_a_blank_id_is_a_422_and_a_bug_is_a_500_with_the_security_headers(
        tmp_path: Path) -> None:
    # Regression (red team): a 400-digit integer "value" raised OverflowError in math.isfinite: a 500 without the
    # security headers and two tracebacks in the log; ids of spaces only (or U+00A0, U+3000) were accepted
    # Prepare
    split, rec, client, events = service_of(tmp_path)
    headers = {"content-type": "application/json"}
    # Execute
    huge = client.post("/events", content='{"user": 3, "item": 1, "type": "rating", "value": 1' + "0" * 400 + "}",
                       headers=headers)
    blanks = [client.post("/events", content=json.dumps({"user": blank, "item": 1, "type": "view"}), headers=headers)
              for blank in (" ", "\xa0", "\u3000")]
    rec.recommend = None  # type: ignore[assignment,method-assign]  # a bug in the model: calling it raises
    bug = client.get("/users/3/recommendations")
    # Assert
    assert huge.status_code == 422 and huge.json()["detail"].startswith("field 'value': expected a finite number")
    assert all(b.status_code == 422 and "expected a non-empty string or integer id" in b.json()["detail"]
               for b in blanks)
    assert not events.exists()
    assert bug.status_code == 500 and bug.json()["detail"] == "internal error: TypeError"
    assert bug.headers["x-frame-options"] == "DENY" and "content-security-policy" in bug.headers


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A joint-scope DP run folder whose partner-0 recorded a charged DP selection of the prior (round 2)."""
    from fedsocial.shared.privacy.selection import (
        compute_selection_release,
        save_selection_release,
        write_served_choice,
    )
    from tests.serving_run import make_run

    run = make_run(tmp_path_factory.mktemp("dp") / "run",
                   ["privacy.enabled=true", "privacy.scope=joint", "privacy.noise_multiplier=1.0"], epochs=1)
    state = run / "partners" / "partner-0"
    release = compute_selection_release(2, 8.0, np.array([5.0]), 40)
    save_selection_release(state, release)
    write_served_choice(state, release)
    return run


@pytest.mark.parametrize(("name", "tamper", "message"), [
    ("garbage", lambda sel: (sel / "served.json").write_text("{"), r"served.json: unreadable served choice"),
    ("a list", lambda sel: (sel / "served.json").write_text("[1]"), r"served.json: not a served choice"),
    ("choice edited", lambda sel: (sel / "served.json").write_text(
        (sel / "served.json").read_text().replace('"prior"', '"model"')),
     r"served.json: records choice 'model' and digest .*, its release of round 2 says 'prior'"),
    ("release deleted", lambda sel: (sel / "round_0002.json").unlink(),
     r"served.json: the selection release of round 2 it records \(.*round_0002.json\) is missing"),
    ("release edited", lambda sel: (sel / "round_0002.json").write_text(
        (sel / "round_0002.json").read_text().replace('"evaluated_users": 40', '"evaluated_users": 41')),
     r"the selection release of round 2 .* is missing, unreadable or altered"),
], ids=["garbage", "a-list", "choice-edited", "release-deleted", "release-edited"])
def test_a_tampered_served_choice_is_refused_by_recommend_naming_the_file(
        dp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, tamper: object,
        message: str) -> None:
    # Prepare: a joint-scope DP run folder whose partner's charged DP selection chose the prior (was: any of these
    # edits made `fedsocial recommend` / `serve` silently serve the DP model instead, exit 0)
    run = tmp_path / "run"
    shutil.copytree(dp_run, run)
    state = run / "partners" / "partner-0"
    out = tmp_path / "lists.jsonl"
    from fedsocial.simulations import recommend

    assert recommend.main([str(run), "--partner", "partner-0", "--k", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text().splitlines()[0])["explanation"]["reason"] in ("prior", "popularity")
    out.unlink()
    capsys.readouterr()
    tamper(state / "selection")  # type: ignore[operator]
    # Execute
    code = recommend.main([str(run), "--partner", "partner-0", "--k", "2", "--out", str(out)])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and "Traceback" not in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def _ledger_with(run: Path, charge_digest: str | None) -> Path:
    """partner-0's ledger in ``run``: one training round 2, then a selection charge of ``charge_digest`` if any."""
    from fedsocial.shared import signing
    from fedsocial.shared.privacy.ledger import Ledger

    path = run / "ledgers" / "partner-0.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(path, signing.load_or_create_keypair(run / "partners" / "partner-0" / "ledger_signing.key"),
                    "partner-0")
    common = {"max_grad_norm": 1.0, "target_delta": 1e-5, "population": 80, "secure_rng": False}
    ledger.append_round(round=2, noise_multiplier=1.0, sample_rate=0.1, steps=10, **common)
    if charge_digest is not None:
        ledger.append_round(round=2, noise_multiplier=8.0, sample_rate=1.0, steps=1, **common,
                            extra={"release": "selection", "release_sha256": charge_digest})
    return path


def test_recommend_serves_the_charged_choice_when_its_record_is_deleted_and_refuses_an_uncharged_one(
        dp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the run's ledger charged the selection of the prior; served.json deleted (was: the DP model was
    # served instead of the charged choice, exit 0, silently)
    from fedsocial.simulations import recommend

    run = tmp_path / "run"
    shutil.copytree(dp_run, run)
    sel = run / "partners" / "partner-0" / "selection"
    digest = json.loads((sel / "served.json").read_text())["digest"]
    _ledger_with(run, digest)
    (sel / "served.json").unlink()
    out = tmp_path / "lists.jsonl"
    args = [str(run), "--partner", "partner-0", "--k", "2", "--out", str(out)]
    # Execute
    code = recommend.main(args)
    # Assert: the charged choice (the prior) is served
    assert code == 0
    assert json.loads(out.read_text().splitlines()[0])["explanation"]["reason"] in ("prior", "popularity")
    # Prepare: a ledger that never charged it, and the record put back
    other = tmp_path / "other"
    shutil.copytree(dp_run, other)
    ledger = _ledger_with(other, None)
    out.unlink()
    capsys.readouterr()
    # Execute
    code = recommend.main([str(other), "--partner", "partner-0", "--k", "2", "--out", str(out)])
    # Assert: refused in one line naming the record and the ledger
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and "Traceback" not in err
    assert "served.json: records the selection of round 2, which" in err and str(ledger) in err


def test_a_torn_or_replaced_cache_of_the_alone_model_is_refused_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a partner-scope run served once (which caches the partner's alone model in personal/alone.npz);
    # was: a torn or replaced cache made `fedsocial recommend` / `serve` die in a raw numpy ValueError,
    # zipfile.BadZipFile or KeyError traceback (exit 1)
    from fedsocial.simulations import recommend
    from tests.serving_run import make_run

    run = make_run(tmp_path / "run", ["privacy.scope=partner", "train.epochs=1", "model.dim=8"], epochs=1)
    cache = run / "partners" / "partner-0" / "personal" / "alone.npz"
    out = tmp_path / "lists.jsonl"
    args = [str(run), "--partner", "partner-0", "--k", "2", "--out", str(out)]
    assert recommend.main(args) == 0 and cache.is_file()
    good = cache.read_bytes()
    cases = {b"xx\n": "unreadable local state", good[:200]: r"unreadable local state \(File is not a zip file\)"}
    for body, message in cases.items():
        out.unlink(missing_ok=True)
        cache.write_bytes(body)
        capsys.readouterr()
        # Execute
        code = recommend.main(args)
        # Assert
        err = capsys.readouterr().err
        assert code == 2 and not out.exists() and re.search(rf"personal/alone.npz: {message}", err), err
    np.savez(cache, weights=np.zeros(3))  # an archive, but no cache of an alone model
    assert recommend.main(args) == 2
    assert "alone.npz: not a cache of the partner's alone model (no config key); delete it" in capsys.readouterr().err
    cache.write_bytes(good)
    assert recommend.main(args) == 0


def test_an_append_after_a_write_cut_short_never_joins_it_and_the_file_stays_readable(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: events.jsonl whose last write was cut short (a crash, a full disk) in the middle of a line, and
    # in the middle of a multi-byte character (was: the next acknowledged event was appended onto the fragment,
    # '{"item": 4, "ty{"item": 5, ...}', so the file no longer read and the acknowledged event was lost, and a
    # partner or service could not start again: "events.jsonl:2: not JSON")
    from fedsocial.shared.events import append_events_durably

    path = tmp_path / "events.jsonl"
    first, second = parse_event({"user": 1, "item": 3, "type": "view"}), parse_event({"user": 2, "item": 5,
                                                                                      "type": "view"})
    for torn in (b'{"item": 4, "ty', b'{"item": 4, "type": "view", "user": "\xc3'):
        path.write_bytes(b'{"item": 3, "type": "view", "user": 1}\n' + torn)
        # Execute
        with caplog.at_level("WARNING", logger="fedsocial.events"):
            restarted = read_events(path)
        append_events_durably(path, [second])
        # Assert
        assert restarted == [first] and "events.jsonl:2: an unterminated last line that holds no event" in caplog.text
        assert read_events(path) == [first, second]
        assert path.read_bytes().endswith(b"\n") and path.read_bytes().count(b"\n") == 2
    path.write_bytes(b'{"item": 3, "type": "view", "user": 1}')  # a file edited by hand, no final newline
    assert read_events(path) == [first]
    append_events_durably(path, [second])
    assert read_events(path) == [first, second]


def test_a_client_gone_mid_body_is_no_internal_error_and_applies_nothing(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    # Regression (adversarial review): a client that sent Content-Length 100000 and then disconnected made serve
    # log "internal error" and Starlette's "Exception in ASGI application", two tracebacks
    import asyncio

    split = tiny_split()
    events = tmp_path / "events.jsonl"
    rec = Recommender(randomised_model(ModelConfig(dim=8), split, 1), split,  # type: ignore[arg-type]
                      calibration="none", privacy_scope="none", events_path=events)
    app = create_app(rec, "partner-0")
    incoming = [{"type": "http.request", "body": b'{"user":', "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/events", "raw_path": b"/events", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100000")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    # Execute
    with caplog.at_level("INFO"):
        asyncio.run(app(scope, receive, send))
    # Assert: a 400 (never delivered), logged as the client's doing, nothing stored
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 400
    assert "internal error" not in caplog.text and "Traceback" not in caplog.text
    assert "disconnected before its body was complete" in caplog.text and not events.exists()


def test_a_csv_list_shows_formula_like_ids_as_text_and_k_is_checked_before_the_model_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Regression (red team): an event can create the user "=cmd|' /C calc'!A0", which `recommend --out x.csv` wrote
    # as a bare first cell that a spreadsheet evaluates; `--k 0` was refused only after a minute of model loading
    from fedsocial.simulations.recommend import compute_csv_cell, format_rows, main

    # Prepare
    row = {"user": "=cmd|' /C calc'!A0", "rank": 1, "item": "@SUM(1)", "score": 1.5, "probability": 0.5,
           "explanation": {}}
    # Execute
    text = format_rows([row, {**row, "user": "-3", "item": 7}], ".csv")
    code = main([str(tmp_path / "no-such-run"), "--partner", "partner-0", "--k", "0", "--out", str(tmp_path / "x.csv")])
    # Assert: formula starts are text; a negative numeric id and integers are unchanged
    lines = text.splitlines()
    assert lines[1].startswith("'=cmd|' /C calc'!A0,1,'@SUM(1),") and lines[2].startswith("-3,1,7,")
    assert compute_csv_cell("+33") == "'+33" and compute_csv_cell(5) == 5
    assert code == 2 and "--k: must be an integer in [1, 1000], got 0" in capsys.readouterr().err
