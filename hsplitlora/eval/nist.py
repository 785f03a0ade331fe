"""NIST-5 as the E2E challenge scorer's Python mteval computes it, on pre-tokenised text."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

__all__ = ["BETA", "corpus_nist", "length_penalty"]

# mteval-v13a picks beta so that an output 2/3 as long as the references scores half.
BETA = -math.log(0.5) / math.log(1.5) ** 2

NGram = tuple[str, ...]


def _ngrams(tokens: Sequence[str], n: int) -> Counter[NGram]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def length_penalty(hyp_len: float, ref_len: float) -> float:
    """Penalty for outputs shorter than the references; never rewards longer ones."""
    ratio = hyp_len / ref_len if ref_len > 0 else 1.0
    if ratio >= 1.0:
        return 1.0
    if ratio <= 0.0:
        return 0.0
    return math.exp(-BETA * math.log(ratio) ** 2)


def corpus_nist(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[Sequence[str]]],
    max_n: int = 5,
) -> float:
    """Corpus NIST of token lists against groups of reference token lists.

    Definition (the E2E scorer's ``pymteval``, which is what the challenge's numbers use):
    an n-gram's information weight is ``log2(count(prefix) / count(ngram))`` counted over
    *every reference of this corpus* (the prefix of a unigram is the empty 0-gram, whose
    count is the total number of reference tokens), so NIST depends on the evaluated set.
    Hits are clipped by the largest count in any one reference of the segment. Each order
    contributes its information sum divided by the number of hypothesis n-grams of that
    order; the length penalty compares the total hypothesis length with the sum of the
    segments' *mean* reference lengths. With a variable number of references per segment
    this differs from the Perl ``mteval-v13a.pl``, and the E2E numbers are this one.

    One deliberate difference: the scorer counts ``len - n + 1`` n-grams per hypothesis even
    when that is negative (hypotheses shorter than n - 1 tokens); we count real n-grams
    (never below zero). Results agree whenever every hypothesis has at least ``max_n - 1``
    tokens.
    """
    if len(hypotheses) != len(references):
        raise ValueError(
            f"corpus_nist: {len(hypotheses)} hypotheses but {len(references)} reference "
            "groups; pass exactly one group of references per hypothesis"
        )
    ref_counts: list[Counter[NGram]] = [Counter() for _ in range(max_n + 1)]
    hits: list[Counter[NGram]] = [Counter() for _ in range(max_n + 1)]
    hyp_ngram_totals = [0] * (max_n + 1)
    hyp_len = 0
    mean_ref_len_sum = 0.0
    for index, (hyp, refs) in enumerate(zip(hypotheses, references, strict=True)):
        if not refs:
            raise ValueError(f"corpus_nist: reference group {index} is empty; give at least one")
        hyp_len += len(hyp)
        ref_lens = [len(ref) for ref in refs]
        ref_counts[0][()] += sum(ref_lens)
        mean_ref_len_sum += sum(ref_lens) / len(refs)
        for n in range(1, max_n + 1):
            ref_ngrams = [_ngrams(ref, n) for ref in refs]
            for counts in ref_ngrams:
                ref_counts[n].update(counts)
            clip: Counter[NGram] = Counter()
            for counts in ref_ngrams:
                clip |= counts  # elementwise max over the references
            hyp_ngrams = _ngrams(hyp, n)
            hyp_ngram_totals[n] += sum(hyp_ngrams.values())
            hits[n].update(hyp_ngrams & clip)  # elementwise min: clipped hits
    score = 0.0
    for n in range(1, max_n + 1):
        if hyp_ngram_totals[n] == 0:
            continue
        info = sum(
            math.log2(ref_counts[n - 1][ngram[:-1]] / ref_counts[n][ngram]) * count
            for ngram, count in hits[n].items()
        )
        score += info / hyp_ngram_totals[n]
    return length_penalty(hyp_len, mean_ref_len_sum) * score
