"""The same CoMoE train step as a PyTorch user would write it, timed against ours on the same batch.

    pip install torch                     # CPU build is fine; a benchmark, never the training path
    python benchmarks/peer_torch.py                       # SmolLM2-135M shapes, batch 4 x 160
    python benchmarks/peer_torch.py --batch 8 --seq-len 512 --no-compile

The peer: transformers' ``LlamaForCausalLM`` in fp32 with SmolLM2-135M's architecture (random weights), the
base frozen; on q/k/v/o a mixture of 4 LoRA experts (r 16, alpha 32, dropout 0.05), a float32 router with
top-2 renormalised weights, the contrastive term of Algorithm 1 (random anchor, InfoNCE over the
L2-normalised outputs of all experts, tau 0.07, eps 1e-3) on the full expert outputs, lambda 0.01,
AdamW; eager, and with ``torch.compile`` when it works. Ours: the same model, adapters and loss through
comoe_jax's jitted step. Both run on the same padded batch of the default mix with as many threads;
steps are timed in interleaved rounds. Prints a table and writes benchmarks/results/peer_torch.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
from roofline import SMOLLM2, make_config  # noqa: E402

from comoe_jax import sharding as shd  # noqa: E402
from comoe_jax.loading import build_model, load_tokenizer  # noqa: E402
from comoe_jax.model import flat_values, split_model  # noqa: E402
from comoe_jax.step import TrainStep  # noqa: E402
from comoe_jax.trainer import next_global_batch, training_stream  # noqa: E402

N, K, R, ALPHA, DROPOUT, TAU, EPS, LAMBDA = 4, 2, 16, 32.0, 0.05, 0.07, 1e-3, 0.01


def torch_peer(arch: dict, batch: dict, compile_step: bool):
    """(step function, description) of the PyTorch peer on ``batch`` (numpy arrays [B, T])."""
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    class MoLoRALinear(nn.Module):
        def __init__(self, base: nn.Linear):
            super().__init__()
            self.base = base
            d_in, d_out = base.in_features, base.out_features
            self.lora_a = nn.Parameter(torch.empty(N, d_in, R).uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in)))
            self.lora_b = nn.Parameter(torch.zeros(N, R, d_out))
            self.router = nn.Linear(d_in, N, bias=False)
            nn.init.normal_(self.router.weight, std=0.02)
            self.dropout = nn.Dropout(DROPOUT)
            self.aux = None

        def forward(self, x):
            probs = torch.softmax(self.router(x.float()), dim=-1)
            top, idx = probs.topk(K, dim=-1)
            gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
            h = torch.einsum("btd,ndr->btnr", self.dropout(x), self.lora_a)
            experts = torch.einsum("btnr,nro->btno", h, self.lora_b)  # every expert's output, for the term
            self.aux = contrastive(experts, idx)
            return self.base(x) + (ALPHA / R) * torch.einsum("btn,btno->bto", gates, experts)

    def contrastive(experts, idx):
        """Algorithm 1 per token: [B, T]."""
        e = nn.functional.normalize(experts, dim=-1, eps=1e-6)
        slot = torch.randint(0, K, idx.shape[:-1], device=idx.device)
        anchor = idx.gather(-1, slot[..., None])  # [B, T, 1]
        q = e.gather(2, anchor[..., None].expand(-1, -1, -1, e.shape[-1]))  # [B, T, 1, d]
        sims = (q * e).sum(-1) / TAU  # [B, T, n]
        active = torch.zeros(sims.shape, dtype=torch.bool).scatter(-1, idx, True)
        positive = active & ~torch.zeros_like(active).scatter(-1, anchor, True)
        lse_pos = torch.logsumexp(sims.masked_fill(~positive, -float("inf")), -1)
        lse_all = torch.logsumexp(sims.masked_fill(~(positive | ~active), -float("inf")), -1)
        return torch.logaddexp(lse_all, torch.tensor(math.log(EPS))) - lse_pos

    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in arch.items()}, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).float()
    model.requires_grad_(False)
    adapters = []
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            wrapped = MoLoRALinear(getattr(layer.self_attn, name))
            setattr(layer.self_attn, name, wrapped)
            adapters.append(wrapped)
    params = [p for m in adapters for p in (m.lora_a, m.lora_b, m.router.weight)]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    ids, targets = torch.tensor(batch["input_ids"]).long(), torch.tensor(batch["targets"]).long()
    mask, loss_mask = torch.tensor(batch["attention_mask"]), torch.tensor(batch["loss_mask"]).float()

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        ce = (ce * loss_mask.flatten()).sum() / loss_mask.sum().clamp(min=1)
        real = mask.float()
        con = torch.stack([(m.aux * real).sum() / real.sum() for m in adapters]).mean()
        loss = ce + LAMBDA * con
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.detach()

    if compile_step:
        return torch.compile(step), "torch.compile"
    return step, "eager"


def time_rounds(steps: dict, rounds: int, per_round: int) -> dict[str, list[float]]:
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torch.compile of the peer's step")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "peer_torch.json"))
    args = parser.parse_args()

    import torch

    threads = os.cpu_count()
    torch.set_num_threads(threads)  # JAX's CPU backend uses every core
    cfg = make_config(SMOLLM2, args.batch, args.seq_len, "mix", "float32")
    cfg.data.packing = False  # transformers' Llama has no segment ids: both sides get padded rows
    mesh, rules = shd.make_mesh(cfg.mesh), shd.rules_dict(cfg.mesh.rules)
    graphdef, adapters, frozen = split_model(build_model(cfg, mesh, rules))
    ours = TrainStep(cfg, graphdef, adapters, frozen, mesh, rules)
    state, frozen = ours.init_state(flat_values(adapters)), flat_values(frozen)
    host = next_global_batch(training_stream(cfg, load_tokenizer("smollm2-135m"), lambda text: None), cfg)
    batch = shd.global_batch(host, mesh, rules, batch_axis=1)

    def ours_step():
        nonlocal state
        state, metrics = ours(state, frozen, batch)
        jax.block_until_ready(metrics)

    steps = {"comoe-jax (jit)": ours_step}
    eager, _ = torch_peer(SMOLLM2, {k: v[0] for k, v in host.items()}, compile_step=False)
    steps["pytorch eager"] = eager
    notes = {}
    if args.compile:
        try:
            compiled, _ = torch_peer(SMOLLM2, {k: v[0] for k, v in host.items()}, compile_step=True)
            start = time.perf_counter()
            compiled()
            notes["torch.compile first step s"] = time.perf_counter() - start
            steps["pytorch torch.compile"] = compiled
        except Exception as e:  # noqa: BLE001  (a compiler failure is a result to report, not a crash)
            notes["torch.compile"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    for fn in steps.values():  # warm-up (jit compile, allocator)
        fn()
    times = time_rounds(steps, args.rounds, args.steps_per_round)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["comoe-jax (jit)"]
    tokens = args.batch * args.seq_len
    print(f"\nSmolLM2-135M shapes, batch {args.batch} x {args.seq_len}, CoMoE-LoRA n={N} k={K} r={R} on q/k/v/o, "
          f"lambda {LAMBDA}; {threads} threads; median of {args.rounds * args.steps_per_round} steps")
    print(f"{'step':<24} {'s/step':>8} {'tok/s':>8} {'x comoe-jax':>12}")
    rows = []
    for name, value in median.items():
        rows.append({"step": name, "median_s": value, "tokens_per_s": tokens / value, "vs_comoe_jax": value / base})
        print(f"{name:<24} {value:8.3f} {tokens / value:8,.0f} {value / base:12.2f}")
    for key, value in notes.items():
        print(f"{key}: {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "threads": threads, "rows": rows, "notes": notes},
                                         indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
