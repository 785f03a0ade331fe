import pytest
import torch
import transformers

from hsplitlora.hetero.costmodel import (
    ModelDims,
    Workload,
    adapter_bytes,
    bytes_down,
    bytes_up,
    client_flops,
    client_memory,
    server_flops,
    server_memory,
    step_time,
)
from hsplitlora.hetero.measure import counted_flops, saved_bytes
from hsplitlora.hetero.profiles import DeviceProfile
from hsplitlora.models.lora import LoraSettings, attach_lora, lora_parameters, target_module_names
from hsplitlora.models.split import ARCHITECTURES, arch_spec, split_model, split_u
from hsplitlora.roles.messages import Activations, ServerReply, nbytes
from hsplitlora.runtime.optim import Optimizer, OptimSettings, causal_lm_loss

LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_ALL = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
BATCH, SEQ, VOCAB = 3, 32, 320


def _config(arch: str, layers: int = 4, **extra) -> transformers.PretrainedConfig:
    if arch == "gpt2":
        return transformers.GPT2Config(**{
            "n_layer": layers, "n_embd": 64, "n_head": 4, "n_positions": 64,
            "vocab_size": VOCAB, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            **extra})
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig, "qwen3": transformers.Qwen3Config,
           "gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config}[arch]
    return cls(num_hidden_layers=layers, hidden_size=64, intermediate_size=160,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
               max_position_embeddings=64, **extra)


def _model(arch: str, attn: str = "sdpa", dtype=torch.float32, **extra):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        _config(arch, **extra), attn_implementation=attn)
    return model.to(dtype)


def _lora(model, targets, ranks=None, dropout=0.0):
    """Attach LoRA (rank 4 unless ``ranks`` says otherwise); return the plan it realises."""
    names = target_module_names(model, targets)
    plan = {n: (ranks or {}).get(n, 0 if ranks else 4) for n in names}
    attach_lora(model, LoraSettings(r=4, alpha=8, targets=targets, dropout=dropout, ranks=plan))
    return {n: r for n, r in plan.items() if r > 0}


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, SEQ - 7:] = 0  # padding, as training batches have
    return ids, mask


def _frozen_bytes(segment):
    return sum(p.numel() * p.element_size() for n, p in segment.named_parameters()
               if ".lora_" not in n)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_parameter_count_matches_the_model(arch):
    config = _config(arch, layers=2, **({"attention_bias": True} if arch == "qwen3" else {}))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    dims = ModelDims.from_config(model.config)
    assert dims.params == sum(p.numel() for p in model.parameters())
    spec = arch_spec(model)
    block = getattr(model, spec.backbone).get_submodule(spec.blocks)[0]
    assert dims.block_params == sum(p.numel() for p in block.parameters())
    names = set(target_module_names(model, spec.targets))
    assert set(dims.candidate_modules()) == names
    modules = dict(model.named_modules())
    for name in names:
        _, matrix = dims.locate(name)
        weight = modules[name].weight
        shape = weight.shape[::-1] if arch == "gpt2" else weight.shape  # Conv1D is (in, out)
        assert tuple(shape) == (matrix.d_out, matrix.d_in), name


def test_candidates_follow_targets_and_bad_names_are_explained():
    dims = ModelDims.from_config(_config("llama"), targets=("q_proj", "down_proj"))
    assert [m.kind for m in dims.candidates] == ["q", "down"]
    assert len(dims.candidate_modules(range(1, 3))) == 4
    with pytest.raises(ValueError, match="unknown target"):
        ModelDims.from_config(_config("llama"), targets=("c_attn",))
    with pytest.raises(KeyError, match=r"model\.layers\.<0\.\.3>"):
        dims.locate("model.layers.9.self_attn.q_proj")
    with pytest.raises(KeyError):
        client_memory(dims, 2, {"model.layers.0.attn.c_attn": 4}, Workload(1, 8))
    with pytest.raises(ValueError, match="cut 5 is out of range"):
        client_memory(dims, 5, {}, Workload(1, 8))
    with pytest.raises(ValueError, match="'bf16' or 'fp32'"):
        Workload.for_precision("fp16", 1, 8)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_weights_are_the_segments_parameter_bytes(arch, dtype):
    model = _model(arch, dtype=dtype)
    plan = _lora(model, None)
    dims = ModelDims.from_config(model.config)
    work = Workload(BATCH, SEQ, weight_bytes=2 if dtype == torch.bfloat16 else 4)
    for cut in range(dims.n_layers + 1):
        client, server = split_model(model, cut)
        assert client_memory(dims, cut, plan, work).frozen_weights == _frozen_bytes(client)
        assert server_memory(dims, cut, plan, work).frozen_weights == _frozen_bytes(server)


@pytest.mark.parametrize("arch, targets", [("llama", None), ("llama", LLAMA_ALL),
                                           ("gpt2", None), ("gpt2", GPT2_ALL)])
@pytest.mark.parametrize("cut", [1, 3])
def test_flops_match_torch_flop_counter(arch, targets, cut):
    # Eager attention: the counter cannot see inside CPU SDPA.
    model = _model(arch, attn="eager")
    plan = _lora(model, targets)
    dims = ModelDims.from_config(model.config)
    work = Workload.for_precision("fp32", BATCH, SEQ)
    client, server = split_model(model, cut)
    ids, mask = _batch()
    client_fwd, hidden = counted_flops(lambda: client(ids, mask))
    received = hidden.detach().requires_grad_(True)
    server_fwd, loss = counted_flops(lambda: causal_lm_loss(server(received, mask), ids)[0])
    server_bwd, _ = counted_flops(loss.backward)
    client_bwd, _ = counted_flops(lambda: hidden.backward(received.grad))
    c, s = client_flops(dims, cut, plan, work), server_flops(dims, cut, plan, work)
    assert c.forward == pytest.approx(client_fwd, rel=0.10)
    assert s.forward == pytest.approx(server_fwd, rel=0.10)
    assert (c.forward, s.forward, s.backward) == (client_fwd, server_fwd, server_bwd)  # exact
    # The first block's backward is modelled whole when only some of q, k, v are adapted.
    assert c.backward == pytest.approx(client_bwd, rel=0.10)
    if targets is not None:
        assert c.backward == client_bwd


def test_client_backward_starts_at_the_earliest_adapter():
    model = _model("llama", attn="eager")
    plan = _lora(model, LLAMA_ALL, ranks={"model.layers.1.self_attn.o_proj": 2,
                                          "model.layers.2.mlp.down_proj": 8})
    dims = ModelDims.from_config(model.config)
    client, _ = split_model(model, 3)
    ids, mask = _batch()
    _, hidden = counted_flops(lambda: client(ids, mask))
    measured, _ = counted_flops(lambda: hidden.backward(torch.ones_like(hidden)))
    assert client_flops(dims, 3, plan, Workload.for_precision("fp32", BATCH, SEQ)).backward \
        == measured
    assert client_flops(dims, 3, {}, Workload(BATCH, SEQ)).backward == 0


UP_ONLY = {"model.layers.0.mlp.up_proj": 4, "model.layers.2.mlp.down_proj": 4}
CASES = [  # arch, precision, LoRA dropout, targets, plan (None: rank 4 everywhere), exact?
    ("llama", "fp32", 0.0, None, None, True),
    ("llama", "fp32", 0.0, LLAMA_ALL, None, True),
    ("qwen2", "fp32", 0.0, LLAMA_ALL, None, True),
    ("gpt2", "fp32", 0.0, GPT2_ALL, None, True),
    ("llama", "fp32", 0.0, LLAMA_ALL, {"model.layers.1.self_attn.o_proj": 2,
                                        "model.layers.2.self_attn.q_proj": 8}, True),
    ("llama", "fp32", 0.1, LLAMA_ALL, None, True),
    ("gpt2", "fp32", 0.1, None, None, True),
    ("llama", "bf16", 0.0, None, None, True),
    ("llama", "bf16", 0.1, LLAMA_ALL, None, True),
    ("mistral", "bf16", 0.0, LLAMA_ALL, None, True),
    # CPU autocast keeps GPT-2's LayerNorm in bf16; the model assumes fp32 as on CUDA.
    ("gpt2", "bf16", 0.0, None, None, False),
    ("gpt2", "bf16", 0.1, GPT2_ALL, None, False),
    # Block 0 adapts only up_proj: the model counts the whole MLP stage as kept.
    ("llama", "fp32", 0.0, LLAMA_ALL, UP_ONLY, False),
]


@pytest.mark.parametrize("arch, precision, dropout, targets, ranks, exact", CASES)
def test_activation_memory_matches_saved_tensors(arch, precision, dropout, targets, ranks,
                                                 exact):
    bf16 = precision == "bf16"
    model = _model(arch, dtype=torch.bfloat16 if bf16 else torch.float32)
    plan = _lora(model, targets, ranks, dropout)
    dims = ModelDims.from_config(model.config)
    work = Workload.for_precision(precision, BATCH, SEQ, lora_dropout=dropout)
    client, server = split_model(model, 3)
    client.train()
    server.train()
    ids, mask = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        client_kept, hidden = saved_bytes(lambda: client(ids, mask), list(client.parameters()))
        received = hidden.detach().requires_grad_(True)
        server_kept, _ = saved_bytes(lambda: causal_lm_loss(server(received, mask), ids)[0],
                                      list(server.parameters()))
    predicted_client = client_memory(dims, 3, plan, work).activations
    predicted_server = server_memory(dims, 3, plan, work).activations
    assert predicted_client == pytest.approx(client_kept, rel=0.25)
    assert predicted_server == pytest.approx(server_kept, rel=0.25)
    # Never an under-estimate, and exact where the module docstring says so.
    assert predicted_client >= client_kept and predicted_server >= server_kept
    if exact:
        assert (predicted_client, predicted_server) == (client_kept, server_kept)
    if arch != "gpt2":
        assert predicted_server == server_kept


def test_gpt2_residual_dropout_masks_are_counted():
    model = _model("gpt2", resid_pdrop=0.1)
    plan = _lora(model, None)
    dims = ModelDims.from_config(model.config)
    client, _ = split_model(model, 2)
    client.train()
    ids, mask = _batch()
    kept, _ = saved_bytes(lambda: client(ids, mask), list(client.parameters()))
    assert client_memory(dims, 2, plan, Workload.for_precision("fp32", BATCH, SEQ)).activations \
        == kept


def test_no_adapter_no_activations_and_unpadded_batches_keep_less():
    dims = ModelDims.from_config(_config("llama"))
    work = Workload(BATCH, SEQ)
    assert client_memory(dims, 3, {}, work).activations == 0
    plan = dict.fromkeys(dims.candidate_modules(range(4)), 4)
    padded = client_memory(dims, 3, plan, work).activations
    unpadded = client_memory(dims, 3, plan, Workload(BATCH, SEQ, padded=False)).activations
    assert unpadded < padded


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_state_matches_real_adapters_and_adamw(precision):
    bf16 = precision == "bf16"
    model = _model("llama", dtype=torch.bfloat16 if bf16 else torch.float32)
    plan = _lora(model, LLAMA_ALL, ranks={"model.layers.0.self_attn.q_proj": 2,
                                          "model.layers.1.mlp.up_proj": 16,
                                          "model.layers.3.mlp.down_proj": 8})
    dims = ModelDims.from_config(model.config)
    work = Workload.for_precision(precision, BATCH, SEQ)
    client, server = split_model(model, 2)
    ids, mask = _batch()
    optimizer = Optimizer(lora_parameters(client), OptimSettings())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = client(ids, mask)
        hidden.float().square().mean().backward()
    optimizer.step()
    params = lora_parameters(client)
    memory = client_memory(dims, 2, plan, work)
    assert memory.lora_weights == sum(p.numel() * p.element_size() for p in params)
    assert memory.lora_grads == memory.lora_weights
    moments = [t for state in optimizer.opt.state.values() for k, t in state.items()
               if k != "step"]
    assert memory.optimizer == sum(t.numel() * t.element_size() for t in moments)
    assert server_memory(dims, 2, plan, work).lora_weights == sum(
        p.numel() * p.element_size() for p in lora_parameters(server))
    assert adapter_bytes(dims, plan, work) == memory.lora_weights + sum(
        p.numel() * p.element_size() for p in lora_parameters(server))
    assert memory.total == (memory.frozen_weights + memory.activations + memory.lora_weights
                            + memory.lora_grads + memory.optimizer + memory.exchanged)
    # the hidden state the client sends and holds until its gradient returns
    assert memory.exchanged == hidden.numel() * hidden.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_on_the_wire_match_the_messages(dtype):
    model = _model("llama", dtype=dtype)
    client, server = split_model(model, 2)
    ids, mask = _batch()
    hidden = client(ids, mask)
    upload = Activations(hidden.detach(), mask, ids.clone())
    received = upload.hidden.requires_grad_(True)
    causal_lm_loss(server(received, mask), ids)[0].backward()
    reply = ServerReply(loss=0.0, tokens=0, grad=received.grad)
    size = hidden.element_size()
    assert bytes_up(BATCH, SEQ, model.config.hidden_size, size) == upload.nbytes
    assert bytes_down(BATCH, SEQ, model.config.hidden_size, size) == reply.nbytes


def _u_hops(model, cut, tail, measure):
    """Run the U-shaped split's hops as the parties do, measuring each with ``measure``:
    forward head, middle, tail (with the loss), backward tail, middle, head."""
    head, middle, tail_seg = segments = split_u(model, cut, tail)
    for seg in segments:
        seg.train()
    ids, mask = _batch()
    params = [p for seg in segments for p in seg.parameters()]
    head_fwd, sent = measure(lambda: head(ids, mask), params)
    at_server = sent.detach().requires_grad_(True)
    mid_fwd, returned = measure(lambda: middle(at_server, mask), params)
    at_tail = returned.detach().requires_grad_(True)
    tail_fwd, loss = measure(lambda: causal_lm_loss(tail_seg(at_tail, mask), ids)[0], params)
    tail_bwd, _ = measure(loss.backward, params)
    mid_bwd, _ = measure(lambda: returned.backward(at_tail.grad), params)
    head_bwd, _ = measure(lambda: sent.backward(at_server.grad) if cut else None, params)
    wire = (Activations(sent.detach(), mask, None), at_tail.grad, returned, at_server.grad)
    return segments, (head_fwd, mid_fwd, tail_fwd, tail_bwd, mid_bwd, head_bwd), wire


@pytest.mark.parametrize("cut, tail", [(1, 2), (0, 1)])
def test_u_shaped_costs_match_the_three_segments(cut, tail):
    plan = _lora(_model("llama"), LLAMA_ALL)
    dims = ModelDims.from_config(_config("llama"))
    work = Workload.for_precision("fp32", BATCH, SEQ)
    # FLOPs with eager attention (the counter cannot see inside CPU SDPA)
    eager = _model("llama", attn="eager")
    _lora(eager, LLAMA_ALL)
    _, (head_fwd, mid_fwd, tail_fwd, tail_bwd, mid_bwd, head_bwd), _ = _u_hops(
        eager, cut, tail, lambda fn, params: counted_flops(fn))
    c, s = client_flops(dims, cut, plan, work, tail), server_flops(dims, cut, plan, work, tail)
    assert (c.forward, c.backward) == (head_fwd + tail_fwd, head_bwd + tail_bwd)
    assert (s.forward, s.backward) == (mid_fwd, mid_bwd)
    # the tail's head and blocks move from the server's count to the client's
    assert c.total + s.total == client_flops(dims, cut, plan, work).total + \
        server_flops(dims, cut, plan, work).total
    # memory with SDPA, the kernel the cost model assumes
    model = _model("llama")
    _lora(model, LLAMA_ALL)
    (head, middle, tail_seg), (head_kept, mid_kept, tail_kept, *_), wire = _u_hops(
        model, cut, tail, saved_bytes)
    client_mem = client_memory(dims, cut, plan, work, tail)
    server_mem = server_memory(dims, cut, plan, work, tail)
    assert (client_mem.activations, server_mem.activations) == (head_kept + tail_kept, mid_kept)
    # frozen: the client's two segments share one copy of the embeddings
    client_storages = {p.untyped_storage().data_ptr(): p.numel() * p.element_size()
                       for seg in (head, tail_seg) for n, p in seg.named_parameters()
                       if ".lora_" not in n}
    assert client_mem.frozen_weights == sum(client_storages.values())
    assert server_mem.frozen_weights == _frozen_bytes(middle)
    assert client_mem.lora_weights == sum(4 * p.numel() for seg in (head, tail_seg)
                                          for p in lora_parameters(seg)) > 0
    # both hops each way, and no labels up
    upload, tail_grad, returned, cut_grad = wire
    assert bytes_up(BATCH, SEQ, dims.hidden, 4, tail) == upload.nbytes + nbytes(tail_grad)
    assert bytes_down(BATCH, SEQ, dims.hidden, 4, tail) == nbytes(returned) + nbytes(cut_grad)
    with pytest.raises(ValueError, match="leaves the server no block"):
        server_memory(dims, cut, plan, work, dims.n_layers - cut)


def test_step_time_is_sequential_and_uses_the_slower_link_end():
    dims = ModelDims.from_config(_config("llama"))
    work = Workload(BATCH, SEQ)
    client = DeviceProfile(name="c", memory_bytes=1, flops=1e9, uplink_bps=1e5,
                           downlink_bps=1e6)
    server = DeviceProfile(name="s", memory_bytes=1, flops=1e12, uplink_bps=5e5,
                           downlink_bps=1e9)
    plan = {"model.layers.0.self_attn.q_proj": 8}
    server_plan = {"model.layers.3.mlp.up_proj": 8}
    t = step_time(client, server, dims, 2, plan, server_plan, work)
    assert t.client_compute == pytest.approx(client_flops(dims, 2, plan, work).total / 1e9)
    assert t.server_compute == pytest.approx(server_flops(dims, 2, server_plan, work).total / 1e12)
    assert t.upload == pytest.approx(bytes_up(BATCH, SEQ, 64, 2) / 1e5)
    assert t.download == pytest.approx(bytes_down(BATCH, SEQ, 64, 2) / 5e5)  # server uplink
    assert t.total == pytest.approx(t.client_compute + t.upload + t.server_compute + t.download)
