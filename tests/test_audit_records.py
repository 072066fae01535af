"""The audit knows what must be there (issue 11 item 2) and checks deployed caps (item 3).

A run folder as the federation writes it: two partners' signed ledgers, the server's signed manifest
(partners, declared caps, scope) and signed heads. Removing or forging any of it is a finding with a
non-zero exit; crafted values give exit 2 or 3 naming partner and line, never a traceback, and
audit.json is still written.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

from fedsocial.shared import signing
from fedsocial.shared.config import config_from_dict
from fedsocial.shared.faults import KILLED
from fedsocial.shared.privacy.audit import audit_run
from fedsocial.shared.privacy.ledger import Ledger, entry_hash, read_ledger
from fedsocial.shared.privacy.records import (
    HEADS,
    MANIFEST,
    METRICS_RECORD,
    SERVER_KEY,
    SERVER_PUB,
    RecordError,
    compute_manifest_payload,
    compute_metrics_payload,
    compute_params_sha256,
    load_metrics_signer,
    resign_metrics,
    server_key,
    sign_record,
    write_signed_heads,
    write_signed_metrics,
)
from fedsocial.simulations.audit import EXIT_BUDGET, EXIT_INPUT, EXIT_OK, EXIT_TAMPER
from fedsocial.simulations.privacy_report import render_html
from tests.server_records import metrics_doc, sign_metrics, sign_server_records
from tests.test_audit import audit  # run the CLI, return (exit code, output)

DELTA = 1e-4
PARTNERS = {"north": 800, "south": 400}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("records")
    for pid, users in PARTNERS.items():
        key, pub = signing.generate_keypair()
        signing.save_public_key(pub, run / "ledgers" / f"{pid}.pub")
        ledger = Ledger(run / "ledgers" / f"{pid}.jsonl", key, pid)
        for r in (1, 2):
            ledger.append_round(round=r, noise_multiplier=1.1, sample_rate=0.05, steps=20, max_grad_norm=0.1,
                                target_delta=DELTA, population=users, secure_rng=False, extra={"scope": "joint"})
    sign_server_records(run, {pid: {"num_users": n, "max_epsilon": 8.0, "target_delta": DELTA}
                              for pid, n in PARTNERS.items()})
    return run


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "run"))


def test_a_complete_run_passes_and_names_its_scope(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, output = audit(run, capsys)

    assert code == EXIT_OK, output
    doc = json.loads((run / "audit.json").read_text())
    assert doc["scope"] == "joint" and doc["scope_note"].startswith("joint:")
    assert doc["records"]["expected_partners"] == sorted(PARTNERS)
    assert {p["partner_id"]: p["cap_source"] for p in doc["partners"]} == dict.fromkeys(
        PARTNERS, "run_manifest.json, declared by the partner")
    assert "privacy scope: joint" in output


def test_a_deleted_ledger_fails_also_with_trusted_keys_and_a_cap(run: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the auditor's trusted copies of both keys, then one ledger and its key removed
    trusted = _trusted_keys(run, tmp_path, server=False)
    (run / "ledgers" / "south.jsonl").unlink()
    (run / "ledgers" / "south.pub").unlink()
    # Execute
    plain = audit(run, capsys)
    flagged = audit(run, capsys, "--public-keys", str(trusted), "--max-epsilon", "8")
    # Assert
    for code, output in (plain, flagged):
        assert code == EXIT_TAMPER, output
        assert "partner south, round 2: no ledger ledgers/south.jsonl" in output and "removed" in output
    assert json.loads((run / "audit.json").read_text())["verified"] is False


def test_a_deleted_ledger_fails_with_trusted_keys_alone(run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    trusted = _trusted_keys(run, tmp_path, server=False)
    for name in ("south.jsonl", "south.pub"):
        (run / "ledgers" / name).unlink()
    for name in (MANIFEST, HEADS):
        (run / name).unlink()  # even with the server's records gone, the trusted-key list expects south

    code, output = audit(run, capsys, "--public-keys", str(trusted))

    assert code != EXIT_OK
    assert "partner south: no ledger ledgers/south.jsonl for a trusted key" in output


def test_a_deleted_manifest_fails_with_every_key_pinned_too(run: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the auditor's trusted copies of every key, the manifest removed and the unsigned config raising the
    # cap (regression: pinned keys used to make the manifest optional, so its caps, delta and noise settings fell
    # away unnoticed and an unsigned config's cap of 100 replaced the signed 8, exit 0)
    trusted = _trusted_keys(run, tmp_path, server=True)
    (run / MANIFEST).unlink()
    (run / "config.json").write_text(json.dumps({"privacy": {"enabled": True, "max_epsilon": 100.0}}))
    # Execute
    code, output = audit(run, capsys, "--public-keys", str(trusted))
    # Assert
    assert code == EXIT_INPUT, output
    assert "no signed run_manifest.json: the run's caps, delta, scope and noise settings are unknown" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("damage, code, message", [
    ("delete_heads", EXIT_INPUT, "no ledger_heads.json"),
    ("delete_heads_and_last_line", EXIT_INPUT, "no ledger_heads.json"),
    ("garbage_heads", EXIT_INPUT, "ledger_heads.json: unreadable JSON"),
    ("unsigned_heads", EXIT_TAMPER, "ledger_heads.json: not a version-1 'ledger_heads' record"),
    ("forged_heads", EXIT_TAMPER, "ledger_heads.json: the server's signature does not verify"),
    ("delete_manifest", EXIT_INPUT, "no signed run_manifest.json"),
    ("edited_manifest", EXIT_TAMPER, "run_manifest.json: the server's signature does not verify"),
    ("truncated_ledger", EXIT_TAMPER, "partner north, round 2: head: the server recorded an entry for round 2"),
    ("unregistered_ledger", EXIT_TAMPER, "partner east: a ledger of a partner that the signed records do not list"),
])
def test_missing_or_forged_records_are_findings(run: Path, capsys: pytest.CaptureFixture[str], damage: str,
                                                code: int, message: str) -> None:
    # Prepare
    heads, manifest, north = run / HEADS, run / MANIFEST, run / "ledgers" / "north.jsonl"
    if damage.startswith("delete_heads"):
        heads.unlink()
        if damage.endswith("last_line"):
            north.write_text("".join(line + "\n" for line in north.read_text().splitlines()[:-1]))
    elif damage == "garbage_heads":
        heads.write_text("{not json")
    elif damage == "unsigned_heads":  # the format of older runs: anyone could have written it
        heads.write_text(json.dumps({pid: {"round": 2, "hash": "0" * 64} for pid in PARTNERS}))
    elif damage == "forged_heads":
        doc = json.loads(heads.read_text())
        del doc["heads"]["south"]
        heads.write_text(json.dumps(doc))
    elif damage == "delete_manifest":
        manifest.unlink()
    elif damage == "edited_manifest":
        doc = json.loads(manifest.read_text())
        doc["partners"]["north"]["max_epsilon"] = 80.0
        manifest.write_text(json.dumps(doc))
    elif damage == "truncated_ledger":
        north.write_text("".join(line + "\n" for line in north.read_text().splitlines()[:-1]))
    else:
        key, pub = signing.generate_keypair()
        signing.save_public_key(pub, run / "ledgers" / "east.pub")
        Ledger(run / "ledgers" / "east.jsonl", key, "east").append_round(
            round=1, noise_multiplier=1.1, sample_rate=0.05, steps=20, max_grad_norm=0.1, target_delta=DELTA,
            population=500, secure_rng=False, extra={"scope": "joint"})
    # Execute
    got, output = audit(run, capsys)
    # Assert
    assert got == code, output
    assert message in output, output
    assert "Traceback" not in output and json.loads((run / "audit.json").read_text())["exit_code"] == code


def test_heads_signed_by_another_key_are_tampering(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: an attacker replaces the server's key and re-signs heads without south
    (run / SERVER_KEY).unlink()
    key, _ = signing.generate_keypair()
    doc = json.loads((run / HEADS).read_text())
    forged = sign_record(key, "ledger_heads", {k: v for k, v in doc.items()
                                               if k not in ("record", "version", "server_key_fingerprint",
                                                            "signature")})
    (run / HEADS).write_text(json.dumps(forged))
    # Execute
    code, output = audit(run, capsys)
    # Assert: the run's server.pub (which signed the manifest) does not verify the forged heads
    assert code == EXIT_TAMPER and "server_key_fingerprint does not match" in output


def test_a_ledger_above_its_signed_cap_fails_without_flags(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a correctly signed ledger at about 14 epsilon, in a run whose partner declared a cap of 8
    key, pub = signing.generate_keypair()
    signing.save_public_key(pub, tmp_path / "ledgers" / "p.pub")
    ledger = Ledger(tmp_path / "ledgers" / "p.jsonl", key, "p")
    for r in range(1, 5):
        ledger.append_round(round=r, noise_multiplier=0.7, sample_rate=0.1, steps=50, max_grad_norm=0.1,
                            target_delta=DELTA, population=1000, secure_rng=False, extra={"scope": "joint"})
    sign_server_records(tmp_path, {"p": {"num_users": 1000, "max_epsilon": 8.0, "target_delta": DELTA}},
                        max_epsilon=10.0)
    final = read_ledger(tmp_path / "ledgers" / "p.jsonl")[-1]["epsilon_rdp"]
    assert final > 10.0
    # Execute
    code, output = audit(tmp_path, capsys)
    # Assert: the partner's own declared cap (8, tighter than the run's 10) is the one held
    assert code == EXIT_BUDGET, output
    assert "exceeds the cap 8 (run_manifest.json, declared by the partner)" in output


CRAFTED = {  # field: the crafted JSON text of its value
    "steps": "1" + "0" * 399,
    "noise_multiplier": "1e-300",
    "sample_rate": "NaN",
    "population": "-5",
    "max_grad_norm": "1e308",
    "epsilon_rdp": "Infinity",
    "round": "9" * 5000,
}


@pytest.mark.parametrize("field", sorted(CRAFTED))
def test_crafted_values_give_a_finding_naming_partner_and_line(run: Path, capsys: pytest.CaptureFixture[str],
                                                               field: str) -> None:
    # Prepare: line 2 of south's ledger with one absurd value (JSON text, so NaN and 400 digits survive)
    path = run / "ledgers" / "south.jsonl"
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    old = json.dumps(entry[field])
    lines[1] = lines[1].replace(f'"{field}":{old}', f'"{field}":{CRAFTED[field]}', 1)
    assert lines[1] != path.read_text().splitlines()[1]
    path.write_text("\n".join(lines) + "\n")
    # Execute
    code, output = audit(run, capsys)
    # Assert
    assert code in (EXIT_INPUT, EXIT_TAMPER), output
    assert "partner south" in output and "line 2" in output, output
    assert "Traceback" not in output
    doc = json.loads((run / "audit.json").read_text())
    assert doc["exit_code"] == code and any(f["partner"] == "south" and f["line"] == 2 for f in doc["findings"])


def test_an_old_run_without_scope_says_so(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: ledgers and a manifest as runs before privacy.scope wrote them (no scope anywhere)
    for pid in PARTNERS:
        path = run / "ledgers" / f"{pid}.jsonl"
        key, pub = signing.generate_keypair()
        signing.save_public_key(pub, run / "ledgers" / f"{pid}.pub")
        path.unlink()
        ledger = Ledger(path, key, pid)
        for r in (1, 2):
            ledger.append_round(round=r, noise_multiplier=1.1, sample_rate=0.05, steps=20, max_grad_norm=0.1,
                                target_delta=DELTA, population=PARTNERS[pid], secure_rng=False)
    doc = json.loads((run / MANIFEST).read_text())
    payload = {k: v for k, v in doc.items() if k not in ("record", "version", "server_key_fingerprint", "signature")}
    del payload["privacy"]["scope"]
    (run / MANIFEST).write_text(json.dumps(sign_record(server_key(run), "manifest", payload)))
    heads = {pid: {"round": 2, "hash": entry_hash(read_ledger(run / "ledgers" / f"{pid}.jsonl")[-1])}
             for pid in PARTNERS}
    write_signed_heads(run, 2, heads)
    # Execute
    code, output = audit(run, capsys)
    # Assert: verified, and the scope is reported as not recorded rather than guessed
    assert code == EXIT_OK, output
    out = json.loads((run / "audit.json").read_text())
    assert out["scope"] is None and out["scope_note"].startswith("not recorded: this run predates privacy.scope")
    assert all(p["scope"] == "" for p in out["partners"])
    assert "privacy scope: not recorded" in output


@pytest.mark.parametrize("keep_ledgers", [False, True])
def test_a_run_without_privacy_never_passes(run: Path, keep_ledgers: bool, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the server's signed manifest says privacy.enabled = false (a non-private run writes no
    # ledgers; with keep_ledgers, valid DP ledgers and heads lie beside it and must not make it pass)
    doc = json.loads((run / MANIFEST).read_text())
    payload = {k: v for k, v in doc.items() if k not in ("record", "version", "server_key_fingerprint", "signature")}
    payload["privacy"]["enabled"] = False
    (run / MANIFEST).write_text(json.dumps(sign_record(server_key(run), "manifest", payload)))
    if keep_ledgers:
        heads = {pid: {"round": 2, "hash": entry_hash(read_ledger(run / "ledgers" / f"{pid}.jsonl")[-1])}
                 for pid in PARTNERS}
        write_signed_heads(run, 2, heads)
    else:
        shutil.rmtree(run / "ledgers")
        (run / HEADS).unlink()
    # Execute
    code, output = audit(run, capsys)
    # Assert: a failure that says why, first among the findings
    assert code != EXIT_OK and code in ((EXIT_BUDGET,) if keep_ledgers else (EXIT_INPUT,)), output
    assert "privacy.enabled = false: this run trained without differential privacy" in output
    findings = json.loads((run / "audit.json").read_text())["findings"]
    assert "without differential privacy" in findings[0]["message"]


# --- the records name the model they account for ----------------------------------------------------


def test_params_digest_known_properties() -> None:
    # Prepare
    import numpy as np

    from fedsocial.shared.privacy.records import compute_params_sha256

    a, b = np.arange(6.0).reshape(2, 3), np.ones((2, 1))
    base = compute_params_sha256(["x", "y"], [a, b])
    flipped = a.copy()
    flipped.flat[3] = np.nextafter(flipped.flat[3], 10.0)  # one bit of one coordinate

    # Execute / Assert: equal content hashes alike (whatever the memory layout); every change shows
    assert base == compute_params_sha256(["x", "y"], [np.asfortranarray(a), b.copy()])
    assert len(base) == 64 and int(base, 16) >= 0
    others = [compute_params_sha256(["x", "y"], [flipped, b]), compute_params_sha256(["x", "z"], [a, b]),
              compute_params_sha256(["x", "y"], [a.astype(np.float32), b]),
              compute_params_sha256(["x", "y"], [a.reshape(3, 2), b]),
              compute_params_sha256(["y", "x"], [b, a]),
              compute_params_sha256(["x"], [np.concatenate([a.ravel(), b.ravel()])])]
    assert len({base, *others}) == 1 + len(others)


def test_records_copied_from_another_run_fail_against_this_runs_model(run: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: another run with the same partners and ledgers, whose model differs; its every privacy record
    # (ledgers, keys, manifest, heads, server key) copied over this run's, this run's checkpoint kept
    other = Path(shutil.copytree(run, tmp_path / "other"))
    shutil.rmtree(other / "server")
    for name in (MANIFEST, HEADS, "server.pub"):
        (other / name).unlink()
    sign_server_records(other, {pid: {"num_users": n, "max_epsilon": 8.0, "target_delta": DELTA}
                                for pid, n in PARTNERS.items()}, model_seed=1)
    assert audit(other, capsys)[0] == EXIT_OK  # the other run is sound on its own
    for name in (MANIFEST, HEADS, "server.pub"):
        shutil.copy(other / name, run / name)

    # Execute
    code, output = audit(run, capsys)

    # Assert
    assert code == EXIT_TAMPER, output
    assert "checkpoints/round_0002.npz is not the model the signed ledger_heads.json name" in output


def test_a_checkpoint_newer_than_the_signed_heads_fails(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a round-3 model in the folder, the heads signed after round 2
    from fedsocial.server.checkpoint import Checkpoint, save_checkpoint
    from tests.server_records import MODEL_NAMES, model_arrays

    save_checkpoint(run, Checkpoint(3, MODEL_NAMES, model_arrays(3), {}))

    # Execute
    code, output = audit(run, capsys)

    # Assert
    assert code == EXIT_TAMPER, output
    assert "a model of round 3, newer than round 2" in output


@pytest.mark.parametrize("name", ["round_003.npz", "round_0003.npz.bak", "round_3"])
def test_a_newer_checkpoint_under_another_name_still_fails(run: Path, capsys: pytest.CaptureFixture[str],
                                                           name: str) -> None:
    # Regression (red team): a round-3 model renamed away from round_XXXX.npz passed the audit without a word
    from fedsocial.server.checkpoint import Checkpoint, save_checkpoint
    from tests.server_records import MODEL_NAMES, model_arrays

    save_checkpoint(run, Checkpoint(3, MODEL_NAMES, model_arrays(3), {}))
    (run / "checkpoints" / "round_0003.npz").rename(run / "checkpoints" / name)
    # Execute
    code, output = audit(run, capsys)
    # Assert
    assert code == EXIT_TAMPER, output
    assert "a model of round 3, newer than round 2" in output


def test_a_missing_or_unbound_model_is_a_warning_and_a_damaged_one_a_finding(run: Path, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture[str]
                                                                              ) -> None:
    # Prepare: three copies: the checkpoint removed; heads signed without a model digest; the checkpoint garbage
    removed, unbound, damaged = (Path(shutil.copytree(run, tmp_path / n)) for n in ("removed", "unbound", "damaged"))
    (removed / "checkpoints" / "round_0002.npz").unlink()
    heads = {pid: {"round": 2, "hash": entry_hash(read_ledger(unbound / "ledgers" / f"{pid}.jsonl")[-1])}
             for pid in PARTNERS}
    write_signed_heads(unbound, 2, heads)
    (damaged / "checkpoints" / "round_0002.npz").write_bytes(b"not a checkpoint")

    # Execute
    results = {name: audit(folder, capsys) for name, folder in
               (("removed", removed), ("unbound", unbound), ("damaged", damaged))}

    # Assert
    assert results["removed"][0] == EXIT_OK and "no checkpoints/round_0002.npz" in results["removed"][1]
    assert results["unbound"][0] == EXIT_OK and "names no model" in results["unbound"][1]
    assert results["damaged"][0] == EXIT_TAMPER and "round_0002.npz" in results["damaged"][1]


def test_metrics_reporting_an_epsilon_above_the_ledgers_is_a_warning(run: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: metrics.json of a run whose ledgers reached more than these do (signed: the server said so)
    sign_metrics(run, metrics_doc(run, epsilon=7.9))

    # Execute
    code, output = audit(run, capsys)

    # Assert
    assert code == EXIT_OK, output
    assert "metrics.json reports epsilon 7.9, above the ledgers' largest" in output


# --- the published results: metrics.json is signed by the server -----------------------------------


@pytest.fixture
def signed(run: Path) -> Path:
    """The run with metrics.json and its signed record, as the server writes them at the end."""
    sign_metrics(run)
    return run


def edit_ndcg(run: Path) -> None:
    """One digit of the published NDCG@10 changed (0.1234 -> 0.1934), nothing else."""
    text = (run / "metrics.json").read_text()
    assert text.count('"ndcg@10": 0.1234,') == 1 + len(PARTNERS)
    (run / "metrics.json").write_text(text.replace('"ndcg@10": 0.1234,', '"ndcg@10": 0.1934,', 1))


def test_a_run_with_signed_metrics_audits_clean_and_says_so(signed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code, output = audit(signed, capsys)

    # Assert: exit 0 without a warning; audit.json, the summary and the privacy report say metrics.json verified
    assert code == EXIT_OK and "WARNING" not in output, output
    verdict = json.loads((signed / "audit.json").read_text())["records"]["metrics"]
    assert verdict == {"verified": True, "note": "verified by the server's signature (metrics_record.json, "
                                                 "round 2, written by server)"}
    assert "metrics.json: verified by the server's signature" in output
    assert "verified by the server&#x27;s signature" in (signed / "privacy_report.html").read_text()


@pytest.mark.parametrize("damage", ["one_digit", "other_runs_metrics", "other_runs_metrics_and_record",
                                    "record_signed_by_another_key", "record_of_the_previous_round"])
def test_altered_published_results_are_tampering(signed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 damage: str) -> None:
    # Prepare
    metrics, record = signed / "metrics.json", signed / METRICS_RECORD
    if damage == "one_digit":
        edit_ndcg(signed)
    elif damage.startswith("other_runs_metrics"):  # another run, same partners and rounds, better numbers
        other = tmp_path / "other"
        shutil.copytree(signed, other)
        for name in (MANIFEST, HEADS, "server.pub", METRICS_RECORD):
            (other / name).unlink()
        shutil.rmtree(other / "server")
        sign_server_records(other, metrics={"ndcg@10": 0.5})
        assert audit(other, capsys)[0] == EXIT_OK  # sound on its own
        shutil.copy(other / "metrics.json", metrics)
        if damage.endswith("record"):
            shutil.copy(other / METRICS_RECORD, record)
    elif damage == "record_signed_by_another_key":  # the edit, and a record of it signed with the attacker's key
        edit_ndcg(signed)
        key, _ = signing.generate_keypair()
        payload = compute_metrics_payload(signed, metrics.read_bytes(), 2, server_key(signed).public_key(), "server")
        record.write_text(json.dumps(sign_record(key, "metrics", payload)))
    else:  # the run's own honest record and metrics.json of round 1, kept while the heads moved on to round 2
        heads = json.loads((signed / HEADS).read_text())
        stale = {"round": 1, "hash": "0" * 64}
        write_signed_heads(signed, 1, dict.fromkeys(heads["heads"], stale), heads["params_sha256"])
        sign_metrics(signed, metrics_doc(signed))
        kept = metrics.read_bytes(), record.read_bytes()
        write_signed_heads(signed, 2, heads["heads"], heads["params_sha256"])  # the run goes on to round 2
        metrics.write_bytes(kept[0])
        record.write_bytes(kept[1])
    # Execute
    code, output = audit(signed, capsys)
    # Assert
    assert code == EXIT_TAMPER, output
    expected = {"one_digit": "metrics.json is not the one the server signed",
                "other_runs_metrics": "metrics.json is not the one the server signed",
                "other_runs_metrics_and_record": "metrics_record.json: server_key_fingerprint does not match",
                "record_signed_by_another_key": "metrics_record.json: server_key_fingerprint does not match",
                "record_of_the_previous_round": "metrics_record.json was signed for round 1, the signed "
                                                "ledger_heads.json for round 2"}[damage]
    assert expected in output, output
    doc = json.loads((signed / "audit.json").read_text())
    assert doc["exit_code"] == EXIT_TAMPER and doc["records"]["metrics"]["verified"] is False
    assert "NOT verified" in (signed / "privacy_report.html").read_text()


def test_a_record_for_another_round_than_the_heads_is_tampering_even_when_chained(
        signed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a record with the server's own key, chained to this folder's heads, naming round 1 (heads: 2)
    metrics, record = signed / "metrics.json", signed / METRICS_RECORD
    doc = json.loads(record.read_text())
    payload = {k: v for k, v in doc.items() if k not in ("record", "version", "server_key_fingerprint", "signature")}
    record.write_text(json.dumps(sign_record(server_key(signed), "metrics", {**payload, "round": 1})))
    assert json.loads(record.read_text())["metrics_sha256"] == hashlib.sha256(metrics.read_bytes()).hexdigest()
    # Execute
    code, output = audit(signed, capsys)
    # Assert
    assert code == EXIT_TAMPER, output
    assert "run, round 1: metrics_record.json was signed for round 1, the signed ledger_heads.json for round 2" \
        in output


def test_the_server_refuses_to_sign_results_of_another_round_than_its_heads(run: Path) -> None:
    # Execute / Assert: a rounds_completed that is not the heads' round is never signed, nothing written
    with pytest.raises(RecordError, match="ledger_heads.json is of round 2, metrics.json of round 1"):
        write_signed_metrics(run, metrics_doc(run, rounds_completed=1))
    assert not (run / "metrics.json").exists() and not (run / METRICS_RECORD).exists()


@pytest.mark.parametrize("removed", ["record", "record_and_metrics", "metrics"])
def test_a_missing_record_or_metrics_is_a_warning(signed: Path, capsys: pytest.CaptureFixture[str],
                                                  removed: str) -> None:
    # Prepare: a run of an older fedsocial (no record), one stopped before metrics.json, or metrics.json removed
    if removed.startswith("record"):
        (signed / METRICS_RECORD).unlink()
    if removed.endswith("metrics"):
        (signed / "metrics.json").unlink()
    # Execute
    code, output = audit(signed, capsys)
    # Assert: warnings exit 0 (the audit's exit for warnings), and the verdict says unverified
    assert code == EXIT_OK, output
    message = {"record": "WARNING: run: no metrics_record.json: metrics.json is not bound by the server's signature",
               "record_and_metrics": "WARNING: run: no metrics_record.json: no metrics.json either",
               "metrics": "WARNING: run: metrics_record.json signs a metrics.json that is not in this folder"}[removed]
    assert message in output
    assert json.loads((signed / "audit.json").read_text())["records"]["metrics"]["verified"] is False
    assert "metrics.json: not signed" in output if removed == "record" else "metrics.json: absent" in output


def test_a_resumed_run_rewrites_and_re_signs_its_metrics_and_audits_clean(run: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the run stopped after round 1 (heads, checkpoint, metrics.json and its record of round 1)
    from fedsocial.server.checkpoint import Checkpoint, save_checkpoint
    from tests.server_records import MODEL_NAMES, model_arrays

    final = json.loads((run / HEADS).read_text())
    (run / "checkpoints" / "round_0002.npz").unlink()
    first = {pid: {"round": 1, "hash": entry_hash(read_ledger(run / "ledgers" / f"{pid}.jsonl")[0])}
             for pid in PARTNERS}
    save_checkpoint(run, Checkpoint(1, MODEL_NAMES, model_arrays(1), {}))
    write_signed_heads(run, 1, first, compute_params_sha256(MODEL_NAMES, model_arrays(1)))
    sign_metrics(run, metrics_doc(run, ndcg_round=1))
    stopped = json.loads((run / METRICS_RECORD).read_text())
    # Execute: the resumed server's round 2 (heads, checkpoint), then metrics.json rewritten and re-signed
    save_checkpoint(run, Checkpoint(2, MODEL_NAMES, model_arrays(0), {}))
    write_signed_heads(run, 2, final["heads"], final["params_sha256"])
    sign_metrics(run, metrics_doc(run, ndcg_round=2))
    code, output = audit(run, capsys)
    # Assert
    resumed = json.loads((run / METRICS_RECORD).read_text())
    assert (stopped["round"], resumed["round"]) == (1, 2) and stopped["metrics_sha256"] != resumed["metrics_sha256"]
    assert code == EXIT_OK and "WARNING" not in output, output
    assert json.loads((run / "audit.json").read_text())["records"]["metrics"]["verified"] is True


def test_compare_alone_s_addition_is_re_signed_and_audits_clean(signed: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: what compare_alone adds to a finished run's metrics.json
    doc = json.loads((signed / "metrics.json").read_text())
    for info in doc["partners"].values():
        info["alone"] = {"ndcg@10": 0.1}
        info["served_over_alone"] = 1.234
    doc["federation_gain"] = 1.234
    # Execute: compare_alone's writer (resign_metrics, with the run's server key)
    assert resign_metrics(signed, doc, "compare_alone") is True
    code, output = audit(signed, capsys)
    # Assert
    assert code == EXIT_OK and "WARNING" not in output, output
    assert json.loads((signed / "metrics.json").read_text())["federation_gain"] == 1.234
    assert "round 2, written by compare_alone" in output


@pytest.mark.parametrize("state", ["edited", "no_key", "other_key"])
def test_a_re_signer_never_blesses_an_edit_nor_signs_without_the_runs_key(signed: Path, state: str) -> None:
    # Prepare: metrics.json edited since the server signed it; the server key stripped; a key not the run's
    if state == "edited":
        edit_ndcg(signed)
    elif state == "no_key":
        (signed / SERVER_KEY).unlink()
    else:
        (signed / SERVER_KEY).unlink()
        signing.save_private_key(signing.generate_keypair()[0], signed / SERVER_KEY)
    before = (signed / "metrics.json").read_bytes(), (signed / METRICS_RECORD).read_bytes()
    # Execute / Assert: refused, nothing rewritten, no key created
    message = {"edited": "is not the metrics.json that metrics_record.json signs",
               "no_key": "the server's key is needed to re-sign it",
               "other_key": "is not the key of the run's server.pub"}[state]
    with pytest.raises(RecordError, match=message):
        resign_metrics(signed, {"ndcg@10": 0.9, "rounds_completed": 2}, "compare_alone")
    assert ((signed / "metrics.json").read_bytes(), (signed / METRICS_RECORD).read_bytes()) == before
    assert (signed / SERVER_KEY).is_file() == (state != "no_key")


def test_compare_alone_refuses_before_training_when_it_cannot_re_sign(signed: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a shipped copy of the run: its server key stripped
    from fedsocial.simulations.compare_alone import main as compare_alone_main

    (signed / SERVER_KEY).unlink()
    before = (signed / "metrics.json").read_bytes()
    # Execute (no config.toml in the folder: reaching the training would fail otherwise)
    code = compare_alone_main([str(signed)])
    # Assert
    assert code == EXIT_INPUT
    assert "the server's key is needed to re-sign it" in capsys.readouterr().err
    assert (signed / "metrics.json").read_bytes() == before


def test_an_older_run_without_a_record_is_rewritten_unsigned(run: Path) -> None:
    # Prepare: metrics.json without a record (written by an older fedsocial)
    (run / "metrics.json").write_text(json.dumps(metrics_doc(run)))
    # Execute
    assert load_metrics_signer(run) is None
    signed = resign_metrics(run, {**metrics_doc(run), "federation_gain": 1.1}, "compare_alone")
    # Assert: nothing blessed that nobody signed
    assert signed is False and not (run / METRICS_RECORD).exists()
    assert json.loads((run / "metrics.json").read_text())["federation_gain"] == 1.1


def _resign_killed_before_the_record(run: str) -> None:
    """A re-signer (compare_alone's writer) killed after metrics.json's rename, before its record's."""
    os.environ["FEDSOCIAL_FAULT"] = "before_metrics_record"
    resign_metrics(Path(run), {**metrics_doc(Path(run)), "federation_gain": 1.5}, "compare_alone")
    os._exit(0)  # not reached


def test_a_writer_killed_between_metrics_and_its_record_leaves_a_warning_not_tampering(
        signed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare / Execute: the re-signer, in a forked process, killed at the boundary
    proc = multiprocessing.get_context("fork").Process(target=_resign_killed_before_the_record, args=(str(signed),))
    proc.start()
    proc.join(60)
    code, output = audit(signed, capsys)
    # Assert: the new metrics.json, no record (the old one went first): unverified, but not read as an edit
    assert proc.exitcode == KILLED
    assert json.loads((signed / "metrics.json").read_text())["federation_gain"] == 1.5
    assert not (signed / METRICS_RECORD).exists()
    assert code == EXIT_OK and "no metrics_record.json: metrics.json is not bound" in output, output


# ---- what the verdict rests on (the keys), and the run's settings from the signed manifest --------------
# What an audit's verdict rests on: which public keys were trusted, and whether the folder could forge them.
#
# Signatures prove only who holds the keys. A rewrite of a run folder (ledgers rolled back, every record
# re-signed under fresh keys) verifies against the folder's own public keys, and a folder that ships the
# private signing keys (a simulation, where one operator plays every party) can be re-signed under the
# pinned ones too. The audit says which case it is in, warns where the auditor asked for more than the
# folder can prove, and takes the run's settings (SecAgg+, server noise, selection) from the signed
# manifest, never from the unsigned config.json beside it.


def _trusted_keys(run: Path, tmp_path: Path, server: bool) -> Path:
    """The auditor's copies of the partners' public keys (and the server's when ``server``)."""
    keys = tmp_path / "trusted"
    keys.mkdir()
    for pid in PARTNERS:
        shutil.copy(run / "ledgers" / f"{pid}.pub", keys / f"{pid}.pub")
    if server:
        shutil.copy(run / SERVER_PUB, keys / SERVER_PUB)
    return keys


def _roll_back(run: Path) -> None:
    """The operator's rewrite: north's last round removed, every server record re-signed under a new key."""
    ledger = run / "ledgers" / "north.jsonl"
    ledger.write_text("".join(ledger.read_text().splitlines(keepends=True)[:-1]))
    for name in (SERVER_KEY, SERVER_PUB, MANIFEST, HEADS, METRICS_RECORD, "metrics.json"):
        (run / name).unlink(missing_ok=True)
    sign_server_records(run, {pid: {"num_users": n, "max_epsilon": 8.0, "target_delta": DELTA}
                              for pid, n in PARTNERS.items()})


def _remove_private_keys(run: Path) -> None:
    (run / SERVER_KEY).unlink()


def test_an_unpinned_audit_says_its_verdict_rests_on_the_folders_own_keys(run: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the run's results published and signed, as at the end of a run
    sign_metrics(run)

    # Execute
    code, output = audit(run, capsys)

    # Assert: exit 0, no warning, but the keys line and audit.json say nothing was pinned
    assert code == EXIT_OK, output
    assert "WARNING" not in output
    assert "keys: nothing pinned" in output and "--public-keys" in output
    trust = json.loads((run / "audit.json").read_text())["records"]["trust"]
    assert trust["partner_keys"] == "run folder" and trust["server_key"] == "run folder"
    assert trust["private_keys_in_folder"] == [str(SERVER_KEY)]
    assert "Keys: nothing pinned" in (run / "privacy_report.html").read_text()


def test_a_rollback_re_signed_under_a_new_server_key_warns_unless_the_server_key_is_pinned(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the auditor's copies of the partner keys only, and a second set with the original server.pub
    partners_only = _trusted_keys(run, tmp_path, server=False)
    full = tmp_path / "full"
    full.mkdir()
    for pub in (*partners_only.glob("*.pub"), run / SERVER_PUB):
        shutil.copy(pub, full / pub.name)
    _roll_back(run)
    _remove_private_keys(run)

    # Execute
    code_partial, out_partial = audit(run, capsys, "--public-keys", str(partners_only))
    code_full, out_full = audit(run, capsys, "--public-keys", str(full))

    # Assert: with partner keys alone the rollback verifies, so the audit warns that server.pub is missing;
    # with the coordinator's key pinned, the re-signed records are tampering
    assert code_partial == EXIT_OK, out_partial
    assert "WARNING" in out_partial and f"has no {SERVER_PUB}" in out_partial and "rollback" in out_partial
    assert "partner keys pinned" in out_partial
    assert code_full == EXIT_TAMPER, out_full


def test_private_signing_keys_in_the_folder_make_pinning_a_warning(run: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: every key pinned; a simulation's partner key left in the folder beside the server's
    sign_metrics(run)
    keys = _trusted_keys(run, tmp_path, server=True)
    partner_key = run / "partners" / "north" / "ledger_signing.key"
    partner_key.parent.mkdir(parents=True)
    partner_key.write_text("-----BEGIN PRIVATE KEY-----\n")

    # Execute: with the keys in the folder, then with them removed
    code_held, out_held = audit(run, capsys, "--public-keys", str(keys))
    partner_key.unlink()
    _remove_private_keys(run)
    code_clean, out_clean = audit(run, capsys, "--public-keys", str(keys))

    # Assert: both verify; only the folder holding keys warns, naming them
    assert code_held == EXIT_OK and code_clean == EXIT_OK, (out_held, out_clean)
    assert "WARNING" in out_held and "partners/north/ledger_signing.key" in out_held and str(SERVER_KEY) in out_held
    assert "WARNING" not in out_clean and "keys: every key pinned" in out_clean


@pytest.mark.parametrize(("field", "manifest_text", "forged"), [
    ("secure_aggregation", "SecAgg+ was OFF", {"secagg": {"enabled": True}}),
    ("select_on_validation", "A fixed training schedule", {"privacy": {"select_on_validation": True}}),
])
def test_the_report_takes_the_runs_settings_from_the_signed_manifest_not_config_json(
        run: Path, field: str, manifest_text: str, forged: dict[str, dict[str, bool]]) -> None:
    # Prepare: the manifest signed with the defaults (SecAgg+ off, fixed schedule); a config.json claiming otherwise
    (run / "config.json").write_text(json.dumps(forged))

    # Execute
    result = audit_run(run)
    html = render_html(result)

    # Assert: the signed value is reported, and says where it comes from
    assert result.exit_code == EXIT_OK
    assert manifest_text in html and "from the signed run manifest" in html
    assert field in json.dumps(result.records["manifest"])


def test_without_a_manifest_the_report_says_its_settings_are_unsigned(run: Path) -> None:
    # Prepare: a config.json and no signed manifest
    (run / "config.json").write_text(json.dumps({"secagg": {"enabled": True}}))
    (run / "run_manifest.json").unlink()

    # Execute
    html = render_html(audit_run(run))

    # Assert
    assert "SecAgg+ was ON" in html and "unsigned, not verified" in html


def test_the_manifest_signs_the_selection_setting() -> None:
    # Execute
    on = compute_manifest_payload(config_from_dict({"privacy": {"select_on_validation": True}}), {})
    off = compute_manifest_payload(config_from_dict({}), {})

    # Assert
    assert on["privacy"]["select_on_validation"] is True and off["privacy"]["select_on_validation"] is False
