"""Analytic FLOPs of one CoMoE train step (the work the step performs), and accelerator peaks for MFU.

Counted (multiply-add = 2 FLOPs): the frozen projections forward and their activation gradients in the
backward pass (no weight gradients: the base is frozen), attention scores and values over the full
T x T square (what a dense kernel computes), the adapters (rank-r codes of every expert, the mixture,
the router) forward and backward (input and weight gradients), the LM head at the positions it is
applied to, the contrastive term's Gram blocks and per-token similarities, and AdamW (about 12 FLOPs a
trainable parameter). Norms, activations, softmaxes and RoPE are elementwise and left out (a few %).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from comoe_jax.config import Config, negatives_per_anchor, parse_layer_range
from comoe_jax.model import DecoderSpec

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_shapes(spec: DecoderSpec) -> dict[str, tuple[int, int]]:
    d, f, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    return {"q_proj": (d, spec.num_heads * hd), "k_proj": (d, spec.num_kv_heads * hd),
            "v_proj": (d, spec.num_kv_heads * hd), "o_proj": (spec.num_heads * hd, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


@dataclass
class StepFlops:
    base: float  # frozen projections, forward + activation gradients
    attention: float
    head: float  # LM head forward + activation gradient
    adapters: float  # codes, mixture, router: forward + backward
    contrastive: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.base + self.attention + self.head + self.adapters + self.contrastive + self.optimizer

    def shares(self) -> dict[str, float]:
        return {k: v / self.total for k, v in vars(self).items()}


def step_flops(cfg: Config, spec: DecoderSpec, tokens: int, seq_len: int, head_positions: int | None = None,
               trainable: int = 0, sparse_experts: int | None = None) -> StepFlops:
    """FLOPs of one optimizer step over ``tokens`` tokens in rows of ``seq_len``.

    ``head_positions``: tokens the LM head is applied to (default: all); ``sparse_experts``: experts
    computed per token when only the needed ones are (default: all n).
    """
    a, shapes = cfg.adapter, projection_shapes(spec)
    adapted_layers = parse_layer_range(a.layers, spec.num_layers)
    n, r = a.num_experts, a.rank
    per_token_base = sum(2 * di * do for di, do in shapes.values())  # one layer
    # every layer from the lowest adapted one up needs its activation gradients
    backward_layers = spec.num_layers - adapted_layers.start
    base = tokens * per_token_base * (spec.num_layers + backward_layers)
    attention_layer = 4 * tokens * seq_len * spec.num_heads * spec.head_dim  # QK^T and AV over the square
    attention = attention_layer * (spec.num_layers + 2 * backward_layers)
    head = (head_positions if head_positions is not None else tokens) * 2 * spec.hidden_size * spec.vocab_size * 2
    computed = sparse_experts or n
    per_token_adapter = sum(2 * computed * r * (di + do) + (2 * di * n if n > 1 else 0)
                            for name, (di, do) in shapes.items() if name in a.target_modules)
    adapters = 3 * tokens * per_token_adapter * len(adapted_layers)  # forward + 2x backward
    contrastive = 0.0
    if n > 1 and (cfg.loss.contrastive_weight > 0 or cfg.loss.monitor_contrastive):
        anchors = a.top_k if cfg.loss.anchor == "all" else 1
        candidates = a.top_k - 1 + negatives_per_anchor(cfg)
        for name, (_, do) in shapes.items():
            if name in a.target_modules:
                if sparse_experts:  # cosines of the selected experts' d_out-wide outputs, no Gram blocks
                    gram, per_token = 0, 2 * (anchors * candidates + sparse_experts) * do
                else:
                    gram = 2 * n * n * r * r * do  # B_i B_j^T blocks, once per step
                    per_token = 2 * anchors * (candidates + 1) * r * r * 2
                contrastive += 3 * (gram + tokens * per_token) * len(adapted_layers)
    return StepFlops(base, attention, head, adapters, contrastive, 12.0 * trainable)


# Dense peak FLOP/s per chip (vendor figures) for MFU on accelerators.
PEAK_TFLOPS = {"H100": {"bfloat16": 989.0, "float32": 494.7}, "H200": {"bfloat16": 989.0, "float32": 494.7},
               "A100": {"bfloat16": 312.0, "float32": 156.0}, "TPU v4": {"bfloat16": 275.0},
               "TPU v5 lite": {"bfloat16": 197.0}, "TPU v5e": {"bfloat16": 197.0}, "TPU v5p": {"bfloat16": 459.0},
               "TPU v6 lite": {"bfloat16": 918.0}, "TPU v6e": {"bfloat16": 918.0}}


def device_peak(dtype: str) -> float | None:
    """Dense peak FLOP/s of one local device for ``dtype``; None where unknown (CPUs, other chips)."""
    kind = jax.devices()[0].device_kind
    for name, peaks in PEAK_TFLOPS.items():
        if name.lower() in kind.lower() and dtype in peaks:
            return peaks[dtype] * 1e12
    return None


def train_step_flops(cfg: Config, model, head_positions: int, trainable: int) -> float:
    """Analytic FLOPs of one optimizer step of a run (every micro-batch; the LM head at ``head_positions``
    slots per row), for the logged TFLOP/s and MFU."""
    rows, spec = cfg.train.batch_size * cfg.optim.grad_accum_steps, model.placement.spec
    selected = spec.top_k + (spec.negatives_per_anchor if spec.contrastive else 0)
    return step_flops(cfg, model.spec, tokens=rows * cfg.data.seq_len, seq_len=cfg.data.seq_len,
                      head_positions=rows * head_positions, trainable=trainable,
                      sparse_experts=selected if spec.experts == "sparse" else None).total
