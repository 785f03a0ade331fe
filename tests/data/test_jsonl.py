from __future__ import annotations

import json
from pathlib import Path

import pytest

from hsplitlora.data.example import DataError, Example
from hsplitlora.data.jsonl import load_jsonl


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_loads_pairs_skips_blank_lines_and_keeps_extra_keys_as_strings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            json.dumps({"prompt": "Q: 2+2?\nA:", "completion": " 4"}),
            "",
            "   ",
            json.dumps(
                {"prompt": "P", "completion": " C", "source": "web", "n": 3, "tags": ["x", "é"],
                 "score": None, "ok": True}
            ),
        ],
    )
    assert load_jsonl(path) == [
        Example("Q: 2+2?\nA:", " 4", {}),
        Example(
            "P",
            " C",
            {"source": "web", "n": "3", "tags": '["x", "é"]', "score": "null", "ok": "true"},
        ),
    ]


def test_a_line_separator_inside_a_string_does_not_split_the_record(tmp_path: Path) -> None:
    path = write(tmp_path, ['{"prompt": "a\u2028b", "completion": " c"}'])
    assert load_jsonl(path) == [Example("a\u2028b", " c", {})]


GOOD = json.dumps({"prompt": "p", "completion": " c"})


@pytest.mark.parametrize(
    ("bad", "hint"),
    [
        ('{"prompt": "p", "completion": " c"', "invalid JSON"),
        ("[1, 2]", "found a JSON array, not an object"),
        ('{"prompt": "p"}', "missing key 'completion'"),
        ('{"completion": " c"}', "missing key 'prompt'"),
        ('{"prompt": 5, "completion": " c"}', "'prompt' is a JSON number, not a string"),
        ('{"prompt": "p", "completion": null}', "'completion' is a JSON null, not a string"),
    ],
)
def test_bad_line_names_file_line_and_format(tmp_path: Path, bad: str, hint: str) -> None:
    path = write(tmp_path, [GOOD, "", GOOD, bad, GOOD])  # the bad record is on line 4
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert f"{path}:4:" in message
    assert hint in message
    assert '{"prompt": ' in message  # shows the expected format


def test_file_without_records_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, ["", "  "])
    with pytest.raises(DataError, match="no examples found"):
        load_jsonl(path)


def test_undecodable_bytes_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes((GOOD + "\n" + GOOD + "\n").encode() + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:3: bytes b'\\xff' are not valid UTF-8"):
        load_jsonl(path)
