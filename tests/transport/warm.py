"""Imported once by the harness's fork server: load a tiny model from disk, so the forked
parties inherit transformers' warmed caches (its first load compiles ~1000 regexes, about
a second per process) instead of paying for them again each."""

from __future__ import annotations

import tempfile

import transformers

from tests.conftest import tiny_model

with tempfile.TemporaryDirectory() as _dir:
    tiny_model("llama").save_pretrained(_dir)
    transformers.AutoModelForCausalLM.from_pretrained(_dir)
