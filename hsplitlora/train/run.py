"""One training run from a validated config: build the parties, train, write the run folder.

The run folder holds everything a reader needs: ``config.yaml`` (resolved), ``metrics.jsonl``,
``adapter/`` (PEFT layout, loads onto the unsplit base model), ``loss.png`` and
``summary.json``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hsplitlora.checkpoint import atomic_save, load_checkpoint
from hsplitlora.config import ConfigError, RunConfig
from hsplitlora.data.load import check_labels, load_examples, sample_text, subsample
from hsplitlora.data.partition import partition
from hsplitlora.data.tokenize import TokenizedDataset, pad_id_for
from hsplitlora.eval.generate import GenerationSettings, generate
from hsplitlora.eval.perplexity import perplexity
from hsplitlora.models.lora import (
    LoraSettings,
    attach_lora,
    base_weights,
    load_lora_state,
    save_peft_adapter,
)
from hsplitlora.models.shared import added
from hsplitlora.models.split import arch_spec, num_blocks
from hsplitlora.models.structure import client_blocks
from hsplitlora.privacy.accountant import privacy_report
from hsplitlora.report import plot_loss
from hsplitlora.runtime.compile import check_compiler
from hsplitlora.runtime.device import resolve_device
from hsplitlora.runtime.process import keep_freed_memory, set_threads
from hsplitlora.train import engine
from hsplitlora.train.attendance import present
from hsplitlora.train.clock import simulate, simulated_parts
from hsplitlora.train.hetero import Unmerged
from hsplitlora.train.parties import (
    client_recipes,
    fed_server,
    learner_recipes,
    optim_settings,
    party_seed,
    probe_stream,
    server_recipe,
    shard_stream,
)
from hsplitlora.train.placement import InProcess, Placement
from hsplitlora.train.preflight import preflight
from hsplitlora.train.prepared import Prepared
from hsplitlora.train.recorder import Recorder, kept_records
from hsplitlora.train.trackers import open_sinks

__all__ = ["RunResult", "check_same_run", "run_path", "load_trained", "party_seed", "prepare",
           "train"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path | None
    adapter: dict[str, torch.Tensor]
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    model: nn.Module  # the unsplit model carrying the final adapters
    samples: dict[str, str] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare(cfg: RunConfig, model: nn.Module | None = None, tokenizer: Any = None) -> Prepared:
    """Load (or take) the model, load and partition the data, attach the initial LoRA."""
    # Everything checkable without the weights is checked first, in seconds.
    preflight(cfg, model.config if model is not None else None)
    set_threads(cfg.train.threads)
    if cfg.train.keep_memory:
        keep_freed_memory()
    device = resolve_device(cfg.train.device)
    if cfg.train.compile:
        check_compiler(device)
    if model is None or tokenizer is None:
        from hsplitlora.models.load import load_model

        model, tokenizer = load_model(cfg.model.name, dtype=getattr(torch, base_dtype(cfg)))
    arch_spec(model.config)  # fail early on an unsupported architecture
    from hsplitlora.models.load import use_attention

    use_attention(model, cfg.model.attention, device)
    examples = load_examples(cfg.data, "train", tokenizer)
    check_labels(cfg.data, examples)
    examples = subsample(examples, cfg.data.max_train_examples, cfg.train.seed)
    shards_idx = partition(examples, cfg.train.num_clients, cfg.data.partition, cfg.train.seed,
                           alpha=cfg.data.dirichlet_alpha, label_key=cfg.data.label_key)
    shards = [TokenizedDataset([examples[i] for i in idx], tokenizer, cfg.data.max_length)
              for idx in shards_idx]
    eval_features = None
    ev = load_examples(cfg.data, "eval", tokenizer) if cfg.eval.max_examples > 0 else []
    ev = [e for e in ev if e.target]
    if ev:
        rng = random.Random(cfg.train.seed + 1)
        if len(ev) > cfg.eval.max_examples:
            ev = [ev[i] for i in sorted(rng.sample(range(len(ev)), cfg.eval.max_examples))]
        eval_features = TokenizedDataset(ev, tokenizer, cfg.data.max_length)
    rank = cfg.lora.r
    if cfg.mode.weakest_rank and cfg.hetero.scenario.kind != "homogeneous":
        rank = _weakest_rank(cfg, model, shards)
    lora = LoraSettings(r=rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                        targets=tuple(cfg.lora.targets) if cfg.lora.targets else None,
                        trains=cfg.mode.trains)
    quantize(cfg, model)
    seed_everything(cfg.train.seed)
    if not cfg.mode.planned:  # heterogeneous runs attach per client plan
        attach_lora(model, lora)
    model.to(device)
    p = Prepared(cfg, model, tokenizer, shards, eval_features, lora, device)
    p.attendance = attendance(p)  # checked before any training starts
    return p


def _weakest_rank(cfg: RunConfig, model: nn.Module, shards: list[TokenizedDataset]) -> int:
    """SplitLoRA on heterogeneous devices: one rank for all, the largest the weakest fits."""
    from hsplitlora.hetero.planner import Planner

    params = sum(x.numel() for x in model.parameters())
    planner = Planner(cfg, model, cfg.hetero.scenario.profiles(cfg.train.num_clients, params),
                      cfg.hetero.scenario.server_profile(), mean_length(shards))
    rank = planner.weakest_rank()
    log.info("heterogeneous devices: SplitLoRA uses the weakest client's rank %d "
             "(lora.r %d ignored)", rank, cfg.lora.r)
    return rank


def quantized_blocks(cfg: RunConfig, n_blocks: int) -> range | list[int]:
    """The blocks ``model.quantization`` applies to: a client's [0, cut) and tail (and the
    server's with ``model.quantize_server``); every block where a party holds them all."""
    if cfg.model.quantization == "none":
        return range(0)
    if not cfg.mode.split or cfg.model.quantize_server:
        return range(n_blocks)
    return client_blocks(min(cfg.train.cut, n_blocks), cfg.train.tail, n_blocks)


def quantize(cfg: RunConfig, model: nn.Module) -> None:
    """Quantise the frozen linear weights of :func:`quantized_blocks`, before LoRA."""
    if cfg.model.quantization == "none":
        return
    from hsplitlora.models.quantize import quantize_blocks

    quantize_blocks(model, quantized_blocks(cfg, num_blocks(model.config)),
                    cfg.model.quantization,
                    compute_dtype=torch.bfloat16 if cfg.train.precision == "bf16"
                    else torch.float32)


def base_source(cfg: RunConfig, given: nn.Module | None = None) -> str:
    """The base model an adapter names: where its weights load from (models/load.py), or
    for a model handed to :func:`train` the path it was loaded from, when it knows one."""
    from hsplitlora.models.load import source_of

    if given is not None:
        return str(getattr(given.config, "_name_or_path", "") or cfg.model.name)
    return source_of(cfg.model.name)


def base_dtype(cfg: RunConfig) -> str:
    """Storage dtype of the frozen base weights: bf16 when training runs in bf16, in every
    mode (merged updates stay exact beside it: :mod:`hsplitlora.models.shared`)."""
    return cfg.model.torch_dtype(cfg.train.precision)


def streams(p: Prepared) -> list[Any]:
    """Every client's batch stream over its own shard."""
    return [shard_stream(p, cid) for cid in range(len(p.shards))]


def _total_rounds(cfg: RunConfig) -> int:
    t = cfg.train
    return cfg.mode.rounds(t.steps, t.num_clients, t.agg_interval)


def _run_hetero(p: Prepared, rec: Recorder,
                place: Placement) -> tuple[dict[str, torch.Tensor], LoraSettings]:
    """HSplitLoRA / HetLoRA / FlexLoRA / FLoRA: plan per client, train, export the update."""
    from hsplitlora.hetero.planner import Planner
    from hsplitlora.models.lora import updates_as_adapter
    from hsplitlora.train.hetero import HeteroSystem, run_hetero

    cfg, t = p.cfg, p.cfg.train
    params = sum(x.numel() for x in p.model.parameters())
    profiles = cfg.hetero.scenario.profiles(t.num_clients, params)
    planner = Planner(cfg, p.model, profiles, cfg.hetero.scenario.server_profile(),
                      mean_length(p.shards))
    initial = planner.provisional() if planner.uses_importance else planner.plans(None)
    shared = cfg.server_side == "shared"  # one server adapter steps on every client's batch
    system = HeteroSystem(
        p.model, initial, streams(p), [len(s) for s in p.shards],
        client_optim=optim_settings(cfg, t.steps),
        server_optim=optim_settings(cfg, t.steps * t.num_clients if shared else t.steps),
        alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, aggregator=planner.aggregator,
        precision=t.precision, compile=t.compile, device=p.device,
        label_smoothing=t.label_smoothing, federated=cfg.hetero.federated, place=place, seed=t.seed,
        probes=[probe_stream(p, cid) for cid in range(t.num_clients)],
        pruning=pruning(cfg), sparsity_weights=cfg.hetero.hetlora_weights == "sparsity",
        shared_server=shared, tail=t.tail)
    start, trained = 0, set()
    if p.resumed is not None:
        state = p.resumed
        system.restore(state["system"])
        planner.load_state_dict(state["planner"])
        p.plans, start, trained = state["plans"], state["round"] + 1, state["trained"]
        log.info("resuming from the checkpoint of round %d", state["round"])
    else:
        if planner.uses_importance:
            system.replan(planner.plans(planner.probe(system, rec, 0)))
        rec.event("plan", round=0, plans=[{"cut": pl.cut, "ranks": dict(pl.ranks)}
                                          for pl in system.plans])
        p.plans = {cid: (pl.cut, dict(pl.ranks)) for cid, pl in enumerate(system.plans)}

    def current() -> dict[int, tuple[int, dict[str, int]]]:
        return {cid: (pl.cut, dict(pl.ranks)) for cid, pl in enumerate(system.plans)}

    def save(round: int, loop: dict[str, Any]) -> None:
        assert p.checkpoint is not None
        p.plans = current()
        atomic_save({"round": round, "trained": set(loop["trained"]), "plans": p.plans,
                     "config": cfg.model_dump(mode="json"), "system": system.state_dict(),
                     "planner": planner.state_dict()}, p.checkpoint)

    run_hetero(system, t.steps, t.agg_interval, rec,
               replan=lambda rnd: planner.replan(system, rec, rnd),
               attendance=place.attendance(p.attendance), start=start, trained=trained,
               checkpoint=save if p.checkpoint is not None else None)
    p.plans, p.ran = current(), planner.describe(system.plans)
    update = system.global_update()
    state, alphas = updates_as_adapter(update)
    system.restore_base()
    ranks = {k.removesuffix(".lora_A.weight"): int(v.shape[0])
             for k, v in state.items() if k.endswith(".lora_A.weight")}
    settings = LoraSettings(r=max(ranks.values(), default=1), alpha=cfg.lora.alpha,
                            dropout=0.0, targets=arch_spec(p.model.config).targets,
                            ranks={**{m: 0 for m in planner.candidates}, **ranks},
                            alphas=alphas)
    attach_lora(p.model, settings)
    return state, settings


def pruning(cfg: RunConfig) -> Any:
    """HetLoRA's rank self-pruning for a mode that has it (and a threshold above 0)."""
    from hsplitlora.train.hetero import SelfPruning

    h = cfg.hetero
    if not cfg.mode.self_pruning or h.prune_threshold == 0:
        return None
    return SelfPruning(h.prune_gamma, h.prune_threshold)


def mean_length(shards: list[TokenizedDataset]) -> int:
    """Mean example length in tokens: the sequence length the cost model plans for."""
    lengths = [len(f["input_ids"]) for shard in shards for f in shard.features]
    return round(sum(lengths) / len(lengths))


def placement(p: Prepared) -> Placement:
    """Where the roles of a run live: this process, or Ray actors."""
    t = p.cfg.train
    if t.backend == "inprocess":
        return InProcess(p.device)
    from hsplitlora.train.ray_backend import RayPlacement

    return RayPlacement(p.cfg.ray, t.threads, p.cfg.mode.parties(t.num_clients),
                        keep_memory=t.keep_memory)


# Builds the placement of a run from its prepared state (``hsplitlora serve`` passes one
# whose clients are remote processes).
PlacementFactory = Callable[[Prepared], Placement]


@contextlib.contextmanager
def placed(p: Prepared, factory: PlacementFactory | None = None) -> Iterator[Placement]:
    """A placement for the run (``factory``'s, default :func:`placement`), released at
    the end: after a failure without waiting on the other parties (the failure is what
    gets reported), else after surfacing any failure a party has not reported yet."""
    place = (factory or placement)(p)
    try:
        yield place
    except BaseException:
        place.close(check=False)
        raise
    place.close()


def run_mode(p: Prepared, rec: Recorder,
             factory: PlacementFactory | None = None) -> dict[str, torch.Tensor]:
    """Build the roles for the configured mode and train; returns the final adapter."""
    with placed(p, factory) as place:
        if p.cfg.mode.planned:
            state, p.lora = _run_hetero(p, rec, place)
            return state
        return _run_placed(p, rec, place)


def attendance(p: Prepared) -> engine.Attendance:
    """Each round's clients, drawn from the scenario's availability (train/attendance.py)."""
    t = p.cfg.train
    params = sum(x.numel() for n, x in p.model.named_parameters() if ".lora_" not in n)
    available = [d.availability for d in p.cfg.hetero.scenario.profiles(t.num_clients, params)]
    if all(a >= 1 for a in available):
        return engine.everyone
    schedule = p.cfg.mode.schedule
    if schedule != "parallel":
        log.warning("client availability is not simulated in mode %r (%s); every round "
                    "trains", t.mode, "one party" if schedule == "centralized"
                    else "the relay waits for its next client")
        return engine.everyone
    if not any(present(available, t.seed, r) for r in range(t.steps)):
        raise ConfigError(
            f"with client availability {sorted(set(available))} no client takes part in any "
            f"of the {t.steps} rounds (seed {t.seed}): raise hetero.scenario.availability "
            "(or the profiles' own) or train.steps")
    return functools.partial(present, available, t.seed)


def _run_placed(p: Prepared, rec: Recorder, place: Placement) -> dict[str, torch.Tensor]:
    t, mode = p.cfg.train, p.cfg.mode
    here = place.attendance(p.attendance)
    if mode.learners:
        roles = {"learners": [place.place(r, "learner") for r in learner_recipes(p)]}
    else:
        roles = {"clients": [place.place(r, "client") for r in client_recipes(p)],
                 "server": [place.place(server_recipe(p), "server")]}
    place.started()
    resume = _restore(p, roles)
    if mode.schedule == "centralized":
        return engine.run_centralized(roles["learners"][0], _total_rounds(p.cfg), rec,
                                     start=resume["start"], checkpoint=resume["checkpoint"])
    if mode.schedule == "relay":
        return engine.run_split(roles["clients"], roles["server"][0], t.steps, t.agg_interval,
                               rec, **resume)
    if mode.learners:
        return engine.run_federated(roles["learners"], fed_server(p), t.steps, t.agg_interval,
                                   rec, here, **resume)
    runner = engine.run_splitfed if mode.server == "per_participant" else engine.run_splitlora
    return runner(roles["clients"], roles["server"][0], fed_server(p), t.steps, t.agg_interval,
                  rec, here, **resume)


def _restore(p: Prepared, roles: dict[str, list[Any]]) -> dict[str, Any]:
    """For a homogeneous mode: restore ``roles`` from ``p.resumed`` (if resuming) and
    return the mode's ``start``, ``loop`` and ``checkpoint`` arguments.

    The checkpoint holds every role's state (adapters, AdamW moments, LR schedule,
    batch-stream position, RNG) and the loop's own; it is written as each round ends,
    in the centralized mode after every ``num_clients`` steps (the data of one round of
    the other modes), so a stopped run resumes to the very numbers of an unstopped one.
    """
    t = p.cfg.train
    start, loop = 0, None
    if p.resumed is not None:
        for kind, states in p.resumed["roles"].items():
            for role, state in zip(roles[kind], states, strict=True):
                role.load_state_dict(state)
        start, loop = p.resumed["round"] + 1, p.resumed["loop"]
        log.info("resuming from the checkpoint of round %d", p.resumed["round"])
    if p.checkpoint is None:
        return {"start": start, "loop": loop, "checkpoint": None}
    path, every = p.checkpoint, p.cfg.mode.checkpoint_every(t.num_clients)
    total, config = _total_rounds(p.cfg), p.cfg.model_dump(mode="json")

    def save(round: int, loop_state: dict[str, Any]) -> None:
        if (round + 1) % every and round + 1 < total:
            return
        atomic_save({"round": round, "loop": loop_state, "config": config,
                     "roles": {kind: [r.state_dict() for r in rs] for kind, rs in roles.items()}},
                    path)

    return {"start": start, "loop": loop, "checkpoint": save}


def _eval_rounds(cfg: RunConfig) -> int:
    """``eval.every`` aggregations, in the mode's own rounds."""
    t = cfg.train
    return cfg.mode.eval_rounds(cfg.eval.every, t.agg_interval, t.num_clients)


def _held_out(p: Prepared, state: dict[str, torch.Tensor] | Unmerged | None
              ) -> tuple[float, float]:
    """Held-out loss and perplexity of the unsplit model, with ``state`` as its adapters
    (None: the model as it is, e.g. a merged heterogeneous base; :class:`Unmerged`: that
    base with updates not merged into it added for the evaluation)."""
    assert p.eval_features is not None
    if isinstance(state, Unmerged):
        with added(base_weights(p.model, state.deltas), state.deltas):
            return _held_out(p, None)
    if state is not None:
        load_lora_state(p.model, state)
    return perplexity(p.model, p.eval_features.features, pad_id=pad_id_for(p.tokenizer),
                      batch_size=p.cfg.eval.batch_size, precision=p.cfg.train.precision,
                      device=p.device, multiple=p.cfg.data.pad_to_multiple_of)


def run_path(cfg: RunConfig) -> Path:
    """The run folder a config names (output.dir / output.name, or a timestamped one)."""
    name = cfg.output.name or f"{cfg.train.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.output.dir) / name


def _sample(p: Prepared, prompt: str | None) -> str | None:
    if not prompt:
        return None
    settings = GenerationSettings(num_beams=1, max_new_tokens=48)
    return generate(p.model, p.tokenizer, [prompt], settings, device=p.device)[0]


def checkpoint_path(run_dir: Path) -> Path:
    """Where a run folder keeps its checkpoint (in process and under ``serve`` alike)."""
    return run_dir / "checkpoint" / "server.pt"


def train(cfg: RunConfig, *, model: nn.Module | None = None, tokenizer: Any = None,
          write: bool = True, show_progress: bool = True,
          placement: PlacementFactory | None = None, checkpoint: bool = False,
          resume: bool = False) -> RunResult:
    """Run one configured training job end to end (the Python API behind ``hsplitlora train``;
    ``hsplitlora serve`` runs the heterogeneous modes through it with remote clients).

    ``checkpoint`` saves the run's state as rounds end, in
    ``<run folder>/checkpoint/server.pt``; ``resume`` goes on from it, keeping the
    metrics of the rounds it covers, to the same result an uninterrupted run reaches.
    """
    if (checkpoint or resume) and not write:
        raise ValueError("checkpoint/resume needs a run folder (write=True)")
    run_dir = run_path(cfg) if write else None
    resumed = None
    if run_dir and resume:  # checked before the model loads: a wrong resume fails fast
        resumed = load_checkpoint(checkpoint_path(run_dir))
        check_same_run(resumed["config"], cfg)
        if not cfg.mode.planned and "roles" not in resumed:
            raise ConfigError(f"{checkpoint_path(run_dir)} was written by `hsplitlora serve`, "
                              "whose clients keep their own state: resume it with "
                              "`hsplitlora serve --resume`")
    p = prepare(cfg, model, tokenizer)  # a bad config fails here, before any folder exists
    p.resumed = resumed
    history = None
    if run_dir:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = checkpoint_path(run_dir)
        if resumed is not None:
            history = kept_records(run_dir / "metrics.jsonl", resumed["round"])
        else:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            saved.unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        p.checkpoint = saved if checkpoint else None
    samples: dict[str, str] = {}
    prompt = sample_text(cfg.data, cfg.output.sample_prompt, p.tokenizer)
    before = _sample(p, prompt)
    if before is not None:
        samples["before"] = before
        log.info("before fine-tuning: %s", before)
    start = time.perf_counter()
    with Recorder(run_dir / "metrics.jsonl" if run_dir else None, _total_rounds(cfg),
                  show_progress=show_progress, description=cfg.train.mode,
                  log_every=cfg.train.log_every, history=history,
                  sinks=open_sinks(cfg.output, run_dir, cfg.model_dump(mode="json"))) as rec:
        if p.eval_features is not None and cfg.eval.every:
            rec.evaluate_every(_eval_rounds(cfg), lambda state: _held_out(p, state))
        adapter = run_mode(p, rec, placement)
        wall = time.perf_counter() - start
        load_lora_state(p.model, adapter)
        summary = _summary(p, rec, wall)
        sim = simulated_times(p, rec.records, adapter, p.plans)
        summary["simulated_s"] = sim[-1] if sim else 0.0
        summary["simulated_round_s"] = sim
        summary["simulated_parts"] = simulated_parts(rec.records, **_clock(p, adapter, p.plans))
        if cfg.privacy.enabled:
            spent = privacy_report(cfg, dict(enumerate(len(s) for s in p.shards)), rec.records)
            rec.event("privacy", round=_total_rounds(cfg) - 1, **spent)
            summary.update(spent)
        if p.eval_features is not None:
            loss, ppl = _held_out(p, None)
            summary.update(eval_loss=loss, eval_ppl=ppl)
            rec.event("eval", round=_total_rounds(cfg) - 1, loss=loss, ppl=ppl)
        rec.finish(summary)
    after = _sample(p, prompt)
    if after is not None:
        samples["after"] = after
        log.info("after fine-tuning: %s", after)
    summary["samples"] = samples
    if run_dir:
        save_peft_adapter(adapter, p.lora, run_dir / "adapter",
                          base_model=base_source(cfg, model),
                          fan_in_fan_out=arch_spec(p.model.config).fan_in_fan_out,
                          spec=arch_spec(p.model.config))
        plot_loss(rec.records, run_dir / "loss.png", title=f"{cfg.train.mode} ({cfg.model.name})")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return RunResult(run_dir, adapter, rec.records, summary, p.model, samples)


# Settings a resumed run may change: where and how fast it runs, not what it computes.
_FREE_TO_CHANGE = {"train": {"threads", "device", "log_every", "backend", "keep_memory",
                              "compile"}}
_SAME_RUN_SECTIONS = ("model", "lora", "data", "train", "hetero")


def check_same_run(saved: dict[str, Any], cfg: RunConfig) -> None:
    """A checkpoint only continues the run it came from: refuse a config that changed
    what the run computes, naming every changed setting."""
    now = cfg.model_dump(mode="json")
    changed = []
    for section in _SAME_RUN_SECTIONS:
        free = _FREE_TO_CHANGE.get(section, set())
        for key in sorted(set(saved[section]) | set(now[section])):
            old, new = saved[section].get(key), now[section].get(key)
            if key not in free and old != new:
                changed.append(f"{section}.{key}: {old!r} -> {new!r}")
    if changed:
        raise ConfigError("the config differs from the checkpointed run's in "
                          + "; ".join(changed) + ": restore those settings to resume, or "
                          "start a new run without --resume (or under another output.name)")


def simulated_times(p: Prepared, records: list[dict[str, Any]],
                    adapter: dict[str, torch.Tensor],
                    plans: dict[int, tuple[int, dict[str, int]]] | None = None) -> list[float]:
    """Cumulative simulated seconds per round on the scenario's devices (train/clock.py).

    ``plans`` maps each client to its (cut, ranks); by default every client has
    ``train.cut`` and the run's adapter ranks.
    """
    return simulate(records, **_clock(p, adapter, plans))


def _clock(p: Prepared, adapter: dict[str, torch.Tensor],
           plans: dict[int, tuple[int, dict[str, int]]] | None) -> dict[str, Any]:
    """The simulated clock's settings for this run (see :func:`simulated_times`)."""
    from hsplitlora.hetero.costmodel import ModelDims

    cfg = p.cfg
    dims = ModelDims.from_config(p.model.config)
    params = sum(x.numel() for n, x in p.model.named_parameters() if ".lora_" not in n)
    profiles = cfg.hetero.scenario.profiles(cfg.train.num_clients, params)
    if plans is None:
        ranks = {k.removesuffix(".lora_A.weight"): int(v.shape[0])
                 for k, v in adapter.items() if k.endswith(".lora_A.weight")}
        plans = {cid: (cfg.train.cut, ranks) for cid in range(cfg.train.num_clients)}
    return dict(mode=cfg.mode, unsplit=cfg.hetero.federated, dims=dims,
                cuts={c: cut for c, (cut, _) in plans.items()},
                ranks={c: r for c, (_, r) in plans.items()},
                clients=profiles, server=cfg.hetero.scenario.server_profile(),
                batch=cfg.train.batch_size, seq=mean_length(p.shards),
                precision=cfg.train.precision, tail=cfg.train.tail)


def _summary(p: Prepared, rec: Recorder, wall: float) -> dict[str, Any]:
    steps = [r for r in rec.records if "event" not in r]
    last_round = max(r["round"] for r in steps)
    last = [r for r in steps if r["round"] == last_round]
    first = [r for r in steps if r["round"] == 0]
    cut = p.cfg.train.cut
    total = sum(p_.numel() for n, p_ in p.model.named_parameters() if ".lora_" in n)
    spec = arch_spec(p.model.config)
    planned: dict[str, Any] = {}
    if p.plans:  # heterogeneous: the mean client's own adapters, from the plan that ran last
        from hsplitlora.hetero.costmodel import ModelDims

        dims = ModelDims.from_config(p.model.config)
        per_client = []
        for pcut, ranks in p.plans.values():
            own, mine = 0, set(client_blocks(pcut, p.cfg.train.tail, dims.n_layers))
            for m, r in ranks.items():
                block, matrix = dims.locate(m)
                own += matrix.lora_params(r) if block in mine else 0
            per_client.append(own)
        client_params = round(sum(per_client) / len(per_client))
        planned = _planned(p, per_client, rec)
    elif not p.cfg.mode.split:
        client_params = total  # one party holds everything
    else:
        held = set(client_blocks(cut, p.cfg.train.tail, num_blocks(p.model.config)))
        client_params = sum(p_.numel() for n, p_ in p.model.named_parameters()
                            if ".lora_" in n and spec.block_of(n) in held)
    return {
        "mode": p.cfg.train.mode,
        "model": p.cfg.model.name,
        "clients": p.cfg.train.num_clients,
        # a planned run has a cut and ranks per client (``plans``), not one of each
        "cut": None if p.plans else cut,
        "rank": None if p.plans else p.lora.r,
        "steps": len(steps),
        "first_loss": sum(r["loss"] for r in first) / len(first),
        "final_loss": sum(r["loss"] for r in last) / len(last),
        "tokens": sum(r["tokens"] for r in steps),
        "wall_s": wall,
        "seconds_per_step": wall / max(len(steps), 1),
        "bytes_up": sum(r.get("bytes_up", 0) for r in rec.records),
        "bytes_down": sum(r.get("bytes_down", 0) for r in rec.records),
        "trainable_params": total,
        "client_trainable_params": client_params,
        "shard_sizes": [len(s) for s in p.shards],
        **planned,
    }


def _planned(p: Prepared, client_params: list[int], rec: Recorder) -> dict[str, Any]:
    """A heterogeneous run's plans as they ran last (re-plans included), each client's and
    the main server's cost-model memory and compute beside one another."""
    assert p.plans is not None
    spec, tail, n_blocks = arch_spec(p.model.config), p.cfg.train.tail, num_blocks(p.model.config)

    def own(cut: int, ranks: Mapping[str, int]) -> int:
        mine = set(client_blocks(cut, tail, n_blocks))
        return sum(1 for m in ranks if spec.block_of(m) in mine)

    out: dict[str, Any] = {
        "plans": [{"cut": cut, "client_adapters": own(cut, ranks), "client_trainable_params": n}
                  for (cut, ranks), n in zip(p.plans.values(), client_params, strict=True)],
        "replans": sum(1 for r in rec.records if r.get("event") == "replan"),
    }
    if p.ran is not None:
        for entry, c in zip(out["plans"], p.ran.clients, strict=True):
            entry.update(memory_bytes=c.memory.total, budget_bytes=c.budget_bytes,
                         step_s=c.step_seconds)
        if p.ran.server is not None:
            out["server"] = {"memory_bytes": p.ran.server.memory_bytes,
                             "budget_bytes": p.ran.server.budget_bytes,
                             "compute_s_per_round": p.ran.server.compute_seconds}
    return out



def load_trained(run_dir: Path, *, device: str = "cpu") -> tuple[nn.Module, Any, RunConfig]:
    """The fine-tuned unsplit model of a finished run (base + its adapters), its
    tokenizer and its resolved config: what evaluation and export start from.

    The adapter is read with PEFT itself, exactly as a user would load it.
    """
    from peft import PeftModel

    from hsplitlora.config import load_config
    from hsplitlora.models.load import load_model

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{run_dir} holds no adapter ({adapter} is missing): is it a "
                                "finished run folder written by `hsplitlora train`?")
    cfg = load_config(run_dir / "config.yaml")
    model, tokenizer = load_model(cfg.model.name,
                                  dtype=getattr(torch, cfg.model.torch_dtype(cfg.train.precision)))
    # Unmerged, on purpose: merged into a bf16 base, a small update would round away, and
    # under bf16 autocast even an fp32 merge is cast back to bf16 per matmul. Kept apart,
    # the adapter path computes exactly what training computed.
    quantize(cfg, model)  # the base the adapter was trained on
    model = PeftModel.from_pretrained(model, str(adapter)).get_base_model()
    return model.to(device).eval(), tokenizer, cfg
