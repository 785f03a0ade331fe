"""FFA-LoRA (Sun et al., ICLR 2024): federated LoRA with every A frozen at its common
random initialisation and only B trained and averaged. With one A for all, the average
of the clients' B A is avg(B) A: FedAvg is exact, and only B travels."""

from hsplitlora.modes import Mode

MODE = Mode(name="ffalora", summary="FFA-LoRA: federated, A frozen at its init, only B "
            "trained and averaged (exact FedAvg)", schedule="parallel", server="none",
            trains=("B",), placements=frozenset({"inprocess", "ray"}), color="Greys")
