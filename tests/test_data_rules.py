"""The documented data rules of every loader, item / user features of the generic CSV format, and
tests/test_fuzz_csv.py fuzzes the loaders (a clear DataError naming file and line, or a correct result)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

from fedsocial.shared.config import DataConfig
from fedsocial.shared.data import DataError
from fedsocial.shared.features import compute_codes, compute_price_bins, compute_text_features
from fedsocial.shared.loaders import load_csv, load_dataset, load_filmtrust, load_lastfm, read_numeric_table

INTER = "user,item\na,x\nb,y\nc,x\n"
SOCIAL_WITH_GHOSTS = "user,neighbour\na,b\nghost,a\nb,c\na,nobody\nspook,ghost\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def csv_folder(tmp: Path, inter: str = INTER, social: str = "user,neighbour\na,b\n") -> Path:
    write(tmp / "interactions.csv", inter)
    write(tmp / "social.csv", social)
    return tmp


# --- social edges to users without interactions: dropped with one counting notice, or refused -----


def test_csv_edges_to_users_without_interactions_dropped_with_one_counting_notice(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    folder = csv_folder(tmp_path, social=SOCIAL_WITH_GHOSTS)
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedsocial.data"):
        ds = load_csv(folder)
    # Assert: the two clean edges a->b, b->c survive; one notice counts the 3 others with their lines
    pairs = {(str(ds.user_ids[s]), str(ds.user_ids[d])) for s, d in zip(ds.social_src, ds.social_dst, strict=True)}
    assert pairs == {("a", "b"), ("b", "c")}
    notices = [r.getMessage() for r in caplog.records if r.name == "fedsocial.data"]
    assert len(notices) == 1
    assert "social.csv: dropped 3 social edge(s)" in notices[0] and "lines 3, 5, 6" in notices[0]


def test_a_csv_data_set_without_social_csv_loads_with_no_ties_and_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: interactions only (many public data sets have no social graph)
    write(tmp_path / "interactions.csv", INTER)
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedsocial.data"):
        ds = load_csv(tmp_path)
    # Assert: every user and interaction kept, no edge, one warning naming the folder
    assert ds.n_users == 3 and ds.n_interactions == 3 and ds.n_edges == 0
    notices = [r.getMessage() for r in caplog.records if r.name == "fedsocial.data"]
    assert len(notices) == 1 and "no social.csv" in notices[0] and str(tmp_path) in notices[0]


def test_a_social_csv_that_is_a_folder_or_unreadable_is_still_an_error(tmp_path: Path) -> None:
    # Prepare: social.csv present but not a file: not silently read as "no ties"
    write(tmp_path / "interactions.csv", INTER)
    (tmp_path / "social.csv").mkdir()
    # Execute / Assert
    with pytest.raises((DataError, IsADirectoryError)):
        load_csv(tmp_path)


def test_column_names_of_public_data_sets_read_as_the_generic_ones(tmp_path: Path) -> None:
    # Prepare: MovieLens-style interactions, Epinions-style trust, mixed case and spaces
    write(tmp_path / "interactions.csv", "userId, movieId ,Rating,timestamp\n1,31,2.5,1260759144\n2,31,4,1\n"
                                         "2,7,3,2\n")
    write(tmp_path / "social.csv", "truster,trustee\n1,2\n")
    # Execute
    ds = load_csv(tmp_path)
    # Assert
    assert (ds.n_users, ds.n_items, ds.n_interactions, ds.n_edges) == (2, 2, 3, 1)
    assert (str(ds.user_ids[ds.social_src[0]]), str(ds.user_ids[ds.social_dst[0]])) == ("1", "2")


@pytest.mark.parametrize(("header", "needle"), [
    ("user,userId,item", "repeated column"),  # two names for one column
    ("user,item,stars", "unknown column 'stars'"),  # not an alias: still named
])
def test_an_ambiguous_or_unknown_header_is_still_refused(tmp_path: Path, header: str, needle: str) -> None:
    # Prepare
    write(tmp_path / "interactions.csv", f"{header}\n" + ",".join(["1"] * len(header.split(","))) + "\n")
    write(tmp_path / "social.csv", "user,neighbour\n")
    # Execute / Assert
    with pytest.raises(DataError, match=needle):
        load_csv(tmp_path)


def test_an_alias_applies_only_to_the_files_own_columns() -> None:
    # Prepare / Execute / Assert: in users.csv (only 'user' is known) a 'name' or 'rating' column keeps its name
    from fedsocial.shared.loaders import compute_canonical_header

    assert compute_canonical_header(["UserID", "name", "rating"], ("user",)) == ["user", "name", "rating"]
    assert compute_canonical_header(["item", "Name", "genre"], ("item", "category", "title")) == \
        ["item", "title", "category"]


def test_csv_strict_refuses_and_lists_every_line(tmp_path: Path) -> None:
    # Prepare
    folder = csv_folder(tmp_path, social=SOCIAL_WITH_GHOSTS)
    # Execute / Assert
    with pytest.raises(DataError, match=r"social.csv: 3 social row\(s\) .*lines: 3, 5, 6$"):
        load_csv(folder, strict=True)


def test_strict_reaches_the_loader_through_the_config(tmp_path: Path) -> None:
    # Prepare
    csv_folder(tmp_path / "d", social=SOCIAL_WITH_GHOSTS)
    # Execute / Assert
    assert load_dataset(DataConfig(format="csv", path="d"), tmp_path).n_edges == 2
    with pytest.raises(DataError, match="data.strict"):
        load_dataset(DataConfig(format="csv", path="d", strict=True), tmp_path)


def test_research_loaders_follow_the_same_rule(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: LastFM (header, undirected) and FilmTrust (no header, directed) with one ghost edge each
    write(tmp_path / "lfm" / "user_artists.dat", "userID\tartistID\tweight\n1\t10\t5\n2\t11\t3\n")
    write(tmp_path / "lfm" / "user_friends.dat", "userID\tfriendID\n1\t2\n1\t99\n")
    write(tmp_path / "ft" / "ratings.txt", "1 10 4\n2 11 3\n")
    write(tmp_path / "ft" / "trust.txt", "1 2 1\n\n77 1 1\n")
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedsocial.data"):
        lfm, ft = load_lastfm(tmp_path / "lfm"), load_filmtrust(tmp_path / "ft")
    # Assert: kept edges as before; the notices name the right lines (FilmTrust's blank line counts)
    assert lfm.n_edges == 2 and ft.n_edges == 1
    notices = [r.getMessage() for r in caplog.records if r.name == "fedsocial.data"]
    assert any("user_friends.dat: dropped 1" in m and "(line 3)" in m for m in notices)
    assert any("trust.txt: dropped 1" in m and "(line 3)" in m for m in notices)
    with pytest.raises(DataError, match=r"trust.txt: 1 social row.*lines: 3$"):
        load_filmtrust(tmp_path / "ft", strict=True)


# --- rows that do not parse cleanly are refused with file:line ------------------------------------


@pytest.mark.parametrize(
    ("inter", "needle"),
    [
        ("user,item\na,x\nb,y\u2028z\n", "interactions.csv:3: line separator U+2028 inside a row"),
        ("user,item\na,x\u2029\nb,y\n", "interactions.csv:2: line separator U+2029"),
        ("user,item\na,x\x85\n", "interactions.csv:2: line separator U+0085"),
        ("user,item\na,x\x0cb,y\n", "interactions.csv:2: line separator U+000C"),
        ("user,item\na,x\nuser,item\nb,y\n", "interactions.csv:3: the header line is repeated (first on line 1)"),
        ("user,item\na,x\n USER , Item \n", "interactions.csv:3: the header line is repeated"),
        ("user,item\na,x\nb;c,y\n", "interactions.csv:3: stray semicolon separator in user id 'b;c'"),
        ("user,item\na,x\tq\n", "interactions.csv:2: stray tab separator in item id"),
        ('user,item\na,"x|y"\n', "interactions.csv:2: stray pipe separator in item id"),
        ("user,item\na,x\rb,y\nc,z\n", "interactions.csv:2: a carriage return inside a row"),
        ("user,item\na,x,\n", "interactions.csv:2: expected 2 fields (user,item), found 3"),
    ],
)
def test_csv_rows_that_do_not_parse_cleanly_are_refused_with_file_and_line(
        tmp_path: Path, inter: str, needle: str) -> None:
    # Prepare
    folder = csv_folder(tmp_path, inter=inter)
    # Execute / Assert
    with pytest.raises(DataError) as err:
        load_csv(folder)
    assert needle in str(err.value)


def test_crlf_and_old_mac_line_endings_read_as_lines(tmp_path: Path) -> None:
    # Prepare
    a = csv_folder(tmp_path / "crlf", inter="user,item\r\na,x\r\nb,y\r\n", social="user,neighbour\r\na,b\r\n")
    b = csv_folder(tmp_path / "cr", inter="user,item\ra,x\rb,y\r", social="user,neighbour\ra,b\r")
    # Execute
    ds_a, ds_b = load_csv(a), load_csv(b)
    # Assert
    for ds in (ds_a, ds_b):
        assert (ds.n_users, ds.n_items, ds.n_interactions, ds.n_edges) == (2, 2, 2, 1)


def test_numeric_tables_refuse_unicode_separators_with_the_editor_line(tmp_path: Path) -> None:
    # Prepare
    path = write(tmp_path / "ratings.txt", "1 2 3\n4 5 6\u2028 7 8 9\n")
    # Execute / Assert
    with pytest.raises(DataError, match=r"ratings.txt:2: line separator U\+2028"):
        read_numeric_table(path, 3)


# --- item and user features ------------------------------------------------------------------------


def test_items_csv_names_prices_and_texts_become_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv("FEDSOCIAL_CACHE_DIR", str(tmp_path / "cache"))
    folder = csv_folder(tmp_path / "d")
    write(folder / "items.csv", 'item,category,title,price\nx,shoes,"red running shoes",10\n'
                                "y,books,chocolate cake recipes,\nz,shoes,blue running shoes,30\n")
    # Execute
    ds = load_csv(folder, price_bins=2, text_dim=4)
    again = load_csv(folder, price_bins=2, text_dim=4)
    # Assert: items sorted x, y, z; category names coded books=0, shoes=1; y has no price (code 2)
    assert ds.item_ids.tolist() == ["x", "y", "z"]
    assert ds.item_category.tolist() == [1, 0, 1]
    assert ds.item_price_bin.tolist() == [0, 2, 1]
    assert ds.item_text.shape == (3, 4) and ds.item_text.dtype == np.float32
    cos = ds.item_text @ ds.item_text.T / np.outer(*[np.linalg.norm(ds.item_text, axis=1)] * 2)
    assert cos[0, 2] > 0.4 and abs(cos[0, 1]) < 1e-5  # the two shoes are alike (TF-IDF cosine), the book is not
    cached = list((tmp_path / "cache" / "text").glob("*.npy"))
    assert len(cached) == 1 and np.array_equal(again.item_text, ds.item_text)


def test_items_csv_without_category_keeps_no_category(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv("FEDSOCIAL_CACHE_DIR", str(tmp_path / "cache"))
    folder = csv_folder(tmp_path / "d")
    write(folder / "items.csv", "item,price\nx,1.5\ny,2\nw,3\n")
    # Execute
    ds = load_csv(folder, price_bins=3)
    # Assert: the catalogue item w without interactions is kept; no category, no text
    assert ds.item_ids.tolist() == ["w", "x", "y"] and ds.n_items == 3
    assert ds.item_category is None and ds.item_text is None
    assert ds.item_price_bin.tolist() == [2, 0, 1]


def test_users_csv_columns_become_local_categorical_codes(tmp_path: Path) -> None:
    # Prepare: c has no age band, d has no interactions (ignored), a gender column is partly empty
    folder = csv_folder(tmp_path)
    write(folder / "users.csv", "user,age_band,gender\na,18-24,f\nb,25-34,\nc,,m\nd,65+,f\n")
    # Execute
    ds = load_csv(folder)
    # Assert: codes per column are 1 + rank of the value, 0 missing
    assert ds.user_feature_names == ("age_band", "gender")
    assert ds.user_ids.tolist() == ["a", "b", "c"]
    assert ds.user_features.tolist() == [[1, 1], [2, 0], [0, 2]]
    assert ds.user_feature_sizes == (4, 3)  # codes over every row (d's 65+ too), so partners agree on sizes


@pytest.mark.parametrize(
    ("users", "needle"),
    [
        ("user,age\na,1\na,2\n", "users.csv:3: user 'a' listed twice (first on line 2)"),
        ("user,7\na,1\n", "users.csv:1: unknown column '7'"),
        ("user,age\na\n", "users.csv:2: expected 2 fields"),
    ],
)
def test_bad_users_csv_names_file_and_line(tmp_path: Path, users: str, needle: str) -> None:
    # Prepare
    folder = csv_folder(tmp_path)
    write(folder / "users.csv", users)
    # Execute / Assert
    with pytest.raises(DataError) as err:
        load_csv(folder)
    assert needle in str(err.value)


def test_price_bins_known_values() -> None:
    # Prepare / Execute
    bins = compute_price_bins(np.array([1, 2, 3, 4, np.nan, 100.0]), 3)
    # Assert: edges at the 1/3 and 2/3 quantiles of the known prices (2.33, 3.67); NaN gets code 3
    assert bins.tolist() == [0, 0, 1, 2, 3, 2]


def test_codes_keep_integer_category_ids_and_rank_names() -> None:
    assert compute_codes(np.array(["3", "10", "3"]))[0].tolist() == [3, 10, 3]
    assert compute_codes(np.array(["b", "a", "b"]))[0].tolist() == [1, 0, 1]


def test_huge_integer_category_codes_are_ranked_and_named_not_used_as_table_rows() -> None:
    # Regression (adversarial review): a code of 10**18 sized a category table of 10**18 rows (a traceback)
    big = str(10**18)
    codes, names = compute_codes(np.array([big, "65535", big]))
    assert codes.tolist() == [0, 1, 0] and names == (big, "65535")  # sorted as text
    assert compute_codes(np.array(["65535", "7"]))[0].tolist() == [65535, 7]  # small codes still name themselves


@pytest.mark.parametrize(("bad", "char"), [("a\x1bz", "U+001B"), ("a\x7f", "U+007F"), ("a\x9b", "U+009B"),
                                           ("\u200b1", "U+200B"), ("x\ufeffy", "U+FEFF"), ("\u2060a", "U+2060")])
def test_an_id_with_a_control_or_invisible_character_is_refused_with_its_line(tmp_path: Path, bad: str,
                                                                               char: str) -> None:
    # Regression (adversarial review): the loader accepted ids that events then refused, and "\u200b1" was a
    # second user who looks like "1"
    folder = csv_folder(tmp_path, inter=f"user,item\na,x\n{bad},y\n")
    with pytest.raises(DataError, match=rf"interactions.csv:3: user id .* holds the character {re.escape(char)}"):
        load_csv(folder)


def test_a_nul_anywhere_and_an_overlong_id_are_refused(tmp_path: Path) -> None:
    # Regression: numpy's text arrays dropped a trailing NUL, merging "0\x00" into the user "0"
    with pytest.raises(DataError, match=r"interactions.csv:3: a NUL character"):
        load_csv(csv_folder(tmp_path / "nul", inter="user,item\n0,x\n0\x00,y\n"))
    with pytest.raises(DataError, match=r"interactions.csv:2: a item id of 1025 characters \(at most 1024\)"):
        load_csv(csv_folder(tmp_path / "long", inter=f"user,item\na,{'i' * 1025}\nb,x\n"))


def test_text_features_deterministic_and_zero_for_empty_text() -> None:
    # Prepare
    texts = ["wireless mouse", "wireless keyboard", "", "garden hose", "garden chair"]
    # Execute
    a, b = compute_text_features(texts, 3), compute_text_features(list(texts), 3)
    # Assert
    assert np.array_equal(a, b)
    assert not a[2].any()


def test_text_features_equal_the_exact_truncated_svd_when_the_sketch_spans_the_catalogue() -> None:
    # Prepare: 12 texts, so the randomised sketch (dim + 10 columns) spans the whole row space
    from fedsocial.shared.features import compute_tfidf

    texts = ["red running shoes", "blue running shoes", "trail running shoes", "chocolate cake", "lemon cake",
             "cake recipes book", "garden hose", "garden chair", "office chair", "desk lamp", "red lamp", ""]
    x = compute_tfidf(texts)
    dense = x[:, np.unique(x.indices)].toarray()
    u, s, _ = np.linalg.svd(dense, full_matrices=False)
    # Execute
    feats = compute_text_features(texts, 4)
    # Assert: column norms are the top singular values and the span is the top singular subspace
    assert np.allclose(np.linalg.norm(feats, axis=0), s[:4], atol=1e-5)
    proj = u[:, :4] @ (u[:, :4].T @ feats)
    assert np.allclose(proj, feats, atol=1e-5)


@pytest.mark.parametrize("name", ["items.csv", "users.csv", "interactions.csv"])
def test_a_folder_where_a_data_file_belongs_is_named_not_ignored(tmp_path: Path, name: str) -> None:
    # Regression (adversarial review): an items.csv folder was silently ignored, an interactions.csv folder
    # reported as "no such file"
    folder = csv_folder(tmp_path)
    target = folder / name
    if target.exists():
        target.unlink()
    target.mkdir()
    with pytest.raises(DataError, match=rf"{re.escape(name)}: a folder, not a file"):
        load_csv(folder)
