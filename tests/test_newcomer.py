"""A newcomer's path: `fedsocial init` on their own CSV data, train / simulate with the written config
and nothing else, tracking read back with TensorBoard's own reader, and a first run free of
third-party warnings (the commands of `make demo` on a tiny config)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedsocial.shared.config import ConfigError, DataConfig, load_config
from fedsocial.shared.csvio import write_csv_dataset
from fedsocial.shared.synthetic import generate
from fedsocial.simulations.init_cmd import DataStats, compute_delta, compute_settings
from fedsocial.simulations.quiet import RunSimulationDeprecationFilter

REPO = Path(__file__).resolve().parents[1]
WARNING_LINE = re.compile(r"warning|deprecat", re.IGNORECASE)
METRICS = ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "hr@20")


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_HOME=str(tmp / ".flwr"), FEDSOCIAL_SIM_CPUS="1", FEDSOCIAL_CACHE_DIR=str(tmp / "cache"))
    env.pop("PYTHONWARNINGS", None)
    return env


def fedsocial(tmp: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI as a user would, from the repository root; output merged as a terminal shows it."""
    proc = subprocess.run([sys.executable, "-m", "fedsocial.simulations.cli", *args], cwd=REPO, env=_env(tmp),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, f"fedsocial {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}"
    return proc


def warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if WARNING_LINE.search(line)]


def _dataset(folder: Path, n_users: int, n_items: int, features: bool) -> Path:
    """Generated data in the generic CSV format; with ``features``, items.csv with names, titles and
    prices and users.csv with two categorical columns."""
    ds = generate(DataConfig(n_users=n_users, n_items=n_items, interactions_per_user=10.0, friends_per_user=4.0))
    write_csv_dataset(ds, folder)
    if features:
        words = ["red", "blue", "shoe", "book", "cake", "lamp", "garden", "phone", "shirt", "chair"]
        rng = np.random.default_rng(0)
        rows = ["item,category,title,price"]
        for i in range(ds.n_items):
            cat = int(ds.item_category[i])
            title = " ".join([words[cat % len(words)], words[(cat * 3 + 1) % len(words)], f"model{i % 7}"])
            price = "" if i % 11 == 0 else f"{rng.lognormal(3.0, 1.0):.2f}"
            rows.append(f"{i},cat-{cat},{title},{price}")
        (folder / "items.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        users = ["user,age_band,region"] + [f"{u},{['18-24', '25-34', '35+'][u % 3]},{'nsew'[u % 4]}"
                                            for u in range(ds.n_users)]
        (folder / "users.csv").write_text("\n".join(users) + "\n", encoding="utf-8")
    return folder


# --- the settings init derives (pure, fast) ---------------------------------------------------------


def _stats(users: int, items: int, interactions: int) -> DataStats:
    return DataStats(users, items, interactions, users * 5, False, False, False, 0)


def test_settings_follow_the_data_size() -> None:
    # Prepare
    small, large = _stats(60, 80, 600), _stats(20000, 40000, 2_000_000)
    # Execute
    s, big = compute_settings(small, False, 3), compute_settings(large, False, 3)
    # Assert: bigger catalogue -> bigger embedding, more negatives, rarer evaluation, fewer epochs
    assert s["model"]["dim"][0] < big["model"]["dim"][0]
    assert s["model"]["num_negatives"][0] < big["model"]["num_negatives"][0]
    assert s["train"]["eval_every"][0] == 1 < big["train"]["eval_every"][0]
    assert s["train"]["epochs"][0] > big["train"]["epochs"][0]
    assert big["train"]["epochs"][0] % big["train"]["eval_every"][0] == 0
    assert s["train"]["batch_size"][0] < big["train"]["batch_size"][0]


def test_dp_settings_are_the_dp_ones() -> None:
    # Prepare
    stats = _stats(3000, 4000, 30000)
    # Execute
    dp = compute_settings(stats, True, 3)
    # Assert: DESIGN.md's DP choices, delta well below 1 / users, about 1/4 of users per batch
    assert dp["privacy"]["enabled"][0] is True
    assert dp["model"]["user_embedding"][0] == "local" and dp["model"]["use_mlp"][0] is False
    assert dp["model"]["learned_scale"][0] is True and dp["privacy"]["popularity_noise_multiplier"][0] == 3.0
    assert dp["privacy"]["target_delta"][0] < 1 / (10 * stats.users)
    assert dp["train"]["batch_size"][0] == 750 and dp["train"]["patience"][0] == 0
    assert dp["privacy"]["epochs"][0] == dp["train"]["epochs"][0]
    assert "selection_candidates" not in dp["privacy"]  # the default two: no categories to personalise by


def test_dp_settings_with_categories_let_the_selection_serve_the_product() -> None:
    # Prepare: the same data with a category column in items.csv
    stats = dataclasses.replace(_stats(3000, 4000, 30000), has_category=True)
    # Execute
    dp, plain = compute_settings(stats, True, 3), compute_settings(stats, False, 3)
    # Assert: the three candidates where the prior is personalised by categories (DP only)
    assert dp["model"]["use_category"][0] is True
    assert dp["privacy"]["selection_candidates"][0] == "model,prior,product"
    assert "selection_candidates" not in plain["privacy"]


def test_dp_settings_validate_at_most_ten_times_because_each_pass_refits_every_user() -> None:
    # Prepare: a small data set, whose full ranking alone would be evaluated every epoch
    stats = _stats(1508, 2071, 35494)
    # Execute
    plain, dp = compute_settings(stats, False, 3), compute_settings(stats, True, 3)
    # Assert: at most 10 validation passes (each refits every user's p_u) over the DP schedule, epochs a multiple
    epochs, every = dp["train"]["epochs"][0], dp["train"]["eval_every"][0]
    assert plain["train"]["eval_every"][0] == 1 and every > 1
    assert epochs // every <= 10 and epochs % every == 0
    assert dp["federation"]["eval_every"][0] == every // 2


def test_delta_known_values() -> None:
    assert compute_delta(60) == 1e-5
    assert compute_delta(17000) == 1e-6
    assert compute_delta(2_000_000) == 1e-8


def test_non_private_config_lists_the_exact_dp_overrides(tmp_path: Path) -> None:
    # Prepare
    data = _dataset(tmp_path / "data", 60, 80, features=False)
    # Execute
    fedsocial(tmp_path, "init", "--data", str(data), "--out", str(tmp_path / "c.toml"))
    text = (tmp_path / "c.toml").read_text(encoding="utf-8")
    overrides = re.findall(r"--set (\S+)", text)
    # Assert: applying the listed overrides gives exactly the config `init --private` writes
    fedsocial(tmp_path, "init", "--data", str(data), "--out", str(tmp_path / "dp.toml"), "--private")
    assert load_config(tmp_path / "c.toml", overrides) == load_config(tmp_path / "dp.toml")
    assert "privacy.enabled=true" in overrides


def test_init_refuses_to_overwrite_and_names_bad_data(tmp_path: Path) -> None:
    # Prepare
    data = _dataset(tmp_path / "data", 60, 80, features=False)
    (tmp_path / "c.toml").write_text("# mine\n", encoding="utf-8")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "interactions.csv").write_text("user,item\na,x\nuser,item\n", encoding="utf-8")
    (tmp_path / "bad" / "social.csv").write_text("user,neighbour\n", encoding="utf-8")
    env = _env(tmp_path)
    cmd = [sys.executable, "-m", "fedsocial.simulations.cli", "init", "--out"]
    # Execute
    exists = subprocess.run([*cmd, str(tmp_path / "c.toml"), "--data", str(data)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    bad = subprocess.run([*cmd, str(tmp_path / "d.toml"), "--data", str(tmp_path / "bad")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    # Assert: one line each, exit 2, nothing overwritten or written
    assert exists.returncode == 2 and "exists" in exists.stderr and "Traceback" not in exists.stderr
    assert (tmp_path / "c.toml").read_text(encoding="utf-8") == "# mine\n"
    assert bad.returncode == 2 and "interactions.csv:3: the header line is repeated" in bad.stderr
    assert not (tmp_path / "d.toml").exists()


def test_init_measures_the_data_with_min_value_and_writes_it(tmp_path: Path) -> None:
    # Prepare: was: `fedsocial init --set data.min_value=4` was refused (no --set), so a data set of explicit
    # ratings got settings sized for every row and min_value = 0; 40 users rate 6 items 3-5
    from fedsocial.simulations.init_cmd import write_init_config

    (tmp_path / "d").mkdir()
    rows = "".join(f"u{u},sku-{(u + j) % 30},{j % 3 + 3}\n" for u in range(40) for j in range(6))
    (tmp_path / "d" / "interactions.csv").write_text("user,item,rating\n" + rows, encoding="utf-8")
    (tmp_path / "d" / "social.csv").write_text("user,friend\n" + "".join(f"u{u},u{(u + 1) % 40}\n" for u in range(40)),
                                               encoding="utf-8")
    # Execute
    every = write_init_config(tmp_path / "d", tmp_path / "all.toml", private=False, partners=3)
    high = write_init_config(tmp_path / "d", tmp_path / "high.toml", private=False, partners=3,
                             overrides=["data.min_value=4"])
    with pytest.raises(ConfigError, match=r"--set 'train.epochs=3': fedsocial init takes only data.min_value"):
        write_init_config(tmp_path / "d", tmp_path / "bad.toml", private=False, partners=3,
                          overrides=["train.epochs=3"])
    # Assert: measured on the ratings >= 4 only (4 of each user's 6), and the config keeps that rule
    assert every.interactions == 240 and high.interactions == 160
    assert load_config(tmp_path / "high.toml").data.min_value == 4.0
    assert load_config(tmp_path / "all.toml").data.min_value == 0.0
    assert "160 interactions" in (tmp_path / "high.toml").read_text(encoding="utf-8")
    assert not (tmp_path / "bad.toml").exists()


def test_init_too_few_users_says_how_many_partners_fit(tmp_path: Path) -> None:
    # Prepare: one user (a degenerate export) and five users
    from fedsocial.simulations.init_cmd import write_init_config

    for name, users in (("one", ["a"]), ("five", list("abcde"))):
        (tmp_path / name).mkdir()
        rows = "".join(f"{u},x\n{u},y\n" for u in users)
        (tmp_path / name / "interactions.csv").write_text("user,item\n" + rows, encoding="utf-8")
        (tmp_path / name / "social.csv").write_text("user,neighbour\n", encoding="utf-8")
    # Execute
    with pytest.raises(ConfigError) as one:
        write_init_config(tmp_path / "one", tmp_path / "one.toml", private=True, partners=1)
    with pytest.raises(ConfigError) as five:
        write_init_config(tmp_path / "five", tmp_path / "five.toml", private=True, partners=3)
    # Assert: no advice to pass "a smaller --partners" than 1; the largest count that fits
    assert "smaller --partners" not in str(one.value) and "at least 2 users" in str(one.value)
    assert "pass --partners 2 or fewer" in str(five.value)
    assert not (tmp_path / "one.toml").exists() and not (tmp_path / "five.toml").exists()


# --- the written config works as is -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("n_users", "n_items", "features", "budget"), [
    (60, 80, False, []),  # small: the sizes keep it fast, nothing overridden for train
    (1200, 1800, True, ["--set", "train.epochs=2"]),  # 20x the users, items.csv and users.csv: budget only
])
def test_init_config_trains_with_no_other_flag(tmp_path: Path, n_users: int, n_items: int, features: bool,
                                               budget: list[str]) -> None:
    # Prepare
    data = _dataset(tmp_path / "data", n_users, n_items, features)
    config = tmp_path / "mine.toml"
    fedsocial(tmp_path, "init", "--data", str(data), "--out", str(config))
    # Execute: from the repository root, a different working directory than the data's
    proc = fedsocial(tmp_path, "train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-progress",
                     *budget, timeout=400)
    # Assert
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert all(0.0 <= doc[k] <= 1.0 for k in METRICS) and doc["ndcg@10"] > 0.0
    assert doc["dataset"]["users"] == n_users
    written = tomllib.loads(config.read_text(encoding="utf-8"))
    assert Path(written["data"]["path"]).is_absolute()
    assert written["model"]["use_price"] is features and written["model"]["use_text"] is features
    assert warning_lines(proc.stdout) == []


@pytest.mark.slow
@pytest.mark.parametrize(("n_users", "n_items", "features"), [(60, 80, False), (1200, 1800, True)])
def test_init_config_simulates_with_no_other_flag(tmp_path: Path, n_users: int, n_items: int,
                                                  features: bool) -> None:
    # Prepare: a DP config for the federation (the harder case); one round only, for the test's budget
    data = _dataset(tmp_path / "data", n_users, n_items, features)
    config = tmp_path / "mine.toml"
    fedsocial(tmp_path, "init", "--data", str(data), "--out", str(config), "--private")
    # Execute
    proc = fedsocial(tmp_path, "simulate", "--config", str(config), "--out", str(tmp_path / "run"),
                     "--set", "federation.rounds=1", "--set", "federation.local_epochs=1", timeout=400)
    # Assert
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert all(0.0 <= doc[k] <= 1.0 for k in METRICS)
    assert 0 < doc["epsilon"] <= 8.0 + 1e-6 and doc["delta"] < 1 / (10 * n_users)
    assert warning_lines(proc.stdout) == []


@pytest.mark.slow
def test_init_distributed_config_simulates_and_audits(tmp_path: Path) -> None:
    # Prepare: a DP config whose partners split the noise under SecAgg+
    data = _dataset(tmp_path / "data", 120, 80, features=False)
    config = tmp_path / "mine.toml"
    fedsocial(tmp_path, "init", "--data", str(data), "--out", str(config), "--private", "--distributed")
    # Execute: two of its 80 rounds
    fedsocial(tmp_path, "simulate", "--config", str(config), "--out", str(tmp_path / "run"),
              "--set", "federation.rounds=2", "--set", "federation.eval_every=2", timeout=400)
    audit = fedsocial(tmp_path, "audit", str(tmp_path / "run"))
    # Assert
    written = tomllib.loads(config.read_text(encoding="utf-8"))
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert written["privacy"]["distributed_noise"] is True and written["secagg"]["enabled"] is True
    assert doc["rounds_completed"] == 2 and 0 < doc["epsilon"] <= 8.0 + 1e-6
    assert "noise: distributed" in audit.stdout and "all ledgers verified" in audit.stdout


def test_init_distributed_needs_private_and_three_partners(tmp_path: Path) -> None:
    # Prepare
    data = _dataset(tmp_path / "data", 60, 80, features=False)
    # Execute
    def init(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fedsocial.simulations.cli", "init", "--data", str(data), *args],
                              cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=120)

    alone = init("--out", str(tmp_path / "a.toml"), "--distributed")
    two = init("--out", str(tmp_path / "b.toml"), "--private", "--distributed", "--partners", "2")
    # Assert: one line each, naming the flag, and no config written
    assert alone.returncode == 2 and "--distributed" in alone.stderr and "Traceback" not in alone.stderr
    assert two.returncode == 2 and "at least 3 partners" in two.stderr
    assert not (tmp_path / "a.toml").exists() and not (tmp_path / "b.toml").exists()


def test_a_data_set_without_social_ties_goes_from_init_to_a_trained_model(tmp_path: Path) -> None:
    # Prepare: interactions only, no social.csv
    data = _dataset(tmp_path / "data", 60, 80, features=False)
    (data / "social.csv").unlink()
    config = tmp_path / "mine.toml"
    # Execute
    init = fedsocial(tmp_path, "init", "--data", str(data), "--out", str(config))
    fedsocial(tmp_path, "train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-progress")
    # Assert: the missing graph is said once, a random partition is written, the model trains
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert init.stdout.count("no social.csv") == 1
    assert tomllib.loads(config.read_text(encoding="utf-8"))["partition"]["method"] == "random"
    assert doc["dataset"]["users"] == 60 and 0.0 < doc["ndcg@10"] <= 1.0


# --- tracking ---------------------------------------------------------------------------------------


def test_train_track_tensorboard_reads_back(tmp_path: Path) -> None:
    # Prepare
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedsocial.shared.config import load_config as load
    from fedsocial.simulations.train import run_train

    data = _dataset(tmp_path / "data", 60, 80, features=False)
    fedsocial(tmp_path, "init", "--data", str(data), "--out", str(tmp_path / "c.toml"))
    cfg = load(tmp_path / "c.toml", ["train.epochs=3", "train.device=cpu"])
    # Execute
    doc = run_train(cfg, None, tmp_path / "run", progress=False, track="tensorboard")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    # Assert: per-epoch loss and timings, the final test metrics equal metrics.json, the config text
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert len(acc.Scalars("time/epoch_s")) == 3
    assert acc.Scalars("test/ndcg@10")[-1].value == pytest.approx(doc["ndcg@10"], rel=1e-6)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"num_negatives"' in text and "config/text_summary" in tags["tensors"]


def test_flower_deprecation_filter_is_narrow() -> None:
    # Prepare
    import logging

    filt = RunSimulationDeprecationFilter()

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("flwr", logging.WARNING, __file__, 1, msg, None, None)

    # Execute / Assert: only the run_simulation banner is dropped
    assert not filt.filter(record("DEPRECATED FEATURE: The `run_simulation` function is deprecated and will be"))
    assert filt.filter(record("DEPRECATED FEATURE: something else"))
    assert filt.filter(record("Connection lost"))


@pytest.mark.slow
def test_demo_commands_print_no_warning_and_track_per_partner_epsilon(tmp_path: Path) -> None:
    # Prepare: `make demo`'s three commands on a tiny copy of configs/demo.toml
    tiny = ["--set", "data.n_users=60", "--set", "data.n_items=80", "--set", "federation.rounds=2",
            "--set", "federation.local_epochs=1", "--set", "privacy.epochs=2", "--set", "train.epochs=2",
            "--set", "train.num_threads=1"]
    run = tmp_path / "demo"
    # Execute
    outputs = [
        fedsocial(tmp_path, "simulate", "--config", "configs/demo.toml", "--out", str(run), "--track",
                  "tensorboard", *tiny, timeout=400).stdout,
        fedsocial(tmp_path, "canary-audit", "--config", "configs/demo.toml", "--canaries", "20",
                  "--canary-items", "3", "--out", str(run), *tiny, timeout=400).stdout,
        fedsocial(tmp_path, "audit", str(run)).stdout,
    ]
    # Assert: no Warning / DEPRECATED line anywhere; the tracked run holds each partner's epsilon per round
    assert [line for out in outputs for line in warning_lines(out)] == []
    assert (run / "canary_record.json").is_file() and "canary_audit.json: verified" in outputs[2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    doc = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    for pid, info in doc["partners"].items():
        eps = acc.Scalars(f"privacy/epsilon/{pid}")
        assert [e.step for e in eps] == [1, 2] and eps[-1].value == pytest.approx(info["epsilon"], rel=1e-6)
    assert {"time/round_s", "test/ndcg@10", "privacy/epsilon_max"} <= set(scalars)
    from fedsocial.simulations.tracking import compute_round_scalars

    records = [json.loads(line) for line in (run / "rounds.jsonl").read_text(encoding="utf-8").splitlines()]
    for rec in records:  # every number of every round record is in the tracked run, at its round
        for tag, value in compute_round_scalars(rec).items():
            assert any(e.step == rec["round"] and e.value == pytest.approx(value, rel=1e-6)
                       for e in acc.Scalars(tag)), tag


def test_dp_on_a_non_private_config_says_exactly_which_keys_to_change(tmp_path: Path) -> None:
    # Prepare
    from fedsocial.simulations.init_cmd import compute_dp_advice, dp_advice_line

    data = _dataset(tmp_path / "data", 60, 80, features=False)
    fedsocial(tmp_path, "init", "--data", str(data), "--out", str(tmp_path / "c.toml"))
    # Execute
    plain = load_config(tmp_path / "c.toml")
    dp_on = load_config(tmp_path / "c.toml", ["privacy.enabled=true"])
    advice = compute_dp_advice(dp_on)
    fixed = load_config(tmp_path / "c.toml", ["privacy.enabled=true", *advice])
    # Assert: nothing to say without DP or once the advice is applied; the line names each key
    assert compute_dp_advice(plain) == [] and compute_dp_advice(fixed) == []
    assert advice == ["model.user_embedding=local", "model.use_mlp=false"]
    line = dp_advice_line(dp_on)
    assert line is not None and "--set model.user_embedding=local --set model.use_mlp=false" in line
    assert not WARNING_LINE.search(line)


def test_mostpop_shows_no_epoch_bar_and_the_social_model_does(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    from fedsocial.simulations.train import run_train

    small = ["data.n_users=60", "data.n_items=80", "privacy.enabled=false", "train.epochs=2", "model.dim=8",
             "train.num_threads=1"]
    # Execute
    run_train(load_config(REPO / "configs" / "demo.toml", [*small, "model.name=mostpop"]), None, tmp_path / "pop",
              progress=True)
    pop = capsys.readouterr().err
    run_train(load_config(REPO / "configs" / "demo.toml", small), None, tmp_path / "social", progress=True)
    social = capsys.readouterr().err
    # Assert: MostPop trains nothing, so no "0/2 epochs" bar; the trained model shows its epochs
    assert "epochs" not in pop and "0/2" not in pop
    assert "epochs" in social and "2/2" in social
