"""Config loading: typed overrides, unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsocial.shared.config import Config, ConfigError, load_config, parse_override, resolve_data_dir

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_frozen() -> None:
    # Execute
    cfg = load_config(None)
    # Assert
    assert cfg == Config()
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.toml")))
def test_every_shipped_config_loads(name: str) -> None:
    # Execute / Assert: no ConfigError
    cfg = load_config(REPO / "configs" / name)
    assert cfg.data.format in ("synthetic", "filmtrust", "lastfm", "douban", "ciao", "csv")


def test_set_overrides_are_typed(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "c.toml"
    path.write_text('[train]\nlr = 0.01\n[privacy]\nenabled = false\n')
    # Execute
    cfg = load_config(path, ["privacy.enabled=true", "train.lr=5e-4", "train.device=cuda:1",
                             "federation.rounds=7", "privacy.max_epsilon=2"])
    # Assert
    assert cfg.privacy.enabled is True
    assert cfg.train.lr == 5e-4
    assert cfg.train.device == "cuda:1"
    assert cfg.federation.rounds == 7
    assert isinstance(cfg.privacy.max_epsilon, float) and cfg.privacy.max_epsilon == 2.0


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.nope=1", "train.nope"),
        ("nosection.key=1", "nosection"),
        ("privacy.enabled=1", "privacy.enabled"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.lr=fast", "train.lr"),
        ("model.loss=hinge", "model.loss"),
        ("model.bias_scale=0", "model.bias_scale"),
        ("train.device=tpu", "train.device"),
        ("trainlr", "expected section.key=value"),
    ],
)
def test_bad_override_names_the_key(override: str, needle: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "bad.toml"
    path.write_text("[model]\ndim = 32\nwidth = 3\n")
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"bad\.toml.*model\.width"):
        load_config(path)


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "broken.toml"
    path.write_text("[model\n")
    # Execute / Assert
    with pytest.raises(ConfigError, match="broken.toml"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")


def test_cross_field_validation() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="federation.min_partners"):
        load_config(None, ["federation.partners=2", "federation.min_partners=3"])
    with pytest.raises(ConfigError, match="split"):
        load_config(None, ["split.train=0.9"])
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, ["data.format=lastfm"])


def test_parse_override_reads_toml_values_and_bare_words() -> None:
    assert parse_override("a.b=3") == ("a", "b", 3)
    assert parse_override("a.b = true") == ("a", "b", True)
    assert parse_override('a.b="x y"') == ("a", "b", "x y")
    assert parse_override("a.b=cpu") == ("a", "b", "cpu")


def test_data_dir_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSOCIAL_DATA_DIR", raising=False)
    assert resolve_data_dir(None) == Path("data")
    monkeypatch.setenv("FEDSOCIAL_DATA_DIR", "/tmp/x")
    assert resolve_data_dir(None) == Path("/tmp/x")
    assert resolve_data_dir("given") == Path("given")


@pytest.mark.parametrize("scope", ["joint", "partner"])
def test_privacy_scope_accepts_the_two_scopes(scope: str) -> None:
    # Execute
    cfg = load_config(None, [f"privacy.scope={scope}"])
    # Assert
    assert cfg.privacy.scope == scope


def test_privacy_scope_defaults_to_joint_and_refuses_others() -> None:
    # Execute / Assert
    assert load_config(None).privacy.scope == "joint"
    with pytest.raises(ConfigError, match="privacy.scope"):
        load_config(None, ["privacy.scope=central"])
