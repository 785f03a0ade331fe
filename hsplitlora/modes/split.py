"""Vanilla split learning: clients take turns, the one client-side adapter is relayed."""

from hsplitlora.modes import Mode

MODE = Mode(name="split", summary="clients take turns; one client-side adapter relayed "
            "client to client, one server-side adapter", schedule="relay", server="shared",
            aggregator=None, placements=frozenset({"inprocess", "ray"}), color="Purples")
