"""Regressions of the generic CSV loader found by review: features attached to the wrong ids (integer ids),
a repeated header in an alias spelling read as data, Unicode digits as category codes, memory of one long
field, header quoting and number syntax (README, "Data rules")."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedsocial.shared.data import DataError
from fedsocial.shared.features import compute_codes
from fedsocial.shared.loaders import load_csv
from fedsocial.simulations import init_cmd, partition_cmd


@pytest.fixture(autouse=True)
def _own_text_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSOCIAL_CACHE_DIR", str(tmp_path / "cache"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ D1: every feature follows its own id


# Integer ids sort 1, 2, 10, 11 but as strings "1", "10", "11", "2"; string ids sort as strings; one
# non-integer id makes every id a string.
ID_SETS = [("1", "2", "10", "11"), ("b", "a", "ba", "c"), ("1", "2", "10", "x")]


def _features_folder(folder: Path, ids: tuple[str, ...]) -> dict[str, dict[str, object]]:
    """Interactions of every user with every item, items.csv listed out of order with a distinct price, text
    and category per item, users.csv with a distinct tier per user (out of order, plus a user without
    interactions). Returns the expected value of each id."""
    write(folder / "interactions.csv", "user,item\n" + "".join(f"{u},{i}\n" for u in ids for i in ids))
    write(folder / "social.csv", "user,neighbour\n" + f"{ids[0]},{ids[1]}\n")
    prices = dict(zip(ids, ("1", "2", "1000", "50"), strict=True))
    texts = dict(zip(ids, ("red apple", "", "blue car", "red apple"), strict=True))
    cats = dict(zip(ids, ("fruit", "none", "vehicle", "fruit"), strict=True))
    listed = [ids[2], ids[0], ids[3], ids[1]]
    write(folder / "items.csv", "item,category,text,price\n" + "".join(
        f"{i},{cats[i]},{texts[i]},{prices[i]}\n" for i in listed))
    write(folder / "users.csv", "user,tier\n" + "".join(f"{u},t{u}\n" for u in [*listed, "999"]))
    return {"price": prices, "text": texts, "category": cats}


@pytest.mark.parametrize("ids", ID_SETS)
def test_each_item_and_user_gets_its_own_price_text_category_and_features(tmp_path: Path,
                                                                          ids: tuple[str, ...]) -> None:
    # Prepare: was: prices, texts and user features were placed by position among the string-sorted ids
    # while the items and users are indexed numerically for integer ids (item 2 got item 10's price)
    expected = _features_folder(tmp_path / "d", ids)

    # Execute
    ds = load_csv(tmp_path / "d", price_bins=4)

    # Assert: by id, never by position
    assert ds.item_ids is not None and ds.user_ids is not None
    item = {str(v): k for k, v in enumerate(ds.item_ids.tolist())}
    user = {str(v): k for k, v in enumerate(ds.user_ids.tolist())}
    assert set(item) == set(user) == set(ids)
    assert ds.item_price_bin is not None and ds.item_category is not None and ds.item_text is not None
    by_price = sorted(ids, key=lambda i: float(str(expected["price"][i])))  # 4 distinct prices, 4 bins
    assert [int(ds.item_price_bin[item[i]]) for i in by_price] == [0, 1, 2, 3]
    assert {i: ds.item_category_names[int(ds.item_category[item[i]])] for i in ids} == expected["category"]
    vec = {i: ds.item_text[item[i]] for i in ids}
    red, empty, blue, red2 = ids
    assert not vec[empty].any() and vec[red].any() and vec[blue].any()  # the empty text: exactly zero
    assert np.allclose(vec[red], vec[red2]) and not np.allclose(vec[red], vec[blue])
    assert ds.user_features is not None
    tiers = ds.user_feature_values[0]
    assert {u: tiers[int(ds.user_features[user[u], 0]) - 1] for u in ids} == {u: f"t{u}" for u in ids}


def test_integer_category_codes_follow_their_items(tmp_path: Path) -> None:
    # Prepare: integer ids and integer category codes (they name themselves)
    write(tmp_path / "interactions.csv", "user,item\n1,1\n1,2\n2,10\n")
    write(tmp_path / "items.csv", "item,category\n10,7\n2,30\n1,5\n")
    # Execute
    ds = load_csv(tmp_path)
    # Assert
    assert ds.item_ids is not None and ds.item_category is not None
    assert dict(zip(ds.item_ids.tolist(), ds.item_category.tolist(), strict=True)) == {1: 5, 2: 30, 10: 7}


def test_partition_writes_each_partner_users_csv_with_its_own_users_values(tmp_path: Path) -> None:
    # Prepare: integer user ids whose string order differs from their numeric order, a tier per user
    ids = ("1", "2", "3", "10", "11", "20", "100", "30")
    items = ("1", "2", "10", "11")
    data = tmp_path / "data"
    write(data / "interactions.csv", "user,item\n" + "".join(f"{u},{i}\n" for u in ids for i in items))
    write(data / "social.csv", "user,neighbour\n1,2\n2,10\n10,1\n3,30\n")
    write(data / "users.csv", "user,tier\n" + "".join(f"{u},t{u}\n" for u in ids))
    write(data / "items.csv", "item,price\n" + "".join(f"{i},{i}\n" for i in items))
    cfg = write(tmp_path / "cfg.toml", f'[data]\nformat = "csv"\npath = "{data}"\n[partition]\nmethod = "random"\n')

    # Execute
    rc = partition_cmd.main(["--config", str(cfg), "--partners", "2", "--out", str(tmp_path / "parts")])

    # Assert: every partner's users.csv row holds that user's own tier, and its data loads them by id
    assert rc == 0
    seen = []
    for p in range(2):
        folder = tmp_path / "parts" / f"partner_{p}" / "data"
        rows = [line.split(",") for line in (folder / "users.csv").read_text(encoding="utf-8").splitlines()[1:]]
        assert rows and all(tier == f"t{uid}" for uid, tier in rows)
        seen += [uid for uid, _ in rows]
        part = load_csv(folder, price_bins=4)
        assert part.item_ids is not None and part.item_price_bin is not None
        assert dict(zip(part.item_ids.tolist(), part.item_price_bin.tolist(), strict=True)) == \
            {1: 0, 2: 1, 10: 2, 11: 3}
    assert sorted(seen) == sorted(ids)


# --------------------------------------------------- D2: a repeated header in any spelling, in every file


BASE = {
    "interactions.csv": "user,item\n1,1\n1,2\n2,2\n",
    "social.csv": "user,neighbour\n1,2\n",
    "items.csv": "item,category\n1,a\n2,b\n",
    "users.csv": "user,tier\n1,x\n2,y\n",
}
REPEATS = [
    ("interactions.csv", "userId,movieId\n1,1\n1,2\nuserId,movieId\n2,2\n", 4),
    ("interactions.csv", "userId,movieId\n1,1\n1,2\n USERID , MovieId \n2,2\n", 4),
    ("interactions.csv", 'user_id,item_id,rating\n1,1,5\n"user_id","Rating",5\n"User_Id","ITEM_ID","rating"\n', 4),
    ("interactions.csv", "user,item\n1,1\nuserId,itemId\n2,2\n", 3),
    ("social.csv", "truster,trustee\n1,2\nTruster,Trustee\n", 3),
    ("items.csv", "item,genre\n1,a\nitemId,Genre\n2,b\n", 3),
    ("users.csv", "user_id,tier\n1,x\nuserId,TIER\n2,y\n", 3),
]


@pytest.mark.parametrize(("name", "text", "line"), REPEATS)
def test_a_repeated_header_in_an_alias_spelling_is_refused_with_its_line(tmp_path: Path, name: str, text: str,
                                                                        line: int) -> None:
    # Prepare: was: the header line again in alias spelling (userId,movieId) read as a row of user 'userId'
    for file, body in BASE.items():
        write(tmp_path / file, text if file == name else body)
    # Execute / Assert
    with pytest.raises(DataError, match=rf"{name}:{line}: the header line is repeated \(first on line 1\)"):
        load_csv(tmp_path)


def test_a_row_that_only_starts_like_the_header_is_data(tmp_path: Path) -> None:
    # Prepare: a user whose id is spelled like a column name, in a row that is not the header
    write(tmp_path / "interactions.csv", "userId,movieId\n1,1\nuserId,2\n")
    # Execute
    ds = load_csv(tmp_path)
    # Assert
    assert ds.user_ids is not None and ds.user_ids.tolist() == ["1", "userId"]


# ------------------------------------------------------------- D6: only ASCII digits make a category code


def test_unicode_digits_are_category_names_not_codes() -> None:
    # Prepare / Execute: was: "²".isdigit() is true and int("²") raised a ValueError
    codes, names = compute_codes(np.array(["1", "²", "1"]))
    arabic_codes, arabic_names = compute_codes(np.array(["3", "٣"]))
    # Assert
    assert names == ("1", "²") and codes.tolist() == [0, 1, 0]
    assert arabic_names == ("3", "٣") and arabic_codes.tolist() == [0, 1]
    assert compute_codes(np.array(["7", "12"]))[0].tolist() == [7, 12]  # ASCII codes still name themselves


def test_init_reads_a_unicode_digit_category_as_a_name(tmp_path: Path) -> None:
    # Prepare: was: `fedsocial init` died with a traceback on items.csv rows 1,1 and 2,²
    data = tmp_path / "data"
    users = [f"u{k}" for k in range(6)]
    write(data / "interactions.csv", "user,item\n" + "".join(f"{u},{i}\n" for u in users for i in (1, 2, 3, 4)))
    write(data / "social.csv", "user,neighbour\nu0,u1\n")
    write(data / "items.csv", "item,category\n1,1\n2,²\n3,1\n4,²\n")
    # Execute
    rc = init_cmd.main(["--data", str(data), "--out", str(tmp_path / "x.toml"), "--partners", "1"])
    ds = load_csv(data)
    # Assert
    assert rc == 0 and (tmp_path / "x.toml").is_file()
    assert ds.item_category_names == ("1", "²") and ds.item_category is not None
    assert ds.item_category.tolist() == [0, 1, 0, 1]


# ------------------------------------------------------- D7: memory proportional to the file, not rows x width


def _peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("quoted", [False, True])
def test_a_huge_id_is_refused_with_its_line_before_a_fixed_width_array_is_built(tmp_path: Path,
                                                                               quoted: bool) -> None:
    # Prepare: was: 3,000 rows and one user id of 2,000,000 characters made a '<U2000000' array (24 GB)
    rows = [f"u{k},i{k % 50}" for k in range(3000)]
    rows[1500] = ('"' + "x" * 2_000_000 + '",i1') if quoted else ("x" * 2_000_000 + ",i1")
    write(tmp_path / "interactions.csv", "user,item\n" + "\n".join(rows) + "\n")

    # Execute
    def load() -> None:
        with pytest.raises(DataError, match=r"interactions.csv:1502: a user id of 2000000 characters "
                                            r"\(at most 1024\)"):
            load_csv(tmp_path)

    peak = _peak_bytes(load)
    # Assert: about the file's size (2 MB of text), far from 3,000 x 2,000,000 characters
    assert peak < 200 * 2**20


@pytest.mark.parametrize("quoted", [False, True])
def test_a_long_description_costs_about_its_own_size(tmp_path: Path, quoted: bool) -> None:
    # Prepare: was: one 400 KB description made every one of the catalogue's rows 1.6 MB wide (3 GB here)
    items = [f"i{k}" for k in range(2000)]
    write(tmp_path / "interactions.csv", "user,item\n" + "".join(f"u{k % 40},{i}\n" for k, i in enumerate(items)))
    long_text = " ".join(f"word{k % 997}" for k in range(50_000))  # about 400 KB
    long_tier = "z" * 300_000
    write(tmp_path / "items.csv", "item,category,text\n" + "".join(
        f"{i},c{k % 3},{long_text if k == 7 else f'short text {k}'}\n" for k, i in enumerate(items)))
    if quoted:  # a quoted field longer than the csv module's 128 Ki-character limit was called malformed quoting
        write(tmp_path / "items.csv", (tmp_path / "items.csv").read_text().replace(long_text, f'"{long_text}, end"'))
    write(tmp_path / "users.csv", "user,tier\n" + "".join(
        f"u{k},{long_tier if k == 3 else f't{k % 2}'}\n" for k in range(40)))
    out = {}

    # Execute
    peak = _peak_bytes(lambda: out.setdefault("ds", load_csv(tmp_path)))

    # Assert: the features are there and by id, and memory is far below rows x longest field
    ds = out["ds"]
    assert peak < 300 * 2**20
    assert ds.item_text is not None and ds.item_text[list(ds.item_ids).index("i7")].any()
    assert ds.user_features is not None and ds.user_ids is not None
    tiers = ds.user_feature_values[0]
    assert tiers[int(ds.user_features[list(ds.user_ids).index("u3"), 0]) - 1] == long_tier


# ----------------------------------------------------- D8: the header parsed as rows are; plain ASCII numbers


def test_a_header_with_a_space_before_a_quoted_name_is_read_as_rows_are(tmp_path: Path) -> None:
    # Prepare: was: `user, "item"` was refused as an unknown column '"item"' while rows `5, "0"` were read
    write(tmp_path / "interactions.csv", 'user, "item"\n5, "0"\n6,1\n')
    # Execute
    ds = load_csv(tmp_path)
    # Assert
    assert ds.user_ids is not None and ds.item_ids is not None
    assert ds.user_ids.tolist() == [5, 6] and ds.item_ids.tolist() == [0, 1]


def test_a_header_with_text_after_a_closing_quote_is_refused_as_such_a_row_is(tmp_path: Path) -> None:
    # Prepare
    write(tmp_path / "interactions.csv", '"user" ,item\n5,0\n')
    # Execute / Assert
    with pytest.raises(DataError, match=r"interactions.csv:1: malformed quoting in the header"):
        load_csv(tmp_path)


@pytest.mark.parametrize("number", ["1_000", "١٢", "٣.5", "inf", "nan", "Infinity", "0x10", "1e999", "1,5", ""])
@pytest.mark.parametrize("column", ["value", "timestamp", "price"])
def test_a_number_outside_plain_ascii_notation_is_refused_with_its_line(tmp_path: Path, number: str,
                                                                        column: str) -> None:
    # Prepare: was: float() took "1_000" and Arabic-Indic digits
    if column == "price":
        write(tmp_path / "interactions.csv", "user,item\n1,1\n1,2\n")
        write(tmp_path / "items.csv", f'item,price\n1,3\n2,"{number}"\n')
        name, where = "items.csv", "column 'price' must be a number >= 0 or empty"
        if number == "":
            load_csv(tmp_path)  # an empty price is a missing one
            return
    else:
        write(tmp_path / "interactions.csv", f'user,item,{column}\n1,1,3\n1,2,"{number}"\n')
        name, where = "interactions.csv", f"column '{column}' must be a number"
    # Execute / Assert
    with pytest.raises(DataError, match=rf"{name}:3: {where}"):
        load_csv(tmp_path)


def test_plain_decimal_and_scientific_numbers_are_read(tmp_path: Path) -> None:
    # Prepare
    values = ["1", "-2.5", "+3", ".5", "5.", "1e3", "1E-2", "0"]
    write(tmp_path / "interactions.csv", "user,item,value,timestamp\n" + "".join(
        f"u{k},i{k},{v},{v}\n" for k, v in enumerate(values)))
    write(tmp_path / "items.csv", "item,price\n" + "".join(f"i{k},{v.lstrip('-')}\n" for k, v in enumerate(values)))
    # Execute
    ds = load_csv(tmp_path, min_value=0.4)  # min_value reads the values as numbers: 5 of them are >= 0.4
    # Assert
    assert ds.n_interactions == 5 and ds.item_price_bin is not None
