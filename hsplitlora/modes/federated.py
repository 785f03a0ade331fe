"""FedLoRA: every client trains the whole model on its shard; adapters FedAvg'd."""

from hsplitlora.modes import Mode

MODE = Mode(name="federated", summary="every client: whole model (FedLoRA)",
            schedule="parallel", server="none", placements=frozenset({"inprocess", "ray"}),
            color="Greens")
