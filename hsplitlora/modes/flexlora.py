"""FlexLoRA: heterogeneous ranks; the weighted full update is re-factorised per client
by SVD."""

from hsplitlora.modes import Mode

MODE = Mode(name="flexlora", summary="FlexLoRA: per-client ranks, SVD aggregation",
            schedule="parallel", server="per_participant", aggregator="svd", planned=True,
            unsplit_variant=True, color="BuGn")
