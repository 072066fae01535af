"""Atomic writes: complete files with the requested permissions, nothing left behind on failure."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest

from fedsocial.shared.fileio import read_json_object, save_npz_atomic, write_atomic, write_json_atomic


def test_json_written_whole_and_readable_by_others(tmp_path: Path) -> None:
    # Execute
    write_json_atomic(tmp_path / "a" / "m.json", {"x": np.float32(1.5), "y": np.arange(3)})
    # Assert
    path = tmp_path / "a" / "m.json"
    assert json.loads(path.read_text()) == {"x": 1.5, "y": [0, 1, 2]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_private_npz_is_owner_only(tmp_path: Path) -> None:
    save_npz_atomic(tmp_path / "s.npz", {"u": np.ones((2, 2))}, mode=0o600)
    assert stat.S_IMODE((tmp_path / "s.npz").stat().st_mode) == 0o600
    assert np.load(tmp_path / "s.npz")["u"].sum() == 4


def test_private_json_is_owner_only_from_its_first_moment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: watch the file's mode at the moment it appears (the rename); it used to be 0644 until a chmod after
    import os

    seen: list[int] = []
    rename = os.replace

    def watching(src: str, dst: str) -> None:
        seen.append(stat.S_IMODE(os.stat(src).st_mode))
        rename(src, dst)

    monkeypatch.setattr(os, "replace", watching)
    # Execute
    write_json_atomic(tmp_path / "e" / "round_0001.json", {"ndcg@10": 0.5}, mode=0o600)
    # Assert
    assert seen == [0o600]
    assert stat.S_IMODE((tmp_path / "e" / "round_0001.json").stat().st_mode) == 0o600


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", "7", "[" * 100000])
def test_read_json_object_is_none_for_anything_but_an_object(tmp_path: Path, text: str) -> None:
    (tmp_path / "x.json").write_text(text)
    assert read_json_object(tmp_path / "x.json") is None
    assert read_json_object(tmp_path / "missing.json") is None
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json_object(tmp_path / "ok.json") == {"a": 1}


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "m.json"
    write_json_atomic(path, {"v": 1})

    def boom(fh: object) -> None:
        raise RuntimeError("disk full")

    # Execute
    with pytest.raises(RuntimeError):
        write_atomic(path, boom)
    # Assert
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def _strict_loads(text: str) -> object:
    """json.loads that refuses NaN / Infinity, as RFC 8259 (and JavaScript's JSON.parse) do."""
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_strict_json_writes_null_for_every_non_finite_number() -> None:
    # Prepare
    import math

    import numpy as np

    from fedsocial.shared.fileio import compute_strict_json, dumps_strict

    doc = {"a": math.nan, "b": [1.5, math.inf, -math.inf], "c": np.float32("nan"), "d": np.array([0.5, np.nan]),
           "e": {"f": np.int64(3), "g": "NaN", "h": True}}
    # Execute
    safe = compute_strict_json(doc)
    text = dumps_strict(doc, indent=2)
    # Assert: known values; the text parses strictly; strings and booleans untouched
    assert safe == {"a": None, "b": [1.5, None, None], "c": None, "d": [0.5, None],
                    "e": {"f": 3, "g": "NaN", "h": True}}
    assert _strict_loads(text) == safe


def test_published_metrics_and_round_records_are_strict_json(tmp_path: Path) -> None:
    # Prepare: what a DP run without an evaluation release publishes (no metric: NaN in memory)
    import math

    from fedsocial.server.checkpoint import append_jsonl, rewrite_jsonl
    from fedsocial.shared.privacy.records import encode_metrics
    from fedsocial.simulations.report import render_report

    record = {"round": 1, "ndcg@10": math.nan, "epsilon_max": 7.99}
    doc = {"ndcg@10": math.nan, "epsilon": 7.99, "delta": 1e-5, "rounds": [record]}
    # Execute
    metrics = encode_metrics(doc).decode("utf-8")
    append_jsonl(tmp_path / "rounds.jsonl", doc["rounds"][0])
    rewrite_jsonl(tmp_path / "again.jsonl", doc["rounds"])
    # Assert: null where nothing was published; the report reads the file back and says n/a
    back = _strict_loads(metrics)
    assert isinstance(back, dict) and back["ndcg@10"] is None and back["epsilon"] == 7.99
    for name in ("rounds.jsonl", "again.jsonl"):
        want = {"round": 1, "ndcg@10": None, "epsilon_max": 7.99}
        assert _strict_loads((tmp_path / name).read_text().strip()) == want
    html = render_report(back)
    assert "n/a" in html and "None" not in html
