from __future__ import annotations

import re
from pathlib import Path

import pytest

from hsplitlora.data.e2e import format_prompt, group_references, load_e2e, load_e2e_csv, parse_mr
from hsplitlora.data.example import DataError, Example

# --- parse_mr / format_prompt ------------------------------------------------------------


def test_parse_mr_reads_slots_in_order() -> None:
    slots = parse_mr("name[The Vaults], eatType[pub], priceRange[more than £30]")
    assert slots == {"name": "The Vaults", "eatType": "pub", "priceRange": "more than £30"}
    assert list(slots) == ["name", "eatType", "priceRange"]


def test_parse_mr_tolerates_spaces_and_multiword_slot_names() -> None:
    assert parse_mr("  name[ Aromi ] ,customer rating[5 out of 5]  ") == {
        "name": "Aromi",
        "customer rating": "5 out of 5",
    }


def test_parse_mr_keeps_every_value_of_a_repeated_slot() -> None:
    # As in cleaned/devel-fixed.no-ol.csv line 116.
    slots = parse_mr("name[Aromi], eatType[coffee shop], eatType[restaurant]")
    assert slots == {"name": "Aromi", "eatType": "coffee shop | restaurant"}


@pytest.mark.parametrize(
    ("mr", "where"),
    [
        ("", "empty meaning representation"),
        ("name[The Vaults", "at character 0"),
        ("name The Vaults", "at character 0"),
        ("name[A] eatType[pub]", "expected ',' between slots"),
        ("name[A],", "at character 8"),
        ("[A]", "empty slot name"),
        ("name[]", "empty value"),
        ("name[a[b]]", "at character 0"),
    ],
)
def test_parse_mr_rejects_malformed_input(mr: str, where: str) -> None:
    with pytest.raises(ValueError, match=re.escape(where)):
        parse_mr(mr)


def test_format_prompt_is_the_documented_template() -> None:
    assert format_prompt("name[A]") == "Meaning representation: name[A]\nDescription:"


# --- the real files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relpath", "rows", "mrs", "has_refs"),
    [
        ("original/devset.csv", 4672, 547, True),
        ("original/testset.csv", 630, 630, False),
        ("original/testset_w_refs.csv", 4693, 630, True),
        ("cleaned/devel-fixed.no-ol.csv", 4299, 1484, True),
        ("cleaned/test-fixed.csv", 4693, 1847, True),
    ],
)
def test_real_files_load_with_documented_counts(
    e2e_dir: Path, relpath: str, rows: int, mrs: int, has_refs: bool
) -> None:
    examples = load_e2e_csv(e2e_dir / relpath)
    assert len(examples) == rows
    assert len({ex.meta["mr"] for ex in examples}) == mrs
    for ex in examples:
        assert ex.prompt == format_prompt(ex.meta["mr"])
        if has_refs:
            assert ex.target.startswith(" ") and ex.target.strip() == ex.target[1:]
        else:
            assert ex.target == ""


def test_first_devset_row_is_parsed_exactly(e2e_dir: Path) -> None:
    first = load_e2e_csv(e2e_dir / "original/devset.csv")[0]  # a CRLF file
    mr = "name[Alimentum], area[city centre], familyFriendly[no]"
    assert first == Example(
        prompt=f"Meaning representation: {mr}\nDescription:",
        target=" There is a place in the city centre, Alimentum, that is not family-friendly.",
        meta={"mr": mr, "name": "Alimentum", "area": "city centre", "familyFriendly": "no"},
    )


def test_require_refs_rejects_an_mr_only_file(e2e_dir: Path) -> None:
    path = e2e_dir / "original/testset.csv"
    with pytest.raises(DataError, match=r"testset\.csv:1: no 'ref' column"):
        load_e2e_csv(path, require_refs=True)


def test_load_e2e_concatenates_in_order(e2e_dir: Path) -> None:
    paths = [e2e_dir / "original/devset.csv", e2e_dir / "cleaned/devel-fixed.no-ol.csv"]
    examples = load_e2e(paths)
    assert len(examples) == 4672 + 4299
    assert examples[:4672] == load_e2e_csv(paths[0])
    assert examples[4672:] == load_e2e_csv(paths[1])
    with pytest.raises(ValueError, match="at least one"):
        load_e2e([])


def test_group_references_matches_the_metrics_fixture(e2e_dir: Path) -> None:
    """The fixture's reference file was built from the same CSV, grouped by MR in file order."""
    prompts, refs = group_references(load_e2e_csv(e2e_dir / "original/testset_w_refs.csv"))
    fixture = (e2e_dir / "metrics-fixture/refs_a.txt").read_text(encoding="utf-8")
    blocks = fixture.rstrip("\n").split("\n\n")
    expected = [[line.strip() for line in block.split("\n")] for block in blocks]
    assert len(prompts) == len(set(prompts)) == 630
    assert prompts[0] == format_prompt("name[Blue Spice], eatType[coffee shop], area[city centre]")
    assert sum(len(r) for r in refs) == 4693
    assert refs == expected


def test_group_references_of_an_mr_only_file_has_no_references(e2e_dir: Path) -> None:
    prompts, refs = group_references(load_e2e_csv(e2e_dir / "original/testset.csv"))
    assert len(prompts) == 630 and refs == [[]] * 630


def test_group_references_groups_non_adjacent_rows() -> None:
    examples = [Example("a", " x"), Example("b", " y"), Example("a", " z")]
    assert group_references(examples) == (["a", "b"], [["x", "z"], ["y"]])


# --- malformed files name the file and the line ----------------------------------------


GOOD = '"name[A], eatType[pub]","A is a pub."\n'


@pytest.mark.parametrize(
    ("content", "line", "hint"),
    [
        ("meaning,ref\n" + GOOD, 1, "no 'mr' column"),
        ("mr,ref\n" + GOOD + GOOD + '"name[B], eatType pub","B."\n', 4, "column 'mr'"),
        ("mr,ref\n" + GOOD + GOOD + GOOD + '"name[B]",""\n', 5, "empty 'ref'"),
        ("mr,ref\n" + GOOD + '"name[B]",B is nice, cheap.\n', 3, "expected 2 fields"),
        ("mr,ref\n" + GOOD + '"name[B]"\n', 3, "found 1"),
        ("mr,ref\n" + GOOD + '"name[B]","never closed\n' + GOOD, 3, "quoting"),
        # A valid quoted field over lines 2-3 must not throw later line numbers off.
        ("mr,ref\n" + '"name[A]","two\nlines"\n' + "name-B,B.\n", 4, "column 'mr'"),
        ("mr,ref\r\n" + GOOD.replace("\n", "\r\n") + '"name[C]","C"\r\n,\r\n', 4, "column 'mr'"),
    ],
)
def test_malformed_csv_names_file_and_line(
    tmp_path: Path, content: str, line: int, hint: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8", newline="")
    with pytest.raises(DataError) as info:
        load_e2e_csv(path)
    message = str(info.value)
    assert f"{path}:{line}:" in message
    assert hint in message


def test_undecodable_bytes_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    text = "mr,ref\n" + GOOD + '"name[B], priceRange[more than £30]","B."\n'
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv:3: bytes b'\\xa3' are not valid UTF-8"):
        load_e2e_csv(path)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: the file is empty"):
        load_e2e_csv(path)


def test_bom_header_case_and_blank_lines_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_text("\ufeffMR, Ref\r\n\r\n" + GOOD.replace("\n", "\r\n") + "\r\n", encoding="utf-8")
    assert load_e2e_csv(path) == [
        Example(
            format_prompt("name[A], eatType[pub]"),
            " A is a pub.",
            {"mr": "name[A], eatType[pub]", "name": "A", "eatType": "pub"},
        )
    ]


def test_hub_split_maps_rows_like_the_csv_and_explains_failures(monkeypatch):
    import sys
    import types

    from hsplitlora.data.e2e import format_prompt, load_e2e_hub
    from hsplitlora.data.example import DataError

    rows = [{"meaning_representation": "name[Aromi], area[city centre]",
             "human_reference": " Aromi is in the city centre. "}]
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: rows if split == "train" else (_ for _ in ()).throw(
        ConnectionError("hub unreachable"))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (ex,) = load_e2e_hub("train")
    assert ex.prompt == format_prompt("name[Aromi], area[city centre]")
    assert ex.target == " Aromi is in the city centre."
    assert ex.meta["name"] == "Aromi" and ex.meta["area"] == "city centre"
    with pytest.raises(DataError, match="cannot load split 'test'.*hub unreachable.*trainset"):
        load_e2e_hub("test")
    rows.append({"meaning_representation": "name[X]"})
    with pytest.raises(DataError, match=r"e2e_nlg\[train\] row 1"):
        load_e2e_hub("train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match="pip install datasets"):
        load_e2e_hub("train")
