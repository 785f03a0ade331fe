"""Process settings: torch threads and glibc keeping freed memory for reuse."""

from __future__ import annotations

import ctypes.util
import platform

import pytest
import torch

from hsplitlora.config import RunConfig
from hsplitlora.runtime import process
from hsplitlora.train import run as run_module
from hsplitlora.train.run import prepare
from tests.conftest import E2E, tiny_model


def _cfg(tmp_path, keep: bool) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 8, "max_length": 64},
        "train": {"num_clients": 2, "cut": 1, "steps": 1, "threads": 1, "keep_memory": keep},
        "output": {"dir": str(tmp_path), "sample_prompt": None},
    })


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_glibc_accepts_keeping_freed_memory():
    assert ctypes.util.find_library("c") is not None
    assert process.keep_freed_memory() is True


@pytest.mark.parametrize("keep", [True, False])
def test_prepare_sets_threads_and_keeps_memory_only_when_asked(tmp_path, tiny_tokenizer,
                                                               monkeypatch, keep):
    calls = []
    monkeypatch.setattr(run_module, "keep_freed_memory", lambda: calls.append(1) or True)
    threads = torch.get_num_threads()
    try:
        prepare(_cfg(tmp_path, keep), tiny_model("llama"), tiny_tokenizer)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert calls == ([1] if keep else [])
