"""RDP of the sampled Gaussian mechanism at many orders at once: Opacus's series, vectorised over the orders.

Opacus (``accountants/analysis/rdp.py``, after TF Privacy) evaluates log(A_alpha) of Mironov, Talwar and
Zhang 2019 ("Renyi differential privacy of the sampled Gaussian mechanism", Section 3.3) order by order in
Python loops: about 0.2 s for its 151 default orders at q = 1/3, and noise calibration bisects over a dozen
noise levels. Here the same terms, with the same stopping rule, are summed for all orders at once with
numpy (positive and negative terms apart, in blocks, so the last bits differ from Opacus's running sum: within
1e-7 relative in the tests). The result is used to *guide* the calibration's search only
(``shared/privacy/accounting.py``): every epsilon a ledger, an audit or a report holds is still Opacus's own,
and the search's two deciding comparisons are checked with Opacus's function
(``tests/test_fast_rdp.py`` compares both over a grid of (q, sigma) and pins known values).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

STOP_LOG_TERM = -30.0  # Opacus stops a fractional order's series once both of its terms fall below e^-30
BLOCK = 256  # terms of every unfinished fractional order computed together
MAX_TERMS = 1 << 22  # a series longer than this is left to Opacus (its own loop would take minutes)


def compute_log_a_int(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log(A_alpha) for integer orders: log sum_{i <= alpha} C(alpha, i) q^i (1-q)^(alpha-i) e^{(i^2-i)/(2 sigma^2)}
    (Mironov et al. 2019, Section 3.3), every order's terms in one array."""
    a = np.asarray(alphas, dtype=float)[:, None]
    i = np.arange(int(a.max(initial=0)) + 1, dtype=float)[None, :]
    with np.errstate(divide="ignore"):  # C(alpha, i) = 0 past alpha: those terms are log 0 = -inf
        s = np.log(special.binom(a, i)) + i * math.log(q) + (a - i) * math.log(1 - q) + (i * i - i) / (2 * sigma**2)
    return _log_sum_rows(np.where(i <= a, s, -np.inf))


def compute_log_a_frac(q: float, sigma: float, alphas: np.ndarray, block: int = BLOCK,
                       max_terms: int = MAX_TERMS) -> tuple[np.ndarray, np.ndarray]:
    """(log(A_alpha), ok) for fractional orders: the two half-line integrals' series of Mironov et al. 2019,
    each order's terms up to and including the first where both fall below e^-30 (Opacus's stopping rule),
    positive and negative terms summed apart in log space, ``block`` terms of every unfinished order at a
    time. ``ok`` False: an order whose series the guide does not give (a zero coefficient or a negative sum,
    where Opacus's own loop raises, or more than ``max_terms`` terms)."""
    alphas = np.asarray(alphas, dtype=float)
    n = len(alphas)
    sums = np.full((4, n), -np.inf)  # log of: positive terms of s0, negative of s0, positive of s1, negative of s1
    active, ok = np.ones(n, bool), np.ones(n, bool)
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    start = 0
    while active.any():
        rows = np.nonzero(active)[0]
        if start >= max_terms:
            ok[rows], active[rows] = False, False
            break
        a = alphas[rows][:, None]
        i = np.arange(start, start + block, dtype=float)[None, :]
        coef = special.binom(a, i)
        j = a - i
        with np.errstate(divide="ignore"):
            log_coef = np.log(np.abs(coef))
        log_s0 = (log_coef + i * math.log(q) + j * math.log(1 - q) + (i * i - i) / (2 * sigma**2)
                  + math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma)))
        log_s1 = (log_coef + j * math.log(q) + i * math.log(1 - q) + (j * j - j) / (2 * sigma**2)
                  + math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma)))
        stop = np.maximum(log_s0, log_s1) < STOP_LOG_TERM
        done = stop.any(1)
        last = np.where(done, stop.argmax(1), block - 1)  # index of each order's last term in this block
        keep = np.arange(block)[None, :] <= last[:, None]
        ok[rows[(keep & (coef == 0)).any(1)]] = False
        pos = coef > 0
        for k, (terms, sign) in enumerate(((log_s0, pos), (log_s0, ~pos), (log_s1, pos), (log_s1, ~pos))):
            sums[k, rows] = np.logaddexp(sums[k, rows], _log_sum_rows(np.where(keep & sign, terms, -np.inf)))
        active[rows[done]] = False
        start += block
    with np.errstate(invalid="ignore"):
        ok &= (sums[0] >= sums[1]) & (sums[2] >= sums[3])
    log_a = _log_add(_log_sub(sums[0], sums[1]), _log_sub(sums[2], sums[3]))
    return np.where(ok, log_a, np.nan), ok


def compute_rdp_sgm(q: float, sigma: float, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(RDP of one sampled-Gaussian step at each order, ok): Opacus's ``_compute_rdp`` for every order at once,
    with its special cases (q = 0, sigma = 0, q = 1). ``ok`` False: an order the vectorised series cannot
    give as Opacus would (its value there is NaN)."""
    orders = np.asarray(orders, dtype=float)
    ok = np.ones(orders.shape, bool)
    if q == 0:
        return np.zeros(orders.shape), ok
    if sigma == 0:
        return np.full(orders.shape, np.inf), ok
    if q == 1.0:
        return orders / (2 * sigma**2), ok
    out = np.full(orders.shape, np.nan)
    finite = np.isfinite(orders)
    out[~finite] = np.inf
    is_int = finite & (orders == np.floor(orders))
    frac = finite & ~is_int
    if is_int.any():
        out[is_int] = compute_log_a_int(q, sigma, orders[is_int]) / (orders[is_int] - 1)
    if frac.any():
        log_a, frac_ok = compute_log_a_frac(q, sigma, orders[frac])
        out[frac] = log_a / (orders[frac] - 1)
        ok[frac] = frac_ok
    return out, ok


def _log_sum_rows(x: np.ndarray) -> np.ndarray:
    """log sum_j e^{x[r, j]} for every row r, shifted by the row's maximum; a row of -inf gives -inf."""
    m = x.max(axis=1)
    shift = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(x - shift[:, None]).sum(axis=1)) + shift


def _log_add(logx: np.ndarray, logy: np.ndarray) -> np.ndarray:
    """log(e^x + e^y) as Opacus's ``_log_add`` computes it: log1p(exp(min - max)) + max; -inf adds nothing."""
    a, b = np.minimum(logx, logy), np.maximum(logx, logy)
    with np.errstate(invalid="ignore"):  # -inf - -inf: replaced below
        return np.where(a == -np.inf, b, np.log1p(np.exp(a - b)) + b)


def _log_sub(logx: np.ndarray, logy: np.ndarray) -> np.ndarray:
    """log(e^x - e^y) for x >= y as Opacus's ``_log_sub``: log(expm1(x - y)) + y; x where expm1 overflows."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        d = np.expm1(logx - logy)
        out = np.where(np.isinf(d), logx, np.log(d) + logy)
    out = np.where(logy == -np.inf, logx, out)
    return np.where(logx == logy, -np.inf, out)


def _log_erfc(x: np.ndarray | float) -> np.ndarray:
    """log(erfc(x)), accurate for large x: log 2 + log_ndtr(-x sqrt 2), as Opacus."""
    return math.log(2) + special.log_ndtr(-np.asarray(x, dtype=float) * 2**0.5)
