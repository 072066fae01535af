"""The Flower side of a partner (legacy path, so that SecAgg+ composes): NumPyClient, mods, ClientApp.

Pipeline of a training message, outermost first: ``make_secagg_mod`` (SecAgg+ masking when
the server runs the SecAgg+ workflow), ``update_clipping_mod`` (the reply's new parameters become the
update against the received global, clipped to the server's ``clipping_norm``; the same place as
Flower's ``fixedclipping_mod``), then :class:`FedSocialClient`. So the only arrays that leave are
clipped updates (masked under SecAgg+), or under distributed noise the masked integer share of a round's
noisy gradient sum (shared/privacy/distributed.py), and the partner's tables stay in its state directory.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedsocial.client.partner import Partner, PartnerError, get_partner, settings_from_context
from fedsocial.client.update import compute_clipped_update
from fedsocial.shared import protocol

log = logging.getLogger("fedsocial.client")
T = TypeVar("T")
Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def checked(parsed: Any) -> dict[str, Any]:
    """The metrics of a report that passed the protocol's own checks; a partner never sends a bad one."""
    if isinstance(parsed, protocol.Rejected):
        raise ValueError(f"this partner's reply breaks the protocol: {parsed}")
    return parsed.to_metrics()  # type: ignore[no-any-return]


def instructed(parsed: T | protocol.Rejected, what: str) -> T:
    """Instructions that passed the protocol's checks; otherwise the partner refuses the message, before
    it trains, evaluates or spends anything (a hostile or broken coordinator gets a clear error)."""
    if isinstance(parsed, protocol.Rejected):
        raise PartnerError(f"refusing the coordinator's {what}: {parsed}")
    return parsed


class FedSocialClient(NumPyClient):
    """Adapts :class:`client.partner.Partner` to Flower's legacy NumPyClient API.

    Every reply is built as a report of :mod:`shared.protocol` and checked with the server's own
    parser before it leaves, so a key outside the protocol or an out-of-range value never leaves.
    """

    def __init__(self, partner: Partner) -> None:
        self.partner = partner

    def get_properties(self, config: Mapping[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        asked = instructed(protocol.parse_properties_request(config, self.partner.cfg.federation.rounds),
                           "properties request")
        if asked is not None:  # the server asks whether this partner will train that round (SecAgg+)
            round_ = asked
            released = self.partner.released_share(round_)  # a share enters one secure sum only
            intent = protocol.Intent(self.partner.partner_id, round_, not released and self.partner.will_train(round_),
                                     released)
            return checked(protocol.parse_intent(intent.to_metrics(), round_))
        names, arrays = self.partner.initial_parameters()
        pc = self.partner.cfg.privacy
        if pc.enabled:
            self._calibrate_early()
        reg = protocol.Registration(self.partner.partner_id, tuple(names), self.partner.num_users,
                                    pc.max_epsilon if pc.enabled else 0.0, pc.target_delta if pc.enabled else 0.0,
                                    tuple(tuple(int(d) for d in np.shape(a)) for a in arrays))
        return checked(protocol.parse_registration(reg.to_metrics()))

    def _calibrate_early(self) -> None:
        """Calibrate the round's noise now (seconds of CPU; kept in the partner's state folder, so later
        messages read it): every partner answers its registration side by side, while SecAgg+'s
        per-round intents, which need the plan, are asked one partner after another. A budget that
        cannot be met is reported where it always was, by the round that needs the plan."""
        from fedsocial.shared.config import ConfigError  # PrivacyConfigError is one

        try:
            self.partner.privacy_plan()
        except ConfigError as exc:
            log.warning("%s: no privacy plan yet: %s", self.partner.partner_id, exc)
            return
        if self.partner.cfg.secagg.enabled:  # round 1's intent, answered ahead (client/partner.py, INTENTS_FILE)
            self.partner.will_train(1)

    def get_parameters(self, config: Mapping[str, Any]) -> list[np.ndarray]:  # type: ignore[override]
        return self.partner.initial_parameters()[1]

    def fit(self, parameters: list[np.ndarray], config: Mapping[str, Any]  # type: ignore[override]
            ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        ins = instructed(protocol.parse_fit_instructions(config, self.partner.cfg.federation.rounds),
                         "training instructions")
        round_ = ins.round
        own = self.partner.distributed_noise
        if ins.distributed_noise != own:  # else the update clipping would be skipped, or a share clipped
            raise PartnerError(f"{self.partner.partner_id}: the server asks for "
                               f"{'distributed' if ins.distributed_noise else 'per-partner'} noise, this partner's "
                               f"privacy.distributed_noise is {str(own).lower()}; refusing round {round_} "
                               "(nothing spent)")
        # under distributed noise the share is saved with the set the sum is over, and re-sent into that set only
        arrays, weight, metrics = self.partner.fit(list(parameters), round_, ins.contributors)
        if ins.weight is not None:  # the bound the server derived from this partner's registration
            weight = min(weight, ins.weight)
        out = checked(protocol.parse_fit_report(metrics, round_))
        if out["budget_exhausted"] and ins.secure_aggregation:
            # Under SecAgg+ a weight-0 zero vector would still count toward the reconstruction
            # threshold, so the secure sum could be one other partner's update alone. Failing the
            # round makes this partner a dropout instead: Flower then counts only real contributors.
            raise PartnerError(f"{self.partner.partner_id}: budget exhausted, not contributing to round {round_}")
        return arrays, weight, out

    def evaluate(self, parameters: list[np.ndarray], config: Mapping[str, Any]  # type: ignore[override]
                 ) -> tuple[float, int, dict[str, Any]]:
        round_ = instructed(protocol.parse_eval_instructions(config, self.partner.cfg.federation.rounds),
                            "evaluation instructions").round
        metrics, n = self.partner.evaluate(list(parameters), round_)
        if metrics is None:  # kept on the partner (DP without a DP evaluation release): only the round leaves
            kept = protocol.EvalReport(round_, self.partner.partner_id, 0, {}, released=False,
                                       accounting=self.partner.evaluation_accounting(round_))  # a charged selection
            return 0.0, 0, checked(protocol.parse_eval_report(kept.to_metrics(), round_))
        report = protocol.EvalReport(round_, self.partner.partner_id, n,
                                     {k: float(metrics[k]) for k in protocol.METRIC_KEYS},
                                     float(metrics.get("eval_time_s", 0.0)),
                                     accounting=self.partner.evaluation_accounting(round_))
        out = checked(protocol.parse_eval_report(report.to_metrics(), round_))
        return 1.0 - float(out["ndcg@10"]), n, out


def make_secagg_mod(fixed: Mapping[str, Any] | None = None) -> Mod:
    """``secaggplus_mod`` for training messages of the SecAgg+ workflow; other messages pass through.

    One ClientApp then serves runs with and without secure aggregation (``secagg.enabled``). Under
    distributed noise SecAgg+ is part of the guarantee, so the partner checks what the server asks
    (:func:`check_share_stage`) before Flower's mod acts on it. ``fixed``: the settings that override
    the run config (as :func:`make_client_app` gives them).
    """
    overrides = dict(fixed or {})

    def secagg_when_requested_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)  # type: ignore[no-any-return]
        expected = _share_expectation({**dict(ctxt.run_config), **overrides}, ctxt.node_config)
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            check_share_stage(dict(msg.content.config_records[RECORD_KEY_CONFIGS]), expected)
            return secaggplus_mod(msg, ctxt, call_next)  # type: ignore[no-any-return]
        if expected is not None:  # found in review: a plain training message made the share leave in the clear
            raise PartnerError("distributed noise: a training message outside SecAgg+; a Skellam share carries a "
                               "fraction of the step's noise and may leave this partner only masked inside a secure "
                               "sum: refusing the round (nothing drawn or charged)")
        return call_next(msg, ctxt)  # type: ignore[no-any-return]

    return secagg_when_requested_mod


def _share_expectation(run_config: Mapping[str, Any], node_config: Mapping[str, Any]
                       ) -> tuple[dict[str, Any], int, int] | None:
    """(SecAgg+ settings, t, partners) of this partner's distributed noise; None without distributed noise."""
    settings = settings_from_context(run_config, node_config)
    return _share_expectation_of(settings, settings.config_path.read_bytes())


@functools.lru_cache(maxsize=8)
def _share_expectation_of(settings: Any, config_bytes: bytes) -> tuple[dict[str, Any], int, int] | None:
    """:func:`_share_expectation` once per settings and config content (four SecAgg+ stages a round)."""
    from fedsocial.client.partner import compute_local_config, compute_partner_config
    from fedsocial.shared.config import load_config
    from fedsocial.shared.privacy import distributed as dn

    cfg = compute_partner_config(compute_local_config(load_config(settings.config_path)), settings)
    if not (cfg.privacy.enabled and cfg.privacy.distributed_noise):
        return None
    sa, fc = cfg.secagg, cfg.federation
    return (dn.compute_secagg_share_settings(fc.partners, sa.num_shares, sa.reconstruction_threshold),
            dn.compute_assumed_contributors(fc.min_partners, sa.reconstruction_threshold), fc.partners)


def check_share_stage(configs: Mapping[str, Any], expected: tuple[dict[str, Any], int, int] | None) -> None:
    """Refuse (PartnerError) a SecAgg+ stage that would break the distributed mechanism's guarantee: a setup
    whose quantisation would not carry the integer shares unchanged (a share clipped or rounded alone is no
    longer a share of the Skellam sum), or an unmask after more of this partner's SecAgg+ neighbours dropped
    than the n - t the noise allows (then fewer than t shares are in the sum). A partner sees only its
    neighbours, so this is a necessary condition; the server's own check (server/secagg.py) counts them all."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    if expected is None:
        return
    settings, t, partners = expected
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        asked = {"clipping_range": configs.get(Key.CLIPPING_RANGE), "quantization_range": configs.get(Key.TARGET_RANGE),
                 "modulus_range": configs.get(Key.MOD_RANGE), "max_weight": configs.get(Key.MAX_WEIGHT)}
        wrong = {k: v for k, v in asked.items() if v != settings[k]}
        if wrong:
            raise PartnerError(f"refusing SecAgg+ settings {wrong}: distributed noise needs "
                               f"{ {k: settings[k] for k in wrong} } (its shares must pass unchanged)")
    elif stage == Stage.UNMASK:
        dead = configs.get(Key.DEAD_NODE_ID_LIST) or []
        if len(dead) > partners - t:
            raise PartnerError(f"refusing to unmask: {len(dead)} of this partner's SecAgg+ neighbours dropped out, "
                               f"so fewer than the {t} shares distributed noise assumes are in the sum")


def update_clipping_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Replace the reply's new parameters by the clipped update ``new - received`` (client side)."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)  # type: ignore[no-any-return]
    fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    # read before training: a bound that cannot clip (absent, NaN, 0, a string) refuses the round unspent
    ins = instructed(protocol.parse_fit_instructions(fit_ins.config, None), "training instructions")
    clipping_norm = ins.clipping_norm
    received = parameters_to_ndarrays(fit_ins.parameters)
    out_msg: Message = call_next(msg, ctxt)
    if out_msg.has_error() or ins.distributed_noise:  # a Skellam share (checked by FedSocialClient.fit) is no update
        return out_msg
    fit_res = compat.recorddict_to_fitres(out_msg.content, keep_input=True)
    clipped, norm = compute_clipped_update(parameters_to_ndarrays(fit_res.parameters), received, clipping_norm)
    log.info("update norm %.4g, clipped to <= %.4g", norm, clipping_norm)  # stays in the partner's log
    fit_res.parameters = ndarrays_to_parameters(clipped)
    out_msg.content = compat.fitres_to_recorddict(fit_res, keep_input=True)
    return out_msg


def _describe_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"bytes": len(v)}
    if isinstance(v, list):
        return {"list": len(v), "types": sorted({type(x).__name__ for x in v})}
    return v


def _array_summary(a: Any) -> list[Any]:
    """[shape, dtype] of a record's array; legacy parameters travel as serialised numpy bytes."""
    arr = bytes_to_ndarray(a.data) if a.stype == "numpy.ndarray" and not a.shape else a.numpy()
    return [list(arr.shape), str(arr.dtype)]


def describe_message(msg: Message) -> dict[str, Any]:
    """Everything a reply carries, arrays as name -> (shape, dtype), scalars as values (for audits/tests)."""
    content = msg.content
    return {
        "message_type": msg.metadata.message_type,
        "arrays": {rn: {k: _array_summary(a) for k, a in rec.items()} for rn, rec in content.array_records.items()},
        "configs": {rn: {k: _describe_value(v) for k, v in rec.items()} for rn, rec in content.config_records.items()},
        "metrics": {rn: {k: _describe_value(v) for k, v in rec.items()} for rn, rec in content.metric_records.items()},
    }


def make_egress_recorder(folder: str | os.PathLike[str]) -> Mod:
    """A mod (place it first) that appends a description of every outgoing reply to ``folder``."""
    folder = Path(folder)

    def egress_recorder_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
        out: Message = call_next(msg, ctxt)
        if not out.has_error():
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"egress-{os.getpid()}.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"node_config": dict(ctxt.node_config), **describe_message(out)}) + "\n")
        return out

    return egress_recorder_mod


def make_client_app(settings: Mapping[str, Any] | None = None, extra_mods: list[Mod] | None = None) -> ClientApp:
    """The ClientApp; ``settings`` (config-path, data-dir, run-dir) override the run config (in-process
    simulation passes them here because ``run_simulation`` does not read ``[tool.flwr.app.config]``)."""
    fixed = dict(settings or {})

    def client_fn(context: Context) -> Any:
        run_config = {**dict(context.run_config), **fixed}
        partner = get_partner(settings_from_context(run_config, context.node_config))
        return FedSocialClient(partner).to_client()

    mods: list[Any] = [*(extra_mods or []), make_secagg_mod(fixed), update_clipping_mod]
    return ClientApp(client_fn=client_fn, mods=mods)
