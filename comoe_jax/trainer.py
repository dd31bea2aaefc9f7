"""The training loop: mesh, model, data, jitted step, progress, checkpoints, resume, adapter export.

``train(cfg)`` never loses a run: checkpoints every ``train.save_every`` steps and
at the end, on Ctrl-C and on SIGTERM (preemption); it resumes from the latest
checkpoint of ``train.output_dir`` and refuses to continue a run whose training
config has changed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from comoe_jax import sharding as shd
from comoe_jax.checkpoint import Checkpointer, config_changes, save_adapters
from comoe_jax.config import (
    Config,
    ConfigError,
    negatives_per_anchor,
    parse_layer_range,
    read_json,
    split_less,
    validate,
)
from comoe_jax.data import (
    BATCH_ARRAYS,
    DataError,
    TrainStream,
    assign_rows,
    check_token_ids,
    check_tokenizer,
    data_fingerprint,
    load_sources,
    tokenize_rows,
)
from comoe_jax.errors import CheckpointError, RunFolderError
from comoe_jax.evaluate import EvalResult, evaluate, load_eval, loss_pairs, require_choice, response_loss
from comoe_jax.flops import device_peak, train_step_flops
from comoe_jax.interop import export_peft
from comoe_jax.loading import build_model, load_tokenizer, model_spec
from comoe_jax.model import flat_values, split_model, state_from_flat, trainable_parameters
from comoe_jax.paths import as_path, is_local, output_folder, write_atomic
from comoe_jax.plots import plot_run, plot_validation
from comoe_jax.progress import MetricSinks, Progress, metric_sinks, read_jsonl, repair_jsonl
from comoe_jax.report import (
    analyse_and_save,
    evaluate_and_save,
    evaluation_examples,
    load_history,
    validation_examples,
    write_report,
)
from comoe_jax.step import TrainState, TrainStep


@dataclass
class RunResult:
    state: TrainState
    history: list[dict]
    output_dir: Path
    interrupted: bool = False


class _StopFlag:
    """Whether to save and stop after a step, agreed by every process.

    One process: SIGTERM sets a flag the loop reads after each step. Several processes: JAX's
    preemption sync manager (started by ``jax.distributed.initialize``) owns SIGTERM; when any
    process gets one, :meth:`reached` turns True on every process at the same step, so all save that
    step and stop together instead of hanging in a collective.
    """

    def __init__(self):
        self.raised = False
        self._previous = None
        self.shared = jax.process_count() > 1

    def __enter__(self):
        if self.shared:
            return self  # a Python handler here would take SIGTERM away from JAX's preemption notifier
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def reached(self, step: int) -> bool:
        """Call after every step with consecutive step numbers (the multi-process protocol needs them)."""
        if self.shared:
            self.raised = multihost_utils.reached_preemption_sync_point(step)
        return self.raised

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def next_global_batch(stream: TrainStream, cfg: Config) -> dict[str, np.ndarray]:
    """Host arrays ``[grad_accum_steps, rows, T]`` of the next optimizer step: this process's rows."""
    micro = [stream.next_batch() for _ in range(cfg.optim.grad_accum_steps)]
    return {k: np.stack([m[k] for m in micro]) for k in BATCH_ARRAYS}


def training_stream(cfg: Config, tokenizer, say, rows: list[int] | None = None,
                    vocab_size: int | None = None) -> TrainStream:
    """Load the training sources of ``cfg``, tokenize the examples of ``rows`` (the batch rows this
    process feeds; default all) and mix them into a batch stream of those rows; token ids at or past the
    model's ``vocab_size`` are refused."""
    check_tokenizer(tokenizer, encodes=True)
    d, batch_size = cfg.data, cfg.train.batch_size
    examples = load_sources(d.train, "train", seed=cfg.train.seed, tasks=d.tasks, max_per_task=d.max_examples_per_task)
    tasks = tuple(dict.fromkeys(ex.task for ex in examples))
    rows = list(range(batch_size)) if rows is None else sorted(rows)
    wanted = set(rows)
    mine = [(ex, kept) for ex, ex_rows in zip(examples, assign_rows(examples, batch_size, cfg.train.seed))
            if (kept := tuple(r for r in ex_rows if r in wanted))]
    records, counts = tokenize_rows(tokenizer, [ex for ex, _ in mine], [r for _, r in mine], d.template,
                                    d.seq_len, tasks, d.chat_replies)
    check_token_ids(records, tokenizer, vocab_size, cfg.model.path)
    _check_rows_fed(records, mine, cfg)
    share = "" if len(rows) == batch_size else f" (the {len(rows)} of {batch_size} batch rows this process feeds)"
    say(counts.summary(d.seq_len) + share)
    stream = TrainStream({r: records.get(r, {}) for r in rows}, batch_size=batch_size, seq_len=d.seq_len,
                         seed=cfg.train.seed, packing=d.packing, pad_id=tokenizer.pad_token_id,
                         task_sizes=dict(Counter(ex.task for ex in examples)), weights=d.mix_weights,
                         fingerprint=data_fingerprint(examples))
    say("mix: " + ", ".join(f"{t} {w:.0%}" for t, w in stream.weights.items()))
    rare = [t for t, w in stream.weights.items() if w < 0.01]
    if d.mix_weights and rare:
        unnamed = [t for t in stream.weights if t not in d.mix_weights]
        say(f"warning: data.mix_weights leaves {', '.join(rare)} under 1% of the examples: tasks it does not name "
            f"({', '.join(unnamed) or 'none'}) weigh their number of examples; name every task to set the shares")
    return stream


def _check_rows_fed(records: dict, mine: list, cfg: Config) -> None:
    """Each batch row needs a kept example: name the examples of a row that lost them all (too long)."""
    for row in sorted(records):
        if not any(records[row].values()):
            lost = [ex.source for ex, rows in mine if row in rows]
            named = ", ".join(lost[:3]) + (", ..." if len(lost) > 3 else "")
            raise DataError(f"batch row {row} of train.batch_size={cfg.train.batch_size} has no training example: "
                            f"the {len(lost)} example(s) assigned to it ({named}) keep no response token within "
                            f"data.seq_len={cfg.data.seq_len}; raise data.seq_len, shorten those examples, or lower "
                            "train.batch_size")


def _check_batch(cfg: Config, mesh) -> None:
    shd.exact_reduction(cfg.mesh.reduction, mesh)  # 'exact' on a mesh with sharded weights: refused before loading
    shards = shd.batch_shards(mesh)
    if cfg.train.batch_size % shards:
        sizes = " x ".join(str(mesh.shape[a]) for a in ("dcn", "data", "fsdp"))
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the dcn x data x fsdp "
                          f"mesh size ({sizes} = {shards})")


def _check_resumable(cfg: Config, ckpt: Checkpointer, say=print) -> int | None:
    """The step to resume from (None for a fresh run); refuses runs that must not be continued."""
    if ckpt.latest_step() is None:
        _check_no_earlier_run(cfg)
        return None
    if not cfg.train.resume:
        raise ConfigError(f"train.output_dir={cfg.train.output_dir} already holds checkpoints up to step "
                          f"{ckpt.latest_step()}; pass train.resume=true to continue that run, or choose another "
                          "train.output_dir")
    step, saved = ckpt.newest_config()  # damaged checkpoints are set aside on the way
    changed = config_changes(saved, cfg)
    if changed:
        raise ConfigError(f"train.output_dir={cfg.train.output_dir} holds a run with a different config, so it cannot "
                          "be resumed: " + "; ".join(changed) + ". Choose another train.output_dir.")
    if cfg.train.steps < step:
        raise ConfigError(f"train.steps={cfg.train.steps} is below the step the run in {cfg.train.output_dir} has "
                          f"reached ({step}); raise train.steps to train it further, or evaluate it as it is with "
                          "evaluate.py --run")
    before = (saved.get("train") or {}).get("steps")
    if isinstance(before, int) and before != cfg.train.steps:
        say(f"warning: train.steps changed from {before} to {cfg.train.steps}: from step {step + 1} on, the learning "
            f"rate follows the {cfg.train.steps}-step schedule (warm-up and decay), so the run is neither a "
            f"{before}-step nor a {cfg.train.steps}-step run")
    return step


def _check_run_folder(cfg: Config, out) -> None:
    """Refuse, before anything is written there, a train.output_dir that is the base model's folder or holds
    another program's config.json (a model folder): the run would overwrite it."""
    where = f"train.output_dir={cfg.train.output_dir}"
    model = os.path.expanduser(cfg.model.path)
    if is_local(out) and os.path.isdir(model) and os.path.realpath(out) == os.path.realpath(model):
        raise RunFolderError(f"{where} is the base model's folder (model.path); choose another train.output_dir")
    if (out / "config.json").exists():
        saved = read_json(out / "config.json", RunFolderError)
        if not all(isinstance(saved.get(section), dict) for section in ("model", "train")):
            raise RunFolderError(f"{where} holds a config.json that is not a comoe-jax run's (fields "
                                 f"{', '.join(sorted(saved)[:4]) or 'none'}; a model folder?), which the run would "
                                 "overwrite; choose another train.output_dir")


def _check_no_earlier_run(cfg: Config) -> None:
    """A folder without checkpoints may hold a session stopped before its first checkpoint (same config: start
    again), but not a finished run whose checkpoints were removed, nor another config's run."""
    out = as_path(cfg.train.output_dir)
    where = f"train.output_dir={cfg.train.output_dir}"
    if (out / "adapter").exists():
        raise RunFolderError(f"{where} holds a finished run's adapter/ but no checkpoint to resume from; training "
                             "again would overwrite it. Choose another train.output_dir")
    if (out / "config.json").exists():
        changed = config_changes(read_json(out / "config.json", RunFolderError), cfg)
        if changed:
            raise RunFolderError(f"{where} holds an earlier run (config.json, no checkpoint yet) with a different "
                                 f"config: {'; '.join(changed)}. Choose another train.output_dir")


def _prepare_output(out) -> None:
    """Create the run folder, refusing a file, an uncreatable or an unwritable path before any work."""
    output_folder(out, "train.output_dir")
    try:
        probe = out / f".write_test.{jax.process_index()}.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"train.output_dir={out} cannot be written ({e.strerror or e}); choose a writable "
                             "folder") from None


def _check_validation_items(cfg: Config, say) -> None:
    """Validation on a source without splits reads the test items: refused for choosing the best step,
    warned about otherwise."""
    unsplit = [spec for spec in cfg.eval.sources if split_less(spec)]
    if not cfg.eval.every or not unsplit or cfg.eval.validation_sources:
        return
    if cfg.eval.keep_best:
        raise ConfigError(f"eval.keep_best=True is not allowed: only with validation items apart from the test "
                          f"items: {', '.join(unsplit)} has no splits (or is pinned to one), so the best step would "
                          "be chosen on the very items eval.sources reports; name a validation file in "
                          "eval.validation_sources")
    say(f"warning: validation reads {', '.join(unsplit)}, which has no splits (or is pinned to one): the validation "
        "items are the test items; name a validation file in eval.validation_sources")


def _check_model(cfg: Config):
    """The architecture of ``model.path`` (config.json or the GGUF header only) and the adapter layer range,
    checked before data and weights are loaded."""
    spec = model_spec(cfg.model.path, cfg.model.random_arch)
    parse_layer_range(cfg.adapter.layers, spec.num_layers)
    context = spec.rope.max_position_embeddings
    if cfg.data.seq_len > context and spec.rope.rope_type != "dynamic":  # dynamic NTK RoPE is made to extrapolate
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than the model's context "
                          f"(max_position_embeddings={context} in {cfg.model.path}'s config); use at most {context}")
    return spec


def _use_compilation_cache(folder: str) -> None:
    if folder:
        output_folder(folder, "train.compilation_cache")  # a file or an unwritable path: refused, not warned about
    if folder and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(as_path(folder)))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def train(cfg: Config, *, stream=None) -> RunResult:
    """Run ``cfg`` to ``train.steps`` (or until interrupted), checkpointing on the way; evaluate and report."""
    validate(cfg)
    _use_compilation_cache(cfg.train.compilation_cache)
    shd.init_distributed(cfg.mesh)
    say = (lambda text: print(text, flush=True, file=stream)) if jax.process_index() == 0 else (lambda text: None)
    mesh, rules = shd.make_mesh(cfg.mesh), shd.rules_dict(cfg.mesh.rules)
    _check_batch(cfg, mesh)
    _check_validation_items(cfg, say)
    out = as_path(cfg.train.output_dir)
    _prepare_output(out)
    spec = _check_model(cfg)
    _check_run_folder(cfg, out)
    ckpt = Checkpointer(out, cfg.train.keep_checkpoints, say)
    try:
        resume_from = _check_resumable(cfg, ckpt, say)
    except ConfigError:
        ckpt.close()
        raise
    if jax.process_index() == 0:
        repair_jsonl(out / "metrics.jsonl", say)
    tokenizer = load_tokenizer(cfg.model.path)
    batches = training_stream(cfg, tokenizer, say, shd.local_rows(mesh, rules, cfg.train.batch_size), spec.vocab_size)
    # evaluation and validation items are read and checked now, not after minutes of loading and training
    eval_items = evaluation_examples(cfg) if cfg.eval.before_training or cfg.eval.after_training else []
    val_items = validation_examples(cfg) if cfg.eval.every else []
    if cfg.eval.mode != "generate":
        require_choice(eval_items + val_items, cfg.eval.mode, need_options=cfg.eval.mode == "loglik")
    if cfg.eval.every > cfg.train.steps:
        say(f"warning: eval.every={cfg.eval.every} > train.steps={cfg.train.steps}: no validation runs"
            + (", so eval.keep_best keeps no adapter" if cfg.eval.keep_best else ""))
    kept = len(loss_pairs(tokenizer, val_items, cfg.data.template, cfg.data.seq_len)) if val_items else 0
    if kept < len(val_items):
        say(f"warning: the validation loss leaves out {len(val_items) - kept} of {len(val_items)} items: no response "
            f"token within data.seq_len={cfg.data.seq_len}")
    # W&B starts (or fails: no login, no network) now, not after the model loads; the writers close (and W&B marks
    # the run failed) whatever ends the run
    with _open_sinks(cfg, out) as sinks:
        model = build_model(cfg, mesh, rules)
        graphdef, adapters, frozen_state = split_model(model)
        counts = trainable_parameters(model)
        if jax.process_index() == 0:
            (out / "parameters.json").write_text(json.dumps(counts, indent=1))
        say(f"model {cfg.model.path}: {model.spec.num_layers} layers, {model.num_adapters} adapted modules "
            f"({cfg.adapter.method}), {counts['total']:,} trainable parameters "
            f"({', '.join(f'{k} {v:,}' for k, v in counts.items() if k != 'total')}); "
            f"mesh {dict(mesh.shape)} over {mesh.devices.size} devices")
        step_fn = TrainStep(cfg, graphdef, adapters, frozen_state, mesh, rules)
        if resume_from is not None:
            resume_from, state, data_state = ckpt.restore_intact(step_fn.abstract_state())
            batches.set_state(data_state)  # the positions of every process's rows: this one reads its own
            if batches.unverified:
                say("warning: this checkpoint predates the data fingerprint (and the per-row task order of comoe-jax "
                    "2026-12-07): the run goes on, but its batches differ from those an uninterrupted run would have "
                    "seen, and edited data files cannot be detected")
            say(f"resumed from step {resume_from} of {out}")
        else:
            state = step_fn.init_state(flat_values(adapters))
        if resume_from is None and cfg.eval.before_training:
            # adapters at initialisation: this is the base model
            before = evaluate_and_save(cfg, model, tokenizer, eval_items, out / "eval_before", say)
            say(f"eval before training ({cfg.eval.mode}): " + _accuracies(before))
            sinks.log("eval_before", _accuracy_scalars(before), 0)
        if jax.process_index() == 0:
            (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
        flops = train_step_flops(cfg, model, step_fn.head_positions, counts["total"])
        validator = Validator(cfg, model, tokenizer, val_items, out, say, sinks) if cfg.eval.every else None
        state, interrupted = _loop(cfg, step_fn, state, flat_values(frozen_state), batches, ckpt, stream, say, sinks,
                                   flops, validator)
        save_adapters(out / "adapter", state.params, model.groups, cfg)
        trained = nnx.merge(graphdef, state_from_flat(adapters, state.params), frozen_state)
        if cfg.adapter.method in ("lora", "dora"):  # one LoRA per layer: peft users load it as is
            export_peft(trained, cfg, out / "peft")
        history = load_history(out)  # the whole run, earlier sessions included
        if jax.process_index() == 0:
            plot_run(history, out, model.adapter_modules(), f"lambda = {cfg.loss.contrastive_weight}",
                     negatives_per_anchor(cfg))
        say(f"checkpoint step {int(jax.device_get(state.step))} and adapter export written to {out}")
        if not interrupted and cfg.eval.after_training:
            after = _evaluate_after(cfg, trained, tokenizer, eval_items, history, out, say)
            sinks.log("eval_after", _accuracy_scalars(after), int(jax.device_get(state.step)))
    return RunResult(state, history, out, interrupted)


def _loop(cfg: Config, step_fn: TrainStep, state: TrainState, frozen: dict, batches: TrainStream,
          ckpt: Checkpointer, stream, say, sinks: MetricSinks, flops_per_step: float,
          validator: Validator | None = None) -> tuple[TrainState, bool]:
    """Steps from ``state.step`` to ``train.steps``; checkpoints; stops cleanly on Ctrl-C / SIGTERM."""
    out = as_path(cfg.train.output_dir)
    progress = Progress(cfg.train.steps, int(jax.device_get(state.step)), cfg.train.log_every, out / "metrics.jsonl",
                        stream=stream, sinks=sinks, max_skipped=cfg.train.max_skipped_steps,
                        flops_per_step=flops_per_step, peak_flops=_peak_flops(cfg, step_fn.mesh.devices.size))
    interrupted = False
    data_state = batches.get_state()  # the stream position that goes with ``state``
    try:
        with _StopFlag() as stop:
            for step in range(int(jax.device_get(state.step)), cfg.train.steps):
                batch = shd.batch_from_local_rows(next_global_batch(batches, cfg), step_fn.mesh, step_fn.rules,
                                                  cfg.train.batch_size)
                state, metrics = step_fn(state, frozen, batch)
                data_state = batches.get_state()
                done = step + 1
                progress.update(done, metrics)
                if validator is not None and validator.due(done):
                    progress.flush(print_line=False)  # never validate a diverged state
                    started = time.perf_counter()
                    validator(done, state.params)
                    progress.skip_time(time.perf_counter() - started)
                stopping = stop.reached(done)
                if done % cfg.train.save_every == 0 or done == cfg.train.steps or stopping:
                    progress.flush(print_line=False)  # never checkpoint a diverged state
                    ckpt.save(state, cfg, shd.merge_across_processes(data_state))
                if stopping:
                    interrupted = True
                    say(f"SIGTERM (preemption): step {done} saved, stopping" if stop.shared else
                        f"SIGTERM: saving step {done} and stopping")
                    break
        progress.flush(print_line=False)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: saving the last completed step")
        progress.flush(print_line=False)
    finally:
        _final_save(ckpt, state, cfg, data_state, progress, say)
    return state, interrupted


def _open_sinks(cfg: Config, out) -> MetricSinks:
    """:func:`metric_sinks`, with every process stopping if process 0's writers cannot start (the others would
    otherwise wait for it in the model's first collective)."""
    error = sinks = None
    try:
        sinks = metric_sinks(cfg, out)
    except ConfigError as e:
        if jax.process_count() == 1:
            raise
        error = e
    if jax.process_count() > 1 and multihost_utils.process_allgather(np.asarray([error is not None])).any():
        raise error or ConfigError("the metric writers could not start on process 0 (see its error); stopping "
                                   "every process")
    return sinks


class Validator:
    """Validation during training (``eval.every``): the response loss and the accuracy (``eval.mode``) on the
    validation items, to ``validation.jsonl``, the metric writers (``val/*``) and ``validation.png``; with
    ``eval.keep_best`` the adapters of the best step so far go to ``best_adapter/`` (``best.json``)."""

    def __init__(self, cfg: Config, model, tokenizer, items: list, out: Path, say, sinks: MetricSinks):
        self.cfg, self.tokenizer, self.out, self.say, self.sinks = cfg, tokenizer, out, say, sinks
        self.graphdef, self.adapters, self.frozen = split_model(model)
        self.groups = model.groups
        self.items = items  # validation_examples(cfg), checked by train() before the model loads
        self.rows = read_jsonl(out / "validation.jsonl")[0]  # earlier sessions of a resumed run
        best = out / "best.json"
        meta = read_json(best, RunFolderError) if best.exists() else {}
        meta = meta if isinstance(meta, dict) else {}
        # best: the highest accuracy, ties (e.g. free-form generation still at 0) to the lower validation loss
        self.best = (meta.get("accuracy_average", -1.0), -meta.get("loss", float("inf")))

    def due(self, step: int) -> bool:
        return step % self.cfg.eval.every == 0

    def __call__(self, step: int, params: dict) -> dict:
        e, template = self.cfg.eval, self.cfg.data.template
        model = nnx.merge(self.graphdef, state_from_flat(self.adapters, params), self.frozen)
        loss = response_loss(model, self.tokenizer, self.items, template=template, seq_len=self.cfg.data.seq_len,
                             batch_size=e.batch_size)
        result = evaluate(model, self.tokenizer, self.items, mode=e.mode, template=template, batch_size=e.batch_size,
                          max_new_tokens=e.max_new_tokens, max_len=e.max_len)
        row = {"step": step, "loss": loss} | _accuracy_scalars(result)
        self.say(f"validation at step {step}: loss {loss:.4f} | " + _accuracies(result))
        self.sinks.log("val", row, step)
        self.rows = [r for r in self.rows if r["step"] < step] + [row]
        if jax.process_index() == 0:
            write_atomic(self.out / "validation.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
            plot_validation(self.rows, self.out / "validation.png")
        if e.keep_best and (result.average, -loss) > self.best:
            self.best = (result.average, -loss)
            save_adapters(self.out / "best_adapter", params, self.groups, self.cfg)
            if jax.process_index() == 0:
                write_atomic(self.out / "best.json", json.dumps({"step": step, "accuracy_average": result.average,
                                                                  "loss": loss}))
            self.say(f"best validation accuracy so far: adapters of step {step} in {self.out / 'best_adapter'}")
        return row


def _evaluate_after(cfg: Config, model, tokenizer, eval_items, history: list[dict], out: Path, say) -> EvalResult:
    after = evaluate_and_save(cfg, model, tokenizer, eval_items, out / "eval_after", say)
    say(f"eval after training ({cfg.eval.mode}): " + _accuracies(after))
    routing = analyse_and_save(cfg, model, tokenizer, eval_items, out)
    if routing:
        say(f"MI(task; expert set) {routing['mi_task_expert_set_bits']:.3f} bits, router entropy "
            f"{routing['router_entropy_bits']:.3f} bits")
    say(f"report: {write_report(out, cfg, load_eval(out / 'eval_before.json'), after, routing, history)}")
    return after


def _accuracy_scalars(result: EvalResult) -> dict[str, float]:
    return {f"accuracy_{task}": float(r["accuracy"]) for task, r in result.per_task.items()} | \
        {"accuracy_average": float(result.average)}


def _peak_flops(cfg: Config, devices: int) -> float | None:
    """Peak FLOP/s of the run's ``devices`` (None on CPUs and unknown chips: no MFU)."""
    peak = device_peak(cfg.model.dtype)
    return peak * devices if peak else None


def _accuracies(result: EvalResult) -> str:
    return ", ".join(f"{t} {100 * r['accuracy']:.1f}" for t, r in result.per_task.items()) + \
        f" | average {100 * result.average:.1f}% ({result.seconds:.0f}s)"


def _final_save(ckpt: Checkpointer, state: TrainState, cfg: Config, data_state: dict, progress: Progress,
                say) -> None:
    """Save the last completed step unless it diverged or its buffers were already donated. While an error is
    on its way out (out of memory, a bug), a failed save is reported, not raised over it."""
    in_flight = sys.exc_info()[1]
    try:
        donated = any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state))
        if progress.healthy and not donated:
            try:
                ckpt.save(state, cfg, shd.merge_across_processes(data_state))
            except Exception as e:
                if in_flight is None or isinstance(e, CheckpointError):
                    raise
                say(f"could not save the current state ({type(e).__name__}); checkpoint {ckpt.latest_step()} is "
                    "the latest good one")
        else:
            why = "training diverged" if not progress.healthy else "the step was cut off mid-way"
            say(f"not saving the current state ({why}); checkpoint {ckpt.latest_step()} is the latest good one")
        try:
            ckpt.wait()
        except Exception as e:
            if in_flight is None:
                raise
            say(f"could not finish writing the last checkpoint ({type(e).__name__})")
    finally:
        ckpt.close()
