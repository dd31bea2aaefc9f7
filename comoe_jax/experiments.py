"""Running many training runs as one experiment (sweep.py, compare.py): reuse finished runs, read results."""

from __future__ import annotations

import statistics
from pathlib import Path

from comoe_jax.config import Config, read_json
from comoe_jax.errors import ComoeError
from comoe_jax.paths import as_path


def finished(cfg: Config) -> bool:
    """Whether ``cfg``'s run folder holds a finished run of this very config: its config.json matches
    (up to resumable keys), training reached ``train.steps`` and eval_after.json reads back."""
    from comoe_jax.checkpoint import config_changes  # JAX-heavy: imported once a run is due
    from comoe_jax.evaluate import load_eval
    from comoe_jax.report import load_history

    run = as_path(cfg.train.output_dir)
    try:
        saved = read_json(run / "config.json")
        done = load_eval(run / "eval_after.json") is not None
    except (ComoeError, OSError):
        return False
    steps = [row["step"] for row in load_history(run)]
    return done and not config_changes(saved, cfg) and bool(steps) and max(steps) >= cfg.train.steps


def run_or_reuse(cfg: Config) -> dict:
    """Train ``cfg`` (with evaluation after training) unless its run folder already holds it finished
    (:func:`finished`); an unfinished or damaged one is resumed. Returns ``{"run", "accuracy" {task: acc},
    "average", "mi_bits", "params", "seconds"}``, so an interrupted experiment continues where it stopped.
    """
    import time

    from comoe_jax.evaluate import load_eval
    from comoe_jax.trainer import train

    run = as_path(cfg.train.output_dir)
    start = time.perf_counter()
    if not finished(cfg):
        cfg.eval.after_training = True
        train(cfg)
    result = load_eval(run / "eval_after.json")
    routing = _optional_json(run / "routing.json")
    params = _optional_json(run / "parameters.json")
    accuracy = {t: r["accuracy"] for t, r in result.per_task.items()}
    return {"run": str(run), "average": result.average, "accuracy": accuracy,
            "mi_bits": routing.get("mi_task_expert_set_bits", float("nan")), "params": params.get("total", 0),
            "seconds": round(time.perf_counter() - start, 1)}


def _optional_json(path: Path) -> dict:
    try:
        data = read_json(path) if path.exists() else {}
    except ComoeError:
        return {}
    return data if isinstance(data, dict) else {}


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
