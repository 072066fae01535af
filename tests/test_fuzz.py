"""Issue 11 item 8: property and fuzz tests, "a clear error or a correct result, never a traceback".

Targets: the config loader and reply validation (the protocol parsers and the strategy's
aggregation); tests/test_fuzz_ledger.py fuzzes the ledger reader and the audit with crafted ledgers,
tests/test_data_rules.py the CSV loaders.

Budget: ``FEDSOCIAL_FUZZ_PROFILE`` names a hypothesis profile registered here: ``fedsocial-test``
(the default, a few seconds per property, what ``make test`` runs) or ``fedsocial-fuzz`` (what
``make fuzz`` runs: many more examples per property). Profiles are applied per test, so this module
never changes the settings of other test modules.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedsocial.server.aggregation import compute_update_norm
from fedsocial.server.strategy import FedSocialStrategy, QuorumError
from fedsocial.shared import protocol
from fedsocial.shared.config import Config, ConfigError, config_from_dict, load_config

settings.register_profile("fedsocial-test", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("fedsocial-fuzz", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROFILE = settings.get_profile(os.environ.get("FEDSOCIAL_FUZZ_PROFILE", "fedsocial-test"))

FIELDS = {section: list(values) for section, values in Config().to_dict().items()}

# JSON/TOML-like values, including the ones that break naive code: huge ints, nan, inf, -0.0, bools
# where numbers are expected, empty and odd strings, nested containers.
SCALARS = st.one_of(
    st.booleans(), st.integers(), st.integers(min_value=10**18, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-300, -0.0, 1e308, 5e-324]),
    st.text(max_size=20), st.sampled_from(["", "inf", "nan", "0", "abc", "../x", "\u2028"]), st.none(),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                                            inner, max_size=3),
                      max_leaves=6)


# ---- the config loader --------------------------------------------------------------------------------

@st.composite
def raw_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Nested dicts shaped like a config: mostly real sections and keys, some unknown, any values."""
    raw: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(list(FIELDS)) | st.text(max_size=8))
        if draw(st.integers(0, 9)) == 0:
            raw[section] = draw(VALUES)  # a section that is not a table
            continue
        keys = st.sampled_from(FIELDS.get(section) or ["x"]) | st.text(max_size=8)
        raw[section] = draw(st.dictionaries(keys, VALUES, max_size=4))
    return raw


@PROFILE
@given(raw_configs())
def test_config_from_any_dict_is_a_config_or_a_config_error(raw: dict[str, Any]) -> None:
    try:
        cfg = config_from_dict(raw, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml")  # the error names the source
        return
    assert isinstance(cfg, Config)
    assert config_from_dict(cfg.to_dict()) == cfg  # a valid config reads back identically


@PROFILE
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
@example(b"\x80")  # found by this test: a non-UTF-8 file raised UnicodeDecodeError out of load_config
@example(b"[privacy]\nmax_epsilon = 1" + b"0" * 400)  # a 400-digit integer where a float is expected
def test_config_file_of_any_bytes_is_a_config_or_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc)
        return
    assert isinstance(cfg, Config)


@PROFILE
@given(st.lists(st.text(max_size=40) | st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(list(FIELDS)),
                                                   st.sampled_from(sum(FIELDS.values(), [])),
                                                   st.text(max_size=12)), max_size=4))
def test_any_set_override_is_applied_or_refused_with_a_config_error(overrides: list[str]) -> None:
    try:
        cfg = load_config(None, overrides)
    except ConfigError:
        return
    assert isinstance(cfg, Config)


# ---- reply validation: the protocol parsers ---------------------------------------------------------

def _reply_dicts(keys: frozenset[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(sorted(keys)) | st.text(max_size=6), VALUES, max_size=len(keys) + 2)


def _valid_fit() -> dict[str, Any]:
    acc = protocol.FitAccounting(1.0, 1e-5, 1.1, 0.2, 5, 0.1, 1, "0" * 64)
    return protocol.FitReport(1, "p0", ("a",), 10, False, 0.5, 1.0, 1.0, 1e-5, acc).to_metrics()


@PROFILE
@given(_reply_dicts(protocol.FIT_METRIC_KEYS), st.dictionaries(st.sampled_from(sorted(protocol.FIT_METRIC_KEYS)),
                                                               VALUES, max_size=3))
def test_any_fit_reply_parses_to_a_report_that_round_trips_or_to_its_problems(junk: dict[str, Any],
                                                                              edits: dict[str, Any]) -> None:
    for metrics in (junk, {**_valid_fit(), **edits}):
        parsed = protocol.parse_fit_report(metrics, 1)
        if isinstance(parsed, protocol.Rejected):
            assert parsed.problems and all(isinstance(p, str) and p for p in parsed.problems)
        else:
            assert protocol.parse_fit_report(parsed.to_metrics(), 1) == parsed
            assert parsed.round == 1 and 1 <= parsed.num_users <= protocol.MAX_USERS


@PROFILE
@given(_reply_dicts(protocol.EVAL_METRIC_KEYS))
def test_any_eval_reply_parses_to_metrics_in_0_1_or_to_its_problems(metrics: dict[str, Any]) -> None:
    parsed = protocol.parse_eval_report(metrics, 1)
    if isinstance(parsed, protocol.Rejected):
        assert parsed.problems
    else:
        assert set(parsed.metrics) == set(protocol.METRIC_KEYS)
        assert all(0.0 <= v <= 1.0 for v in parsed.metrics.values())


@PROFILE
@given(_reply_dicts(protocol.REGISTRATION_KEYS | protocol.INTENT_KEYS))
def test_any_registration_or_intent_parses_or_names_its_problems(props: dict[str, Any]) -> None:
    for parsed in (protocol.parse_registration(props), protocol.parse_intent(props, 1)):
        assert isinstance(parsed, (protocol.Registration, protocol.Intent, protocol.Rejected))


# ---- reply validation: the strategy never raises and never leaves the clipping ball ---------------------

NAMES = ["item_emb", "item_bias"]
INITIAL = [np.zeros((4, 2), np.float32), np.zeros(4, np.float32)]


class _Proxy:
    def __init__(self, node_id: int) -> None:
        self.node_id, self.cid = node_id, str(node_id)


def _arrays(draw: st.DrawFn) -> list[np.ndarray]:
    kind = draw(st.sampled_from(["good", "big", "nan", "shape", "dtype", "empty"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    good = [rng.normal(size=a.shape).astype(np.float32) for a in INITIAL]
    norm = compute_update_norm(good)
    good = [(g / np.float32(norm)).astype(np.float32) for g in good]  # norm 1 = clipping_norm
    if kind == "big":
        return [g * np.float32(draw(st.floats(1.01, 1e6))) for g in good]
    if kind == "nan":
        good[0][0, 0] = np.nan
    elif kind == "shape":
        return [good[0][:2], good[1]]
    elif kind == "dtype":
        return [g.astype(np.float64) for g in good]
    elif kind == "empty":
        return []
    return good


@st.composite
def fit_replies(draw: st.DrawFn) -> tuple[_Proxy, FitRes]:
    node = draw(st.integers(0, 4))  # 0-2 registered, 3-4 not
    metrics: dict[str, Any] = {"round": 1, "partner_id": f"partner-{node}", "param_names": ",".join(NAMES),
                               "num_users": 10, "budget_exhausted": 0}
    metrics.update(draw(st.dictionaries(st.sampled_from(sorted(protocol.FIT_METRIC_KEYS)), VALUES, max_size=2)))
    num_examples = draw(st.integers(-5, 10**12))
    return _Proxy(node), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(_arrays(draw)), num_examples, metrics)


def _strategy(tmp_path: Path) -> FedSocialStrategy:
    cfg = Config().replace("federation", partners=3, min_partners=1, clipping_norm=1.0)
    regs = {i: {"partner_id": f"partner-{i}", "param_names": ",".join(NAMES), "num_users": 10 * (i + 1)}
            for i in range(3)}
    return FedSocialStrategy(cfg, tmp_path, NAMES, INITIAL, registrations=regs)


@PROFILE
@given(st.lists(fit_replies(), max_size=6))
def test_aggregate_fit_of_any_replies_stays_inside_the_clipping_ball(tmp_path: Path,
                                                                     replies: list[tuple[_Proxy, FitRes]]) -> None:
    strategy = _strategy(tmp_path / str(len(list(tmp_path.iterdir()))))
    try:
        params, info = strategy.aggregate_fit(1, replies, [])  # type: ignore[arg-type]
    except QuorumError as exc:  # no valid reply at all: the one error the run may stop on
        assert "valid replies" in str(exc)
        return
    new = parameters_to_ndarrays(params)  # type: ignore[arg-type]
    assert all(np.all(np.isfinite(a)) for a in new)
    assert compute_update_norm(new) <= 1.0 * (1 + 1e-3) + 1e-6  # a weighted mean of updates inside the ball
    assert int(info["accepted"]) + int(info["dropped"]) == len(replies)  # each reply accepted or dropped, once


@st.composite
def eval_replies(draw: st.DrawFn) -> tuple[_Proxy, EvaluateRes]:
    node = draw(st.integers(0, 4))
    metrics: dict[str, Any] = {**dict.fromkeys(protocol.METRIC_KEYS, 0.3), "round": 1,
                               "partner_id": f"partner-{node}", "evaluated_users": 5}
    metrics.update(draw(st.dictionaries(st.sampled_from(sorted(protocol.EVAL_METRIC_KEYS)), VALUES, max_size=2)))
    return _Proxy(node), EvaluateRes(Status(Code.OK, ""), 0.0, draw(st.integers(-5, 10**12)), metrics)


@PROFILE
@given(st.lists(eval_replies(), max_size=6))
def test_aggregate_evaluate_of_any_replies_gives_metrics_in_0_1(tmp_path: Path,
                                                                replies: list[tuple[_Proxy, EvaluateRes]]) -> None:
    strategy = _strategy(tmp_path / str(len(list(tmp_path.iterdir()))))

    loss, agg = strategy.aggregate_evaluate(1, replies, [])  # type: ignore[arg-type]

    assert all(0.0 <= float(v) <= 1.0 for v in agg.values())
    assert loss is None or 0.0 <= loss <= 1.0
