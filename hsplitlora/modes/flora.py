"""FLoRA: heterogeneous ranks; adapters stacked (exact) and merged into the base."""

from hsplitlora.modes import Mode

MODE = Mode(name="flora", summary="FLoRA: per-client ranks, stacking aggregation merged "
            "into the base", schedule="parallel", server="per_participant",
            aggregator="stack", planned=True, unsplit_variant=True, color="PuBu")
