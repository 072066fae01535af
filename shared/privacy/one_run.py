"""Empirical lower bounds on epsilon from one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

m canaries are each included in training independently with probability 1/2. After training, the
auditor scores every canary, guesses "in" for the k+ highest scores and "out" for the k- lowest,
and abstains on the rest. Under (epsilon, delta)-DP the number of correct guesses among the r
guesses is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)), up to a delta term
(their Theorem 5.2), so an observed count that is too unlikely under a given epsilon refutes it.
The largest refuted epsilon is a lower bound that holds with the chosen confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


def compute_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses correct] under (epsilon, delta)-DP with ``m`` canaries.

    Steinke, Nasr and Jagielski 2023, Theorem 5.2: the binomial tail plus a delta term whose
    weight is the largest average of the binomial mass just below ``v``.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomised response
    tail = float(stats.binom.sf(v - 1, r, q))
    masses = stats.binom.pmf(v - np.arange(1, v + 1), r, q)  # P[Bin = v-1], ..., P[Bin = 0]
    weight = float(np.max(np.cumsum(masses) / np.arange(1, v + 1))) if v > 0 else 0.0
    return min(1.0, tail + 2.0 * m * delta * weight)


def compute_epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95,
                                eps_max: float = 50.0) -> float:
    """The largest epsilon refuted at ``confidence`` by ``v`` correct of ``r`` guesses (0 if none)."""
    alpha = 1.0 - confidence
    if compute_p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    lo, hi = 0.0, eps_max
    for _ in range(60):  # bisection: the p-value is increasing in epsilon
        mid = 0.5 * (lo + hi)
        if compute_p_value(m, r, v, mid, delta) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class OneRunAudit:
    canaries: int
    guesses: int
    correct: int
    k_in: int
    k_out: int
    epsilon_lower_bound: float
    confidence: float
    delta: float


def compute_audit_from_scores(scores: np.ndarray, included: np.ndarray, delta: float,
                              confidence: float = 0.95, guess_fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3),
                              ) -> OneRunAudit:
    """Guess the top/bottom fraction of canaries by score; return the best bound over the fractions.

    Choosing the best of several guess counts is a multiple comparison: the confidence is split
    evenly across them (Bonferroni), so the reported bound keeps its stated confidence.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = scores.shape[0]
    order = np.argsort(-scores, kind="stable")
    per_test = 1.0 - (1.0 - confidence) / len(guess_fractions)
    best: OneRunAudit | None = None
    for frac in guess_fractions:
        k = max(1, int(frac * m))  # k guesses "in" and k guesses "out"
        correct = int(included[order[:k]].sum() + (~included[order[m - k:]]).sum())
        bound = compute_epsilon_lower_bound(m, 2 * k, correct, delta, per_test)
        audit = OneRunAudit(m, 2 * k, correct, k, k, bound, confidence, delta)
        if best is None or bound > best.epsilon_lower_bound:
            best = audit
    assert best is not None
    return best
