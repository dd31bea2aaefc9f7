"""Progress lines (step, loss terms, tokens/s, ETA), metrics.jsonl, and end-of-run plots."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

SHOWN = (("loss", "loss", ".4f"), ("ce", "ce", ".4f"), ("contrastive", "con", ".4f"), ("mi_gap", "mi_gap", ".3f"),
         ("load_balance", "lb", ".3f"), ("grad_norm", "gnorm", ".3f"), ("learning_rate", "lr", ".2e"))


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Collects per-step metrics (device arrays, fetched lazily) and prints a line every ``every`` steps."""

    def __init__(self, total_steps: int, start_step: int, every: int, jsonl: Path | None, stream=sys.stdout):
        self.total, self.start, self.every, self.stream = total_steps, start_step, every, stream
        self.jsonl = jsonl
        self.pending: list[tuple[int, dict]] = []
        self.history: list[dict] = []
        self.started = self.last_time = time.perf_counter()
        self.first_step_seconds: float | None = None
        self.tokens_since = 0.0
        self.is_main = jax.process_index() == 0

    def update(self, step: int, metrics: dict) -> None:
        """Record the metrics of the step that just ran (``step`` = steps done so far)."""
        self.pending.append((step, metrics))
        if self.first_step_seconds is None:
            jax.block_until_ready(metrics)
            self.first_step_seconds = time.perf_counter() - self.started
            self._say(f"step {step} done in {self.first_step_seconds:.1f}s (includes compilation)")
            self.last_time = time.perf_counter()
            self.flush(print_line=False)
        elif step % self.every == 0 or step == self.total:
            self.flush(print_line=True)

    def flush(self, print_line: bool = True) -> None:
        if not self.pending:
            return
        rows = []
        for step, metrics in self.pending:
            host = jax.device_get(metrics)
            row = {"step": step} | {k: float(v) for k, v in host.items() if np.ndim(v) == 0}
            if "expert_load" in host:
                row["expert_load"] = np.asarray(host["expert_load"]).round(4).tolist()
            rows.append(row)
        self.pending = []
        self.history.extend(rows)
        if self.jsonl is not None and self.is_main:
            with self.jsonl.open("a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        now = time.perf_counter()
        tokens = sum(r.get("tokens", 0.0) for r in rows)
        rate = tokens / max(now - self.last_time, 1e-9)
        self.last_time = now
        if print_line:
            self._say(self.line(rows[-1], rate))

    def line(self, row: dict, tokens_per_second: float) -> str:
        step = row["step"]
        terms = " ".join(f"{label} {row[k]:{fmt}}" for k, label, fmt in SHOWN if k in row)
        done = step - self.start
        elapsed = time.perf_counter() - self.started
        steady = elapsed - (self.first_step_seconds or 0.0)
        per_step = steady / max(done - 1, 1) if done > 1 else 0.0
        eta = per_step * (self.total - step)
        return (f"step {step}/{self.total} | {terms} | {tokens_per_second:,.0f} tok/s | "
                f"elapsed {_duration(elapsed)} ETA {_duration(eta)}")

    def _say(self, text: str) -> None:
        if self.is_main:
            print(text, file=self.stream, flush=True)


def plot_run(history: list[dict], out_dir: Path) -> list[Path]:
    """Loss curves and the final per-module expert load, as PNGs in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if not history:
        return written
    steps = [r["step"] for r in history]
    keys = [k for k in ("loss", "ce", "contrastive", "mi_gap") if k in history[-1]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(steps, [r.get(key, np.nan) for r in history])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_dir / "losses.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "losses.png")
    loads = [r for r in history if "expert_load" in r]
    if loads:
        load = np.asarray(loads[-1]["expert_load"])
        fig, ax = plt.subplots(figsize=(2 + load.shape[1] * 0.5, 2 + load.shape[0] * 0.12))
        image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0)
        ax.set_xlabel("expert")
        ax.set_ylabel("adapted module (construction order)")
        ax.set_title(f"expert load at step {loads[-1]['step']}")
        fig.colorbar(image, ax=ax, label="share of routing slots")
        fig.tight_layout()
        fig.savefig(out_dir / "expert_load.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "expert_load.png")
    return written
