"""One-run auditing (Steinke, Nasr and Jagielski 2023): known values and a randomised-response check."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsocial.shared.privacy.one_run import compute_audit_from_scores, compute_epsilon_lower_bound, compute_p_value


def test_p_value_without_delta_is_the_binomial_tail() -> None:
    # all 10 of 10 guesses right at epsilon 0 (coin flips): 2^-10
    assert compute_p_value(10, 10, 10, 0.0, 0.0) == pytest.approx(2.0**-10, rel=1e-12)
    # at least 9 of 10 with q = e/(1+e) at epsilon 1, by hand
    q = math.e / (1 + math.e)
    assert compute_p_value(10, 10, 9, 1.0, 0.0) == pytest.approx(q**10 + 10 * q**9 * (1 - q), rel=1e-12)


def test_delta_term_only_adds() -> None:
    base = compute_p_value(1000, 200, 150, 1.0, 0.0)
    assert compute_p_value(1000, 200, 150, 1.0, 1e-5) >= base


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 300), frac=st.floats(0, 1), e1=st.floats(0, 5), e2=st.floats(0, 5))
def test_p_value_is_monotone_in_epsilon(r: int, frac: float, e1: float, e2: float) -> None:
    v = int(frac * r)
    lo, hi = sorted((e1, e2))
    assert compute_p_value(r, r, v, lo, 1e-6) <= compute_p_value(r, r, v, hi, 1e-6) + 1e-12


def test_chance_level_guessing_gives_no_bound() -> None:
    assert compute_epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0


def _randomised_response_scores(m: int, eps: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))  # eps-DP per canary
    bit = np.where(truthful, included, ~included)
    return bit + 1e-3 * rng.random(m), included


def test_bound_is_valid_and_tight_for_randomised_response() -> None:
    # Prepare: an eps-DP mechanism per canary; the audit must not exceed eps (95% confidence)
    eps, m, trials = 2.0, 4000, 20
    rng = np.random.default_rng(0)
    # Execute
    bounds = [compute_audit_from_scores(*_randomised_response_scores(m, eps, rng), delta=0.0).epsilon_lower_bound
              for _ in range(trials)]
    # Assert: valid (at most a few violations at 95%) and informative (well above 0)
    assert sum(b > eps for b in bounds) <= 3
    assert np.median(bounds) > 1.0
