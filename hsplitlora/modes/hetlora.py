"""HetLoRA: heterogeneous ranks; one global adapter of the largest rank, zero-padded
average of the clients', truncated back to each; clients self-prune their trailing ranks."""

from hsplitlora.modes import Mode

MODE = Mode(name="hetlora", summary="HetLoRA: per-client ranks, zero-padding aggregation",
            schedule="parallel", server="per_participant", aggregator="zeropad",
            planned=True, unsplit_variant=True, self_pruning=True, color="YlOrBr")
