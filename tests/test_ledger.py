"""The signed, hash-chained privacy ledger: format, durability under SIGKILL, tamper detection, recovery."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from fedsocial.shared import signing
from fedsocial.shared.privacy.accounting import PrivacyAccountant, compute_epsilon
from fedsocial.shared.privacy.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerError,
    TornTailWarning,
    canonical_json,
    entry_hash,
    read_ledger,
    record_refusal,
    recover_torn_tail,
    refusals_path,
    scan_ledger,
    verify_head,
    verify_ledger,
)

REPO = Path(__file__).resolve().parents[1]
NUMERIC_FIELDS = ("round", "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "target_delta",
                  "epsilon_rdp", "epsilon_prv", "population")


def round_fields(r: int) -> dict[str, Any]:
    return dict(round=r, noise_multiplier=1.1, sample_rate=0.125, steps=8, max_grad_norm=0.1,
                target_delta=1e-4, population=480, secure_rng=False)


@pytest.fixture(scope="module")
def key() -> Any:
    return signing.generate_keypair()[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, key: Any) -> tuple[Path, list[str]]:
    """A 4-round ledger written with true cumulative epsilons; returns its path and raw lines."""
    path = tmp_path_factory.mktemp("ledger") / "alpha.jsonl"
    ledger = Ledger(path, key, "alpha")
    for r in (1, 2, 3, 5):  # a skipped round (partner absent) is fine: rounds strictly increase
        ledger.append_round(**round_fields(r))
    return path, path.read_text().splitlines()


def problems_of(lines: list[str], public_key: Any) -> list[Any]:
    return verify_ledger([json.loads(x) for x in lines], public_key, "alpha", raw=lines)


# ---------------------------------------------------------------- format


def test_entries_are_complete_canonical_and_chained(built: tuple[Path, list[str]], key: Any) -> None:
    path, lines = built
    entries = read_ledger(path)
    assert [e["round"] for e in entries] == [1, 2, 3, 5]
    for i, (line, entry) in enumerate(zip(lines, entries, strict=True)):
        assert canonical_json(entry) == line  # canonical and float round-trip exact
        assert entry["unit"] == "user" and entry["adjacency"] == "add/remove one user's record"
        assert entry["public_key_fingerprint"] == signing.fingerprint(key.public_key())
        assert entry["prev_hash"] == (GENESIS_HASH if i == 0 else entry_hash(entries[i - 1]))
    assert verify_ledger(entries, key.public_key(), "alpha") == []


def test_recorded_epsilons_are_the_cumulative_ones(built: tuple[Path, list[str]], key: Any) -> None:
    path, _ = built
    entries = read_ledger(path)
    for i, entry in enumerate(entries):
        history = [(1.1, 0.125, 8)] * (i + 1)
        assert entry["epsilon_rdp"] == pytest.approx(compute_epsilon(history, 1e-4, "rdp"), rel=1e-12)
    last = [(1.1, 0.125, 8)] * 4
    assert entries[-1]["epsilon_prv"] == pytest.approx(compute_epsilon(last, 1e-4, "prv"), rel=1e-9)
    assert entries[-1]["epsilon_prv"] < entries[-1]["epsilon_rdp"]


def test_history_restores_the_accountant(built: tuple[Path, list[str]], key: Any) -> None:
    path, _ = built
    ledger = Ledger(path, key, "alpha")
    restored = PrivacyAccountant("rdp", ledger.history())
    assert ledger.history() == [(1.1, 0.125, 8)] * 4
    assert restored.get_epsilon(1e-4) == pytest.approx(read_ledger(path)[-1]["epsilon_rdp"], rel=1e-12)
    assert ledger.last_round() == 5
    assert ledger.head() == (5, entry_hash(read_ledger(path)[-1]))


def test_appends_are_refused_when_invalid(tmp_path: Path, key: Any) -> None:
    ledger = Ledger(tmp_path / "p.jsonl", key, "p")
    ledger.append_round(**round_fields(3))
    with pytest.raises(LedgerError, match="round must exceed"):
        ledger.append_round(**round_fields(3))
    with pytest.raises(LedgerError, match="managed by the ledger"):
        ledger.append({**round_fields(4), "epsilon_rdp": 1.0, "epsilon_prv": 1.0, "accountant": "rdp",
                       "prev_hash": GENESIS_HASH})
    with pytest.raises(LedgerError, match="sample_rate"):
        ledger.append({**round_fields(4), "sample_rate": 1.5, "epsilon_rdp": 1.0, "epsilon_prv": 1.0,
                       "accountant": "rdp"})
    with pytest.raises(LedgerError, match="missing field 'epsilon_prv'"):
        ledger.append({**round_fields(4), "epsilon_rdp": 1.0, "accountant": "rdp"})
    with pytest.raises(LedgerError, match="partner_id"):
        Ledger(tmp_path / "q.jsonl", key, "../evil")
    with pytest.raises(LedgerError, match="entry of partner 'p'"):
        Ledger(tmp_path / "p.jsonl", key, "other")
    assert len(read_ledger(tmp_path / "p.jsonl")) == 1  # nothing half-written by the refusals


def test_refusals_are_logged_beside_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "beta.jsonl"
    record_refusal(path, partner_id="beta", round=7, epsilon_spent=7.9, epsilon_next=8.4, max_epsilon=8.0)
    logged = [json.loads(x) for x in refusals_path(path).read_text().splitlines()]
    assert refusals_path(path).name == "beta.refusals.jsonl"
    assert logged[0]["round"] == 7 and logged[0]["epsilon_next"] == 8.4 and not path.exists()


def test_private_key_file_is_0600_and_round_trips(tmp_path: Path, key: Any) -> None:
    signing.save_private_key(key, tmp_path / "k.pem")
    signing.save_public_key(key.public_key(), tmp_path / "k.pub")
    assert stat.S_IMODE(os.stat(tmp_path / "k.pem").st_mode) == 0o600
    loaded = signing.load_private_key(tmp_path / "k.pem")
    pub = signing.load_public_key(tmp_path / "k.pub")
    assert signing.verify(pub, b"data", signing.sign(loaded, b"data"))
    assert not signing.verify(pub, b"datA", signing.sign(loaded, b"data"))
    assert signing.fingerprint(pub) == signing.fingerprint(key.public_key())
    with pytest.raises(signing.SigningError, match="already exists"):
        signing.save_private_key(key, tmp_path / "k.pem")
    # load_or_create_keypair: created once, then loaded; a stale public key file is replaced
    created = signing.load_or_create_keypair(tmp_path / "c.pem", tmp_path / "c.pub")
    signing.save_public_key(signing.generate_keypair()[1], tmp_path / "c.pub")
    again = signing.load_or_create_keypair(tmp_path / "c.pem", tmp_path / "c.pub")
    assert signing.fingerprint(again.public_key()) == signing.fingerprint(created.public_key())
    assert signing.fingerprint(signing.load_public_key(tmp_path / "c.pub")) == signing.fingerprint(created.public_key())
    (tmp_path / "bad.pub").write_text("not a key")
    with pytest.raises(signing.SigningError, match="bad.pub"):
        signing.load_public_key(tmp_path / "bad.pub")


# ---------------------------------------------------------------- tampering


def change_one_digit(line: str, field: str, rng: random.Random) -> str:
    """Change one digit of ``field``'s number in a canonical JSON line."""
    match = re.search(rf'"{field}":(-?[0-9.eE+-]+)', line)
    assert match is not None
    digits = [i for i in range(match.start(1), match.end(1)) if line[i].isdigit()]
    pos = rng.choice(digits)
    new = rng.choice([d for d in "0123456789" if d != line[pos]])
    return line[:pos] + new + line[pos + 1:]


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("field", NUMERIC_FIELDS)
def test_one_changed_digit_is_detected(built: tuple[Path, list[str]], key: Any, index: int, field: str) -> None:
    # Prepare: change one digit of one number in one entry (seeded choice of the digit)
    _, lines = built
    rng = random.Random(f"{index}-{field}")
    tampered = list(lines)
    tampered[index] = change_one_digit(lines[index], field, rng)
    # Execute
    problems = problems_of(tampered, key.public_key())
    # Assert: the altered line is reported, naming the partner and its (possibly altered) round. Its
    # signature fails, unless the new text parses to the same double (a 17th significant digit), which
    # the canonical-form check reports instead.
    bad = [p for p in problems if p.kind in ("signature", "format")]
    assert {p.line for p in bad} == {index + 1}
    assert bad[0].round == json.loads(tampered[index])["round"] and bad[0].partner == "alpha"
    if json.loads(tampered[index]) != json.loads(lines[index]):
        assert any(p.kind == "signature" for p in bad)
        if index < 3:  # and the next entry's chain link breaks
            assert any(p.kind == "chain" and p.line == index + 2 for p in problems)


@pytest.mark.parametrize("index", range(4))
def test_dropped_entry_is_detected(built: tuple[Path, list[str]], key: Any, index: int) -> None:
    _, lines = built
    tampered = lines[:index] + lines[index + 1:]
    problems = problems_of(tampered, key.public_key())
    if index == 3:  # the newest entry removed: invisible to the chain, caught by the server's head
        assert problems == []
        head = (5, entry_hash(json.loads(lines[3])))
        found = verify_head([json.loads(x) for x in tampered], *head, partner_id="alpha")
        assert [(p.kind, p.round) for p in found] == [("head", 5)]
    else:
        assert any(p.kind == "chain" and p.line == index + 1 for p in problems)
        assert any(p.kind == "epsilon" for p in problems)  # later cumulative epsilons no longer add up


def test_reordered_entries_are_detected(built: tuple[Path, list[str]], key: Any) -> None:
    _, lines = built
    tampered = [lines[0], lines[2], lines[1], lines[3]]
    kinds = {(p.kind, p.line) for p in problems_of(tampered, key.public_key())}
    assert ("chain", 2) in kinds and ("order", 3) in kinds


def test_truncated_chain_head_is_detected(built: tuple[Path, list[str]], key: Any) -> None:
    _, lines = built
    problems = problems_of(lines[2:], key.public_key())
    assert any(p.kind == "chain" and p.line == 1 and p.round == 3 for p in problems)


def test_wrong_key_is_detected(built: tuple[Path, list[str]]) -> None:
    _, lines = built
    other = signing.generate_keypair()[1]
    problems = problems_of(lines, other)
    assert {p.line for p in problems if p.kind == "signature"} == {1, 2, 3, 4}
    assert {p.line for p in problems if p.kind == "key"} == {1, 2, 3, 4}


def test_signed_but_misreported_epsilon_is_detected(tmp_path: Path, key: Any) -> None:
    # A partner that signs a too-small epsilon: signatures verify, the recomputation does not.
    ledger = Ledger(tmp_path / "p.jsonl", key, "p")
    ledger.append_round(**round_fields(1))
    true_eps = compute_epsilon([(1.1, 0.125, 8)] * 2, 1e-4)
    ledger.append({**round_fields(2), "accountant": "rdp", "epsilon_rdp": true_eps / 2, "epsilon_prv": 0.1})
    problems = ledger.verify()
    assert [(p.kind, p.round, p.line) for p in problems] == [("epsilon", 2, 2)]


def test_whole_line_garbage_names_the_line(built: tuple[Path, list[str]], tmp_path: Path) -> None:
    _, lines = built
    path = tmp_path / "alpha.jsonl"
    path.write_text("\n".join([lines[0], "{not json", *lines[2:]]) + "\n")
    with pytest.raises(LedgerError) as err:
        read_ledger(path)
    assert err.value.line == 2 and err.value.partner == "alpha"


# ---------------------------------------------------------------- torn tail and recovery


def test_torn_last_line_is_reported_and_recovered(built: tuple[Path, list[str]], key: Any, tmp_path: Path) -> None:
    # Prepare: three complete lines and half of the fourth, as an interrupted write leaves them
    _, lines = built
    path = tmp_path / "alpha.jsonl"
    complete = "".join(x + "\n" for x in lines[:3]).encode()
    path.write_bytes(complete + lines[3][: len(lines[3]) // 2].encode())
    # Execute / Assert: readers report it and keep every complete entry
    with pytest.warns(TornTailWarning):
        assert len(read_ledger(path)) == 3
    assert scan_ledger(path).valid_length == len(complete)
    # recovery removes exactly the fragment
    assert recover_torn_tail(path) == lines[3][: len(lines[3]) // 2].encode()
    assert path.read_bytes() == complete
    assert recover_torn_tail(path) == b""
    # and a writer opening a torn ledger recovers before appending, continuing the chain
    path.write_bytes(complete + b'{"round":')
    with pytest.warns(TornTailWarning):
        ledger = Ledger(path, key, "alpha")
    ledger.append_round(**round_fields(9))
    assert ledger.verify() == []
    assert path.read_bytes().startswith(complete)


@pytest.mark.timeout(60)
def test_open_writer_recovers_a_tail_torn_by_another_writer(tmp_path: Path, key: Any) -> None:
    # Prepare: a long-lived Ledger object; meanwhile another writer dies mid-line
    path = tmp_path / "alpha.jsonl"
    ledger = Ledger(path, key, "alpha")
    ledger.append_round(**round_fields(1))
    complete = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"round":2,"noise')
    # Execute: the next append must recover under its own lock (no self-deadlock) and chain on
    with pytest.warns(TornTailWarning):
        ledger.append_round(**round_fields(3))
    # Assert
    assert path.read_bytes().startswith(complete)
    assert [e["round"] for e in read_ledger(path)] == [1, 3] and ledger.verify() == []


WRITER = textwrap.dedent(
    """
    import sys
    from fedsocial.shared import signing
    from fedsocial.shared.privacy.ledger import Ledger
    key = signing.load_private_key(sys.argv[1])
    ledger = Ledger(sys.argv[2], key, "kill")
    r = (ledger.last_round() or 0) + 1
    while True:
        # epsilon fields are placeholders (not the accountant's values) so the loop stays tight and
        # never imports torch; the test verifies chain, signatures and framing, not accounting.
        ledger.append(dict(round=r, noise_multiplier=1.0, sample_rate=0.01, steps=10, max_grad_norm=1.0,
                           target_delta=1e-6, population=1000, secure_rng=True, accountant="rdp",
                           epsilon_rdp=r * 0.001, epsilon_prv=r * 0.001))
        r += 1
    """
)


def test_sigkilled_writer_never_damages_complete_entries(tmp_path: Path, key: Any) -> None:
    # Prepare
    signing.save_private_key(key, tmp_path / "kill.pem")
    path = tmp_path / "kill.jsonl"
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    counts = []
    for _ in range(4):
        before = len(scan_ledger(path).entries) if path.exists() else 0
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "kill.pem"), str(path)], env=env)
        try:
            deadline = time.monotonic() + 60
            while (not path.exists() or len(scan_ledger(path).entries) <= before) and time.monotonic() < deadline:
                time.sleep(0.01)  # wait until this writer is appending, then kill it at a random moment
            time.sleep(rng.uniform(0.0, 0.15))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        # Assert after each kill: every complete line verifies; at most the last line is torn
        scan = scan_ledger(path)
        assert b"\n" not in scan.torn_tail
        problems = verify_ledger(scan.entries, key.public_key(), "kill", scan.lines, check_epsilon=False,
                                 raw=scan.raw)
        assert problems == []
        assert [e["round"] for e in scan.entries] == list(range(1, len(scan.entries) + 1))
        counts.append(len(scan.entries))
    assert counts == sorted(counts) and counts[-1] > counts[0]  # each writer resumed the same chain


def test_a_head_matching_no_entry_of_its_round_names_every_line_of_that_round() -> None:
    # Regression (adversarial review): the finding named the round's first line even where the head was its last
    entries = [{"round": 1, "v": 0}, {"round": 2, "v": 1}, {"round": 2, "v": 2, "release": "evaluation"}]
    found = verify_head(entries, 2, "0" * 64, partner_id="alpha")
    assert [(p.kind, p.round, p.line) for p in found] == [("head", 2, 3)]
    assert "lines 2, 3" in found[0].message
