"""Will it fit? Compile the CoMoE train step for a TPU slice (no TPU needed) and print memory per chip.

    pip install libtpu          # the TPU compiler; no TPU is used
    python benchmarks/tpu_memory.py                                   # LLaMA-2 7B, paper adapters, v5e:4x4
    python benchmarks/tpu_memory.py --topology v5p:2x2x1 --mesh 1,4,1 --batch 16 --seq-len 512
    python benchmarks/tpu_memory.py --topology v5e:4x4 --slices 2 --mesh 1,16,1 --batch 32   # multi-slice (dcn)

Prints a table (one row per setting) and writes JSON to benchmarks/results/tpu_memory.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comoe_jax.config import Config  # noqa: E402

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


def paper_config(args, remat: bool) -> Config:
    cfg = Config()
    cfg.model.path = "random"  # shapes only: nothing is read or allocated
    cfg.model.random_arch = LLAMA2_7B
    cfg.model.dtype = cfg.model.param_dtype = "bfloat16"
    cfg.model.remat = remat
    # the paper's CoMoE-LoRA: 4 experts, top-2, r 16, alpha 32, q/k/v/o, lambda 0.01
    cfg.train.batch_size = args.batch
    cfg.optim.grad_accum_steps = args.accum
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = (int(v) for v in args.mesh.split(","))
    cfg.mesh.dcn = args.slices
    return cfg


def floor_bytes(cfg: Config, result, seq_len: int) -> dict[str, float]:
    """What a chip must hold at least (remat): the bf16 frozen base and fp32 adapters + AdamW moments, each
    split over every chip, and the bf16 layer-boundary activations of its share of the batch."""
    chips = result.mesh.devices.size
    batch_shards = math.prod(result.mesh.shape[a] for a in ("dcn", "data", "fsdp"))
    arch = cfg.model.random_arch
    floor = {"frozen": 2 * result.frozen_parameters / chips, "adapters_and_adam": 12 * result.trainable_parameters
             / chips, "activations": 2 * arch["num_hidden_layers"] * cfg.train.batch_size / batch_shards * seq_len
             * arch["hidden_size"]}
    floor["total"] = sum(floor.values())
    return floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", default="v5e:4x4")
    parser.add_argument("--mesh", default="1,16,1", help="data,fsdp,tensor sizes of one slice (product = its chips)")
    parser.add_argument("--slices", type=int, default=1, help="TPU slices joined by the data-center network (dcn)")
    parser.add_argument("--batch", type=int, default=16, help="global micro-batch (paper: 16)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--seq-len", type=int, default=512, help="paper cutoff: 512")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tpu_memory.json"))
    args = parser.parse_args()

    from comoe_jax.aot import compile_train_step, tpu_devices

    devices = tpu_devices(args.topology, num_slices=args.slices)
    hbm = HBM_GIB.get(args.topology.split(":")[0])
    rows = []
    for remat in (True, False):
        cfg = paper_config(args, remat)
        start = time.perf_counter()
        result = compile_train_step(cfg, devices, args.seq_len)
        memory = result.memory_per_device()
        floor = floor_bytes(cfg, result, args.seq_len)
        rows.append({"topology": args.topology, "chips": len(devices), "mesh": dict(result.mesh.shape),
                     "remat": remat, "batch": args.batch, "seq_len": args.seq_len,
                     "compile_s": time.perf_counter() - start,
                     "trainable_params": result.trainable_parameters, "frozen_params": result.frozen_parameters,
                     **{f"{k}_bytes": v for k, v in memory.items()}, "hbm_gib": hbm,
                     **{f"floor_{k}_bytes": v for k, v in floor.items()},
                     "peak_over_floor": memory["peak_estimate"] / floor["total"]})
    gib = 2**30
    print(f"\nLLaMA-2 7B + CoMoE-LoRA (n=4, k=2, r=16, q/k/v/o), bf16 base, batch {args.batch} x {args.seq_len} "
          f"tokens, {args.slices} x {args.topology} ({len(devices)} chips), trainable {rows[0]['trainable_params']:,}")
    print(f"{'remat':>6} {'mesh':>24} {'args GiB':>9} {'temp GiB':>9} {'peak GiB':>9} {'floor GiB':>10} "
          f"{'x floor':>8} {'HBM GiB':>8} {'fits':>5} {'compile s':>9}")
    for r in rows:
        peak = r["peak_estimate_bytes"] / gib
        fits = "?" if hbm is None else ("yes" if peak < hbm else "no")
        print(f"{str(r['remat']):>6} {str(r['mesh']):>24} {r['argument_bytes'] / gib:9.2f} "
              f"{r['temp_bytes'] / gib:9.2f} {peak:9.2f} {r['floor_total_bytes'] / gib:10.2f} "
              f"{r['peak_over_floor']:8.2f} {str(hbm):>8} {fits:>5} {r['compile_s']:9.1f}")
    floor = rows[0]
    print("floor per chip (remat): " + ", ".join(f"{k} {floor[f'floor_{k}_bytes'] / gib:.2f} GiB"
                                                for k in ("frozen", "adapters_and_adam", "activations")))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
