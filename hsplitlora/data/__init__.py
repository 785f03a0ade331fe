"""Data layer: load E2E, JSONL or Hugging Face examples (``e2e``, ``jsonl``, ``hf``,
``formats``), tokenise with the loss on the target (``tokenize``), shard for clients
(``partition``). Import from the modules: reading the ``data`` section (``config``) must
not import torch."""
