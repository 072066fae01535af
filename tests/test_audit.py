"""End-to-end tests of ``fedsocial audit`` on run directories holding real signed ledgers."""

from __future__ import annotations

import html
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from fedsocial.shared import signing
from fedsocial.shared.privacy.accounting import compute_epsilon
from fedsocial.shared.privacy.ledger import Ledger, entry_hash, read_ledger
from fedsocial.simulations.audit import EXIT_ACCOUNTING, EXIT_BUDGET, EXIT_INPUT, EXIT_OK, EXIT_TAMPER, main, run_audit
from tests.server_records import metrics_doc, sign_metrics, sign_server_records

PARTNERS = {  # partner: (sigma, q, steps per round, users, rounds)
    "north": (1.2, 0.1, 10, 800, [1, 2, 3]),
    "south": (0.9, 0.2, 5, 400, [1, 3]),
}
DELTA = 1e-4
NUMERIC_FIELDS = ("round", "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "target_delta",
                  "epsilon_rdp", "epsilon_prv", "population")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as the federation writes it: ledgers, public keys, declarations, config."""
    run = tmp_path_factory.mktemp("run")
    ledgers = run / "ledgers"
    for pid, (sigma, q, steps, users, rounds) in PARTNERS.items():
        key, pub = signing.generate_keypair()
        signing.save_public_key(pub, ledgers / f"{pid}.pub")
        ledger = Ledger(ledgers / f"{pid}.jsonl", key, pid)
        for r in rounds:
            ledger.append_round(round=r, noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=0.1,
                                target_delta=DELTA, population=users, secure_rng=True, extra={"scope": "joint"})
        (ledgers / f"{pid}.json").write_text(json.dumps({"max_epsilon": 8.0, "target_delta": DELTA,
                                                         "population": users}))
    (run / "config.json").write_text(json.dumps({"privacy": {"max_epsilon": 8.0, "select_on_validation": False},
                                                 "secagg": {"enabled": False}}))
    largest = max(read_ledger(ledgers / f"{pid}.jsonl")[-1]["epsilon_rdp"] for pid in PARTNERS)
    sign_server_records(run, {pid: {"num_users": users, "max_epsilon": 8.0, "target_delta": DELTA}
                              for pid, (_, _, _, users, _) in PARTNERS.items()},
                        metrics={"ndcg@10": 0.1, "epsilon": largest, "delta": DELTA})  # signed, as the server does
    return run


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "run"))


def audit(run: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main([str(run), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_clean_run_passes_and_writes_a_self_contained_report(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code, output = audit(run, capsys)
    # Assert: exit 0, both files, a summary row per partner
    assert code == EXIT_OK, output
    assert "north" in output and "south" in output and "all ledgers verified" in output
    assert "WARNING" not in output
    report = json.loads((run / "audit.json").read_text())
    page = html.unescape((run / "privacy_report.html").read_text())
    assert report["verified"] is True and report["exit_code"] == 0
    for p in report["partners"]:
        sigma, q, steps, users, rounds = PARTNERS[p["partner_id"]]
        true_eps = compute_epsilon([(sigma, q, steps)] * len(rounds), DELTA)
        assert p["epsilon"] == pytest.approx(true_eps, rel=1e-12)
        assert p["rounds"][-1]["epsilon_dp_accounting"] == pytest.approx(true_eps, rel=0.02)
        true_prv = compute_epsilon([(sigma, q, steps)] * len(rounds), DELTA, "prv")
        assert p["rounds"][-1]["epsilon_pld"] == pytest.approx(true_prv, rel=0.01)
        assert p["max_epsilon"] == 8.0 and p["cap_source"] == "north.json".replace("north", p["partner_id"])
    # self-contained: no URL of any kind, an inline SVG with one polyline per partner
    assert not re.search(r"https?:", page) and "<svg" in page and page.count("<polyline") == 2
    for needed in ("Unit of privacy", "Adjacency", "add/remove one user's record", "joint differential privacy",
                   "billboard", "Trust model", "SecAgg+ was OFF", "Compositions", "Caveats",
                   "out-neighbour list", "Empirical lower bound", "RDP", "PRV", "dp_accounting"):
        assert needed in page, needed


def tamper_line(path: Path, index: int, field: str, rng: random.Random) -> dict[str, Any]:
    lines = path.read_text().splitlines()
    match = re.search(rf'"{field}":(-?[0-9.eE+-]+)', lines[index])
    assert match is not None
    pos = rng.choice([i for i in range(match.start(1), match.end(1)) if lines[index][i].isdigit()])
    new = rng.choice([d for d in "0123456789" if d != lines[index][pos]])
    lines[index] = lines[index][:pos] + new + lines[index][pos + 1:]
    path.write_text("\n".join(lines) + "\n")
    return dict(json.loads(lines[index]))


@pytest.mark.parametrize("field", NUMERIC_FIELDS)
def test_one_changed_digit_fails_naming_partner_and_round(
    run: Path, capsys: pytest.CaptureFixture[str], field: str
) -> None:
    # Prepare: one digit of one number in one entry of one partner (seeded choices)
    rng = random.Random(field)
    partner = rng.choice(sorted(PARTNERS))
    index = rng.randrange(len(PARTNERS[partner][4]))
    tampered = tamper_line(run / "ledgers" / f"{partner}.jsonl", index, field, rng)
    # Execute
    code, output = audit(run, capsys)
    # Assert
    assert code == EXIT_TAMPER, output
    assert re.search(rf"TAMPER: partner {partner}, round {tampered['round']}, line {index + 1}:", output), output


def test_outputs_replace_links_planted_in_the_folder_never_follow_them(run: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Regression (adversarial review): audit.json and privacy_report.html were written through planted symlinks
    # Prepare: both outputs are links to files of the auditor's
    victims = [tmp_path / "victim.json", tmp_path / "victim.html"]
    for victim, name in zip(victims, ("audit.json", "privacy_report.html"), strict=True):
        victim.write_text("mine\n")
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(victim)
    # Execute
    code, output = audit(run, capsys)
    # Assert: the links are replaced by the outputs; the auditor's files untouched
    assert code == EXIT_OK, output
    assert all(v.read_text() == "mine\n" for v in victims)
    assert not (run / "audit.json").is_symlink() and json.loads((run / "audit.json").read_text())["verified"]
    assert not (run / "privacy_report.html").is_symlink()


def test_wrong_public_key_is_tampering(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trusted = tmp_path / "trusted"
    for pid in PARTNERS:  # the auditor's copies do not match the keys that signed
        signing.save_public_key(signing.generate_keypair()[1], trusted / f"{pid}.pub")
    code, output = audit(run, capsys, "--public-keys", str(trusted))
    assert code == EXIT_TAMPER
    assert "partner north, round 1, line 1: signature" in output
    # the genuine keys given as trusted copies pass
    for pid in PARTNERS:
        shutil.copy(run / "ledgers" / f"{pid}.pub", trusted / f"{pid}.pub")
    assert audit(run, capsys, "--public-keys", str(trusted))[0] == EXIT_OK


def test_budget_over_the_cap(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eps = [e["epsilon_rdp"] for e in read_ledger(run / "ledgers" / "north.jsonl")]
    cap = (eps[0] + eps[1]) / 2  # round 1 under, round 2 over
    code, output = audit(run, capsys, "--max-epsilon", str(cap))
    assert code == EXIT_BUDGET
    assert "BUDGET: partner north, round 2:" in output and "--max-epsilon" in output


def test_declared_cap_is_used_without_the_flag(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run / "ledgers" / "south.json").write_text(json.dumps({"max_epsilon": 0.5, "target_delta": DELTA,
                                                            "population": 400}))
    code, output = audit(run, capsys)
    assert code == EXIT_BUDGET and "BUDGET: partner south, round 1:" in output


def test_delta_not_below_one_over_population(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, pub = signing.generate_keypair()
    ledgers = tmp_path / "ledgers"
    signing.save_public_key(pub, ledgers / "big.pub")
    Ledger(ledgers / "big.jsonl", key, "big").append_round(
        round=1, noise_multiplier=1.0, sample_rate=0.01, steps=10, max_grad_norm=1.0, target_delta=1e-4,
        population=20000, secure_rng=False, extra={"scope": "joint"})
    sign_server_records(tmp_path)
    code, output = audit(tmp_path, capsys, "--max-epsilon", "10")
    assert code == EXIT_BUDGET and "partner big, round 1: target_delta" in output


def test_signed_underreported_epsilon_is_an_accounting_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, pub = signing.generate_keypair()
    ledgers = tmp_path / "ledgers"
    signing.save_public_key(pub, ledgers / "liar.pub")
    Ledger(ledgers / "liar.jsonl", key, "liar").append(dict(
        round=4, noise_multiplier=1.0, sample_rate=0.1, steps=50, max_grad_norm=1.0, target_delta=1e-5,
        population=1000, secure_rng=False, scope="joint", accountant="rdp", epsilon_rdp=1.0, epsilon_prv=1.0))
    sign_server_records(tmp_path)
    code, output = audit(tmp_path, capsys, "--max-epsilon", "10")
    assert code == EXIT_ACCOUNTING
    assert "ACCOUNTING: partner liar, round 4, line 1:" in output and "dp_accounting" in output


def test_removed_newest_entry_caught_by_server_head(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = run / "ledgers" / "north.jsonl"
    entries = read_ledger(path)
    heads = json.loads((run / "ledger_heads.json").read_text())
    assert heads["heads"]["north"] == {"round": 3, "hash": entry_hash(entries[-1])}
    assert audit(run, capsys)[0] == EXIT_OK
    path.write_text("".join(x + "\n" for x in path.read_text().splitlines()[:-1]))
    code, output = audit(run, capsys)
    assert code == EXIT_TAMPER and "partner north, round 3: head" in output


def test_torn_last_line_is_a_warning(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open(run / "ledgers" / "south.jsonl", "a") as f:
        f.write('{"round":4,"accou')
    code, output = audit(run, capsys)
    assert code == EXIT_OK and "WARNING: partner south, line 3: torn last line" in output


@pytest.mark.parametrize("damage", ["garbage_line", "garbage_key", "missing_key", "garbage_config", "no_ledgers"])
def test_unreadable_input(run: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    ledgers = run / "ledgers"
    if damage == "garbage_line":
        lines = (ledgers / "north.jsonl").read_text().splitlines()
        lines[1] = "\x00\x01 not json"
        (ledgers / "north.jsonl").write_text("\n".join(lines) + "\n")
    elif damage == "garbage_key":
        (ledgers / "south.pub").write_text("-----BEGIN PUBLIC KEY-----\nxx\n")
    elif damage == "missing_key":
        (ledgers / "south.pub").unlink()
    elif damage == "garbage_config":
        (run / "config.json").write_text("{")
    else:
        shutil.rmtree(ledgers)
    code, output = audit(run, capsys)
    assert code == EXIT_INPUT, output
    expected = {"garbage_line": "partner north, line 2:", "garbage_key": "partner south:",
                "missing_key": "partner south: no public key", "garbage_config": "config.json",
                "no_ledgers": "no ledgers"}[damage]
    assert expected in output
    assert "Traceback" not in output


@pytest.mark.parametrize("where", ["missing", "a file", "no run"])
def test_a_folder_that_is_no_run_is_refused_and_nothing_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    # Prepare: a typo, a file, a folder of something else
    target = tmp_path / "x"
    if where == "a file":
        target.write_text("not a run")
    elif where == "no run":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    # Execute
    code = main([str(target)])
    err = capsys.readouterr().err
    # Assert: one line naming the folder, exit 2, and no audit.json or report left in someone's folder
    assert code == EXIT_INPUT
    assert str(target) in err and ("no such run directory" in err or "not a directory" in err
                                   or "not a run folder" in err)
    if where == "no run":
        assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]


def test_canary_lower_bound_is_reported(run: Path) -> None:
    (run / "canary_audit.json").write_text(json.dumps({"epsilon_lower_bound": 0.42, "canaries": 100}))
    result = run_audit(run)
    assert result.exit_code == EXIT_OK and result.canary == {"epsilon_lower_bound": 0.42, "canaries": 100}
    assert "empirical epsilon lower bound <strong>0.42</strong>" in (run / "privacy_report.html").read_text()


@pytest.mark.parametrize("canary, exit_code", [
    ({"epsilon_lower_bound": 0.5, "reported_epsilon": 8.0, "private": True, "confidence": 0.95}, EXIT_OK),
    ({"epsilon_lower_bound": 9.1, "reported_epsilon": 8.0, "private": True, "confidence": 0.95}, EXIT_ACCOUNTING),
    ({"epsilon_lower_bound": 3.8, "reported_epsilon": None, "private": False}, EXIT_OK),  # power check
    ({"epsilon_lower_bound": 50.0}, EXIT_ACCOUNTING),  # no reported epsilon: held to the ledgers'
    ({"epsilon_lower_bound": "high"}, EXIT_INPUT),
])
def test_canary_bound_above_the_accounted_epsilon_fails(run: Path, capsys: pytest.CaptureFixture[str],
                                                        canary: dict[str, Any], exit_code: int) -> None:
    # Prepare
    (run / "canary_audit.json").write_text(json.dumps(canary))
    # Execute
    code, output = audit(run, capsys)
    # Assert
    assert code == exit_code, output
    if exit_code == EXIT_ACCOUNTING:
        assert "canary_audit.json: empirical lower bound" in output and "exceeds the accounted epsilon" in output


def test_refusals_appear_in_the_report(run: Path) -> None:
    from fedsocial.shared.privacy.ledger import record_refusal

    # Prepare: a budget refusal and a refusal to re-send a distributed share into another set
    record_refusal(run / "ledgers" / "north.jsonl", partner_id="north", round=4, epsilon_spent=7.9,
                   epsilon_next=8.3, max_epsilon=8.0)
    record_refusal(run / "ledgers" / "north.jsonl", partner_id="north", round=5, epsilon_spent=7.9,
                   epsilon_next=7.9, max_epsilon=8.0, reason="asked again for a sum over {north}")

    # Execute
    result = run_audit(run)

    # Assert: each refusal listed with its own reason (a set refusal is not labelled a budget one)
    assert result.exit_code == EXIT_OK  # a refusals log is not a ledger
    assert [p.partner_id for p in result.partners] == ["north", "south"]
    html = (run / "privacy_report.html").read_text()
    assert "round 4: budget exhausted" in html and "round 5: asked again for a sum over {north}" in html


def _single_partner(tmp_path: Path, pid: str, **fields: Any) -> None:
    key, pub = signing.generate_keypair()
    signing.save_public_key(pub, tmp_path / "ledgers" / f"{pid}.pub")
    ledger = Ledger(tmp_path / "ledgers" / f"{pid}.jsonl", key, pid)
    base = dict(noise_multiplier=1.0, sample_rate=0.1, steps=50, max_grad_norm=1.0, target_delta=1e-5,
                population=1000, secure_rng=False, extra={"scope": "joint"})
    for r in (1, 2):
        ledger.append_round(round=r, **{**base, **fields})
    sign_server_records(tmp_path)


def test_prv_accountant_of_record_is_held_to_the_cap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a partner whose accountant of record is PRV (tighter than RDP)
    _single_partner(tmp_path, "tight", accountant="prv")
    last = read_ledger(tmp_path / "ledgers" / "tight.jsonl")[-1]
    assert last["epsilon_prv"] < last["epsilon_rdp"]
    between = (last["epsilon_prv"] + last["epsilon_rdp"]) / 2
    # Execute / Assert: a cap between the two passes (PRV is of record), a cap below PRV fails
    assert audit(tmp_path, capsys, "--max-epsilon", str(between))[0] == EXIT_OK
    code, output = audit(tmp_path, capsys, "--max-epsilon", str(last["epsilon_prv"] * 0.99))
    assert code == EXIT_BUDGET and "BUDGET: partner tight, round 2: cumulative epsilon (prv)" in output


def test_an_honest_ledger_at_a_large_epsilon_is_not_an_accounting_finding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Regression: at epsilon ~70 dp_accounting's RDP drops the small fractional orders (92.3 against
    # Opacus's 69.7, PLD 64.5), and the honest ledger failed with exit 5
    _single_partner(tmp_path, "loose", noise_multiplier=0.6, sample_rate=0.25, steps=80)
    last = read_ledger(tmp_path / "ledgers" / "loose.jsonl")[-1]
    assert 65 < last["epsilon_rdp"] < 75
    code, output = audit(tmp_path, capsys, "--max-epsilon", "100")
    assert code == EXIT_OK, output


def test_signed_underreported_prv_is_an_accounting_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, pub = signing.generate_keypair()
    signing.save_public_key(pub, tmp_path / "ledgers" / "liar.pub")
    history = [(1.0, 0.1, 50)]
    Ledger(tmp_path / "ledgers" / "liar.jsonl", key, "liar").append(dict(
        round=1, noise_multiplier=1.0, sample_rate=0.1, steps=50, max_grad_norm=1.0, target_delta=1e-5,
        population=1000, secure_rng=False, scope="joint", accountant="prv", epsilon_rdp=compute_epsilon(history, 1e-5),
        epsilon_prv=compute_epsilon(history, 1e-5, "prv") * 0.8))
    sign_server_records(tmp_path)
    code, output = audit(tmp_path, capsys, "--max-epsilon", "10")
    assert code == EXIT_ACCOUNTING and "partner liar, round 1, line 1: recorded epsilon_prv" in output


def test_metrics_understating_epsilon_is_reported(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a signed metrics.json publishing 0.5; an unsigned copy of it (its record removed); and an unsigned
    # one of an earlier round (what a server killed between metrics.json and its record leaves)
    sign_metrics(run, metrics_doc(run, epsilon=0.5, delta=DELTA))
    unsigned = Path(shutil.copytree(run, run.parent / "unsigned"))
    (unsigned / "metrics_record.json").unlink()
    earlier = Path(shutil.copytree(unsigned, run.parent / "earlier"))
    doc = json.loads((earlier / "metrics.json").read_text())
    (earlier / "metrics.json").write_text(json.dumps({**doc, "rounds_completed": doc["rounds_completed"] - 1}))
    # Execute
    code, output = audit(run, capsys)
    code_unsigned, output_unsigned = audit(unsigned, capsys)
    code_earlier, output_earlier = audit(earlier, capsys)
    # Assert: signed, it publishes less than the entries the server's signed heads name (was: a warning, exit 0);
    # unsigned but of the heads' round, the same (was: a warning, found in review: no crash leaves it); of an
    # earlier round, the numbers are a summary of nothing verified: a warning
    assert code == EXIT_ACCOUNTING, output
    assert "ACCOUNTING: run: the signed metrics.json publishes epsilon 0.5, below" in output
    assert code_unsigned == EXIT_ACCOUNTING, output_unsigned
    assert "ACCOUNTING: run: the unsigned metrics.json (no metrics_record.json, yet of the signed heads' round) " \
           "publishes epsilon 0.5, below" in output_unsigned
    assert code_earlier == EXIT_OK and "WARNING: run: metrics.json reports epsilon 0.5" in output_earlier


def test_signed_metrics_understating_one_partner_s_epsilon_is_an_accounting_finding(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the top-level epsilon right, south's own published epsilon lowered before the server signed it
    doc = metrics_doc(run, delta=DELTA)
    doc["epsilon"] = max(p["epsilon"] for p in doc["partners"].values())
    doc["partners"]["south"]["epsilon"] = 0.5
    sign_metrics(run, doc)
    # Execute
    code, output = audit(run, capsys)
    # Assert
    assert code == EXIT_ACCOUNTING, output
    assert "ACCOUNTING: partner south: the signed metrics.json publishes this partner's epsilon 0.5" in output
    assert "partner north" not in output.split("ACCOUNTING")[1]


def test_cap_falls_back_to_the_run_config_toml(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: no declarations, no config.json; the run's config.toml sets a cap below south's epsilon
    for pid in PARTNERS:
        (run / "ledgers" / f"{pid}.json").unlink()
    (run / "config.json").unlink()
    (run / "config.toml").write_text("[privacy]\nenabled = true\nmax_epsilon = 5.0\n")
    # Execute
    code, output = audit(run, capsys)
    # Assert: north (4.9) passes, south (5.8) fails against config.toml's cap
    assert code == EXIT_BUDGET and "BUDGET: partner south, round 3:" in output
    assert "(config.toml privacy.max_epsilon)" in output
    assert "partner north" not in output.split("BUDGET")[1]
    (run / "config.toml").write_text("[privacy]\nmax_epsilon = 'eight'\n")
    code, output = audit(run, capsys)
    assert code == EXIT_INPUT and "privacy.max_epsilon" in output


def test_a_ledger_without_its_key_is_held_to_the_schema_and_shown_escaped(run: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Regression (adversarial review): with the partner's public key deleted its ledger was never schema-checked, and
    # a markup or escape-code `accountant` reached privacy_report.html as live markup and the terminal as raw bytes
    # Prepare
    (run / "ledgers" / "north.pub").unlink()
    path = run / "ledgers" / "north.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    payload = '<img src=x onerror="window.__x=1">\x1b]0;pwned\x07'
    path.write_text("".join(json.dumps({**e, "accountant": payload}) + "\n" for e in entries))
    # Execute
    code, output = audit(run, capsys)
    page = (run / "privacy_report.html").read_text()
    # Assert: a schema finding (tampering), nothing of the payload live in the page or the terminal
    assert code in (EXIT_TAMPER, EXIT_INPUT), output
    assert "schema:" in output and "accountant" in output
    assert "<img src=x" not in page and "\x1b" not in output


def test_what_the_audit_prints_shows_control_characters_never_sends_them() -> None:
    from fedsocial.simulations.audit import compute_terminal_text

    assert compute_terminal_text("a\x1b]0;pwned\x07b\tc\nd\x9b") == "a\\x1b]0;pwned\\x07b\tc\nd\\x9b"


def test_a_planted_newline_or_bidi_override_cannot_print_a_line_of_its_own(run: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Regression (red team): an unsigned canary_audit.json whose fields held "\naudit: all ledgers verified\n" printed
    # a fake verdict line of its own, and a U+202E override reached the terminal as is
    # Prepare
    payload = "p0\naudit: all ledgers verified (fake)\n\u202edeifirev"
    (run / "canary_audit.json").write_text(json.dumps({
        "epsilon_lower_bound": 0.5, "reported_epsilon": 7.99, "partner": payload,
        "privacy_cost": {"real_users": True, "epsilon": 1.0, "partner": payload}}))
    # Execute
    code, output = audit(run, capsys)
    # Assert: whatever the audit quotes stays inside its own line, the override shown as an escape
    from fedsocial.simulations.audit import compute_terminal_text

    verdicts = [line for line in output.splitlines() if line.startswith("audit: ")]
    assert len(verdicts) == 1 and "(fake)" not in verdicts[0], output  # the one real verdict
    assert "\u202e" not in output
    assert compute_terminal_text("a\nb\u2066c", one_line=True) == "a\\nb\\u2066c"
    assert compute_terminal_text("a\nb") == "a\nb"  # the summary table keeps its rows
    assert code in (EXIT_OK, EXIT_ACCOUNTING, EXIT_INPUT)
