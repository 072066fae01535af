"""Every release charged exactly once, with the parameters it really used, at every crash point (issue 11 item 1).

A real child process (tests/partner_child.py: partner 0 of the tiny federation plus the coordinator's
part around it) is killed at each named boundary with ``os._exit(137)`` (shared/faults.py: no
cleanup, as SIGKILL) and resumed. What really left the partner is counted from the replies it
sent; the audit's epsilon must equal the epsilon of exactly those distinct releases.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedsocial.shared.trainer  # noqa: F401  (imported once here, so that every forked child inherits it)
from fedsocial.client.partner import Partner, PartnerError, settings_from_context
from fedsocial.client.state import release_path
from fedsocial.shared.config import ConfigError
from fedsocial.shared.faults import KILLED
from fedsocial.shared.privacy.accounting import compute_epsilon
from fedsocial.shared.privacy.audit import EXIT_OK, audit_run
from fedsocial.shared.privacy.ledger import read_ledger
from fedsocial.shared.privacy.round import compute_plan_mismatches, plan_round
from fedsocial.simulations.simulate import write_config
from tests.test_federation import tiny_config


def _child_main(config: str, run: str, fault: str | None, stderr: str) -> None:
    fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(fd, "w", buffering=1)  # pytest's capture object is not fd 2
    os.environ.pop("FEDSOCIAL_FAULT", None)
    if fault:
        os.environ["FEDSOCIAL_FAULT"] = fault
    from tests import partner_child

    rc = partner_child.main(config, run)
    sys.stderr.flush()
    os._exit(rc)


def child(config: Path, run: Path, fault: str | None = None) -> tuple[int | None, str]:
    """Run tests/partner_child.py in a forked process (the imports are already paid for: a fresh
    interpreter costs 10-20 s here); ``os._exit`` at a fault kills only that process."""
    run.mkdir(parents=True, exist_ok=True)
    stderr = run.parent / f"stderr-{len(list(run.parent.glob('stderr-*')))}.txt"
    proc = multiprocessing.get_context("fork").Process(target=_child_main, args=(str(config), str(run), fault,
                                                                                 str(stderr)))
    proc.start()
    proc.join(300)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail("the child process hung")
    return proc.exitcode, stderr.read_text() if stderr.is_file() else ""


def replies(run: Path) -> list[dict[str, Any]]:
    path = run / "replies.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def spent(run: Path) -> float:
    """The epsilon of what really left: one event per distinct release (a re-sent release is the same one)."""
    distinct = {(r["round"], r["digest"]): (r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in replies(run)}
    return compute_epsilon(list(distinct.values()), 1e-4)


def ledger(run: Path) -> list[dict[str, Any]]:
    return read_ledger(run / "ledgers" / "partner-0.jsonl")


def audited_epsilon(run: Path) -> float:
    result = audit_run(run)
    assert result.exit_code == EXIT_OK, [str(f) for f in result.findings]
    assert result.records["metrics"]["verified"] is True  # the resumed coordinator re-signed its metrics.json
    (report,) = result.partners
    return report.epsilon


def small_config(**federation: Any) -> Any:
    return tiny_config(**federation).replace("train", num_threads=1)  # one thread: fork-safe and fair on 2 cores


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(small_config(), tmp_path / "cfg")


def test_killed_before_the_ledger_append_nothing_left_and_the_rerun_is_charged_once(tmp_path: Path,
                                                                                     config: Path) -> None:
    run = tmp_path / "run"
    # Execute: killed after training round 2, before its entry; then resumed
    killed = child(config, run, "before_ledger_append:2")
    after_kill = (len(ledger(run)), [r["round"] for r in replies(run)])
    resumed = child(config, run)
    # Assert
    assert killed[0] == KILLED, killed[1]
    assert after_kill == (1, [1])  # round 2 neither charged nor released
    assert resumed[0] == 0, resumed[1]
    assert [e["round"] for e in ledger(run)] == [1, 2]
    assert [r["round"] for r in replies(run)] == [1, 2]
    assert audited_epsilon(run) == pytest.approx(spent(run), rel=1e-9)


def test_killed_after_the_append_a_changed_resume_is_refused_and_the_same_one_resends_the_release(
    tmp_path: Path, config: Path
) -> None:
    run = tmp_path / "run"
    changed = write_config(small_config(local_epochs=2), tmp_path / "changed")
    # Execute: killed after round 2 was charged and before its reply left; resumed with more local
    # epochs (refused), then with the run's own settings
    killed = child(config, run, "after_ledger_append:2")
    sent_before = [r["round"] for r in replies(run)]
    refused = child(changed, run)
    entries_after_refusal = ledger(run)
    resumed = child(config, run)
    # Assert
    assert killed[0] == KILLED and sent_before == [1]  # charged, not sent
    assert refused[0] == 3, refused[1]
    assert "federation.local_epochs: round 2 was released with 1, this run has 2" in refused[1]
    assert "steps:" in refused[1]  # and what that changes in the mechanism
    assert len(entries_after_refusal) == 2
    assert resumed[0] == 0, resumed[1]
    entries, sent = ledger(run), replies(run)
    assert [e["round"] for e in entries] == [1, 2] and [r["round"] for r in sent] == [1, 2]
    assert sent[1]["digest"] == entries[1]["release_sha256"]  # the very release that was charged
    assert audited_epsilon(run) == pytest.approx(spent(run), rel=1e-9)


def test_killed_after_the_reply_before_the_checkpoint_the_rerun_resends_it_bit_for_bit(tmp_path: Path,
                                                                                       config: Path) -> None:
    run = tmp_path / "run"
    # Execute: round 2's reply left, then the coordinator died before checkpointing round 2
    killed = child(config, run, "before_checkpoint:2")
    resumed = child(config, run)
    # Assert: round 2 ran twice on the server's side, one release left twice, one entry
    assert killed[0] == KILLED, killed[1]
    assert resumed[0] == 0, resumed[1]
    sent = replies(run)
    assert [r["round"] for r in sent] == [1, 2, 2]
    assert sent[1]["digest"] == sent[2]["digest"] and sent[1]["ledger_head"] == sent[2]["ledger_head"]
    assert [e["round"] for e in ledger(run)] == [1, 2]
    assert audited_epsilon(run) == pytest.approx(spent(run), rel=1e-9)
    assert sent[2]["epsilon"] == pytest.approx(spent(run), rel=1e-9)


def test_a_charged_round_whose_release_is_lost_is_refused_not_released_again(tmp_path: Path) -> None:
    # Prepare: round 1 trained and charged, then its saved release removed
    config = write_config(tiny_config(), tmp_path / "run")
    partner = Partner(settings_from_context({"config-path": str(config), "run-dir": str(tmp_path / "run")},
                                            {"partition-id": 1, "num-partitions": 3}))
    _, initial = partner.initial_parameters()
    first, _, _ = partner.fit(initial, 1)
    again, _, _ = partner.fit(initial, 1)
    release_path(partner.settings.state_dir, 1).unlink()
    # Execute / Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))  # bit-for-bit, not approx
    with pytest.raises(PartnerError, match="not on this partner's disk"):
        partner.fit(initial, 1)
    assert len(read_ledger(tmp_path / "run" / "ledgers" / "partner-1.jsonl")) == 1


def test_secure_rng_rounds_are_resent_too(tmp_path: Path) -> None:
    # A secure-RNG round cannot be re-trained identically; re-sending its saved release needs no re-training.
    cfg = tiny_config().replace("privacy", secure_rng=True)
    config = write_config(cfg, tmp_path / "run")
    partner = Partner(settings_from_context({"config-path": str(config), "run-dir": str(tmp_path / "run")},
                                            {"partition-id": 2, "num-partitions": 3}))
    _, initial = partner.initial_parameters()
    try:
        first, _, m1 = partner.fit(initial, 1)
    except Exception as exc:  # Opacus's secure RNG needs torchcsprng, which may not be installed
        pytest.skip(f"secure RNG unavailable here: {exc}")
    again, _, m2 = partner.fit(initial, 1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True)) and m1 == m2


class _Privacy:
    """The fields of PrivacyConfig that plan_round reads."""

    def __init__(self, **kw: Any) -> None:
        defaults = {"noise_multiplier": 0.0, "max_grad_norm": 0.1, "target_delta": 1e-5, "max_epsilon": 8.0,
                    "accountant": "rdp", "scope": "joint", "popularity_noise_multiplier": 0.0}
        self.__dict__.update({**defaults, **kw})


def test_plan_known_values_and_a_changed_round_count_is_named() -> None:
    # Known values: q = 1/ceil(1000/40) = 0.04, 1/q = 25 steps per epoch; sigma 1.5 fixed
    fixed = plan_round(_Privacy(noise_multiplier=1.5), n_users=1000, batch_size=40, epochs=90, rounds=1)
    assert (fixed.sample_rate, fixed.steps) == (0.04, 2250)
    assert compute_epsilon([fixed.event], 1e-5) == pytest.approx(7.32911117143, rel=1e-9)
    # A calibrated plan depends on the number of rounds: changing it changes sigma, and is named
    two = plan_round(_Privacy(), n_users=1000, batch_size=40, epochs=1, rounds=2)
    three = plan_round(_Privacy(), n_users=1000, batch_size=40, epochs=1, rounds=3)
    entry = {"round": 2, "settings": dict(two.settings), **{k: getattr(two, k) for k in
                                                           ("noise_multiplier", "sample_rate", "steps",
                                                            "max_grad_norm", "target_delta")}}
    problems = compute_plan_mismatches(three, entry)
    assert compute_plan_mismatches(two, entry) == []
    assert any(p.startswith("federation.rounds: round 2 was released with 2, this run has 3") for p in problems)
    assert any(p.startswith("noise_multiplier:") for p in problems)
    assert compute_epsilon([two.event] * 2, 1e-5) <= 8.0 < compute_epsilon([two.event] * 3, 1e-5)


def test_an_infinite_cap_with_dp_is_refused() -> None:
    with pytest.raises((ConfigError, ValueError), match="max_epsilon"):
        plan_round(_Privacy(max_epsilon=float("inf")), n_users=100, batch_size=10, epochs=1, rounds=1)


def test_simulate_resume_refuses_settings_that_change_a_released_round(tmp_path: Path) -> None:
    # Prepare: partner 0 released rounds 1 and 2; the coordinator checkpointed round 1 only
    from fedsocial.shared.privacy.round import check_resume

    cfg = small_config()
    config = write_config(cfg, tmp_path / "run")
    partner = Partner(settings_from_context({"config-path": str(config), "run-dir": str(tmp_path / "run")},
                                            {"partition-id": 0, "num-partitions": 3}))
    _, initial = partner.initial_parameters()
    first, _, _ = partner.fit(initial, 1)
    partner.fit(first, 2)
    # Execute / Assert: re-running round 2 with other local epochs or batch size is refused, naming them
    with pytest.raises(ConfigError, match=r"federation\.local_epochs: partner-0 already released round 2 with 1, "
                                          r"the resume asks 3"):
        check_resume(tmp_path / "run", 1, small_config(local_epochs=3))
    with pytest.raises(ConfigError, match=r"federation\.local_batch_size"):
        check_resume(tmp_path / "run", 1, small_config(local_batch_size=5))
    check_resume(tmp_path / "run", 1, cfg)  # the run's own settings: fine
    check_resume(tmp_path / "run", 2, small_config(local_epochs=3))  # only future rounds change: charged as used
