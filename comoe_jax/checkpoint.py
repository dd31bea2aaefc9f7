"""Checkpoints (orbax) and adapter export (safetensors + adapter_config.json).

A checkpoint holds the train state (adapter params, optimizer state, step, PRNG
key), the run's config and the data stream's position (both JSON); the frozen base
is never copied. The adapters
are also written as ``adapter/adapter_model.safetensors`` with ``adapter_config.json``
beside it, readable without JAX.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from comoe_jax.config import Config, resumable_keys
from comoe_jax.model import flat_values, split_model, stack, state_from_flat, unstack

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
FORMAT = "comoe-jax-moe-lora/1"


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a run under ``run_dir/checkpoints``."""

    def __init__(self, run_dir: str | Path, keep: int):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, cfg: Config, data_state: dict) -> None:
        """Save ``state`` at its step, with the config and the data stream position (JSON)."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(cfg.to_dict()),
                                  data=ocp.args.JsonSave(data_state))
        self.manager.save(step, args=args)

    def saved_config(self, step: int | None = None) -> dict:
        """The config dict saved with ``step`` (default: latest)."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def saved_data_state(self, step: int | None = None) -> dict:
        """The data stream position saved with ``step`` (default: latest)."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data

    def restore(self, abstract_state, step: int | None = None):
        """The train state of ``step`` (default: latest), placed on ``abstract_state``'s shardings."""
        step = self.latest_step() if step is None else step
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args).state

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
            if name not in resumable and saved.get(section, {}).get(key) != value:
                changed.append(f"{name}: checkpoint {saved.get(section, {}).get(key)!r}, now {value!r}")
    return changed


def save_adapters(directory: str | Path, params: dict, groups: tuple[range, ...], cfg: Config) -> Path:
    """Write ``params`` (flat, stacked adapter dict) as safetensors + adapter_config.json, atomically.

    Keys are per layer (``layers.3.self_attn.q_proj.lora_a``), whatever the layer stacking.
    Multi-host safe: every process joins the gather, process 0 writes.
    """
    from safetensors.numpy import save_file

    gathered = multihost_utils.process_allgather(params, tiled=True)
    host = {k: np.ascontiguousarray(v) for k, v in unstack({k: np.asarray(v) for k, v in gathered.items()},
                                                            groups).items()}
    directory = Path(directory)
    if jax.process_index() != 0:
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(host, str(tmp / ADAPTER_WEIGHTS), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "base_model": cfg.model.path, "adapter": cfg.to_dict()["adapter"],
            "loss": cfg.to_dict()["loss"], "key_layout": "'layers.<i>.<self_attn|mlp>.<proj>.lora_a' [n, d_in, r], "
            "'.lora_b' [n, r, d_out], '.router' [d_in, n] (absent for n = 1); y = x @ W, i.e. the paper's A_i, "
            "B_i and G transposed"}
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, default=list))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_adapters(directory: str | Path) -> tuple[dict, dict]:
    """(flat params as NumPy arrays, adapter config dict) from :func:`save_adapters`'s folder."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name} does not exist (expected an adapter folder from comoe-jax)")
    meta = json.loads((directory / ADAPTER_CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return load_file(str(directory / ADAPTER_WEIGHTS)), meta


def set_adapters(model, per_layer: dict) -> None:
    """Put per-layer adapter arrays (from :func:`load_adapters`) into ``model``, checking names and shapes."""
    from flax import nnx

    _, adapters, _ = split_model(model)
    current = flat_values(adapters)
    missing = [n for n in unstack(current, model.groups) if n not in per_layer]
    if missing:
        raise ValueError(f"adapter file lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")
    values = stack(per_layer, list(current), model.groups)
    for name, value in values.items():
        if tuple(value.shape) != tuple(current[name].shape):
            raise ValueError(f"adapter tensor {name}: shape {value.shape}, the model expects {current[name].shape}")
    nnx.update(model, state_from_flat(adapters, {n: jax.numpy.asarray(v, current[n].dtype) for n, v in values.items()}))
