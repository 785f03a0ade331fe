"""The coverage sweep: which causal LMs transformers ships split exactly, at every cut.

For each entry of transformers' causal-LM registry, :func:`check` builds the architecture
tiny from its own config class (:func:`tiny_config`), attaches LoRA to every target the
structure discovery finds, and compares logits and LoRA gradients of ``server(client(x))``
with the unsplit model at every cut, on a right-padded batch. Used by
``tests/models/test_coverage.py`` and ``scripts/coverage_sweep.py`` (which writes the table
in ``docs/architectures.md``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from hsplitlora.models.lora import LoraSettings, attach_lora, lora_parameters
from hsplitlora.models.split import split_model
from hsplitlora.models.structure import SplitError, arch_spec

__all__ = ["ATOL", "Result", "check", "registry", "text_decoder", "tiny_config"]

ATOL = 1e-5  # fp32: what an exact split must meet for logits and LoRA gradients
GRAD_RTOL = 1e-4  # gradients also get this relative slack (summation order differs)

# Shared small sizes; a config class takes those of its fields it has.
_TINY: dict[str, Any] = dict(
    num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, vocab_size=320, max_position_embeddings=128,
    n_layer=4, n_embd=32, n_head=4, n_positions=128, num_layers=4, n_layers=4, d_model=32,
    moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, shared_expert_intermediate_size=32, ffn_dim=64, n_inner=64,
    sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1,
    tie_word_embeddings=False, is_decoder=True, use_cache=False,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
# Per model_type: sizes that must agree with each other in ways _TINY cannot know.
_MLA = dict(qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, kv_lora_rank=16,
            q_lora_rank=16, head_dim=8, num_key_value_heads=4, n_group=1, topk_group=1)
_EXTRA: dict[str, dict[str, Any]] = {
    "codegen": dict(rotary_dim=8), "gptj": dict(rotary_dim=8),
    "deepseek_v2": _MLA, "deepseek_v3": _MLA, "deepseek_v32": _MLA, "glm4_moe_lite": _MLA,
    "glm_moe_dsa": _MLA, "axk1": _MLA, "axk2": _MLA, "minicpm3": _MLA, "sarvam_mla": _MLA,
    "longcat_flash": _MLA, "youtu": _MLA,
    "gpt_neo": dict(attention_types=[[["global", "local"], 2]], window_size=4),
    "mamba2": dict(num_heads=8, head_dim=8, n_groups=1, expand=2),
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=16,
                      mamba_chunk_size=8),
    "bamba": dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_expand=2),
    "granitemoehybrid": dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1,
                             mamba_expand=2),
    "bailing_hybrid": dict(n_group=1, topk_group=1), "beam": dict(n_group=1, topk_group=1),
    "dots1": dict(n_shared_experts=1), "dots3_note_text": dict(num_key_value_heads=4),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8,
                           indexer_budget=8, indexer_compress_ratio=2, linear_key_head_dim=8,
                           linear_value_head_dim=8, linear_num_key_heads=2,
                           linear_num_value_heads=4, hc_lowrank=8),
    "zaya": dict(num_experts_per_tok=1),
    # rotary settings per layer type (the full layers without rotary, NoPE)
    "cohere_compass_text": dict(
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0,
                                                   mrope_section=[2, 1, 1]),
                         "full_attention": None}),
    # the modeling reads rope_theta from attn_config, which the config class does not declare
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8),
                 ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2)),
    # the KV-sharing layers need a producing layer of each type before them
    "gemma3n_text": dict(layer_types=["sliding_attention", "full_attention"] * 2,
                         num_kv_shared_layers=2, vocab_size_per_layer_input=320,
                         hidden_size_per_layer_input=8, laurel_rank=4),
    "zamba2": dict(layers_block_type=["linear_attention", "hybrid"] * 2, mamba_d_state=16,
                   chunk_size=8, adapter_rank=4),
    "deepseek_v4": dict(q_lora_rank=16, o_groups=2, o_lora_rank=8, index_n_heads=2,
                        index_head_dim=8, index_topk=4),
    "kimi_linear": dict(_MLA, linear_head_dim=8, linear_num_heads=4,
                        layer_types=["linear_attention"] * 3 + ["full_attention"]),
    "gemma4_assistant": dict(backbone_hidden_size=32),
    "gemma4_unified_assistant": dict(backbone_hidden_size=32),
}
# Per model_type: the model_type of its text_config, built tiny too (with these changes);
# the config class's default text_config is full size.
_ASSISTANT = dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
                  num_kv_shared_layers=4)  # a Gemma 4 drafter's text model: all shared
_TEXT_CONFIG: dict[str, tuple[str, dict[str, Any]]] = {
    "emu3": ("emu3_text_model", {}), "fuyu": ("persimmon", {}),
    "gemma4_assistant": ("gemma4_text", _ASSISTANT),
    "gemma4_unified_assistant": ("gemma4_unified_text", _ASSISTANT),
}

# Encoder models that transformers also ships as causal LMs (``is_decoder=True``): swept,
# but not counted among the decoder-only architectures.
_ENCODERS = {
    "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie",
    "megatron-bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer",
    "xlm-roberta", "xlm-roberta-xl", "xmod", "xlm", "xlnet", "reformer",
}

# Speculative-decoding drafters: their forward ignores input_ids and runs on the target
# model's hidden states and KV states (the target here is multimodal Gemma 4), so they are
# no language model of their own: swept, but not counted either.
_DRAFTERS = {"gemma4_assistant", "gemma4_unified_assistant"}


@dataclass(frozen=True)
class Result:
    """The outcome for one architecture."""

    model_type: str
    status: str  # exact | refused | wrong | skipped
    reason: str = ""
    logit_err: float = 0.0  # worst |split - unsplit| over all cuts
    grad_err: float = 0.0
    seconds: float = 0.0
    blocks: str = ""  # where discovery found the block list, for the table


def registry() -> list[str]:
    """Every model_type with a causal LM class in transformers, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _config_class(model_type: str) -> type:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def text_decoder(model_type: str) -> bool:
    """Whether ``model_type`` is a text-only decoder: not multimodal, not an encoder-decoder,
    not an encoder run as a decoder and not a drafter that runs on another model's states.
    The sweep's 90 % target counts these."""
    from hsplitlora.models.structure import _multimodal

    cls = _config_class(model_type)
    config: Any = cls
    try:
        config = cls()
    except Exception:  # noqa: BLE001 - a config whose defaults do not build: its class
        pass
    enc_dec = not isinstance(config, type) and bool(config.is_encoder_decoder)
    return (model_type not in (_ENCODERS | _DRAFTERS) and not _multimodal(config)
            and not enc_dec)


def tiny_config(model_type: str, **changes: Any) -> Any:
    """A tiny config of ``model_type`` from transformers' own config class."""
    cls = _config_class(model_type)
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    names |= set(getattr(cls, "attribute_map", {}))
    kwargs = {k: v for k, v in _TINY.items() if k in names or k in ("is_decoder",)}
    kwargs.update(_EXTRA.get(model_type, {}), **changes)
    if model_type in _TEXT_CONFIG:
        text_type, changes = _TEXT_CONFIG[model_type]
        kwargs["text_config"] = tiny_config(text_type, **changes)
    return cls(**kwargs)


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(vocab, 320), (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding, as training batches have
    return ids, mask


def _objective(logits: torch.Tensor) -> torch.Tensor:
    return (logits * torch.linspace(-1, 1, logits.shape[-1])).sum()


def _reference(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ref = model(input_ids=ids, attention_mask=mask).logits
    _objective(ref).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return ref.detach(), grads


def _compare(segments: list[tuple[Any, Any]], ids: torch.Tensor, mask: torch.Tensor,
             ref: torch.Tensor, ref_grads: dict[str, torch.Tensor]) -> tuple[float, float]:
    if not ref_grads:
        raise SplitError("no LoRA gradient reaches the unsplit model's adapters")
    logit_err = grad_err = 0.0
    for client, server in segments:
        hidden = client(ids, mask)
        received = hidden.detach().requires_grad_(True)
        logits = server(received, mask)
        logit_err = max(logit_err, float((logits - ref).abs().max()))
        _objective(logits).backward()
        if hidden.requires_grad:
            hidden.backward(received.grad)
        grads = {name: p.grad for seg in (client, server)
                 for name, p in seg.named_full_parameters() if p.requires_grad}
        for name, g in ref_grads.items():
            got = grads.get(name)
            if got is None:
                raise RuntimeError(f"no gradient reaches {name} in the split")
            # as torch.testing.assert_close: |got - g| <= atol + rtol |g|, reported in
            # units of atol so that 1 is the bound
            excess = ((got - g).abs() - GRAD_RTOL * g.abs()).max()
            grad_err = max(grad_err, float(excess.clamp(min=0)))
    return logit_err, grad_err


def check(model_type: str, atol: float = ATOL) -> Result:
    """Build ``model_type`` tiny, split it at every cut, compare with the unsplit model."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()

    def done(status: str, reason: str = "", **kw: Any) -> Result:
        return Result(model_type, status, reason, seconds=time.perf_counter() - start, **kw)

    try:
        config = tiny_config(model_type)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float().eval()
    except ImportError as err:
        return done("skipped", f"needs an optional dependency: {str(err).strip()[:120]}")
    except Exception as err:  # noqa: BLE001 - report any failure to build, per architecture
        return done("skipped", f"tiny config does not build: {type(err).__name__}: "
                    f"{str(err).strip().splitlines()[0][:120] if str(err).strip() else ''}")
    try:
        spec = arch_spec(model)
    except SplitError as err:
        return done("refused", str(err))
    try:
        attach_lora(model, LoraSettings(r=2, alpha=4, targets=spec.targets, init_seed=0))
    except ValueError as err:
        return done("refused", f"peft cannot adapt its targets: {str(err)[:160]}",
                    blocks=spec.block_prefix)
    with torch.no_grad():  # B starts at zero; make the adapters matter for the gradients
        for p in lora_parameters(model):
            p.normal_(std=0.2)
    ids, mask = _batch(int(getattr(model.config, "vocab_size", 320)))
    try:  # split before running: segments are copied from a model that has not run yet
        n = int(getattr(model.config, spec.n_layers))
        segments = [split_model(model, cut) for cut in range(n + 1)]
    except SplitError as err:
        return done("refused", str(err), blocks=spec.block_prefix)
    except Exception as err:  # noqa: BLE001 - a crash while splitting is a finding
        return done("wrong", f"split failed: {type(err).__name__}: {str(err)[:120]}",
                    blocks=spec.block_prefix)
    try:
        ref = _reference(model, ids, mask)
    except Exception as err:  # noqa: BLE001 - the unsplit tiny model itself does not run
        return done("skipped", f"tiny model does not run unsplit: {type(err).__name__}: "
                    f"{str(err)[:120]}")
    try:
        logit_err, grad_err = _compare(segments, ids, mask, *ref)
    except SplitError as err:
        return done("refused", str(err), blocks=spec.block_prefix)
    except Exception as err:  # noqa: BLE001 - a crash while splitting is a finding, not a skip
        logging.getLogger(__name__).debug("split of %s failed", model_type, exc_info=True)
        return done("wrong", f"split run failed: {type(err).__name__}: {str(err)[:120]}",
                    blocks=spec.block_prefix)
    ok = logit_err <= atol and grad_err <= atol
    return done("exact" if ok else "wrong", "" if ok else
                f"logits differ by {logit_err:.2e}, gradients by {grad_err:.2e}",
                logit_err=logit_err, grad_err=grad_err, blocks=spec.block_prefix)
