"""Distributed noise: a charged Skellam share enters one secure sum only.

Regression (privacy review): a partner re-sent its charged share whenever the server asked again for a released
round. Re-run with a smaller set of contributors (still >= t), or with the same set and one partner unmasked
as a dropout in one session only, the difference of the two released sums is the missing partners'
contributions with only their shares' noise (mu / t each, not mu): a release nobody charged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.common import Code, GetPropertiesRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager

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
from tests.test_wire_robustness import INITIAL, _IntentProxy, _manager

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


@pytest.mark.parametrize("asked,named", [(ALL, "over {partner-0, partner-1, partner-2}"),
                                         (FEWER, "over {partner-0, partner-1}"), (None, "no named set")])
def test_a_released_share_never_enters_a_second_sum(tmp_path: Path, asked: tuple[str, ...] | None,
                                                     named: str) -> None:
    # Prepare: round 1's share released into the sum over all three partners
    run = tmp_path / "run"
    partner = _partner(run)
    initial = partner.initial_parameters()[1]
    FedSocialClient(partner).fit(initial, _ins(ALL))
    saved = release_path(partner.settings.state_dir, 1).read_bytes()
    # Execute / Assert: asked again, over the same set, a smaller one or none, it is refused naming both
    with pytest.raises(PartnerError, match=r"round 1's share was released and charged into the sum over "
                                           r"\{partner-0, partner-1, partner-2\}; asked again "):
        FedSocialClient(partner).fit(initial, _ins(asked))
    # Assert: nothing new charged, nothing drawn again, the refusal logged beside the ledger as budget refusals are
    assert [e["round"] for e in _training(run)] == [1]
    assert release_path(partner.settings.state_dir, 1).read_bytes() == saved
    (refusal,) = _refusals(run)
    assert refusal["round"] == 1 and refusal["partner_id"] == "partner-0"
    assert "{partner-0, partner-1, partner-2}" in refusal["reason"] and named in refusal["reason"]
    assert refusal["epsilon_next"] == refusal["epsilon_spent"] == pytest.approx(_training(run)[0]["epsilon_rdp"])


def test_the_refusal_survives_a_restart_and_the_intent_declines_the_round(tmp_path: Path) -> None:
    # Prepare: round 1 released by one Partner; its set is on the partner's disk, 0600, with the share
    run = tmp_path / "run"
    first_life = _partner(run)
    initial = first_life.initial_parameters()[1]
    FedSocialClient(first_life).fit(initial, _ins(ALL))
    path = release_path(first_life.settings.state_dir, 1)
    saved = load_release(first_life.settings.state_dir, 1)
    # Execute: a new Partner (what a restarted ClientApp process builds: nothing carried over in memory)
    second_life = _partner(run)
    intent = protocol.parse_intent(FedSocialClient(second_life).get_properties({"round": 1}), 1)
    with pytest.raises(PartnerError, match=r"a share enters one secure sum only"):
        FedSocialClient(second_life).fit(initial, _ins(ALL))
    # Assert: the SecAgg+ intent says "released", not "out of budget", so the server does not count it
    assert second_life is not first_life
    assert isinstance(intent, protocol.Intent) and intent.released and not intent.will_train
    assert path.stat().st_mode & 0o777 == 0o600
    assert saved is not None and saved[2]["contributors"] == list(ALL)
    assert [e["round"] for e in _training(run)] == [1] and len(_refusals(run)) == 1


def test_an_intent_that_is_both_released_and_training_is_rejected() -> None:
    # Execute
    parsed = protocol.parse_intent({"partner_id": "partner-0", "round": 2, "will_train": 1, "released": 1}, 2)
    plain = protocol.parse_intent({"partner_id": "partner-0", "round": 2, "will_train": 0, "released": 1}, 2)

    # Assert
    assert isinstance(parsed, protocol.Rejected)
    assert isinstance(plain, protocol.Intent) and plain.released


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


class _ReleasedProxy(_IntentProxy):
    """A partner that already released the round's share (a resumed server asking again)."""

    def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        intent = protocol.Intent(f"partner-{self.node_id}", int(ins.config["round"]), False, True)
        return GetPropertiesRes(Status(Code.OK, ""), intent.to_metrics())


def test_a_resumed_server_does_not_count_released_partners_and_skips_a_round_too_few_can_form(tmp_path: Path) -> None:
    # Prepare: three registered partners; two already released round 1's share before the server crashed
    cfg = config_from_dict(tiny_raw())
    strategy = FedSocialStrategy(cfg, tmp_path, NAMES, INITIAL, registrations=_registrations(PARTNERS), secagg=True)
    manager = SimpleClientManager()
    manager.register(_IntentProxy(0, True))
    for node in (1, 2):
        manager.register(_ReleasedProxy(node, False))

    # Execute
    fit_ins = strategy.configure_fit(1, ndarrays_to_parameters([]), manager)

    # Assert: nobody is asked (one fresh share alone would be a sum of one); released ones are not "out of budget"
    assert fit_ins == []
    assert strategy._round["released_before"] == ["partner-1", "partner-2"]
    assert strategy._round["budget_exhausted"] == [] and "skipped" in strategy._round


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
