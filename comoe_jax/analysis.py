"""The paper's analyses as tools: per-task expert workload (Fig. 4), routing entropy, MI(task; expert set),
expert representations in 2-D (Fig. 5), and the MI-gap estimate over training.

``collect_routing`` runs the model over evaluation prompts, capturing the :class:`RoutingTrace`
the adapters sow, and counts, per task and adapted module, which experts (and which k-subsets
of experts) the router selects on real prompt tokens; it also keeps every expert's rank-r code
at the answer position, from which the experts' outputs ``E_i = B_i h_i`` are rebuilt for the
2-D projection.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from comoe_jax import sharding as shd
from comoe_jax.adapters import ForwardContext, RoutingTrace
from comoe_jax.data import Example, render
from comoe_jax.data.templates import prompt_special_tokens
from comoe_jax.evaluate import padded_batches
from comoe_jax.model import flat_values, split_model, unstack
from comoe_jax.paths import as_path


@dataclass
class RoutingUsage:
    """Routing counts over real prompt tokens. Shapes: T tasks, M adapted modules, n experts."""

    tasks: tuple[str, ...]
    modules: list[str]
    num_experts: int
    top_k: int
    expert_counts: np.ndarray  # [T, M, n] tokens that selected each expert
    set_counts: np.ndarray  # [T, M, C(n, k)] tokens that selected each k-subset (see expert_sets)
    entropy_sum: np.ndarray  # [T, M] summed router entropy (nats) over tokens
    tokens: np.ndarray  # [T] real prompt tokens per task
    codes: dict = field(default_factory=dict)  # module -> [items, n, r] codes at the answer position
    code_tasks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # [items] task index

    @property
    def expert_sets(self) -> list[tuple[int, ...]]:
        return list(itertools.combinations(range(self.num_experts), self.top_k))

    def workload(self) -> np.ndarray:
        """[T, M, n]: share of each task's routing slots that go to each expert (rows sum to 1)."""
        return self.expert_counts / np.maximum(self.expert_counts.sum(-1, keepdims=True), 1)

    def router_entropy(self) -> np.ndarray:
        """[T, M]: mean entropy of the router's softmax per token, in bits."""
        return self.entropy_sum / np.maximum(self.tokens[:, None], 1) / math.log(2)


def mutual_information(joint_counts: np.ndarray) -> float:
    """I(X; Y) in bits from a [|X|, |Y|] table of counts."""
    p = joint_counts / max(joint_counts.sum(), 1e-12)
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log2(p[nz] / (px @ py)[nz])))


def task_expert_mi(usage: RoutingUsage) -> np.ndarray:
    """[M]: MI between the task and the selected expert set, per module, in bits (max log2 T)."""
    return np.array([mutual_information(usage.set_counts[:, m]) for m in range(len(usage.modules))])


@partial(jax.jit, static_argnums=(0, 5))
def _trace(graphdef, state, ids, mask, last, code_rows: tuple[int, ...]):
    """Routing of every adapted module: ``topk [M, B, T, k]``, ``router_entropy [M, B, T]``, and the codes
    ``[len(code_rows), B, n, r]`` of the modules ``code_rows`` (rows of ``adapter_modules()``) at ``last``."""
    model = nnx.merge(graphdef, state)
    ctx = ForwardContext(mask.astype(jnp.float32), jnp.maximum(mask.sum(), 1).astype(jnp.float32))
    _, trace = nnx.capture(model.forward, RoutingTrace)(ids, mask, ctx=ctx)
    codes = model.stat(trace, "codes")  # [M, B, T, n, r]; static slices: XLA keeps only the rows used
    rows = jnp.arange(ids.shape[0])
    return {"topk": model.stat(trace, "topk"), "router_entropy": model.stat(trace, "router_entropy"),
            "codes": [codes[m][rows, last] for m in code_rows]}


def collect_routing(model, tokenizer, examples: list[Example], template: str, batch_size: int = 16,
                    code_modules: tuple[str, ...] = ()) -> RoutingUsage:
    """Routing counts per task and module over the prompts of ``examples`` (see the module docstring)."""
    spec = model.placement.spec
    modules = model.adapter_modules()
    tasks = tuple(dict.fromkeys(ex.task for ex in examples))
    sets = {s: i for i, s in enumerate(itertools.combinations(range(spec.num_experts), spec.top_k))}
    shape = (len(tasks), len(modules))
    usage = RoutingUsage(tasks, modules, spec.num_experts, spec.top_k, np.zeros((*shape, spec.num_experts)),
                         np.zeros((*shape, len(sets))), np.zeros(shape), np.zeros(len(tasks)))
    prompts = [tokenizer(render(ex, template, tokenizer)[0], add_special_tokens=prompt_special_tokens(template))
               ["input_ids"] for ex in examples]
    graphdef, state = nnx.split(model)
    code_rows = tuple(modules.index(m) for m in code_modules)
    codes = {m: [] for m in code_modules}
    code_tasks = []
    mesh, batch_size = shd.eval_mesh(state, batch_size)
    for idx, ids, mask, lengths in padded_batches(prompts, batch_size, tokenizer.pad_token_id):
        out = jax.tree.map(shd.to_host, _trace(graphdef, state, *shd.place_rows(mesh, ids, mask, lengths - 1),
                                               code_rows))
        for row, i in enumerate(idx):
            t, n_tok = tasks.index(examples[i].task), lengths[row]
            usage.tokens[t] += n_tok
            code_tasks.append(t)
            for m in range(len(modules)):
                topk = np.sort(out["topk"][m, row, :n_tok], axis=-1)
                np.add.at(usage.expert_counts[t, m], topk.ravel(), 1)
                np.add.at(usage.set_counts[t, m], [sets[tuple(s)] for s in topk.tolist()], 1)
                usage.entropy_sum[t, m] += out["router_entropy"][m, row, :n_tok].sum()
            for c, name in enumerate(code_modules):
                codes[name].append(out["codes"][c][row])
    usage.codes = {m: np.stack(v) for m, v in codes.items()}
    usage.code_tasks = np.array(code_tasks, np.int32)
    return usage


def expert_outputs_2d(model, usage: RoutingUsage, module: str) -> tuple[np.ndarray, np.ndarray]:
    """PCA to 2-D of the unit-normalised expert outputs ``B_i h_i`` at the answer position.

    Returns points ``[items * n, 2]`` and their expert index ``[items * n]``.
    """
    _, adapters, _ = split_model(model)
    lora_b = np.asarray(unstack(flat_values(adapters), model.groups)[f"{module}.lora_b"], np.float64)  # [n, r, d]
    outputs = np.einsum("inr,nrd->ind", usage.codes[module].astype(np.float64), lora_b)
    outputs /= np.maximum(np.linalg.norm(outputs, axis=-1, keepdims=True), 1e-12)
    flat = outputs.reshape(-1, outputs.shape[-1])
    centred = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    experts = np.tile(np.arange(outputs.shape[1]), outputs.shape[0])
    return centred @ vt[:2].T, experts


def summary(usage: RoutingUsage) -> dict:
    """Headline numbers: MI(task; expert set) and router entropy, mean and per module."""
    mi = task_expert_mi(usage)
    entropy = usage.router_entropy()
    return {"tasks": list(usage.tasks), "mi_task_expert_set_bits": float(mi.mean()),
            "mi_upper_bound_bits": math.log2(len(usage.tasks)), "router_entropy_bits": float(entropy.mean()),
            "per_module": {m: {"mi_bits": float(mi[j]), "router_entropy_bits": float(entropy[:, j].mean())}
                           for j, m in enumerate(usage.modules)}}


def write_summary(usage: RoutingUsage, path: Path) -> dict:
    data = summary(usage) | {"workload": usage.workload().round(4).tolist(), "modules": usage.modules}
    as_path(path).write_text(json.dumps(data, indent=1))
    return data
