"""CenLoRA: one party holds the whole model and all the data (the upper baseline)."""

from hsplitlora.modes import Mode

MODE = Mode(name="centralized", summary="one party: whole model, all data (CenLoRA)",
            schedule="centralized", server="none", aggregator=None,
            placements=frozenset({"inprocess", "ray"}), color="Blues")
