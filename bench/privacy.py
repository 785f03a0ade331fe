"""Token recovery vs cut on SmolLM2-135M: both inversion attacks with no defence and with
activation DP at two epsilons, next to the held-out perplexity each setting trains to.

    python bench/privacy.py [--cuts 1 3 6 12] [--epsilons 8 64] [--steps 20]
    python bench/privacy.py --smoke      # a tiny random Llama, minutes: checks the bench

For each cut k and setting, SplitLoRA trains (2 clients, the same steps for all), then an
honest-but-curious server attacks that client segment: a learned inversion (trained on
public text, the cleaned E2E dev set) and an optimisation-based one, on held-out client
text (the E2E test set). DP settings clip each example's activation tensor at the median
norm the base model gives public text at the cut, with the noise multiplier that reaches
the target epsilon over the run (Opacus). Splitting is exact, so without noise the run is
the same at every cut: it is trained once. Labels: vanilla split sends them; a U-shaped
run (``--tails``, trained the same way) keeps them, and the server attacks the gradient
each tail returns at L - t with a map learned on public text and the base model's tail.
Writes <out> (docs/results/privacy/summary.md)
with the command that made it. Reductions for ~30 min on 2 cores: 20 local steps, 64-token
texts, 512 public texts and a 300-step inversion MLP, 4 held-out texts x 40 steps for the
optimisation attack (256 for the learned one). Sized from a probe, not a whole run: on the
shared 2-core machine (load 7-8) one cut-12 cell took about 1 min to observe 768 texts,
15 s to fit the inversion, 2.5 s per optimisation step on 4 texts, and a 3-step training
several minutes; the whole table is expected at 15-25 min on two idle cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hsplitlora.config import RunConfig, load_config  # noqa: E402
from hsplitlora.data.e2e import load_e2e  # noqa: E402
from hsplitlora.data.tokenize import TokenizedDataset, collate, pad_id_for  # noqa: E402
from hsplitlora.models.split import split_model  # noqa: E402
from hsplitlora.privacy.accountant import noise_for  # noqa: E402
from hsplitlora.privacy.attacks import (  # noqa: E402
    fit_inversion,
    next_tokens,
    observe,
    optimise_inversion,
    recovery_rate,
    tail_gradients,
)
from hsplitlora.privacy.mechanism import Gaussian  # noqa: E402
from hsplitlora.train.run import train  # noqa: E402

E2E = REPO / "data" / "e2e"
PUBLIC = E2E / "cleaned" / "devel-fixed.no-ol.csv"  # the attacker's public text
CLIENT = E2E / "original" / "devset.csv"  # the clients' training shards
HELD_OUT = E2E / "original" / "testset_w_refs.csv"  # the client text attacked


def texts(path: Path, n: int, tokenizer: Any, max_length: int, skip: int = 0
          ) -> dict[str, torch.Tensor]:
    """``n`` examples of an E2E file tokenised and padded exactly as training sends them."""
    examples = load_e2e([path])[skip:skip + n]
    data = TokenizedDataset(examples, tokenizer, max_length)
    return collate(data.features, pad_id_for(tokenizer))


def config(args: argparse.Namespace, cut: int, privacy: dict[str, Any],
           tail: int = 0) -> RunConfig:
    return load_config(REPO / "configs" / "demo.yaml", [
        f"data.train_files=[{CLIENT}]", f"data.eval_file={HELD_OUT}",
        f"data.max_train_examples={args.clients * args.shard}",
        f"data.max_length={args.max_length}", f"train.num_clients={args.clients}",
        f"train.cut={cut}", f"train.tail={tail}", f"train.steps={args.steps}",
        f"train.agg_interval={args.steps}", f"eval.max_examples={args.eval_examples}",
        "output.sample_prompt=null", f"privacy={json.dumps(privacy)}"])


def model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any]:
    """A fresh base model (train() attaches its adapters in place) and its tokenizer."""
    from hsplitlora.models.load import load_model

    model, tok = load_model("smollm2-135m", dtype=torch.bfloat16)
    if not args.smoke:
        return model, tok
    import transformers

    torch.manual_seed(0)
    tiny = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    vocab_size=model.config.vocab_size,
                                    max_position_embeddings=256, eos_token_id=1)
    return transformers.AutoModelForCausalLM.from_config(tiny).to(torch.bfloat16), tok


def attack(model: Any, cut: int, channel: dict[str, float] | None, public: dict, victim: dict,
           args: argparse.Namespace) -> dict[str, float]:
    """Both attacks on ``model``'s client segment at ``cut``; ``channel``: clip and noise
    of the client's mechanism, known to the attacker (it is in the run's config)."""
    segment, _ = split_model(model, cut)

    def mech(seed: int) -> Gaussian | None:
        return None if channel is None else Gaussian(channel["clip"], channel["noise"], seed)

    pub = observe(segment, public["input_ids"], public["attention_mask"], mech(1), "bf16")
    inv = fit_inversion(pub, public["input_ids"], public["attention_mask"],
                        steps=args.inversion_steps)
    seen = observe(segment, victim["input_ids"], victim["attention_mask"], mech(2), "bf16")
    learned = recovery_rate(inv(seen), victim["input_ids"], victim["attention_mask"])
    n = args.opt_examples
    found = optimise_inversion(segment, seen[:n], victim["attention_mask"][:n], inv.vocab,
                               clip=None if channel is None else channel["clip"],
                               steps=args.opt_steps, precision="bf16")
    optimised = recovery_rate(found, victim["input_ids"][:n], victim["attention_mask"][:n])
    return {"learned": learned, "optimised": optimised}


def label_attack(trained: Any, tail: int, public: dict, victim: dict,
                 args: argparse.Namespace) -> float:
    """The server's label inversion from a U-shaped client's returned gradients: a map
    from the gradient at ``L - tail`` to the next token, learned on public text with the
    fresh base model's tail (the client's tail adapters are its own), applied to the
    gradients ``trained``'s tail returns on held-out client text; the fraction of its
    target tokens recovered."""
    base, _ = model_and_tokenizer(args)
    seen_pub = tail_gradients(base, tail, public["input_ids"], public["attention_mask"],
                              public["labels"], precision="bf16")
    inv = fit_inversion(seen_pub, *next_tokens(public["labels"]), steps=args.inversion_steps)
    seen = tail_gradients(trained, tail, victim["input_ids"], victim["attention_mask"],
                          victim["labels"], precision="bf16")
    return recovery_rate(inv(seen), *next_tokens(victim["labels"]))


def median_norm(model: Any, cut: int, public: dict) -> float:
    """The clipping bound: the median example norm at the cut on public text."""
    segment, _ = split_model(model, cut)
    hidden = observe(segment, public["input_ids"], public["attention_mask"], precision="bf16")
    return float(hidden.flatten(1).norm(dim=1).median())


def progress(row: dict[str, Any], start: float) -> None:
    print(json.dumps({**row, "at_s": round(time.perf_counter() - start)}), file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuts", type=int, nargs="+", default=[1, 3, 6, 12])
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 64.0])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--steps", type=int, default=20, help="local steps per client")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--shard", type=int, default=500, help="training examples per client")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--eval-examples", type=int, default=64)
    ap.add_argument("--public", type=int, default=512, help="public texts for the attacker")
    ap.add_argument("--victims", type=int, default=256, help="held-out client texts attacked")
    ap.add_argument("--inversion-steps", type=int, default=300)
    ap.add_argument("--opt-examples", type=int, default=4)
    ap.add_argument("--opt-steps", type=int, default=40)
    ap.add_argument("--tails", type=int, nargs="*", default=[1, 3],
                    help="U-shaped runs whose returned gradients the label attack reads")
    ap.add_argument("--smoke", action="store_true", help="tiny random Llama, cuts 1 3, "
                    "few steps: checks the bench end to end, numbers mean nothing")
    ap.add_argument("--out", type=Path, default=None, help="summary.md to write (default "
                    "docs/results/privacy/summary.md; runs/bench-privacy-smoke/ with --smoke)")
    args = ap.parse_args()
    if args.smoke:
        args.cuts = [c for c in args.cuts if c < 4] or [1]
        args.tails = [t for t in args.tails if t < 3] or [1]
        args.steps, args.shard, args.public, args.victims = 4, 40, 64, 32
        args.inversion_steps, args.opt_examples, args.opt_steps = 100, 4, 20
        args.eval_examples = 16
    out = args.out or (REPO / ("runs/bench-privacy-smoke" if args.smoke
                               else "docs/results/privacy") / "summary.md")
    torch.set_num_threads(2)
    start = time.perf_counter()
    base, tok = model_and_tokenizer(args)
    public = texts(PUBLIC, args.public, tok, args.max_length)
    victim = texts(HELD_OUT, args.victims, tok, args.max_length)
    # the prior: always guessing the public text's most common token
    real = public["input_ids"][public["attention_mask"].bool()]
    top = torch.bincount(real).argmax()
    prior = float((victim["input_ids"] == top)[victim["attention_mask"].bool()].float().mean())
    bounds = {cut: median_norm(base, cut, public) for cut in args.cuts}
    rows: list[dict[str, Any]] = []
    plain = train(config(args, args.cuts[0], {}), model=base, tokenizer=tok, write=False,
                  show_progress=False)
    for cut in args.cuts:
        rows.append({"cut": cut, "setting": "none", "epsilon": math.inf, "clip": None,
                     "noise": 0.0, "ppl": plain.summary["eval_ppl"],
                     **attack(plain.model, cut, None, public, victim, args)})
        progress(rows[-1], start)
        for eps in args.epsilons:
            rate = config(args, cut, {}).train.batch_size / args.shard
            sigma = noise_for(eps, rate, args.steps, args.delta)
            privacy = {"enabled": True, "activation_clip": bounds[cut],
                       "activation_noise": sigma, "delta": args.delta}
            model, _ = model_and_tokenizer(args)
            run = train(config(args, cut, privacy), model=model, tokenizer=tok, write=False,
                        show_progress=False)
            rows.append({"cut": cut, "setting": f"DP eps {eps:g}",
                         "epsilon": run.summary["epsilon_activations"], "clip": bounds[cut],
                         "noise": sigma, "ppl": run.summary["eval_ppl"],
                         **attack(run.model, cut, {"clip": bounds[cut], "noise": sigma},
                                  public, victim, args)})
            progress(rows[-1], start)
    # Labels: vanilla sends every target token; a U-shaped run sends none, and the server
    # reads what it can from the gradients each tail returns (the same training otherwise)
    labels = [{"split": "vanilla (SplitLoRA)", "tail": 0, "sent": 1.0, "recovered": 1.0,
               "ppl": plain.summary["eval_ppl"]}]
    for tail in args.tails:
        model, _ = model_and_tokenizer(args)
        run = train(config(args, args.cuts[0], {}, tail), model=model, tokenizer=tok,
                    write=False, show_progress=False)
        labels.append({"split": f"U-shaped, tail {tail}", "tail": tail, "sent": 0.0,
                       "recovered": label_attack(run.model, tail, public, victim, args),
                       "ppl": run.summary["eval_ppl"]})
        progress(labels[-1], start)
    # per-coordinate noise over the RMS coordinate of an example at the bound
    coords = victim["input_ids"].shape[1] * base.config.hidden_size
    for r in rows:
        r["snr"] = r["noise"] * math.sqrt(coords)
    table = render(rows, labels, args, prior, time.perf_counter() - start)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table, encoding="utf-8")


def render(rows: list[dict[str, Any]], labels: list[dict[str, Any]],
           args: argparse.Namespace, prior: float, wall: float) -> str:
    command = "python bench/privacy.py " + " ".join(sys.argv[1:])
    model = "A tiny random Llama (--smoke)" if args.smoke else "SmolLM2-135M-Instruct (bf16)"
    lines = [
        "# Token recovery vs cut, with and without activation DP",
        "",
        f"Made by `{command.strip()}` in {wall / 60:.1f} min. {model}; SplitLoRA, "
        f"{args.clients} clients of {args.shard} E2E examples, {args.steps} local steps, "
        f"texts of at most {args.max_length} tokens; delta {args.delta:g}. Recovery: the "
        "fraction of real tokens of held-out client text (E2E test set) recovered exactly; "
        f"learned inversion on {args.victims} texts (trained on {args.public} public texts, "
        f"cleaned E2E dev set), optimisation on {args.opt_examples} texts x "
        f"{args.opt_steps} steps. Guessing the commonest public token everywhere recovers "
        f"{prior:.3f}. Perplexity: held-out (E2E test, {args.eval_examples} examples) after "
        "the same training. Noise / signal: the noise's standard deviation per coordinate "
        "over the RMS coordinate of an example at the bound, sigma sqrt(seq d_model): "
        "example-level noise on a whole [seq, d_model] tensor is that many times the "
        "signal. See docs/privacy.md for what is and is not protected.",
        "",
        "| cut k | defence | epsilon | clip C | noise sigma | noise / signal | "
        "learned inversion | optimisation inversion | held-out ppl |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        clip = "-" if r["clip"] is None else f"{r['clip']:.3g}"
        lines.append(f"| {r['cut']} | {r['setting']} | {r['epsilon']:.3g} | {clip} | "
                     f"{r['noise']:.3g} | {r['snr']:.3g} | {r['learned']:.3f} | "
                     f"{r['optimised']:.3f} | "
                     f"{r['ppl']:.3f} |")
    lines += [
        "",
        "## Labels",
        "",
        f"Cut {args.cuts[0]}, no noise, the same training. Target tokens: those the loss is "
        "taken on (the E2E references). In vanilla split learning they travel with the "
        "activations, whatever the noise (activation DP does not cover them). A U-shaped "
        "client (`train.tail`) keeps them; the server learns a map from the gradient each "
        "position's tail returns at L - t to the next token, on public text with the "
        "fresh base model's tail, and applies it to the gradients the client's trained "
        "tail returns on held-out text.",
        "",
        "| split | labels on the wire | target tokens the server recovers | held-out ppl |",
        "|---|---|---|---|",
    ]
    for r in labels:
        lines.append(f"| {r['split']} | {r['sent']:.0%} | {r['recovered']:.3f} | "
                     f"{r['ppl']:.3f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
