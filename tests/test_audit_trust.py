"""What an audit's verdict rests on: which public keys were trusted, and whether the folder could forge them.

Signatures prove only who holds the keys. A rewrite of a run folder (ledgers rolled back, every record
re-signed under fresh keys) verifies against the folder's own public keys, and a folder that ships the
private signing keys (a simulation, where one operator plays every party) can be re-signed under the
pinned ones too. The audit says which case it is in, warns where the auditor asked for more than the
folder can prove, and takes the run's settings (SecAgg+, server noise, selection) from the signed
manifest, never from the unsigned config.json beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedsocial.shared import signing
from fedsocial.shared.config import config_from_dict
from fedsocial.shared.privacy.audit import audit_run
from fedsocial.shared.privacy.ledger import Ledger
from fedsocial.shared.privacy.records import SERVER_KEY, SERVER_PUB, compute_manifest_payload
from fedsocial.simulations.audit import EXIT_OK, EXIT_TAMPER
from fedsocial.simulations.privacy_report import render_html
from tests.server_records import sign_server_records
from tests.test_audit import audit  # run the CLI, return (exit code, output)

DELTA = 1e-4
PARTNERS = {"north": 800, "south": 400}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("trust")
    for pid, users in PARTNERS.items():
        key, pub = signing.generate_keypair()
        signing.save_public_key(pub, run / "ledgers" / f"{pid}.pub")
        ledger = Ledger(run / "ledgers" / f"{pid}.jsonl", key, pid)
        for r in (1, 2):
            ledger.append_round(round=r, noise_multiplier=1.1, sample_rate=0.05, steps=20, max_grad_norm=0.1,
                                target_delta=DELTA, population=users, secure_rng=False, extra={"scope": "joint"})
    sign_server_records(run, {pid: {"num_users": n, "max_epsilon": 8.0, "target_delta": DELTA}
                              for pid, n in PARTNERS.items()}, metrics={})
    return run


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "run"))


def _trusted(run: Path, tmp_path: Path, server: bool) -> Path:
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
    for name in (SERVER_KEY, SERVER_PUB, "run_manifest.json", "ledger_heads.json", "metrics_record.json",
                 "metrics.json"):
        (run / name).unlink()
    sign_server_records(run, {pid: {"num_users": n, "max_epsilon": 8.0, "target_delta": DELTA}
                              for pid, n in PARTNERS.items()}, metrics={})


def _remove_private_keys(run: Path) -> None:
    (run / SERVER_KEY).unlink()


def test_an_unpinned_audit_says_its_verdict_rests_on_the_folders_own_keys(run: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
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
    partners_only = _trusted(run, tmp_path, server=False)
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
    keys = _trusted(run, tmp_path, server=True)
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
