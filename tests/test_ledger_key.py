"""One signing key per ledger: a partner refuses to append under another key than its ledger's entries were signed
with. Found by an adversarial review: after ``fedsocial keys --force`` between two rounds the partner kept charging
and sending, overwrote ``<id>.pub`` with the new key, and the audit then read the honest run as tampered (exit 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsocial.client.partner import PartnerError
from fedsocial.shared import signing
from tests.partner_run import ledger_of, make_partner
from tests.test_federation import tiny_config


def test_a_new_signing_key_mid_run_is_refused_and_the_public_key_kept(tmp_path: Path) -> None:
    # Prepare: round 1 charged under the partner's key, then the key file replaced
    partner = make_partner(tmp_path, tiny_config(rounds=2))
    _, initial = partner.initial_parameters()
    new, _, _ = partner.fit(initial, 1)
    before = ledger_of(tmp_path)
    pub = tmp_path / "run" / "ledgers" / "partner-0.pub"
    old_fingerprint = signing.fingerprint(signing.load_public_key(pub))
    key_file = partner.settings.state_dir / "ledger_signing.key"
    key_file.unlink()
    signing.load_or_create_keypair(key_file)  # what `fedsocial keys --force` leaves
    # Execute / Assert: refused, nothing charged or sent; the ledger and its public key unchanged
    with pytest.raises(PartnerError, match=r"signed with the key .* refusing to append under another key"):
        partner.fit(new, 2)
    assert ledger_of(tmp_path) == before
    assert signing.fingerprint(signing.load_public_key(pub)) == old_fingerprint
