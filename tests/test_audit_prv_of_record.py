"""A ledger whose accountant of record is PRV has its newest epsilon_prv re-derived exactly, like epsilon_rdp.

The cap is held against the epsilon of record. Before, epsilon_prv was only cross-checked against
dp_accounting's PLD within 5%, so a ledger signed by its own key with a final epsilon_prv 4% below what its
recorded history gives passed a cap that the true value exceeds.
"""

from __future__ import annotations

from pathlib import Path

from fedsocial.shared import signing
from fedsocial.shared.privacy.accounting import compute_epsilon_prv, compute_epsilon_rdp
from fedsocial.shared.privacy.audit import audit_run
from fedsocial.shared.privacy.ledger import Ledger
from fedsocial.simulations.audit import EXIT_ACCOUNTING, EXIT_OK
from tests.server_records import sign_server_records

DELTA = 1e-4
EVENT = (1.1, 0.05, 20)


def _prv_run(run: Path, understate: float) -> float:
    """A 3-round ledger with accountant ``prv``, its newest epsilon_prv scaled by ``1 - understate`` (and signed);
    the server's records, with a cap 1% below the true final epsilon_prv. Returns that true value."""
    key, pub = signing.generate_keypair()
    signing.save_public_key(pub, run / "ledgers" / "north.pub")
    ledger = Ledger(run / "ledgers" / "north.jsonl", key, "north")
    true = 0.0
    for r in (1, 2, 3):
        history = [EVENT] * r
        true = compute_epsilon_prv(history, DELTA)
        ledger.append({"round": r, "noise_multiplier": EVENT[0], "sample_rate": EVENT[1], "steps": EVENT[2],
                       "max_grad_norm": 0.1, "target_delta": DELTA, "population": 1000, "secure_rng": False,
                       "accountant": "prv", "epsilon_rdp": compute_epsilon_rdp(history, DELTA),
                       "epsilon_prv": true * (1 - understate) if r == 3 else true, "scope": "joint"})
    cap = 0.99 * true
    sign_server_records(run, {"north": {"num_users": 1000, "max_epsilon": cap, "target_delta": DELTA}},
                        max_epsilon=cap)
    return true


def test_an_honest_prv_ledger_under_its_cap_passes(tmp_path: Path) -> None:
    # Prepare: the true value recorded, audited under a cap above it
    true = _prv_run(tmp_path, 0.0)
    # Execute
    result = audit_run(tmp_path, max_epsilon=1.01 * true)
    # Assert
    assert result.exit_code == EXIT_OK, [str(f) for f in result.findings]


def test_a_final_epsilon_prv_understated_inside_the_pld_tolerance_is_an_accounting_finding(tmp_path: Path) -> None:
    # Prepare: recorded 4% below the truth (inside the 5% PLD cross-check), under a cap the truth exceeds
    true = _prv_run(tmp_path, 0.04)
    # Execute
    result = audit_run(tmp_path)
    # Assert: was exit 0; the cap check alone passes (recorded < cap < true), the re-derivation does not
    assert result.exit_code == EXIT_ACCOUNTING
    (finding,) = [f for f in result.findings if f.severity == "accounting"]
    assert (finding.partner, finding.round, finding.line) == ("north", 3, 3)
    assert "epsilon_prv" in finding.message and f"{true!r}" in finding.message
    assert not [f for f in result.findings if f.severity == "budget"]
