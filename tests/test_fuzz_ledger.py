"""Issue 11 item 8: the ledger reader and the audit fuzzed with crafted ledgers (see tests/test_fuzz.py).

"A clear error or a correct result, never a traceback": mutations of a real signed ledger (crafted
field values re-signed with the partner's own key, dropped / reordered lines, flipped bytes, a torn
tail) go through the reader and verifier, and through the real ``fedsocial audit``, which must exit
with one of its codes and still write audit.json.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedsocial.shared import signing
from fedsocial.shared.privacy.ledger import Ledger, LedgerError, canonical_json, scan_ledger, signing_payload
from fedsocial.shared.privacy.ledger import verify_ledger as verify_entries
from fedsocial.simulations import audit
from tests.test_fuzz import PROFILE

# The audit recomputes epsilon per example: a tenth of the budget keeps it at a few seconds.
SLOW = settings(PROFILE, max_examples=max(5, PROFILE.max_examples // 10))


# ---- the ledger reader and verifier, and the audit on crafted ledgers ------------------------------------

def _ledger_run(root: Path) -> tuple[Path, Any]:
    """A run folder with one partner's real, signed 3-round ledger and its public key."""
    run = root / "run"
    (run / "ledgers").mkdir(parents=True)
    key, pub = signing.generate_keypair()
    signing.save_public_key(pub, run / "ledgers" / "partner-0.pub")
    ledger = Ledger(run / "ledgers" / "partner-0.jsonl", key, "partner-0")
    for r in (1, 2, 3):
        ledger.append_round(round=r, noise_multiplier=1.2, sample_rate=0.1, steps=20, max_grad_norm=0.1,
                            target_delta=1e-5, population=100, secure_rng=False)
    return run, key


@pytest.fixture(scope="module")
def ledger_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return _ledger_run(tmp_path_factory.mktemp("ledger"))


CRAFTED: st.SearchStrategy[Any] = st.sampled_from([10**400, 1e-300, -1, 0, 2**63, 1e308, "NaN", None, True, [],
                                                   {}, "x" * 200, float("nan"), float("inf")])


def _resign(entry: dict[str, Any], key: Any) -> dict[str, Any]:
    """A partner lying with its own key: the crafted entry carries a valid signature."""
    entry = {k: v for k, v in entry.items() if k != "signature"}
    try:
        payload = signing_payload(entry)
    except (TypeError, ValueError):  # nan/inf are not canonical JSON: left unsigned
        return entry
    entry["signature"] = base64.b64encode(signing.sign(key, payload)).decode("ascii")
    return entry


def _dump(entry: Mapping[str, Any]) -> str:
    try:
        return canonical_json(entry)
    except (TypeError, ValueError):
        return json.dumps(entry)  # writes NaN / Infinity, as a hand-edited file might


@st.composite
def crafted_ledgers(draw: st.DrawFn) -> tuple[str, list[Any]]:
    """A mutation of the template ledger: crafted field values (re-signed), dropped / duplicated /
    reordered lines, flipped bytes, a truncated tail."""
    kind = draw(st.sampled_from(["value", "value", "lines", "bytes", "truncate"]))
    fields = ["round", "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "target_delta", "population",
              "epsilon_rdp", "epsilon_prv", "partner_id", "prev_hash", "accountant", "secure_rng"]
    ops: list[Any] = [kind]
    if kind == "value":
        ops += [draw(st.integers(0, 2)), draw(st.sampled_from(fields)), draw(CRAFTED), draw(st.booleans())]
    elif kind == "lines":
        ops += [draw(st.permutations([0, 1, 2])), draw(st.integers(0, 3))]
    elif kind == "bytes":
        ops += [draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))]
    else:
        ops += [draw(st.integers(1, 200))]
    return kind, ops


def _apply(template: Path, key: Any, ops: list[Any], run: Path) -> None:
    shutil.copytree(template, run)
    path = run / "ledgers" / "partner-0.jsonl"
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    kind = ops[0]
    if kind == "value":
        _, i, field, value, resign = ops
        entry = json.loads(lines[i])
        entry[field] = value
        lines[i] = _dump(_resign(entry, key) if resign else entry)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif kind == "lines":
        order, drop = ops[1], ops[2]
        kept = [lines[j] for j in order if j != drop]
        path.write_text("\n".join(kept) + ("\n" if kept else ""), encoding="utf-8")
    elif kind == "bytes":
        data = bytearray(text.encode())
        for pos, byte in ops[1]:
            data[pos % len(data)] = byte
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(text.encode()[: -ops[1]])


@PROFILE
@given(crafted=crafted_ledgers())
@example(crafted=("value", ["value", 0, "noise_multiplier", 10**400, False]))  # found: OverflowError in the schema
@example(crafted=("value", ["value", 1, "epsilon_rdp", 10**400, True]))
def test_reading_and_verifying_any_crafted_ledger_gives_problems_never_a_traceback(
        tmp_path: Path, ledger_template: tuple[Path, Any], crafted: tuple[str, list[Any]]) -> None:
    template, key = ledger_template
    run = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
    _apply(template, key, crafted[1], run)
    path = run / "ledgers" / "partner-0.jsonl"
    try:
        scan = scan_ledger(path)
    except LedgerError as exc:
        assert exc.reason  # names partner / line
        return
    problems = verify_entries(scan.entries, signing.load_public_key(run / "ledgers" / "partner-0.pub"),
                              "partner-0", scan.lines, raw=scan.raw)
    assert all(str(p) for p in problems)


@SLOW
@given(crafted=crafted_ledgers())
def test_the_audit_of_any_crafted_ledger_exits_with_a_code_and_writes_audit_json(
        tmp_path: Path, ledger_template: tuple[Path, Any], crafted: tuple[str, list[Any]],
        capsys: pytest.CaptureFixture[str]) -> None:
    template, key = ledger_template
    run = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
    _apply(template, key, crafted[1], run)

    code = audit.main([str(run), "--max-epsilon", "8"])

    capsys.readouterr()
    assert code in (0, 2, 3, 4, 5)
    doc = json.loads((run / "audit.json").read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    assert math.isfinite(float(code))
