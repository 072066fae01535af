"""The coordinator's strategy (Flower legacy ``Strategy``): validated, weighted FedAvg of clipped updates.

Each round: every available partner gets the global shared parameters and the round number; each
replies with its clipped update. Without SecAgg+ the server checks every reply
(:func:`server.aggregation.validate_update`), drops and logs bad ones, and averages the rest with
weights = user counts (capped); with SecAgg+ it only ever sees the weighted mean, which it checks as
a whole. Optional Gaussian noise on the mean, then federated evaluation (each partner scores its
own test users), then the round's record, ``rounds.jsonl`` and a checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedsocial.server.aggregation import (
    compute_applied,
    compute_is_eval_round,
    compute_noised,
    compute_server_noise_std,
    compute_specs,
    compute_update_norm,
    compute_weighted_average,
    compute_weighted_metrics,
    compute_weights,
    validate_update,
)
from fedsocial.server.checkpoint import Checkpoint, append_jsonl, save_checkpoint
from fedsocial.shared.config import Config
from fedsocial.shared.fileio import write_json_atomic

log = logging.getLogger("fedsocial.server")

METRIC_KEYS = ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "hr@20")


class QuorumError(RuntimeError):
    """Fewer valid replies than ``federation.min_partners``: the round (and the run) cannot continue."""


def _partner(res: FitRes | EvaluateRes, proxy: ClientProxy) -> str:
    return str(res.metrics.get("partner_id", f"node-{proxy.node_id}"))


class FedSocialStrategy(Strategy):
    """Weighted FedAvg of validated, clipped updates of the shared parameters; state in ``state_dict``."""

    def __init__(self, cfg: Config, run_dir: Path, names: list[str], initial: list[np.ndarray], *,
                 start_round: int = 0, state: dict[str, Any] | None = None, secagg: bool = False,
                 secagg_precision: float = 0.0, wait_timeout: float = 600.0,
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg, self.run_dir, self.names = cfg, run_dir, list(names)
        self.specs = compute_specs(names, initial)
        self.global_params = [np.asarray(a) for a in initial]
        self.offset = start_round
        self.secagg, self.secagg_precision = secagg, secagg_precision
        self.wait_timeout, self.on_round = wait_timeout, on_round
        state = state or {}
        self.history: list[dict[str, Any]] = list(state.get("history", []))
        self.partners: dict[str, dict[str, Any]] = dict(state.get("partners", {}))
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.rng = np.random.default_rng(np.random.SeedSequence([cfg.train.seed, 0x5E]))
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]
        self._round: dict[str, Any] = {}
        self._t0 = time.perf_counter()

    # --- bookkeeping -------------------------------------------------------------------------
    def global_round(self, server_round: int) -> int:
        """Flower counts rounds from 1 in every process; a resumed run continues the global count."""
        return self.offset + server_round

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "partners": self.partners, "elapsed_s": self.elapsed_s,
                "rng": self.rng.bit_generator.state}

    def _sample(self, client_manager: ClientManager) -> list[ClientProxy]:
        fc = self.cfg.federation
        # The bootstrap already waited for every partner; from then on, take whoever is connected
        # (a partner that dropped out must not stall each round), as long as the quorum holds.
        client_manager.wait_for(fc.min_partners, timeout=int(self.wait_timeout))
        if client_manager.num_available() < fc.min_partners:
            raise QuorumError(f"only {client_manager.num_available()} partners connected, "
                              f"federation.min_partners is {fc.min_partners}")
        return sorted(client_manager.all().values(), key=lambda p: p.node_id)

    # --- Flower Strategy API -----------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.global_params)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        g = self.global_round(server_round)
        self._round = {"round": g, "t0": time.perf_counter()}
        fc = self.cfg.federation
        config: dict[str, Scalar] = {"round": g, "clipping_norm": fc.clipping_norm, "weight_cap": fc.weight_cap,
                                     "num_rounds": fc.rounds}
        ins = FitIns(ndarrays_to_parameters(self.global_params), config)
        return [(proxy, ins) for proxy in self._sample(client_manager)]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        g = self.global_round(server_round)
        dropped = [{"partner": "?", "reason": f"no reply: {f if isinstance(f, BaseException) else f[1].status}"}
                   for f in failures]
        for d in dropped:
            log.warning("round %d: dropped a reply: %s", g, d["reason"])
        results = sorted(results, key=lambda r: _partner(r[1], r[0]))  # a fixed order: resumable sums
        if self.secagg:
            accepted, update = self._secagg_update(g, results, dropped)
        else:
            accepted, update = self._plain_update(g, results, dropped)
        exhausted = [_partner(r, p) for p, r in accepted if int(r.metrics.get("budget_exhausted", 0)) == 1]
        for pid in exhausted:
            log.warning("round %d: %s has exhausted its privacy budget and did not train", g, pid)
        std = compute_server_noise_std(self.cfg.federation.server_noise_multiplier, self.cfg.federation.clipping_norm,
                                       len(accepted))
        update = compute_noised(update, std, self.rng)
        self.global_params = compute_applied(self.global_params, update)
        for proxy, res in accepted:
            info = self.partners.setdefault(_partner(res, proxy), {})
            info.update({k: v for k, v in res.metrics.items() if k not in ("param_names", "partner_id")})
            fit_s = float(res.metrics.get("fit_time_s", 0.0))
            info["fit_time_s_total"] = float(info.get("fit_time_s_total", 0.0)) + fit_s
        self._round.update(accepted=[_partner(r, p) for p, r in accepted], dropped=dropped,
                           budget_exhausted=exhausted, update_norm=compute_update_norm(update),
                           server_noise_std=std,
                           fit_time_s={_partner(r, p): float(r.metrics.get("fit_time_s", 0.0)) for p, r in accepted},
                           epsilon={_partner(r, p): float(r.metrics["epsilon"]) for p, r in accepted
                                    if "epsilon" in r.metrics})
        return ndarrays_to_parameters(self.global_params), {"accepted": len(accepted), "dropped": len(dropped)}

    def _plain_update(self, g: int, results: list[tuple[ClientProxy, FitRes]], dropped: list[dict[str, Any]]
                      ) -> tuple[list[tuple[ClientProxy, FitRes]], list[np.ndarray]]:
        fc = self.cfg.federation
        accepted, updates = [], []
        for proxy, res in results:
            arrays = parameters_to_ndarrays(res.parameters)
            names = str(res.metrics.get("param_names", "")).split(",")
            reason = validate_update(arrays, names, self.specs, clipping_norm=fc.clipping_norm,
                                     norm_tolerance=fc.norm_tolerance, expected_round=g,
                                     reply_round=res.metrics.get("round"), num_examples=res.num_examples)
            if reason is not None:
                log.warning("round %d: dropped the reply of %s: %s", g, _partner(res, proxy), reason)
                dropped.append({"partner": _partner(res, proxy), "reason": reason})
                continue
            accepted.append((proxy, res))
            updates.append(arrays)
        self._check_quorum(g, accepted, dropped)
        weights = compute_weights([r.num_examples for _, r in accepted], fc.weight_cap)
        return accepted, compute_weighted_average(updates, weights)

    def _secagg_update(self, g: int, results: list[tuple[ClientProxy, FitRes]], dropped: list[dict[str, Any]]
                       ) -> tuple[list[tuple[ClientProxy, FitRes]], list[np.ndarray]]:
        """Under SecAgg+ every FitRes carries the same unmasked weighted mean; check it as a whole."""
        fc = self.cfg.federation
        accepted = []
        for proxy, res in results:
            if res.metrics.get("round") != g:
                dropped.append({"partner": _partner(res, proxy), "reason": f"wrong round {res.metrics.get('round')!r}"})
            else:
                accepted.append((proxy, res))
        self._check_quorum(g, accepted, dropped)
        mean = parameters_to_ndarrays(results[0][1].parameters)
        dim = sum(int(np.prod(s.shape)) for s in self.specs)
        slack = math.sqrt(dim) * self.secagg_precision * fc.clipping_norm  # quantisation error bound
        reason = validate_update([a.astype(np.float32) for a in mean], self.names, self.specs,
                                 clipping_norm=fc.clipping_norm + slack, norm_tolerance=fc.norm_tolerance,
                                 expected_round=g, reply_round=g)
        if reason is not None:
            raise QuorumError(f"round {g}: the securely aggregated update is invalid: {reason}")
        return accepted, [a.astype(np.float64) for a in mean]

    def _check_quorum(self, g: int, accepted: list[Any], dropped: list[dict[str, Any]]) -> None:
        need = self.cfg.federation.min_partners
        if len(accepted) < need:
            reasons = "; ".join(f"{d['partner']}: {d['reason']}" for d in dropped)
            raise QuorumError(f"round {g}: only {len(accepted)} valid replies, federation.min_partners is {need}"
                              + (f" ({reasons})" if reasons else ""))

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list[tuple[ClientProxy, EvaluateIns]]:
        g = self.global_round(server_round)
        if not compute_is_eval_round(g, self.cfg.federation.rounds, self.cfg.federation.eval_every):
            self._finish_round(g, {}, {}, 0)  # Flower calls no aggregate_evaluate for an empty round
            return []
        ins = EvaluateIns(ndarrays_to_parameters(self.global_params), {"round": g})
        return [(proxy, ins) for proxy in self._sample(client_manager)]

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        g = self.global_round(server_round)
        results = sorted(results, key=lambda r: _partner(r[1], r[0]))
        good = [(p, r) for p, r in results if r.metrics.get("round") == g]
        per_partner = {_partner(r, p): {**{k: float(r.metrics[k]) for k in METRIC_KEYS},
                                        "evaluated_users": r.num_examples} for p, r in good}
        metric_dicts = [{k: float(r.metrics[k]) for k in METRIC_KEYS} for _, r in good]
        agg = compute_weighted_metrics(metric_dicts, [r.num_examples for _, r in good], METRIC_KEYS)
        for pid, m in per_partner.items():
            self.partners.setdefault(pid, {}).update(m)
        for p, r in good:
            info = self.partners[_partner(r, p)]
            eval_s = float(r.metrics.get("eval_time_s", 0.0))
            info["eval_time_s_total"] = float(info.get("eval_time_s_total", 0.0)) + eval_s
        self._finish_round(g, agg, per_partner, len(failures) + len(results) - len(good))
        loss = None if not agg else 1.0 - agg["ndcg@10"]
        return loss, dict(agg)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None  # no central data: evaluation is federated

    def _finish_round(self, g: int, agg: dict[str, float], per_partner: dict[str, Any], eval_failures: int) -> None:
        t0 = self._round.pop("t0", time.perf_counter())
        wall = time.perf_counter() - t0
        self.elapsed_s += wall
        record = {**self._round, "round": g, **agg, "partners": per_partner, "eval_failures": eval_failures,
                  "round_time_s": wall}
        eps = record.get("epsilon") or {}
        if eps:
            record["epsilon_max"] = max(eps.values())
        self.history.append(record)
        append_jsonl(self.run_dir / "rounds.jsonl", record)
        heads = {pid: {"round": int(info["ledger_round"]), "hash": str(info["ledger_head"])}
                 for pid, info in sorted(self.partners.items()) if "ledger_head" in info}
        if heads:  # what each partner's ledger held when its update arrived: a truncated ledger shows
            write_json_atomic(self.run_dir / "ledger_heads.json", heads)
        save_checkpoint(self.run_dir, Checkpoint(g, self.names, self.global_params, self.state_dict()))
        if self.on_round is not None:
            self.on_round(record)
