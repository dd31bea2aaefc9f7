"""How close is the train step to the hardware? Step time, tokens/s, analytic FLOPs, achieved FLOP/s, and
the roofline fraction against a jitted matmul measured in the same process (and MFU on accelerators).

    python benchmarks/roofline.py                       # SmolLM2-135M shapes (4 x 160, 8 x 512), a 7B-shaped stack
    python benchmarks/roofline.py --only smollm2-4x160 --steps 10
    python benchmarks/roofline.py --dtype float32,bfloat16   # and bf16 base compute (fp32 adapters / router /
                                                             # losses), with each setting's bf16 / fp32 step ratio

The SmolLM2 rows use SmolLM2-135M's exact architecture with random weights (FLOPs do not depend on the
weights) and real batches of the default mix, tokenised with its tokenizer, so the share of supervised
(response) tokens is the main job's. FLOPs are counted analytically (comoe_jax/flops.py, the work the
step performs); XLA's ``cost_analysis()`` is printed as a cross-check only: it counts a scanned layer
body once. "vs layer": achieved FLOP/s against one decoder layer's projections at the step's token
count, jitted and run alone (the step's own matmul shapes, which small models run well below a 2048^3
matmul). Prints a table and writes benchmarks/results/roofline.json.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from comoe_jax import sharding as shd  # noqa: E402
from comoe_jax.config import Config  # noqa: E402
from comoe_jax.flops import device_peak, step_flops  # noqa: E402
from comoe_jax.loading import build_model, load_tokenizer  # noqa: E402
from comoe_jax.model import flat_values, split_model, trainable_parameters  # noqa: E402
from comoe_jax.step import TrainStep  # noqa: E402
from comoe_jax.trainer import next_global_batch, training_stream  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
               max_position_embeddings=8192, rms_norm_eps=1e-5)
LLAMA7B_STACK = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
SETTINGS = {  # name -> (architecture, batch, seq_len, data)
    "smollm2-4x160": (SMOLLM2, 4, 160, "mix"),
    "smollm2-8x512": (SMOLLM2, 8, 512, "mix"),
    "llama7b-2layers-1x256": (LLAMA7B_STACK, 1, 256, "mix"),
}


def median_seconds(fn, *args, repeats: int = 10) -> float:
    """Median wall time of ``fn(*args)`` after one warm-up call (compilation)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_second(dtype, size: int = 2048) -> float:
    """FLOP/s of a jitted ``size^3`` matmul in this process (the roofline the step is held against)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    return 2 * size**3 / median_seconds(jax.jit(lambda x, y: x @ y), a, b)


def layer_matmuls_flops_per_second(arch: dict, tokens: int, dtype) -> float:
    """FLOP/s of one decoder layer's projections (q, k, v, o, gate, up, down) at the step's token count,
    jitted together and run alone: what this machine does on the matmul shapes the step is made of."""
    d, f = arch["hidden_size"], arch["intermediate_size"]
    hd = d // arch["num_attention_heads"]
    q, kv = arch["num_attention_heads"] * hd, arch["num_key_value_heads"] * hd
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    keys = jax.random.split(jax.random.key(2), len(shapes) + 1)
    weights = [jax.random.normal(k, s, dtype) for k, s in zip(keys[1:], shapes)]
    x = {n: jax.random.normal(keys[0], (tokens, n), dtype) for n in {s[0] for s in shapes}}
    layer = jax.jit(lambda x, ws: [x[w.shape[0]] @ w for w in ws])
    return sum(2 * tokens * a * b for a, b in shapes) / median_seconds(layer, x, weights)


def make_config(arch: dict, batch: int, seq_len: int, data: str, dtype: str) -> Config:
    cfg = Config()
    cfg.model.path = "random"
    cfg.model.random_arch = arch
    cfg.model.dtype = cfg.model.param_dtype = dtype
    cfg.data.train = (data,)
    cfg.data.seq_len = seq_len
    cfg.train.batch_size = batch
    cfg.mesh.num_devices = 1
    return cfg


def measure(name: str, cfg: Config, steps: int) -> dict:
    mesh, rules = shd.make_mesh(cfg.mesh), shd.rules_dict(cfg.mesh.rules)
    model = build_model(cfg, mesh, rules)
    graphdef, adapters, frozen = split_model(model)
    step = TrainStep(cfg, graphdef, adapters, frozen, mesh, rules)
    state, frozen = step.init_state(flat_values(adapters)), flat_values(frozen)
    stream = training_stream(cfg, load_tokenizer("smollm2-135m"), lambda text: None)
    host = next_global_batch(stream, cfg)
    batch = shd.global_batch(host, mesh, rules, batch_axis=1)
    compiled = step.jitted.lower(state, frozen, batch, step.schedule).compile()
    xla_flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    start = time.perf_counter()
    state, metrics = step(state, frozen, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    tokens = int(host["attention_mask"].sum())
    supervised = int(host["loss_mask"].sum())
    counts = trainable_parameters(model)
    all_positions = cfg.train.batch_size * cfg.data.seq_len
    gathered = int(host["loss_mask"].sum(-1).max()) <= step.head_positions  # the step's branch for this batch
    spec = model.placement.spec
    selected = spec.top_k + (spec.negatives_per_anchor if spec.contrastive else 0)
    flops = step_flops(cfg, model.spec, tokens=all_positions, seq_len=cfg.data.seq_len,
                       head_positions=cfg.train.batch_size * step.head_positions if gathered else all_positions,
                       trainable=counts["total"], sparse_experts=selected if spec.experts == "sparse" else None)
    median = statistics.median(times)
    return {"setting": name, "batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len, "dtype": cfg.model.dtype,
            "real_tokens": tokens, "supervised_tokens": supervised, "median_step_s": median,
            "iqr_s": float(np.subtract(*np.percentile(times, [75, 25]))), "first_step_s": first,
            "tokens_per_s": cfg.train.batch_size * cfg.data.seq_len / median, "flops": flops.total,
            "flops_breakdown": vars(flops), "achieved_flops_per_s": flops.total / median,
            "xla_cost_analysis_flops": xla_flops}


def measure_row(name: str, arch: dict, batch: int, seq_len: int, data: str, dtype: str, steps: int,
                matmul_peak: float) -> dict:
    row = measure(name, make_config(arch, batch, seq_len, data, dtype), steps)
    row["matmul_flops_per_s"] = matmul_peak
    row["roofline_fraction"] = row["achieved_flops_per_s"] / matmul_peak
    row["layer_matmuls_flops_per_s"] = layer_matmuls_flops_per_second(arch, batch * seq_len, getattr(jnp, dtype))
    row["layer_matmuls_fraction"] = row["achieved_flops_per_s"] / row["layer_matmuls_flops_per_s"]
    peak = device_peak(dtype)
    row["mfu"] = row["achieved_flops_per_s"] / peak if peak else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated settings of {', '.join(SETTINGS)}")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", default="float32",
                        help="comma-separated compute dtypes of the frozen base: float32, bfloat16")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "roofline.json"))
    args = parser.parse_args()

    names = [n for n in args.only.split(",") if n] or list(SETTINGS)
    dtypes = [d for d in args.dtype.split(",") if d]
    unknown = sorted({*names} - set(SETTINGS)) + sorted({*dtypes} - {"float32", "bfloat16"})
    if unknown or not dtypes:
        parser.error(f"unknown setting or dtype {unknown}: settings are {', '.join(SETTINGS)}; "
                     "dtypes are float32, bfloat16")
    peaks = {d: matmul_flops_per_second(getattr(jnp, d)) for d in ("float32", "bfloat16")}
    rows = []
    for name in names:
        arch, batch, seq_len, data = SETTINGS[name]
        for dtype in dtypes:
            rows.append(measure_row(name, arch, batch, seq_len, data, dtype, args.steps, peaks[dtype]))
            print(f"{name} {dtype}: {rows[-1]['median_step_s']:.3f} s/step", flush=True)
    for r in rows:  # each dtype's step time against the float32 step of its setting, same process
        fp32 = [q for q in rows if q["setting"] == r["setting"] and q["dtype"] == "float32"]
        r["vs_float32"] = r["median_step_s"] / fp32[0]["median_step_s"] if fp32 else None

    device = jax.devices()[0]
    print(f"\n{device.device_kind} ({device.platform}), {jax.device_count()} device(s); jitted matmul 2048^3: "
          f"fp32 {peaks['float32'] / 1e9:,.1f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:,.1f} GFLOP/s; "
          f"median of {args.steps} steps")
    head = (f"{'setting':<24} {'dtype':>8} {'step s':>8} {'tok/s':>8} {'GFLOP/step':>11} {'GFLOP/s':>9} "
            f"{'roofline':>9} {'vs layer':>9} {'MFU':>6} {'xla GFLOP':>10} {'vs fp32':>8}")
    print(head)
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        ratio = "-" if r["vs_float32"] is None else f"{r['vs_float32']:.2f}x"
        print(f"{r['setting']:<24} {r['dtype']:>8} {r['median_step_s']:8.3f} {r['tokens_per_s']:8,.0f} "
              f"{r['flops'] / 1e9:11.1f} {r['achieved_flops_per_s'] / 1e9:9.1f} {r['roofline_fraction']:9.2f} "
              f"{r['layer_matmuls_fraction']:9.2f} "
              f"{mfu:>6} {r['xla_cost_analysis_flops'] / 1e9:10.1f} {ratio:>8}")
    print("\nwhere the FLOPs go (share of the analytic count):")
    for r in rows:
        shares = {k: v / r["flops"] for k, v in r["flops_breakdown"].items()}
        print(f"  {r['setting']:<24} {r['dtype']:<9} " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": str(device), "matmul_flops_per_s": peaks, "rows": rows},
                                         indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
