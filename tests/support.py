"""Builders shared by the tests (tests reach them through the fixtures in ``conftest.py``) and by the
multi-process worker script, which runs outside pytest."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from comoe_jax import sharding as shd
from comoe_jax import trainer
from comoe_jax.config import Config
from comoe_jax.loading import build_model, load_tokenizer
from comoe_jax.model import flat_values, split_model
from comoe_jax.step import TrainStep

SHARDED = dict(mesh__data=2, mesh__fsdp=2, mesh__tensor=2, mesh__num_devices=8)  # a 2 x 2 x 2 mesh


def tiny_config(tmp_path=None, **overrides) -> Config:
    """A random 2-layer Llama (hidden 32) with CoMoE adapters (r 4, on q_proj and down_proj) on three built-in
    tasks, 6 steps of batch 4, no evaluation. ``section__key=value`` overrides; ``tmp_path`` sets ``<tmp_path>/run``."""
    cfg = Config()
    cfg.model.path = "random"
    cfg.model.random_arch = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
    cfg.adapter.rank = 4
    cfg.adapter.target_modules = ("q_proj", "down_proj")  # one attention and one MLP projection: half the compile
    cfg.data.train = ("builtin:add+reverse+antonym",)
    cfg.data.template = "plain"
    cfg.data.seq_len = 56
    cfg.train.batch_size = 4
    cfg.train.steps = 6
    cfg.train.log_every = 2
    cfg.train.save_every = 2
    cfg.optim.learning_rate = 1e-2
    cfg.optim.warmup_steps = 1
    cfg.mesh.num_devices = 1
    cfg.eval.before_training = cfg.eval.after_training = False
    if tmp_path is not None:
        cfg.train.output_dir = str(tmp_path / "run")
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


class StepSetup(NamedTuple):
    step: TrainStep
    state: object  # TrainState
    frozen: dict
    data: trainer.TrainStream
    mesh: object
    rules: dict


def next_batch(data, cfg: Config, mesh, rules) -> dict:
    """The next global batch of the stream ``data``, placed on ``mesh``."""
    return shd.global_batch(trainer.next_global_batch(data, cfg), mesh, rules, batch_axis=1)


def setup_step(cfg: Config, devices=None) -> StepSetup:
    """The jitted step of ``cfg``, a fresh train state, the frozen base and the data stream."""
    mesh = shd.make_mesh(cfg.mesh, devices or jax.devices()[:1])
    rules = shd.rules_dict(cfg.mesh.rules)
    model = build_model(cfg, mesh, rules)
    graphdef, adapters, frozen = split_model(model)
    step = TrainStep(cfg, graphdef, adapters, frozen, mesh, rules)
    data = trainer.training_stream(cfg, load_tokenizer("random"), say=lambda text: None)
    return StepSetup(step, step.init_state(flat_values(adapters)), flat_values(frozen), data, mesh, rules)


def run_steps(cfg: Config, devices, steps: int = 3) -> list[list[float]]:
    """[loss, ce, contrastive] of the first ``steps`` steps of ``cfg`` on ``devices``."""
    step, state, frozen, data, mesh, rules = setup_step(cfg, devices)
    out = []
    for _ in range(steps):
        state, m = step(state, frozen, next_batch(data, cfg, mesh, rules))
        out.append([float(m["loss"]), float(m["ce"]), float(m["contrastive"])])
    return out


def randomised(model_class, config, seed: int = 0):
    """A transformers (PyTorch) model with every weight drawn from N(0, 0.2) (its init leaves norms at 1 / 0)."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def padded_inputs(vocab: int, seed: int = 0, batch: int = 3, length: int = 13) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids ``[batch, length]`` and a mask with two right-padded rows."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, length - 4:] = 0
    mask[2, 5:] = 0
    return ids, mask
