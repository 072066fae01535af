"""``train.device``: cuda where a GPU exists (skipped with a message otherwise), the CPU fallback, and
the prepared GPU benchmark script run end to end on CPU at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsocial.shared.config import Config, DataConfig, ModelConfig, PrivacyConfig, TrainConfig
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate
from fedsocial.shared.trainer import LocalTrainer, TrainerError, resolve_device

NO_GPU = "no CUDA device on this machine: device = cuda is tested where one exists (simulations/gpu_bench.py)"


def _cfg(device: str, private: bool) -> Config:
    return Config(data=DataConfig(n_users=80, n_items=60, interactions_per_user=8.0),
                  model=ModelConfig(temperature=0.2, loss="softmax", num_negatives=16),
                  train=TrainConfig(batch_size=16, epochs=1, device=device),
                  privacy=PrivacyConfig(enabled=private, noise_multiplier=1.0, max_grad_norm=0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("private", [False, True], ids=["non-private", "dp"])
def test_cuda_fit_and_evaluate_match_cpu_shapes(private: bool) -> None:
    # Prepare: the same data on both devices
    cfg = _cfg("cuda", private)
    split = split_dataset(generate(cfg.data), cfg.split)
    # Execute
    gpu = LocalTrainer(cfg, split, device="cuda", seed=0)
    fit = gpu.fit(2)
    metrics, n = gpu.evaluate("val")
    # Assert: parameters live on the GPU, training ran, metrics are valid
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    assert np.isfinite(fit.train_loss) and fit.steps > 0
    assert n > 0 and 0.0 <= metrics["ndcg@10"] <= 1.0
    if private:
        assert fit.epsilon is not None and fit.epsilon > 0


def test_auto_device_falls_back_to_cpu_and_cuda_is_refused_without_gpu() -> None:
    # Execute / Assert: auto is cuda exactly when one exists; an explicit cuda without one is a clear error
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainerError, match="train.device: 'cuda' requested but CUDA is not available"):
            resolve_device("cuda")


def test_dp_fit_on_the_cpu_fallback_device() -> None:
    # Prepare: device auto on a machine without a GPU is the CPU path
    cfg = _cfg("auto", True)
    split = split_dataset(generate(cfg.data), cfg.split)
    # Execute
    trainer = LocalTrainer(cfg, split, device="auto", seed=0)
    fit = trainer.fit(1)
    # Assert
    assert trainer.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert fit.steps == 5 and fit.epsilon is not None and np.isfinite(fit.train_loss)


def test_gpu_bench_script_runs_on_cpu(tmp_path: Path) -> None:
    # Prepare: the prepared GPU script, CPU fallback, the synthetic workload at 400 users
    out = tmp_path / "gpu"
    cmd = [sys.executable, "-m", "fedsocial.simulations.gpu_bench", "--device", "cpu", "--only", "synthetic_1m",
           "--synthetic-users", "400", "--set", "train.num_threads=1", "--out", str(out)]
    # Execute
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    # Assert: both trainers measured, the ratio and users per second reported
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "gpu_bench.json").read_text())["synthetic_1m"]
    assert doc["users"] == 400 and doc["device"] == "cpu"
    assert doc["dp"]["users_per_s"] > 0 and doc["non_private"]["users_per_s"] > 0
    assert doc["ratio"] == pytest.approx(doc["dp"]["s_per_epoch"] / doc["non_private"]["s_per_epoch"])


@pytest.mark.parametrize(("nodes", "system", "possible"), [
    ((), "linux", False), (("nvidia0",), "linux", True), (("nvidiactl",), "linux", True), (("kfd",), "linux", True),
    (("dxg",), "linux", True), ((), "darwin", False), ((), "win32", True)])
def test_a_gpu_is_possible_only_with_a_driver_device_node_on_linux(tmp_path: Path, nodes: tuple[str, ...],
                                                                   system: str, possible: bool) -> None:
    # Prepare: a /dev with only the given nodes
    from fedsocial.simulations.simulate import compute_gpu_possible

    for name in nodes:
        (tmp_path / name).touch()
    # Execute / Assert
    assert compute_gpu_possible(tmp_path, system) is possible


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: device = auto asks torch, as it must")
def test_simulate_with_device_auto_does_not_import_torch_where_no_gpu_can_be() -> None:
    # Prepare: a fresh interpreter (this one has torch); the driver's Ray settings for device = auto
    from fedsocial.simulations.simulate import compute_gpu_possible

    if compute_gpu_possible():
        pytest.skip("this machine has a GPU driver's device node: device = auto must ask torch")
    script = ("import sys\n"
              "from fedsocial.shared.config import Config, TrainConfig\n"
              "from fedsocial.simulations.simulate import backend_config\n"
              "cfg = backend_config(Config(train=TrainConfig(device='auto')))\n"
              "assert cfg['client_resources']['num_gpus'] == 0.0, cfg\n"
              "assert 'torch' not in sys.modules\n")
    # Execute
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    # Assert: 0 GPUs per actor, and torch (about 3 s) never imported by the driver
    assert proc.returncode == 0, proc.stderr
