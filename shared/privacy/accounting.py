"""Privacy accounting for user-level DP-SGD: pure functions over a history, plus a small stateful wrapper.

A *history* is a list of ``(noise_multiplier, sample_rate, steps)`` tuples, the format of Opacus's
``accountant.history``: ``steps`` applications of the Poisson-subsampled Gaussian mechanism with
sampling rate ``sample_rate`` (q) and noise standard deviation ``noise_multiplier * max_grad_norm``.
Everything here is pure analysis of such a history (the style of ``opacus.accountants.analysis``);
:class:`PrivacyAccountant` is the only state, and it is rebuilt from the ledger each round.

Three independent computations of epsilon are offered:

* ``"rdp"``: Renyi DP of the sampled Gaussian mechanism (Mironov 2017; Mironov, Talwar, Zhang 2019)
  via ``opacus.accountants.analysis.rdp`` with Opacus's default orders, converted to (epsilon, delta)
  with Balle et al. 2020, Theorem 21. This is the accountant of record.
* ``"prv"``: numerical composition of privacy loss random variables (Gopi, Lee, Wutschitz 2021) via
  Opacus's ``PRVAccountant``: a tighter cross-check (the upper bound of its error interval).
* :func:`compute_epsilon_dp_accounting`: Google's ``dp_accounting`` RDP accountant on composed
  ``PoissonSampledDpEvent(GaussianDpEvent)`` events: an implementation independent of Opacus, used
  by the auditor to recompute what a partner recorded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedsocial.shared.config import ConfigError

Event = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
History = Sequence[Event]

# Opacus's RDPAccountant.DEFAULT_ALPHAS, spelled out so the orders of record are explicit.
DEFAULT_ALPHAS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
# "rdp_int": the integer orders among them, where the Skellam mechanism's bound is proved
# (shared/privacy/distributed.py); a valid, slightly looser accountant for the Gaussian too
INTEGER_ALPHAS: tuple[float, ...] = tuple(float(a) for a in DEFAULT_ALPHAS if float(a).is_integer())


class PrivacyConfigError(ConfigError):
    """A privacy parameter is invalid (the message names the field and the value). A ConfigError, so that
    every command reports it in one line (exit 2) instead of a traceback."""


def validate_event(event: Sequence[Any]) -> Event:
    """Return ``event`` as a checked ``(noise_multiplier, sample_rate, steps)`` tuple of Python numbers."""
    if len(event) != 3:
        raise PrivacyConfigError(f"history event must be (noise_multiplier, sample_rate, steps), got {event!r}")
    sigma, q, steps = event
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating, np.integer)):
        raise PrivacyConfigError(f"noise_multiplier: expected a number, got {sigma!r}")
    if not (math.isfinite(float(sigma)) and float(sigma) >= 0):
        raise PrivacyConfigError(f"noise_multiplier: must be finite and >= 0, got {sigma!r}")
    if isinstance(q, bool) or not isinstance(q, (int, float, np.floating, np.integer)):
        raise PrivacyConfigError(f"sample_rate: expected a number, got {q!r}")
    if not 0.0 < float(q) <= 1.0:
        raise PrivacyConfigError(f"sample_rate: must be in (0, 1], got {q!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or int(steps) < 0:
        raise PrivacyConfigError(f"steps: must be an integer >= 0, got {steps!r}")
    return float(sigma), float(q), int(steps)


def validate_history(history: History) -> list[Event]:
    return [validate_event(e) for e in history]


def _check_delta_value(target_delta: float) -> None:
    if not 0.0 < float(target_delta) < 1.0:
        raise PrivacyConfigError(f"target_delta: must be in (0, 1), got {target_delta!r}")


def check_delta(target_delta: float, population: int) -> None:
    """Refuse ``target_delta >= 1/population``: such a delta permits releasing one user's record outright.

    (An (epsilon, delta) mechanism that publishes each record with probability delta is DP with any
    epsilon; with delta >= 1/n that leaks about one whole record of n in expectation.)
    """
    _check_delta_value(target_delta)
    if isinstance(population, bool) or not isinstance(population, (int, np.integer)) or population < 1:
        raise PrivacyConfigError(f"population: must be an integer >= 1, got {population!r}")
    if not float(target_delta) < 1.0 / int(population):
        raise PrivacyConfigError(
            f"target_delta {target_delta!r} must be < 1/population = 1/{int(population)} "
            f"= {1.0 / int(population):.3g} (choose delta well below 1/n_p, e.g. 1/(10 n_p) or smaller)"
        )


@functools.lru_cache(maxsize=1)
def opacus_rdp_analysis() -> Any:
    """Opacus's ``accountants/analysis/rdp.py`` (numpy and scipy only), loaded without the ``opacus`` package.

    ``import opacus`` runs the package's ``__init__``, which imports torch and every grad sampler and
    optimizer: about 2.8 s of CPU on this machine in a process that has torch already, 4.4 s in one that
    has not (the simulation driver, a deployed partner's intent answer), for two pure functions. The file
    is executed as it is; where it is not found (another Opacus layout) the ordinary import is used.
    """
    import importlib.util
    import os

    spec = importlib.util.find_spec("opacus")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(roots[0], "accountants", "analysis", "rdp.py") if roots else ""
    if not os.path.isfile(path):
        from opacus.accountants.analysis import rdp

        return rdp
    module_spec = importlib.util.spec_from_file_location("fedsocial_opacus_rdp", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class _AccountantBase:
    """What Opacus's ``IAccountant.__init__`` does (``self.history = []``), the one part of its base class the
    RDP and PRV accountants use; ``accountant.py`` itself imports ``opacus.optimizers`` (the package)."""

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []


_STANDALONE = "fedsocial_opacus"  # Opacus's accountant files run under this private package name


@functools.lru_cache(maxsize=1)
def opacus_prv_accountant() -> Any:
    """Opacus's ``PRVAccountant`` (``accountants/prv.py`` and ``analysis/prv/*``, numpy and scipy only) from
    its own files, without running the ``opacus`` package's ``__init__`` (1.4-2.1 s of CPU per process:
    every grad sampler and, through them, ``torch._dynamo``). The files are executed as they are, under a
    private package name whose parents are bare namespaces, with :class:`_AccountantBase` standing in for
    ``accountants/accountant.py``; where the layout differs, the ordinary import is used."""
    import importlib
    import importlib.util
    import os
    import sys
    import types

    spec = importlib.util.find_spec("opacus")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    acc_dir = os.path.join(roots[0], "accountants") if roots else ""
    needed = ("prv.py", "rdp.py", os.path.join("analysis", "rdp.py"), os.path.join("analysis", "prv", "__init__.py"))
    if not all(os.path.isfile(os.path.join(acc_dir, f)) for f in needed):
        from opacus.accountants import PRVAccountant

        return PRVAccountant
    for name, path in ((_STANDALONE, roots[0]), (f"{_STANDALONE}.accountants", acc_dir),
                       (f"{_STANDALONE}.accountants.analysis", os.path.join(acc_dir, "analysis"))):
        if name not in sys.modules:  # bare packages: their __init__ files (which import torch) never run
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
    base = types.ModuleType(f"{_STANDALONE}.accountants.accountant")
    base.IAccountant = _AccountantBase  # type: ignore[attr-defined]
    sys.modules.setdefault(base.__name__, base)
    return importlib.import_module(f"{_STANDALONE}.accountants.prv").PRVAccountant


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(sigma: float, q: float, alphas: tuple[float, ...]) -> np.ndarray:
    """RDP of one sampled-Gaussian step at each order (cached: Opacus's fractional-order series costs
    up to ~0.5 s per call at large q, and ledgers repeat the same (sigma, q) every round)."""
    curve = np.asarray(opacus_rdp_analysis().compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(alphas)),
                       dtype=float)
    curve.setflags(write=False)
    return curve


def compute_rdp_curve(history: History, alphas: Sequence[float] = DEFAULT_ALPHAS) -> np.ndarray:
    """RDP of the composed history at each order: RDP composes by addition (Mironov 2017, Prop. 1)."""
    total = np.zeros(len(alphas))
    for sigma, q, steps in validate_history(history):
        if steps > 0:
            total = total + _rdp_one_step(sigma, q, tuple(float(a) for a in alphas)) * steps
    return total


def epsilon_from_rdp(rdp: np.ndarray, target_delta: float, alphas: Sequence[float] = DEFAULT_ALPHAS) -> float:
    """(epsilon, delta) from an RDP curve (Balle et al. 2020, Thm 21), as Opacus converts it."""
    import warnings

    _check_delta_value(target_delta)
    if not np.any(rdp):
        return 0.0
    with warnings.catch_warnings():  # "optimal order is the largest alpha": expected at tiny epsilons
        warnings.simplefilter("ignore")
        eps, _ = opacus_rdp_analysis().get_privacy_spent(orders=list(alphas), rdp=rdp, delta=target_delta)
    return float(eps)


def compute_epsilon_rdp(history: History, target_delta: float) -> float:
    """Epsilon of ``history`` by Opacus's RDP analysis with its default orders."""
    return epsilon_from_rdp(compute_rdp_curve(history), target_delta)


def compute_epsilon_rdp_int(history: History, target_delta: float) -> float:
    """Epsilon of ``history`` by RDP at the integer orders among Opacus's defaults only (2-10, 12-63)."""
    return epsilon_from_rdp(compute_rdp_curve(history, INTEGER_ALPHAS), target_delta, INTEGER_ALPHAS)


def compute_epsilon_prv(history: History, target_delta: float, eps_error: float = 0.01) -> float:
    """Epsilon of ``history`` by Opacus's PRV accountant (upper end of its error band); about 0.1-0.3 s."""
    PRVAccountant = opacus_prv_accountant()  # noqa: N806 - Opacus's class, loaded without its package

    _check_delta_value(target_delta)
    events = [e for e in validate_history(history) if e[2] > 0]
    if not events:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in events):
        return math.inf
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in events:  # composition commutes: one self-composed PRV per (sigma, q) is
        merged[(sigma, q)] = merged.get((sigma, q), 0) + steps  # exact and much faster to discretise
    acc = PRVAccountant()
    acc.history = [(sigma, q, steps) for (sigma, q), steps in merged.items()]
    with np.errstate(divide="ignore"):  # q = 1 (a full-batch release): Opacus takes log(1 - q) = -inf on purpose
        return float(acc.get_epsilon(delta=target_delta, eps_error=eps_error))


ACCOUNTANTS: dict[str, Callable[[History, float], float]] = {
    "rdp": compute_epsilon_rdp,
    "prv": compute_epsilon_prv,
    "rdp_int": compute_epsilon_rdp_int,
}


def compute_epsilon(history: History, target_delta: float, accountant: str = "rdp") -> float:
    """Cumulative epsilon of ``history`` at ``target_delta`` with the named accountant ("rdp", "prv", "rdp_int")."""
    if accountant not in ACCOUNTANTS:
        raise PrivacyConfigError(f"accountant: must be one of {sorted(ACCOUNTANTS)}, got {accountant!r}")
    return ACCOUNTANTS[accountant](history, target_delta)


def compute_epsilons_dp_accounting(
    history: History, target_delta: float, orders: Sequence[float] | None = None
) -> list[float]:
    """Cumulative epsilon after each event of ``history``, with Google's ``dp_accounting`` (independent
    of Opacus): each event is ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)),
    steps)``, composed in order into one RDP accountant under add/remove-one adjacency.

    ``orders`` defaults to ``dp_accounting``'s own grid, a superset of Opacus's (it adds 11 and
    128..1024). Its fractional-order series is truncated at 1000 terms and drops an order that does
    not converge (an absl warning, silenced here), which makes it slightly conservative.
    """
    import logging

    import dp_accounting
    from dp_accounting import rdp

    _check_delta_value(target_delta)
    acc = rdp.RdpAccountant(orders=list(orders) if orders is not None else None)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        out, composed = [], False
        for sigma, q, steps in validate_history(history):
            if steps > 0:
                acc.compose(dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
                composed = True
            out.append(float(acc.get_epsilon(target_delta)) if composed else 0.0)
        return out
    finally:
        absl_logger.setLevel(level)


def compute_epsilons_pld(
    history: History, target_delta: float, value_discretization_interval: float = 3e-3
) -> list[float]:
    """Cumulative epsilon after each event of ``history`` with ``dp_accounting``'s privacy loss
    distribution accountant (Koskela et al. 2020; Doroshenko et al. 2022): tight like PRV and
    independent of Opacus, so it cross-checks a recorded ``epsilon_prv``. The discretisation is
    pessimistic; 3e-3 moves epsilon by about 0.1% here (Opacus's known value: 6.775 against PRV's 6.779).
    """
    import dp_accounting
    from dp_accounting import pld

    _check_delta_value(target_delta)
    acc = pld.PLDAccountant(value_discretization_interval=value_discretization_interval)
    out, composed = [], False
    for sigma, q, steps in validate_history(history):
        if steps > 0:
            acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
            composed = True
        out.append(float(acc.get_epsilon(target_delta)) if composed else 0.0)
    return out


def compute_epsilon_dp_accounting(
    history: History, target_delta: float, orders: Sequence[float] | None = None
) -> float:
    """Epsilon of ``history`` recomputed with Google's ``dp_accounting`` (see
    :func:`compute_epsilons_dp_accounting`)."""
    eps = compute_epsilons_dp_accounting(history, target_delta, orders)
    return eps[-1] if eps else 0.0


def compute_round_epsilon(
    history: History, next_event: Event, target_delta: float, accountant: str = "rdp"
) -> float:
    """The cumulative epsilon after one more round ``next_event`` on top of ``history`` (what a ledger records)."""
    return compute_epsilon([*history, validate_event(next_event)], target_delta, accountant)


def would_exceed(
    history: History, next_event: Event, target_delta: float, max_epsilon: float, accountant: str = "rdp"
) -> bool:
    """True when training ``next_event`` would take the cumulative epsilon above ``max_epsilon``."""
    if not max_epsilon > 0:
        raise PrivacyConfigError(f"max_epsilon: must be > 0, got {max_epsilon!r}")
    return compute_round_epsilon(history, next_event, target_delta, accountant) > max_epsilon


def calibrate_noise_multiplier(
    max_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    accountant: str = "rdp",
    tolerance: float = 1e-3,
    max_noise_multiplier: float = 1e4,
    prefix: History = (),
) -> float:
    """The smallest noise multiplier (up to relative ``tolerance``) whose epsilon after all rounds is <= cap.

    ``prefix``: releases charged before the rounds, whatever sigma is (e.g. the popularity release),
    composed with them; the cap then holds for prefix and rounds together.

    Epsilon is non-increasing in sigma, so bisection keeps the invariant eps(lo) > cap >= eps(hi) and
    returns ``hi``: the result never overshoots the cap, and ``hi * (1 - tolerance) <= lo``, so any
    sigma smaller by a relative ``tolerance`` exceeds it.

    With the RDP accountant the search runs on the vectorised series of shared/privacy/fast_rdp.py (the
    same terms as Opacus's, several times faster) and only its two deciding values, eps(hi) <= cap < eps(lo),
    are Opacus's; where either does not hold by Opacus's numbers (or the guide finds the cap unreachable)
    the whole search is repeated on Opacus's function, so the invariant is always Opacus's.
    """
    if not max_epsilon > 0:
        raise PrivacyConfigError(f"max_epsilon: must be > 0, got {max_epsilon!r}")
    if steps_per_round < 1 or rounds < 1:
        raise PrivacyConfigError(f"steps_per_round and rounds must be >= 1, got {steps_per_round}, {rounds}")
    validate_event((1.0, sample_rate, steps_per_round))
    total_steps = int(steps_per_round) * int(rounds)
    fixed = validate_history(prefix)
    spent = compute_epsilon(fixed, target_delta, accountant) if fixed else 0.0
    if spent >= max_epsilon:
        raise PrivacyConfigError(f"max_epsilon {max_epsilon}: the releases besides training already spend it all "
                                 f"({spent:.4g}); raise their noise (privacy.popularity_noise_multiplier, "
                                 "federation.eval_noise_multiplier) or the cap")

    def eps(sigma: float) -> float:
        return compute_epsilon([*fixed, (sigma, sample_rate, total_steps)], target_delta, accountant)

    if accountant == "rdp":  # the search on the vectorised series, its result checked with Opacus's function
        guide = _make_rdp_guide(fixed, sample_rate, total_steps, target_delta, eps)
        try:
            lo, hi = _bisect_noise(guide, max_epsilon, tolerance, max_noise_multiplier)
        except PrivacyConfigError:
            pass  # an unreachable cap is only reported from Opacus's own numbers, below
        else:
            if eps(hi) <= max_epsilon and (lo < 1e-6 or eps(lo) > max_epsilon):
                return hi
    return _bisect_noise(eps, max_epsilon, tolerance, max_noise_multiplier)[1]


def _make_rdp_guide(fixed: History, sample_rate: float, steps: int, target_delta: float,
                    exact: Callable[[float], float]) -> Callable[[float], float]:
    """Epsilon of ``fixed`` + ``steps`` sampled-Gaussian steps at sigma from the vectorised series
    (shared/privacy/fast_rdp.py), or from ``exact`` at a sigma where the series is not given."""
    from fedsocial.shared.privacy.fast_rdp import compute_rdp_sgm

    base = compute_rdp_curve(fixed)
    orders = np.asarray(DEFAULT_ALPHAS, dtype=float)

    def guide(sigma: float) -> float:
        curve, ok = compute_rdp_sgm(sample_rate, sigma, orders)
        return epsilon_from_rdp(base + curve * steps, target_delta) if ok.all() else exact(sigma)

    return guide


def _bisect_noise(eps: Callable[[float], float], max_epsilon: float, tolerance: float,
                  max_noise_multiplier: float) -> tuple[float, float]:
    """(lo, hi) with eps(lo) > cap >= eps(hi) and hi - lo <= tolerance * hi (lo < 1e-6: any sigma meets the cap)."""
    # Bracket [lo, hi] starting at sigma = 1 and moving geometrically:
    # this avoids evaluating tiny sigmas, where Opacus's fractional-order series is slow.
    lo, hi = 0.0, 1.0
    if eps(hi) > max_epsilon:
        while eps(hi) > max_epsilon:
            lo, hi = hi, hi * 2.0
            if hi > max_noise_multiplier:
                raise PrivacyConfigError(
                    f"max_epsilon {max_epsilon} unreachable with noise_multiplier <= {max_noise_multiplier}"
                )
    else:
        lo = 0.5
        while eps(lo) <= max_epsilon:
            lo, hi = lo / 2.0, lo
            if lo < 1e-6:
                return lo, hi
    while hi - lo > tolerance * hi:
        mid = math.sqrt(lo * hi)  # geometric bisection: relative tolerance in fewer steps
        if eps(mid) > max_epsilon:
            lo = mid
        else:
            hi = mid
    return lo, hi


class PrivacyAccountant:
    """A history plus an accountant name; the only state in this module.

    Rebuild it every round from the ledger (``PrivacyAccountant(history=ledger.history())``) so that
    composition survives process restarts. ``step`` merges with the last event when sigma and q are
    unchanged, as Opacus does.
    """

    def __init__(self, mechanism: str = "rdp", history: History | None = None) -> None:
        if mechanism not in ACCOUNTANTS:
            raise PrivacyConfigError(f"accountant: must be one of {sorted(ACCOUNTANTS)}, got {mechanism!r}")
        self.mechanism = mechanism
        self.history: list[Event] = validate_history(history or [])

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        sigma, q, n = validate_event((noise_multiplier, sample_rate, steps))
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + n)
        else:
            self.history.append((sigma, q, n))

    def get_epsilon(self, delta: float) -> float:
        return compute_epsilon(self.history, delta, self.mechanism)

    def total_steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def state_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "history": [list(e) for e in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mechanism = state.get("mechanism", self.mechanism)
        if mechanism not in ACCOUNTANTS:
            raise PrivacyConfigError(f"accountant: must be one of {sorted(ACCOUNTANTS)}, got {mechanism!r}")
        self.history = validate_history([tuple(e) for e in state.get("history", [])])
        self.mechanism = mechanism

    def __len__(self) -> int:
        return len(self.history)
