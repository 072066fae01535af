"""The DP choice of the model a partner serves in ``joint`` scope (``privacy.selection_noise_multiplier``).

On data it was not tuned on, the DP model can rank below its own item biases (which carry the released
popularity prior): its noisy user-item term drags it down. A partner must never lose by joining, but in
joint scope it may not look at its users' validation data without DP: the choice is part of every other
user's recommendations. So, after the federation's last round (``federation.rounds``) and only then:

* the candidates are the config's ``privacy.selection_candidates`` (:data:`DEFAULT_SELECTION_CANDIDATES`;
  any of :data:`SELECTION_CANDIDATES`, ``model`` first): ``model`` (the DP model as trained, with each user's
  local p_u refit from the user's own items), ``prior`` (the DP popularity release's prior alone, or the
  model's item biases where there is no release: :mod:`fedsocial.shared.models.prior`; the user-item term
  dropped, seen items still excluded) and ``product`` (the model's score plus the prior's: a product of the
  two experts);
* each validation user's NDCG@10 under each candidate is a function of that user's own record and of DP
  parameters only, and lies in [0, 1]; the choice needs only the K - 1 differences of each candidate's sum to
  the first's (``prior`` minus ``model``), and one user moves each difference by at most 1, so the vector of
  differences moves by at most ``sqrt(K - 1)`` (1 for two candidates) in L2 norm when one user is added or removed
  (:func:`compute_selection_sensitivity`, user-level add/remove adjacency). Releasing the K sums instead
  (sensitivity ``sqrt(K)``, their difference carrying noise ``2 sigma``) would compare through twice the noise at
  the same epsilon (LastFM's 380-user partners chose wrongly that often: docs/BENCHMARKS.md 10.6);
* the partner releases the differences plus Gaussian noise of standard deviation ``sigma * sqrt(K - 1)`` on
  each (the Gaussian mechanism; RDP ``alpha / (2 sigma^2)``, the same as one sampled-Gaussian step at sample
  rate 1), charged once in its ledger as the event ``(sigma, 1.0, 1)`` with ``release = "selection"``; the
  training noise is calibrated with that event planned, so the cap holds;
* it serves the argmax over the first candidate (0) and the noisy differences (ties to the earlier
  candidate, ``model`` first): post-processing.

The noisy differences and the choice never leave the partner (``STATE_DIR/selection/round_XXXX.json``, 0600);
they are saved with their digest before the ledger entry that charges them, so a re-run re-uses them bit
for bit and never draws again; only after the charge is the choice recorded as served
(``STATE_DIR/selection/served.json``), which ``fedsocial recommend`` / ``serve`` read. The noise comes
from OS entropy, never from the (public) config seed. The ``prior`` candidate as a model is
:class:`fedsocial.shared.models.prior.PriorRanking`; this module needs no torch (a partner's accounting, which
plans this release, loads without it).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsocial.shared.fileio import read_json_object, write_json_atomic

SELECTION_CANDIDATES: tuple[str, ...] = ("model", "prior", "product")  # every candidate a partner can serve
DEFAULT_SELECTION_CANDIDATES: tuple[str, ...] = ("model", "prior")
SELECTION_FOLDER = "selection"
SELECTION_METRIC = "ndcg@10"


def compute_selection_sensitivity(candidates: Sequence[str]) -> float:
    """The L2 sensitivity of the K - 1 differences: a user moves each by at most 1, so ``sqrt(K - 1)``."""
    return math.sqrt(len(candidates) - 1)


def parse_selection_candidates(text: str) -> tuple[str, ...]:
    """``privacy.selection_candidates`` (comma-separated names) as a tuple, validated: known names, no repeat,
    ``model`` first (ties go to it), at least two."""
    names = tuple(n.strip() for n in str(text).split(","))
    unknown = [n for n in names if n not in SELECTION_CANDIDATES]
    if unknown:
        raise ValueError(f"unknown candidate {unknown[0]!r} (known: {', '.join(SELECTION_CANDIDATES)})")
    if len(set(names)) != len(names) or len(names) < 2 or names[0] != "model":
        raise ValueError(f"must name 'model' first and at least one other candidate, each once, got {text!r}")
    return names


def selection_candidates(cfg: Any) -> tuple[str, ...]:
    """The candidates of a config's selection (``privacy.selection_candidates``)."""
    return parse_selection_candidates(cfg.privacy.selection_candidates)


def uses_selection_release(cfg: Any) -> bool:
    """Whether a config makes the DP selection: DP on, joint scope, the social model, sigma > 0."""
    pc = cfg.privacy
    return bool(pc.enabled and pc.selection_noise_multiplier > 0 and pc.scope == "joint"
                and cfg.model.name == "social")


def selection_event(sigma: float) -> tuple[float, float, int]:
    """The accountant event of the release: one Gaussian step at sample rate 1."""
    return (float(sigma), 1.0, 1)


def compute_planned_selection_events(cfg: Any) -> list[tuple[float, float, int]]:
    """The selection release a run plans (one: after a federation's last round, or after centralized DP
    training), for the calibration."""
    return [selection_event(cfg.privacy.selection_noise_multiplier)] if uses_selection_release(cfg) else []


def compute_selection_sums(per_user: Mapping[str, np.ndarray],
                           candidates: Sequence[str] = DEFAULT_SELECTION_CANDIDATES) -> np.ndarray:
    """The K sums over the validation users of each candidate's per-user NDCG@10 (``candidates``' order).

    Every candidate must score the same users, each value in [0, 1]: the sensitivity rests on it."""
    rows = [np.asarray(per_user[name], dtype=np.float64) for name in candidates]
    if len({r.shape for r in rows}) != 1 or rows[0].ndim != 1:
        raise ValueError(f"selection: every candidate must score the same users, got shapes {[r.shape for r in rows]}")
    for name, r in zip(candidates, rows, strict=True):
        if not (np.isfinite(r).all() and (r >= 0).all() and (r <= 1).all()):
            raise ValueError(f"selection: candidate {name!r} has a per-user metric outside [0, 1]")
    return np.array([r.sum() for r in rows], dtype=np.float64)


def compute_selection_differences(per_user: Mapping[str, np.ndarray],
                                  candidates: Sequence[str] = DEFAULT_SELECTION_CANDIDATES) -> np.ndarray:
    """The K - 1 differences ``sum(candidate k) - sum(candidate 0)``, k >= 1 (e.g. ``prior`` minus ``model``), over
    the validation users (each user's term in [-1, 1]: the sensitivity rests on it, :func:`compute_selection_sums`)."""
    sums = compute_selection_sums(per_user, candidates)
    return sums[1:] - sums[0]


def compute_noisy_differences(differences: np.ndarray, sigma: float, rng: np.random.Generator,
                              candidates: Sequence[str] = DEFAULT_SELECTION_CANDIDATES) -> np.ndarray:
    """The Gaussian mechanism: ``differences + N(0, (sigma * sqrt(K - 1))^2)`` on every coordinate."""
    if not sigma > 0:
        raise ValueError(f"privacy.selection_noise_multiplier: must be > 0 for a release, got {sigma!r}")
    d = np.asarray(differences, dtype=np.float64)
    if d.shape != (len(candidates) - 1,):
        raise ValueError(f"selection: expected {len(candidates) - 1} differences, got shape {d.shape}")
    return d + rng.normal(0.0, sigma * compute_selection_sensitivity(candidates), d.shape)


def compute_noisy_choice(noisy_differences: np.ndarray,
                         candidates: Sequence[str] = DEFAULT_SELECTION_CANDIDATES) -> str:
    """The argmax over the first candidate (difference 0) and the others' noisy differences to it; ties go to the
    earlier candidate (``model`` first)."""
    scores = np.concatenate([[0.0], np.asarray(noisy_differences, dtype=np.float64).reshape(-1)])
    if scores.shape != (len(candidates),):
        raise ValueError(f"selection: {len(scores) - 1} differences for {len(candidates)} candidates")
    return str(candidates[int(np.argmax(scores))])


def _digest(release: Mapping[str, Any]) -> str:
    from fedsocial.shared.privacy.ledger import canonical_json

    return hashlib.sha256(canonical_json(dict(release)).encode("ascii")).hexdigest()


def compute_selection_release(round_: int, sigma: float, noisy: np.ndarray, evaluated_users: int,
                              candidates: Sequence[str] = DEFAULT_SELECTION_CANDIDATES) -> dict[str, Any]:
    """The record of one release (its candidates, noisy differences, the choice they give) and its digest."""
    release = {"round": int(round_), "sigma": float(sigma), "candidates": list(candidates),
               "noisy_differences": [float(v) for v in noisy], "choice": compute_noisy_choice(noisy, candidates),
               "evaluated_users": int(evaluated_users)}
    return {**release, "digest": _digest(release)}


def selection_release_path(state_dir: Path, round_: int) -> Path:
    """Where the selection release of ``round_`` is kept (0600, never sent)."""
    return state_dir / SELECTION_FOLDER / f"round_{int(round_):04d}.json"


def save_selection_release(state_dir: Path, release: Mapping[str, Any]) -> None:
    """Keep the release (0600) before its ledger entry, so that a re-run re-uses it instead of drawing again."""
    path = selection_release_path(state_dir, int(release["round"]))
    write_json_atomic(path, dict(release), mode=0o600)


def load_selection_release(state_dir: Path, round_: int) -> dict[str, Any] | None:
    """The saved release of ``round_``; None when missing, unreadable or altered (digest mismatch)."""
    doc = read_json_object(selection_release_path(state_dir, round_))
    if doc is None or doc.get("choice") not in SELECTION_CANDIDATES:
        return None
    cands = doc.get("candidates")
    if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands) or doc["choice"] not in cands:
        return None
    try:
        parse_selection_candidates(",".join(cands))
    except ValueError:
        return None
    body = {k: v for k, v in doc.items() if k != "digest"}
    try:
        ok = doc.get("digest") == _digest(body)
    except (TypeError, ValueError):
        return None
    return doc if ok else None


SERVED_FILE = "served.json"


def write_served_choice(state_dir: Path, release: Mapping[str, Any]) -> None:
    """Record what the partner serves, once the ledger has charged ``release`` (never before: an uncharged
    choice must not reach a user)."""
    path = state_dir / SELECTION_FOLDER / SERVED_FILE
    write_json_atomic(path, {"round": int(release["round"]), "choice": str(release["choice"]),
                             "digest": str(release["digest"])}, mode=0o600)


class SelectionError(ValueError):
    """A recorded served choice that cannot be trusted (unreadable, altered, or its charged release gone);
    the message names the file."""


def selection_charges(entries: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The ledger entries that charged a selection release (``release = "selection"``), in ledger order."""
    return [e for e in entries if e.get("release") == "selection"]


def load_charged_release(state_dir: Path, charge: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The saved release a ledger charge names, intact (same digest), else a :class:`SelectionError`."""
    round_ = charge.get("round")
    if isinstance(round_, bool) or not isinstance(round_, int):
        raise SelectionError(f"{where}: a selection charge without an integer round")
    release = load_selection_release(state_dir, round_)
    if release is None or release["digest"] != charge.get("release_sha256"):
        raise SelectionError(f"{where}: charges the selection release of round {round_}, but "
                             f"{selection_release_path(state_dir, round_)} is missing, unreadable or altered")
    return release


def read_served_choice(state_dir: Path, charges: Sequence[Mapping[str, Any]] | None = None,
                       ledger_path: Path | None = None) -> str:
    """What a joint-scope partner serves: the choice of its charged selection release (its saved release intact,
    same digest), else ``model`` when none was charged.

    ``charges`` are the partner's ledger entries that charged a selection (:func:`selection_charges`; read from
    ``ledger_path``, named in errors), or None where the ledger is not at hand. With them, the ledger decides:
    a recorded choice it never charged is refused, and a charged choice whose record (``served.json``) is gone
    is served from its saved release (the partner was stopped between the charge and the record, or the record
    was deleted: the charged choice is what it serves either way). Without them, a saved release with no
    recorded choice cannot be told apart (charged, record deleted; or never charged, killed before the charge)
    and is refused. A recorded choice that is unreadable, malformed, or whose saved release is missing or
    altered is a :class:`SelectionError` naming the file: serving another model than the charged choice,
    silently, is not an answer to tampering."""
    path = state_dir / SELECTION_FOLDER / SERVED_FILE
    where = str(ledger_path) if ledger_path is not None else "the partner's ledger"
    if not path.exists():
        if charges:
            return str(load_charged_release(state_dir, charges[-1], where)["choice"])
        saved = sorted((state_dir / SELECTION_FOLDER).glob("round_*.json"))
        if charges is None and saved:
            raise SelectionError(f"{path} is missing beside the saved selection release {saved[-1]}: whether it was "
                                 "charged is in the partner's ledger, which was not found (pass --ledger-dir)")
        return "model"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise SelectionError(f"{path}: unreadable served choice ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(doc, dict) or isinstance(doc.get("round"), bool) or not isinstance(doc.get("round"), int) \
            or doc.get("choice") not in SELECTION_CANDIDATES or not isinstance(doc.get("digest"), str):
        raise SelectionError(f"{path}: not a served choice (expected an object with an integer round, a choice "
                             f"among {', '.join(SELECTION_CANDIDATES)} and a digest)")
    release = load_selection_release(state_dir, doc["round"])
    if release is None:
        raise SelectionError(f"{path}: the selection release of round {doc['round']} it records "
                             f"({selection_release_path(state_dir, doc['round'])}) is missing, unreadable or altered")
    if release["digest"] != doc["digest"] or release["choice"] != doc["choice"]:
        raise SelectionError(f"{path}: records choice {doc['choice']!r} and digest {doc['digest'][:12]}..., its "
                             f"release of round {doc['round']} says {release['choice']!r} and "
                             f"{str(release['digest'])[:12]}...: one of them was altered")
    if charges is not None and not any(c.get("round") == doc["round"] and c.get("release_sha256") == doc["digest"]
                                       for c in charges):
        raise SelectionError(f"{path}: records the selection of round {doc['round']}, which {where} never charged")
    if charges and charges[-1].get("round") != doc["round"]:  # a later charge whose record was not written yet
        return str(load_charged_release(state_dir, charges[-1], where)["choice"])
    return str(release["choice"])
