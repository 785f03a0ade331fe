"""Differential privacy on what leaves a client, and the attacks that measure it
(docs/privacy.md says exactly what is protected and what is not)."""
