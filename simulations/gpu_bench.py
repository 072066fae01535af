"""GPU throughput of the DP trainer against the non-private one: examples (users) per second, the ratio,
and peak GPU memory, for the LastFM config and a 1M-user synthetic set (issue 14, item 7).

    python -m fedsocial.simulations.gpu_bench --data-dir ../shared/datasets --out runs/gpu_bench

Each workload trains one epoch of each trainer after a warm-up epoch, same model, batch and data,
``torch.cuda.synchronize`` around the timed part, and ``torch.cuda.max_memory_allocated`` reset
before each. ``--device cpu`` runs the same script without a GPU (the CPU fallback; the tests use it
at a tiny size); ``--only`` picks workloads and ``--synthetic-users`` scales the synthetic one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fedsocial.shared.config import Config, load_config
from fedsocial.shared.fileio import write_json_atomic
from fedsocial.simulations.common import user_errors

# name -> (config, overrides); the synthetic workload keeps 1M users at about 20 interactions each
WORKLOADS: dict[str, tuple[str, list[str]]] = {
    "lastfm": ("configs/lastfm.toml", []),
    "synthetic_1m": ("configs/lastfm.toml", ["data.format=synthetic", "data.n_users=1000000", "data.n_items=100000",
                                             "data.interactions_per_user=20.0", "train.batch_size=4096"]),
}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_trainer(cfg: Config, split: Any, private: bool) -> dict[str, float]:
    """One warm-up epoch, then one timed epoch: users per second and peak GPU memory (bytes)."""
    import torch

    from fedsocial.shared.trainer import LocalTrainer

    trainer = LocalTrainer(cfg.replace("privacy", enabled=private, noise_multiplier=1.0 if private else 0.0),
                           split, device=cfg.train.device, seed=cfg.train.seed)
    trainer.fit(1, refit=False)
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    _sync(trainer.device)
    t0 = time.perf_counter()
    trainer.fit(1, refit=False)
    _sync(trainer.device)
    seconds = time.perf_counter() - t0
    peak = float(torch.cuda.max_memory_allocated(trainer.device)) if cuda else 0.0
    return {"s_per_epoch": seconds, "users_per_s": split.n_users / seconds, "peak_gpu_bytes": peak}


def measure_workload(cfg: Config, data_dir: str | None) -> dict[str, Any]:
    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.split import split_dataset

    split = split_dataset(load_dataset(cfg.data, data_dir), cfg.split)
    plain = measure_trainer(cfg, split, private=False)
    dp = measure_trainer(cfg, split, private=True)
    return {"users": split.n_users, "items": split.n_items, "batch_size": cfg.train.batch_size,
            "device": cfg.train.device, "clipping": cfg.privacy.clipping, "non_private": plain, "dp": dp,
            "ratio": dp["s_per_epoch"] / plain["s_per_epoch"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedsocial.simulations.gpu_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for the fallback")
    parser.add_argument("--only", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--synthetic-users", type=int, default=0, help="scale the synthetic workload (0: 1M)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="runs/gpu_bench")
    return parser


@user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results: dict[str, Any] = {}
    for name in args.only:
        path, overrides = WORKLOADS[name]
        extra = [f"train.device={args.device}", *args.overrides]
        if name.startswith("synthetic") and args.synthetic_users:
            n = args.synthetic_users
            extra += [f"data.n_users={n}", f"data.n_items={max(100, n // 10)}",
                      f"train.batch_size={max(16, n // 244)}"]
        cfg = load_config(path, [*overrides, *extra])
        results[name] = measure_workload(cfg, args.data_dir)
        print(json.dumps({name: results[name]}), flush=True)
    out = Path(args.out)
    write_json_atomic(out / "gpu_bench.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main(None))
