"""Split inference: the client segment and the server segment exchange activations for
every generated token, and the tokens equal the assembled model's.

The client holds the embeddings and blocks ``[0, k)``, so it embeds the tokens and sends
the cut activations up; the server finishes the forward and picks the next token. Neither
holds the whole model. Decoding re-runs the full prefix at every step (no KV cache): that
keeps each side stateless between tokens, at a cost that only matters for long outputs.

The search follows transformers' ``generate`` step for step (log-softmax, n-gram ban on the
whole padded row, ``2 * num_beams`` candidates, only the top ``num_beams`` may finish, the
finished score divided by ``generated_length ** length_penalty``, the same early stop), so
the split path and :func:`hsplitlora.eval.generate.generate` return the same text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hsplitlora.eval.generate import (
    GenerationSettings,
    clean_continuation,
    prompt_batches,
)
from hsplitlora.models.split import ClientSegment, ServerSegment

__all__ = [
    "StepFn",
    "ban_repeated_ngrams",
    "beam_search",
    "decode",
    "greedy_search",
    "model_step",
    "position_ids",
    "split_generate",
    "split_step",
]

StepFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(input_ids, attention_mask, position_ids)``, each (N, T) -> next-token logits (N, V)."""

_NEG = float("-inf")
# transformers' start value for beams 1..B-1: only beam 0 expands at the first step, so
# the B beams do not all pick the same tokens.
_UNUSED_BEAM = -1e9


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` derives them (pads get 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def split_step(client: ClientSegment, server: ServerSegment) -> StepFn:
    """One decoding step across the cut: client forward, activations up, server forward.

    The activations are detached before they "cross", exactly what a transport would
    carry; the LM head runs on the last position only.
    """

    def step(ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        activations = client(ids, mask, pos).detach()
        hidden = server.hidden(activations, mask, pos)
        return server.lm_head(hidden[:, -1])

    return step


def model_step(model: nn.Module) -> StepFn:
    """The same step on the assembled (unsplit) model: the reference the split path meets."""

    def step(ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        return out.logits[:, -1]

    return step


def ban_repeated_ngrams(ids: Tensor, scores: Tensor, size: int) -> Tensor:
    """Set to -inf every token that would complete an n-gram already present in its row.

    ``ids`` is the whole row (left pads and prompt included, as transformers does), so a
    description cannot repeat a 4-gram of the prompt either. ``size`` 0 turns it off.
    """
    length = ids.shape[1]
    if size == 0 or length < size:
        return scores
    windows = ids.unfold(1, size, 1)  # (N, length - size + 1, size)
    suffix = ids[:, length - size + 1 :]  # the last size-1 tokens: the n-gram being started
    rows, cols = (windows[..., :-1] == suffix[:, None, :]).all(-1).nonzero(as_tuple=True)
    tokens = windows[rows, cols, -1]
    inside = tokens < scores.shape[-1]
    out = scores.clone()
    out[rows[inside], tokens[inside]] = _NEG
    return out


def _grow(mask: Tensor, new: int) -> Tensor:
    return torch.cat([mask, mask.new_ones(mask.shape[0], new)], dim=1)


def _cut_at_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@torch.no_grad()
def greedy_search(
    step: StepFn,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int = 64,
    no_repeat_ngram_size: int = 0,
) -> list[list[int]]:
    """Arg-max decoding; returns each row's new tokens, ending with EOS when it ended."""
    ids, mask = input_ids, attention_mask
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = step(ids, mask, position_ids(mask)).float()
        nxt = ban_repeated_ngrams(ids, logits, no_repeat_ngram_size).argmax(-1)
        nxt = nxt.masked_fill(done, pad_token_id)
        ids, mask = torch.cat([ids, nxt[:, None]], dim=1), _grow(mask, 1)
        done |= nxt == eos_token_id
        if bool(done.all()):
            break
    new = ids[:, input_ids.shape[1]:].tolist()
    return [_cut_at_eos(row, eos_token_id) for row in new]


def _take(x: Tensor, index: Tensor) -> Tensor:
    """``x[i, index[i, j]]`` for a (batch, beams, ...) tensor and (batch, k) indices."""
    return torch.take_along_dim(x, index.view(*index.shape, *([1] * (x.dim() - 2))), dim=1)


@torch.no_grad()
def beam_search(
    step: StepFn,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    eos_token_id: int,
    pad_token_id: int,
    num_beams: int = 10,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    max_new_tokens: int = 64,
    early_stopping: bool = True,
) -> list[list[int]]:
    """Batched beam search with transformers' rules; returns the best hypothesis' new tokens.

    Per prompt it keeps ``num_beams`` running beams and the ``num_beams`` best finished
    hypotheses. Each step ranks ``2 * num_beams`` candidates by summed log-probability;
    the best non-final ones go on, and those among the top ``num_beams`` that end (EOS,
    or the length limit) join the finished set scored ``sum_logprobs / length **
    length_penalty`` (length counts new tokens, EOS included). A prompt is done when its
    finished set is full (``early_stopping``) or no running beam can still beat it.
    """
    n, prompt_len = input_ids.shape
    b, k = num_beams, 2 * num_beams
    width = prompt_len + max_new_tokens
    device = input_ids.device
    seqs = torch.full((n, b, width), pad_token_id, dtype=torch.long, device=device)
    seqs[:, :, :prompt_len] = input_ids[:, None, :]
    prompt_mask = attention_mask.repeat_interleave(b, dim=0)
    running = torch.zeros(n, b, device=device)
    running[:, 1:] = _UNUSED_BEAM
    fin_scores = torch.full((n, b), _NEG, device=device)  # best first; -inf = empty slot
    fin_seqs = seqs.clone()
    fin_lens = torch.zeros(n, b, dtype=torch.long, device=device)
    can_improve = torch.ones(n, dtype=torch.bool, device=device)
    may_finish_slot = torch.arange(k, device=device) < b  # spares never finish
    for t in range(max_new_tokens):
        cur = prompt_len + t
        flat = seqs[:, :, :cur].reshape(n * b, cur)
        mask = _grow(prompt_mask, t)
        logp = torch.log_softmax(step(flat, mask, position_ids(mask)).float(), dim=-1)
        logp = ban_repeated_ngrams(flat, logp, no_repeat_ngram_size)
        vocab = logp.shape[-1]
        totals = (logp.view(n, b, vocab) + running[..., None]).view(n, b * vocab)
        cand_scores, cand_index = totals.topk(k, dim=-1)
        cand = _take(seqs, cand_index // vocab).clone()
        tokens = cand_index % vocab
        cand[:, :, cur] = tokens
        ends = (tokens == eos_token_id) | (cur + 1 >= width)

        keep = cand_scores.masked_fill(ends, _NEG).topk(b, dim=-1).indices
        running, seqs = _take(cand_scores, keep), _take(cand, keep)

        full = (fin_scores > _NEG).all(-1)
        finishing = (ends & may_finish_slot & can_improve[:, None]
                     & ~(full & early_stopping)[:, None])
        new_scores = (cand_scores / (t + 1) ** length_penalty).masked_fill(~finishing, _NEG)
        best = torch.cat([fin_scores, new_scores], dim=1).topk(b, dim=-1).indices
        fin_scores = _take(torch.cat([fin_scores, new_scores], dim=1), best)
        fin_seqs = _take(torch.cat([fin_seqs, cand], dim=1), best)
        fin_lens = _take(torch.cat([fin_lens, torch.full_like(new_scores, t + 1,
                                                              dtype=torch.long)], dim=1), best)

        full = (fin_scores > _NEG).all(-1)
        best_possible = running[:, 0] / (t + 1) ** length_penalty
        can_improve &= ~full | (best_possible > fin_scores.min(-1).values)
        if not bool((can_improve & ~(full & early_stopping)).any()) or bool(ends.all()):
            break
    return [fin_seqs[i, 0, prompt_len : prompt_len + int(fin_lens[i, 0])].tolist()
            for i in range(n)]


def decode(
    step: StepFn,
    input_ids: Tensor,
    attention_mask: Tensor,
    settings: GenerationSettings,
    *,
    eos_token_id: int,
    pad_token_id: int,
) -> list[list[int]]:
    """Greedy for ``num_beams == 1``, beam search otherwise, from one settings object."""
    common = dict(eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                  max_new_tokens=settings.max_new_tokens,
                  no_repeat_ngram_size=settings.no_repeat_ngram_size)
    if settings.num_beams == 1:
        return greedy_search(step, input_ids, attention_mask, **common)
    return beam_search(step, input_ids, attention_mask, num_beams=settings.num_beams,
                       length_penalty=settings.length_penalty,
                       early_stopping=settings.early_stopping, **common)


@torch.no_grad()
def split_generate(
    client: ClientSegment,
    server: ServerSegment,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: GenerationSettings | None = None,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> list[str]:
    """Continue each prompt through the split model; same batching, cleaning and result as
    :func:`hsplitlora.eval.generate.generate` on the assembled model."""
    settings = settings or GenerationSettings()
    device = torch.device(device)
    modes = client.training, server.training
    client.eval()
    server.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    step = split_step(client, server)
    out: list[str] = [""] * len(prompts)
    try:
        batches = prompt_batches(tokenizer, prompts, batch_size, device)
        for idx, enc in tqdm(batches, total=-(-len(prompts) // batch_size),
                             disable=not show_progress, desc="split generate"):
            new = decode(step, enc["input_ids"], enc["attention_mask"], settings,
                         eos_token_id=int(tokenizer.eos_token_id), pad_token_id=int(pad))
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True),
                               strict=True):
                out[i] = clean_continuation(text)
    finally:
        client.train(modes[0])
        server.train(modes[1])
    return out
