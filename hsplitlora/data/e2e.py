"""E2E NLG: meaning representation in, restaurant description out, loss on the description."""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from hsplitlora.data._text import read_utf8
from hsplitlora.data.example import DataError, Example

__all__ = [
    "E2E_PROMPT",
    "format_prompt",
    "group_references",
    "load_e2e",
    "load_e2e_csv",
    "load_e2e_hub",
    "parse_mr",
]

logger = logging.getLogger(__name__)

# Plain words rather than a separator token (LoRA's GPT-2 recipe uses " || "), so any base LM
# reads it without new vocabulary and the tokenizer needs no changes.
E2E_PROMPT = "Meaning representation: {mr}\nDescription:"

# One slot: a name, then a bracketed value; neither may contain brackets, the name no comma.
_SLOT = re.compile(r"\s*([^\[\],]*?)\s*\[([^\[\]]*)\]\s*")
# The cleaned E2E files repeat a slot when the text mentions two values
# ("eatType[coffee shop], eatType[restaurant]"); both are kept, joined by this.
_REPEAT_SEP = " | "
_MR_EXAMPLE = "'name[The Vaults], eatType[pub], priceRange[more than £30]'"


def parse_mr(mr: str) -> dict[str, str]:
    """Parse ``"name[The Vaults], eatType[pub]"`` into ``{"name": "The Vaults", "eatType": "pub"}``.

    Slot order is kept. A repeated slot keeps every value, joined by ``" | "``.
    Raises ValueError saying at which character the MR stops making sense.
    """
    if not mr.strip():
        raise ValueError(f"empty meaning representation; expected slots like {_MR_EXAMPLE}")
    slots: dict[str, str] = {}
    pos = 0
    while True:
        match = _SLOT.match(mr, pos)
        if match is None:
            raise ValueError(
                f"malformed meaning representation {mr!r} at character {pos}: expected "
                f"'slot[value]' there; write MRs like {_MR_EXAMPLE}"
            )
        key, value = match.group(1), match.group(2).strip()
        if not key or not value:
            missing = "slot name" if not key else "value"
            raise ValueError(
                f"malformed meaning representation {mr!r} at character {pos}: empty {missing} "
                f"in {match.group(0).strip()!r}; write MRs like {_MR_EXAMPLE}"
            )
        slots[key] = f"{slots[key]}{_REPEAT_SEP}{value}" if key in slots else value
        pos = match.end()
        if pos == len(mr):
            return slots
        if mr[pos] != ",":
            raise ValueError(
                f"malformed meaning representation {mr!r} at character {pos}: expected ',' "
                f"between slots; write MRs like {_MR_EXAMPLE}"
            )
        pos += 1


def format_prompt(mr: str) -> str:
    """The text the model is conditioned on for one MR."""
    return E2E_PROMPT.format(mr=mr)


def load_e2e_csv(path: Path, *, require_refs: bool = False) -> list[Example]:
    """Read an E2E CSV file (columns ``mr`` and optionally ``ref``, header case-insensitive).

    A file without a ``ref`` column (the challenge's ``testset.csv``) gives empty targets,
    unless `require_refs` is set, as training needs them. Extra columns (the cleaned files'
    ``fixed``, ``orig_mr``) are ignored. Any malformed row raises DataError naming file and
    line, since a silently skipped row would change results without anyone noticing.
    """
    path = Path(path)
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""), strict=True)
    header = _read_header(reader, path)
    mr_col = header.index("mr")
    ref_col = header.index("ref") if "ref" in header else None
    if ref_col is None and require_refs:
        raise DataError(
            f"{path}:1: no 'ref' column in header {header}, but references are needed here "
            "(training or evaluation). Use a file with columns 'mr,ref'."
        )

    examples: list[Example] = []
    while True:
        line = reader.line_num + 1  # where the next record starts; a quoted field may span lines
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(
                f"{path}:{line}: broken CSV quoting ({err}). Wrap a field that holds commas, "
                'quotes or line breaks in double quotes and double its inner quotes ("").'
            ) from err
        if not row:
            continue  # blank line
        if len(row) != len(header):
            raise DataError(
                f"{path}:{line}: expected {len(header)} fields ({','.join(header)}), found "
                f"{len(row)}. Wrap fields that contain commas in double quotes."
            )
        mr = row[mr_col].strip()
        try:
            slots = parse_mr(mr)
        except ValueError as err:
            raise DataError(f"{path}:{line}: column 'mr': {err}") from err
        target = ""
        if ref_col is not None:
            ref = row[ref_col].strip()
            if not ref:
                raise DataError(
                    f"{path}:{line}: empty 'ref'. Give every row a reference text, or drop the "
                    "'ref' column for an MR-only file like testset.csv."
                )
            target = " " + ref
        examples.append(Example(format_prompt(mr), target, {"mr": mr, **slots}))

    logger.info(
        "loaded %d examples (%d distinct MRs) from %s",
        len(examples), len({ex.meta["mr"] for ex in examples}), path,
    )
    return examples


def load_e2e_hub(split: str, name: str = "e2e_nlg") -> list[Example]:
    """One split of the E2E dataset from the Hugging Face hub (``datasets`` library).

    For users who can reach the hub: the official 42k-example training split lives there.
    Rows map exactly like the CSV files' (``meaning_representation`` -> prompt,
    ``human_reference`` -> target), so runs on either source are comparable.
    """
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            "data.dataset 'e2e_hub' needs the `datasets` package: pip install datasets "
            "(or the extra: pip install 'hsplitlora[datasets]'). "
            "Offline, download the E2E CSVs and use data.dataset 'e2e' with data.train_files."
        ) from err
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub client raises many types; all mean "not reachable"
        raise DataError(
            f"cannot load split {split!r} of {name!r} from the Hugging Face hub: {err}. "
            "Check the split name and your connection, or download the E2E CSVs (trainset.csv) "
            "and use data.dataset 'e2e' with data.train_files."
        ) from err
    examples: list[Example] = []
    for i, row in enumerate(rows):
        mr, ref = row.get("meaning_representation"), row.get("human_reference")
        if not isinstance(mr, str) or not isinstance(ref, str) or not ref.strip():
            raise DataError(f"{name}[{split}] row {i}: expected string fields "
                            f"'meaning_representation' and 'human_reference', got {dict(row)}")
        try:
            slots = parse_mr(mr.strip())
        except ValueError as err:
            raise DataError(f"{name}[{split}] row {i}: {err}") from err
        examples.append(Example(format_prompt(mr.strip()), " " + ref.strip(),
                                {"mr": mr.strip(), **slots}))
    logger.info("loaded %d examples from %s[%s]", len(examples), name, split)
    return examples


def _read_header(reader: Iterator[list[str]], path: Path) -> list[str]:
    """The lower-cased column names; DataError if the file is empty or has no 'mr' column."""
    try:
        row = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty; expected a header line 'mr,ref'.") from None
    except csv.Error as err:
        raise DataError(f"{path}:1: the header line is not valid CSV ({err}).") from err
    header = [name.strip().lower() for name in row]
    if "mr" not in header:
        raise DataError(
            f"{path}:1: no 'mr' column in header {row}. The first line must name the columns, "
            "e.g. 'mr,ref' (case does not matter)."
        )
    return header


def load_e2e(paths: Sequence[Path], *, require_refs: bool = False) -> list[Example]:
    """Concatenate several E2E CSV files in the given order (e.g. original + cleaned dev sets)."""
    if not paths:
        raise ValueError("load_e2e needs at least one CSV path; none were given.")
    return [ex for path in paths for ex in load_e2e_csv(path, require_refs=require_refs)]


def group_references(examples: Sequence[Example]) -> tuple[list[str], list[list[str]]]:
    """One entry per distinct prompt, in first-seen order, with all its references.

    E2E metrics score one hypothesis per MR against every human reference of that MR, so
    evaluation generates once per prompt here. References are the targets without their
    leading space; empty targets (MR-only files) contribute no reference.
    """
    refs_by_prompt: dict[str, list[str]] = {}
    for ex in examples:
        refs = refs_by_prompt.setdefault(ex.prompt, [])
        if ex.target.strip():
            refs.append(ex.target.strip())
    return list(refs_by_prompt), list(refs_by_prompt.values())
