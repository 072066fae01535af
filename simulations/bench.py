"""Benchmark harness: centralized quality over seeds, and the cost of privacy per epoch.

``fedsocial bench quality --dataset lastfm --seeds 0 1 2`` trains MostPop, BPR-MF, the model
without the social term, the full model and the full model with user-level DP, each over the given
seeds, and prints a markdown table of mean +- std test metrics (raw runs go to ``--out``).
``fedsocial bench dp-cost --config configs/lastfm.toml`` measures seconds per epoch of the DP
trainer and of the non-private one, same model and batch, side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from fedsocial.shared.config import Config, load_config
from fedsocial.shared.fileio import write_json_atomic
from fedsocial.simulations.common import user_errors

# name -> (config file stem, overrides); the DP row's cap is the epsilon 8 at delta 1e-5
METHODS: dict[str, tuple[str, list[str]]] = {
    "MostPop": ("{ds}", ["model.name=mostpop"]),
    "BPR-MF": ("{ds}_bpr", []),
    "no social": ("{ds}", ["model.use_social=false"]),
    "full model": ("{ds}", []),
    "full model, DP eps 8": ("{ds}_dp", ["privacy.max_epsilon=8.0", "privacy.target_delta=1e-5"]),
}
SHOWN = ("ndcg@10", "recall@10", "ndcg@20", "recall@20")


def run_quality(dataset: str, seeds: list[int], data_dir: str | None, out: Path,
                methods: list[str], extra: list[str]) -> dict[str, list[dict[str, Any]]]:
    from fedsocial.simulations.train import run_train

    results: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        stem, overrides = METHODS[method]
        path = Path("configs") / f"{stem.format(ds=dataset)}.toml"
        for seed in seeds:
            cfg = load_config(path, [*overrides, *extra, f"train.seed={seed}"])
            run_dir = out / dataset / method.replace(" ", "_").replace(",", "") / f"seed{seed}"
            doc = run_train(cfg, data_dir, run_dir, progress=False)
            results.setdefault(method, []).append(doc)
            print(f"{dataset} {method} seed {seed}: ndcg@10 {doc['ndcg@10']:.4f} "
                  f"({doc['wall_time_s']:.0f} s)", flush=True)
    return results


def quality_table(dataset: str, results: dict[str, list[dict[str, Any]]]) -> str:
    head = "| method | " + " | ".join(SHOWN) + " | epsilon | runs |"
    lines = [head, "|" + "---|" * (len(SHOWN) + 3)]
    for method, docs in results.items():
        cells = []
        for key in SHOWN:
            vals = [d[key] for d in docs]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.4f} ± {std:.4f}")
        eps = f"{max(d['epsilon'] for d in docs):.2f}" if "epsilon" in docs[0] else "–"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {eps} | {len(docs)} |")
    return f"**{dataset}**\n\n" + "\n".join(lines)


def measure_dp_cost(cfg: Config, data_dir: str | None, epochs: int, repeats: int = 3) -> dict[str, float]:
    """Seconds per epoch, non-private vs DP (ghost clipping), same model, batch and data.

    The two are interleaved ``repeats`` times in one process and the medians compared, so that a
    burst of load on a shared machine hits both sides rather than one.
    """
    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.split import split_dataset
    from fedsocial.shared.trainer import LocalTrainer

    if cfg.train.num_threads:
        import torch

        torch.set_num_threads(cfg.train.num_threads)
    split = split_dataset(load_dataset(cfg.data, data_dir), cfg.split)
    trainers = {label: LocalTrainer(cfg.replace("privacy", enabled=enabled, noise_multiplier=1.0), split,
                                    device=cfg.train.device, seed=cfg.train.seed)
                for label, enabled in (("non-private", False), ("dp", True))}
    for trainer in trainers.values():
        trainer.fit(1)  # warm-up: allocations, Opacus hooks
    times: dict[str, list[float]] = {label: [] for label in trainers}
    for _ in range(repeats):
        for label, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.fit(epochs)
            times[label].append((time.perf_counter() - t0) / epochs)
    med = {label: statistics.median(v) for label, v in times.items()}
    return {"non-private_s_per_epoch": med["non-private"], "dp_s_per_epoch": med["dp"],
            "ratio": med["dp"] / med["non-private"], "users": float(split.n_users),
            "users_per_s_dp": split.n_users / med["dp"], "users_per_s_non_private": split.n_users / med["non-private"],
            "samples": float(repeats), "batch_size": float(cfg.train.batch_size)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsocial bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality", help="centralized metrics over seeds")
    q.add_argument("--dataset", required=True, help="config stem: lastfm, ciao, ...")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    q.add_argument("--data-dir", default=None)
    q.add_argument("--set", dest="overrides", action="append", default=[])
    q.add_argument("--out", default="runs/bench")
    c = sub.add_parser("dp-cost", help="DP over non-private time per epoch")
    c.add_argument("--config", required=True)
    c.add_argument("--data-dir", default=None)
    c.add_argument("--epochs", type=int, default=2)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--set", dest="overrides", action="append", default=[])
    return parser


@user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.what == "quality":
        out = Path(args.out)
        results = run_quality(args.dataset, args.seeds, args.data_dir, out, args.methods, args.overrides)
        table = quality_table(args.dataset, results)
        write_json_atomic(out / f"{args.dataset}_quality.json", results)
        (out / f"{args.dataset}_quality.md").write_text(table + "\n")
        print(table)
    else:
        cfg = load_config(args.config, args.overrides)
        figures = measure_dp_cost(cfg, args.data_dir, args.epochs, args.repeats)
        print(json.dumps(figures, indent=2))
    return 0
