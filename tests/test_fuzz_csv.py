"""Issue 11 item 8, the data loaders: hypothesis fuzzing of the generic CSV format (interactions, social,
items.csv, users.csv) and of the research releases' whitespace tables: a DataError naming the file
(and line), or a Dataset that matches a brute-force reading of the same rows; never another exception.

Budget: ``FEDSOCIAL_FUZZ_PROFILE`` (``fedsocial-test`` by default, ``fedsocial-fuzz`` under ``make fuzz``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsocial.shared.data import DataError
from fedsocial.shared.loaders import load_csv, load_filmtrust

settings.register_profile("fedsocial-test", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("fedsocial-fuzz", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROFILE = settings.get_profile(os.environ.get("FEDSOCIAL_FUZZ_PROFILE", "fedsocial-test"))

# the format's own characters and the ones that break naive readers: separators, quotes, line breaks
# of every kind, a BOM, header words
_ALPHABET = st.sampled_from(list("ab1,;\t|\"' \n\r\u2028\u2029\x85\x0c\ufeffxy-.0e") +
                            ["user", "item", "neighbour", "category", "price", "title", "nan", "inf"])
_TEXT = st.lists(_ALPHABET, max_size=40).map("".join)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


@PROFILE
@given(inter=_TEXT, social=_TEXT, items=st.one_of(st.none(), _TEXT), users=st.one_of(st.none(), _TEXT),
       header=st.booleans())
def test_fuzz_csv_loader_gives_a_data_error_or_a_dataset(tmp_path_factory: pytest.TempPathFactory, inter: str,
                                                         social: str, items: str | None, users: str | None,
                                                         header: bool) -> None:
    # Prepare: usually a valid header, then random text of the format's alphabet
    folder = tmp_path_factory.mktemp("fuzz")
    write(folder / "interactions.csv", ("user,item\n" if header else "") + inter)
    write(folder / "social.csv", ("user,neighbour\n" if header else "") + social)
    if items is not None:
        write(folder / "items.csv", "item,category,title,price\n" + items)
    if users is not None:
        write(folder / "users.csv", "user,band\n" + users)
    # Execute / Assert: a DataError naming a file of the folder, or a self-consistent Dataset
    try:
        ds = load_csv(folder, text_dim=4)
    except DataError as exc:
        assert any(n in str(exc) for n in ("interactions.csv", "social.csv", "items.csv", "users.csv")), str(exc)
        return
    assert ds.n_interactions >= 1 and ds.users.max() < ds.n_users and ds.items.max() < ds.n_items
    assert ds.n_edges == 0 or (ds.social_src.max() < ds.n_users and ds.social_dst.max() < ds.n_users)
    if ds.item_text is not None:
        assert ds.item_text.shape == (ds.n_items, 4) and np.isfinite(ds.item_text).all()
    if ds.user_features is not None:
        assert ds.user_features.shape[0] == ds.n_users
        assert (ds.user_features < np.asarray(ds.user_feature_sizes)).all()


_IDS = st.text(alphabet=st.sampled_from(list("abcXYZ019_-é ")), min_size=1, max_size=4).map(str.strip).filter(bool)


@PROFILE
@given(rows=st.lists(st.tuples(_IDS, _IDS), min_size=1, max_size=25),
       edges=st.lists(st.tuples(_IDS, _IDS), max_size=25), crlf=st.booleans())
def test_fuzz_well_formed_csv_loads_exactly(tmp_path_factory: pytest.TempPathFactory,
                                            rows: list[tuple[str, str]], edges: list[tuple[str, str]],
                                            crlf: bool) -> None:
    # Prepare: any well-formed file (spaces around fields are stripped; either line ending)
    folder = tmp_path_factory.mktemp("wellformed")
    end = "\r\n" if crlf else "\n"
    write(folder / "interactions.csv", f"user,item{end}" + "".join(f" {u},{i} {end}" for u, i in rows))
    write(folder / "social.csv", f"user,neighbour{end}" + "".join(f"{u},{v}{end}" for u, v in edges))
    # Execute
    ds = load_csv(folder)
    # Assert: against a brute-force reading of the same rows (edges to users without interactions dropped)
    users = {u for u, _ in rows}
    got = {(str(ds.user_ids[u]), str(ds.item_ids[i])) for u, i in zip(ds.users, ds.items, strict=True)}
    assert got == set(rows)
    want_edges = {(u, v) for u, v in edges if u in users and v in users and u != v}
    got_edges = {(str(ds.user_ids[s]), str(ds.user_ids[d])) for s, d in zip(ds.social_src, ds.social_dst,
                                                                             strict=True)}
    assert got_edges == want_edges


_NUMERIC = st.sampled_from(list("0123456789 .\t\n-+e\u2028\x0bx,") + ["1 2 1\n", "nan", "1e400"])


@PROFILE
@given(ratings=st.lists(_NUMERIC, max_size=40).map("".join), trust=st.lists(_NUMERIC, max_size=30).map("".join))
def test_fuzz_research_loader_gives_a_data_error_or_a_dataset(tmp_path_factory: pytest.TempPathFactory,
                                                              ratings: str, trust: str) -> None:
    # Prepare: FilmTrust's layout (three whitespace-separated numbers per line)
    folder = tmp_path_factory.mktemp("ft")
    write(folder / "ratings.txt", ratings)
    write(folder / "trust.txt", trust)
    # Execute / Assert
    try:
        ds = load_filmtrust(folder)
    except DataError as exc:
        assert "ratings.txt" in str(exc) or "trust.txt" in str(exc), str(exc)
        return
    assert ds.n_interactions >= 1 and ds.users.max() < ds.n_users
