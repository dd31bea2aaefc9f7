"""Train-step cost of the contrastive term and of many experts: lambda 0 vs 0.01, n = 4 / 16 / 64, sampled
negatives, the Gram vs reference form, dense vs sparse experts (adapter.experts).

    python benchmarks/bench_step.py                  # a random Llama sized for a CPU; minutes
    python benchmarks/bench_step.py --arch smollm2   # SmolLM2-135M's shapes, batch 4 x 160 (the main job)
    python benchmarks/bench_step.py --hidden 1024 --layers 8 --seq-len 256 --batch 8   # on an accelerator

Every variant is compiled first, then the variants are timed in interleaved rounds
(so machine noise hits them alike) and the median step time is compared as ratios.
Prints a table and writes benchmarks/results/bench_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from roofline import SMOLLM2  # noqa: E402

from comoe_jax import sharding as shd  # noqa: E402
from comoe_jax.config import Config  # noqa: E402
from comoe_jax.loading import build_model  # noqa: E402
from comoe_jax.model import flat_values, split_model  # noqa: E402
from comoe_jax.step import TrainStep  # noqa: E402

# (label, experts n, lambda, sampled negatives, form, adapter.experts)
VARIANTS = [
    ("n4 lambda0", 4, 0.0, 0, "gram", "dense"),
    ("n4 lambda0.01", 4, 0.01, 0, "gram", "dense"),
    ("n4 lambda0.01 reference-form", 4, 0.01, 0, "reference", "dense"),
    ("n4 lambda0.01 sparse", 4, 0.01, 0, "gram", "sparse"),
    ("n16 lambda0", 16, 0.0, 0, "gram", "dense"),
    ("n16 lambda0.01", 16, 0.01, 0, "gram", "dense"),
    ("n16 lambda0.01 neg4", 16, 0.01, 4, "gram", "dense"),
    ("n16 lambda0.01 neg4 sparse", 16, 0.01, 4, "gram", "sparse"),
    ("n64 lambda0", 64, 0.0, 0, "gram", "dense"),
    ("n64 lambda0 sparse", 64, 0.0, 0, "gram", "sparse"),
    ("n64 lambda0.01", 64, 0.01, 0, "gram", "dense"),
    ("n64 lambda0.01 neg4", 64, 0.01, 4, "gram", "dense"),
    ("n64 lambda0.01 neg4 sparse", 64, 0.01, 4, "gram", "sparse"),
]
TARGETS = [  # (what, variant, against, at most): the targets, checked on every run
    ("the term at the paper's n = 4", "n4 lambda0.01", "n4 lambda0", 1.05),
    ("n = 64, 4 sampled negatives, sparse vs n = 4", "n64 lambda0.01 neg4 sparse", "n4 lambda0.01", 1.25),
]


def architecture(args) -> dict:
    if args.arch == "smollm2":
        return SMOLLM2
    return dict(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
                num_key_value_heads=max(args.hidden // 128, 1))


def make_step(args, experts, weight, negatives, form, compute):
    cfg = Config()
    cfg.model.path = "random"
    cfg.model.random_arch = architecture(args)
    cfg.adapter.num_experts, cfg.adapter.top_k, cfg.adapter.experts = experts, 2, compute
    cfg.loss.contrastive_weight, cfg.loss.num_negatives, cfg.loss.form = weight, negatives, form
    cfg.train.batch_size = args.batch
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
    rules = shd.rules_dict(cfg.mesh.rules)
    graphdef, adapters, frozen = split_model(build_model(cfg, mesh, rules))
    step = TrainStep(cfg, graphdef, adapters, frozen, mesh, rules)
    state = step.init_state(flat_values(adapters))
    rng = np.random.default_rng(0)
    shape = (1, args.batch, args.seq_len)
    vocab = cfg.model.random_arch["vocab_size"]
    # Supervised: the last eighth of each row, as in instruction data (a short response after the prompt),
    # so the step takes its usual branch (the LM head at the gathered supervised positions).
    response = np.broadcast_to(np.arange(args.seq_len) >= args.seq_len - max(args.seq_len // 8, 1), shape)
    batch = {"input_ids": rng.integers(0, vocab, shape), "targets": rng.integers(0, vocab, shape),
             "loss_mask": response, "attention_mask": np.ones(shape), "segment_ids": np.ones(shape),
             "positions": np.broadcast_to(np.arange(args.seq_len), shape)}
    batch = shd.global_batch({k: v.astype(np.int32) for k, v in batch.items()}, mesh, rules, batch_axis=1)
    return step, state, flat_values(frozen), batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="small", choices=["small", "smollm2"],
                        help="small: a random Llama of --hidden / --layers; smollm2: SmolLM2-135M's shapes")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=None, help="default: 128 (small), 160 (smollm2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated variant labels (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_step.json"))
    args = parser.parse_args()
    args.seq_len = args.seq_len or (160 if args.arch == "smollm2" else 128)
    chosen = set(args.only.split(",")) if args.only else {v[0] for v in VARIANTS}
    variants = [v for v in VARIANTS if v[0] in chosen]

    runs = {}
    for label, experts, weight, negatives, form, compute in variants:
        step, state, frozen, batch = make_step(args, experts, weight, negatives, form, compute)
        start = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready(metrics)
        runs[label] = {"step": step, "state": state, "frozen": frozen, "batch": batch, "times": [],
                       "compile_s": time.perf_counter() - start}
        print(f"compiled {label} in {runs[label]['compile_s']:.1f}s", flush=True)
    for _ in range(args.rounds):
        for run in runs.values():
            for _ in range(args.steps_per_round):
                start = time.perf_counter()
                run["state"], metrics = run["step"](run["state"], run["frozen"], run["batch"])
                jax.block_until_ready(metrics)
                run["times"].append(time.perf_counter() - start)

    median = {label: statistics.median(run["times"]) for label, run in runs.items()}
    base = median.get("n4 lambda0", float("nan"))
    rows = []
    for label, experts, weight, negatives, form, compute in variants:
        same_n = median.get(f"n{experts} lambda0", float("nan"))
        rows.append({"variant": label, "experts": experts, "lambda": weight, "negatives": negatives, "form": form,
                     "compute": compute, "median_step_s": median[label], "vs_n4_lambda0": median[label] / base,
                     "vs_same_n_lambda0": median[label] / same_n, "compile_s": runs[label]["compile_s"],
                     "spread_s": float(np.subtract(*np.percentile(runs[label]["times"], [75, 25])))})
    tokens = args.batch * args.seq_len
    arch = architecture(args)
    print(f"\nrandom Llama hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers, q/k/v/o adapters r=16 "
          f"top-2, {tokens} tokens/step, {jax.devices()[0].platform}; median of {args.rounds * args.steps_per_round} "
          "steps")
    print(f"{'variant':<30} {'step ms':>9} {'IQR ms':>7} {'x n4 lambda0':>13} {'x same-n lambda0':>17}")
    for r in rows:
        print(f"{r['variant']:<30} {r['median_step_s'] * 1e3:9.1f} {r['spread_s'] * 1e3:7.1f} "
              f"{r['vs_n4_lambda0']:13.2f} {r['vs_same_n_lambda0']:17.2f}")
    targets = []
    for what, variant, against, limit in TARGETS:
        if variant in median and against in median:
            ratio = median[variant] / median[against]
            targets.append({"target": what, "variant": variant, "against": against, "ratio": ratio, "limit": limit,
                            "met": ratio <= limit})
            print(f"target: {what}: {variant} / {against} = {ratio:.2f} (<= {limit}: "
                  f"{'met' if ratio <= limit else 'NOT met'})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "device": str(jax.devices()[0]), "rows": rows,
                                         "targets": targets}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
