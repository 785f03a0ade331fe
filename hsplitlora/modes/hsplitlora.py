"""HSplitLoRA: important-weight identification (IWI), adaptive rank and split-point
configuration per client (ARMSC), noise-free adapter aggregation (NAA); each part can be
switched off for ablation (``hetero.importance``, ``hetero.adaptive``,
``hetero.aggregator``).

Its server side is shared: one server-side adapter per block, trained on every client's
batch that reaches it, each client served from its own cut. The published descriptions
leave this open; measured on ``configs/experiments/server_side.yaml`` (SmolLM2-135M, 4
heterogeneous clients, 30 steps), held-out perplexity 4.17 shared against 4.95 with one
server-side copy per client, at the same plans, bytes and simulated time
(docs/hsplitlora.md). ``hetero.server_side: per_participant`` gives the other; the
shared side also takes part in HetLoRA's and FlexLoRA's aggregations (``zeropad``,
``svd``), so an aggregator ablation keeps it."""

from hsplitlora.modes import Mode

MODE = Mode(name="hsplitlora", summary="HSplitLoRA: per-client cuts and ranks, noise-free "
            "aggregation", schedule="parallel", server="shared", aggregator=None,
            planned=True, importance=True, adaptive=True, color="RdPu")
