"""A run's evaluation and analysis artefacts: eval_before / eval_after, routing.json, plots, report.md.

Every process evaluates (each scores its share of the rows on the mesh); only process 0 writes.
"""

from __future__ import annotations

from pathlib import Path

import jax

from comoe_jax.analysis import collect_routing, expert_outputs_2d
from comoe_jax.analysis import summary as routing_summary
from comoe_jax.analysis import write_summary as write_routing_summary
from comoe_jax.config import Config
from comoe_jax.data import Example, load_sources
from comoe_jax.evaluate import EvalResult, comparison_markdown, evaluate
from comoe_jax.paths import as_path
from comoe_jax.plots import plot_representations, plot_workload
from comoe_jax.progress import read_jsonl


def evaluation_examples(cfg: Config) -> list[Example]:
    """The evaluation items of ``cfg``: the tasks ``eval.tasks`` (default all) of ``eval.sources`` at ``eval.split``."""
    return load_sources(cfg.eval.sources, cfg.eval.split, seed=cfg.train.seed, tasks=cfg.eval.tasks,
                        max_per_task=cfg.eval.max_per_task, tasks_key="eval.tasks")


def validation_examples(cfg: Config) -> list[Example]:
    """The items validated during training: ``eval.validation_sources``, else ``eval.sources`` at the
    validation split (``eval.tasks`` and ``eval.max_per_task`` apply)."""
    sources = cfg.eval.validation_sources or cfg.eval.sources
    return load_sources(sources, "validation", seed=cfg.train.seed, tasks=cfg.eval.tasks,
                        max_per_task=cfg.eval.max_per_task, tasks_key="eval.tasks")


def evaluate_and_save(cfg: Config, model, tokenizer, examples: list[Example], stem: Path, say=None) -> EvalResult:
    """Evaluate with ``cfg.eval`` settings (``say``: progress lines); write ``<stem>.json`` and ``<stem>.md``."""
    result = evaluate(model, tokenizer, examples, mode=cfg.eval.mode, template=cfg.data.template,
                      batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens, say=say,
                      max_len=cfg.eval.max_len)
    if jax.process_index() == 0:
        result.write(stem)
    return result


def analyse_and_save(cfg: Config, model, tokenizer, examples: list[Example], out: Path) -> dict:
    """Routing per task (workload.png, routing.json) and expert representations (representations.png)."""
    if model.placement is None or model.placement.spec.num_experts < 2:
        return {}
    modules = model.adapter_modules()
    probe = modules[len(modules) // 2]  # a middle-depth module for the 2-D projection
    usage = collect_routing(model, tokenizer, examples, cfg.data.template, cfg.eval.batch_size, code_modules=(probe,))
    if jax.process_index() != 0:
        return routing_summary(usage)
    summary = write_routing_summary(usage, as_path(out) / "routing.json")
    plot_workload(usage, out / "workload.png")
    lam = cfg.loss.contrastive_weight
    plot_representations({f"lambda = {lam}": expert_outputs_2d(model, usage, probe)}, out / "representations.png",
                         f"expert outputs at the answer position\n{probe} (PCA)")
    return summary


def write_report(out: Path, cfg: Config, before: EvalResult | None, after: EvalResult | None, routing: dict,
                 history: list[dict]) -> Path:
    """report.md: before / after accuracy per task, MI(task; experts), and the plots."""
    lines = [f"# Run report: {out.name}", "",
             f"Model `{cfg.model.path}`, adapters n={cfg.adapter.num_experts} top-{cfg.adapter.top_k} "
             f"r={cfg.adapter.rank} on {', '.join(cfg.adapter.target_modules)} (layers {cfg.adapter.layers}), "
             f"lambda={cfg.loss.contrastive_weight}, tau={cfg.loss.temperature}, {cfg.train.steps} steps of "
             f"{cfg.train.batch_size} x {cfg.data.seq_len} tokens; data {', '.join(cfg.data.train)}; eval "
             f"{', '.join(cfg.eval.sources)} ({cfg.eval.split}).", ""]
    if before is not None and after is not None:
        lines.append(comparison_markdown(before, after, "Accuracy before and after training"))
    elif after is not None:
        lines.append(after.to_markdown("Accuracy after training"))
    if routing:
        lines += ["## Routing", "",
                  f"- MI(task; selected expert set): **{routing['mi_task_expert_set_bits']:.3f} bits** (mean over "
                  f"modules; upper bound log2 {len(routing['tasks'])} = {routing['mi_upper_bound_bits']:.2f})",
                  f"- router entropy: {routing['router_entropy_bits']:.3f} bits per token (mean over modules)", "",
                  "![workload](workload.png)", "", "![representations](representations.png)", ""]
    if history:
        last = history[-1]
        terms = ", ".join(f"{k} {last[k]:.4f}" for k in ("ce", "contrastive", "mi_gap") if k in last)
        lines += ["## Training", "", f"Last step {last['step']}: {terms}.", "", "![losses](losses.png)", ""]
        if any("mi_gap" in r for r in history):
            lines += ["![MI gap](mi_gap.png)", ""]
    path = as_path(out) / "report.md"
    if jax.process_index() == 0:
        path.write_text("\n".join(lines))
    return path


def unfinished_warning(run, steps: int) -> str | None:
    """A warning when run folder ``run`` stopped before its ``steps`` (interrupted: its adapter is that of the last
    step it saved), else None."""
    last = max((row["step"] for row in load_history(run)), default=0)
    if last >= steps:
        return None
    return (f"warning: {run} stopped at step {last} of {steps} (interrupted?): its adapter is that of step {last}; "
            "rerun its train command to finish it")


def load_history(run: Path, warn=None) -> list[dict]:
    """metrics.jsonl rows by step; a step logged twice (rerun after a crash) keeps its last row. Damaged lines are
    skipped; ``warn(text)`` (if given) names them."""
    path = as_path(run) / "metrics.jsonl"
    found, bad = read_jsonl(path)
    if bad and warn is not None:
        lines = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        warn(f"warning: {path}: {len(bad)} damaged line(s) skipped (line {lines}); {len(found)} rows kept")
    rows = {row["step"]: row for row in found}
    return [rows[s] for s in sorted(rows)]
