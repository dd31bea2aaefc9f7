"""Ahead-of-time compilation of the sharded train step for a TPU slice you do not have.

With ``libtpu`` installed (``pip install libtpu``) JAX can describe a TPU topology
(``v5e:4x4``, ``v4:2x2x2``, ...) without the hardware. The step is lowered on
``ShapeDtypeStruct`` inputs and compiled for those abstract chips; the compiled
program's ``memory_analysis()`` tells whether a model, adapter and batch fit per
chip before you pay for the slice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from comoe_jax import sharding as shd
from comoe_jax.config import Config
from comoe_jax.loading import model_factory
from comoe_jax.model import split_model
from comoe_jax.step import TrainStep

# Host bounds of the single-host-per-4-chips layouts JAX needs to describe a slice.
CHIPS_PER_HOST = {"v4": (2, 2, 1), "v5p": (2, 2, 1), "v5e": (2, 2, 1), "v6e": (2, 2, 1)}


def tpu_devices(topology: str = "v5e:4x4", num_slices: int = 1) -> list:
    """Abstract TPU devices of ``topology`` (needs libtpu; no TPU needed)."""
    from jax.experimental import topologies

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # do not ask a GCE metadata server
    # Only the compiler is used, no chip: let several processes (e.g. two test runs) load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    generation = topology.split(":")[0]
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                        chips_per_host_bounds=CHIPS_PER_HOST.get(generation, (2, 2, 1)),
                                        num_slices=num_slices)
    return list(desc.devices)


@dataclass
class CompiledStep:
    compiled: object
    mesh: object
    trainable_parameters: int
    frozen_parameters: int

    def memory_per_device(self) -> dict[str, int]:
        m = self.compiled.memory_analysis()
        fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes")
        out = {f.replace("_size_in_bytes", ""): int(getattr(m, f)) for f in fields}
        # Donated train state aliases its output, so live memory is arguments + outputs - aliased + temporaries.
        out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
        return out


def compile_train_step(cfg: Config, devices, seq_len: int | None = None) -> CompiledStep:
    """Lower and compile the train step of ``cfg`` for ``devices`` (abstract devices are fine).

    The base model is built abstractly (shapes only), so no weights are read or allocated.
    """
    mesh = shd.make_mesh(cfg.mesh, devices)
    rules = shd.rules_dict(cfg.mesh.rules)
    abstract = nnx.eval_shape(model_factory(cfg.model, cfg.adapter, cfg.loss, cfg.train.seed))
    graphdef, adapters, frozen = split_model(abstract)
    step = TrainStep(cfg, graphdef, adapters, frozen, mesh, rules)
    lowered = step.jitted.lower(*step.abstract_inputs(seq_len or cfg.data.seq_len))
    count = lambda state: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))  # noqa: E731
    return CompiledStep(lowered.compile(), mesh, count(adapters), count(frozen))
