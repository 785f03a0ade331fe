"""Decoding: our beam search and the split path give transformers' own tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from hsplitlora.data.e2e import format_prompt, group_references, load_e2e
from hsplitlora.eval.generate import GenerationSettings, generate, prompt_batches
from hsplitlora.eval.split_generate import (
    ban_repeated_ngrams,
    decode,
    model_step,
    split_generate,
    split_step,
)
from hsplitlora.models.lora import LoraSettings, attach_lora
from hsplitlora.models.split import split_model
from tests.conftest import E2E, tiny_model

EOS = 1


def _prompts(n: int) -> list[str]:
    mrs, _ = group_references(load_e2e([E2E / "original" / "devset.csv"]))
    return mrs[:n]


def _eos_prone(model: torch.nn.Module) -> None:
    """Make EOS likely enough that beams finish at different lengths, so the finishing
    rules (length penalty, early stop) decide the winner rather than the length limit."""
    gen = torch.Generator().manual_seed(3)
    head = model.get_output_embeddings().weight
    with torch.no_grad():  # an EOS logit of spread ~0.4 where the others spread ~0.1
        head[EOS] = torch.randn(head.shape[1], generator=gen) * 0.4 / head.shape[1] ** 0.5


def _with_random_lora(arch: str) -> torch.nn.Module:
    model = tiny_model(arch)
    _eos_prone(model)
    attach_lora(model, LoraSettings(r=4, alpha=8))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:  # B starts at zero; make the adapter matter
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _merged_plain(arch: str, lora_model: torch.nn.Module) -> torch.nn.Module:
    """The same weights as a plain transformers model: base + scale * B @ A, no peft."""
    plain = tiny_model(arch)
    _eos_prone(plain)
    weights = dict(plain.named_parameters())
    with torch.no_grad():
        for name, module in lora_model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in module.lora_A:
                weights[f"{name}.weight"] += module.get_delta_weight("default")
    return plain.eval()


def _hf_tokens(model, enc, s: GenerationSettings) -> list[list[int]]:
    kwargs = dict(num_beams=s.num_beams, no_repeat_ngram_size=s.no_repeat_ngram_size,
                  max_new_tokens=s.max_new_tokens, do_sample=False, pad_token_id=EOS,
                  eos_token_id=EOS)
    if s.num_beams > 1:
        kwargs.update(length_penalty=s.length_penalty, early_stopping=s.early_stopping)
    out = model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:].tolist()
    return [row[: row.index(EOS) + 1] if EOS in row else row for row in out]


CASES = [
    GenerationSettings(num_beams=1, max_new_tokens=24),
    GenerationSettings(num_beams=4, max_new_tokens=24),  # E2E rules, smaller beam
    GenerationSettings(num_beams=3, length_penalty=2.0, no_repeat_ngram_size=2,
                       max_new_tokens=16, early_stopping=False),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_beam_and_split_search_give_transformers_tokens(arch, tiny_tokenizer):
    lora = _with_random_lora(arch)
    plain = _merged_plain(arch, lora)
    client, server = split_model(lora, 2)
    prompts = [format_prompt(mr) for mr in _prompts(5)]
    finished_early = beam_differs = False
    for s in CASES:
        for _, enc in prompt_batches(tiny_tokenizer, prompts, 3, torch.device("cpu")):
            expected = _hf_tokens(plain, enc, s)
            ours = decode(model_step(lora), enc["input_ids"], enc["attention_mask"], s,
                          eos_token_id=EOS, pad_token_id=EOS)
            split = decode(split_step(client, server), enc["input_ids"],
                           enc["attention_mask"], s, eos_token_id=EOS, pad_token_id=EOS)
            assert ours == expected, s
            assert split == expected, s
            finished_early |= any(len(row) < s.max_new_tokens and row[-1] == EOS
                                  for row in expected)
            if s.num_beams > 1:
                greedy = decode(model_step(lora), enc["input_ids"], enc["attention_mask"],
                                CASES[0], eos_token_id=EOS, pad_token_id=EOS)
                beam_differs |= greedy != expected
    # the cases exercise what they claim: hypotheses end on EOS, beams beat greedy
    assert finished_early and beam_differs


def test_adapters_change_the_generated_tokens(tiny_tokenizer):
    lora = _with_random_lora("llama")
    base = tiny_model("llama")
    _eos_prone(base)
    prompts = [format_prompt(mr) for mr in _prompts(3)]
    s = GenerationSettings(num_beams=2, max_new_tokens=12)
    assert generate(lora, tiny_tokenizer, prompts, s) != generate(base.eval(), tiny_tokenizer,
                                                                 prompts, s)


def test_split_generate_text_equals_generate_on_the_assembled_model(tiny_tokenizer):
    lora = _with_random_lora("llama")
    client, server = split_model(lora, 1)
    prompts = [format_prompt(mr) for mr in _prompts(5)]
    s = GenerationSettings(num_beams=3, max_new_tokens=20)
    assembled = generate(lora, tiny_tokenizer, prompts, s, batch_size=2)
    split = split_generate(client, server, tiny_tokenizer, prompts, s, batch_size=2)
    assert split == assembled
    assert len(assembled) == 5 and any(assembled)


def test_prompt_batches_cover_every_prompt_once_shortest_first(tiny_tokenizer):
    prompts = [format_prompt(mr) for mr in _prompts(7)]
    side = tiny_tokenizer.padding_side
    seen: list[int] = []
    widths = []
    for idx, enc in prompt_batches(tiny_tokenizer, prompts, 3, torch.device("cpu")):
        seen += idx
        widths.append(enc["input_ids"].shape[1])
        assert enc["attention_mask"][:, -1].all()  # left padding: every row ends on a token
    assert sorted(seen) == list(range(7)) and widths == sorted(widths)
    assert tiny_tokenizer.padding_side == side


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=12), min_size=1,
                     max_size=4).filter(lambda r: len({len(x) for x in r}) == 1),
       size=st.integers(1, 4))
def test_ngram_ban_matches_transformers(rows, size):
    ids = torch.tensor(rows)
    scores = torch.randn(len(rows), 7)
    expected = NoRepeatNGramLogitsProcessor(size)(ids, scores.clone())
    torch.testing.assert_close(ban_repeated_ngrams(ids, scores, size), expected)
