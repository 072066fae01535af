"""canary_audit.json is signed with the run's server key (canary_record.json), and the audit checks it.

The canary audit's empirical lower bound can only raise an alarm; an edit that lowers it hides one and an
edit that raises it fakes one. Both, a canary file of another run and a record of another key are
tampering (exit 3); an unsigned canary file is a warning; a writer killed between the two files leaves a
warning, never a tampering finding.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from fedsocial.shared import signing
from fedsocial.shared.faults import KILLED
from fedsocial.shared.privacy.ledger import Ledger
from fedsocial.shared.privacy.records import (
    CANARY,
    CANARY_RECORD,
    SERVER_KEY,
    SERVER_PUB,
    RecordError,
    load_run_signer,
    sign_record,
    write_signed_canary,
)
from fedsocial.simulations.audit import EXIT_ACCOUNTING, EXIT_INPUT, EXIT_OK, EXIT_TAMPER
from fedsocial.simulations.canary_audit import main as canary_main
from tests.server_records import sign_server_records
from tests.test_audit import audit  # run the CLI, return (exit code, output)

DELTA = 1e-4


def canary_doc(lower_bound: float) -> dict[str, Any]:
    return {"method": "one-run audit", "epsilon_lower_bound": lower_bound, "confidence": 0.95,
            "reported_epsilon": 8.0, "delta": DELTA, "private": True, "canaries": 100}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("canary")
    key, pub = signing.generate_keypair()
    signing.save_public_key(pub, run / "ledgers" / "north.pub")
    ledger = Ledger(run / "ledgers" / "north.jsonl", key, "north")
    ledger.append_round(round=1, noise_multiplier=1.1, sample_rate=0.05, steps=20, max_grad_norm=0.1,
                        target_delta=DELTA, population=500, secure_rng=False, extra={"scope": "joint"})
    sign_server_records(run, {"north": {"num_users": 500, "max_epsilon": 8.0, "target_delta": DELTA}}, metrics={})
    return run


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "run"))


@pytest.fixture
def signed(run: Path) -> Path:
    assert write_signed_canary(run, canary_doc(0.5)) is True
    return run


def test_a_signed_canary_audits_clean_and_the_report_says_so(signed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code, output = audit(signed, capsys)
    # Assert
    assert code == EXIT_OK and "WARNING" not in output, output
    assert "canary_audit.json: verified by the server's signature (canary_record.json)" in output
    doc = json.loads((signed / "audit.json").read_text())
    assert doc["records"]["canary"]["verified"] is True and doc["canary"]["epsilon_lower_bound"] == 0.5
    report = (signed / "privacy_report.html").read_text()
    assert "empirical epsilon lower bound <strong>0.5</strong> (canary_audit.json: verified" in report


@pytest.mark.parametrize("edit", ["lowered", "raised", "whitespace"])
def test_an_edited_lower_bound_is_tampering_whichever_way_it_moves(run: Path, capsys: pytest.CaptureFixture[str],
                                                                  edit: str) -> None:
    # Prepare: a signed canary that raised an alarm (9.1 above the accounted 8), then edited
    write_signed_canary(run, canary_doc(9.1 if edit != "raised" else 0.5))
    text = (run / CANARY).read_text()
    changed = {"lowered": text.replace('"epsilon_lower_bound": 9.1', '"epsilon_lower_bound": 0.5'),
               "raised": text.replace('"epsilon_lower_bound": 0.5', '"epsilon_lower_bound": 9.1'),
               "whitespace": text + " "}[edit]
    assert changed != text
    (run / CANARY).write_text(changed)
    # Execute
    code, output = audit(run, capsys)
    # Assert: tampering (3), not a hidden alarm (0) nor a faked one read as an accounting failure (5)
    assert code == EXIT_TAMPER, output
    assert "canary_audit.json is not the one canary-audit signed" in output
    doc = json.loads((run / "audit.json").read_text())
    assert doc["canary"] is None and doc["records"]["canary"]["verified"] is False
    assert "empirical epsilon lower bound <strong>" not in (run / "privacy_report.html").read_text()


def test_an_honest_alarm_stays_an_accounting_failure(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare / Execute
    write_signed_canary(run, canary_doc(9.1))
    code, output = audit(run, capsys)
    # Assert
    assert code == EXIT_ACCOUNTING and "exceeds the accounted epsilon" in output, output


def test_a_canary_of_another_run_or_another_key_is_tampering(signed: Path, template: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: (1) another run's signed canary files copied in; (2) a record signed by a key of the attacker's
    other = Path(shutil.copytree(template, tmp_path / "other"))
    for path in (other / "run_manifest.json", other / SERVER_PUB, other / SERVER_KEY):
        path.unlink()
    sign_server_records(other, {"north": {"num_users": 500, "max_epsilon": 8.0, "target_delta": DELTA}})
    write_signed_canary(other, canary_doc(0.1))
    foreign = Path(shutil.copytree(signed, tmp_path / "foreign"))
    for name in (CANARY, CANARY_RECORD):
        shutil.copy(other / name, foreign / name)
    forged = Path(shutil.copytree(signed, tmp_path / "forged"))
    attacker, _ = signing.generate_keypair()
    record = json.loads((forged / CANARY_RECORD).read_text())
    payload = {k: v for k, v in record.items() if k not in ("record", "version", "server_key_fingerprint", "signature")}
    (forged / CANARY_RECORD).write_text(json.dumps(sign_record(attacker, "canary", payload)))
    # Execute
    foreign_code, foreign_out = audit(foreign, capsys)
    forged_code, forged_out = audit(forged, capsys)
    # Assert
    assert foreign_code == EXIT_TAMPER and "canary_record.json: server_key_fingerprint does not match" in foreign_out
    assert forged_code == EXIT_TAMPER and "canary_record.json: server_key_fingerprint does not match" in forged_out


def test_a_canary_record_of_another_manifest_is_tampering(signed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the record re-signed with the run's own key, but naming another manifest
    key = load_run_signer(signed)
    assert key is not None
    record = json.loads((signed / CANARY_RECORD).read_text())
    payload = {k: v for k, v in record.items() if k not in ("record", "version", "server_key_fingerprint", "signature")}
    other = sign_record(key, "canary", {**payload, "manifest_sha256": "0" * 64})
    (signed / CANARY_RECORD).write_text(json.dumps(other))
    # Execute
    code, output = audit(signed, capsys)
    # Assert
    assert code == EXIT_TAMPER and "canary_record.json was signed for another run_manifest.json" in output, output


@pytest.mark.parametrize("removed", [CANARY_RECORD, CANARY])
def test_a_removed_record_or_canary_is_a_warning(signed: Path, capsys: pytest.CaptureFixture[str],
                                                 removed: str) -> None:
    # Prepare
    (signed / removed).unlink()
    # Execute
    code, output = audit(signed, capsys)
    # Assert
    assert code == EXIT_OK and "WARNING" in output, output
    want = "no canary_record.json: canary_audit.json's empirical lower bound is not bound" if removed == CANARY_RECORD \
        else "canary_record.json signs a canary_audit.json that is not in this folder"
    assert want in output


def test_without_the_runs_key_the_canary_is_written_unsigned_and_a_lone_public_key_is_refused(tmp_path: Path) -> None:
    # Prepare: an empty folder; a folder whose signing key was stripped
    empty, stripped = tmp_path / "empty", tmp_path / "stripped"
    empty.mkdir()
    _, pub = signing.generate_keypair()
    signing.save_public_key(pub, stripped / SERVER_PUB)
    # Execute / Assert: no key is created for a run nobody registered with
    assert write_signed_canary(empty, canary_doc(0.5)) is False
    assert (empty / CANARY).is_file() and not (empty / CANARY_RECORD).exists() and not (empty / SERVER_PUB).exists()
    with pytest.raises(RecordError, match="the server's key is needed"):
        write_signed_canary(stripped, canary_doc(0.5))
    assert not (stripped / CANARY).exists()


def test_the_cli_refuses_a_folder_it_cannot_sign_into_before_training(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a run folder with server.pub but without server/signing.key, and an older canary file in it
    _, pub = signing.generate_keypair()
    signing.save_public_key(pub, tmp_path / SERVER_PUB)
    (tmp_path / CANARY).write_text('{"epsilon_lower_bound": 0.3}')
    # Execute
    code = canary_main(["--config", "configs/demo.toml", "--out", str(tmp_path)])
    # Assert: one line naming the folder, nothing trained, nothing lost
    err = capsys.readouterr().err
    assert code == EXIT_INPUT and err.count("\n") == 1 and str(tmp_path) in err and "Traceback" not in err
    assert (tmp_path / CANARY).read_text() == '{"epsilon_lower_bound": 0.3}'


def _write_killed_before_the_record(run: str) -> None:
    os.environ["FEDSOCIAL_FAULT"] = "before_canary_record"
    write_signed_canary(Path(run), canary_doc(0.7))
    os._exit(0)  # not reached


def test_a_writer_killed_between_the_canary_and_its_record_leaves_a_warning(
        signed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare / Execute: the writer, in a forked process, killed at the boundary
    proc = multiprocessing.get_context("fork").Process(target=_write_killed_before_the_record, args=(str(signed),))
    proc.start()
    proc.join(60)
    code, output = audit(signed, capsys)
    # Assert: the new canary file, no record (the old one went first): unverified, not an edit
    assert proc.exitcode == KILLED
    assert json.loads((signed / CANARY).read_text())["epsilon_lower_bound"] == 0.7
    assert not (signed / CANARY_RECORD).exists()
    assert code == EXIT_OK and "no canary_record.json" in output, output
