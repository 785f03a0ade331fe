"""HetLoRA: heterogeneous ranks, aggregated by zero-padding to the largest rank."""

from hsplitlora.modes import Mode

MODE = Mode(name="hetlora", summary="HetLoRA: per-client ranks, zero-padding aggregation",
            schedule="parallel", server="per_participant", aggregator="zeropad",
            planned=True, unsplit_variant=True, color="YlOrBr")
