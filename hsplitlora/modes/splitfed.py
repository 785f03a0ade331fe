"""SFL-V1: clients in parallel, one server-side copy per client, both sides FedAvg'd."""

from hsplitlora.modes import Mode

MODE = Mode(name="splitfed", summary="SFL-V1: one server-side adapter per client; both "
            "sides averaged", schedule="parallel", server="per_participant", color="Reds")
