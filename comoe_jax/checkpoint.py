"""Checkpoints (orbax) and adapter export (safetensors + adapter_config.json).

A checkpoint holds the train state (adapter params, optimizer state, step, PRNG
key) and the run's config as JSON; the frozen base is never copied. The adapters
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

from comoe_jax.config import Config

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
FORMAT = "comoe-jax-moe-lora/1"
# Keys that may change when a run is resumed (they do not change what is trained).
RESUMABLE_CHANGES = {"train.steps", "train.save_every", "train.keep_checkpoints", "train.log_every",
                     "train.output_dir", "train.resume", "mesh.data", "mesh.fsdp", "mesh.tensor",
                     "mesh.coordinator_address", "mesh.num_processes", "mesh.process_id"}


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a run under ``run_dir/checkpoints``."""

    def __init__(self, run_dir: str | Path, keep: int):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, cfg: Config) -> None:
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(cfg.to_dict()))
        self.manager.save(step, args=args)

    def restore(self, abstract_state, step: int | None = None):
        """(state, saved config dict) of ``step`` (default: latest), placed on ``abstract_state``'s shardings."""
        step = self.latest_step() if step is None else step
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """``section.key`` entries that differ between a checkpoint's config and ``cfg`` (and matter)."""
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as saved
    changed = []
    for section, values in now.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in RESUMABLE_CHANGES and saved.get(section, {}).get(key) != value:
                changed.append(f"{name}: checkpoint {saved.get(section, {}).get(key)!r}, now {value!r}")
    return changed


def save_adapters(directory: str | Path, params: dict, cfg: Config) -> Path:
    """Write ``params`` (flat adapter dict) as safetensors + adapter_config.json, atomically.

    Multi-host safe: every process joins the gather, process 0 writes.
    """
    from safetensors.numpy import save_file

    host = {k: np.asarray(v) for k, v in multihost_utils.process_allgather(params, tiled=True).items()}
    directory = Path(directory)
    if jax.process_index() != 0:
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(host, str(tmp / ADAPTER_WEIGHTS), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "base_model": cfg.model.path, "adapter": cfg.to_dict()["adapter"],
            "loss": cfg.to_dict()["loss"], "key_layout": "flat names '<module path>.lora_a' [n, d_in, r], "
            "'.lora_b' [n, r, d_out], '.router' [d_in, n]; kernels are x @ W (Hugging Face weights transposed)"}
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
