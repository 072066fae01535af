"""Distributed noise: a charged Skellam share is re-sent only into the very set of partners it was released into.

Regression (privacy review): a partner re-sent its charged share whenever the server asked again for a released
round. Re-run with a smaller set of contributors (still >= t), the difference of the two released sums is the
missing partners' contributions with only their shares' noise (mu / t each, not mu): a release nobody charged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.common import ndarrays_to_parameters

from fedsocial.client.flower import FedSocialClient
from fedsocial.client.partner import Partner, PartnerError, settings_from_context
from fedsocial.client.state import load_release, release_path
from fedsocial.server.strategy import FedSocialStrategy
from fedsocial.shared import protocol
from fedsocial.shared.config import config_from_dict
from fedsocial.shared.privacy.ledger import read_ledger, refusals_path
from fedsocial.simulations.simulate import write_config
from tests.test_distributed_federation import PARTNERS, tiny_raw
from tests.test_strategy import NAMES, _registrations
from tests.test_wire_robustness import INITIAL, _manager

ALL = ("partner-0", "partner-1", "partner-2")
FEWER = ("partner-0", "partner-1")  # still t = 2 of them: the server's own checks would pass


def _partner(run: Path) -> Partner:
    """Partner 0 of the tiny distributed federation, as a ClientApp process builds it (state on disk only)."""
    config = run / "config.toml"
    if not config.is_file():
        write_config(config_from_dict(tiny_raw()), run)
    return Partner(settings_from_context({"config-path": str(config), "run-dir": str(run)},
                                         {"partition-id": 0, "num-partitions": PARTNERS}))


def _ins(contributors: tuple[str, ...] | None) -> dict[str, Any]:
    return protocol.FitInstructions(1, 1.0, 3, None, None, True, True, contributors).to_config()


def _training(run: Path) -> list[dict[str, Any]]:
    entries = read_ledger(run / "ledgers" / "partner-0.jsonl")
    return [e for e in entries if e.get("release", "training") == "training"]


def _refusals(run: Path) -> list[dict[str, Any]]:
    path = refusals_path(run / "ledgers" / "partner-0.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_a_share_is_re_sent_bit_for_bit_into_the_same_set_and_charged_once(tmp_path: Path) -> None:
    # Prepare: round 1's share released into the sum over all three partners
    partner = _partner(tmp_path / "run")
    initial = partner.initial_parameters()[1]
    first, w1, m1 = FedSocialClient(partner).fit(initial, _ins(ALL))
    # Execute: the server asks again for round 1 over the same set (named in another order)
    again, w2, m2 = FedSocialClient(partner).fit(initial, _ins(tuple(reversed(ALL))))
    # Assert: the identical bytes, the same accounting, one ledger entry, no refusal
    assert [a.dtype for a in first] == [a.dtype for a in again]
    assert [a.tobytes() for a in first] == [a.tobytes() for a in again]
    assert (w1, m1) == (w2, m2)
    assert [e["round"] for e in _training(tmp_path / "run")] == [1]
    assert _refusals(tmp_path / "run") == []


@pytest.mark.parametrize("asked,named", [(FEWER, "over {partner-0, partner-1}"), (None, "no named set")])
def test_a_share_is_not_re_sent_into_another_set(tmp_path: Path, asked: tuple[str, ...] | None, named: str) -> None:
    # Prepare: round 1's share released into the sum over all three partners
    run = tmp_path / "run"
    partner = _partner(run)
    initial = partner.initial_parameters()[1]
    FedSocialClient(partner).fit(initial, _ins(ALL))
    saved = release_path(partner.settings.state_dir, 1).read_bytes()
    # Execute / Assert: the repeat request over a smaller set (or an unnamed one) is refused, naming both sets
    with pytest.raises(PartnerError, match=r"round 1's share was released and charged into the sum over "
                                           r"\{partner-0, partner-1, partner-2\}; asked again for a sum "):
        FedSocialClient(partner).fit(initial, _ins(asked))
    # Assert: nothing new charged, nothing drawn again, the refusal logged beside the ledger as budget refusals are
    assert [e["round"] for e in _training(run)] == [1]
    assert release_path(partner.settings.state_dir, 1).read_bytes() == saved
    (refusal,) = _refusals(run)
    assert refusal["round"] == 1 and refusal["partner_id"] == "partner-0"
    assert "{partner-0, partner-1, partner-2}" in refusal["reason"] and named in refusal["reason"]
    assert refusal["epsilon_next"] == refusal["epsilon_spent"] == pytest.approx(_training(run)[0]["epsilon_rdp"])


def test_the_recorded_set_survives_a_restart_of_the_partner(tmp_path: Path) -> None:
    # Prepare: round 1 released by one Partner; its set is on the partner's disk, 0600, with the share
    run = tmp_path / "run"
    first_life = _partner(run)
    initial = first_life.initial_parameters()[1]
    sent, _, _ = FedSocialClient(first_life).fit(initial, _ins(ALL))
    path = release_path(first_life.settings.state_dir, 1)
    saved = load_release(first_life.settings.state_dir, 1)
    # Execute: a new Partner (what a restarted ClientApp process builds: nothing carried over in memory)
    second_life = _partner(run)
    with pytest.raises(PartnerError, match=r"\{partner-0, partner-1\}"):
        FedSocialClient(second_life).fit(initial, _ins(FEWER))
    again, _, _ = FedSocialClient(second_life).fit(initial, _ins(ALL))
    # Assert
    assert second_life is not first_life
    assert path.stat().st_mode & 0o777 == 0o600
    assert saved is not None and saved[2]["contributors"] == list(ALL)
    assert [a.tobytes() for a in again] == [a.tobytes() for a in sent]
    assert [e["round"] for e in _training(run)] == [1] and len(_refusals(run)) == 1


@pytest.mark.parametrize("asked,match", [
    (None, "does not name the partners"),
    (("partner-1", "partner-2"), "without this partner"),
    (("partner-0",), "fewer than the 2 shares"),
])
def test_a_fresh_share_needs_a_named_set_of_at_least_t_partners_with_this_one(
        tmp_path: Path, asked: tuple[str, ...] | None, match: str) -> None:
    # Prepare
    run = tmp_path / "run"
    partner = _partner(run)
    # Execute / Assert: refused before anything is drawn or charged
    with pytest.raises(PartnerError, match=match):
        FedSocialClient(partner).fit(partner.initial_parameters()[1], _ins(asked))
    assert not (run / "ledgers" / "partner-0.jsonl").is_file() or _training(run) == []
    assert not release_path(partner.settings.state_dir, 1).exists()


def test_the_server_names_the_secure_sums_contributors_under_distributed_noise(tmp_path: Path) -> None:
    # Prepare: three registered partners, partner-1 out of budget
    cfg = config_from_dict(tiny_raw())
    strategy = FedSocialStrategy(cfg, tmp_path, NAMES, INITIAL, registrations=_registrations(PARTNERS), secagg=True)
    # Execute
    fit_ins = strategy.configure_fit(1, ndarrays_to_parameters([]), _manager([True, False, True]))
    # Assert: every contributor is told the same set, the one its share enters
    assert [ins.config["contributors"] for _, ins in fit_ins] == ["partner-0,partner-2"] * 2
    parsed = protocol.parse_fit_instructions(fit_ins[0][1].config, 3)
    assert isinstance(parsed, protocol.FitInstructions) and parsed.contributors == ("partner-0", "partner-2")


def test_the_contributor_set_is_parsed_strictly() -> None:
    # Prepare
    base = protocol.FitInstructions(1, 1.0).to_config()
    # Execute
    good = protocol.parse_fit_instructions({**base, "contributors": "b,a"}, 3)
    bad = [protocol.parse_fit_instructions({**base, "contributors": v}, 3) for v in ("", "a,a", "a,,b", "a b", 3)]
    # Assert: a set (sorted), never an empty, repeated or malformed one; absent means none named
    assert isinstance(good, protocol.FitInstructions) and good.contributors == ("a", "b")
    assert all(isinstance(r, protocol.Rejected) and "contributors" in str(r) for r in bad)
    plain = protocol.parse_fit_instructions(base, 3)
    assert isinstance(plain, protocol.FitInstructions) and plain.contributors is None
    assert "contributors" not in base
