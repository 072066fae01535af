"""The ServerApp's body: settings, bootstrap (or resume), the legacy workflow, the final metrics.json.

Settings come from the run config: ``config-path``, ``run-dir`` (and, optionally, ``resume``,
``wait-timeout``, ``stop-after``). A fresh run needs an empty run directory; ``resume = true`` continues from the
newest checkpoint (the last complete round). The SecAgg+ workflow (Flower's, with its unmask stage
screened: :class:`server.secagg.ScreenedSecAggPlusWorkflow`) replaces the fit step when
``secagg.enabled``; everything else is Flower's ``DefaultWorkflow`` with :class:`FedSocialStrategy`.
"""

from __future__ import annotations

import logging
import platform
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.common import GetParametersIns, GetPropertiesIns
from flwr.common.constant import MessageTypeLegacy
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid

from fedsocial.server.aggregation import ParamSpec, compute_decoded_update, compute_npy_header
from fedsocial.server.checkpoint import latest_checkpoint, list_checkpoints, rewrite_jsonl
from fedsocial.server.screening import ScreenedGrid
from fedsocial.server.strategy import METRIC_KEYS, FedSocialStrategy, QuorumError, compute_pin_refusal
from fedsocial.shared import protocol
from fedsocial.shared.config import Config, ConfigError, load_config
from fedsocial.shared.privacy.records import METRICS_RECORD, write_signed_metrics
from fedsocial.shared.protocol import PRIVACY_MODEL

log = logging.getLogger("fedsocial.server")


@dataclass(frozen=True)
class ServerSettings:
    config_path: Path
    run_dir: Path
    resume: bool
    wait_timeout: float
    stop_after: int  # > 0: end this process after that global round (a planned interruption); 0: run to the end
    # partner id -> the node id its SuperNode's key was registered under (run config partner-nodes); empty: any
    partner_nodes: Mapping[str, int] = field(default_factory=dict)


def _resolve_config_path(text: str) -> Path:
    p = Path(text)
    if p.is_absolute() or p.is_file():
        return p.resolve()
    beside_app = Path(__file__).resolve().parents[1] / p  # where `flwr run .` installed the project
    if beside_app.is_file():
        return beside_app
    raise ConfigError(f"run config config-path: no such config file {text!r}")


def settings_from_run_config(run_config: Mapping[str, Any]) -> ServerSettings:
    if not run_config.get("config-path"):
        raise ConfigError("run config: config-path is required")
    resume = run_config.get("resume", False)
    if not isinstance(resume, bool):
        raise ConfigError(f"run config resume: expected a boolean, got {resume!r}")
    return ServerSettings(
        config_path=_resolve_config_path(str(run_config["config-path"])),
        run_dir=Path(str(run_config.get("run-dir") or "runs/flwr-run")).resolve(),
        resume=resume,
        wait_timeout=float(run_config.get("wait-timeout", 600.0)),
        stop_after=int(run_config.get("stop-after", 0)),
        partner_nodes=parse_partner_nodes(run_config.get("partner-nodes", "")),
    )


def parse_partner_nodes(text: Any) -> dict[str, int]:
    """Run config ``partner-nodes``: ``"partner_0=NODE_ID,partner_1=NODE_ID,..."``, the node id that ``flwr
    supernode register`` returned for each partner's key; empty: a node may declare any partner id."""
    if not isinstance(text, str):
        raise ConfigError(f"run config partner-nodes: expected a string, got {text!r}")
    pins: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        pid, sep, nid = item.partition("=")
        if not sep or not pid.strip() or not nid.strip().isdigit():
            raise ConfigError(f"run config partner-nodes: {item[:80]!r} is not PARTNER_ID=NODE_ID")
        if pid.strip() in pins or int(nid) in pins.values():
            raise ConfigError(f"run config partner-nodes: {item[:80]!r} pins a partner or a node twice")
        pins[pid.strip()] = int(nid)
    return pins


def _ask_all(grid: Grid, node_ids: list[int], message_type: str, make_content: Callable[[], Any]
             ) -> tuple[dict[int, Message], dict[int, str]]:
    """One message to each node, sent together so that the nodes answer in parallel (in a deployment
    each answer costs a ClientApp process start and Flower's polling): the replies by node, and why
    each node without one has none."""
    messages = [Message(content=make_content(), dst_node_id=nid, message_type=message_type, group_id="0")
                for nid in node_ids]
    replies = {int(r.metadata.src_node_id): r for r in grid.send_and_receive(messages)}
    failed = {}
    for nid in node_ids:
        reply = replies.pop(nid, None)
        if reply is None or reply.has_error():
            failed[nid] = f"did not answer {message_type}: {reply.error if reply is not None else 'no reply'}"
        else:
            replies[nid] = reply
    return replies, failed


class RefreshingClientManager(SimpleClientManager):
    """Flower's legacy workflow refreshes its list of nodes when ``all``, ``num_available`` or ``sample`` is
    called, and otherwise only every 5 s; ``wait_for`` is not among them. The first round's ``wait_for``
    would then sleep up to 5 s for partners that the bootstrap already saw connected: refresh first."""

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        self.num_available()  # the workflow's wrapped method: asks the grid for its nodes now
        return super().wait_for(num_clients, timeout)


def wait_for_nodes(grid: Grid, cfg: Config, timeout: float) -> list[int]:
    """All ``federation.partners`` nodes, or at least the quorum once ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= cfg.federation.partners:
            return nodes
        if time.monotonic() > deadline:
            if len(nodes) >= cfg.federation.min_partners:
                return nodes
            raise QuorumError(f"{len(nodes)} partners connected after {timeout:.0f} s; "
                              f"federation.min_partners is {cfg.federation.min_partners}")
        time.sleep(0.5)


def query_partners(grid: Grid, nodes: list[int]) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Each node's properties (partner id, shared-parameter names, user count: not hidden by design),
    and why each node that gave none did not (the run goes on without it while the quorum holds)."""
    replies, failed = _ask_all(grid, nodes, MessageTypeLegacy.GET_PROPERTIES,
                               lambda: compat.getpropertiesins_to_recorddict(GetPropertiesIns({})))
    return ({nid: dict(compat.recorddict_to_getpropertiesres(r.content).properties) for nid, r in replies.items()},
            failed)


def compute_admitted(props: Mapping[int, Mapping[str, Any]], pins: Mapping[str, int] | None = None
                     ) -> tuple[dict[int, protocol.Registration], dict[int, str]]:
    """The registrations a run starts from, and every other node with why it is refused: a registration
    must parse, name the partner id its node is pinned to (``pins``, where given), name a partner id no other
    node declares, and declare the shared parameters most of the valid ones declare (a first node with other
    names must not decide them for everyone)."""
    parsed = {nid: protocol.parse_registration(p) for nid, p in sorted(props.items())}
    valid = {nid: r for nid, r in parsed.items() if isinstance(r, protocol.Registration)}
    refused = {nid: f"registration refused: {r}" for nid, r in parsed.items() if isinstance(r, protocol.Rejected)}
    for nid, reg in list(valid.items()):
        why = compute_pin_refusal(nid, reg.partner_id, pins or {})
        if why is not None:
            refused[nid] = why
            del valid[nid]
    ids = Counter(r.partner_id for r in valid.values())
    for nid, reg in list(valid.items()):
        if ids[reg.partner_id] > 1:
            refused[nid] = f"registration refused: partner id {reg.partner_id!r} declared by two nodes"
            del valid[nid]
    declared = Counter((r.param_names, r.param_shapes) for r in valid.values())
    if declared:
        common = max(declared, key=lambda d: (declared[d], -min(nid for nid, r in valid.items()
                                                                if (r.param_names, r.param_shapes) == d)))
        for nid, reg in list(valid.items()):
            if (reg.param_names, reg.param_shapes) != common:
                refused[nid] = f"registration refused: {reg.partner_id} declares other shared parameters" \
                               f"{compute_shape_difference(reg, *common)}"
                del valid[nid]
    return valid, dict(sorted(refused.items()))


def compute_shape_difference(reg: protocol.Registration, names: tuple[str, ...],
                             shapes: tuple[tuple[int, ...], ...]) -> str:
    """Where ``reg`` declares the common names with other shapes: the first parameter that differs, and what
    usually makes it differ (each partner derives the shapes from its items.csv, its users.csv schema and the
    config)."""
    if reg.param_names != names or not reg.param_shapes or not shapes:
        return ""
    for name, mine, theirs in zip(names, reg.param_shapes, shapes, strict=True):
        if mine != theirs:
            return (f": {name} has shape {mine}, the other partners' {theirs} (every partner needs the same "
                    "items.csv, user_feature_values.json and config)")
    return ""


def initial_parameters(grid: Grid, node_id: int, names: Sequence[str]) -> list[np.ndarray] | str:
    """The initial shared parameters as ``node_id`` initialises them, or why they cannot start a run."""
    content = compat.getparametersins_to_recorddict(GetParametersIns({}))
    replies, failed = _ask_all(grid, [node_id], MessageTypeLegacy.GET_PARAMETERS, lambda: content)
    if node_id in failed:
        return failed[node_id]
    tensors = compat.recorddict_to_getparametersres(replies[node_id].content, keep_input=False).parameters.tensors
    headers = [compute_npy_header(t) if isinstance(t, bytes) else "not bytes" for t in tensors]
    if len(tensors) != len(names) or any(isinstance(h, str) for h in headers):
        return f"initial parameters: {len(tensors)} arrays for {len(names)} declared, or unreadable"
    specs = [ParamSpec(n, h[0], str(h[2])) for n, h in zip(names, headers, strict=True) if not isinstance(h, str)]
    arrays = compute_decoded_update(tensors, specs)
    if isinstance(arrays, str) or not all(a.dtype.kind == "f" and np.isfinite(a).all() for a in arrays):
        return f"initial parameters: not finite floating-point arrays ({arrays if isinstance(arrays, str) else ''})"
    return [np.array(a) for a in arrays]


def _only_noise_keys(path: Path) -> bool:
    """A ``partners`` folder holding nothing but partners' provisioned DP noise secrets is no previous run."""
    from fedsocial.shared.privacy.noise_key import NOISE_KEY

    if path.name != "partners" or not path.is_dir():
        return False
    return all(f.is_dir() and all(g.name == NOISE_KEY for g in f.iterdir()) for f in path.iterdir())


def _check_run_dir(s: ServerSettings) -> None:
    if s.resume or not s.run_dir.exists():
        return
    previous = ("checkpoints", "ledgers", "partners", "rounds.jsonl", "run_manifest.json")
    leftovers = [p.name for p in s.run_dir.iterdir() if p.name in previous and not _only_noise_keys(p)]
    if leftovers or list_checkpoints(s.run_dir):
        raise ConfigError(f"run-dir {s.run_dir}: holds a previous run ({', '.join(sorted(leftovers))}); "
                          "resume it, or choose a new run directory")


def record_run_manifest(run_dir: Path, cfg: Config, props: Mapping[int, Mapping[str, Any]]) -> None:
    """Sign the run's privacy settings and every registered partner's declared user count and cap into
    ``run_manifest.json`` (:mod:`shared.privacy.records`): the audit's list of what must be there."""
    from fedsocial.shared.privacy.records import RecordError, write_run_manifest

    declared = {str(p.get("partner_id")): {k: p[k] for k in ("num_users", "max_epsilon", "target_delta") if k in p}
                for p in props.values()}
    try:
        write_run_manifest(run_dir, cfg, declared)
    except RecordError as exc:
        raise ConfigError(f"run-dir {run_dir}: {exc}") from None


def run_server(grid: Grid, context: Context, overrides: Mapping[str, Any] | None = None,
               on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the federation; returns the metrics document also written to ``metrics.json``."""
    t0 = time.perf_counter()
    specs: list[ParamSpec] = []  # the shared parameters, once the bootstrap knows them
    grid = ScreenedGrid(grid, lambda: specs)  # a reply the workflows cannot read becomes its sender's error
    s = settings_from_run_config({**dict(context.run_config), **dict(overrides or {})})
    cfg = load_config(s.config_path)
    _check_run_dir(s)
    s.run_dir.mkdir(parents=True, exist_ok=True)
    nodes = wait_for_nodes(grid, cfg, s.wait_timeout)
    answered, refused = query_partners(grid, nodes)
    admitted, not_admitted = compute_admitted(answered, s.partner_nodes)
    refused.update(not_admitted)
    ckpt = latest_checkpoint(s.run_dir) if s.resume else None
    if ckpt is not None:
        names, params, start, state = ckpt.names, ckpt.arrays, ckpt.round, ckpt.state
        optimizer = ckpt.optimizer
        rewrite_jsonl(s.run_dir / "rounds.jsonl", list(state.get("history", [])))
        log.info("resuming after round %d from %s", start, s.run_dir / "checkpoints")
    else:
        names, params, start, state = [], [], 0, {}
        optimizer = {}
        for nid, reg in sorted(admitted.items()):  # the first admitted node whose initial parameters are sound
            names = list(reg.param_names)
            got = initial_parameters(grid, nid, names)
            if not isinstance(got, str) and reg.param_shapes and tuple(a.shape for a in got) != reg.param_shapes:
                got = "initial parameters: not of the shapes its registration declared"
            if not isinstance(got, str):
                params = got
                break
            refused[nid] = got
            del admitted[nid]
    for nid, why in sorted(refused.items()):
        log.warning("node %d: %s", nid, why)
    if len(admitted) < cfg.federation.min_partners:
        raise QuorumError(f"only {len(admitted)} partners registered, federation.min_partners is "
                          f"{cfg.federation.min_partners}" + "".join(f"; node {n}: {w}" for n, w in refused.items()))
    props = {nid: reg.to_metrics() for nid, reg in admitted.items()}
    record_run_manifest(s.run_dir, cfg, props)
    secagg_kwargs: dict[str, Any] = {}
    from fedsocial.server.secagg import (
        ScreenedSecAggPlusWorkflow,
        compute_assumed_contributors,
        derive_secagg_settings,
    )

    strategy = FedSocialStrategy(cfg, s.run_dir, names, params, start_round=start, state=state,
                                 secagg=cfg.secagg.enabled, secagg_precision=cfg.secagg.precision,
                                 wait_timeout=s.wait_timeout, on_round=on_round, registrations=props,
                                 refused=refused, optimizer=optimizer, partner_nodes=s.partner_nodes)
    specs.extend(strategy.specs)
    # the straggler deadline from here on (admission waited for all); under SecAgg+ the quorum is t, the fewest
    # live partners whose shares it can unmask
    quorum = compute_assumed_contributors(cfg) if cfg.secagg.enabled else cfg.federation.min_partners
    grid.set_deadline(quorum, cfg.federation.straggler_grace, on_missed=strategy.record_missed_deadline)
    if cfg.secagg.enabled:  # the weights the strategy will send: declared users, bounded
        secagg_kwargs = derive_secagg_settings(cfg, list(strategy.weight_bounds().values()))
    last = min(cfg.federation.rounds, s.stop_after) if s.stop_after > 0 else cfg.federation.rounds
    remaining = last - start
    if remaining > 0:
        # The signed metrics record binds results to the heads' round: it stops being true with this round's
        # heads, so drop it now (an interrupted resume then audits with a warning, not as tampered); the end
        # of this process writes both anew.
        (s.run_dir / METRICS_RECORD).unlink(missing_ok=True)
        fit_workflow = ScreenedSecAggPlusWorkflow(**secagg_kwargs, on_halt=strategy.record_secagg_halt,
                                                  on_share_dropped=strategy.record_secagg_dropped_share,
                                                  name_node=strategy.node_name,
                                                  min_summed=compute_assumed_contributors(cfg) if strategy.distributed
                                                  else 0) if cfg.secagg.enabled else None
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining), strategy=strategy,
                               client_manager=RefreshingClientManager())
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    doc = build_metrics(cfg, strategy, props, time.perf_counter() - t0, secagg_kwargs)
    write_signed_metrics(s.run_dir, doc)  # metrics.json, then the server's signature of its bytes
    return doc


def build_metrics(cfg: Config, strategy: FedSocialStrategy, props: Mapping[int, Mapping[str, Any]],
                  wall_s: float, secagg_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """metrics.json: final test metrics at the top level, epsilon/delta (max over partners), history."""
    last = strategy.history[-1] if strategy.history else {}
    doc: dict[str, Any] = {k: float(last.get(k, float("nan"))) for k in METRIC_KEYS}
    partners = {pid: {"num_users": int(r["num_users"])} for pid, r in strategy.registered.items()}
    for pid, info in strategy.partners.items():
        partners.setdefault(pid, {}).update(info)
    if cfg.privacy.enabled:
        eps = [float(p["epsilon"]) for p in partners.values() if "epsilon" in p]
        doc["epsilon"] = max(eps) if eps else 0.0
        doc["delta"] = cfg.privacy.target_delta
        doc["privacy_model"] = PRIVACY_MODEL
        doc["privacy_scope"] = cfg.privacy.scope  # joint | partner (DESIGN.md, two scopes of the guarantee)
    fit_total = sum(float(p.get("fit_time_s_total", 0.0)) for p in partners.values())
    eval_total = sum(float(p.get("eval_time_s_total", 0.0)) for p in partners.values())
    doc.update({
        "rounds_completed": int(last.get("round", 0)),
        "rounds": strategy.history,
        "partners": partners,
        "dropped_replies": [{"round": r["round"], **d} for r in strategy.history for d in r.get("dropped", [])],
        "skipped_rounds": [{"round": r["round"], "reason": r["skipped"]} for r in strategy.history if "skipped" in r],
        "partners_trained": sorted({pid for r in strategy.history for pid in r.get("accepted", [])
                                    if pid not in r.get("budget_exhausted", [])}),
        "refused_nodes": {str(n): why for n, why in strategy.refused_nodes.items()},
        "secure_aggregation": bool(cfg.secagg.enabled),
        "secagg_settings": dict(secagg_kwargs),
        "federation_time_s": strategy.elapsed_s,  # sum of round times (over resumes)
        "partner_fit_time_s": fit_total,  # local training (trainer.fit), summed over partners and rounds
        "partner_eval_time_s": eval_total,  # local evaluation (incl. the local p_u refit), summed likewise
        "wall_time_s": wall_s,  # this process, including bootstrap
        "platform": {"python": platform.python_version(), "machine": platform.machine()},
        "config": cfg.to_dict(),
    })
    return doc
