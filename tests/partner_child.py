"""A child process for the crash tests: one partner and a minimal coordinator loop, on real components.

``python -m tests.partner_child CONFIG RUN_DIR`` plays partner 0 of the config's partition and the
server's part around it: the signed manifest at start, then per round: the partner's fit (its
ledger, its saved release), the reply "leaving" (a line in ``RUN_DIR/replies.jsonl``: what really
left the partner), the signed heads, and the server checkpoint (server/checkpoint.py); at the end,
metrics.json and its signed record. A resumed child continues from the latest checkpoint, as the
ServerApp does (dropping the interrupted run's metrics record before its first round). ``FEDSOCIAL_FAULT`` kills it at a
named boundary (shared/faults.py). A partner refusal exits 3 with its message on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(config_path: str, run_dir: str) -> int:
    from fedsocial.client.partner import Partner, PartnerError, settings_from_context
    from fedsocial.client.state import compute_release_digest
    from fedsocial.server.checkpoint import Checkpoint, append_jsonl, latest_checkpoint, save_checkpoint
    from fedsocial.shared.config import load_config
    from fedsocial.shared.privacy.records import (
        METRICS_RECORD,
        compute_params_sha256,
        write_run_manifest,
        write_signed_heads,
        write_signed_metrics,
    )

    run = Path(run_dir)
    partner = Partner(settings_from_context({"config-path": config_path, "run-dir": run_dir},
                                            {"partition-id": 0, "num-partitions": 3}))
    cfg = load_config(Path(config_path))
    pc = partner.cfg.privacy
    write_run_manifest(run, cfg, {partner.partner_id: {"num_users": partner.num_users,
                                                       "max_epsilon": pc.max_epsilon, "target_delta": pc.target_delta}})
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        start, (names, params) = 0, partner.initial_parameters()
    else:
        start, names, params = ckpt.round, ckpt.names, ckpt.arrays
    if start < cfg.federation.rounds:
        (run / METRICS_RECORD).unlink(missing_ok=True)
    for r in range(start + 1, cfg.federation.rounds + 1):
        try:
            arrays, _, metrics = partner.fit(params, r)
        except PartnerError as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 3
        append_jsonl(run / "replies.jsonl", {"round": r, "digest": compute_release_digest(names, arrays),
                                             **{k: metrics[k] for k in ("noise_multiplier", "sample_rate", "steps",
                                                                        "epsilon", "ledger_round", "ledger_head")}})
        write_signed_heads(run, r, {partner.partner_id: {"round": metrics["ledger_round"],
                                                         "hash": metrics["ledger_head"]}},
                           compute_params_sha256(names, arrays))
        save_checkpoint(run, Checkpoint(r, names, arrays, {}))
        params = arrays
    write_signed_metrics(run, {"rounds_completed": cfg.federation.rounds,
                               "partners": {partner.partner_id: {"num_users": partner.num_users}}})
    print(json.dumps({"completed": cfg.federation.rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
