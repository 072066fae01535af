"""Federated vs centralized vs local-only, per partition method, and the federation's overhead.

``python -m fedsocial.simulations.fed_bench --config configs/lastfm.toml --data-dir ../shared/datasets
[--partners 5] [--partitions community,random] [--rounds R] [--set ...] --out runs/fed_bench``

For each partition method: the federation (``fedsocial simulate``), and local-only training (each
partner trains alone with ``train_centralized`` on its own split; metrics averaged over all test users);
once: centralized training on the whole data. The overhead is the federated run's wall time divided by
the sum of the partners' local training times (``fit_time_s``) over all rounds. Writes
``OUT/fed_bench.json`` and prints markdown rows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fedsocial.shared.config import Config, load_config
from fedsocial.shared.fileio import write_json_atomic
from fedsocial.simulations.common import user_errors
from fedsocial.simulations.simulate import METRIC_KEYS, run_simulation_from_config


def run_centralized(cfg: Config, data_dir: str | None) -> dict[str, Any]:
    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.split import split_dataset
    from fedsocial.shared.trainer import train_centralized

    t0 = time.perf_counter()
    outcome = train_centralized(cfg, split_dataset(load_dataset(cfg.data, data_dir), cfg.split))
    return {**{k: float(outcome.metrics[k]) for k in METRIC_KEYS}, "epsilon": outcome.epsilon,
            "wall_time_s": time.perf_counter() - t0, "epochs_run": outcome.epochs_run,
            "best_epoch": outcome.best_epoch}


def run_local_only(cfg: Config, data_dir: str | None) -> dict[str, Any]:
    """Each partner alone (with the partners' local batch size); metrics: the mean over all test users."""
    from fedsocial.client.partner import compute_local_config
    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.partition import partition_users, partner_split
    from fedsocial.shared.split import split_dataset
    from fedsocial.shared.trainer import train_centralized

    t0 = time.perf_counter()
    cfg = compute_local_config(cfg)
    dataset = load_dataset(cfg.data, data_dir)
    split = split_dataset(dataset, cfg.split)
    assignment = partition_users(dataset, cfg.federation.partners, cfg.partition)
    sums = dict.fromkeys(METRIC_KEYS, 0.0)
    users, eps = 0, []
    for p in range(cfg.federation.partners):
        outcome = train_centralized(cfg, partner_split(split, assignment, p))
        for k in METRIC_KEYS:
            sums[k] += float(outcome.metrics[k]) * outcome.evaluated_users
        users += outcome.evaluated_users
        if outcome.epsilon is not None:
            eps.append(float(outcome.epsilon))
    return {**{k: v / max(1, users) for k, v in sums.items()}, "epsilon": max(eps) if eps else None,
            "wall_time_s": time.perf_counter() - t0}


def markdown_row(dataset: str, setting: str, partition: str, res: dict[str, Any]) -> str:
    eps = "-" if res.get("epsilon") is None else f"{res['epsilon']:.2f}"
    overhead = "-" if res.get("federation_overhead") is None else f"{res['federation_overhead']:.2f}"
    return (f"| {dataset} | {setting} | {partition} | {res['ndcg@10']:.4f} | {res['recall@10']:.4f} | "
            f"{res['hr@10']:.4f} | {eps} | {res.get('wall_time_s', res.get('simulation_wall_time_s', 0)):.0f} | "
            f"{overhead} |")


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fed_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--partners", type=int, default=5)
    parser.add_argument("--partitions", default="community,random")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--skip", default="", help="comma list of: centralized,local,federated")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    skip = set(filter(None, args.skip.split(",")))
    extra = [*args.overrides, f"federation.partners={args.partners}"]
    if args.rounds is not None:
        extra.append(f"federation.rounds={args.rounds}")
    base = load_config(args.config, extra)
    name = base.data.format
    # the training budget in epochs: centralized and local-only run at most train.epochs (early stopping
    # on validation NDCG@10 unless train.patience = 0), the federation rounds x local_epochs
    results: dict[str, Any] = {"config": args.config, "partners": args.partners, "overrides": args.overrides,
                               "centralized_epochs": base.train.epochs,
                               "federated_epochs": base.federation.rounds * base.federation.local_epochs,
                               "local_batch_size": base.federation.local_batch_size or base.train.batch_size}
    rows = []
    if "centralized" not in skip:
        results["centralized"] = run_centralized(base, args.data_dir)
        rows.append(markdown_row(name, "centralized", "-", results["centralized"]))
    for method in filter(None, args.partitions.split(",")):
        cfg = base.replace("partition", method=method)
        if "local" not in skip:
            results[f"local/{method}"] = res = run_local_only(cfg, args.data_dir)
            rows.append(markdown_row(name, "local-only", method, res))
        if "federated" not in skip:
            doc = run_simulation_from_config(cfg, args.data_dir, out / f"federated-{method}", progress=True)
            res = {k: doc[k] for k in (*METRIC_KEYS, "simulation_wall_time_s", "partner_fit_time_s",
                                       "federation_overhead")}
            res["epsilon"] = doc.get("epsilon")
            results[f"federated/{method}"] = res
            rows.append(markdown_row(name, "federated", method, res))
        write_json_atomic(out / "fed_bench.json", results)
    write_json_atomic(out / "fed_bench.json", results)
    print("| dataset | setting | partition | NDCG@10 | Recall@10 | HR@10 | epsilon | wall s | overhead |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(None))
