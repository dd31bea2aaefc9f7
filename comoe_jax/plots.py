"""Every figure comoe-jax draws: loss curves, expert load, per-task workload (the paper's Fig. 4), expert
representations in 2-D (Fig. 5) and the MI-gap estimate over training. Matplotlib, Agg backend, PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from comoe_jax.paths import as_path, save_figure

if TYPE_CHECKING:
    from comoe_jax.analysis import RoutingUsage


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(history: list[dict], out_dir: Path, modules: list[str] | None = None,
             mi_gap_label: str = "", negatives: int = 0) -> list[Path]:
    """A run's figures from its metrics.jsonl rows: ``losses.png``; ``expert_load.png``, the last expert
    load (one panel per adapted projection, layers x experts); ``mi_gap.png`` when the term was logged.

    ``modules`` names the rows of ``expert_load`` (``CausalLM.adapter_modules()``); ``negatives``
    is the number of negatives per anchor (the MI-gap bound is its log).
    """
    plt = _plt()
    if not history:
        return []
    steps = [r["step"] for r in history]
    keys = [k for k in ("loss", "ce", "contrastive", "mi_gap") if k in history[-1]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(steps, [r.get(key, np.nan) for r in history])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    save_figure(fig, as_path(out_dir) / "losses.png", dpi=100)
    plt.close(fig)
    written = [as_path(out_dir) / "losses.png"]
    loads = [r for r in history if "expert_load" in r]
    if loads and modules:
        written.append(_plot_load(np.asarray(loads[-1]["expert_load"]), modules, loads[-1]["step"], out_dir, plt))
    if negatives and any("mi_gap" in r for r in history):
        written.append(plot_mi_gap({mi_gap_label: history}, as_path(out_dir) / "mi_gap.png", math.log(negatives)))
    return written


def _plot_load(load: np.ndarray, modules: list[str], step: int, out_dir: Path, plt) -> Path:
    """Heatmap per projection: rows = layers, columns = experts, colour = share of routing slots."""
    projections = list(dict.fromkeys(m.split(".", 2)[2] for m in modules))
    layers = sorted({int(m.split(".")[1]) for m in modules})
    fig, axes = plt.subplots(1, len(projections), figsize=(1.5 + 1.6 * len(projections), 2.2 + 0.18 * len(layers)),
                             squeeze=False, sharey=True, layout="constrained")
    for ax, proj in zip(axes[0], projections):
        rows = [modules.index(f"layers.{layer}.{proj}") for layer in layers]
        image = ax.imshow(load[rows], aspect="auto", cmap="viridis", vmin=0, vmax=max(float(load.max()), 1e-6))
        ax.set_title(proj.split(".")[-1], fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(load.shape[1]))
    axes[0][0].set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of routing slots")
    fig.suptitle(f"expert load at step {step}")
    path = as_path(out_dir) / "expert_load.png"
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


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
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return as_path(path)


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
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return as_path(path)


def plot_validation(rows: list[dict], path: Path) -> Path:
    """``validation.png``: response loss and accuracy on the validation items over training steps."""
    plt = _plt()
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3), layout="constrained")
    axes[0].plot(steps, [r["loss"] for r in rows], marker="o")
    axes[0].set(title="validation loss (response CE)", xlabel="step")
    for key in [k for k in rows[-1] if k.startswith("accuracy_") and k != "accuracy_average"]:
        axes[1].plot(steps, [r.get(key, math.nan) for r in rows], marker=".", alpha=0.6, label=key[9:])
    axes[1].plot(steps, [r["accuracy_average"] for r in rows], marker="o", color="black", label="average")
    axes[1].set(title="validation accuracy", xlabel="step", ylim=(0, 1))
    axes[1].legend(fontsize=7)
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return as_path(path)


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
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return as_path(path)
