"""What a partner's evaluation may release, and the DP release of its metrics (issue 11 item 6).

A partner scores its own test users after every evaluated round. Those numbers are statistics of its
users' records, so what leaves the partner is one of (``federation.eval_noise_multiplier``):

* ``0`` (the default under DP): **nothing but the round and the partner id**. The metrics are
  written to the partner's own folder (``STATE_DIR/eval/round_XXXX.json``); the simulation driver,
  which plays every party on one machine, reads them for metrics.json.
* ``sigma > 0``: the **Gaussian mechanism** on the vector of the six per-metric sums over the
  evaluated users plus their count. Each user's metric is in [0, 1] and each user adds to the count
  once, so adding or removing one user moves the vector by at most ``sqrt(6 + 1)`` in L2 norm
  (:data:`EVAL_SENSITIVITY`); noise of standard deviation ``sigma * EVAL_SENSITIVITY`` on every
  coordinate makes the release (epsilon, delta)-DP, and its RDP is that of one sampled-Gaussian step
  with sample rate 1: it is charged in the partner's ledger as the event ``(sigma, 1.0, 1)`` and
  composes with training in the same history. The server gets ``clip(noisy sum / noisy count)``
  and ``round(noisy count)``: post-processing of the release.

Without DP (``privacy.enabled = false``) no guarantee is claimed and the exact metrics are sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsocial.shared.fileio import read_json_object, write_json_atomic

EVAL_METRIC_KEYS: tuple[str, ...] = ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "hr@20")
EVAL_SENSITIVITY = math.sqrt(len(EVAL_METRIC_KEYS) + 1)  # six sums in [0, n] plus the count, one user: <= 1 each
EVAL_FOLDER = "eval"
EVAL_RELEASES = "eval_releases"

# What each evaluation mode lets leave the partner (the egress test checks every reply against it).
RELEASE_MODES = ("clear", "local", "dp")
RELEASED_KEYS: dict[str, frozenset[str]] = {
    "clear": frozenset({"round", "partner_id", "released", "evaluated_users", "eval_time_s", *EVAL_METRIC_KEYS}),
    "local": frozenset({"round", "partner_id", "released"}),
    # and the ledger entry that charges the release (epsilon after it, its round and hash), as a fit reply's
    "dp": frozenset({"round", "partner_id", "released", "evaluated_users", *EVAL_METRIC_KEYS,
                     "epsilon", "ledger_round", "ledger_head"}),
}


def compute_release_mode(privacy_enabled: bool, eval_noise_multiplier: float) -> str:
    """``clear`` without DP; under DP ``dp`` when ``eval_noise_multiplier > 0``, else ``local``."""
    if not privacy_enabled:
        return "clear"
    return "dp" if eval_noise_multiplier > 0 else "local"


def compute_noisy_release(metrics: Mapping[str, float], n: int, sigma: float, max_users: int,
                          rng: np.random.Generator) -> tuple[dict[str, float], int]:
    """The Gaussian mechanism on (sums, count), post-processed to (means in [0, 1], count in [0, max_users]).

    ``metrics`` are means over ``n`` users (so the sums are ``mean * n``); ``max_users`` is the
    partner's declared (public) user count.
    """
    if not sigma > 0:
        raise ValueError(f"federation.eval_noise_multiplier: must be > 0 for a DP release, got {sigma!r}")
    std = sigma * EVAL_SENSITIVITY
    sums = np.array([float(metrics[k]) * n for k in EVAL_METRIC_KEYS]) + rng.normal(0.0, std, len(EVAL_METRIC_KEYS))
    count = float(n) + float(rng.normal(0.0, std))
    means = np.clip(sums / max(count, 1.0), 0.0, 1.0)
    return ({k: float(v) for k, v in zip(EVAL_METRIC_KEYS, means, strict=True)},
            int(min(max(round(count), 0), max_users)))


def eval_event(sigma: float) -> tuple[float, float, int]:
    """The accountant event of one DP evaluation release: one Gaussian step at sample rate 1."""
    return (float(sigma), 1.0, 1)


def compute_planned_eval_events(cfg: Any) -> list[tuple[float, float, int]]:
    """The DP evaluation releases a federated run plans (every ``eval_every`` rounds and after the last),
    so that a calibrated training noise leaves room for them; RDP composition does not depend on order."""
    fc = cfg.federation
    if not (cfg.privacy.enabled and fc.eval_noise_multiplier > 0):
        return []
    return [eval_event(fc.eval_noise_multiplier)] * len(compute_planned_eval_rounds(cfg))


def compute_planned_eval_rounds(cfg: Any) -> list[int]:
    """The rounds after which a federated run evaluates: every ``eval_every`` rounds and after the last
    (the server's schedule, server/aggregation.py ``compute_is_eval_round``). A DP partner releases an
    evaluation for these rounds only: any other would spend budget its calibration did not plan."""
    fc = cfg.federation
    return [r for r in range(1, fc.rounds + 1) if r % fc.eval_every == 0 or r == fc.rounds]


def write_local_evaluation(state_dir: Path, round_: int, metrics: Mapping[str, float], n: int,
                           eval_time_s: float) -> Path:
    """The partner's own record of its evaluation (never sent): ``STATE_DIR/eval/round_XXXX.json``, 0600."""
    path = state_dir / EVAL_FOLDER / f"round_{round_:04d}.json"
    write_json_atomic(path, {"round": int(round_), "evaluated_users": int(n), "eval_time_s": float(eval_time_s),
                             **{k: float(metrics[k]) for k in EVAL_METRIC_KEYS}}, mode=0o600)
    return path


def save_eval_release(state_dir: Path, round_: int, release: Mapping[str, Any]) -> None:
    """Keep a DP evaluation release before its ledger entry, so a re-run re-sends it (as for training)."""
    path = state_dir / EVAL_RELEASES / f"round_{round_:04d}.json"
    write_json_atomic(path, dict(release), mode=0o600)


def load_eval_release(state_dir: Path, round_: int) -> dict[str, Any] | None:
    return read_json_object(state_dir / EVAL_RELEASES / f"round_{round_:04d}.json")


def read_local_evaluations(partner_dirs: Sequence[Path]) -> dict[int, dict[str, dict[str, Any]]]:
    """round -> partner -> its local evaluation, from each partner folder (the simulation driver's view)."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for folder in partner_dirs:
        for path in sorted((folder / EVAL_FOLDER).glob("round_*.json")):
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and isinstance(doc.get("round"), int):
                out.setdefault(doc["round"], {})[folder.name] = doc
    return out


def compute_pooled_metrics(evaluations: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The mean over all evaluated users of every partner (each partner's mean weighted by its count)."""
    total = sum(int(e["evaluated_users"]) for e in evaluations.values())
    if total <= 0:
        return {}
    return {k: sum(float(e[k]) * int(e["evaluated_users"]) for e in evaluations.values()) / total
            for k in EVAL_METRIC_KEYS}


def merge_local_evaluations_inplace(doc: dict[str, Any], partners_dir: Path) -> None:
    """Fill metrics.json's evaluation from the partners' own records where nothing was released.

    Only the simulation driver may do this: it plays every party on one machine. Rounds the server
    already has (clear or DP-released) keep what the server received.
    """
    local = read_local_evaluations(sorted(p for p in partners_dir.iterdir() if p.is_dir())
                                   if partners_dir.is_dir() else [])
    filled = False
    for rec in doc.get("rounds", []):
        evals = local.get(rec["round"]) if isinstance(rec, dict) and isinstance(rec.get("round"), int) else None
        if not evals or "ndcg@10" in rec:
            continue
        rec.update(compute_pooled_metrics(evals))
        rec["partners"] = {pid: {**{k: e[k] for k in EVAL_METRIC_KEYS}, "evaluated_users": e["evaluated_users"]}
                           for pid, e in evals.items()}
        rec["evaluation"] = "kept on the partners (read from their folders by the simulation driver)"
        filled = True
    if not filled:
        return
    last = max(r for r, evals in local.items() if evals)
    pooled = compute_pooled_metrics(local[last])
    if all(not (isinstance(doc.get(k), float) and math.isfinite(doc[k])) for k in EVAL_METRIC_KEYS):
        doc.update(pooled)
    partners = doc.setdefault("partners", {})
    for pid, e in local[last].items():
        partners.setdefault(pid, {}).update({k: e[k] for k in EVAL_METRIC_KEYS}, evaluated_users=e["evaluated_users"])
    for pid in {p for evals in local.values() for p in evals}:
        total = sum(float(evals[pid]["eval_time_s"]) for evals in local.values() if pid in evals)
        partners.setdefault(pid, {})["eval_time_s_total"] = total
    doc["partner_eval_time_s"] = sum(float(p.get("eval_time_s_total", 0.0)) for p in partners.values())
    doc["evaluation_release"] = "kept on the partners; metrics read from their folders by the simulation driver"


def merge_local_fit_times_inplace(doc: dict[str, Any], partners_dir: Path) -> None:
    """metrics.json's training times from the partners' own records (``STATE_DIR/fit/round_XXXX.json``),
    which a DP partner keeps instead of sending; simulation driver only, as above."""
    partners = doc.setdefault("partners", {})
    folders = sorted(p for p in partners_dir.iterdir() if p.is_dir()) if partners_dir.is_dir() else []
    by_round: dict[int, dict[str, float]] = {}
    for folder in folders:
        for path in sorted((folder / "fit").glob("round_*.json")):
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
                by_round.setdefault(int(rec["round"]), {})[folder.name] = float(rec["fit_time_s"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
    if not by_round:
        return
    for rec in doc.get("rounds", []):
        times = by_round.get(rec["round"]) if isinstance(rec, dict) and isinstance(rec.get("round"), int) else None
        if times and not any(float(v) > 0 for v in (rec.get("fit_time_s") or {}).values()):
            rec["fit_time_s"] = {pid: t for pid, t in sorted(times.items()) if pid in (rec.get("accepted") or times)}
    for pid in {p for times in by_round.values() for p in times}:
        info = partners.setdefault(pid, {})
        if not float(info.get("fit_time_s_total", 0.0)) > 0:
            info["fit_time_s_total"] = sum(times.get(pid, 0.0) for times in by_round.values())
    doc["partner_fit_time_s"] = sum(float(p.get("fit_time_s_total", 0.0)) for p in partners.values())
