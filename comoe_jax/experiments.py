"""Running many training runs as one experiment (sweep.py, compare.py): reuse finished runs, read results."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from comoe_jax.config import Config


def run_or_reuse(cfg: Config) -> dict:
    """Train ``cfg`` (with evaluation after training) unless its run folder already has results.

    Returns ``{"run", "accuracy" {task: acc}, "average", "mi_bits", "params", "seconds"}``;
    an interrupted experiment continues where it stopped.
    """
    import time

    from comoe_jax.evaluate import load_eval  # JAX-heavy: imported once a run is due
    from comoe_jax.trainer import train

    run = Path(cfg.train.output_dir)
    start = time.perf_counter()
    if not (run / "eval_after.json").exists():
        cfg.eval.after_training = True
        train(cfg)
    result = load_eval(run / "eval_after.json")
    routing = json.loads((run / "routing.json").read_text()) if (run / "routing.json").exists() else {}
    params = json.loads((run / "parameters.json").read_text()) if (run / "parameters.json").exists() else {}
    accuracy = {t: r["accuracy"] for t, r in result.per_task.items()}
    return {"run": str(run), "average": result.average, "accuracy": accuracy,
            "mi_bits": routing.get("mi_task_expert_set_bits", float("nan")), "params": params.get("total", 0),
            "seconds": round(time.perf_counter() - start, 1)}


def run_grid(cells: list[tuple[dict, Config]], label: str = "run") -> list[dict]:
    """Train (or reuse) each ``(cell, config)`` in order with a progress line (elapsed, ETA).

    Returns one row per cell: ``{"cell": cell} | run_or_reuse(config)``.
    """
    import time

    start, rows = time.perf_counter(), []
    for i, (cell, cfg) in enumerate(cells, 1):
        elapsed = time.perf_counter() - start
        eta = "" if i == 1 else f", ETA {elapsed / (i - 1) * (len(cells) - i + 1) / 60:.0f} min"
        print(f"=== {label} {i}/{len(cells)}: {cell} -> {cfg.train.output_dir} ({elapsed / 60:.0f} min elapsed{eta})",
              flush=True)
        rows.append({"cell": cell} | run_or_reuse(cfg))
    return rows


def median(values) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")
