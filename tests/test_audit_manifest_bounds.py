"""A ledger is held to what the server's signed manifest registered for its partner: the delta the server held
its replies to, and the users it declared.

The server sees only an entry's hash, so a partner lying while the run goes on can record its entries at a
larger delta than it told the server (epsilon 3.2 at delta 1e-3 instead of 4.1 at 1e-5), or with another
population; the ledger's own signature and the heads then verify.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsocial.shared import signing
from fedsocial.shared.config import config_from_dict
from fedsocial.shared.privacy.audit import audit_run
from fedsocial.shared.privacy.ledger import Ledger
from fedsocial.shared.privacy.records import write_run_manifest
from fedsocial.simulations.audit import EXIT_BUDGET, EXIT_OK
from tests.server_records import sign_server_records

REGISTERED = {"num_users": 500, "max_epsilon": 8.0, "target_delta": 1e-5}


def _run(run: Path, delta: float, population: int, run_delta: float = 1e-5,
         registered: dict[str, float] | None = None, local_epochs: int = 1) -> None:
    """One partner's signed ledger of 3 rounds at ``delta`` / ``population`` (sample rate 0.05, 20 steps: one
    epoch), and the server's signed records registering it as ``registered`` (default ``REGISTERED``) in a run of
    ``run_delta`` and ``local_epochs``."""
    registered = REGISTERED if registered is None else registered
    key, pub = signing.generate_keypair()
    signing.save_public_key(pub, run / "ledgers" / "north.pub")
    ledger = Ledger(run / "ledgers" / "north.jsonl", key, "north")
    for r in (1, 2, 3):
        ledger.append_round(round=r, noise_multiplier=1.1, sample_rate=0.05, steps=20, max_grad_norm=0.1,
                            target_delta=delta, population=population, secure_rng=False, extra={"scope": "joint"})
    write_run_manifest(run, config_from_dict({"privacy": {"enabled": True, "max_epsilon": 8.0,
                                                          "target_delta": run_delta},
                                              "federation": {"local_epochs": local_epochs}}), {"north": registered})
    sign_server_records(run, {"north": registered})  # the manifest above is kept; heads and checkpoint signed


def test_entries_at_the_registered_delta_and_users_audit_clean(tmp_path: Path) -> None:
    # Prepare
    _run(tmp_path, 1e-5, 500)
    # Execute
    result = audit_run(tmp_path)
    # Assert
    assert result.exit_code == EXIT_OK, [str(f) for f in result.findings]
    assert not [f for f in result.findings if f.severity == "warning" and "population" in f.message]
    assert result.records["signed_declarations"] == {"north": {"target_delta": 1e-5, "num_users": 500}}


@pytest.mark.parametrize("run_delta", [1e-5, 1e-6])
def test_entries_at_a_larger_delta_than_the_signed_one_are_a_budget_finding(tmp_path: Path, run_delta: float) -> None:
    # Prepare: north registered delta 1e-5 (the run's 1e-5 or 1e-6 is tighter still); its ledger says 1e-3,
    # below 1/population, so nothing else objects (was: exit 0 with the epsilon of the weaker guarantee)
    _run(tmp_path, 1e-3, 500, run_delta)
    # Execute
    result = audit_run(tmp_path)
    # Assert
    assert result.exit_code == EXIT_BUDGET
    found = [f for f in result.findings if f.severity == "budget"]
    assert [f.round for f in found] == [1, 2, 3]
    assert f"above {run_delta!r}, the delta the signed run_manifest.json" in found[0].message


def test_a_smaller_delta_than_the_signed_one_is_conservative(tmp_path: Path) -> None:
    _run(tmp_path, 1e-7, 500)

    result = audit_run(tmp_path)

    assert result.exit_code == EXIT_OK, [str(f) for f in result.findings]


def test_a_population_other_than_the_registered_users_is_named(tmp_path: Path) -> None:
    # Prepare: the ledger says 600 users, the partner registered 500
    _run(tmp_path, 1e-5, 600)
    # Execute
    result = audit_run(tmp_path)
    # Assert: a warning per entry (a partner's users may change between restarts), no verdict changed
    warned = [f for f in result.findings if f.severity == "warning" and "registered" in f.message]
    assert [f.round for f in warned] == [1, 2, 3] and "population 600 differs from the 500 users" in warned[0].message
    assert result.exit_code == EXIT_OK


def test_delta_is_held_below_one_over_the_registered_users_too(tmp_path: Path) -> None:
    # Prepare: a run that allows delta 1e-2, north registered 500 users at 3e-3; its ledger claims 300 users, for
    # which 3e-3 < 1/300 holds, but 3e-3 >= 1/500 for the users it registered
    _run(tmp_path, 3e-3, 300, run_delta=1e-2, registered={"num_users": 500, "max_epsilon": 8.0, "target_delta": 3e-3})
    # Execute
    result = audit_run(tmp_path)
    # Assert
    found = [f for f in result.findings if f.severity == "budget"]
    assert [f.round for f in found] == [1, 2, 3] and all("the registered users" in f.message for f in found)
    assert result.exit_code == EXIT_BUDGET



def test_a_sample_rate_below_one_user_per_batch_is_a_budget_finding(tmp_path: Path) -> None:
    # Prepare: sample rate 0.05 over a population of 10 (Opacus's rate is 1/ceil(n/batch) >= 1/10; was: exit 0
    # with the epsilon of an amplification no loader gives), registered as 10 users
    _run(tmp_path, 1e-5, 10, registered={"num_users": 10, "max_epsilon": 8.0, "target_delta": 1e-5})
    # Execute
    result = audit_run(tmp_path)
    # Assert
    assert result.exit_code == EXIT_BUDGET
    found = [f for f in result.findings if f.severity == "budget"]
    assert [f.round for f in found] == [1, 2, 3] and "below 1/population = 1/10" in found[0].message


def test_steps_other_than_the_signed_local_epochs_take_are_named(tmp_path: Path) -> None:
    # Prepare: the run signed 2 local epochs; north's entries charge 20 steps at rate 0.05, one epoch
    _run(tmp_path, 1e-5, 500, local_epochs=2)
    # Execute
    result = audit_run(tmp_path)
    # Assert: a warning per entry (a deployed partner may run its own schedule), the verdict unchanged
    warned = [f for f in result.findings if "local epochs" in f.message]
    assert [(f.severity, f.round) for f in warned] == [("warning", 1), ("warning", 2), ("warning", 3)]
    assert "20 steps at sample rate 0.05: 2 local epochs" in warned[0].message and "take 40" in warned[0].message
    assert result.exit_code == EXIT_OK
