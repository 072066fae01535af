"""SecAgg+ settings derived from the federation's config, validated before any round starts.

Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the client; Bell et
al. 2020, building on Bonawitz et al. 2017) makes each partner send ``r * x`` with ``r = w / max_weight``,
its coordinates clipped to ``[-clipping_range, clipping_range]`` and stochastically quantised to
integers in ``[0, quantization_range]``, masked modulo ``modulus_range``. The server learns only the
sum. Three settings must therefore match the rest of the pipeline:

- ``clipping_range``: a partner's update is clipped to L2 norm ``federation.clipping_norm`` and
  ``|x_j| <= ||x||_2``, so every coordinate lies in ``[-clipping_norm, clipping_norm]`` and
  ``r <= 1`` keeps it there: ``clipping_range = clipping_norm`` never clips a valid update.
- ``max_weight``: the aggregation weights are the partners' user counts, capped at
  ``federation.weight_cap``; ``r`` must not exceed 1 (Flower warns of overflow), so
  ``max_weight >= max(weights)``, and as small as that for precision.
- ``quantization_range``: the masked sum of ``n`` partners' values lies in ``[0, n * Q]`` and must
  not wrap modulo ``modulus_range``; the quantisation error must stay below ``secagg.precision``.

Inconsistent settings raise :class:`ConfigError` naming the key.

In the unmask stage the server combines, for each partner, the Shamir shares its neighbours hold of
its mask seed (or, for a partner that dropped out, of its private key). Flower's ``unmask_stage``
raised on one partner's garbage share (``combine_shares``, the key parsing) and ended the run.
:class:`ScreenedSecAggPlusWorkflow` drops malformed shares first (:func:`compute_screened_shares`),
reconstructs from the rest when enough remain, and otherwise halts the round with its reason
(:func:`compute_unmask_problem`): the round is skipped, the next one proceeds. A share that is
well formed but wrong gives a wrong secret and a garbage sum, which the strategy's validation of the
aggregate refuses.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from typing import Any, cast

from flwr.app import Message
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedsocial.server.screening import ScreenedGrid
from fedsocial.shared.config import Config, ConfigError

log = logging.getLogger("fedsocial.server")

MODULUS_RANGE = 2**32  # Flower's default and its maximum (masks are uint32)


def compute_max_weight(cfg: Config, weights: Sequence[float] | None = None) -> float:
    """The largest aggregation weight any partner can have: the capped user counts' maximum.

    ``weights`` are the partners' user counts when known; otherwise ``federation.weight_cap`` bounds
    every weight, and for synthetic data no partner has more than ``data.n_users`` users.
    """
    cap = cfg.federation.weight_cap
    if weights is not None:
        if not weights or min(weights) <= 0:
            raise ConfigError(f"secagg.max_weight: aggregation weights must be positive, got {list(weights)}")
        return float(max(min(w, cap) if cap > 0 else w for w in weights))
    if cap > 0:
        return float(cap)
    if cfg.data.format == "synthetic":
        return float(cfg.data.n_users)
    raise ConfigError("secagg.max_weight: cannot be derived without the partners' user counts; "
                      "set federation.weight_cap or secagg.max_weight")


def compute_worst_mean_weight(cfg: Config, weights: Sequence[float]) -> float:
    """The smallest mean capped weight of a quorum: the ``federation.min_partners`` lightest partners."""
    cap = cfg.federation.weight_cap
    capped = sorted(min(w, cap) if cap > 0 else w for w in weights)
    k = max(1, min(cfg.federation.min_partners, len(capped)))
    return float(sum(capped[:k]) / k)


def compute_quantization_error(clipping_range: float, clipping_norm: float, quantization_range: int,
                               max_weight: float, mean_weight: float) -> float:
    """Worst-case per-coordinate error of the SecAgg+ weighted mean, from quantisation alone.

    Each of the ``n`` partners' values ``r_i x_ij`` (``r_i = w_i / max_weight``) is rounded
    stochastically with an error below one step ``2 R / Q``; the weight ``r_i`` itself is rounded to
    ``q_i / Q`` (error <= ``1 / (2 Q)``, times ``|x_ij| <= C``). The server divides the sum by
    ``sum_i r_i = n * mean_weight / max_weight``, so the error is at most
    ``(2 R + C / 2) * max_weight / (Q * mean_weight)``.
    """
    return (2.0 * clipping_range + 0.5 * clipping_norm) * max_weight / (quantization_range * mean_weight)


def derive_secagg_settings(cfg: Config, weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``SecAggPlusWorkflow`` consistent with ``cfg`` (and the weights, if known).

    Without ``weights`` the precision check assumes equal weights (a necessary condition); with the
    partners' user counts it uses the lightest quorum. Returns ``num_shares``,
    ``reconstruction_threshold``, ``max_weight``, ``clipping_range``, ``quantization_range`` and
    ``modulus_range``. Raises :class:`ConfigError` naming the key of the first inconsistent setting.
    """
    sa, fed = cfg.secagg, cfg.federation
    _check_shares(sa.num_shares, sa.reconstruction_threshold, fed.partners, fed.min_partners)
    if cfg.privacy.enabled and cfg.privacy.distributed_noise:
        return derive_share_settings(cfg)

    clipping_range = sa.clipping_range or fed.clipping_norm
    if clipping_range < fed.clipping_norm:
        raise ConfigError(f"secagg.clipping_range: {clipping_range:g} is below federation.clipping_norm "
                          f"{fed.clipping_norm:g}; coordinates of valid updates would be clipped")

    needed = compute_max_weight(cfg, weights)
    max_weight = sa.max_weight or needed
    if max_weight < needed:
        raise ConfigError(f"secagg.max_weight: {max_weight:g} is below the largest aggregation weight "
                          f"{needed:g} (user counts capped by federation.weight_cap); the sum would overflow")

    q = sa.quantization_range
    if fed.partners * q >= MODULUS_RANGE:
        raise ConfigError(f"secagg.quantization_range: {q} x {fed.partners} partners must stay below the "
                          f"modulus 2**32, else the masked sum wraps around")
    mean_weight = compute_worst_mean_weight(cfg, weights) if weights is not None else max_weight
    error = compute_quantization_error(clipping_range, fed.clipping_norm, q, max_weight, mean_weight)
    if error > sa.precision * fed.clipping_norm:
        raise ConfigError(f"secagg.quantization_range: {q} gives a quantisation error up to {error:.3g} per "
                          f"coordinate, above secagg.precision x clipping_norm = "
                          f"{sa.precision * fed.clipping_norm:.3g}; raise it, or lower secagg.max_weight")
    return {
        "num_shares": sa.num_shares,
        "reconstruction_threshold": sa.reconstruction_threshold,
        "max_weight": max_weight,
        "clipping_range": clipping_range,
        "quantization_range": q,
        "modulus_range": MODULUS_RANGE,
    }


def derive_share_settings(cfg: Config) -> dict[str, Any]:
    """The SecAgg+ settings of distributed noise (:func:`shared.privacy.distributed.compute_secagg_share_settings`)."""
    from fedsocial.shared.privacy.distributed import DistributedNoiseError, compute_secagg_share_settings

    try:
        return dict(compute_secagg_share_settings(cfg.federation.partners, cfg.secagg.num_shares,
                                                  cfg.secagg.reconstruction_threshold))
    except DistributedNoiseError as exc:
        raise ConfigError(str(exc)) from None


def compute_assumed_contributors(cfg: Config) -> int:
    """t of ``cfg``'s distributed mechanism (:func:`shared.privacy.distributed.compute_assumed_contributors`)."""
    from fedsocial.shared.privacy.distributed import compute_assumed_contributors as assumed

    return assumed(cfg.federation.min_partners, cfg.secagg.reconstruction_threshold)


def _check_shares(num_shares: int, threshold: int, partners: int, min_partners: int) -> None:
    """The share settings Flower accepts, that resist an active server, and that survive the quorum."""
    if num_shares < 3:  # Flower refuses an integer num_shares <= 2
        raise ConfigError(f"secagg.num_shares: must be >= 3 (Flower's SecAgg+), got {num_shares}")
    if num_shares > partners:
        raise ConfigError(f"secagg.num_shares: {num_shares} exceeds federation.partners {partners}")
    if threshold >= num_shares:  # Flower: reconstruction_threshold < num_shares
        raise ConfigError(f"secagg.reconstruction_threshold: must be below secagg.num_shares {num_shares}, "
                          f"got {threshold}")
    if 2 * threshold <= num_shares:
        # A server that lies about who dropped out could collect both kinds of shares from a
        # neighbourhood unless more than half are needed (Bonawitz et al. 2017, section 6).
        raise ConfigError(f"secagg.reconstruction_threshold: must exceed half of secagg.num_shares "
                          f"({num_shares}), got {threshold}")
    dropouts = partners - min_partners
    if num_shares - dropouts < threshold:
        raise ConfigError(f"secagg.reconstruction_threshold: {threshold} shares cannot be recovered when "
                          f"{dropouts} of {partners} partners drop out (federation.min_partners "
                          f"{min_partners}); lower it or raise secagg.num_shares")


# ---- the unmask stage: one partner's garbage shares halt a round, never the run --------------------

SHARE_INDEX_BYTES = 4  # Flower's share: a little-endian index, then 16 bytes per 16-byte chunk of the secret
SHARE_CHUNK_BYTES = 16


def compute_share_problem(share: bytes, num_shares: int) -> str | None:
    """Why ``share`` is no share ``combine_shares`` can read (None: it is well formed).

    A share is a 4-byte little-endian index in ``[1, num_shares]`` followed by one or more 16-byte chunks.
    """
    n = len(share)
    if n < SHARE_INDEX_BYTES + SHARE_CHUNK_BYTES or (n - SHARE_INDEX_BYTES) % SHARE_CHUNK_BYTES:
        return f"{n} bytes, not 4 + 16k with k >= 1"
    index = int.from_bytes(share[:SHARE_INDEX_BYTES], "little", signed=False)
    if not 1 <= index <= num_shares:
        return f"index {index} outside [1, {num_shares}]"
    return None


def compute_screened_shares(held: Sequence[tuple[int, bytes]], num_shares: int
                            ) -> tuple[list[tuple[int, bytes]], list[tuple[int, str]]]:
    """The (holder, share) pairs of one secret worth combining, and (holder, why) for each share dropped.

    Dropped: every share of a holder that sent more than one; a malformed share
    (:func:`compute_share_problem`); a share whose length is not the one most shares have (all of them
    when no length is most common); every share whose index another share also has (which is genuine
    cannot be known).
    """
    per_holder = Counter(holder for holder, _ in held)
    dropped = [(h, f"{per_holder[h]} shares for one secret") for h in sorted(per_holder) if per_holder[h] > 1]
    kept = []
    for holder, share in held:
        if per_holder[holder] > 1:
            continue  # dropped above
        problem = compute_share_problem(share, num_shares)
        if problem is None:
            kept.append((holder, share))
        else:
            dropped.append((holder, f"malformed share: {problem}"))
    lengths = Counter(len(share) for _, share in kept).most_common()
    common = lengths[0][0] if lengths and (len(lengths) == 1 or lengths[0][1] > lengths[1][1]) else None
    dropped += [(h, f"a share of {len(s)} bytes, " + (f"the others' are of {common}" if common is not None
                                                         else "no length is the most common"))
                for h, s in kept if len(s) != common]
    kept = [(h, s) for h, s in kept if len(s) == common]
    index = Counter(s[:SHARE_INDEX_BYTES] for _, s in kept)
    dropped += [(h, f"share index {int.from_bytes(s[:SHARE_INDEX_BYTES], 'little')} also sent by another node")
                for h, s in kept if index[s[:SHARE_INDEX_BYTES]] > 1]
    return [(h, s) for h, s in kept if index[s[:SHARE_INDEX_BYTES]] == 1], dropped


def compute_unmask_problem(shares: Mapping[int, Sequence[bytes]], dead: Set[int], threshold: int,
                           neighbours: Mapping[int, Set[int]], public_keys: Mapping[int, Sequence[bytes]],
                           name: Callable[[int], str] = lambda nid: f"node {nid}") -> str | None:
    """Why unmasking with ``shares`` (owner node -> its screened shares) would raise (None: it would not).

    What ``SecAggPlusWorkflow.unmask_stage`` does with them: it combines each owner's shares; a live
    owner's secret seeds a generator that needs whole 4-byte words; a dead owner's secret is its private
    key, exchanged with each neighbour's first public key.
    """
    for owner, got in sorted(shares.items()):
        if len(got) < threshold:
            return f"{name(owner)}: {len(got)} usable shares of its secret, {threshold} needed"
    for owner, got in sorted(shares.items()):
        try:
            secret = combine_shares(list(got))
            if owner not in dead:
                if len(secret) % 4:
                    return f"{name(owner)}: its shares combine to a {len(secret)}-byte mask seed, not whole words"
                continue
            private_key = bytes_to_private_key(secret)
            for other in sorted(neighbours.get(owner, set()) - {owner}):
                generate_shared_key(private_key, bytes_to_public_key(public_keys[other][0]))
        except Exception as exc:  # whatever the parsing and the key exchange raise on hostile bytes
            return f"{name(owner)}: its shares do not combine to its secret: {type(exc).__name__}: {exc}"
    return None


class UnmaskRefused(Exception):
    """The unmask stage's shares cannot be unmasked (the message says why); the round halts."""


class _UnmaskGrid(ScreenedGrid):
    """The grid as the unmask stage sees it: malformed shares dropped from the replies, and the
    reconstruction tried before the workflow does it (:class:`UnmaskRefused` when it would fail)."""

    def __init__(self, grid: Grid, workflow: ScreenedSecAggPlusWorkflow, state: WorkflowState) -> None:
        super().__init__(grid)
        self.workflow, self.state = workflow, state
        self.dead = set(state.sampled_node_ids - state.active_node_ids)  # as the stage computes it

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(super().send_and_receive(messages, timeout=timeout))
        st, name = self.state, self.workflow.name_node
        held: dict[int, list[tuple[int, bytes]]] = {nid: [] for nid in st.sampled_node_ids}
        for reply in replies:
            if not reply.has_error():
                rec = reply.content.config_records[RECORD_KEY_CONFIGS]  # lists of equal length: screened
                owners, shares = cast(list[int], rec[Key.NODE_ID_LIST]), cast(list[bytes], rec[Key.SHARE_LIST])
                for owner, share in zip(owners, shares, strict=True):
                    held.setdefault(owner, []).append((reply.metadata.src_node_id, share))
        keep: dict[int, dict[int, bytes]] = {}  # holder -> owner -> the share the workflow may use
        for owner, pairs in held.items():
            kept, dropped = compute_screened_shares(pairs, st.num_shares)
            for holder, why in dropped:
                log.warning("SecAgg+ unmask: dropped a share of %s's secret sent by %s: %s", name(owner),
                            name(holder), why)
                self.workflow.on_share_dropped(name(owner), name(holder), why)
            for holder, share in kept:
                keep.setdefault(holder, {})[owner] = share
        for reply in replies:
            if not reply.has_error():
                mine = keep.get(reply.metadata.src_node_id, {})
                rec = reply.content.config_records[RECORD_KEY_CONFIGS]
                rec[Key.NODE_ID_LIST], rec[Key.SHARE_LIST] = list(mine), list(mine.values())
        usable = {owner: [keep[h][owner] for h in sorted(keep) if owner in keep[h]] for owner in held}
        problem = compute_unmask_problem(usable, self.dead, st.threshold, st.nid_to_neighbours,
                                         st.nid_to_publickeys, name)
        if problem is not None:
            raise UnmaskRefused(problem)
        return replies


class ScreenedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow whose unmask stage survives hostile shares (see the module docstring).

    ``on_halt(reason)`` is told why a round's unmasking was refused (the strategy records the skip);
    ``on_share_dropped(owner, holder, why)`` of each share the screen dropped (the round's record lists them);
    ``name_node`` names a node in logs and reasons.
    """

    def __init__(self, *args: Any, on_halt: Callable[[str], None] = lambda reason: None,
                 on_share_dropped: Callable[[str, str, str], None] = lambda owner, holder, why: None,
                 name_node: Callable[[int], str] = lambda nid: f"node {nid}", min_summed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_halt, self.on_share_dropped, self.name_node = on_halt, on_share_dropped, name_node
        self.min_summed = min_summed  # distributed noise: a sum of fewer shares holds less noise than accounted

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        if len(state.active_node_ids) < self.min_summed:
            reason = (f"unmask refused, nothing aggregated: {len(state.active_node_ids)} masked shares collected, "
                      f"fewer than the {self.min_summed} whose noise the partners' accounting assumes")
            log.warning("SecAgg+ %s", reason)
            self.on_halt(reason)
            return False
        try:
            return super().unmask_stage(_UnmaskGrid(grid, self, state), context, state)
        except UnmaskRefused as exc:
            reason = f"unmask refused, nothing aggregated: {exc}"
            log.warning("SecAgg+ %s", reason)
            self.on_halt(reason)
            return False
