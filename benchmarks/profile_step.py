"""Where one train step's time goes: the step split into stages, each jitted and timed on the same batch.

    python benchmarks/profile_step.py                 # SmolLM2-135M's shapes, batch 4 x 160 (the main job)
    python benchmarks/profile_step.py --arch small --hidden 1024 --layers 8 --seq-len 256 --batch 8
    python benchmarks/profile_step.py --experts 64 --negatives 4 --out benchmarks/results/profile_step_n64.json
    python benchmarks/profile_step.py --ops 25      # + the 25 most expensive XLA operations of the step

Stages (lambda 0.01 and lambda 0, n = 4 unless --experts, top-2, q/k/v/o): the forward pass with the loss; forward +
backward (``value_and_grad`` of the loss); the whole step (+ AdamW, clipping and the non-finite guard).
Differences give the backward pass, the optimizer and the contrastive term (lambda 0.01 - lambda 0);
the forward is further split by the analytic FLOPs of ``comoe_jax/flops.py`` (frozen base matmuls,
attention, adapters and router, LM head). Stages are timed in interleaved rounds (noise hits them
alike). Prints a table and writes benchmarks/results/profile_step.json.

``--ops N`` adds the N most expensive XLA operations of the whole step (lambda 0.01): a
``jax.profiler`` trace of a few steps, each operation's time summed per step and named by the JAX
operation it was compiled from (HLO ``op_name``). The profiler slows the step down, so read the
shares, not the milliseconds.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_step import architecture, make_step  # noqa: E402

from comoe_jax import sharding as shd  # noqa: E402
from comoe_jax.flops import step_flops  # noqa: E402
from comoe_jax.loading import model_spec  # noqa: E402


def stages(step, state, frozen, batch) -> dict:
    """name -> zero-argument callable running that stage once (compiled on first call)."""
    micro = {k: v[0] for k, v in batch.items()}
    counts = {"tokens": jnp.sum(micro["attention_mask"]).astype(jnp.float32),
              "response": jnp.sum(micro["loss_mask"]).astype(jnp.float32)}
    key = jax.random.key(0)

    def ruled(fn):
        def run(params, frozen, micro):
            with shd.activation_rules(step.mesh, step.rules):
                return fn(params, frozen, micro, key, counts)
        return jax.jit(run)

    forward = ruled(step.loss)
    backward = ruled(jax.value_and_grad(step.loss, has_aux=True))
    held = {"state": state}  # the step donates its state: keep the newest

    def whole_step():
        held["state"], metrics = step(held["state"], frozen, batch)
        return metrics

    return {"forward": lambda: forward(held["state"].params, frozen, micro),
            "forward+backward": lambda: backward(held["state"].params, frozen, micro),
            "step": whole_step}


CONTAINERS = {"while", "conditional", "call", "tuple", "get-tuple-element", "parameter", "constant"}


def hlo_operations(compiled_text: str) -> dict[str, tuple[str, str, str]]:
    """HLO instruction name -> (opcode, result shape, JAX op_name) from a compiled module's text."""
    found = {}
    for line in compiled_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(", line)
        if match:
            op_name = re.search(r'op_name="([^"]*)"', line)
            found[match.group(1)] = (match.group(3), match.group(2), op_name.group(1) if op_name else "")
    return found


def op_profile(run, compiled_text: str, steps: int = 3) -> list[dict]:
    """Per-step time of every XLA operation of ``run`` (a zero-argument step), most expensive first.
    Control-flow containers (while, cond) are left out: their bodies' operations are counted instead."""
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(run())
        trace = next(Path(folder).rglob("*.trace.json.gz"))
        events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    operations, micros = hlo_operations(compiled_text), {}
    for event in events:
        name = event.get("name")
        if event.get("ph") == "X" and name in operations and operations[name][0] not in CONTAINERS:
            micros[name] = micros.get(name, 0.0) + event["dur"]
    total = sum(micros.values())
    return [{"op": name, "opcode": operations[name][0], "shape": operations[name][1], "jax_op": operations[name][2],
             "ms_per_step": us / steps / 1e3, "share": us / total}
            for name, us in sorted(micros.items(), key=lambda item: -item[1])]


def print_op_profile(ops: list[dict], top: int) -> None:
    print(f"\nthe {top} most expensive XLA operations of the step (jax.profiler trace; shares of all operations' time)")
    print(f"{'share':>6} {'ms':>8}  {'operation':<28} {'shape':<30} jax op")
    for op in ops[:top]:
        where = op["jax_op"].replace("jit(_step)/", "").replace("while/body/closed_call/", "")
        print(f"{100 * op['share']:5.1f}% {op['ms_per_step']:8.1f}  {op['op'][:28]:<28} {op['shape'][:30]:<30} "
              f"{where[-80:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="smollm2", choices=["small", "smollm2"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--negatives", type=int, default=0, help="sampled negatives (0: all inactive experts)")
    parser.add_argument("--compute", default="dense", choices=["dense", "sparse", "auto"], help="adapter.experts")
    parser.add_argument("--ops", type=int, default=0, help="also list the N most expensive XLA operations")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile_step.json"))
    args = parser.parse_args()
    args.seq_len = args.seq_len or (160 if args.arch == "smollm2" else 128)

    runs, steps, compiled = {}, {}, {}
    for weight in (0.01, 0.0):
        step, state, frozen, batch = make_step(args, args.experts, weight, args.negatives, "gram", args.compute)
        steps[weight] = step
        if args.ops and weight:
            with shd.activation_rules(step.mesh, step.rules):
                compiled["text"] = step.jitted.lower(state, frozen, batch, step.schedule).compile().as_text()
        for name, fn in stages(step, state, frozen, batch).items():
            label = f"{name} lambda{weight}"
            start = time.perf_counter()
            jax.block_until_ready(fn())
            runs[label] = {"fn": fn, "times": [], "compile_s": time.perf_counter() - start}
            print(f"compiled {label} in {runs[label]['compile_s']:.1f}s", flush=True)
    for _ in range(args.rounds):
        for run in runs.values():
            start = time.perf_counter()
            jax.block_until_ready(run["fn"]())
            run["times"].append(time.perf_counter() - start)
    t = {label: statistics.median(run["times"]) for label, run in runs.items()}
    ops = op_profile(runs["step lambda0.01"]["fn"], compiled["text"]) if args.ops else []

    cfg = steps[0.01].cfg
    spec = model_spec("random", cfg.model.random_arch)
    tokens = args.batch * args.seq_len
    flops = step_flops(cfg, spec, tokens=tokens, seq_len=args.seq_len,
                       head_positions=args.batch * steps[0.01].head_positions)
    forward_share = {"frozen base matmuls": flops.base / 2, "attention": flops.attention / 3,
                     "adapters + router": flops.adapters / 3, "LM head": flops.head / 2}
    total_forward = sum(forward_share.values())
    f, fb, full = t["forward lambda0.01"], t["forward+backward lambda0.01"], t["step lambda0.01"]
    rows = [("forward (loss)", f), ("backward", fb - f), ("optimizer + clipping + guard", full - fb),
            ("whole step", full), ("contrastive term (lambda 0.01 - 0, whole step)", full - t["step lambda0.0"])]
    rows += [(f"  forward: {name} (analytic FLOP share)", f * share / total_forward)
             for name, share in forward_share.items()]
    print(f"\n{args.arch} {args.batch} x {args.seq_len} tokens, n={args.experts} top-2 q/k/v/o r=16, "
          f"{args.negatives or 'all'} negatives, {args.compute} experts, {jax.devices()[0].platform}; "
          f"median of {args.rounds}")
    print(f"{'stage':<52} {'ms':>9} {'% of step':>10}")
    for name, seconds in rows:
        print(f"{name:<52} {seconds * 1e3:9.1f} {100 * seconds / full:9.1f}%")
    if ops:
        print_op_profile(ops, args.ops)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"arch": architecture(args), "batch": args.batch, "seq_len": args.seq_len,
                               "experts": args.experts, "negatives": args.negatives, "compute": args.compute,
                               "medians_s": t, "compile_s": {k: r["compile_s"] for k, r in runs.items()},
                               "stages": [{"stage": n, "seconds": s, "share_of_step": s / full} for n, s in rows],
                               "operations": ops[:max(args.ops, 0)]},
                              indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
