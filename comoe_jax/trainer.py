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


def _check_resumable(cfg: Config, ckpt: Checkpointer) -> int | None:
    """The step to resume from (None for a fresh run); refuses runs that must not be continued."""
    latest = ckpt.latest_step()
    if latest is None:
        return None
    if not cfg.train.resume:
        raise ConfigError(f"train.output_dir={cfg.train.output_dir} already holds checkpoints up to step {latest}; "
                          "pass train.resume=true to continue that run, or choose another train.output_dir")
    changed = config_changes(ckpt.saved_config(), cfg)
    if changed:
        raise ConfigError(f"train.output_dir={cfg.train.output_dir} holds a run with a different config, so it cannot "
                          "be resumed: " + "; ".join(changed) + ". Choose another train.output_dir.")
    return latest


def _use_compilation_cache(folder: str) -> None:
    if folder and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(Path(folder).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def train(cfg: Config, *, stream=None) -> RunResult:
    """Run ``cfg`` to ``train.steps`` (or until interrupted), checkpointing on the way."""
    validate(cfg)
    _use_compilation_cache(cfg.train.compilation_cache)
    shd.init_distributed(cfg.mesh)
    say = (lambda text: print(text, flush=True, file=stream)) if jax.process_index() == 0 else (lambda text: None)
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.rules_dict(cfg.mesh.rules)
    _check_batch(cfg, mesh)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(out, cfg.train.keep_checkpoints)
    try:
        resume_from = _check_resumable(cfg, ckpt)
    except ConfigError:
        ckpt.close()
        raise

    tokenizer = load_tokenizer(cfg.model.path)
    data = BuiltinData(tokenizer, cfg.data.tasks, cfg.data.seq_len, seed=cfg.train.seed, template=cfg.data.template)
    if data.truncated or data.dropped:
        say(f"data: {data.size} examples; {data.truncated} truncated to data.seq_len={cfg.data.seq_len}, "
            f"{data.dropped} left out (no response token left)")
    model = build_model(cfg, mesh, rules)
    graphdef, adapters, frozen_state = split_model(model)
    params, frozen = flat_values(adapters), flat_values(frozen_state)
    trainable = sum(int(np.prod(v.shape)) for v in params.values())
    say(f"model {cfg.model.path}: {model.spec.num_layers} layers, {model.num_adapters} adapted modules, "
        f"{trainable:,} trainable parameters; mesh {dict(mesh.shape)} over {mesh.devices.size} devices")
    step_fn = TrainStep(cfg, graphdef, adapters, frozen_state, mesh, rules)
    if resume_from is None:
        state = step_fn.init_state(params)
    else:
        state = ckpt.restore(step_fn.abstract_state())
        say(f"resumed from step {resume_from} of {out}")
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
                    progress.flush(print_line=False)  # never checkpoint a diverged state
                    ckpt.save(state, cfg)
                if stop.raised:
                    interrupted = True
                    say(f"SIGTERM: saving step {done} and stopping")
                    break
        progress.flush(print_line=False)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: saving the last completed step")
        progress.flush(print_line=False)
    finally:
        _final_save(ckpt, state, cfg, progress, say)
    save_adapters(out / "adapter", state.params, model.groups, cfg)
    if jax.process_index() == 0:
        plot_run(progress.history, out, model.adapter_modules())
    say(f"checkpoint step {int(jax.device_get(state.step))} and adapter export written to {out}")
    return RunResult(state, progress.history, out, interrupted)


def _final_save(ckpt: Checkpointer, state: TrainState, cfg: Config, progress: Progress, say) -> None:
    """Save the last completed step unless it diverged or its buffers were already donated."""
    try:
        donated = any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state))
        if progress.healthy and not donated:
            ckpt.save(state, cfg)
        else:
            why = "the loss is not finite" if not progress.healthy else "the step was cut off mid-way"
            say(f"not saving the current state ({why}); checkpoint {ckpt.latest_step()} is the latest good one")
        ckpt.wait()
    finally:
        ckpt.close()
