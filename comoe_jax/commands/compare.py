"""Comparison runner: every method in single-task (ST) and multi-task (MT) settings, the paper's Table 1.

    python compare.py                                    # all methods, ST + MT, 1 seed, CPU-sized
    python compare.py --methods lora,comoe-lora --seeds 0,1,2 train.steps=300 eval.max_per_task=0
    python compare.py --seeds 0,1,2 --settings mt        # the multi-task column only, median of 3 seeds

For each method (``adapter.method``) and seed: one MT run trained on every task of the
training sources, and one ST run per task trained and evaluated on that task alone. Each
run is a normal run folder under ``<out>/<method>/<setting>/seed<s>/``; finished runs are
reused, so an interrupted comparison continues. Writes ``<out>/table.md`` (accuracy per task,
average, ST average, MT - ST, trainable parameters, MI(task; expert set); medians over seeds)
and ``<out>/table.json``; a setting left out by ``--settings`` shows as ``-``.

The defaults fit this repository's 2-core CPU (SmolLM2-135M, short runs, 20 test items per
task). On a GPU or TPU, raise ``train.steps`` (the paper trains 2-3 epochs), ``train.batch_size``,
``data.seq_len`` (512), set ``eval.max_per_task=0`` (every test item), ``--seeds 0,1,2,3,4``
(the paper's median of five), ``model.dtype=bfloat16``, and point ``model.path`` at a larger
Llama (e.g. a LLaMA-2 7B folder) with ``mesh.fsdp`` / ``mesh.data`` for the slice.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from comoe_jax.cli import command
from comoe_jax.config import ConfigError, apply_overrides, load_config_file, validate
from comoe_jax.constants import METHODS
from comoe_jax.experiments import median, run_grid
from comoe_jax.paths import as_path, results_folder
from comoe_jax.tables import markdown_table, number, percent

# What this CPU can do in about an hour for all methods (overridable on the command line).
CPU_DEFAULTS = ["train.steps=16", "train.save_every=16", "train.log_every=4", "eval.max_per_task=20",
                "eval.before_training=false"]
LABELS = {"comoe-lora": "CoMoE-LoRA", "comoe-dora": "CoMoE-DoRA", "lora": "LoRA", "dora": "DoRA",
          "mixlora": "MixLoRA", "moe-soft": "MoE-LoRA (soft)", "omoe": "OMoE-LoRA"}


def plan(base, methods: list[str], seeds: list[int], tasks: list[str], out: Path,
         settings: tuple[str, ...] = ("mt", "st")) -> list[tuple[dict, object]]:
    """Every (cell, validated config) of the comparison; a bad method or override fails before any training."""
    cells = []
    for method in methods:
        for seed in seeds:
            for setting in ["mt"] * ("mt" in settings) + [f"st-{t}" for t in tasks] * ("st" in settings):
                cfg = apply_overrides(copy.deepcopy(base), [f"adapter.method={method}", f"train.seed={seed}"])
                if setting != "mt":
                    cfg.data.tasks = cfg.eval.tasks = (setting[3:],)
                cfg.train.output_dir = str(out / method / setting / f"seed{seed}")
                cells.append(({"method": method, "setting": setting, "seed": seed}, validate(cfg)))
    return cells


def table(rows: list[dict], methods: list[str], tasks: list[str], base_params: int,
          base_accuracy: dict[str, float] | None = None) -> tuple[str, list[dict]]:
    """Markdown shaped like the paper's Table 1, and its rows (medians over seeds, per cell)."""
    out, mt_lines, st_lines = [], [], []
    if base_accuracy:
        avg = sum(base_accuracy[t] for t in tasks) / len(tasks)
        mt_lines.append(["Base model (no fine-tuning)", 0, *(percent(base_accuracy[t]) for t in tasks), percent(avg),
                         "-", "-", "-", "-"])
    for method in methods:
        mine = [r for r in rows if r["cell"]["method"] == method]
        mt = [r for r in mine if r["cell"]["setting"] == "mt"]
        mt_acc = {t: median(r["accuracy"].get(t, float("nan")) for r in mt) for t in tasks}
        st_acc = {t: median(r["accuracy"].get(t, float("nan")) for r in mine if r["cell"]["setting"] == f"st-{t}")
                  for t in tasks}
        mt_avg, st_avg = sum(mt_acc.values()) / len(tasks), sum(st_acc.values()) / len(tasks)
        params = mt[0]["params"] if mt else 0
        row = {"method": method, "params": params, "mt": mt_acc, "mt_average": mt_avg, "st": st_acc,
               "st_average": st_avg, "mt_minus_st": mt_avg - st_avg, "mi_bits": median(r["mi_bits"] for r in mt),
               "seeds": len(mt), "st_seeds": len({r["cell"]["seed"] for r in mine if r["cell"]["setting"] != "mt"})}
        out.append(row)
        pct = f" ({100 * params / base_params:.2f}%)" if base_params else ""
        mt_lines.append([LABELS[method], f"{params / 1e6:.2f}M{pct}", *(percent(mt_acc[t]) for t in tasks),
                         f"**{percent(mt_avg)}**", percent(st_avg), percent(row["mt_minus_st"], signed=True),
                         number(row["mi_bits"]), row["seeds"]])
        st_lines.append([LABELS[method], *(percent(st_acc[t]) for t in tasks), f"**{percent(st_avg)}**",
                         row["st_seeds"]])
    markdown = (
        "### Multi-task (MT): one adapter trained on all tasks\n\n"
        + markdown_table(["Method", "Params", *tasks, "Avg", "ST Avg", "MT - ST", "MI bits", "seeds"], mt_lines)
        + "\n### Single-task (ST): one adapter per task\n\n"
        + markdown_table(["Method", *tasks, "Avg", "seeds"], st_lines)
    )
    return markdown, out


def base_model_accuracy(base, tasks: list[str], out: Path) -> dict[str, float]:
    """Accuracy per task of the untrained base model (adapters at init equal it), evaluated once."""
    from comoe_jax.evaluate import load_eval
    from comoe_jax.loading import build_model, load_tokenizer
    from comoe_jax.report import evaluate_and_save, evaluation_examples

    stem = out / "base_model" / "eval"
    if not stem.with_suffix(".json").exists():
        cfg = apply_overrides(copy.deepcopy(base), ["adapter.method=lora"])
        cfg.eval.tasks = tuple(tasks)
        stem.parent.mkdir(parents=True, exist_ok=True)
        evaluate_and_save(cfg, build_model(cfg), load_tokenizer(cfg.model.path), evaluation_examples(cfg), stem)
    return {t: r["accuracy"] for t, r in load_eval(stem.with_suffix(".json")).per_task.items()}


def base_parameters(cfg) -> int:
    from flax import nnx

    from comoe_jax.adapters import Frozen
    from comoe_jax.loading import model_factory
    from comoe_jax.model import flat_values

    abstract = nnx.eval_shape(model_factory(cfg.model, None, None, 0))
    return sum(int(v.size) for v in flat_values(nnx.state(abstract, Frozen)).values())


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; the table gives medians")
    parser.add_argument("--tasks", default="", help="ST tasks (default: every task of the training sources)")
    parser.add_argument("--settings", default="mt,st", help="comma-separated, of mt (one adapter for all tasks) "
                        "and st (one adapter per task)")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--base-model", action=argparse.BooleanOptionalAction, default=True,
                        help="also evaluate the untrained base model (a row of the table)")
    args, overrides = parser.parse_known_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if not methods or len(set(methods)) != len(methods):
        raise ConfigError(f"--methods={args.methods!r}: give distinct methods, comma-separated, of "
                          f"{', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"--methods: {m!r} is not a method; choose from {', '.join(METHODS)}")
    if not all(s.strip().isdigit() for s in args.seeds.split(",")):
        raise ConfigError(f"--seeds={args.seeds!r}: expected comma-separated non-negative integers, e.g. 0,1,2")
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds={args.seeds!r}: a seed is repeated; the table's median needs distinct seeds")
    settings = tuple(s for s in args.settings.split(",") if s)
    if not settings or set(settings) - {"mt", "st"}:
        raise ConfigError(f"--settings={args.settings!r}: choose one or both of mt, st (comma-separated)")
    base = apply_overrides(load_config_file(args.config), CPU_DEFAULTS + overrides)
    results_folder(args.out, "--out")
    from comoe_jax.data import load_sources

    known = list(dict.fromkeys(ex.task for ex in load_sources(base.data.train, "train", tasks=base.data.tasks)))
    tasks = [t for t in args.tasks.split(",") if t] or known
    if set(tasks) - set(known):
        raise ConfigError(f"--tasks: {', '.join(sorted(set(tasks) - set(known)))} not among the training sources' "
                          f"tasks ({', '.join(known)})")
    cells = plan(base, methods, seeds, tasks, as_path(args.out), settings)
    start = time.perf_counter()
    rows = run_grid(cells)
    accuracy = base_model_accuracy(base, tasks, as_path(args.out)) if args.base_model else None
    minutes = (time.perf_counter() - start) / 60
    markdown, aggregated = table(rows, methods, tasks, base_parameters(base), accuracy)
    out = as_path(args.out)
    title = (f"# Method comparison ({args.config}, {base.model.path}; seeds {args.seeds}, median; "
             f"{base.train.steps} steps, batch {base.train.batch_size}, {base.eval.max_per_task or 'all'} test "
             f"items per task, {base.eval.mode} scoring; {len(cells)} runs in {minutes:.0f} min)\n\n")
    (out / "table.md").write_text(title + markdown)
    (out / "table.json").write_text(json.dumps({"runs": rows, "table": aggregated, "minutes": minutes}, indent=1))
    print(title + markdown + f"written to {out}/table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
