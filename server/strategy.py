"""The coordinator's strategy (Flower legacy ``Strategy``): validated, weighted FedAvg of clipped updates.

Each partner registers once (``get_properties``: id, parameter names, user count, budget cap); the
server records that and bounds the partner's aggregation weight by it for the whole run
(:func:`server.aggregation.compute_weight_bounds`), whatever a later reply says. Each round: every
registered partner gets the global shared parameters and the round number; each replies with its
clipped update. Without SecAgg+ the server reads every reply through :mod:`shared.protocol` and
checks its arrays (:func:`server.aggregation.validate_update`), drops and logs bad ones (a reply
claiming another partner's id, two replies with one id, a malformed or out-of-range metric), and
averages the rest. With SecAgg+ it first asks who will train, so that only real contributors enter
the secure sum; a round with fewer than ``max(2, reconstruction_threshold)`` of them is skipped and
recorded, not aggregated. Optional Gaussian noise on the mean, then federated evaluation (each
partner scores its own test users), then the round's record, ``rounds.jsonl`` and a checkpoint.
Nothing a partner sends raises out of ``aggregate_fit`` / ``aggregate_evaluate``; only a lost
quorum ends the run (:class:`QuorumError`).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedsocial.server.aggregation import (
    compute_adam_step,
    compute_applied,
    compute_decoded_update,
    compute_is_eval_round,
    compute_noised,
    compute_privacy_bounds,
    compute_server_noise_rng,
    compute_server_noise_std,
    compute_specs,
    compute_update_norm,
    compute_weight_bounds,
    compute_weighted_average,
    compute_weighted_metrics,
    validate_privacy_claims,
    validate_update,
)
from fedsocial.server.checkpoint import Checkpoint, append_jsonl, save_checkpoint
from fedsocial.shared import protocol
from fedsocial.shared.config import Config
from fedsocial.shared.privacy.noise_key import load_or_create_noise_key
from fedsocial.shared.privacy.records import compute_params_sha256, compute_received, write_signed_heads

log = logging.getLogger("fedsocial.server")

METRIC_KEYS = protocol.METRIC_KEYS


class QuorumError(RuntimeError):
    """Fewer valid replies than ``federation.min_partners``: the round (and the run) cannot continue."""


ACTOR_DIED_MARKERS = ("The actor died unexpectedly", "The actor is dead because")  # Ray's words for a lost process
_WORKER_EXIT = re.compile(r"Worker exit type: (\w+)")


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")  # CSI sequences (colours) and two-byte escapes


def compute_failure_reason(text: str, limit: int = 300) -> str:
    """One line from a failed reply: a ClientApp's error arrives as a whole Ray traceback, whose last
    ``Message:`` (or last line) is the partner's own error; the rest would bury it in every log. A process
    that died (killed, out of memory, crashed) has no error of its own: Ray's paragraph becomes one line."""
    if any(marker in text for marker in ACTOR_DIED_MARKERS):
        exit_type = _WORKER_EXIT.search(text)
        return ("its process died before replying (killed, out of memory or crashed"
                + (f"; Ray worker exit type {exit_type.group(1)})" if exit_type else ")"))
    text = _ANSI.sub("", text)  # Ray colours its tracebacks: escape codes in a log line are noise (found in review)
    lines = [ln.strip(" '\"\\>)") for ln in text.replace("\\n", "\n").splitlines() if ln.strip()]
    marked = [ln.split("Message:", 1)[1].strip() for ln in lines if "Message:" in ln]
    line = (marked or lines or [""])[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _node(proxy: ClientProxy) -> int:
    return int(getattr(proxy, "node_id", -1))


def compute_pin_refusal(nid: int, partner_id: str, pins: Mapping[str, int]) -> str | None:
    """Why node ``nid`` may not be partner ``partner_id`` under the run's pins (None: it may). Node
    authentication proves only that a node holds a registered key; the pin ties each key's node to one partner,
    so a SuperNode started with another partner's node config cannot act as that partner."""
    if not pins:
        return None
    if partner_id not in pins:
        return f"registration refused: partner id {partner_id!r} is not among the run config's partner-nodes"
    if pins[partner_id] != nid:
        return (f"registration refused: node {nid} declares {partner_id}, whose SuperNode the run config pins to "
                f"node {pins[partner_id]}")
    return None


class FedSocialStrategy(Strategy):
    """Weighted FedAvg of validated, clipped updates of the shared parameters; state in ``state_dict``.

    ``registrations`` maps node ids to the properties each node declared at the start of the run
    (:func:`shared.protocol.parse_registration` reads them); a node that connects later is asked
    when it is first sampled. The declared user counts are kept in the state: a resumed run bounds
    the weights by the first declaration, not by a new one.
    """

    def __init__(self, cfg: Config, run_dir: Path, names: list[str], initial: list[np.ndarray], *,
                 start_round: int = 0, state: dict[str, Any] | None = None, secagg: bool = False,
                 secagg_precision: float = 0.0, wait_timeout: float = 600.0,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 registrations: Mapping[int, Mapping[str, Any]] | None = None,
                 refused: Mapping[int, str] | None = None,
                 optimizer: Mapping[str, np.ndarray] | None = None,
                 partner_nodes: Mapping[str, int] | None = None) -> None:
        self.cfg, self.run_dir, self.names = cfg, run_dir, list(names)
        self.partner_nodes = dict(partner_nodes or {})  # run config partner-nodes: partner id -> its node id
        self.specs = compute_specs(names, initial)
        self.global_params = [np.asarray(a) for a in initial]
        self.offset = start_round
        self.secagg, self.secagg_precision = secagg, secagg_precision
        self.wait_timeout, self.on_round = wait_timeout, on_round
        state = state or {}
        self.history: list[dict[str, Any]] = list(state.get("history", []))
        self.partners: dict[str, dict[str, Any]] = dict(state.get("partners", {}))
        # partner id -> what it declared at its first registration (user count, caps)
        self.registered: dict[str, dict[str, Any]] = dict(state.get("registered", {}))
        self.node_partner: dict[int, str] = {}  # node id -> partner id (this process's connections)
        self.refused_nodes: dict[int, str] = {}  # node id -> why it is not part of the run
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self._round: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        # privacy.distributed_noise: the server's AdamW over the released mean gradients (kept in checkpoints)
        self.distributed = bool(cfg.privacy.enabled and cfg.privacy.distributed_noise)
        self.opt_step = int(state.get("opt_step", 0))
        self._wrap_warned = False  # the modular sum's range warning, once a run
        opt = dict(optimizer or {})
        self.opt_m = [np.asarray(opt.get(f"m/{n}", np.zeros(a.shape)), dtype=np.float64)
                      for n, a in zip(self.names, self.global_params, strict=True)]
        self.opt_v = [np.asarray(opt.get(f"v/{n}", np.zeros(a.shape)), dtype=np.float64)
                      for n, a in zip(self.names, self.global_params, strict=True)]
        self.refused_nodes.update(refused or {})  # refused at the bootstrap: never asked again
        self.register_all(registrations or {})

    # --- registration --------------------------------------------------------------------------
    def register_all(self, registrations: Mapping[int, Mapping[str, Any]]) -> None:
        """Record the nodes' declarations; a partner id declared by two nodes is refused for both."""
        parsed = {nid: protocol.parse_registration(props) for nid, props in sorted(registrations.items())}
        ids = [r.partner_id for r in parsed.values() if isinstance(r, protocol.Registration)]
        for nid, reg in parsed.items():
            if isinstance(reg, protocol.Rejected):
                self._refuse_node(nid, f"registration refused: {reg}")
            elif (why := compute_pin_refusal(nid, reg.partner_id, self.partner_nodes)) is not None:
                self._refuse_node(nid, why)
            elif ids.count(reg.partner_id) > 1:
                self._refuse_node(nid, f"registration refused: partner id {reg.partner_id!r} declared by two nodes")
            else:
                self._register(nid, reg)

    def _register(self, nid: int, reg: protocol.Registration) -> None:
        if reg.partner_id in self.node_partner.values():
            self._refuse_node(nid, f"registration refused: partner id {reg.partner_id!r} is already connected")
            return
        if list(reg.param_names) != self.names:
            self._refuse_node(nid, f"registration refused: {reg.partner_id} declares other shared parameters")
            return
        first = self.registered.setdefault(reg.partner_id, {"num_users": reg.num_users,
                                                           "max_epsilon": reg.max_epsilon,
                                                           "target_delta": reg.target_delta})
        if first["num_users"] != reg.num_users:
            log.warning("%s re-registered with %d users; its weight stays bounded by the %d it first declared",
                        reg.partner_id, reg.num_users, first["num_users"])
        self.node_partner[nid] = reg.partner_id

    def _refuse_node(self, nid: int, reason: str) -> None:
        log.warning("node %d: %s", nid, reason)
        self.refused_nodes[nid] = reason

    def weight_bounds(self) -> dict[str, float]:
        """Each registered partner's largest aggregation weight (declared users, capped)."""
        fc = self.cfg.federation
        declared = {pid: int(r["num_users"]) for pid, r in self.registered.items()}
        return compute_weight_bounds(declared, fc.weight_cap, fc.weight_cap_ratio)

    def _ask_registration(self, proxy: ClientProxy) -> None:
        """A node that connected after the start registers when it is first sampled."""
        nid = _node(proxy)
        try:
            res = proxy.get_properties(GetPropertiesIns({}), timeout=min(self.wait_timeout, 60.0), group_id=None)
            self.register_all({nid: dict(res.properties)})
        except Exception as exc:  # a node that cannot register is left out, not fatal
            self._refuse_node(nid, f"registration failed: {type(exc).__name__}: {exc}")

    # --- bookkeeping -------------------------------------------------------------------------
    def global_round(self, server_round: int) -> int:
        """Flower counts rounds from 1 in every process; a resumed run continues the global count."""
        return self.offset + server_round

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "partners": self.partners, "registered": self.registered,
                "elapsed_s": self.elapsed_s, "opt_step": self.opt_step}  # no noise state: keyed by server/dp_noise.key

    def optimizer_arrays(self) -> dict[str, np.ndarray]:
        """The server optimizer's moments (distributed noise only), for the checkpoint."""
        if not self.distributed:
            return {}
        return {**{f"m/{n}": a for n, a in zip(self.names, self.opt_m, strict=True)},
                **{f"v/{n}": a for n, a in zip(self.names, self.opt_v, strict=True)}}

    def _sample(self, client_manager: ClientManager) -> list[ClientProxy]:
        fc = self.cfg.federation
        # The bootstrap already waited for every partner; from then on, take whoever is connected
        # (a partner that dropped out must not stall each round), as long as the quorum holds.
        client_manager.wait_for(fc.min_partners, timeout=int(self.wait_timeout))
        proxies = sorted(client_manager.all().values(), key=_node)
        for proxy in proxies:
            if _node(proxy) not in self.node_partner and _node(proxy) not in self.refused_nodes:
                self._ask_registration(proxy)
        registered = [p for p in proxies if _node(p) in self.node_partner]
        if len(registered) < fc.min_partners:
            raise QuorumError(f"only {len(registered)} registered partners connected, "
                              f"federation.min_partners is {fc.min_partners}")
        return registered

    def _who(self, proxy: ClientProxy) -> str:
        return self.node_partner.get(_node(proxy), f"node-{_node(proxy)}")

    def _who_failed(self, error: str) -> str:
        """The partner of a failed reply known only by its error's text (the screen names the node first)."""
        found = re.search(r"node (\d+)", error)
        return "?" if found is None else self.node_partner.get(int(found.group(1)), f"node-{found.group(1)}")

    # --- Flower Strategy API -----------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.global_params)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        g = self.global_round(server_round)
        self._round = {"round": g, "t0": time.perf_counter()}
        fc = self.cfg.federation
        proxies = self._sample(client_manager)
        if self.secagg:
            proxies = self._secagg_contributors(g, proxies)
            if not proxies:
                return []  # SecAggPlusWorkflow cancels the fit step; the round is recorded as skipped
        bounds = self.weight_bounds()
        # distributed noise: every partner is told whose shares the secure sum is formed over; it re-sends an
        # already charged share into that same set only (a sum over another set would release the difference)
        summed = tuple(sorted(self._who(p) for p in proxies)) if self.distributed else None
        out = []
        for proxy in proxies:
            ins = protocol.FitInstructions(g, fc.clipping_norm, fc.rounds, int(bounds[self._who(proxy)]),
                                           fc.weight_cap, self.secagg, self.distributed, summed)
            out.append((proxy, FitIns(ndarrays_to_parameters(self.global_params), ins.to_config())))
        return out

    def _secagg_contributors(self, g: int, proxies: list[ClientProxy]) -> list[ClientProxy]:
        """The partners that will train round ``g``; none when too few to hide one update."""
        from concurrent.futures import ThreadPoolExecutor

        will, exhausted, dropped, released = [], [], [], []
        # asked together (as Flower's own fit_clients does), so a dead partner costs one timeout, not one each
        with ThreadPoolExecutor(max_workers=max(1, len(proxies))) as pool:
            intents = list(pool.map(lambda proxy: self._ask_intent(proxy, g), proxies))
        for proxy, intent in zip(proxies, intents, strict=True):
            pid = self._who(proxy)
            if isinstance(intent, protocol.Rejected) or intent.partner_id != pid:
                dropped.append({"partner": pid, "reason": f"intent: {intent}"})
            elif intent.will_train:
                will.append(proxy)
            elif intent.released:  # a resumed round: its share is in a sum already, and enters one sum only
                released.append(pid)
            else:
                exhausted.append(pid)
        if released:
            log.warning("round %d: %s already released this round's share (a re-run of a released round): not "
                        "asked again", g, ", ".join(released))
        self._round.update(budget_exhausted=exhausted, dropped=dropped, **({"released_before": released}
                                                                           if released else {}))
        need = self.secagg_min_contributors()
        if len(will) < need:
            why = (f" ({len(released)} already released this round's share before a restart: a share enters one "
                   "secure sum only)" if released else "")
            self._skip(g, f"only {len(will)} partners will contribute to the secure sum, fewer than "
                          f"max(2, secagg.reconstruction_threshold) = {need}: a sum of so few could reveal "
                          f"one partner's update{why}")
            return []
        return will

    def _ask_intent(self, proxy: ClientProxy, g: int) -> protocol.Intent | protocol.Rejected:
        try:
            # a partner that died mid-run must not stall the round for the whole wait_timeout
            res = proxy.get_properties(GetPropertiesIns({"round": g}), timeout=min(self.wait_timeout, 60.0),
                                       group_id=None)
            return protocol.parse_intent(protocol.as_mapping(res.properties), g)
        except Exception as exc:  # a partner that does not answer is not a contributor
            return protocol.Rejected((f"no answer: {type(exc).__name__}: {exc}",))

    def secagg_min_contributors(self) -> int:
        return max(2, self.cfg.secagg.reconstruction_threshold)

    def _skip(self, g: int, reason: str) -> None:
        log.warning("round %d skipped: %s", g, reason)
        self._round.update(skipped=reason, accepted=[], update_norm=0.0, server_noise_std=0.0)
        self._round.setdefault("dropped", [])
        self._round.setdefault("budget_exhausted", [])

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        g = self.global_round(server_round)
        dropped: list[dict[str, Any]] = list(self._round.get("dropped", []))
        for f in failures:
            who = self._who(f[0]) if isinstance(f, tuple) else self._who_failed(str(f))
            reason = f"no reply: {compute_failure_reason(str(f if isinstance(f, BaseException) else f[1].status))}"
            log.warning("round %d: dropped a reply of %s: %s", g, who, reason)
            dropped.append({"partner": who, "reason": reason})
        reports = self._read_fit_replies(g, results, dropped)
        # every fit reply read (its update decoded, or its share in an unmasked sum), aggregated or dropped below
        # (over the clipping norm, over its cap, a sum voided by another reply): the release left the partner all
        # the same, so the audit holds its ledger to it; no accounting: no DP, or a refusal (nothing released)
        for _, _, rep in reports:
            if rep.accounting is not None:
                self._note_accounting(rep.partner_id, rep.accounting, "fit")
        exhausted = list(self._round.get("budget_exhausted", []))
        exhausted += [r.partner_id for _, _, r in reports if r.budget_exhausted]
        for pid in exhausted:
            log.warning("round %d: %s has exhausted its privacy budget and did not train", g, pid)
        self._round.update(dropped=dropped, budget_exhausted=exhausted)
        if self.distributed:
            update = self._distributed_update(g, results, reports, dropped)
        elif self.secagg:
            update = self._secagg_update(g, results, reports, dropped)
        else:
            update = self._plain_update(g, reports, dropped)
        if update is None:
            return ndarrays_to_parameters(self.global_params), {"accepted": 0, "dropped": len(dropped)}
        accepted = [r for _, _, r in reports]
        # sigma C / n over the replies that contribute: a refusal (weight 0, budget exhausted) adds nothing to the
        # mean, so counting it shrank the noise below one contributor's sensitivity (found in review)
        contributors = [r for r in accepted if not r.budget_exhausted]
        std = compute_server_noise_std(self.cfg.federation.server_noise_multiplier, self.cfg.federation.clipping_norm,
                                       len(contributors))
        if std > 0:  # keyed by the server's secret, never by train.seed (which every party knows)
            (self.run_dir / "server").mkdir(parents=True, exist_ok=True)
            key = load_or_create_noise_key(self.run_dir / "server")  # 0600, OS entropy, never sent
            update = compute_noised(update, std, compute_server_noise_rng(key, g))
        self.global_params = compute_applied(self.global_params, update)
        for rep in accepted:
            info = self.partners.setdefault(rep.partner_id, {})
            info.update({k: v for k, v in rep.to_metrics().items() if k not in ("param_names", "partner_id")})
            info["fit_time_s_total"] = float(info.get("fit_time_s_total", 0.0)) + rep.fit_time_s
        self._round.update(accepted=[r.partner_id for r in accepted], update_norm=compute_update_norm(update),
                           server_noise_std=std, fit_time_s={r.partner_id: r.fit_time_s for r in accepted})
        eps = self._round.setdefault("epsilon", {})
        eps.update({r.partner_id: r.epsilon for r in accepted if r.epsilon is not None})
        return ndarrays_to_parameters(self.global_params), {"accepted": len(accepted), "dropped": len(dropped)}

    def _read_fit_replies(self, g: int, results: list[tuple[ClientProxy, FitRes]], dropped: list[dict[str, Any]]
                          ) -> list[tuple[ClientProxy, FitRes, protocol.FitReport]]:
        """The replies that parse as fit reports of registered partners, one per partner id, in id order."""

        def drop(who: str, reason: str) -> None:
            log.warning("round %d: dropped the reply of %s: %s", g, who, reason)
            dropped.append({"partner": who, "reason": reason})

        out = []
        for proxy, res in results:
            who = self._who(proxy)
            if _node(proxy) not in self.node_partner:
                drop(who, "the node is not a registered partner of this run")
                continue
            rep = protocol.parse_fit_report(protocol.as_mapping(res.metrics), g)
            if isinstance(rep, protocol.Rejected):
                drop(who, f"malformed reply: {rep}")
            elif rep.partner_id != who:
                drop(who, f"the reply claims partner id {rep.partner_id!r}, the node registered as {who!r}")
            else:
                out.append((proxy, res, rep))
        ids = [r.partner_id for _, _, r in out]
        twice = {pid for pid in ids if ids.count(pid) > 1}
        for pid in sorted(p for p in ids if p in twice):  # each of them: which one is genuine is unknowable
            drop(pid, "two replies with one partner id in a round: all refused")
        return sorted([t for t in out if t[2].partner_id not in twice], key=lambda t: t[2].partner_id)

    def _plain_update(self, g: int, reports: list[tuple[ClientProxy, FitRes, protocol.FitReport]],
                      dropped: list[dict[str, Any]]) -> list[np.ndarray] | None:
        fc = self.cfg.federation
        bounds = self.weight_bounds()
        kept, updates, weights = [], [], []
        for proxy, res, rep in reports:
            decoded = compute_decoded_update(getattr(res.parameters, "tensors", None), self.specs)
            arrays = [] if isinstance(decoded, str) else decoded
            reason = decoded if isinstance(decoded, str) else validate_update(
                arrays, list(rep.param_names), self.specs, clipping_norm=fc.clipping_norm,
                norm_tolerance=fc.norm_tolerance, expected_round=g, reply_round=rep.round,
                num_examples=res.num_examples)
            if reason is None:
                reason = self._privacy_refusal(rep, compute_update_norm(arrays))
            if reason is not None:
                log.warning("round %d: dropped the reply of %s: %s", g, rep.partner_id, reason)
                dropped.append({"partner": rep.partner_id, "reason": reason})
                continue
            bound = bounds[rep.partner_id]
            if res.num_examples > bound:
                log.warning("round %d: %s claims weight %d; bounded by its declared users to %g", g,
                            rep.partner_id, res.num_examples, bound)
            kept.append((proxy, res, rep))
            updates.append(arrays)
            weights.append(0.0 if rep.budget_exhausted else bound)
        reports[:] = kept
        self._check_quorum(g, kept, dropped)
        return compute_weighted_average(updates, np.asarray(weights, dtype=np.float64))

    def _summed_contributors(self, g: int, results: list[tuple[ClientProxy, FitRes]],
                             reports: list[tuple[ClientProxy, FitRes, protocol.FitReport]],
                             dropped: list[dict[str, Any]], need: int
                             ) -> list[tuple[ClientProxy, FitRes, protocol.FitReport]] | None:
        """The valid contributors of a secure sum, or None (the round skipped) when it cannot be used."""
        contributors = [t for t in reports if not t[2].budget_exhausted and t[1].num_examples > 0]
        for _, _, rep in contributors:  # its masked share is in the sum: one false claim voids the sum
            reason = self._privacy_refusal(rep, math.inf)
            if reason is not None:
                log.warning("round %d: the reply of %s in the secure sum: %s", g, rep.partner_id, reason)
                dropped.append({"partner": rep.partner_id, "reason": reason})
        contributors = [t for t in contributors if self._privacy_refusal(t[2], math.inf) is None]
        if len(contributors) < need or len(contributors) != len(results):
            self._skip(g, f"{len(contributors)} valid contributors of {len(results)} in the secure sum "
                          f"(at least {need} needed, and every summed reply valid): not aggregated")
            reports[:] = []
            return None
        self._check_quorum(g, contributors, dropped)
        return contributors

    def _distributed_update(self, g: int, results: list[tuple[ClientProxy, FitRes]],
                            reports: list[tuple[ClientProxy, FitRes, protocol.FitReport]],
                            dropped: list[dict[str, Any]]) -> list[np.ndarray] | None:
        """Distributed noise: the secure sum of the partners' Skellam shares, decoded, is the noisy sum of
        every contributor's clipped user gradients; divided by their declared users it is one DP-GD step's
        gradient, and the server's AdamW turns it into the update (shared/privacy/distributed.py)."""
        from fedsocial.server.secagg import compute_assumed_contributors
        from fedsocial.shared.privacy import distributed as dn

        pc, tc = self.cfg.privacy, self.cfg.train
        contributors = self._summed_contributors(g, results, reports, dropped,
                                                 compute_assumed_contributors(self.cfg))
        if contributors is None:
            return None
        n = len(contributors)
        bits, step = dn.compute_sum_bits(self.cfg.federation.partners), dn.compute_grid_step(pc.max_grad_norm,
                                                                                            pc.grid_bits)
        users = sum(int(self.registered[r.partner_id]["num_users"]) for _, _, r in contributors)
        if users << pc.grid_bits >= 1 << (bits - 1) and not self._wrap_warned:
            self._wrap_warned = True
            log.warning("round %d: %d users x 2**%d grid steps reach the modular sum's range 2**%d: a coordinate "
                        "that most users' gradients share may wrap around (lower privacy.grid_bits)", g, users,
                        pc.grid_bits, bits - 1)
        mean = parameters_to_ndarrays(results[0][1].parameters)
        if [tuple(a.shape) for a in mean] != [tuple(sp.shape) for sp in self.specs]:
            self._skip(g, "the securely aggregated shares do not have the shared parameters' shapes")
            reports[:] = []
            return None
        sums = [dn.compute_decoded_sum(np.asarray(a, dtype=np.float64) * n, n, bits) for a in mean]
        reason = self._implausible_sum(sums, contributors, users, step)
        if reason is not None:
            self._skip(g, f"the securely aggregated shares are not a noisy gradient sum: {reason}")
            reports[:] = []
            return None
        grads = [s * (step / max(1, users)) for s in sums]
        self.opt_step += 1
        update, self.opt_m, self.opt_v = compute_adam_step(self.global_params, grads, self.opt_m, self.opt_v,
                                                           self.opt_step, tc.lr, tc.weight_decay)
        for i, name in enumerate(self.names):  # a released value (item_pop): the users-weighted mean, no step
            if name in dn.VALUE_PARAMS:
                update[i] = sums[i] * (dn.VALUE_GRID / max(1, users)) - self.global_params[i].astype(np.float64)
                self.opt_m[i], self.opt_v[i] = np.zeros_like(self.opt_m[i]), np.zeros_like(self.opt_v[i])
        self._round.update(distributed={"contributors": n, "users": users, "optimizer_step": self.opt_step})
        return update

    def _implausible_sum(self, sums: list[np.ndarray], contributors: list[Any], users: int, step: float
                         ) -> str | None:
        """Why the decoded sum cannot be honest shares' (its gradient part beyond
        :func:`shared.privacy.distributed.compute_sum_bound` at the largest noise any contributor claims), or None."""
        from fedsocial.shared.privacy import distributed as dn

        pc, fc = self.cfg.privacy, self.cfg.federation
        grad = [s for s, name in zip(sums, self.names, strict=True) if name not in dn.VALUE_PARAMS]
        dim = sum(int(s.size) for s in grad)
        sigmas = [r.accounting.noise_multiplier for _, _, r in contributors if r.accounting is not None]
        if not grad or not sigmas:
            return None if grad else "no trained parameter in the sum"
        t = dn.compute_assumed_contributors(fc.min_partners, self.cfg.secagg.reconstruction_threshold)
        plan = dn.compute_share_plan(max(sigmas), pc.max_grad_norm, pc.grid_bits, dim, t, fc.partners)
        bound = dn.compute_sum_bound(users, len(contributors), pc.max_grad_norm, step, dim, plan.share_variance)
        norm = math.sqrt(sum(float(np.dot(s.ravel().astype(np.float64), s.ravel().astype(np.float64))) for s in grad))
        return None if norm <= bound else f"L2 norm {norm:.4g} grid steps, above the bound {bound:.4g}"

    def _secagg_update(self, g: int, results: list[tuple[ClientProxy, FitRes]],
                       reports: list[tuple[ClientProxy, FitRes, protocol.FitReport]],
                       dropped: list[dict[str, Any]]) -> list[np.ndarray] | None:
        """Under SecAgg+ every FitRes carries the same unmasked weighted mean; check it as a whole."""
        fc = self.cfg.federation
        if self._summed_contributors(g, results, reports, dropped, self.secagg_min_contributors()) is None:
            return None
        mean = parameters_to_ndarrays(results[0][1].parameters)
        dim = sum(int(np.prod(s.shape)) for s in self.specs)
        slack = math.sqrt(dim) * self.secagg_precision * fc.clipping_norm  # quantisation error bound
        reason = validate_update([a.astype(np.float32) for a in mean], self.names, self.specs,
                                 clipping_norm=fc.clipping_norm + slack, norm_tolerance=fc.norm_tolerance,
                                 expected_round=g, reply_round=g)
        if reason is not None:
            self._skip(g, f"the securely aggregated update is invalid: {reason}")
            reports[:] = []
            return None
        return [a.astype(np.float64) for a in mean]

    def _cap_of(self, partner_id: str) -> float:
        """The partner's epsilon cap: its registered one where tighter than the run's."""
        pc = self.cfg.privacy
        return compute_privacy_bounds(self.registered.get(partner_id, {}), pc.max_epsilon, pc.target_delta)[0]

    def _privacy_refusal(self, rep: protocol.FitReport, update_norm: float) -> str | None:
        pc = self.cfg.privacy
        eps, delta = compute_privacy_bounds(self.registered.get(rep.partner_id, {}), pc.max_epsilon, pc.target_delta)
        return validate_privacy_claims(rep, privacy_enabled=pc.enabled, max_epsilon=eps, target_delta=delta,
                                       update_norm=update_norm)

    def _check_quorum(self, g: int, accepted: list[Any], dropped: list[dict[str, Any]]) -> None:
        need = self.cfg.federation.min_partners
        if len(accepted) < need:
            reasons = "; ".join(f"{d['partner']}: {d['reason']}" for d in dropped)
            raise QuorumError(f"round {g}: only {len(accepted)} valid replies, federation.min_partners is {need}"
                              + (f" ({reasons})" if reasons else ""))

    def _note_accounting(self, partner_id: str, acc: protocol.FitAccounting | protocol.EvalAccounting,
                         reply: str) -> None:
        """A reply's accounting the server read: the partner's newest head and published epsilon, and the
        round's ``received`` names the ledger entry it said charges the release (:meth:`_record_received`)."""
        info = self.partners.setdefault(partner_id, {})
        info.update(epsilon=acc.epsilon, ledger_round=acc.ledger_round, ledger_head=acc.ledger_head)
        self._round.setdefault("epsilon", {})[partner_id] = acc.epsilon
        self._record_received(partner_id, acc.ledger_head, reply)

    def _record_received(self, partner_id: str, ledger_head: str, reply: str) -> None:
        """The round's record (``received``, signed in ledger_heads.json) names the ledger entry that a reply
        (``fit``, ``evaluation`` released or ``kept``) said charges what it carried: the audit finds a release
        of any round that the ledger does not hold, or one charged by an entry of another kind."""
        got = self._round.setdefault("received", {}).setdefault(partner_id, [])
        if {"reply": reply, "hash": ledger_head} not in got:
            got.append({"reply": reply, "hash": ledger_head})

    def record_secagg_halt(self, reason: str) -> None:
        """Why the SecAgg+ workflow stopped this round before ``aggregate_fit``: the round's skip names it."""
        self._round["halted"] = reason

    def record_secagg_dropped_share(self, owner: str, holder: str, why: str) -> None:
        """A share of ``owner``'s secret that ``holder`` sent and the unmask screen dropped: the round's record
        lists it (``secagg_dropped_shares``), so that a partner sending bad shares is named in rounds.jsonl."""
        self._round.setdefault("secagg_dropped_shares", []).append({"owner": owner, "holder": holder, "reason": why})

    def record_missed_deadline(self, nid: int) -> None:
        """A node that missed the straggler deadline (server/deadline.py): the round's record names it
        (``missed_deadline``), whichever stage it missed (SecAgg+ counts it as a dropout, unnamed)."""
        self._round.setdefault("missed_deadline", []).append(self.node_partner.get(nid, f"node-{nid}"))

    def node_name(self, nid: int) -> str:
        """A node as logs and records name it: its id, and the partner it registered as."""
        return f"node {nid} ({self.node_partner[nid]})" if nid in self.node_partner else f"node {nid}"

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list[tuple[ClientProxy, EvaluateIns]]:
        g = self.global_round(server_round)
        halted = self._round.pop("halted", "fewer live contributors than the reconstruction threshold")
        if "accepted" not in self._round:  # the SecAgg+ workflow halted before aggregate_fit
            self._round.setdefault("round", g)
            self._skip(g, f"secure aggregation halted ({halted})")
        if not compute_is_eval_round(g, self.cfg.federation.rounds, self.cfg.federation.eval_every):
            self._finish_round(g, {}, {}, 0)  # Flower calls no aggregate_evaluate for an empty round
            return []
        ins = EvaluateIns(ndarrays_to_parameters(self.global_params), protocol.EvalInstructions(g).to_config())
        return [(proxy, ins) for proxy in self._sample(client_manager)]

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        g = self.global_round(server_round)
        read = self._read_eval_replies(g, results)
        good = [r for r in read if r.released]  # an evaluation kept on its partner (DP default) is not averaged
        per_partner = {r.partner_id: {**r.metrics, "evaluated_users": r.evaluated_users} for r in good}
        agg = compute_weighted_metrics([r.metrics for r in good], [r.evaluated_users for r in good], METRIC_KEYS)
        for rep in good:
            info = self.partners.setdefault(rep.partner_id, {})
            info.update(per_partner[rep.partner_id])
            info["eval_time_s_total"] = float(info.get("eval_time_s_total", 0.0)) + rep.eval_time_s
        for rep in read:  # kept or released: a charged DP selection / evaluation release is the ledger's newest entry
            self.partners.setdefault(rep.partner_id, {})
            if rep.accounting is not None:
                self._note_accounting(rep.partner_id, rep.accounting, "evaluation" if rep.released else "kept")
        self._finish_round(g, agg, per_partner, len(failures) + len(results) - len(read))
        loss = None if not agg else 1.0 - agg["ndcg@10"]
        return loss, dict(agg)

    def _read_eval_replies(self, g: int, results: list[tuple[ClientProxy, EvaluateRes]]) -> list[protocol.EvalReport]:
        """Evaluation reports of registered partners, one per id, none evaluating more users than declared."""
        from fedsocial.shared.privacy.evaluation import compute_release_mode

        mode = compute_release_mode(self.cfg.privacy.enabled, self.cfg.federation.eval_noise_multiplier)
        out, dropped = [], []
        for proxy, res in results:
            who = self._who(proxy)
            rep = protocol.parse_eval_report(protocol.as_mapping(res.metrics), g)
            if _node(proxy) not in self.node_partner:
                reason = "the node is not a registered partner of this run"
            elif isinstance(rep, protocol.Rejected):
                reason = f"malformed evaluation: {rep}"
            elif rep.released and mode == "local":
                reason = ("released metrics in a DP run that keeps evaluations on the partners "
                          "(federation.eval_noise_multiplier = 0): no DP bound covers them, not published")
            elif rep.released and mode == "dp" and rep.accounting is None:
                reason = ("released metrics without the accounting of the ledger entry that charges them: a DP "
                          "evaluation release no ledger is known to charge, not published")
            elif rep.partner_id != who:
                reason = f"the evaluation claims partner id {rep.partner_id!r}, the node registered as {who!r}"
            elif rep.released and rep.accounting is not None \
                    and rep.accounting.epsilon > self._cap_of(who) * (1 + 1e-9):
                # as a fit reply over its cap is refused (found in review: an evaluation at epsilon 50 was published)
                reason = (f"epsilon {rep.accounting.epsilon:g} after this evaluation release exceeds the cap "
                          f"{self._cap_of(who):g}: not published")
            elif rep.evaluated_users > int(self.registered[who]["num_users"]):
                declared = self.registered[who]["num_users"]
                reason = f"evaluated_users {rep.evaluated_users} exceeds the {declared} users it declared"
            else:
                out.append(rep)
                continue
            log.warning("round %d: dropped the evaluation of %s: %s", g, who, reason)
            dropped.append({"partner": who, "reason": reason})
        ids = [r.partner_id for r in out]
        for pid in sorted({p for p in ids if ids.count(p) > 1}):
            log.warning("round %d: dropped the evaluations of %s: two replies with one partner id", g, pid)
            dropped.append({"partner": pid, "reason": "two evaluation replies with one partner id: both refused"})
        self._round["eval_dropped"] = dropped
        return sorted([r for r in out if ids.count(r.partner_id) == 1], key=lambda r: r.partner_id)

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
        if heads or self.cfg.privacy.enabled:  # what each partner's ledger held when its update arrived,
            write_signed_heads(self.run_dir, g, heads,  # signed by the server: a truncated or deleted ledger shows,
                               compute_params_sha256(self.names, self.global_params),  # records of another model,
                               compute_received(self.history),  # and a release of any round left uncharged
                               self.names)
        save_checkpoint(self.run_dir, Checkpoint(g, self.names, self.global_params, self.state_dict(),
                                                 self.optimizer_arrays()))
        self._round = {}
        if self.on_round is not None:
            self.on_round(record)
