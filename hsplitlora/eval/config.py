"""The ``eval`` section: held-out loss and perplexity, and E2E decoding."""

from __future__ import annotations

from pydantic import Field

from hsplitlora.section import Section

__all__ = ["EvalConfig"]


class EvalConfig(Section):
    max_examples: int = Field(256, ge=0, description="held-out examples for loss/perplexity "
                              "at the end of training; 0 = skip")
    batch_size: int = Field(8, ge=1, description="evaluation batch size")
    every: int = Field(0, ge=0, description="also evaluate every N aggregations during "
                       "training (centralized: every N x agg_interval x num_clients steps); "
                       "0 = only at the end")
    num_beams: int = Field(10, ge=1, description="beam width for `hsplitlora evaluate` "
                           "(SplitLoRA's E2E decoding uses 10); 1 = greedy")
    max_mrs: int | None = Field(None, ge=1, description="distinct test MRs that "
                                "`hsplitlora evaluate` generates for; null = all")
