"""Chat, alpaca and prompt/completion records, from JSONL and from Hugging Face datasets."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from hsplitlora.config import RunConfig
from hsplitlora.data.example import DataError
from hsplitlora.data.formats import ALPACA_PROMPT
from hsplitlora.data.load import check_labels, load_examples, sample_text
from hsplitlora.data.tokenize import IGNORE_INDEX, tokenize_example

# A ChatML template like SmolLM2-Instruct's, without its default system turn.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Name a pub."},
                  {"role": "assistant", "content": "The Vaults."},
                  {"role": "user", "content": "Where is it?"},
                  {"role": "assistant", "content": "By the river."}], "topic": "pubs"},
    {"messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"}], "topic": "greet"},
]
ALPACA = [{"instruction": "Describe the pub.", "input": "name[The Vaults]",
           "output": "The Vaults is a pub."},
          {"instruction": "Say hi.", "input": "", "output": "Hi."}]
PAIRS = [{"question": "2+2?", "answer": " 4", "topic": "math"},
         {"question": "3+3?", "answer": " 6", "topic": "math"}]


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level BPE: any text round-trips, so decoded labels can be compared as text."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([json.dumps(CHAT + ALPACA)] * 4,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                                unk_token="<unk>", pad_token="<eos>")


@pytest.fixture
def tiny_tokenizer(byte_tokenizer):
    return byte_tokenizer


@pytest.fixture
def chat_tokenizer(byte_tokenizer):
    tok = copy.deepcopy(byte_tokenizer)
    tok.chat_template = CHATML
    return tok


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def data_cfg(**data):
    return RunConfig.model_validate({"data": data}).data


def test_chat_records_train_on_every_assistant_turn_and_nothing_else(tmp_path, chat_tokenizer):
    data = data_cfg(dataset="jsonl", train_files=[str(jsonl(tmp_path / "c.jsonl", CHAT))])
    first, second = load_examples(data, "train", chat_tokenizer)
    assert first.target == "By the river." and first.meta == {"topic": "pubs"}
    assert first.prompt.endswith("Where is it?<|im_end|>\n<|im_start|>assistant\n")
    f = tokenize_example(first, chat_tokenizer, max_length=512)
    trained = chat_tokenizer.decode([t for t, lab in zip(f["input_ids"], f["labels"],
                                                          strict=True) if lab != IGNORE_INDEX])
    assert trained == "The Vaults.<|im_end|>\nBy the river.<|im_end|>\n"
    assert chat_tokenizer.decode(f["input_ids"]) == chat_tokenizer.apply_chat_template(
        CHAT[0]["messages"], tokenize=False)
    # The sample prompt is a user turn rendered by the same template.
    assert sample_text(data, "Any pubs?", chat_tokenizer) == (
        "<|im_start|>user\nAny pubs?<|im_end|>\n<|im_start|>assistant\n")
    assert second.target == "Hello"


def test_chat_data_without_a_template_is_refused_with_the_fix(tmp_path, tiny_tokenizer):
    data = data_cfg(dataset="jsonl", train_files=[str(jsonl(tmp_path / "c.jsonl", CHAT))])
    with pytest.raises(DataError, match="has none.*data.chat_template"):
        load_examples(data, "train", tiny_tokenizer)
    with_template = data_cfg(dataset="jsonl", chat_template=CHATML,
                             train_files=[str(tmp_path / "c.jsonl")])
    assert load_examples(with_template, "train", tiny_tokenizer)[0].segments


def test_alpaca_records_use_the_alpaca_prompt(tmp_path, tiny_tokenizer):
    data = data_cfg(dataset="jsonl", train_files=[str(jsonl(tmp_path / "a.jsonl", ALPACA))])
    with_input, without = load_examples(data, "train", tiny_tokenizer)
    assert with_input.prompt.startswith("Below is an instruction") and \
        "### Input:\nname[The Vaults]\n\n### Response:\n" in with_input.prompt
    assert "### Input" not in without.prompt and without.prompt.endswith(
        "### Instruction:\nSay hi.\n\n### Response:\n")
    assert with_input.target == "The Vaults is a pub."
    assert ALPACA_PROMPT.count("{") == 3


def test_unknown_keys_name_the_formats_and_columns_map_them(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", PAIRS)
    with pytest.raises(DataError, match=r"p.jsonl:1: cannot tell the format.*data.columns"):
        load_examples(data_cfg(dataset="jsonl", train_files=[str(path)]), "train")
    mapped = data_cfg(dataset="jsonl", train_files=[str(path)],
                      columns={"prompt": "question", "completion": "answer"})
    ex = load_examples(mapped, "train")[0]
    assert (ex.prompt, ex.target, ex.meta) == ("2+2?", " 4", {"topic": "math"})


def test_jsonl_data_gets_no_e2e_eval_file_and_samples_its_own_prompt(tmp_path, tiny_tokenizer):
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: hi\nA:", "completion": " yo"}])
    cfg = RunConfig.model_validate({"data": {"dataset": "jsonl", "train_files": [str(path)]}})
    assert cfg.data.eval_file is None and cfg.output.sample_prompt == "auto"
    assert load_examples(cfg.data, "eval") == []
    assert sample_text(cfg.data, "auto", tiny_tokenizer) == "Q: hi\nA:"
    assert sample_text(cfg.data, "Q: yo\nA:", tiny_tokenizer) == "Q: yo\nA:"


def test_dirichlet_without_the_label_key_is_refused_naming_the_keys(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", PAIRS)
    data = data_cfg(dataset="jsonl", train_files=[str(path)], partition="dirichlet",
                    columns={"prompt": "question", "completion": "answer"})
    examples = load_examples(data, "train")
    with pytest.raises(DataError, match=r"no example has the field 'name'.*\['topic'\].*iid"):
        check_labels(data, examples)
    check_labels(data.model_copy(update={"label_key": "topic"}), examples)  # accepted


def _rows_as(kind: str, rows: list[dict], tmp_path: Path) -> Path:
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if kind == "disk":
        out = tmp_path / "saved"
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(out))
        return out
    out = tmp_path / f"rows.{kind}"
    {"json": lambda: jsonl(out, rows), "jsonl": lambda: jsonl(out, rows),
     "csv": lambda: ds.to_csv(str(out)), "parquet": lambda: ds.to_parquet(str(out))}[kind]()
    return out


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet", "disk"])
def test_hf_local_sources_load_the_same_examples(tmp_path, kind):
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": f"up to {i}"}
            for i in range(10)]
    source = _rows_as(kind, rows, tmp_path)
    data = data_cfg(dataset="hf", source=str(source), split="train[:80%]",
                    eval_split="train[80%:]")
    train, held_out = load_examples(data, "train"), load_examples(data, "eval")
    assert [ex.target for ex in train] == [f"up to {i}" for i in range(8)]
    assert [ex.target for ex in held_out] == ["up to 8", "up to 9"]
    assert train[3].prompt == ALPACA_PROMPT.format(context="", instruction="Count to 3.",
                                                   input="")


def test_hf_hub_id_goes_to_the_hub_and_an_unreachable_hub_says_what_to_do(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, split=None, **kw):
        calls.append((path, split))
        if path != "org/chat":
            raise ConnectionError("hub unreachable")
        return datasets.Dataset.from_list(CHAT)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = data_cfg(dataset="hf", source="org/chat", split="train", chat_template=CHATML)
    examples = load_examples(data, "train")
    assert calls == [("org/chat", "train")] and [e.target for e in examples] == [
        "By the river.", "Hello"]
    with pytest.raises(DataError, match=r"'org/other'.*hub unreachable.*save_to_disk"):
        load_examples(data_cfg(dataset="hf", source="org/other"), "train")


def test_hf_needs_a_source_and_a_real_split(tmp_path):
    with pytest.raises(Exception, match="needs data.source"):
        data_cfg(dataset="hf")
    source = _rows_as("jsonl", [{"prompt": "a", "completion": " b"}], tmp_path)
    with pytest.raises(DataError, match="'train'"):
        load_examples(data_cfg(dataset="hf", source=str(source), split="validation"), "train")
