"""Sweep runner: the paper's lambda / number-of-experts / layer-placement studies over several seeds.

    python sweep.py --grid loss.contrastive_weight=0,0.001,0.01,0.1,1.0 --grid train.seed=0,1,2
    python sweep.py --grid adapter.num_experts=4,8,16 --grid train.seed=0,1,2 train.steps=100
    python sweep.py --grid adapter.layers=low,middle,high --grid train.seed=0,1 --out runs/placement

Every cell of the grid (cartesian product) is a training run with evaluation after training, in
``<out>/<cell>/``; a finished cell (its eval_after.json exists) is reused, so an interrupted sweep
continues where it stopped. The table (``<out>/sweep.md``, ``sweep.json``) has one row per setting
of the non-seed keys and gives the median over seeds of every task's accuracy, the average, and
MI(task; expert set), like the paper's tables (five seeds, median).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys

from comoe_jax.cli import command
from comoe_jax.config import ConfigError, apply_overrides, load_config_file, validate
from comoe_jax.experiments import median, run_grid
from comoe_jax.paths import as_path, results_folder
from comoe_jax.tables import markdown_table, number, percent


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--grid {item!r}: expected section.key=v1,v2,...")
        if key == "train.output_dir":  # each cell's folder is <out>/<cell name>
            raise ConfigError(f"--grid {item!r}: {key} cannot be swept; every cell runs in <out>/<cell name> "
                              "(--out sets the parent folder)")
        grid[key] = values.split(",")
        if len(set(grid[key])) != len(grid[key]):
            raise ConfigError(f"--grid {item!r}: a value is repeated; each cell must be a different run")
    return grid


def cell_name(values: dict[str, str]) -> str:
    return "_".join(f"{k.split('.')[-1]}-{v}" for k, v in values.items()).replace("/", "-").replace(":", "-")


def table(rows: list[dict], keys: list[str]) -> tuple[str, list[dict]]:
    """Median over seeds per setting of ``keys``; markdown and the aggregated rows."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r["cell"][k] for k in keys), []).append(r)
    tasks = list(dict.fromkeys(t for r in rows for t in r["accuracy"]))
    out, lines = [], []
    for setting, members in groups.items():
        med = {t: median(m["accuracy"][t] for m in members) for t in tasks}
        avg = median(m["average"] for m in members)
        mi = median(m["mi_bits"] for m in members)
        out.append({"setting": dict(zip(keys, setting)), "median_accuracy": med, "median_average": avg,
                    "median_mi_bits": mi, "seeds": len(members)})
        lines.append([*setting, *(percent(med[t]) for t in tasks), percent(avg), number(mi), len(members)])
    return markdown_table([*keys, *tasks, "Avg", "MI bits", "seeds"], lines), out


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--grid", action="append", default=[], help="section.key=v1,v2,... (repeatable)")
    parser.add_argument("--out", default="runs/sweep")
    args, overrides = parser.parse_known_args(argv)
    grid = parse_grid(args.grid)
    if not grid:
        raise ConfigError("give at least one --grid section.key=v1,v2,...")
    base = apply_overrides(load_config_file(args.config), overrides)
    results_folder(args.out, "--out")
    cells = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    configs = []
    for values in cells:  # check every cell before training any
        cfg = apply_overrides(copy.deepcopy(base), [f"{k}={v}" for k, v in values.items()])
        cfg.train.output_dir = str(as_path(args.out) / cell_name(values))
        configs.append(validate(cfg))
    rows = run_grid(list(zip(cells, configs)), label="cell")
    keys = [k for k in grid if k != "train.seed"]
    markdown, aggregated = table(rows, keys or ["train.seed"])
    out = as_path(args.out)
    (out / "sweep.md").write_text(f"# Sweep ({args.config}; median over seeds)\n\n{markdown}")
    (out / "sweep.json").write_text(json.dumps({"cells": rows, "table": aggregated}, indent=1))
    print(markdown + f"written to {out}/sweep.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
