"""``make bench-serve``: serving latency, load and cold-start measurements (docs/BENCHMARKS.md, serving).

``python -m fedsocial.simulations.serve_bench latency --items 100000 1000000 --out FILE``
    builds a synthetic partner (random shared parameters at the model's shapes: latency does not
    depend on what was learnt), then measures, side by side in one run:
    * in-process top-10 with explanations (the :class:`Recommender` alone), p50 / p99;
    * over HTTP against a real ``uvicorn`` process on 127.0.0.1: single sequential requests, then a
      bounded load test of 32 concurrent clients (p50 / p99 under load, throughput);
    * event-to-updated-list: POST one purchase, then GET the list, p99 (the local p_u refit included).
``python -m fedsocial.simulations.serve_bench cold-start --config configs/lastfm.toml --out FILE``
    NDCG@10 of cold-start users (at most 2 training items) with and without the social term: a seeded
    share of users keeps only 1-2 of its training items (the rest of its interactions become its test
    items), one quick centralized training per variant, test metrics over those users only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedsocial.shared.config import Config, ModelConfig, load_config
from fedsocial.shared.data import Dataset, SplitData
from fedsocial.shared.fileio import write_json_atomic

BENCH_MODEL = dict(dim=64, aggregator="mean", user_embedding="local", use_mlp=False, temperature=0.2,
                   local_refit_steps=50, max_neighbors=20, num_negatives=64, max_targets=32)


def compute_percentiles(values_ms: list[float]) -> dict[str, float]:
    v = np.asarray(values_ms, dtype=np.float64)
    return {"p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)),
            "mean_ms": float(v.mean()), "n": int(v.size)}


def synthetic_partner(n_items: int, n_users: int = 2000, per_user: int = 20, friends: int = 8,
                      seed: int = 0) -> tuple[Any, SplitData]:
    """A SocialRec at BENCH_MODEL's shapes with N(0, 1) parameters, and a partner's split (Zipf items)."""
    import torch

    from fedsocial.shared.models import build_model

    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    items = np.minimum(rng.zipf(1.3, users.size) - 1, n_items - 1) * 7919 % n_items  # popular items spread out
    pairs = np.unique(np.stack([users, items], 1), axis=0)
    src = np.repeat(np.arange(n_users), friends)
    dst = (src + rng.integers(1, n_users, src.size)) % n_users
    ds = Dataset(n_users, n_items, pairs[:, 0], pairs[:, 1], src, dst, name=f"bench-{n_items}")
    val = (rng.random(len(pairs)) < 0.1) & (pairs[:, 0] < 200)  # validation rows for 200 users: calibration
    split = SplitData(ds, pairs[~val, 0], pairs[~val, 1], pairs[val, 0], pairs[val, 1], np.zeros(0, np.int64),
                      np.zeros(0, np.int64))
    mc = ModelConfig(**BENCH_MODEL)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    model = build_model(mc, n_users, n_items)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    return model, split


def build_recommender(n_items: int, refit: str = "sync") -> Any:
    from fedsocial.shared.serving import Recommender

    model, split = synthetic_partner(n_items)
    return Recommender(model, split, calibration="platt", privacy_scope="none", refit_on_event=refit)


def measure_in_process(rec: Any, n: int = 300, seed: int = 1) -> dict[str, Any]:
    from fedsocial.shared.events import parse_event

    rng = np.random.default_rng(seed)
    users = rng.integers(0, len(rec.users), n)
    rec.recommend(rec.users[0], 10)  # warm-up
    top, scores_only = [], []
    for u in users.tolist():
        t0 = time.perf_counter()
        rec.recommend(rec.users[u], 10)
        top.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        rec.recommend(rec.users[u], 10, explain=False)
        scores_only.append((time.perf_counter() - t0) * 1e3)
    out = {"top10": compute_percentiles(top), "top10_no_explanation": compute_percentiles(scores_only)}
    for name, refit in (("event_to_list", "sync"), ("event_to_list_async_refit", "async"),
                        ("event_to_list_no_refit", "off")):
        rec.wait_for_refits()
        rec.refit_on_event, lat = refit, []
        for u in users[:100].tolist():
            item = int(rng.integers(0, len(rec.items)))
            t0 = time.perf_counter()
            rec.apply_events([parse_event({"user": rec.users[u], "item": rec.items[item], "type": "purchase"})])
            rec.recommend(rec.users[u], 10)
            lat.append((time.perf_counter() - t0) * 1e3)
        out[name] = compute_percentiles(lat)
    rec.wait_for_refits()
    rec.refit_on_event = "sync"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _http_phase(port: int, users: list[Any], items: list[Any], concurrency: int, n: int) -> dict[str, Any]:
    import httpx

    base = f"http://127.0.0.1:{port}"
    lat: list[float] = []
    queue = list(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        async def worker() -> None:
            while queue:
                k = queue.pop()
                t0 = time.perf_counter()
                r = await client.get(f"/users/{users[k % len(users)]}/recommendations", params={"k": 10})
                r.raise_for_status()
                lat.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {**compute_percentiles(lat), "concurrency": concurrency, "throughput_rps": n / wall}


async def _event_phase(port: int, users: list[Any], items: list[Any], n: int, seed: int = 2) -> dict[str, Any]:
    import httpx

    rng = np.random.default_rng(seed)
    lat = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for _ in range(n):
            user = users[int(rng.integers(len(users)))]
            item = items[int(rng.integers(len(items)))]
            t0 = time.perf_counter()
            (await client.post("/events", json={"user": user, "item": item, "type": "purchase"})).raise_for_status()
            r = await client.get(f"/users/{user}/recommendations", params={"k": 10})
            r.raise_for_status()
            lat.append((time.perf_counter() - t0) * 1e3)
            assert item not in [x["item"] for x in r.json()["items"]]
    return compute_percentiles(lat)


def measure_http(n_items: int, single: int = 200, loaded: int = 320, concurrency: int = 32) -> dict[str, Any]:
    """Start a real server process for the synthetic partner on 127.0.0.1 and measure it over HTTP."""
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fedsocial.simulations.serve_bench", "worker", "--items",
                             str(n_items), "--port", str(port)])
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bench server for {n_items} items did not start")
            time.sleep(0.5)
        users = [str(u) for u in range(2000)]
        items = list(range(n_items))
        return {"single": asyncio.run(_http_phase(port, users, items, 1, single)),
                "loaded": asyncio.run(_http_phase(port, users, items, concurrency, loaded)),
                "event_to_list": asyncio.run(_event_phase(port, users, items, 100))}
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def run_latency(item_counts: list[int], out: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    doc: dict[str, Any] = {"model": BENCH_MODEL, "users": 2000, "threads": 1, "cpus": os.cpu_count(), "results": {}}
    for n in item_counts:
        rec = build_recommender(n)
        row = {"in_process": measure_in_process(rec)}
        del rec
        row["http"] = measure_http(n)
        doc["results"][str(n)] = row
        print(json.dumps({n: row}), flush=True)
        write_json_atomic(out, doc)
    return doc


def measure_layout(n_items: int, dim: int = 64, repeats: int = 20) -> dict[str, float]:
    """Scores of one user over the item matrix, row-major [n, d] vs column-major storage, side by side."""
    import torch

    torch.set_num_threads(1)
    rows = torch.randn(n_items, dim)
    cols = rows.T.contiguous().T  # what Recommender stores
    h = torch.randn(dim)
    out = {}
    for name, m in (("row_major_ms", rows), ("column_major_ms", cols)):
        torch.mv(m, h)
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.mv(m, h)
        out[name] = (time.perf_counter() - t0) / repeats * 1e3
    out["ratio"] = out["row_major_ms"] / out["column_major_ms"]
    return out


# --- cold start ------------------------------------------------------------------------------------
def compute_cold_split(split: SplitData, share: float, max_items: int, seed: int) -> tuple[SplitData, np.ndarray]:
    """A seeded ``share`` of the users with test data keeps 1..max_items of its training items; the rest of
    its training items join its test items; the test set holds those cold users only."""
    rng = np.random.default_rng(seed)
    candidates = np.unique(split.test_users)
    cold = np.sort(rng.choice(candidates, int(round(share * len(candidates))), replace=False))
    is_cold = np.isin(split.train_users, cold)
    keep = ~is_cold
    for u in cold.tolist():
        rows = np.flatnonzero(split.train_users == u)
        keep[rng.choice(rows, min(len(rows), int(rng.integers(1, max_items + 1))), replace=False)] = True
    moved = is_cold & ~keep
    in_test = np.isin(split.test_users, cold)
    test_u = np.concatenate([split.test_users[in_test], split.train_users[moved]])
    test_i = np.concatenate([split.test_items[in_test], split.train_items[moved]])
    order = np.lexsort((test_i, test_u))
    return SplitData(split.dataset, split.train_users[keep], split.train_items[keep], split.val_users,
                     split.val_items, test_u[order], test_i[order]), cold


def run_cold_start(cfg: Config, data_dir: str | None, out: Path, share: float, max_items: int,
                   epochs: int) -> dict[str, Any]:
    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.split import split_dataset
    from fedsocial.shared.trainer import train_centralized

    split, cold = compute_cold_split(split_dataset(load_dataset(cfg.data, data_dir), cfg.split), share, max_items,
                                     cfg.train.seed)
    doc: dict[str, Any] = {"dataset": cfg.data.format, "cold_users": int(len(cold)), "max_train_items": max_items,
                           "epochs_cap": epochs, "results": {}}
    for name, social in (("with_social", True), ("without_social", False)):
        c = cfg.replace("model", use_social=social).replace("train", epochs=epochs)
        res = train_centralized(c, split)
        doc["results"][name] = {**{k: float(v) for k, v in res.metrics.items()}, "best_epoch": res.best_epoch,
                                "wall_time_s": res.wall_time_s, "evaluated_users": res.evaluated_users}
        print(name, json.dumps(doc["results"][name]), flush=True)
        write_json_atomic(out, doc)
    r = doc["results"]
    doc["social_gain_ndcg@10"] = r["with_social"]["ndcg@10"] / max(r["without_social"]["ndcg@10"], 1e-12)
    write_json_atomic(out, doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedsocial.simulations.serve_bench",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    lat = sub.add_parser("latency", help="top-10 and event latency, single and 32 concurrent clients")
    lat.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    lat.add_argument("--out", default="runs/bench_serve/latency.json")
    cold = sub.add_parser("cold-start", help="NDCG@10 of users with <= 2 training items, with / without social")
    cold.add_argument("--config", required=True)
    cold.add_argument("--data-dir", default=None)
    cold.add_argument("--set", dest="overrides", action="append", default=[])
    cold.add_argument("--share", type=float, default=0.2, help="share of the test users made cold (default 0.2)")
    cold.add_argument("--max-items", type=int, default=2)
    cold.add_argument("--epochs", type=int, default=40)
    cold.add_argument("--out", default="runs/bench_serve/cold_start.json")
    lay = sub.add_parser("layout", help="item-matrix storage: row-major vs column-major gemv, side by side")
    lay.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    worker = sub.add_parser("worker", help="(internal) serve a synthetic partner for the latency bench")
    worker.add_argument("--items", type=int, required=True)
    worker.add_argument("--port", type=int, required=True)
    worker.add_argument("--event-refit", default="async", choices=("sync", "async", "off"))
    args = parser.parse_args(argv)
    if args.cmd == "worker":
        import torch
        import uvicorn

        from fedsocial.simulations.serve import create_app

        torch.set_num_threads(1)
        app = create_app(build_recommender(args.items, args.event_refit), "bench")
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
        return 0
    if args.cmd == "layout":
        print(json.dumps({str(n): measure_layout(n) for n in args.items}))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.cmd == "latency":
        run_latency(args.items, out)
    else:
        run_cold_start(load_config(args.config, args.overrides), args.data_dir, out, args.share, args.max_items,
                       args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
