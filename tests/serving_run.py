"""A small finished run folder in the format ``fedsocial simulate`` writes, for the serving tests.

Built with the real writers (simulate's config writer, the server's checkpoint, the partner's local
state) after a short real local training of partner 0, in a few seconds instead of a federation's minutes.
"""

from __future__ import annotations

from pathlib import Path

from fedsocial.client.state import save_local_state
from fedsocial.server.checkpoint import Checkpoint, save_checkpoint
from fedsocial.shared.config import load_config
from fedsocial.shared.trainer import LocalTrainer
from fedsocial.simulations.recommend import load_partner_data, resolve_source
from fedsocial.simulations.simulate import write_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.n_users=160", "data.n_items=300", "federation.partners=2", "federation.rounds=1",
         "model.local_refit_steps=10", "train.num_threads=1",
         "privacy.enabled=false"]  # a short non-private fit: the serving tests need a trained model, not DP


def make_run(run_dir: Path, overrides: list[str] | None = None, epochs: int = 3) -> Path:
    """``run_dir`` holding config.toml, checkpoints/round_0001.npz and partners/partner-{0,1}/ state."""
    cfg = load_config(ROOT / "configs" / "demo.toml", SMALL + list(overrides or []))
    write_config(cfg, run_dir)
    shared = None
    for pid in ("partner-0", "partner-1"):
        state_dir = run_dir / "partners" / pid
        state_dir.mkdir(parents=True)
        split = load_partner_data(cfg, resolve_source(run_dir, pid))
        trainer = LocalTrainer(cfg, split, seed=cfg.train.seed)
        if shared is None:
            trainer.fit(epochs, refit=False)
            shared = trainer.get_shared()
        else:
            trainer.set_shared(shared)
        save_local_state(state_dir, 1, trainer.get_local_state())
    assert shared is not None
    names = sorted(shared)
    save_checkpoint(run_dir, Checkpoint(1, names, [shared[n] for n in names], {}))
    return run_dir
