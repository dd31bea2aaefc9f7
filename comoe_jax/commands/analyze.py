"""Compare trained runs the way the paper does: expert representations in 2-D (Fig. 5), per-task expert
workload (Fig. 4), MI(task; expert set), router entropy and the MI-gap estimate over training.

    python analyze.py runs/lambda0.01 runs/lambda0                 # writes runs/compare/
    python analyze.py runs/a runs/b --out runs/ab eval.max_per_task=100 --module layers.20.self_attn.v_proj

Each run is rebuilt from its config.json and adapter/ folder and probed on the evaluation items of
the first run's config (``eval.*`` overrides apply). Writes ``compare.md``, ``compare.json``,
``representations.png``, ``workload_<run>.png`` and ``mi_gap.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import PurePosixPath

from comoe_jax.cli import command
from comoe_jax.config import ConfigError, apply_overrides, load_run_config, negatives_per_anchor, validate
from comoe_jax.constants import METHODS, SINGLE_EXPERT_METHODS
from comoe_jax.paths import absolute, as_path, is_local, results_folder


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (config.json + adapter/)")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--module", help="adapted module for the 2-D projection (default: a middle one)")
    args, overrides = parser.parse_known_args(argv)
    configs = [load_run_config(run) for run in args.runs]
    names = run_names(args.runs)
    for run, cfg in zip(args.runs, configs):  # every run checked before the first is probed
        if not (as_path(run) / "adapter" / "adapter_config.json").exists():
            raise ConfigError(f"{run}: no finished adapter ({as_path(run) / 'adapter' / 'adapter_config.json'}); a run "
                              "writes it when training ends (rerun its train command to resume and finish it)")
        if cfg.adapter.method in SINGLE_EXPERT_METHODS:
            routed = ", ".join(m for m in METHODS if m not in SINGLE_EXPERT_METHODS)
            raise ConfigError(f"{run}: adapter.method={cfg.adapter.method} has one expert and no router; analyze.py "
                              f"compares routed runs ({routed})")
    probe_cfg = validate(apply_overrides(load_run_config(args.runs[0]), overrides))
    out = results_folder(args.out, "--out")
    from comoe_jax import sharding as shd
    from comoe_jax.analysis import collect_routing, expert_outputs_2d, summary
    from comoe_jax.checkpoint import load_run_model
    from comoe_jax.evaluate import load_eval
    from comoe_jax.loading import load_tokenizer
    from comoe_jax.plots import plot_mi_gap, plot_representations, plot_workload
    from comoe_jax.report import evaluation_examples, load_history, unfinished_warning
    from comoe_jax.tables import markdown_table, number, percent

    shd.init_distributed(probe_cfg.mesh)
    import jax

    writer = jax.process_index() == 0  # every process computes (collectives), process 0 writes
    for run, cfg in zip(args.runs, configs):
        if writer and (warning := unfinished_warning(run, cfg.train.steps)):
            print(warning)
    examples = evaluation_examples(probe_cfg)
    panels, rows, histories = {}, [], {}
    for run, cfg, name in zip(args.runs, configs, names):
        tokenizer = load_tokenizer(cfg.model.path)
        cfg.mesh = probe_cfg.mesh  # every run on the mesh this invocation uses
        model = load_run_model(cfg, run)
        modules = model.adapter_modules()
        module = args.module or modules[len(modules) // 2]
        if module not in modules:
            raise ConfigError(f"--module {module}: not an adapted module of {run}; it has {modules[0]} ... "
                              f"{modules[-1]} ({len(modules)} modules: layers.<i>.self_attn.<q|k|v|o>_proj, "
                              "layers.<i>.mlp.<gate|up|down>_proj as adapted)")
        usage = collect_routing(model, tokenizer, examples, probe_cfg.data.template, probe_cfg.eval.batch_size,
                                code_modules=(module,))
        if writer:
            plot_workload(usage, out / f"workload_{_file_name(name)}.png")
        panels[f"{name} (lambda = {cfg.loss.contrastive_weight})"] = expert_outputs_2d(model, usage, module)
        result = load_eval(as_path(run) / "eval_after.json")
        rows.append({"run": name, "lambda": cfg.loss.contrastive_weight, "experts": cfg.adapter.num_experts,
                     "accuracy": None if result is None else result.average, **summary(usage)})
        histories[name] = load_history(as_path(run), warn=lambda text: print(text, file=sys.stderr, flush=True))
        if writer:
            print(f"{name}: MI(task; expert set) {rows[-1]['mi_task_expert_set_bits']:.3f} bits", flush=True)
    if not writer:
        return 0
    plot_representations(panels, out / "representations.png", f"expert outputs at the answer position, {module} (PCA)")
    first = configs[0]
    plot_mi_gap(histories, out / "mi_gap.png", math.log(negatives_per_anchor(first)))
    table = markdown_table(
        ["run", "lambda", "experts", "accuracy % (eval_after)", "MI(task; expert set) bits", "router entropy bits"],
        [[r["run"], r["lambda"], r["experts"], percent(r["accuracy"]), number(r["mi_task_expert_set_bits"]),
          number(r["router_entropy_bits"])] for r in rows])
    text = (f"# Runs compared on {len(examples)} items ({', '.join(probe_cfg.eval.sources)}, {probe_cfg.eval.split})"
            "\n\n" + table + "\n![representations](representations.png)\n\n![MI gap](mi_gap.png)\n\n"
            + "\n\n".join(f"![{r['run']}](workload_{_file_name(r['run'])}.png)" for r in rows) + "\n")
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "per_module"} for r in rows],
                                                 indent=1))
    print(table, end="")
    print(f"written to {out}/compare.md")
    return 0


def run_names(runs: list[str]) -> list[str]:
    """Each run's shortest path suffix that no other run shares (``a/run``, ``b/run``); a run given twice is
    refused (its figure would overwrite itself)."""
    resolved = [os.path.realpath(run) if is_local(run) else str(absolute(run)) for run in runs]
    twice = [run for i, run in enumerate(runs) if resolved[i] in resolved[:i]]
    if twice:
        raise ConfigError(f"run {twice[0]} is given twice; name each run once")
    parts = [PurePosixPath(path.replace(os.sep, "/")).parts for path in resolved]
    for k in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return resolved


def _file_name(name: str) -> str:
    return name.replace("/", "_")


if __name__ == "__main__":
    sys.exit(main())
