"""Benchmark harness: centralized quality over seeds, and the cost of privacy per epoch.

``fedsocial bench quality --dataset lastfm --seeds 0 1 2`` trains MostPop, BPR-MF, the model
without the social term, the full model and the full model with user-level DP, each over the given
seeds, and prints a markdown table of mean +- std test metrics (raw runs go to ``--out``).
``fedsocial bench dp-cost --config configs/lastfm.toml`` measures seconds per epoch of the DP
trainer and of the non-private one, same model and batch, side by side in one process.
``fedsocial bench scale --users-per-partner 10000 50000 200000`` times one DP federated round of 5
partners and the peak memory of its process tree (simulations/scale_bench.py).
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


def measure_dp_cost(cfg: Config, data_dir: str | None, epochs: int, repeats: int = 3,
                    compare_ghost: bool = False, compare_one_stream: bool = False) -> dict[str, Any]:
    """Seconds per epoch, non-private vs DP (``privacy.clipping``: onepass or ghost), same model, batch, data.

    The two are interleaved ``repeats`` times in one process and the medians compared, so that a
    burst of load on a shared machine hits both sides rather than one. ``compare_one_stream``: also the
    one-pass DP fit with all its noise from one stream, serially (the noise source before
    shared/dp_noise.py's parallel streams), interleaved with the others.
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
    if compare_ghost:  # Opacus's ghost clipping, interleaved with the two above
        trainers["dp-ghost"] = LocalTrainer(cfg.replace("privacy", enabled=True, noise_multiplier=1.0,
                                                        clipping="ghost"), split, device=cfg.train.device,
                                            seed=cfg.train.seed)
    if compare_one_stream:
        trainers["dp-one-stream"] = LocalTrainer(cfg.replace("privacy", enabled=True, noise_multiplier=1.0), split,
                                                 device=cfg.train.device, seed=cfg.train.seed)
        trainers["dp-one-stream"].noise_streams = 1  # all its noise from one generator, serially
    for trainer in trainers.values():
        trainer.fit(1)  # warm-up: allocations, Opacus hooks
    times: dict[str, list[float]] = {label: [] for label in trainers}
    cpu: dict[str, list[float]] = {label: [] for label in trainers}
    for _ in range(repeats):
        for label, trainer in trainers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.fit(epochs)
            times[label].append((time.perf_counter() - t0) / epochs)
            cpu[label].append((time.process_time() - c0) / epochs)
    med = {label: statistics.median(v) for label, v in times.items()}
    med_cpu = {label: statistics.median(v) for label, v in cpu.items()}
    return {"non-private_s_per_epoch": med["non-private"], "dp_s_per_epoch": med["dp"],
            "ratio": med["dp"] / med["non-private"], "users": float(split.n_users),
            "users_per_s_dp": split.n_users / med["dp"], "users_per_s_non_private": split.n_users / med["non-private"],
            "samples": float(repeats), "batch_size": float(cfg.train.batch_size),
            # CPU seconds of this process: the ratio where the machine is shared with other jobs
            "ratio_cpu": med_cpu["dp"] / med_cpu["non-private"], "clipping": cfg.privacy.clipping,
            **({"ratio_ghost": med["dp-ghost"] / med["non-private"],
                "ratio_ghost_cpu": med_cpu["dp-ghost"] / med_cpu["non-private"]} if compare_ghost else {}),
            **({"ratio_one_stream": med["dp-one-stream"] / med["non-private"],
                "ratio_one_stream_cpu": med_cpu["dp-one-stream"] / med_cpu["non-private"]}
               if compare_one_stream else {})}


def measure_calibration(cases: list[tuple[float, float, float, int]], repeats: int = 3) -> list[dict[str, float]]:
    """Seconds per noise calibration, the guided search (what partners run) against the same bisection on
    Opacus's function alone, interleaved, medians of ``repeats``; each case (max_epsilon, target_delta,
    sample_rate, total steps). Both must give the same sigma (reported as ``same_sigma``)."""
    from fedsocial.shared.privacy import accounting

    out = []
    for cap, delta, q, steps in cases:
        def exact(sigma: float, q: float = q, steps: int = steps, delta: float = delta) -> float:
            return accounting.compute_epsilon([(sigma, q, steps)], delta)

        times: dict[str, list[float]] = {"guided": [], "opacus_only": []}
        sigmas: dict[str, float] = {}
        for _ in range(repeats):
            accounting._rdp_one_step.cache_clear()  # every repeat starts cold, as a fresh partner does
            t0 = time.perf_counter()
            sigmas["guided"] = accounting.calibrate_noise_multiplier(cap, delta, q, steps, 1)
            times["guided"].append(time.perf_counter() - t0)
            accounting._rdp_one_step.cache_clear()
            t0 = time.perf_counter()
            sigmas["opacus_only"] = accounting._bisect_noise(exact, cap, 1e-3, 1e4)[1]
            times["opacus_only"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        out.append({"max_epsilon": cap, "target_delta": delta, "sample_rate": q, "steps": float(steps),
                    "sigma": sigmas["guided"], "same_sigma": float(sigmas["guided"] == sigmas["opacus_only"]),
                    "guided_s": med["guided"], "opacus_only_s": med["opacus_only"],
                    "speed_up": med["opacus_only"] / med["guided"]})
    return out


# (max_epsilon, target_delta, sample_rate, steps): the demo's partners, init --private's, lastfm_dp.toml's
CALIBRATION_CASES = [(8.0, 1e-5, 1 / 3, 30), (8.0, 1e-4, 0.5, 20), (8.0, 1e-5, 0.25, 160), (2.0, 1e-5, 0.25, 160)]


def _timed(fn: Any) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process): CPU time is what the work costs when the
    machine is shared (wall time then also counts other people's jobs)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def measure_profile(cfg: Config, data_dir: str | None, dp: bool = True, train: bool = True) -> dict[str, float]:
    """Where an epoch goes: data loading, example building (sampling and padding), one non-private
    epoch, one DP epoch, the local p_u refit (``user_embedding = local``), one full-ranking evaluation
    pass; wall and CPU seconds of each.

    Uses only ``LocalTrainer.fit``/``evaluate`` and ``ExampleBuilder.train_batch``, so the same
    function measures an older checkout of the project side by side (docs/BENCHMARKS.md).
    """
    import numpy as np

    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.split import split_dataset
    from fedsocial.shared.trainer import LocalTrainer

    if cfg.train.num_threads:
        import torch

        torch.set_num_threads(cfg.train.num_threads)
    out: dict[str, float] = {}
    split, out["load_wall_s"], out["load_cpu_s"] = _timed(lambda: split_dataset(load_dataset(cfg.data, data_dir),
                                                                               cfg.split))
    out.update(users=float(split.n_users), items=float(split.n_items), train_interactions=float(len(split.train_users)))
    plain = LocalTrainer(cfg.replace("privacy", enabled=False), split, device=cfg.train.device, seed=cfg.train.seed)
    rng, bs = np.random.default_rng(0), cfg.train.batch_size
    users = np.random.default_rng(1).permutation(split.n_users)
    if train:
        _, out["batching_wall_s"], out["batching_cpu_s"] = _timed(
            lambda: [plain.builder.train_batch(users[i:i + bs], rng) for i in range(0, len(users), bs)])
        plain.fit(1)  # warm-up: imports, allocations
        _, out["epoch_wall_s"], out["epoch_cpu_s"] = _timed(lambda: plain.fit(1))
    if dp and train:
        private = LocalTrainer(cfg.replace("privacy", enabled=True, noise_multiplier=1.0), split,
                               device=cfg.train.device, seed=cfg.train.seed)
        private.fit(1)
        _, out["dp_epoch_wall_s"], out["dp_epoch_cpu_s"] = _timed(lambda: private.fit(1))
        out["dp_ratio_cpu"] = out["dp_epoch_cpu_s"] / out["epoch_cpu_s"]
    if cfg.model.user_embedding == "local" and cfg.model.local_refit_steps:  # p_u refit: after fits, before evaluations
        _, out["refit_wall_s"], out["refit_cpu_s"] = _timed(plain.refit_local)
    metrics, out["eval_wall_s"], out["eval_cpu_s"] = _timed(lambda: plain.evaluate("val"))
    out["val_ndcg@10"] = metrics[0]["ndcg@10"]
    return out


def measure_dp_step(cfg: Config, data_dir: str | None, steps: int = 30, warmup: int = 5) -> dict[str, float]:
    """Milliseconds per training step, interleaved on the same batches: non-private, one-pass DP clipping
    with the fused noise from the parallel streams (what the trainer runs, shared/dp_noise.py), the same from
    one generator, the same clipped sum with a fresh noise tensor per table from one generator
    (``add_noise_inplace``), and Opacus's ghost clipping (noise included); medians after ``warmup``. Also the
    noise fill alone (``noise_fill_*``: every trained parameter's buffer, streams vs one generator).

    CPU time of this process (``*_cpu_ms``: on a shared machine wall time also counts other jobs) and wall
    time (``*_wall_ms``: what the streams cut, as they spread the same work over torch's threads).
    ``train.num_threads`` torch threads (0: one).
    """
    import warnings

    import numpy as np
    import torch
    from opacus import PrivacyEngine

    from fedsocial.shared.dp_noise import GaussianStreams
    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.onepass import OnePassClipper
    from fedsocial.shared.split import split_dataset
    from fedsocial.shared.trainer import (
        LocalTrainer,
        PerUserLoss,
        add_noise_inplace,
        register_fast_embedding_norm_sampler,
    )

    torch.set_num_threads(max(1, cfg.train.num_threads))
    split = split_dataset(load_dataset(cfg.data, data_dir), cfg.split)
    bs, pc = cfg.train.batch_size, cfg.privacy
    plain, onepass, single, unfused, ghost = (LocalTrainer(cfg, split, seed=cfg.train.seed) for _ in range(5))
    opt_plain, opt_one, opt_unfused = plain._optimizer(), onepass._optimizer(), unfused._optimizer()
    opt_single = single._optimizer()
    clipper, clipper_unfused = OnePassClipper(onepass.model), OnePassClipper(unfused.model)
    clipper_single = OnePassClipper(single.model)
    params = [p for p in unfused.model.parameters() if p.requires_grad]
    streams = GaussianStreams(1)
    noise_single, noise_unfused = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    register_fast_embedding_norm_sampler()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(split.n_users)), batch_size=bs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm, opt_ghost, crit, _ = PrivacyEngine(accountant="rdp").make_private(
            module=ghost.model, optimizer=ghost._optimizer(torch_class=True), criterion=PerUserLoss(),
            data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=pc.max_grad_norm, grad_sample_mode="ghost", poisson_sampling=True)

    def step_plain(b: dict[str, torch.Tensor]) -> None:
        opt_plain.zero_grad(set_to_none=True)
        plain.model(b).mean().backward()
        opt_plain.step()

    def step_onepass(b: dict[str, torch.Tensor]) -> None:  # what the trainer runs: the streams, kept buffers
        opt_one.zero_grad(set_to_none=True)
        clipper.start()
        clipper.noisy_clipped_backward(onepass.model(b), pc.max_grad_norm, pc.max_grad_norm, bs, streams)
        opt_one.step()

    def step_single(b: dict[str, torch.Tensor]) -> None:  # the same, all noise from one generator, serially
        opt_single.zero_grad(set_to_none=True)
        clipper_single.start()
        clipper_single.noisy_clipped_backward(single.model(b), pc.max_grad_norm, pc.max_grad_norm, bs, noise_single)
        opt_single.step()

    def step_unfused(b: dict[str, torch.Tensor]) -> None:  # the clipped sum, then a fresh noise tensor per table
        opt_unfused.zero_grad(set_to_none=True)
        clipper_unfused.start()
        clipper_unfused.clipped_backward(unfused.model(b), pc.max_grad_norm)
        add_noise_inplace(params, pc.max_grad_norm, bs, noise_unfused)
        opt_unfused.step()

    def step_ghost(b: dict[str, torch.Tensor]) -> None:
        opt_ghost.zero_grad(set_to_none=True)
        crit(gsm(b), None).backward()
        opt_ghost.step()

    noise_bufs = [torch.empty_like(p) for p in params]

    def fill_streams(_: dict[str, torch.Tensor]) -> None:  # the noise alone: the part the streams change
        streams.normal_inplace(noise_bufs, pc.max_grad_norm)

    def fill_one_generator(_: dict[str, torch.Tensor]) -> None:
        for buf in noise_bufs:
            buf.normal_(0.0, pc.max_grad_norm, generator=noise_single)

    rng = np.random.default_rng(0)
    labelled = (("non_private", step_plain), ("onepass", step_onepass), ("onepass_single_gen", step_single),
                ("onepass_unfused", step_unfused), ("ghost", step_ghost),
                ("noise_fill_streams", fill_streams), ("noise_fill_one_generator", fill_one_generator))
    cpu: dict[str, list[float]] = {label: [] for label, _ in labelled}
    wall: dict[str, list[float]] = {label: [] for label, _ in labelled}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(warmup + steps):
            batch = plain._batch(rng.choice(split.n_users, min(bs, split.n_users), replace=False), rng)
            for label, step in labelled:
                c0, w0 = time.process_time(), time.perf_counter()
                step(batch)
                cpu[label].append(time.process_time() - c0)
                wall[label].append(time.perf_counter() - w0)
    for c in (clipper, clipper_single, clipper_unfused):
        c.close()
    streams.close()
    gsm._close()
    out = {"batch_size": float(bs), "torch_threads": float(torch.get_num_threads())}
    for kind, samples in (("cpu", cpu), ("wall", wall)):
        med = {k: 1e3 * statistics.median(v[warmup:]) for k, v in samples.items()}
        for label, ms in med.items():
            out[f"{label}_{kind}_ms"] = ms
            if label != "non_private" and not label.startswith("noise_fill"):
                out[f"ratio_{label}_{kind}"] = ms / med["non_private"]
    return out


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
    c.add_argument("--compare-ghost", action="store_true", help="also time Opacus ghost clipping, interleaved")
    c.add_argument("--compare-one-stream", action="store_true",
                   help="also time the DP fit with all its noise from one stream (serially), interleaved")
    c.add_argument("--json", action="store_true", help="one JSON object on one line (the default prints it indented)")
    c.add_argument("--set", dest="overrides", action="append", default=[])
    d = sub.add_parser("dp-step", help="ms per step (CPU and wall): non-private, one-pass DP (parallel noise streams, "
                                       "one generator, unfused), Opacus ghost, interleaved")
    d.add_argument("--config", required=True)
    d.add_argument("--data-dir", default=None)
    d.add_argument("--steps", type=int, default=30)
    d.add_argument("--batch-sizes", type=int, nargs="+", default=[])
    d.add_argument("--set", dest="overrides", action="append", default=[])
    sub.add_parser("calibrate", help="seconds per noise calibration: the guided search against Opacus alone")
    p = sub.add_parser("profile", help="where an epoch goes: loading, batching, training, DP, evaluation")
    p.add_argument("--config", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-dp", action="store_true", help="skip the DP epoch")
    p.add_argument("--eval-only", action="store_true", help="only loading and one evaluation pass")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    from fedsocial.simulations.scale_bench import add_arguments

    add_arguments(sub.add_parser("scale", help="one DP federated round as the users per partner grow: wall time, "
                                               "peak memory of the process tree (simulations/scale_bench.py)"))
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
    elif args.what == "dp-step":
        for bs in args.batch_sizes or [0]:
            extra = [f"train.batch_size={bs}"] if bs else []
            cfg = load_config(args.config, [*args.overrides, *extra])
            print(json.dumps(measure_dp_step(cfg, args.data_dir, args.steps)), flush=True)
    elif args.what == "calibrate":
        for row in measure_calibration(CALIBRATION_CASES):
            print(json.dumps(row), flush=True)
    elif args.what == "scale":
        from fedsocial.simulations.scale_bench import run

        return run(args)
    elif args.what == "profile":
        cfg = load_config(args.config, args.overrides)
        print(json.dumps(measure_profile(cfg, args.data_dir, dp=not args.no_dp, train=not args.eval_only), indent=2))
    else:
        cfg = load_config(args.config, args.overrides)
        figures = measure_dp_cost(cfg, args.data_dir, args.epochs, args.repeats, args.compare_ghost,
                                  args.compare_one_stream)
        print(json.dumps(figures) if args.json else json.dumps(figures, indent=2))
    return 0
