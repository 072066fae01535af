"""The client-server protocol: what a partner may send the coordinator, and how the coordinator reads it.

Both sides import this module (it imports no Flower). A partner builds a typed report and sends
``report.to_metrics()``; the server turns the metrics dict of a reply back into a report with
``parse_*``, which never raises on bad input: it returns :class:`Rejected` with every problem found,
and the server drops and logs that reply like any other bad one. The server never reads a bare
string key of a reply.

Three messages carry scalars besides the shared-parameter arrays:

* registration (``get_properties`` at the start of a run): the partner's id, the names of the
  shared parameters, its user count (the bound on its aggregation weight for the whole run:
  declared once, recorded by the server, never taken from a later reply) and its budget cap;
  the same message with ``round`` in its config asks whether the partner will train that round
  (:class:`Intent`), so that a partner out of budget is not counted as a SecAgg+ contributor;
* fit reply (:class:`FitReport`): the round, the partner id, scalars about the local training and
  the privacy accounting of its release;
* evaluation reply (:class:`EvalReport`): the round, the partner id, the ranking metrics over its
  test users and how many users were evaluated, and for a DP evaluation release the ledger entry
  that charges it (:class:`EvalAccounting`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

METRIC_KEYS: tuple[str, ...] = ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "hr@20")

PRIVACY_MODEL = (
    "user-level joint DP (billboard model): each partner's shared-parameter updates are (epsilon, delta)-DP "
    "with respect to one user's record (interactions + out-neighbour list), via DP-SGD with Poisson "
    "sampling, per-user clipping and Gaussian noise; epsilon/delta here are the largest over partners. "
    "Not hidden: whether a user appears in another user's out-list, the item catalogue, per-partner user counts. "
    "Client-side clipping of each update bounds a partner's influence; server noise (if any) adds partner-level DP."
)

# A partner id names files on the server (ledgers/<id>.jsonl): a short, plain token.
PARTNER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # what a partner id may be, wherever it is given
_PARTNER_ID = PARTNER_ID
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_USERS = 10**9  # a declared user count above this is not a platform, it is an attempt to take the aggregate
MAX_SECONDS = 1e9  # a reported duration above this (31 years) is not a measurement; summed, it would overflow
# The ledger's plausible ranges (shared/privacy/ledger.py, not imported here: it loads the accountant): an
# accounting outside them is no DP-SGD release anyone ran, so the reply that carries it is refused.
MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER = 1e-2, 1e6
MAX_STEPS = 10**9
MAX_ROUND = 10**9
MAX_GRAD_NORM = 1e9
MAX_EPSILON = 1e12


@dataclass(frozen=True)
class Rejected:
    """A reply that cannot be read as its report; ``problems`` says why (one line each)."""

    problems: tuple[str, ...]

    def __str__(self) -> str:
        return "; ".join(self.problems)


# ---- field checks: each returns the typed value or appends a problem and returns None -------------

def _int(m: Mapping[str, Any], key: str, errs: list[str], lo: int = 0, hi: int | None = None) -> int | None:
    v = m.get(key)
    # bool is an int in Python; on the wire True is not a count
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        errs.append(f"{key}: expected an integer in [{lo}, {hi if hi is not None else 'inf'}], got {v!r}")
        return None
    return v


def _float(m: Mapping[str, Any], key: str, errs: list[str], lo: float = 0.0, hi: float = math.inf,
           lo_open: bool = False) -> float | None:
    v = m.get(key)
    try:
        x = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
    except OverflowError:  # an integer of hundreds of digits
        x = math.inf
    if not (math.isfinite(x) and lo <= x <= hi and not (lo_open and x == lo)):
        lo_b = "(" if lo_open else "["
        errs.append(f"{key}: expected a finite number in {lo_b}{lo:g}, {hi:g}], got {v!r}")
        return None
    return x


def _str(m: Mapping[str, Any], key: str, errs: list[str], pattern: re.Pattern[str]) -> str | None:
    v = m.get(key)
    if not isinstance(v, str) or pattern.fullmatch(v) is None:
        shown = v if not isinstance(v, str) or len(v) <= 80 else v[:80] + "..."
        errs.append(f"{key}: expected a string matching {pattern.pattern}, got {shown!r}")
        return None
    return v


def _names(m: Mapping[str, Any], key: str, errs: list[str]) -> tuple[str, ...] | None:
    v = m.get(key)
    if not isinstance(v, str) or not v:
        errs.append(f"{key}: expected comma-separated parameter names, got {v!r}")
        return None
    names = tuple(v.split(","))
    bad = [n for n in names if _PARAM_NAME.fullmatch(n) is None]
    if bad or len(set(names)) != len(names):
        errs.append(f"{key}: invalid or repeated parameter names {bad[:3] or sorted(names)[:3]!r}")
        return None
    return names


def as_mapping(m: object) -> Mapping[str, Any]:
    """A reply's metrics as a mapping to parse (anything else, e.g. None, parses as empty: every required
    field is then missing, and the reply is rejected naming them)."""
    return m if isinstance(m, Mapping) else {}


def _unknown(m: Mapping[str, Any], allowed: frozenset[str], errs: list[str]) -> None:
    extra = sorted(str(k) for k in m if k not in allowed)
    if extra:
        errs.append(f"keys outside the protocol: {extra[:5]}")


def _keys(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


# ---- registration ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Registration:
    """What a partner declares once, at the start of a run (not hidden by the privacy model)."""

    partner_id: str
    param_names: tuple[str, ...]
    num_users: int  # bounds the partner's aggregation weight for the whole run
    max_epsilon: float = 0.0  # the partner's budget cap (0: privacy off)
    target_delta: float = 0.0
    # each shared parameter's shape as this partner's data make it (items.csv, the users.csv schema, the config):
    # a partner whose shapes differ from the others' is refused at registration, naming the parameter; () where
    # the partner did not declare them (then only the names are compared)
    param_shapes: tuple[tuple[int, ...], ...] = ()

    def to_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"partner_id": self.partner_id, "param_names": ",".join(self.param_names),
                               "num_users": self.num_users, "max_epsilon": self.max_epsilon,
                               "target_delta": self.target_delta}
        if self.param_shapes:
            out["param_shapes"] = ",".join("x".join(map(str, s)) for s in self.param_shapes)
        return out


REGISTRATION_KEYS = _keys(Registration)


def parse_registration(m: Mapping[str, Any]) -> Registration | Rejected:
    errs: list[str] = []
    _unknown(m, REGISTRATION_KEYS, errs)
    pid = _str(m, "partner_id", errs, _PARTNER_ID)
    names = _names(m, "param_names", errs)
    users = _int(m, "num_users", errs, lo=1, hi=MAX_USERS)
    eps = _float(m, "max_epsilon", errs) if "max_epsilon" in m else 0.0
    delta = _float(m, "target_delta", errs, hi=1.0) if "target_delta" in m else 0.0
    shapes = _shapes(m, "param_shapes", errs, len(names) if names is not None else None) \
        if "param_shapes" in m else ()
    if errs or pid is None or names is None or users is None or eps is None or delta is None or shapes is None:
        return Rejected(tuple(errs))
    return Registration(pid, names, users, eps, delta, shapes)


MAX_DIM = 2**31 - 1


def _shapes(m: Mapping[str, Any], key: str, errs: list[str], count: int | None) -> tuple[tuple[int, ...], ...] | None:
    """``"400x16,5x16,"``: one shape per parameter name, dimensions joined by ``x`` (empty: a scalar)."""
    v = m.get(key)
    if not isinstance(v, str) or len(v) > 100_000:
        errs.append(f"{key}: expected comma-separated shapes such as 400x16, got {str(v)[:80]!r}")
        return None
    shapes = []
    for part in v.split(","):
        dims = part.split("x") if part else []
        if not all(d.isascii() and d.isdigit() and len(d) <= 10 and int(d) <= MAX_DIM for d in dims):
            errs.append(f"{key}: {part[:40]!r} is not a shape such as 400x16")
            return None
        shapes.append(tuple(int(d) for d in dims))
    if count is not None and len(shapes) != count:
        errs.append(f"{key}: {len(shapes)} shapes for {count} parameter names")
        return None
    return tuple(shapes)


@dataclass(frozen=True)
class Intent:
    """A partner's answer to "will you train round r?" (asked before a SecAgg+ round)."""

    partner_id: str
    round: int
    will_train: bool
    # distributed noise: this partner already released its share of the round into a secure sum (a resumed
    # server asking again), and a share enters one sum only; the server then does not count it as out of budget
    released: bool = False

    def to_metrics(self) -> dict[str, Any]:
        out = {"partner_id": self.partner_id, "round": self.round, "will_train": int(self.will_train)}
        return {**out, "released": 1} if self.released else out


INTENT_KEYS = _keys(Intent)


def parse_intent(m: Mapping[str, Any], expected_round: int) -> Intent | Rejected:
    errs: list[str] = []
    _unknown(m, INTENT_KEYS, errs)
    pid = _str(m, "partner_id", errs, _PARTNER_ID)
    rnd = _round(m, expected_round, errs)
    will = _int(m, "will_train", errs, hi=1)
    released = _int(m, "released", errs, hi=1) if "released" in m else 0
    if errs or pid is None or rnd is None or will is None or released is None:
        return Rejected(tuple(errs))
    if will and released:
        return Rejected(("released: a partner that already released the round's share cannot train it again",))
    return Intent(pid, rnd, bool(will), bool(released))


def _round(m: Mapping[str, Any], expected: int, errs: list[str]) -> int | None:
    v = m.get("round")
    if isinstance(v, bool) or not isinstance(v, int) or v != expected:
        errs.append(f"wrong round: reply is for round {v!r}, the server is in round {expected}")
        return None
    return v


# ---- what the coordinator asks (the partner reads it through these) -------------------------------

@dataclass(frozen=True)
class FitInstructions:
    """The config of a training message: the global round, the bound on the update, the weight bound.

    Nothing in it touches the partner's privacy: noise, clipping of the users' gradients and the budget
    are the partner's own settings, so an instruction about them is a key outside the protocol.
    """

    round: int
    clipping_norm: float  # the L2 bound of the update the partner sends (not its DP clipping)
    num_rounds: int | None = None  # the coordinator's total; the partner planned its budget for its own
    weight: int | None = None  # the bound the server derived from the registration
    weight_cap: int | None = None
    secure_aggregation: bool = False
    # the reply is an encoded Skellam share of the round's gradient sum (shared/privacy/distributed.py), not
    # new parameters: the client's update clipping leaves it as it is; a partner refuses a value not its own
    distributed_noise: bool = False
    # distributed noise: the partner ids whose shares the round's secure sum is formed over (sorted). A partner
    # records it with its charged share and re-sends that share into this very set only (client/partner.py)
    contributors: tuple[str, ...] | None = None

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"round": self.round, "clipping_norm": self.clipping_norm,
                               "secure_aggregation": int(self.secure_aggregation)}
        if self.distributed_noise:
            out["distributed_noise"] = 1
        if self.contributors is not None:
            out["contributors"] = ",".join(sorted(self.contributors))
        out.update({k: v for k, v in (("num_rounds", self.num_rounds), ("weight", self.weight),
                                      ("weight_cap", self.weight_cap)) if v is not None})
        return out


FIT_CONFIG_KEYS = _keys(FitInstructions)


def _planned_round(m: Mapping[str, Any], planned_rounds: int | None, errs: list[str]) -> int | None:
    """The instructed round: an integer in [1, planned_rounds] (a round the partner did not plan for
    would spend budget its calibration never counted; 0, negative, 1.9 or True are no round)."""
    return _int(m, "round", errs, lo=1, hi=planned_rounds if planned_rounds is not None else MAX_ROUND)


def parse_fit_instructions(m: Mapping[str, Any], planned_rounds: int | None) -> FitInstructions | Rejected:
    """A training message's config as :class:`FitInstructions`, or every problem with it.

    ``planned_rounds``: the partner's ``federation.rounds`` (None: the round's range is not checked,
    for a reader that only needs the update bound).
    """
    errs: list[str] = []
    _unknown(m, FIT_CONFIG_KEYS, errs)
    rnd = _planned_round(m, planned_rounds, errs)
    clip = _float(m, "clipping_norm", errs, lo_open=True)
    total = _int(m, "num_rounds", errs, lo=1, hi=MAX_ROUND) if "num_rounds" in m else None
    if total is not None and planned_rounds is not None and total != planned_rounds:
        errs.append(f"num_rounds: the coordinator runs {total} rounds, this partner planned its budget for "
                    f"{planned_rounds}")
    weight = _int(m, "weight", errs, hi=MAX_USERS) if "weight" in m else None
    cap = _int(m, "weight_cap", errs, hi=MAX_USERS) if "weight_cap" in m else None
    secure = _int(m, "secure_aggregation", errs, hi=1) if "secure_aggregation" in m else 0
    distributed = _int(m, "distributed_noise", errs, hi=1) if "distributed_noise" in m else 0
    contributors = _partner_ids(m, "contributors", errs) if "contributors" in m else None
    if errs or rnd is None or clip is None or secure is None or distributed is None:
        return Rejected(tuple(errs))
    return FitInstructions(rnd, clip, total, weight, cap, bool(secure), bool(distributed), contributors)


def _partner_ids(m: Mapping[str, Any], key: str, errs: list[str]) -> tuple[str, ...] | None:
    """A set of partner ids sent as one comma-separated string (ids hold no comma), as a sorted tuple."""
    v = m.get(key)
    ids = tuple(v.split(",")) if isinstance(v, str) and v else ()
    if not ids or any(_PARTNER_ID.fullmatch(i) is None for i in ids) or len(set(ids)) != len(ids):
        shown = v if not isinstance(v, str) or len(v) <= 80 else v[:80] + "..."
        errs.append(f"{key}: expected distinct comma-separated partner ids, got {shown!r}")
        return None
    return tuple(sorted(ids))


@dataclass(frozen=True)
class EvalInstructions:
    """The config of an evaluation message: the global round whose parameters are evaluated."""

    round: int

    def to_config(self) -> dict[str, Any]:
        return {"round": self.round}


EVAL_CONFIG_KEYS = _keys(EvalInstructions)


def parse_eval_instructions(m: Mapping[str, Any], planned_rounds: int) -> EvalInstructions | Rejected:
    errs: list[str] = []
    _unknown(m, EVAL_CONFIG_KEYS, errs)
    rnd = _planned_round(m, planned_rounds, errs)
    if errs or rnd is None:
        return Rejected(tuple(errs))
    return EvalInstructions(rnd)


def parse_properties_request(m: Mapping[str, Any], planned_rounds: int) -> int | None | Rejected:
    """A ``get_properties`` config: empty asks for the registration (None), ``{"round": r}`` for the
    intent of round r (r)."""
    if not m:
        return None
    errs: list[str] = []
    _unknown(m, frozenset({"round"}), errs)
    rnd = _planned_round(m, planned_rounds, errs)
    return Rejected(tuple(errs)) if errs or rnd is None else rnd


# ---- fit reply ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FitAccounting:
    """The privacy accounting of one release, as the partner's ledger recorded it."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    ledger_round: int
    ledger_head: str


@dataclass(frozen=True)
class FitReport:
    """A partner's fit reply (besides the clipped update's arrays and the legacy ``num_examples``)."""

    round: int
    partner_id: str
    param_names: tuple[str, ...]
    num_users: int
    budget_exhausted: bool  # True: the partner refused the round (its update is zero, its weight 0)
    train_loss: float | None = None  # None when it did not train
    fit_time_s: float = 0.0
    epsilon: float | None = None  # spent so far (a refusal reports what it had spent)
    delta: float | None = None
    accounting: FitAccounting | None = None  # None without DP, or on a refusal

    def to_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"round": self.round, "partner_id": self.partner_id,
                               "param_names": ",".join(self.param_names), "num_users": self.num_users,
                               "budget_exhausted": int(self.budget_exhausted), "fit_time_s": self.fit_time_s}
        if self.train_loss is not None:
            out["train_loss"] = self.train_loss
        if self.epsilon is not None:
            out["epsilon"] = self.epsilon
        if self.delta is not None:
            out["delta"] = self.delta
        if self.accounting is not None:
            out.update({f.name: getattr(self.accounting, f.name) for f in fields(FitAccounting)})
        return out


FIT_METRIC_KEYS = frozenset((_keys(FitReport) - {"accounting"}) | _keys(FitAccounting))


def parse_fit_report(m: Mapping[str, Any], expected_round: int) -> FitReport | Rejected:
    """A fit reply's metrics as a :class:`FitReport`, or every problem with them."""
    errs: list[str] = []
    _unknown(m, FIT_METRIC_KEYS, errs)
    rnd = _round(m, expected_round, errs)
    pid = _str(m, "partner_id", errs, _PARTNER_ID)
    names = _names(m, "param_names", errs)
    users = _int(m, "num_users", errs, lo=1, hi=MAX_USERS)
    exhausted = _int(m, "budget_exhausted", errs, hi=1)
    loss = _float(m, "train_loss", errs, lo=-math.inf) if "train_loss" in m else None
    fit_s = _float(m, "fit_time_s", errs, hi=MAX_SECONDS) if "fit_time_s" in m else 0.0
    eps = _float(m, "epsilon", errs, hi=MAX_EPSILON) if "epsilon" in m else None
    delta = _float(m, "delta", errs, hi=1.0, lo_open=True) if "delta" in m else None
    acc = _parse_accounting(m, errs)
    if acc is not None and rnd is not None and acc.ledger_round != rnd:
        # the entry that charges this round's release is this round's (a replayed or stale accounting is not)
        errs.append(f"ledger_round: the accounting is of round {acc.ledger_round}, the reply is for round {rnd}")
    if acc is not None and exhausted == 1:
        errs.append("budget_exhausted: a refusal releases nothing, yet the reply carries a release's accounting")
    if errs or None in (rnd, pid, names, users, exhausted, fit_s):
        return Rejected(tuple(errs))
    return FitReport(rnd, pid, names, users, bool(exhausted), loss, fit_s, eps, delta, acc)  # type: ignore[arg-type]


def _parse_accounting(m: Mapping[str, Any], errs: list[str]) -> FitAccounting | None:
    keys = [f.name for f in fields(FitAccounting)]
    present = [k for k in keys if k in m]
    if not set(present) - {"epsilon", "delta"}:  # a refusal reports epsilon and delta alone
        return None
    if len(present) != len(keys):
        errs.append(f"privacy accounting incomplete: missing {sorted(set(keys) - set(present))}")
        return None
    n = len(errs)
    values = (_float(m, "epsilon", errs, hi=MAX_EPSILON), _float(m, "delta", errs, hi=1.0, lo_open=True),
              _float(m, "noise_multiplier", errs, lo=MIN_NOISE_MULTIPLIER, hi=MAX_NOISE_MULTIPLIER),
              _float(m, "sample_rate", errs, hi=1.0, lo_open=True), _int(m, "steps", errs, lo=1, hi=MAX_STEPS),
              _float(m, "max_grad_norm", errs, hi=MAX_GRAD_NORM, lo_open=True),
              _int(m, "ledger_round", errs, lo=1, hi=MAX_ROUND), _str(m, "ledger_head", errs, _HEX64))
    return None if len(errs) > n else FitAccounting(*values)  # type: ignore[arg-type]


# ---- evaluation reply -----------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalAccounting:
    """The ledger entry that charges a DP evaluation release, named as a fit reply names its own: the
    cumulative epsilon after it and its (round, hash), which the server signs in ``ledger_heads.json``."""

    epsilon: float
    ledger_round: int
    ledger_head: str


@dataclass(frozen=True)
class EvalReport:
    """A partner's evaluation reply: ranking metrics over its test users (each in [0, 1]).

    ``released = False``: the partner kept its evaluation (the default under DP, see
    shared/privacy/evaluation.py); the reply then carries only the round and the partner id.
    ``accounting``: the ledger entry of a DP evaluation release (None without DP).
    """

    round: int
    partner_id: str
    evaluated_users: int
    metrics: Mapping[str, float]  # exactly METRIC_KEYS (empty when not released)
    eval_time_s: float = 0.0
    released: bool = True
    accounting: EvalAccounting | None = None

    def to_metrics(self) -> dict[str, Any]:
        if not self.released:
            out: dict[str, Any] = {"round": self.round, "partner_id": self.partner_id, "released": 0}
        else:
            out = {**{k: float(self.metrics[k]) for k in METRIC_KEYS}, "round": self.round,
                   "partner_id": self.partner_id, "evaluated_users": self.evaluated_users,
                   "eval_time_s": self.eval_time_s, "released": 1}
        if self.accounting is not None:
            out.update({f.name: getattr(self.accounting, f.name) for f in fields(EvalAccounting)})
        return out


EVAL_METRIC_KEYS = frozenset((_keys(EvalReport) - {"metrics", "accounting"}) | set(METRIC_KEYS)
                             | _keys(EvalAccounting))
EVAL_KEPT_KEYS = frozenset({"round", "partner_id", "released"})  # all a kept evaluation lets leave, and:
EVAL_ACCOUNTING_KEYS = _keys(EvalAccounting)  # the entry charging the round's DP selection, when there is one


def parse_eval_report(m: Mapping[str, Any], expected_round: int) -> EvalReport | Rejected:
    """An evaluation reply's metrics as an :class:`EvalReport`, or every problem with them.

    A metric outside [0, 1] (NaN, 1e9, a string) or a missing one rejects the reply: it is never
    averaged in; so does an accounting that is incomplete or names another round.
    """
    errs: list[str] = []
    if "released" in m and m["released"] == 0 and not isinstance(m["released"], bool):
        _unknown(m, EVAL_KEPT_KEYS | EVAL_ACCOUNTING_KEYS, errs)
        rnd, pid = _round(m, expected_round, errs), _str(m, "partner_id", errs, _PARTNER_ID)
        acc = _parse_eval_accounting(m, expected_round, errs)
        if errs or rnd is None or pid is None:
            return Rejected(tuple(errs))
        return EvalReport(rnd, pid, 0, {}, 0.0, released=False, accounting=acc)
    _unknown(m, EVAL_METRIC_KEYS, errs)
    if "released" in m:
        _int(m, "released", errs, lo=1, hi=1)
    rnd = _round(m, expected_round, errs)
    pid = _str(m, "partner_id", errs, _PARTNER_ID)
    users = _int(m, "evaluated_users", errs, hi=MAX_USERS)
    values = {k: _float(m, k, errs, hi=1.0) for k in METRIC_KEYS}
    eval_s = _float(m, "eval_time_s", errs, hi=MAX_SECONDS) if "eval_time_s" in m else 0.0
    acc = _parse_eval_accounting(m, expected_round, errs)
    if errs or None in (rnd, pid, users, eval_s):
        return Rejected(tuple(errs))
    return EvalReport(rnd, pid, users, {k: float(v) for k, v in values.items()}, eval_s,  # type: ignore[arg-type]
                      accounting=acc)


def _parse_eval_accounting(m: Mapping[str, Any], expected_round: int, errs: list[str]) -> EvalAccounting | None:
    keys = [f.name for f in fields(EvalAccounting)]
    present = [k for k in keys if k in m]
    if not present:
        return None
    if len(present) != len(keys):
        errs.append(f"evaluation accounting incomplete: missing {sorted(set(keys) - set(present))}")
        return None
    n = len(errs)
    eps, rnd = _float(m, "epsilon", errs, hi=MAX_EPSILON), _int(m, "ledger_round", errs, lo=1, hi=MAX_ROUND)
    head = _str(m, "ledger_head", errs, _HEX64)
    if rnd is not None and rnd != expected_round:
        errs.append(f"ledger_round {rnd}: an evaluation of round {expected_round} is charged in that round")
    return None if len(errs) > n else EvalAccounting(eps, rnd, head)  # type: ignore[arg-type]


def problems_of(parsed: object) -> tuple[str, ...]:
    """The problems of a parse result (empty for a report)."""
    return parsed.problems if isinstance(parsed, Rejected) else ()
