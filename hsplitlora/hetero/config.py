"""The ``hetero`` section: the heterogeneous clients (HSplitLoRA and its baselines), their
devices and the three switchable parts (IWI, ARMSC, NAA)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from hsplitlora.hetero.profiles import ScenarioConfig
from hsplitlora.section import Section

__all__ = ["HeteroConfig"]


class HeteroConfig(Section):
    """Heterogeneous clients (HSplitLoRA): device budgets and the three switchable parts."""

    scenario: ScenarioConfig = Field(default_factory=ScenarioConfig,
                                     description="client devices (memory, compute, links)")
    importance: bool = Field(True, description="IWI: place adapters by measured importance; "
                             "false = every candidate matrix equally important")
    adaptive: bool = Field(True, description="ARMSC: per-client cut and ranks from its budget; "
                           "false = every client at train.cut with rank lora.r")
    aggregator: Literal["noisefree", "stack", "svd", "zeropad", "fedavg"] = Field(
        "noisefree", description="hsplitlora's aggregation (the baselines fix their own)")
    federated: bool = Field(False, description="hetlora/flexlora/flora: unsplit, every client "
                            "trains the whole model (its budget must allow it)")
    rank_set: list[int] = Field([0, 2, 4, 8, 16], description="candidate ranks Q (0 = none)")
    hetlora_weights: Literal["sparsity", "samples"] = Field(
        "sparsity", description="hetlora's aggregation weights: shard size times the norm "
        "of the client's update ||B A|| (its paper's sparsity weighting), or shard size")
    prune_gamma: float = Field(0.9, gt=0, le=1, description="hetlora rank self-pruning: a "
                               "prune keeps floor(gamma r) of a matrix's r ranks (at least "
                               "1), so ranks decay geometrically over rounds")
    prune_lambda: float = Field(0.0, ge=0, description="hetlora: weight of its paper's "
                                "regulariser lambda ||B_tail|| ||A_tail|| on the trailing "
                                "(1 - gamma) ranks, added to every local step so that they "
                                "shrink and self-pruning drops them; 0 = off (its value is "
                                "not known from the paper)")
    prune_threshold: float = Field(0.05, ge=0, lt=1, description="hetlora: at each "
                                   "aggregation a client prunes a matrix's trailing ranks "
                                   "when their share of its update, ||B_tail A_tail|| / "
                                   "||B A||, is below this; 0 = never prune")
    server_rank: int | None = Field(8, ge=0, description="rank of the server-side adapters "
                                    "(0 = none); null = planned by ARMSC: the rank of "
                                    "rank_set whose plans progress fastest")
    server_side: Literal["shared", "per_participant"] | None = Field(
        None, description="the main server's adapters: per_participant = one copy per "
        "client from its cut (SFL-V1), shared = one adapter per block trained on every "
        "client's batch that reaches it (SplitLoRA's, from each client's cut; merging "
        "aggregators only); null = the mode's")
    cuts: list[int] | None = Field(None, description="cuts the planner may choose; "
                                   "null = 1 .. L-1")
    time_budget_s: float | None = Field(None, gt=0, description="hard per-step time limit of "
                                        "a client (cost model); null = none")
    round_time_s: float | None = Field(None, gt=0, description="round deadline the planner "
                                       "plans every client for; null = the deadline with "
                                       "the most progress per second; .inf = memory only")
    probe_batches: int = Field(2, ge=1, description="batches per importance estimate")
    ema_beta: float = Field(0.8, ge=0, lt=1, description="importance smoothing over rounds")
    replan_threshold: float = Field(0.2, ge=0, le=2, description="re-plan when the importance "
                                    "ranking moved by more than this (1 - Kendall tau)")

    @model_validator(mode="after")
    def _ranks(self) -> HeteroConfig:
        if any(r < 0 for r in self.rank_set) or not any(r > 0 for r in self.rank_set):
            raise ValueError("hetero.rank_set needs non-negative ranks and at least one > 0")
        return self
