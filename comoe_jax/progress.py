"""Progress lines (step, loss terms, tokens/s, ETA, MFU), metrics.jsonl, TensorBoard and W&B; skipped steps."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import jax
import numpy as np

from comoe_jax.errors import ConfigError, TrainingDiverged
from comoe_jax.paths import append_text, as_path, is_local, replace

SHOWN = (("loss", "loss", ".4f"), ("ce", "ce", ".4f"), ("contrastive", "con", ".4f"), ("mi_gap", "mi_gap", ".3f"),
         ("load_balance", "lb", ".3f"), ("grad_norm", "gnorm", ".3f"), ("learning_rate", "lr", ".2e"))


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ItemProgress:
    """``progress(done, total)`` callback for work over items (evaluation): a line with items/s and the ETA
    every ``every`` seconds and at the end."""

    def __init__(self, label: str, every: float = 10.0, say=print):
        self.label, self.every, self.say = label, every, say
        self.done, self.start, self.last = 0, time.perf_counter(), time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        self.done += done
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= total:
            rate = self.done / max(now - self.start, 1e-9)
            self.say(f"{self.label}: {self.done}/{total} items | {rate:.1f} items/s | "
                     f"ETA {_duration((total - self.done) / max(rate, 1e-9))}")
            self.last = now


def read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """The JSON objects of a JSONL file, and the numbers of the lines that are not (e.g. a write cut short)."""
    rows, bad = [], []
    path = as_path(path)
    if not path.exists():
        return rows, bad
    for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        elif line.strip():
            bad.append(number)
    return rows, bad


def repair_jsonl(path: Path, say) -> None:
    """Drop the damaged lines of a run's metrics.jsonl (a crash mid-write), keeping every intact row."""
    rows, bad = read_jsonl(path)
    if not bad:
        return
    tmp = as_path(f"{path}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    replace(tmp, path)
    say(f"warning: {path}: dropped {len(bad)} damaged line(s) ({', '.join(map(str, bad[:5]))}); "
        f"{len(rows)} intact rows kept")


# tensorboardX writes to these URL schemes itself, with these packages.
_TENSORBOARD_CLOUD = {"gs://": "google.cloud.storage", "s3://": "boto3"}


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


class TensorBoardSink:
    """Scalars to TensorBoard event files (tensorboardX)."""

    def __init__(self, writer):
        self.writer = writer

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def tensorboard_sink(folder) -> TensorBoardSink | None:
    """A TensorBoard sink, or None (with a warning) where it cannot write, e.g. a URL without its client."""
    from tensorboardX import SummaryWriter

    text = str(folder)
    needs = next((module for scheme, module in _TENSORBOARD_CLOUD.items() if text.startswith(scheme)), None)
    missing = not is_local(text) and (needs is None or not _importable(needs))
    try:
        if not missing:
            return TensorBoardSink(SummaryWriter(text))
        reason = f"tensorboardX needs {needs} for this URL" if needs else "tensorboardX cannot write to this URL"
    except Exception as e:  # noqa: BLE001  (a writer that cannot start must not stop the run)
        reason = f"{type(e).__name__}: {e}"
    print(f"warning: TensorBoard events not written to {folder} ({reason}); metrics.jsonl has every value",
          flush=True)
    return None


class WandbSink:
    """Scalars to a Weights & Biases run. Its id is kept in ``<run>/wandb_id``, so a resumed run continues
    the same W&B run and a new run (even in a reused folder name elsewhere) starts its own."""

    def __init__(self, log_cfg, out, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("log.wandb=true needs the wandb package: pip install wandb (or log.wandb=false)") \
                from None
        id_file = as_path(out) / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:16]
        id_file.write_text(run_id)
        try:
            self.run = wandb.init(project=log_cfg.wandb_project, entity=log_cfg.wandb_entity or None,
                                  name=log_cfg.wandb_run_name or as_path(out).name, id=run_id, resume="allow",
                                  config=config, dir=_wandb_dir(out))
        except Exception as e:  # noqa: BLE001  (no API key, no network, a bad entity: wandb's own error types)
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise ConfigError(f"log.wandb=true: Weights & Biases could not start a run ({reason}); run `wandb "
                              "login`, set WANDB_API_KEY, or WANDB_MODE=offline") from None

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # W&B shows a run that ended in an error as failed


def _wandb_dir(out) -> str | None:
    """W&B's local files beside the run when it is local (``<run>/wandb``); W&B's default otherwise."""
    if not is_local(str(out)):
        return None
    as_path(out).mkdir(parents=True, exist_ok=True)
    return str(as_path(out))


class MetricSinks:
    """The scalar writers of a run (a context manager that closes them)."""

    def __init__(self, sinks: list):
        self.sinks = [s for s in sinks if s is not None]

    def log(self, prefix: str, values: dict, step: int) -> None:
        """The float values of ``values`` to every writer as ``<prefix>/<key>``."""
        scalars = {f"{prefix}/{k}": v for k, v in values.items() if k != "step" and isinstance(v, float)}
        for sink in self.sinks:
            sink.log(scalars, step)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for sink in self.sinks:
            sink.close(failed=exc[0] is not None)


def metric_sinks(cfg, out) -> MetricSinks:
    """The writers ``log.*`` asks for (process 0 only): TensorBoard, W&B."""
    if jax.process_index() != 0:
        return MetricSinks([])
    sinks = MetricSinks([tensorboard_sink(as_path(out) / "tensorboard")] if cfg.log.tensorboard else [])
    if cfg.log.wandb:
        try:
            sinks.sinks.append(WandbSink(cfg.log, out, cfg.to_dict()))
        except BaseException:
            sinks.__exit__(*sys.exc_info())
            raise
    return sinks


def device_memory_gib() -> float | None:
    """Device memory in use, GiB, the largest over this process's devices; None where not reported (CPU)."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    used = [s["bytes_in_use"] for s in stats if s and "bytes_in_use" in s]
    return max(used) / 2**30 if used else None


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


class Progress:
    """Collects per-step metrics (device arrays, fetched lazily) and prints a line every ``every`` steps.

    Steps whose update was skipped (non-finite loss or gradient) are reported; ``max_skipped``
    consecutive ones raise :class:`TrainingDiverged`. The per-expert load goes to metrics.jsonl
    on logged steps only, so the file stays small.
    """

    def __init__(self, total_steps: int, start_step: int, every: int, jsonl: Path | None, stream=sys.stdout,
                 sinks: MetricSinks | None = None, max_skipped: int = 5, flops_per_step: float | None = None,
                 peak_flops: float | None = None):
        self.total, self.start, self.every, self.stream = total_steps, start_step, every, stream
        self.max_skipped = max_skipped
        self.jsonl = jsonl
        self.pending: list[tuple[int, dict]] = []
        self.history: list[dict] = []
        self.started = self.last_time = time.perf_counter()
        self.first_step_seconds: float | None = None
        self.is_main = jax.process_index() == 0
        self.healthy = True
        self.sinks = sinks or MetricSinks([])
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops

    def update(self, step: int, metrics: dict) -> None:
        """Record the metrics of the step that just ran (``step`` = steps done so far)."""
        self.pending.append((step, metrics))
        if self.first_step_seconds is None:
            jax.block_until_ready(metrics)
            self.first_step_seconds = time.perf_counter() - self.started
            self._say(f"step {step} done in {self.first_step_seconds:.1f}s (includes compilation)")
            self.flush(print_line=False)  # its rates include the compilation
        elif step % self.every == 0 or step == self.total:
            self.flush(print_line=True)

    def flush(self, print_line: bool = True) -> None:
        """Fetch pending metrics, append them to metrics.jsonl, print the interval's means."""
        if not self.pending:
            return
        rows = []
        for step, metrics in self.pending:
            host = jax.device_get(metrics)
            rows.append({"step": step} | {k: float(v) for k, v in host.items() if np.ndim(v) == 0})
        if "expert_load" in host:  # the load of the last step of the interval only: a small metrics.jsonl
            rows[-1]["expert_load"] = np.asarray(host["expert_load"]).round(4).tolist()
        self.pending = []
        now = time.perf_counter()
        rate = sum(r.get("tokens", 0.0) for r in rows) / max(now - self.last_time, 1e-9)
        rows[-1]["tokens_per_second"] = rate
        rows[-1] |= self._hardware(len(rows), now - self.last_time)
        self.last_time = now
        self.history.extend(rows)
        if self.jsonl is not None and self.is_main:
            append_text(self.jsonl, "".join(json.dumps(row) + "\n" for row in rows))
        for row in rows:
            self.sinks.log("train", row, row["step"])
        self._report_skips(rows)
        if print_line:
            means = {k: _finite_mean([r[k] for r in rows]) for k, _, _ in SHOWN if k in rows[-1]}
            hardware = [f"MFU {rows[-1]['mfu']:.1%}"] if "mfu" in rows[-1] else []
            hardware += [f"{rows[-1]['memory_gib']:.2f} GiB"] if "memory_gib" in rows[-1] else []
            self._say(" | ".join([self.line(rows[-1]["step"], means, rate), *hardware]))

    def _report_skips(self, rows: list[dict]) -> None:
        for r in rows:
            if r.get("skipped", 0) > 0:
                self._say(f"warning: step {r['step']}: non-finite loss or gradient (loss {r.get('loss')}, gradient "
                          f"norm {r.get('grad_norm')}): update skipped, {int(r['skipped'])} in a row")
        bad = next((r for r in rows if r.get("skipped", 0) >= self.max_skipped), None)
        if bad is not None:
            self.healthy = False
            raise TrainingDiverged(
                f"{int(bad['skipped'])} consecutive steps up to step {bad['step']} had a non-finite loss or gradient "
                f"(train.max_skipped_steps={self.max_skipped}); parameters were left at their last finite values and "
                "the checkpoints written are intact. Lower optim.learning_rate (or raise loss.temperature) and rerun")

    def line(self, step: int, means: dict, tokens_per_second: float) -> str:
        """One progress line; ``means`` are the loss terms averaged since the previous line."""
        terms = " ".join(f"{label} {means[k]:{fmt}}" for k, label, fmt in SHOWN if k in means)
        done = step - self.start
        elapsed = time.perf_counter() - self.started
        steady = elapsed - (self.first_step_seconds or 0.0)
        per_step = steady / max(done - 1, 1) if done > 1 else 0.0
        eta = per_step * (self.total - step)
        return (f"step {step}/{self.total} | {terms} | {tokens_per_second:,.0f} tok/s | "
                f"elapsed {_duration(elapsed)} ETA {_duration(eta)}")

    def skip_time(self, seconds: float) -> None:
        """Leave ``seconds`` spent outside training (validation) out of tokens/s, MFU and the ETA."""
        self.last_time += seconds
        self.started += seconds

    def _hardware(self, steps: int, seconds: float) -> dict:
        """Achieved TFLOP/s (analytic FLOPs of the step), MFU against the devices' peak, device memory."""
        out = {}
        if self.flops_per_step:
            achieved = self.flops_per_step * steps / max(seconds, 1e-9)
            out["tflops_per_second"] = achieved / 1e12
            if self.peak_flops:
                out["mfu"] = achieved / self.peak_flops
        memory = device_memory_gib()
        if memory is not None:
            out["memory_gib"] = memory
        return out


    def _say(self, text: str) -> None:
        if self.is_main:
            print(text, file=self.stream, flush=True)
