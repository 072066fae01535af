"""Item and user features of the generic CSV format: category codes, price bins, offline text features.

Text: no PyPI package checked for this project ships sentence-embedding weights inside the wheel
(the candidates download them from a model hub at run time, which this project must never do), so
titles and descriptions are featurised deterministically on the catalogue itself: hashed word
unigrams and bigrams (the hashing trick, Weinberger et al. 2009), TF-IDF weighting, and a truncated
SVD to ``dim`` dimensions (latent semantic analysis, Deerwester et al. 1990). The result depends only
on the catalogue's texts and ``dim``, and is cached per catalogue under ``$FEDSOCIAL_CACHE_DIR``
(default ``~/.cache/fedsocial``), keyed by the SHA-256 of the texts.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

TEXT_FEATURES_VERSION = "hashed-tfidf-svd-2"
_HASH_BUCKETS = 1 << 18
_TOKEN_RE = re.compile(r"\w+", re.UNICODE)


MAX_SELF_NAMED_CODE = 65_535  # integer categories keep their value up to this: the category table has max + 1 rows


def compute_codes(values: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer codes of string values and the name of each code: canonical integers keep their value when all
    are non-negative integers of at most :data:`MAX_SELF_NAMED_CODE` (Ciao's category ids, partition exports; they
    name themselves: ``()``; only ASCII digits make a code), else the rank in sorted order, code c named by the
    c-th distinct value (a code of 10**18 would have sized a table of 10**18 rows: found in review). ``values``
    may be an object array of str (a long name is not widened to a fixed-width array)."""
    values = np.asarray(values)
    if values.dtype.kind not in "UO":  # str arrays, or object arrays of str (long names: no fixed width)
        values = values.astype(str)
    uniq, codes = np.unique(values, return_inverse=True)
    names = [str(v) for v in uniq.tolist()]
    codes = codes.reshape(-1).astype(np.int64)
    if names and all(_is_code(v) for v in names):
        return np.array([int(v) for v in names], dtype=np.int64)[codes], ()
    return codes, tuple(names)


def _is_code(value: str) -> bool:
    """A canonical integer code: ASCII decimal digits only ("²" or "١" are names: ``int()`` takes some of them,
    ``str.isdigit()`` all), no leading zero, at most :data:`MAX_SELF_NAMED_CODE`."""
    return value.isascii() and value.isdigit() and str(int(value)) == value and int(value) <= MAX_SELF_NAMED_CODE


def compute_price_bins(prices: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile bin (0..n_bins-1) of each price; a missing price (NaN) gets the extra code ``n_bins``.

    Quantile edges over the catalogue's own prices give bins of about equal size whatever the
    currency or skew; equal prices always share a bin.
    """
    prices = np.asarray(prices, dtype=np.float64)
    known = np.isfinite(prices)
    out = np.full(prices.shape, n_bins, dtype=np.int64)
    if known.any():
        edges = np.quantile(prices[known], np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
        out[known] = np.searchsorted(edges, prices[known], side="right")
    return out


def _tokens(text: str) -> list[str]:
    words = [w.lower() for w in _TOKEN_RE.findall(text)]
    return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]


def compute_tfidf(texts: list[str]) -> Any:
    """Rows: L2-normalised TF-IDF over hashed unigrams and bigrams (crc32, stable across runs)."""
    import scipy.sparse as sp

    rows, cols = [], []
    for r, text in enumerate(texts):
        for tok in _tokens(text):
            rows.append(r)
            cols.append(zlib.crc32(tok.encode("utf-8")) % _HASH_BUCKETS)
    tf = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), _HASH_BUCKETS))
    tf.sum_duplicates()
    df = np.bincount(tf.indices, minlength=_HASH_BUCKETS)
    idf = np.log((1.0 + len(texts)) / (1.0 + df)) + 1.0  # smoothed idf
    tfidf = tf.multiply(idf[None, :]).tocsr()
    norms = np.sqrt(np.asarray(tfidf.multiply(tfidf).sum(axis=1)).ravel())
    return sp.diags(1.0 / np.maximum(norms, 1e-12)) @ tfidf


def compute_text_features(texts: list[str], dim: int, power_iterations: int = 3) -> np.ndarray:
    """[len(texts), dim] float32 features: the TF-IDF rows projected on its top ``dim`` right singular
    vectors (X V = U S), by a randomised SVD with a fixed seed (Halko, Martinsson and Tropp 2011,
    algorithms 4.3 and 5.1) so that the same catalogue always gives the same features (ARPACK's order
    and signs vary between calls when singular values tie). Orthonormalisation happens on the item side
    only and the small factorisation is the eigendecomposition of a (dim+10)^2 Gram matrix, so the cost
    is linear in the vocabulary. Each component's sign makes its largest entry positive; an empty text
    gets zeros; components beyond the catalogue's rank are zero."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    tfidf = compute_tfidf(texts)
    used = np.unique(tfidf.indices)
    if used.size == 0:
        return out
    x = tfidf[:, used].astype(np.float64).tocsr()
    xt = x.T.tocsr()
    k = min(dim, *x.shape)
    width = min(k + 10, *x.shape)
    q = np.linalg.qr(x @ np.random.default_rng(0).standard_normal((x.shape[1], width)))[0]
    for _ in range(power_iterations):  # sharpens the spectrum's decay (power iteration on X X^T)
        q = np.linalg.qr(x @ (xt @ q))[0]
    z = np.asarray(xt @ q)  # X^T Q [vocabulary, width]
    evals, evecs = np.linalg.eigh(z.T @ z)  # (Q^T X)(Q^T X)^T = E S^2 E^T
    order = np.argsort(-evals)[:k]
    u = q @ (evecs[:, order] * np.sqrt(np.maximum(evals[order], 0.0)))  # U S
    sign = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(k)])
    sign[sign == 0] = 1.0
    out[:, :k] = (u * sign).astype(np.float32)
    out[np.diff(tfidf.indptr) == 0] = 0.0  # no token: exactly zero, not rounding noise
    return out


def text_cache_dir() -> Path:
    """``$FEDSOCIAL_CACHE_DIR``, else ``~/.cache/fedsocial``."""
    return Path(os.environ.get("FEDSOCIAL_CACHE_DIR") or Path.home() / ".cache" / "fedsocial")


def cached_text_features(texts: list[str], dim: int) -> np.ndarray:
    """:func:`compute_text_features`, read from / written to the per-catalogue cache."""
    digest = hashlib.sha256()
    digest.update(f"{TEXT_FEATURES_VERSION}\0{dim}\0".encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    path = text_cache_dir() / "text" / f"{digest.hexdigest()}.npy"
    if path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape == (len(texts), dim):
                return np.asarray(cached, dtype=np.float32)
        except (OSError, ValueError, EOFError):
            pass  # a damaged cache entry is recomputed and replaced
    features = compute_text_features(texts, dim)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, features, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home still works, only slower
    return features
