"""The roles behind a network: gRPC streams, TLS and tokens, compression, recovery.

Deliberately empty: ``hsplitlora.config`` imports :mod:`hsplitlora.transport.config`, so
this package must not pull in torch or gRPC on import. The pieces:

* :mod:`~hsplitlora.transport.deploy`: ``serve``, ``join``, ``serve_fed``, the three
  processes of a deployment, each from one config (``hsplitlora serve | join | fedserver``);
* :mod:`~hsplitlora.transport.server`: the :class:`Coordinator` that wraps a real
  ``MainServer`` and serves every client's stream in client-id order;
* :mod:`~hsplitlora.transport.client`: :class:`RemoteMainServer` (``MainServer.step`` over a
  stream) and :class:`ClientRunner` (the client loop with snapshots and rejoins);
* :mod:`~hsplitlora.transport.fed`: the fed server's aggregation rounds and its proxy;
* :mod:`~hsplitlora.transport.wire`, ``codec``, ``validate``, ``security``: safetensors
  frames, wire compression, arrival checks, TLS and tokens.

docs/deploy.md shows how to start a run.
"""
