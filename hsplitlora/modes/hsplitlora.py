"""HSplitLoRA: important-weight identification (IWI), adaptive rank and split-point
configuration per client (ARMSC), noise-free adapter aggregation (NAA); each part can be
switched off for ablation (``hetero.importance``, ``hetero.adaptive``,
``hetero.aggregator``)."""

from hsplitlora.modes import Mode

MODE = Mode(name="hsplitlora", summary="HSplitLoRA: per-client cuts and ranks, noise-free "
            "aggregation", schedule="parallel", server="per_participant", aggregator=None,
            planned=True, importance=True, adaptive=True, color="RdPu")
