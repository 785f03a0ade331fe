"""Data layer: load E2E or JSONL examples, tokenise with loss on the target, shard for clients."""

from hsplitlora.data.e2e import (
    E2E_PROMPT,
    format_prompt,
    group_references,
    load_e2e,
    load_e2e_csv,
    parse_mr,
)
from hsplitlora.data.example import DataError, Example
from hsplitlora.data.jsonl import load_jsonl
from hsplitlora.data.partition import NO_LABEL, Scheme, dirichlet, iid, label_skew, partition
from hsplitlora.data.tokenize import (
    IGNORE_INDEX,
    TokenizedDataset,
    collate,
    pad_id_for,
    tokenize_example,
)

__all__ = [
    "E2E_PROMPT",
    "IGNORE_INDEX",
    "NO_LABEL",
    "DataError",
    "Example",
    "Scheme",
    "TokenizedDataset",
    "collate",
    "dirichlet",
    "format_prompt",
    "group_references",
    "iid",
    "label_skew",
    "load_e2e",
    "load_e2e_csv",
    "load_jsonl",
    "pad_id_for",
    "parse_mr",
    "partition",
    "tokenize_example",
]
