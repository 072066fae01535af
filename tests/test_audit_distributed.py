"""The audit of distributed-noise runs (privacy.distributed_noise) against ledgers a lying partner signs itself.

Each case is a hand-built run folder whose server records (manifest, heads, model) are honest and whose partner
ledgers verify under their own keys, but whose Skellam descriptions do not back what the signed manifest says:
regressions of a red-team pass, each of which used to audit clean (exit 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedsocial.server.checkpoint import Checkpoint, save_checkpoint
from fedsocial.shared import signing
from fedsocial.shared.config import config_from_dict
from fedsocial.shared.privacy import distributed as dn
from fedsocial.shared.privacy.audit import EXIT_ACCOUNTING, EXIT_OK, EXIT_TAMPER, audit_run
from fedsocial.shared.privacy.ledger import Ledger, entry_hash, read_ledger
from fedsocial.shared.privacy.records import compute_params_sha256, write_run_manifest, write_signed_heads
from tests.server_records import MODEL_NAMES, model_arrays

PARTNERS, USERS, SIGMA, CLIP, BITS, DELTA = 3, 50, 2.0, 0.5, 16, 1e-4
DIM = sum(int(a.size) for a in model_arrays())  # the trained shared coordinates of the stand-in model


def _config() -> Any:
    return config_from_dict({
        "privacy": {"enabled": True, "max_grad_norm": CLIP, "target_delta": DELTA, "max_epsilon": 8.0,
                    "distributed_noise": True, "accountant": "rdp_int", "grid_bits": BITS, "scope": "joint"},
        "federation": {"partners": PARTNERS, "rounds": 3, "local_epochs": 1, "min_partners": 2},
        "secagg": {"enabled": True, "num_shares": 3, "reconstruction_threshold": 2},
    })


def _run(tmp_path: Path, description: dict[str, Any] | None = None, accountant: str = "rdp_int",
         scope: str | None = "joint") -> Path:
    """Three partners' ledgers of three distributed rounds each (``description``: the Skellam fields each entry
    records, default the honest ones for t = 2), then the server's manifest, model and heads."""
    run = tmp_path / "run"
    honest = dn.compute_share_plan(SIGMA, CLIP, BITS, DIM, 2, PARTNERS).to_record()
    extra = {**(honest if description is None else description), **({"scope": scope} if scope else {})}
    for i in range(PARTNERS):
        pid = f"partner-{i}"
        key, pub = signing.generate_keypair()
        signing.save_public_key(pub, run / "ledgers" / f"{pid}.pub")
        ledger = Ledger(run / "ledgers" / f"{pid}.jsonl", key, pid)
        for r in (1, 2, 3):
            ledger.append_round(round=r, noise_multiplier=SIGMA, sample_rate=1.0, steps=1, max_grad_norm=CLIP,
                                target_delta=DELTA, population=USERS, secure_rng=False, accountant=accountant,
                                extra=extra)
    write_run_manifest(run, _config(), {f"partner-{i}": {"num_users": USERS} for i in range(PARTNERS)})
    arrays = model_arrays()
    save_checkpoint(run, Checkpoint(3, MODEL_NAMES, arrays, {}))
    heads = {f"partner-{i}": {"round": 3, "hash": entry_hash(read_ledger(run / "ledgers" / f"partner-{i}.jsonl")[-1])}
             for i in range(PARTNERS)}
    write_signed_heads(run, 3, heads, compute_params_sha256(MODEL_NAMES, arrays))
    return run


def _findings(run: Path) -> tuple[int, str]:
    result = audit_run(run)
    return result.exit_code, "\n".join(str(f) for f in result.findings)


def test_honest_distributed_ledgers_audit_clean(tmp_path: Path) -> None:
    # Execute
    code, text = _findings(_run(tmp_path))
    # Assert
    assert code == EXIT_OK, text


def test_negative_contributors_times_a_negative_share_is_a_schema_finding(tmp_path: Path) -> None:
    # Prepare: shares claimed for t = -10 with a negative variance: their product is the honest one for t = 10
    plan = dn.compute_share_plan(SIGMA, CLIP, BITS, DIM, 10, 10).to_record()
    forged = {**plan, "contributors": -10, "share_variance": -float(plan["share_variance"])}
    # Execute
    code, text = _findings(_run(tmp_path, forged))
    # Assert
    assert code == EXIT_TAMPER, text
    assert "schema: distributed noise: contributors must be an integer in [1, 10**6], got -10" in text
    assert "share_variance must be a finite number > 0" in text


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_skellam_rounds_accounted_other_than_at_integer_orders_are_an_accounting_finding(
        tmp_path: Path, accountant: str) -> None:
    # Execute: the same honest shares, the epsilon of record from PRV or fractional RDP orders (smaller)
    code, text = _findings(_run(tmp_path, accountant=accountant))
    # Assert
    assert code == EXIT_ACCOUNTING, text
    assert f"distributed noise accounted by {accountant!r}: the Skellam bound holds only at integer RDP orders" in text


def test_a_training_entry_without_the_skellam_description_in_a_distributed_run_is_an_accounting_finding(
        tmp_path: Path) -> None:
    # Execute: entries that record a noise multiplier but no mechanism, in a run whose signed manifest says
    # the noise is distributed
    code, text = _findings(_run(tmp_path, description={}))
    # Assert
    assert code == EXIT_ACCOUNTING, text
    assert "a training entry without the Skellam description" in text


def test_a_grid_other_than_the_signed_one_is_an_accounting_finding(tmp_path: Path) -> None:
    # Prepare: a self-consistent description on a grid of C / 2 (sensitivities and variances to match), against
    # the signed C / 2**16 the server decodes with
    coarse = dn.compute_share_plan(SIGMA, CLIP, 1, DIM, 2, PARTNERS).to_record()
    # Execute
    code, text = _findings(_run(tmp_path, coarse))
    # Assert
    assert code == EXIT_ACCOUNTING, text
    assert "but the signed manifest's grid is" in text


def test_entries_without_a_scope_in_a_run_whose_manifest_names_one_are_tampering(tmp_path: Path) -> None:
    # Execute
    code, text = _findings(_run(tmp_path, scope=None))
    # Assert
    assert code == EXIT_TAMPER, text
    assert "ledger entries name no privacy scope (first at line 1), in a run whose signed manifest says 'joint'" in text
