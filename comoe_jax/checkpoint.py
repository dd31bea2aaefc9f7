"""Checkpoints (orbax) and adapter export (safetensors + adapter_config.json).

A checkpoint holds the train state (adapter params, optimizer state, step, PRNG
key, skip counts), the run's config and the data stream's position (both JSON); the
frozen base is never copied. The adapters are also written as
``adapter/adapter_model.safetensors`` with ``adapter_config.json`` beside it, readable
without JAX. Nothing non-finite is ever written; a checkpoint that cannot be read back
is moved to ``damaged_checkpoints/`` and the newest intact one is used instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from comoe_jax.config import Config, read_json, resumable_keys
from comoe_jax.errors import AdapterFormatError, CheckpointError
from comoe_jax.model import flat_values, split_model, stack, stacked_sources, state_from_flat, unstack
from comoe_jax.paths import absolute, as_path, remove_tree, replace

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
FORMAT = "comoe-jax-moe-lora/1"


def _is_abandoned_read(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


class _AbandonedReadLogs(logging.Filter):
    """Drops asyncio's "Task / Future exception was never retrieved" reports of orbax's
    ``async_deserialize`` tasks and tensorstore's read futures: when one tensor of a damaged checkpoint
    fails, the reads of its other tensors are abandoned, and their errors (the same damage, already
    handled) are logged with a traceback when they are garbage-collected."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        abandoned = message.startswith(("Task exception was never retrieved", "Future exception was never retrieved"))
        return not (abandoned and ("async_deserialize" in message or "tensorstore_spec" in message))


def _quiet_abandoned_reads() -> None:
    """After a failed restore, tensorstore completes the reads orbax abandoned and their callbacks hit the
    closed asyncio loop: ``RuntimeError('Event loop is closed')`` is reported, long after the error was
    handled, through ``sys.unraisablehook`` or (tensorstore's ``PyErr_Print``) ``sys.excepthook``, as a
    traceback per tensor, and abandoned reads that failed are logged by asyncio (:class:`_AbandonedReadLogs`).
    Drop exactly those; report anything else."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReadLogs) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedReadLogs())
    if getattr(sys.unraisablehook, "_comoe_quiet", False):
        return
    unraisable_hook, except_hook = sys.unraisablehook, sys.excepthook

    def unraisable(report):
        if not _is_abandoned_read(report.exc_value):
            unraisable_hook(report)

    def excepthook(kind, error, tb):
        if not _is_abandoned_read(error):
            except_hook(kind, error, tb)

    unraisable._comoe_quiet = True
    sys.unraisablehook, sys.excepthook = unraisable, excepthook


def _tree_all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def all_finite(tree) -> bool:
    """Whether every array of ``tree`` is finite (one device reduction, then one scalar to the host)."""
    return bool(jax.device_get(jax.jit(_tree_all_finite)(tree)))


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a run under ``run_dir/checkpoints``.

    ``say`` prints warnings (a damaged checkpoint set aside, an older one used instead).
    """

    def __init__(self, run_dir: str | Path, keep: int, say=print):
        self.run_dir = absolute(run_dir)
        self.directory = self.run_dir / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.say = say
        _quiet_abandoned_reads()  # before any restore: the reports can come while orbax is still unwinding

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, cfg: Config, data_state: dict) -> None:
        """Save ``state`` at its step, with the config and the data stream position (JSON).

        Refuses (CheckpointError) a state with a non-finite value: a checkpoint is always resumable.
        """
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        if not all_finite((state.params, state.opt_state)):
            raise CheckpointError(f"step {step}: the train state holds non-finite values; not writing it to "
                                  f"{self.directory} (the checkpoints there are intact)")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(cfg.to_dict()),
                                  data=ocp.args.JsonSave(data_state))
        self.manager.save(step, args=args)

    def saved_config(self, step: int | None = None) -> dict:
        """The config dict saved with ``step`` (default: latest)."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def newest_config(self) -> tuple[int, dict]:
        """(step, config) of the newest checkpoint whose config reads back; damaged ones are set aside."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, self.saved_config(step)
            except Exception as e:  # any unreadable checkpoint: fall back to an older one
                self._set_aside(step, e)
        raise self._none_intact()

    def restore_intact(self, abstract_state) -> tuple[int, object, dict]:
        """(step, train state, data stream position) of the newest checkpoint that reads back completely,
        placed on ``abstract_state``'s shardings; damaged ones are set aside with a warning."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=args)
            except Exception as e:  # a damaged checkpoint: try the next older one
                self._set_aside(step, e)
                continue
            if all_finite(restored.state):
                return step, restored.state, restored.data
            self._set_aside(step, ValueError("non-finite parameters"))
        raise self._none_intact()

    def _none_intact(self) -> CheckpointError:
        return CheckpointError(f"{self.directory}: no checkpoint can be read back (the damaged ones were moved to "
                               f"{self.run_dir / 'damaged_checkpoints'}); rerun to start this run over, or choose "
                               "another train.output_dir")

    def _set_aside(self, step: int, error: Exception) -> None:
        """Move a damaged checkpoint to ``damaged_checkpoints/<step>`` (kept, never deleted) and forget it."""
        target = self.run_dir / "damaged_checkpoints" / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_tree(target)
            (self.directory / str(step)).rename(target)
        multihost_utils.sync_global_devices(f"comoe_set_aside_{step}")
        self.manager.reload()
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        self.say(f"warning: checkpoint {step} cannot be read back ({type(error).__name__}: {reason}); moved to "
                 f"{target}, using an older one")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """``section.key`` entries that differ between a checkpoint's config and ``cfg`` (and matter: keys
    whose field is ``resumable`` may change)."""
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as saved
    resumable = resumable_keys()
    changed = []
    for section, values in now.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            before = saved[section][key] if key in saved.get(section, {}) else _before_the_key(name, saved)
            if before is _ABSENT:
                continue  # a key added since the run started, whose default is what the run did
            if name == "model.path" and isinstance(before, str) and _model_key(before) == _model_key(value):
                continue  # an older run stored the path as typed (relative)
            if name not in resumable and before != value:
                changed.append(f"{name}: checkpoint {before!r}, now {value!r}")
    return changed


_ABSENT = object()


def _before_the_key(name: str, saved: dict):
    """What a run saved before key ``name`` existed did, where that is not the key's default."""
    if name == "data.chat_replies" and saved.get("data", {}).get("template") == "chat":
        return "last"  # multi-turn chat records trained on their last reply only
    return _ABSENT


def save_adapters(directory: str | Path, params: dict, groups: tuple[range, ...], cfg: Config) -> Path:
    """Write ``params`` (flat, stacked adapter dict) as safetensors + adapter_config.json, atomically.

    Keys are per layer (``layers.3.self_attn.q_proj.lora_a``), whatever the layer stacking.
    Multi-host safe: every process joins the gather, process 0 writes.
    """
    from safetensors.numpy import save

    gathered = multihost_utils.process_allgather(params, tiled=True)
    host = {k: np.ascontiguousarray(v) for k, v in unstack({k: np.asarray(v) for k, v in gathered.items()},
                                                            groups).items()}
    directory = as_path(directory)
    bad = [name for name, value in host.items() if not np.isfinite(value).all()]
    if bad:
        raise CheckpointError(f"adapter tensor {bad[0]} (and {len(bad) - 1} more) holds non-finite values; not "
                              f"exporting to {directory}")
    if jax.process_index() != 0:
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    (tmp / ADAPTER_WEIGHTS).write_bytes(save(host, metadata={"format": FORMAT}))
    meta = {"format": FORMAT, "base_model": cfg.model.path, "adapter": cfg.to_dict()["adapter"],
            "loss": cfg.to_dict()["loss"], "key_layout": "'layers.<i>.<self_attn|mlp>.<proj>.lora_a' [n, d_in, r], "
            "'.lora_b' [n, r, d_out], '.router' [d_in, n] (absent for n = 1); y = x @ W, i.e. the paper's A_i, "
            "B_i and G transposed"}
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, default=list))
    old = directory.with_name(directory.name + ".old")
    remove_tree(old)
    if directory.exists():
        replace(directory, old)
    replace(tmp, directory)
    remove_tree(old)
    return directory


# safetensors dtype names -> NumPy (bfloat16 through ml_dtypes: safetensors.numpy.load cannot read it, and peft
# adapters trained in bfloat16 are saved so)
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}


def read_safetensors(path: Path, error: type[Exception]) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file; a truncated or foreign file raises ``error`` naming it."""
    from safetensors import deserialize

    try:
        tensors = deserialize(as_path(path).read_bytes())
    except Exception as e:  # safetensors raises its own SafetensorError / OSError on damaged files
        raise error(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); the file is damaged or "
                    "was not written by safetensors") from None
    out = {}
    for name, t in tensors:
        if t["dtype"] not in SAFETENSORS_DTYPES:
            raise error(f"{path}: tensor {name} has dtype {t['dtype']}; comoe-jax reads "
                        f"{', '.join(SAFETENSORS_DTYPES)}")
        try:
            out[name] = np.frombuffer(t["data"], SAFETENSORS_DTYPES[t["dtype"]]).reshape(t["shape"])
        except ValueError as e:  # bytes that do not fill the shape the header gives
            raise error(f"{path}: tensor {name} cannot be read ({e}); the file is damaged") from None
    return out


def load_adapters(directory: str | Path) -> tuple[dict, dict]:
    """(flat params as NumPy arrays, adapter config dict) from :func:`save_adapters`'s folder."""
    directory = as_path(directory)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (directory / name).is_file():
            raise AdapterFormatError(f"{directory / name} does not exist (expected an adapter folder written by "
                                     "comoe-jax: adapter_config.json + adapter_model.safetensors)")
    meta = read_json(directory / ADAPTER_CONFIG, AdapterFormatError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise AdapterFormatError(f"{directory / ADAPTER_CONFIG}: field 'format' is {found!r}, expected {FORMAT!r}")
    tensors = read_safetensors(directory / ADAPTER_WEIGHTS, AdapterFormatError)
    bad = [name for name, value in tensors.items() if not np.isfinite(value).all()]
    if bad:
        raise AdapterFormatError(f"{directory / ADAPTER_WEIGHTS}: tensor {bad[0]} holds non-finite values")
    return tensors, meta


def _model_key(path) -> str:
    """A model path or hub id, compared after resolving local paths (relative, symlinked)."""
    text = os.path.expanduser(os.fspath(path))
    return os.path.realpath(text) if os.path.exists(text) else text


def set_adapters(model, per_layer: dict, *, source=None, base: tuple | None = None) -> None:
    """Put per-layer adapter arrays (from :func:`load_adapters`) into ``model``, checking names and shapes.
    ``source`` (the adapter folder) and ``base`` (``(recorded base model, the model used)``) name a mismatch."""
    from flax import nnx

    where = f"{source}: " if source is not None else ""
    hint = ""
    if base and base[0] and base[1] and _model_key(base[0]) != _model_key(base[1]):
        hint = (f"; the adapter was trained on base model {base[0]!r} (its {ADAPTER_CONFIG}), not on {base[1]!r}: an "
                "adapter fits only its own base model")
    _, adapters, _ = split_model(model)
    current = flat_values(adapters)
    needed = unstack(current, model.groups)
    missing = [n for n in needed if n not in per_layer]
    if missing:
        raise AdapterFormatError(f"{where}the adapter file lacks {len(missing)} tensors the model needs, e.g. "
                                 f"{missing[0]} " + (f"({hint[2:]})" if hint else "(was it trained with other "
                                 "adapter.target_modules / adapter.layers?)"))
    unused = [n for n in per_layer if n not in needed]
    if unused:  # a DoRA adapter read as LoRA, or adapters on projections the model does not adapt
        raise AdapterFormatError(f"{where}the adapter file holds {len(unused)} tensors the model does not use, e.g. "
                                 f"{unused[0]} (was it trained with another adapter.method / target_modules / "
                                 "layers?)")
    if hint and jax.process_index() == 0:
        print(f"warning: {where}{hint[2:]}; its shapes fit, so it is applied as asked", flush=True)
    for name, value in current.items():
        sources = stacked_sources(name, model.groups)  # per-layer names of a stacked array
        want = tuple(value.shape[1:] if sources else value.shape)
        for src in sources or [name]:
            if tuple(np.shape(per_layer[src])) != want:
                raise AdapterFormatError(f"{where}adapter tensor {src}: shape {tuple(np.shape(per_layer[src]))}, the "
                                         f"model expects {want}{hint}")
    values = stack(per_layer, list(current), model.groups)
    nnx.update(model, state_from_flat(adapters, {n: jax.numpy.asarray(v, current[n].dtype) for n, v in values.items()}))


def check_adapter_settings(adapter_dir, cfg: Config) -> None:
    """The adapter folder must have been trained with ``cfg.adapter``'s settings: a folder from another run, or
    ``adapter.*`` overrides on a trained run, would otherwise load (or scale) its tensors wrongly."""
    if not (as_path(adapter_dir) / ADAPTER_CONFIG).exists():
        return  # reading the folder names what is missing
    meta = read_json(as_path(adapter_dir) / ADAPTER_CONFIG, AdapterFormatError)
    saved = meta.get("adapter") if isinstance(meta, dict) else None
    if not isinstance(saved, dict):
        return  # not comoe-jax's layout: reading it names the problem
    ours = dataclasses.asdict(cfg.adapter)
    differ = [k for k in ("method", "num_experts", "top_k", "rank", "alpha", "target_modules", "layers")
              if k in saved and k in ours and _setting(k, saved[k], cfg) != _setting(k, ours[k], cfg)]
    if differ:
        found = ", ".join(f"{k}={_plain(saved[k])!r}" for k in differ)
        wanted = ", ".join(f"adapter.{k}={_plain(ours[k])!r}" for k in differ)
        raise AdapterFormatError(f"{as_path(adapter_dir) / ADAPTER_CONFIG}: {found}, but the run's config says "
                                 f"{wanted}: the adapter was trained with other settings (a folder from another run, "
                                 "or adapter.* overrides, which cannot change a trained adapter)")


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _setting(key: str, value, cfg: Config):
    """An adapter setting as it acts: target modules in any order, layers as the range they name."""
    if key == "target_modules" and isinstance(value, (list, tuple)):
        return sorted(value)
    if key == "layers" and isinstance(value, str):
        from comoe_jax.config import parse_layer_range
        from comoe_jax.loading import model_spec

        try:
            return parse_layer_range(value, model_spec(cfg.model.path, cfg.model.random_arch).num_layers)
        except Exception:  # noqa: BLE001  (a bad value or model is named where it is read)
            return value
    return _plain(value)


def load_run_model(cfg: Config, run_dir=None, mesh=None, rules=None, adapter_dir=None):
    """The model of ``cfg`` on ``mesh`` (default: ``cfg.mesh``), with the adapters exported to
    ``<run_dir>/adapter`` or ``adapter_dir`` (e.g. ``<run>/best_adapter``; neither given: the base model,
    adapters at initialisation)."""
    from comoe_jax import sharding as shd
    from comoe_jax.loading import build_model

    if mesh is None:
        mesh, rules = shd.make_mesh(cfg.mesh), shd.rules_dict(cfg.mesh.rules)
    model = build_model(cfg, mesh, rules)
    if adapter_dir is None and run_dir is not None:
        adapter_dir = as_path(run_dir) / "adapter"
    if adapter_dir is not None:
        check_adapter_settings(adapter_dir, cfg)
        tensors, meta = load_adapters(adapter_dir)
        set_adapters(model, tensors, source=as_path(adapter_dir), base=(meta.get("base_model"), cfg.model.path))
    return model
