"""The training loop: mesh, model, data, jitted step, progress, checkpoints, resume, adapter export.

``train(cfg)`` never loses a run: checkpoints every ``train.save_every`` steps and
at the end, on Ctrl-C and on SIGTERM (preemption); it resumes from the latest
checkpoint of ``train.output_dir`` and refuses to continue a run whose training
config has changed.
"""

from __future__ import annotations

import json
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from comoe_jax import sharding as shd
from comoe_jax.checkpoint import Checkpointer, config_changes, save_adapters
from comoe_jax.config import Config, ConfigError, validate
from comoe_jax.data import BATCH_ARRAYS, BuiltinData
from comoe_jax.loading import build_model, load_tokenizer
from comoe_jax.model import flat_values, split_model
from comoe_jax.progress import Progress, plot_run
from comoe_jax.step import TrainState, TrainStep

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    state: TrainState
    history: list[dict]
    output_dir: Path
    interrupted: bool = False


class _StopFlag:
    """Turns SIGTERM into a flag the loop checks after each step (save, then stop)."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def global_batch(data: BuiltinData, step: int, cfg: Config) -> dict[str, np.ndarray]:
    """Host arrays ``[grad_accum_steps, batch_size, T]`` of optimizer step ``step``."""
    accum, size = cfg.optim.grad_accum_steps, cfg.train.batch_size
    micro = [data.batch(step * accum + a, size) for a in range(accum)]
    return {k: np.stack([getattr(m, k) for m in micro]) for k in BATCH_ARRAYS}


def _check_batch(cfg: Config, mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.train.batch_size % shards:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the data x fsdp mesh "
                          f"size ({mesh.shape['data']} x {mesh.shape['fsdp']} = {shards})")


def _start_state(cfg: Config, step_fn: TrainStep, ckpt: Checkpointer, params: dict, say) -> TrainState:
    latest = ckpt.latest_step()
    if latest is None:
        return step_fn.init_state(params)
    if not cfg.train.resume:
        raise ConfigError(f"train.output_dir={cfg.train.output_dir} already holds checkpoints up to step {latest}; "
                          "pass train.resume=true to continue that run, or choose another train.output_dir")
    state, saved = ckpt.restore(step_fn.abstract_state())
    changed = config_changes(saved, cfg)
    if changed:
        raise ConfigError(f"train.output_dir={cfg.train.output_dir} holds a run with a different config, so it cannot "
                          "be resumed: " + "; ".join(changed) + ". Choose another train.output_dir.")
    say(f"resumed from step {latest} of {cfg.train.output_dir}")
    return state


def train(cfg: Config, *, stream=None) -> RunResult:
    """Run ``cfg`` to ``train.steps`` (or until interrupted), checkpointing on the way."""
    validate(cfg)
    shd.init_distributed(cfg.mesh)
    say = (lambda text: print(text, flush=True, file=stream)) if jax.process_index() == 0 else (lambda text: None)
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.rules_dict(cfg.mesh.rules)
    _check_batch(cfg, mesh)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(cfg.model.path)
    data = BuiltinData(tokenizer, cfg.data.tasks, cfg.data.seq_len, seed=cfg.train.seed, template=cfg.data.template)
    if data.truncated:
        say(f"data: {data.truncated} of {data.size} examples truncated to data.seq_len={cfg.data.seq_len}")
    model = build_model(cfg, mesh, rules)
    graphdef, adapters, frozen_state = split_model(model)
    params, frozen = flat_values(adapters), flat_values(frozen_state)
    trainable = sum(int(np.prod(v.shape)) for v in params.values())
    say(f"model {cfg.model.path}: {model.spec.num_layers} layers, {model.num_adapters} adapted modules, "
        f"{trainable:,} trainable parameters; mesh {dict(mesh.shape)} on {jax.device_count()} devices")
    step_fn = TrainStep(cfg, graphdef, adapters, frozen_state, mesh, rules)
    ckpt = Checkpointer(out, cfg.train.keep_checkpoints)
    state = _start_state(cfg, step_fn, ckpt, params, say)
    start = int(jax.device_get(state.step))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
    progress = Progress(cfg.train.steps, start, cfg.train.log_every, out / "metrics.jsonl", stream=stream)
    interrupted = False
    try:
        with _StopFlag() as stop:
            for step in range(start, cfg.train.steps):
                batch = shd.global_batch(global_batch(data, step, cfg), mesh, rules, batch_axis=1)
                state, metrics = step_fn(state, frozen, batch)
                done = step + 1
                progress.update(done, metrics)
                if done % cfg.train.save_every == 0 or done == cfg.train.steps:
                    ckpt.save(state, cfg)
                if stop.raised:
                    interrupted = True
                    say(f"SIGTERM: saving step {done} and stopping")
                    break
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: saving the last completed step")
    finally:
        progress.flush(print_line=False)
        ckpt.save(state, cfg)
        ckpt.wait()
        ckpt.close()
    save_adapters(out / "adapter", state.params, cfg)
    if jax.process_index() == 0:
        plot_run(progress.history, out)
    say(f"checkpoint step {int(jax.device_get(state.step))} and adapter export written to {out}")
    return RunResult(state, progress.history, out, interrupted)
