"""Loaders: cleaning rules on small hand-made files of every format, and one clear error per bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsocial.shared.config import DataConfig, PartitionConfig, SplitConfig
from fedsocial.shared.csvio import write_csv_dataset
from fedsocial.shared.data import DataError, Dataset
from fedsocial.shared.loaders import clean, load_ciao, load_csv, load_dataset, load_douban, load_filmtrust, load_lastfm
from fedsocial.shared.partition import partition_users, partner_split
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def tolist(a: np.ndarray | None) -> list:
    assert a is not None
    return a.tolist()


def edges(ds) -> set[tuple[int, int]]:
    return set(zip(ds.social_src.tolist(), ds.social_dst.tolist(), strict=True))


def pairs(ds) -> set[tuple[int, int]]:
    return set(zip(ds.users.tolist(), ds.items.tolist(), strict=True))


# ------------------------------------------------------------------------------------- cleaning


def test_clean_merges_duplicates_drops_self_loops_and_unknown_users_and_reindexes() -> None:
    # Prepare: ids with gaps, a duplicate row, a self-loop, an edge to a user without interactions.
    users = np.array([10, 10, 30, 10, 50])
    items = np.array([7, 9, 7, 7, 100])
    src, dst = np.array([10, 30, 30, 10]), np.array([30, 30, 99, 50])
    # Execute
    ds = clean(users, items, src, dst, undirected=False, name="toy")
    # Assert
    assert (ds.n_users, ds.n_items, ds.name) == (3, 3, "toy")
    assert tolist(ds.user_ids) == [10, 30, 50] and tolist(ds.item_ids) == [7, 9, 100]
    assert ds.users.tolist() == [0, 0, 1, 2] and ds.items.tolist() == [0, 1, 0, 2]
    assert edges(ds) == {(0, 1), (0, 2)}


def test_clean_undirected_lists_each_tie_once_in_both_directions() -> None:
    # Prepare: a tie listed once, another listed in both directions already.
    users, items = np.array([1, 2, 3]), np.array([1, 1, 1])
    src, dst = np.array([1, 2, 3]), np.array([2, 1, 1])
    # Execute
    ds = clean(users, items, src, dst, undirected=True, name="u")
    # Assert
    assert edges(ds) == {(0, 1), (1, 0), (0, 2), (2, 0)}
    assert ds.n_edges == 4


def test_clean_item_category_is_the_most_frequent_per_item() -> None:
    # Prepare: item 5 seen under category 2 twice and category 1 once.
    users, items = np.array([1, 2, 3, 1]), np.array([5, 5, 5, 6])
    cats = np.array([2, 1, 2, 4])
    # Execute
    ds = clean(users, items, np.zeros(0, int), np.zeros(0, int), undirected=False, name="c", categories=cats)
    # Assert
    assert tolist(ds.item_category) == [2, 4]


# ------------------------------------------------------------------------------ research formats


def test_load_lastfm_binarises_play_counts_and_symmetrises(tmp_path: Path) -> None:
    # Prepare
    write(tmp_path / "user_artists.dat", "userID\tartistID\tweight\n2\t51\t13883\n2\t52\t1\n4\t51\t7\n")
    write(tmp_path / "user_friends.dat", "userID\tfriendID\n2\t4\n4\t2\n2\t9\n")
    # Execute
    ds = load_lastfm(tmp_path)
    # Assert: user 9 has no interactions so its edge goes; the tie appears once per direction.
    assert (ds.n_users, ds.n_items, ds.n_interactions, ds.name) == (2, 2, 3, "lastfm")
    assert edges(ds) == {(0, 1), (1, 0)}


def test_load_filmtrust_is_directed_and_merges_duplicate_rows(tmp_path: Path) -> None:
    # Prepare
    write(tmp_path / "ratings.txt", "1 1 2\n1 2 4\n1 1 3.5\n3 2 0.5\n")
    write(tmp_path / "trust.txt", "1 3 1\n3 3 1\n")
    # Execute
    ds = load_filmtrust(tmp_path)
    # Assert
    assert ds.n_interactions == 3
    assert edges(ds) == {(0, 1)}


def test_load_douban_reads_derived_tsv_and_drops_self_loops(tmp_path: Path) -> None:
    # Prepare
    write(tmp_path / "derived" / "ratings.tsv", "0\t22\t4\t0\n1\t22\t2\t1\n2\t5\t1\t0\n")
    write(tmp_path / "derived" / "social_W_users_nonzeros.tsv", "0\t1\n1\t0\n2\t2\n")
    # Execute
    ds = load_douban(tmp_path)
    # Assert
    assert (ds.n_users, ds.n_items, ds.name) == (3, 2, "douban")
    assert edges(ds) == {(0, 1), (1, 0)}


def test_load_ciao_keeps_categories_and_direction(tmp_path: Path) -> None:
    # Prepare
    write(tmp_path / "derived" / "rating.tsv", "1\t1\t3\t4\t1\n1\t1\t3\t5\t1\n2\t8\t7\t0\t2\n")
    write(tmp_path / "derived" / "trustnetwork.tsv", "1\t2\n")
    # Execute
    ds = load_ciao(tmp_path)
    # Assert
    assert ds.n_interactions == 2 and tolist(ds.item_category) == [3, 7]
    assert edges(ds) == {(0, 1)}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty file"),
        ("1 1 2\n1 x 4\n", ":2: column 2 is not a finite number: 'x'"),
        ("1 1 2\n1 2\n", ":2: expected 3 whitespace-separated columns, found 2"),
        ("1 1 2\n1 2.5 3\n", "item must be an integer id"),
        ("1 1 2\n1 2 nan\n", ":2: column 3 is not a finite number"),
    ],
)
def test_line_oriented_reader_names_file_line_and_problem(tmp_path: Path, text: str, needle: str) -> None:
    # Prepare
    write(tmp_path / "ratings.txt", text)
    write(tmp_path / "trust.txt", "1 1 1\n")
    # Execute / Assert
    with pytest.raises(DataError) as err:
        load_filmtrust(tmp_path)
    assert needle in str(err.value) and "ratings.txt" in str(err.value)


def test_line_oriented_reader_accepts_crlf_blank_lines_and_a_missing_header(tmp_path: Path) -> None:
    # Prepare: Windows line ends, blank lines, and LastFM files without their header lines.
    (tmp_path / "user_artists.dat").write_bytes(b"2\t51\t13883\r\n\r\n2\t52\t1\r\n4\t51\t7\r\n\r\n")
    (tmp_path / "user_friends.dat").write_bytes(b"2\t4\r\n")
    # Execute
    ds = load_lastfm(tmp_path)
    # Assert
    assert (ds.n_users, ds.n_items, ds.n_interactions, ds.n_edges) == (2, 2, 3, 2)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="user_artists.dat: no such file"):
        load_lastfm(tmp_path)


# ----------------------------------------------------------------------------------- generic CSV


def test_load_csv_string_ids_values_and_directed_edges(tmp_path: Path) -> None:
    # Prepare
    write(tmp_path / "interactions.csv", "user,item,value,timestamp\nalice,book,5,100\nbob,book,1,101\n"
          "alice,pen,2.5,102\nalice,book,4,103\n")
    write(tmp_path / "social.csv", "user,neighbour\nalice,bob\nbob,bob\n")
    # Execute
    ds = load_csv(tmp_path)
    # Assert
    assert tolist(ds.user_ids) == ["alice", "bob"] and tolist(ds.item_ids) == ["book", "pen"]
    assert pairs(ds) == {(0, 0), (1, 0), (0, 1)}
    assert edges(ds) == {(0, 1)}
    assert ds.item_category is None


def test_load_csv_integer_ids_sort_numerically_and_columns_in_any_order(tmp_path: Path) -> None:
    # Prepare
    write(tmp_path / "interactions.csv", "item,user\n1,10\n2,9\n1,100\n")
    write(tmp_path / "social.csv", "neighbour,user\n9,100\n")
    # Execute
    ds = load_csv(tmp_path)
    # Assert
    assert tolist(ds.user_ids) == [9, 10, 100]
    assert edges(ds) == {(2, 0)}


def test_load_csv_items_file_adds_catalogue_and_categories(tmp_path: Path) -> None:
    # Prepare: item "c" has no interaction but is in the catalogue.
    write(tmp_path / "interactions.csv", "user,item\nu1,b\nu2,a\n")
    write(tmp_path / "social.csv", "user,neighbour\n")
    write(tmp_path / "items.csv", "item,category\nc,2\na,0\nb,1\n")
    # Execute
    ds = load_csv(tmp_path)
    # Assert
    assert tolist(ds.item_ids) == ["a", "b", "c"] and tolist(ds.item_category) == [0, 1, 2]
    assert pairs(ds) == {(0, 1), (1, 0)} and ds.n_edges == 0


def test_named_categories_keep_their_names_and_read_back_the_same_after_an_export(tmp_path: Path) -> None:
    # Prepare: categories given by name (was: the names were dropped, so `recommend --category` and the service
    # took only the codes the loader made up)
    write(tmp_path / "in" / "interactions.csv", "user,item\nu1,b\nu2,a\nu2,c\n")
    write(tmp_path / "in" / "social.csv", "user,neighbour\n")
    write(tmp_path / "in" / "items.csv", "item,category\nc,Garden & Outdoor\na,Books\nb,Garden & Outdoor\nd,Toys\n")
    # Execute
    ds = load_csv(tmp_path / "in")
    back = load_csv(write_csv_dataset(ds, tmp_path / "out"))
    # Assert: codes by sorted name, each code's name kept, and an export reads back the same
    assert ds.item_category_names == ("Books", "Garden & Outdoor", "Toys")
    assert tolist(ds.item_ids) == ["a", "b", "c", "d"] and tolist(ds.item_category) == [0, 1, 1, 2]
    assert back.item_category_names == ds.item_category_names
    np.testing.assert_array_equal(back.item_category, ds.item_category)
    assert "Garden & Outdoor" in (tmp_path / "out" / "items.csv").read_text()
    # integer categories name themselves
    assert load_csv(write_csv_dataset(generate(DataConfig(n_users=50, n_items=80)), tmp_path / "syn")
                    ).item_category_names == ()


GOOD_I = "user,item\na,x\nb,y\n"
GOOD_S = "user,neighbour\na,b\n"
INTER, SOCIAL = "interactions.csv", "social.csv"


@pytest.mark.parametrize(
    ("interactions", "social", "file", "needle"),
    [
        ("", GOOD_S, INTER, "empty file"),
        ("\n\n", GOOD_S, INTER, "empty file"),
        ("user,item\n", GOOD_S, INTER, "no interaction rows"),
        ("user,value\na,1\n", GOOD_S, INTER, ":1: missing column 'item'"),
        ("a,x\nb,y\n", GOOD_S, INTER, ":1: unknown column 'a'"),
        ("1,2\n3,4\n", GOOD_S, INTER, "missing header line?"),
        ("user,item,value\na,x,5\nb,y,lots\n", GOOD_S, INTER, ":3: column 'value' must be a number"),
        ("user,item,timestamp\na,x,\n", GOOD_S, INTER, ":2: column 'timestamp' must be a number"),
        ("user,item\na,x\nb,y,3\n", GOOD_S, INTER, ":3: expected 2 fields"),
        ("user,item\na,x\n,y\n", GOOD_S, INTER, ":3: empty user id"),
        ("user;item\na;x\n", GOOD_S, INTER, ":1: fields are separated by semicolons"),
        ("user\titem\na\tx\n", GOOD_S, INTER, ":1: fields are separated by tabs"),
        ("user,item\na,x\nb;y\n", GOOD_S, INTER, ":3: expected 2 fields (user,item), found 1; it looks"),
        (GOOD_I, "", SOCIAL, "empty file"),
        (GOOD_I, "user,buddy\na,b\n", SOCIAL, ":1: unknown column 'buddy'"),  # "friend" is an alias of neighbour
        (GOOD_I, "user;neighbour\na;b\n", SOCIAL, "separated by semicolons"),
    ],
)
def test_load_csv_bad_input_names_file_line_and_problem(
    tmp_path: Path, interactions: str, social: str, file: str, needle: str
) -> None:
    # Prepare
    write(tmp_path / "interactions.csv", interactions)
    write(tmp_path / "social.csv", social)
    # Execute
    with pytest.raises(DataError) as err:
        load_csv(tmp_path)
    # Assert: one message that names the file and says what is wrong (and where).
    message = str(err.value)
    assert str(tmp_path / file) in message and needle in message
    assert "\n" not in message


def test_load_csv_accepts_byte_order_mark_and_windows_line_ends(tmp_path: Path) -> None:
    # Prepare: what a spreadsheet's "CSV UTF-8" export looks like.
    (tmp_path / "interactions.csv").write_bytes("\ufeffuser,item\r\nå,x\r\nb,y\r\n".encode())
    (tmp_path / "social.csv").write_bytes(b"\xef\xbb\xbfuser,neighbour\r\nb,\xc3\xa5\r\n")
    # Execute
    ds = load_csv(tmp_path)
    # Assert
    assert tolist(ds.user_ids) == ["b", "å"] and edges(ds) == {(0, 1)}


def test_load_csv_non_utf8_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "interactions.csv").write_bytes(b"user,item\na,x\nb\xe9,y\n")
    write(tmp_path / "social.csv", GOOD_S)
    with pytest.raises(DataError, match=r"interactions.csv:3: not UTF-8 text"):
        load_csv(tmp_path)


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        ("item,category\nx,1\n", "interactions.csv:3: item 'y' is not listed in items.csv"),
        ("item,category\nx,1\ny,\n", "items.csv:3: empty category"),
        ("item,price\nx,1\ny,-2\n", "items.csv:3: column 'price' must be a number >= 0"),
        ("item,category\nx,1\ny,2\nx,3\n", "items.csv:4: item 'x' listed twice"),
    ],
)
def test_load_csv_bad_items_file(tmp_path: Path, items: str, needle: str) -> None:
    # Prepare
    write(tmp_path / "interactions.csv", GOOD_I)
    write(tmp_path / "social.csv", GOOD_S)
    write(tmp_path / "items.csv", items)
    # Execute / Assert
    with pytest.raises(DataError) as err:
        load_csv(tmp_path)
    assert needle in str(err.value)


# ------------------------------------------------------------------------------------- dispatch


def test_load_dataset_dispatches_on_format_and_resolves_relative_paths(tmp_path: Path) -> None:
    # Prepare
    write(tmp_path / "shop" / "interactions.csv", GOOD_I)
    write(tmp_path / "shop" / "social.csv", GOOD_S)
    cfg = DataConfig(format="csv", path="shop")
    # Execute
    ds = load_dataset(cfg, tmp_path)
    # Assert
    assert ds.name == "shop" and ds.n_users == 2 and ds.n_edges == 1


def test_load_dataset_missing_folder_says_how_to_fix(tmp_path: Path) -> None:
    cfg = DataConfig(format="lastfm", path="nowhere")
    with pytest.raises(DataError, match="no such dataset folder.*--data-dir"):
        load_dataset(cfg, tmp_path)


# ------------------------------------------------------------------------------ CSV round trip


def assert_same_dataset(a: Dataset, b: Dataset) -> None:
    assert (a.n_users, a.n_items) == (b.n_users, b.n_items)
    for name in ("users", "items", "social_src", "social_dst"):
        x, y = getattr(a, name), getattr(b, name)
        np.testing.assert_array_equal(x, y)
    if a.item_category is None or b.item_category is None:
        assert a.item_category is None and b.item_category is None
    else:
        np.testing.assert_array_equal(a.item_category, b.item_category)


def test_csv_round_trip_of_the_synthetic_dataset_keeps_catalogue_and_categories(tmp_path: Path) -> None:
    # Prepare: a catalogue where some items have no interaction (they live only in items.csv).
    ds = generate(DataConfig(n_users=200, n_items=3000))
    assert np.bincount(ds.items, minlength=ds.n_items).min() == 0
    # Execute
    back = load_csv(write_csv_dataset(ds, tmp_path / "export"))
    # Assert
    assert_same_dataset(ds, back)
    assert tolist(back.user_ids) == list(range(ds.n_users))


def test_csv_round_trip_of_string_ids_with_commas_and_quotes(tmp_path: Path) -> None:
    # Prepare
    write(tmp_path / "in" / "interactions.csv",
          'user,item\n"smith, anna","the ""best"" pen"\nbob,cup\n"smith, anna",cup\n')
    write(tmp_path / "in" / "social.csv", 'user,neighbour\nbob,"smith, anna"\n')
    ds = load_csv(tmp_path / "in")
    # Execute
    back = load_csv(write_csv_dataset(ds, tmp_path / "out"))
    # Assert
    assert tolist(back.user_ids) == ["bob", "smith, anna"]
    assert tolist(back.item_ids) == ["cup", 'the "best" pen']
    assert_same_dataset(ds, back)
    assert not (tmp_path / "out" / "items.csv").exists()


def test_csv_export_of_a_partner_uses_global_user_indices(tmp_path: Path) -> None:
    # Prepare
    ds = generate(DataConfig(n_users=120))
    split = split_dataset(ds, SplitConfig())
    assignment = partition_users(ds, 3, PartitionConfig(method="community"))
    part = partner_split(split, assignment, 1).dataset
    # Execute
    back = load_csv(write_csv_dataset(part, tmp_path / "partner1"))
    # Assert: the exported ids are the global user indices of the partner's users.
    assert tolist(back.user_ids) == np.flatnonzero(assignment == 1).tolist()
    assert_same_dataset(part, back)


def test_load_csv_line_numbers_stay_right_after_a_quoted_field_spanning_lines(tmp_path: Path) -> None:
    # Prepare: a title with a line break (what product exports hold), then a bad row on line 5
    write(tmp_path / "interactions.csv", GOOD_I)
    write(tmp_path / "social.csv", GOOD_S)
    write(tmp_path / "items.csv", 'item,title\nx,"line one\nline two"\ny,plain\nz,"a","b"\n')
    # Execute
    with pytest.raises(DataError) as err:
        load_csv(tmp_path)
    # Assert: the line an editor shows, not the record count
    assert "items.csv:5: expected 2 fields" in str(err.value)


def test_load_csv_multi_line_title_keeps_its_line_break_and_its_line(tmp_path: Path) -> None:
    # Prepare
    from fedsocial.shared.loaders import read_csv_table

    write(tmp_path / "items.csv", 'item,title\n"x,1", "multi\nline, title"\ny,\n')
    # Execute
    table = read_csv_table(tmp_path / "items.csv", ("item",), ("title",))
    # Assert: a space before the opening quote is ignored, the break is kept, y is on line 4
    assert tolist(table.columns["item"]) == ["x,1", "y"]
    assert tolist(table.columns["title"]) == ["multi\nline, title", ""]
    assert tolist(table.line_no) == [2, 4]


@pytest.mark.parametrize(
    ("interactions", "needle"),
    [
        # an unbalanced quote used to swallow the rest of the file into one id: users c and d vanished silently
        ('user,item\na,x\nb,"y\nc,z\nd,w\n', "interactions.csv:3: malformed quoting (unexpected end of data)"),
        ('user,item\na,x\nb,"y"z\nc,z\n', "interactions.csv:3: malformed quoting"),
        ('user,item\na,x\n"b\nq",y\nc,z\n', "interactions.csv:3: user id 'b\\nq' spans several lines"),
    ],
)
def test_load_csv_refuses_broken_quoting_with_its_line(tmp_path: Path, interactions: str, needle: str) -> None:
    # Prepare
    write(tmp_path / "interactions.csv", interactions)
    write(tmp_path / "social.csv", "user,neighbour\na,c\n")
    # Execute
    with pytest.raises(DataError) as err:
        load_csv(tmp_path)
    # Assert: one line naming file, line and problem
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_min_value_keeps_the_ratings_at_or_above_it_and_needs_a_value_column(tmp_path: Path) -> None:
    # Prepare: explicit ratings; u3 rated only low, so it has no positive left
    write(tmp_path / "r" / "interactions.csv", "user,item,rating\nu1,a,5\nu1,b,2\nu2,a,4\nu2,c,3\nu3,b,1\n")
    write(tmp_path / "r" / "social.csv", "user,neighbour\nu1,u2\nu3,u1\n")
    write(tmp_path / "p" / "interactions.csv", "user,item\nu1,a\n")
    write(tmp_path / "p" / "social.csv", "user,neighbour\n")
    # Execute
    every = load_csv(tmp_path / "r")
    positives = load_csv(tmp_path / "r", min_value=4)
    # Assert: only the 4s and 5s; a user left without any is gone with its edges
    assert every.n_interactions == 5 and tolist(every.user_ids) == ["u1", "u2", "u3"]
    assert tolist(positives.user_ids) == ["u1", "u2"] and tolist(positives.item_ids) == ["a"]
    assert positives.n_interactions == 2 and positives.n_edges == 1
    with pytest.raises(DataError, match=r"interactions.csv: data.min_value = 4 needs a value column"):
        load_csv(tmp_path / "p", min_value=4)
    with pytest.raises(DataError, match=r"no interaction has a value >= data.min_value = 9"):
        load_csv(tmp_path / "r", min_value=9)


def test_min_value_is_a_csv_setting_and_round_trips_through_the_config(tmp_path: Path) -> None:
    # Prepare / Execute
    from fedsocial.shared.config import ConfigError, load_config
    from fedsocial.simulations.simulate import write_config

    cfg = load_config(ROOT / "configs" / "demo.toml", ["data.format=csv", "data.path=x", "data.min_value=3.5"])
    back = load_config(write_config(cfg, tmp_path / "run"))
    default = load_config(write_config(load_config(ROOT / "configs" / "demo.toml"), tmp_path / "run2"))
    # Assert
    assert back.data.min_value == 3.5 and default.data.min_value == 0.0
    with pytest.raises(ConfigError, match="data.min_value: applies to data.format = csv"):
        load_config(ROOT / "configs" / "demo.toml", ["data.min_value=4"])
    with pytest.raises(ConfigError, match="data.min_value"):
        load_config(ROOT / "configs" / "demo.toml", ["data.format=csv", "data.path=x", "data.min_value=-1"])
