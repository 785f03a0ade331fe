"""SplitLoRA (SFL-V2, as its paper and code): one shared server-side adapter, updated on
each client's batch in turn; client-side adapters FedAvg'd every I local steps. On
heterogeneous devices every client gets the weakest client's rank."""

from hsplitlora.modes import Mode

MODE = Mode(name="splitlora", summary="SplitLoRA (SFL-V2): one shared server-side adapter; "
            "client adapters FedAvg'd", schedule="parallel", server="shared",
            weakest_rank=True, color="Oranges")
