"""`fedsocial init` on data a newcomer brings: regressions of a red-team pass (each case wrote a config that
failed later, or said something about the data that was not true)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedsocial.simulations.common import EXIT_USER_ERROR
from fedsocial.simulations.init_cmd import main


def _interactions(folder: Path, per_user: int, users: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"u{u},i{(u + k) % 9}" for u in range(users) for k in range(per_user)]
    (folder / "interactions.csv").write_text("user,item\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (folder / "social.csv").write_text("user,neighbour\n" + "\n".join(f"u{u},u{(u + 1) % users}"
                                                                      for u in range(users)) + "\n",
                                       encoding="utf-8")
    return folder


def test_data_with_no_user_to_evaluate_is_refused_by_init_not_by_the_first_train(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: every user with 2 interactions (a user needs 3 to be split into train / validation / test)
    data = _interactions(tmp_path / "data", per_user=2)
    # Execute
    code = main(["--data", str(data), "--out", str(tmp_path / "mine.toml")])
    # Assert: one line naming the folder and the rule, no config written
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert f"{data}: no user has a test interaction" in err and "split.min_interactions = 3" in err
    assert not (tmp_path / "mine.toml").exists()


def test_a_users_csv_without_values_does_not_turn_user_features_on(tmp_path: Path) -> None:
    # Prepare: a users.csv with a feature column that no user fills
    data = _interactions(tmp_path / "data", per_user=4)
    (data / "users.csv").write_text("user,tier\n" + "".join(f"u{u},\n" for u in range(12)), encoding="utf-8")
    # Execute
    assert main(["--data", str(data), "--out", str(tmp_path / "mine.toml")]) == 0
    # Assert
    text = (tmp_path / "mine.toml").read_text(encoding="utf-8")
    assert tomllib.loads(text)["model"]["use_user_features"] is False
    assert "no users.csv feature column with a value" in text


def test_the_written_comments_say_what_the_settings_do(tmp_path: Path) -> None:
    # Prepare: 12 users, so the DP batch of at least 16 covers every user
    data = _interactions(tmp_path / "data", per_user=4)
    # Execute
    assert main(["--data", str(data), "--out", str(tmp_path / "plain.toml")]) == 0
    assert main(["--data", str(data), "--out", str(tmp_path / "dp.toml"), "--private", "--partners", "2"]) == 0
    # Assert: the patience comment names its own number of epochs; the DP sample rate is 1, not 16 / 12
    plain, dp = ((tmp_path / f).read_text(encoding="utf-8") for f in ("plain.toml", "dp.toml"))
    patience = tomllib.loads(plain)["train"]["patience"]
    assert f"early stopping after {patience} epochs without a better validation NDCG@10" in plain
    assert "DP: sample rate 1: every user, every step" in dp and "16/12" not in dp


def test_recommend_on_a_centralized_train_run_says_it_needs_a_federated_one(tmp_path: Path) -> None:
    # Regression (red team): "--partner partner-0: no folder ... (partners of this run: )" for a train run
    # Prepare: a folder shaped like a `fedsocial train` run (a config, no partners/)
    from fedsocial.shared.config import ConfigError
    from fedsocial.simulations.recommend import resolve_source

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("", encoding="utf-8")
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"not a federated run \(no partners/ folder\): recommend serves a partner"):
        resolve_source(run, "partner-0")
