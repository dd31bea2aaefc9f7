"""The paper's analyses as tools: per-task expert workload (Fig. 4), routing entropy, MI(task; expert set),
expert representations in 2-D (Fig. 5), and the MI-gap estimate over training.

``collect_routing`` runs the model over evaluation prompts with the adapters' probe switched on
and counts, per task and adapted module, which experts (and which k-subsets of experts) the
router selects on real prompt tokens; it also keeps every expert's rank-r code at the answer
position, from which the experts' outputs ``E_i = B_i h_i`` are rebuilt for the 2-D projection.
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

from comoe_jax.adapters import ForwardContext
from comoe_jax.data import Example, render
from comoe_jax.evaluate import padded_batches
from comoe_jax.model import flat_values, split_model, unstack


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


@partial(jax.jit, static_argnums=0)
def _probe(graphdef, state, ids, mask, last):
    model = nnx.merge(graphdef, state)
    ctx = ForwardContext(mask.astype(jnp.float32), jnp.maximum(mask.sum(), 1).astype(jnp.float32), probe=last)
    stats = model.forward(ids, mask, ctx=ctx).stats
    return {name: {k: s[k] for k in ("topk", "codes", "router_entropy")} for name, s in stats.items()}


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
    prompts = [tokenizer(render(ex, template)[0])["input_ids"] for ex in examples]
    graphdef, state = nnx.split(model)
    codes = {m: [] for m in code_modules}
    code_tasks = []
    for idx, ids, mask, lengths in padded_batches(prompts, batch_size, tokenizer.pad_token_id):
        out = jax.device_get(_probe(graphdef, state, ids, mask, lengths - 1))
        for row, i in enumerate(idx):
            t, n_tok = tasks.index(examples[i].task), lengths[row]
            usage.tokens[t] += n_tok
            code_tasks.append(t)
            for m, name in enumerate(modules):
                topk = np.sort(out[name]["topk"][row, :n_tok], axis=-1)
                np.add.at(usage.expert_counts[t, m], topk.ravel(), 1)
                np.add.at(usage.set_counts[t, m], [sets[tuple(s)] for s in topk.tolist()], 1)
                usage.entropy_sum[t, m] += out[name]["router_entropy"][row, :n_tok].sum()
                if name in codes:
                    codes[name].append(out[name]["codes"][row])
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
    Path(path).write_text(json.dumps(data, indent=1))
    return data


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_workload(usage: RoutingUsage, path: Path, layers: tuple[int, ...] | None = None) -> Path:
    """The paper's Fig. 4: per-task expert workload, one heatmap (tasks x experts) per (layer, projection)."""
    plt = _plt()
    all_layers = sorted({int(m.split(".")[1]) for m in usage.modules})
    if layers is None:
        layers = tuple(dict.fromkeys([all_layers[0], all_layers[len(all_layers) // 2], all_layers[-1]]))
    projections = list(dict.fromkeys(m.split(".", 2)[2] for m in usage.modules))
    work = usage.workload()
    fig, axes = plt.subplots(len(layers), len(projections), squeeze=False, layout="constrained",
                             figsize=(1.2 + 0.5 * usage.num_experts * len(projections), 0.9 + 0.35 * len(usage.tasks)
                                      * len(layers)))
    for r, layer in enumerate(layers):
        for c, proj in enumerate(projections):
            ax = axes[r][c]
            m = usage.modules.index(f"layers.{layer}.{proj}")
            top = 1.0 / usage.top_k  # an expert takes at most one of a token's k slots
            ax.imshow(work[:, m], vmin=0, vmax=top, cmap="viridis", aspect="auto")
            for (t, e), value in np.ndenumerate(work[:, m]):
                ax.text(e, t, f"{value:.2f}".lstrip("0"), ha="center", va="center", fontsize=6,
                        color="white" if value < 0.6 * top else "black")
            ax.set_title(f"layer {layer} {proj.split('.')[-1]}", fontsize=8)
            ax.set_xticks(range(usage.num_experts))
            ax.set_yticks(range(len(usage.tasks)), usage.tasks if c == 0 else [""] * len(usage.tasks), fontsize=7)
    fig.suptitle("share of each task's routing slots per expert")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_representations(panels: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """The paper's Fig. 5: expert outputs in 2-D coloured by expert, one panel per run."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False, layout="constrained")
    for ax, (name, (points, experts)) in zip(axes[0], panels.items()):
        for e in np.unique(experts):
            sel = experts == e
            ax.scatter(points[sel, 0], points[sel, 1], s=6, alpha=0.6, label=f"expert {e}")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=7, markerscale=2)
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_mi_gap(runs: dict[str, list[dict]], path: Path, log_n: float | None = None) -> Path:
    """MI-gap estimate log(N) - L_con over training steps, one line per run (from metrics.jsonl rows)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
    for name, rows in runs.items():
        rows = [r for r in rows if "mi_gap" in r]
        ax.plot([r["step"] for r in rows], [r["mi_gap"] for r in rows], label=name)
    if log_n is not None:
        ax.axhline(log_n, color="grey", linestyle=":", label="log N (bound)")
    ax.set_xlabel("step")
    ax.set_ylabel("log N - L_con (nats)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
