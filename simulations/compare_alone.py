"""``fedsocial simulate ... --compare-alone``: what each partner would serve training alone, next to what it serves.

Each partner also trains alone, non-private, on its own data with the federation's budget
(:func:`fedsocial.client.personalize.compute_alone_config`: rounds x local_epochs epochs at the
partner's batch size, early stopping on its own validation data). ``metrics.json`` gains, per partner,
``alone`` (its test metrics) next to ``served`` (what it serves), and at the top level ``federation_gain``: the
mean over partners of served NDCG@10 / alone NDCG@10 (above 1: joining pays).

In a simulation the driver stands in for each partner: it rebuilds the partner's split exactly as the
partner does, and in ``partner`` scope it reuses the alone model the partner already trained for its
served mixture (``partners/<id>/personal/alone.npz``, keyed by config) instead of training it twice.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedsocial.shared.config import Config
from fedsocial.simulations.common import user_errors

METRIC_KEYS = ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "hr@20")


def compute_federation_gain(served_ndcg: dict[str, float], alone_ndcg: dict[str, float]) -> float:
    """Mean over partners of served NDCG@10 / alone NDCG@10 (partners in both maps).

    A partner whose alone NDCG@10 is 0 has no finite ratio: the gain is then +inf if it is served
    anything above 0, else 1 (equal).
    """
    common = sorted(set(served_ndcg) & set(alone_ndcg))
    if not common:
        raise ValueError("federation_gain: no partner has both served and alone metrics")
    ratios = [compute_ratio(served_ndcg[p], alone_ndcg[p]) for p in common]
    return float(sum(ratios) / len(ratios))


def compute_ratio(served: float, alone: float) -> float:
    if alone > 0:
        return served / alone
    return math.inf if served > 0 else 1.0


def _partners_alone(cfg: Config, data_dir: str | None, run_dir: Path) -> Iterator[tuple[int, str, Config, Any, Any]]:
    """(index, partner id, the partners' local config, its split, its alone model) for every partner, the
    data loaded, split and partitioned as the simulation's partners did; alone models from their caches."""
    from fedsocial.client.partner import compute_local_config
    from fedsocial.client.personalize import PERSONAL_DIR, train_alone_model
    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.partition import partition_users, partner_split
    from fedsocial.shared.split import split_dataset

    local = compute_local_config(cfg)
    dataset = load_dataset(local.data, data_dir)
    split = split_dataset(dataset, local.split)
    assignment = partition_users(dataset, local.federation.partners, local.partition)
    for index in range(local.federation.partners):
        pid = f"partner-{index}"
        part = partner_split(split, assignment, index)
        cache = run_dir / "partners" / pid / PERSONAL_DIR
        model, _ = train_alone_model(local, part, cache if cache.is_dir() else None)
        yield index, pid, local, part, model


def alone_metrics(cfg: Config, data_dir: str | None, run_dir: Path) -> dict[str, dict[str, float]]:
    """Test metrics of every partner trained alone (partner ids as the simulation names them)."""
    from fedsocial.shared.batching import ExampleBuilder
    from fedsocial.shared.metrics import evaluate_model

    out: dict[str, dict[str, float]] = {}
    for _, pid, local, part, model in _partners_alone(cfg, data_dir, run_dir):
        metrics, n = evaluate_model(model, part, "test", builder=ExampleBuilder.from_split(part, local.model))
        out[pid] = {**{k: float(metrics[k]) for k in METRIC_KEYS}, "evaluated_users": int(n)}
    return out


def served_metrics(run_dir: Path, pid: str, info: dict[str, Any]) -> dict[str, float] | None:
    """What the partner serves, measured on its test users: in partner scope its personalisation record;
    else its own evaluation record (``partners/<id>/eval/``, kept on the partner when DP evaluation results
    do not leave it), else the metrics it reported to the server."""
    record = personal_record(run_dir, pid)
    if record is not None:
        return {k: float(v) for k, v in record["test"][record["choice"]].items()}
    evals = sorted((run_dir / "partners" / pid / "eval").glob("round_*.json"))
    if evals:
        doc = json.loads(evals[-1].read_text(encoding="utf-8"))
        return {k: float(doc[k]) for k in METRIC_KEYS if k in doc}
    return {k: float(info[k]) for k in METRIC_KEYS} if all(k in info for k in METRIC_KEYS) else None


def local_pipeline_metrics(cfg: Config, data_dir: str | None, run_dir: Path) -> dict[str, dict[str, Any]]:
    """Control for partner scope: the same personalisation with no federation at all.

    Each partner runs :func:`fedsocial.client.personalize.personalise` with the federation's *initial*
    (untrained) shared parameters in place of the DP-trained ones, and its cached alone model. What the
    partner-scope served model gains over this is what the DP federation itself contributes; what this
    gains over ``alone`` is local ensembling, which a partner could have without joining.
    """
    from fedsocial.client.partner import compute_round_seed
    from fedsocial.client.personalize import personalise
    from fedsocial.shared.trainer import LocalTrainer

    out: dict[str, dict[str, Any]] = {}
    for index, pid, local, part, alone in _partners_alone(cfg, data_dir, run_dir):
        start = LocalTrainer(local, part, device="cpu", seed=local.train.seed)  # the initial shared parameters
        start.refit_local()
        seed = compute_round_seed(local.train.seed, index, local.federation.rounds) + 1  # as the last evaluation
        result = personalise(local, part, start.model, None, seed, alone=alone)
        out[pid] = {"choice": result.choice, **{k: float(v) for k, v in result.test[result.choice].items()}}
    return out


def personal_record(run_dir: Path, pid: str) -> dict[str, Any] | None:
    """The partner's last personalisation record (partner scope), from its own state folder."""
    from fedsocial.client.personalize import PERSONAL_DIR

    records = sorted((run_dir / "partners" / pid / PERSONAL_DIR).glob("round_*.json"))
    return json.loads(records[-1].read_text(encoding="utf-8")) if records else None


def add_alone_metrics_inplace(doc: dict[str, Any], cfg: Config, data_dir: str | None, run_dir: Path) -> None:
    """metrics.json: ``partners.<id>.alone``, ``partners.<id>.served_over_alone`` and ``federation_gain``."""
    alone = alone_metrics(cfg, data_dir, run_dir)
    partners = doc.setdefault("partners", {})
    served: dict[str, float] = {}
    for pid, metrics in alone.items():
        info = partners.setdefault(pid, {})
        info["alone"] = metrics
        mine = served_metrics(run_dir, pid, info)
        if mine is not None:
            info["served"] = mine
            served[pid] = mine["ndcg@10"]
            info["served_over_alone"] = compute_ratio(served[pid], metrics["ndcg@10"])
        record = personal_record(run_dir, pid)
        if record is not None:
            info["personalisation"] = {"choice": record["choice"], "round": record["round"],
                                       "shared_test": record["test"]["shared"], "val_ndcg@10": {
                                           k: v["ndcg@10"] for k, v in record["val"].items()}}
    doc["federation_gain"] = compute_federation_gain(served, {p: m["ndcg@10"] for p, m in alone.items()})
    doc["alone_budget"] = {"epochs": cfg.federation.rounds * cfg.federation.local_epochs,
                           "batch_size": cfg.federation.local_batch_size or cfg.train.batch_size,
                           "private": False}


@user_errors
def main(argv: list[str] | None = None) -> int:
    """``python -m fedsocial.simulations.compare_alone RUN_DIR [--data-dir DIR]``: add the alone comparison
    to a finished run (its own config.toml), e.g. one run without ``--compare-alone``; rewrites
    metrics.json (re-signed with the run's server key, ``server/signing.key``, when the server signed it)
    and report.html. Refuses, before training anything, a signed run whose key is not in the folder or
    whose metrics.json is not the one the server signed."""
    import argparse

    from fedsocial.shared.config import load_config, resolve_data_dir
    from fedsocial.shared.privacy.records import RecordError, load_metrics_signer, resign_metrics
    from fedsocial.simulations.report import write_report

    parser = argparse.ArgumentParser(prog="compare_alone", description=main.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--local-control", action="store_true",
                        help="also run the personalisation without the federation (local_pipeline_metrics)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        print(f"error: {metrics}: no such file (is {run_dir} a finished run?)", file=sys.stderr)
        return 2
    try:
        load_metrics_signer(run_dir)  # the signature can be kept: checked before the (long) training alone
    except RecordError as exc:
        print(f"error: {run_dir}: {exc}", file=sys.stderr)
        return 2
    cfg = load_config(run_dir / "config.toml")
    doc = json.loads(metrics.read_text(encoding="utf-8"))
    data_dir = str(resolve_data_dir(args.data_dir).resolve())
    add_alone_metrics_inplace(doc, cfg, data_dir, run_dir)
    if args.local_control:
        control = local_pipeline_metrics(cfg, data_dir, run_dir)
        for pid, res in control.items():
            doc["partners"][pid]["local_pipeline"] = res
        served = {p: float(i["served"]["ndcg@10"]) for p, i in doc["partners"].items() if "served" in i}
        doc["federation_gain_over_local_pipeline"] = compute_federation_gain(
            served, {p: r["ndcg@10"] for p, r in control.items()})
        print(f"{run_dir}: federation_gain_over_local_pipeline {doc['federation_gain_over_local_pipeline']:.4f}")
    try:
        signed = resign_metrics(run_dir, doc, "compare_alone")
    except RecordError as exc:  # changed while the partners trained alone
        print(f"error: {run_dir}: {exc}", file=sys.stderr)
        return 2
    if not signed:
        print(f"note: {metrics} has no signed record (a run of an older fedsocial): rewritten unsigned",
              file=sys.stderr)
    write_report(run_dir, doc)
    print(f"{run_dir}: federation_gain {doc['federation_gain']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(None))
