"""Sharded training equals single-device training: 8 virtual CPU devices, and 2 processes via jax.distributed."""

from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from comoe_jax import sharding as shd
from comoe_jax.config import ConfigError, MeshConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def single_device_losses(tiny_config, run_steps):
    return run_steps(tiny_config(), jax.devices()[:1])


def test_eight_devices_equal_one(single_device_losses, tiny_config, setup_step, run_steps, sharded):
    assert jax.device_count() >= 8, "conftest.py should give 8 CPU devices"
    np.testing.assert_allclose(run_steps(tiny_config(**sharded), jax.devices()[:8]), single_device_losses, rtol=1e-5)
    step_fn, state, frozen, *_ = setup_step(tiny_config(**sharded), jax.devices()[:8])
    kernel = frozen["layers.0.layer.self_attn.q_proj.kernel"]  # [layers, embed, heads]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    # lora_b [layers, n, r, heads]: heads on tensor; no logical axis maps to fsdp, so the largest dimension
    # fsdp divides (the expert axis) takes it: no trainable array is whole on every chip
    assert state.params["layers.0.layer.self_attn.q_proj.lora_b"].sharding.spec == P(None, "fsdp", None, "tensor")
    mu = state.opt_state[1][0].mu["layers.0.layer.self_attn.q_proj.lora_a"]  # AdamW moments follow the params
    assert mu.sharding.spec == P(None, None, "fsdp", None)
    down = state.opt_state[1][0].nu["layers.0.layer.mlp.down_proj.lora_a"]  # [layers, n, mlp, rank]: mlp on tensor
    assert down.sharding.spec == P(None, "fsdp", "tensor", None)


def test_spreading_over_an_axis_takes_the_largest_free_dimension_it_divides():
    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    assert shd.spread_over(P(None, None, "tensor"), (2, 8, 12, 6), mesh, "fsdp") == P(None, "fsdp", "tensor", None)
    assert shd.spread_over(P("fsdp"), (8, 16), mesh, "fsdp") == P("fsdp")  # already used
    assert shd.spread_over(P(), (3, 6), mesh, "fsdp") == P()  # 4 divides nothing
    assert shd.spread_over(P(), (3, 6), mesh, "data") == P()  # a mesh axis of size 1


def test_rules_drop_mesh_axes_that_do_not_divide():
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    rules = shd.rules_dict(MeshConfig().rules)
    assert shd.logical_to_spec(("embed", "kv_heads"), (64, 6), rules, mesh) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("embed", "kv_heads"), (63, 3), rules, mesh) == P(None, None)
    assert shd.logical_to_spec(("batch", "length"), (8, 5), rules, mesh) == P(("data", "fsdp"), None)
    assert shd.logical_to_spec(("batch", "length"), (2, 5), rules, mesh) == P("data", None)


def test_mesh_shape_errors():
    assert shd.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="3 x 1 x 1 = 3 but there are 8 devices"):
        shd.mesh_shape(MeshConfig(data=3, fsdp=1, tensor=1), 8)
    with pytest.raises(ConfigError, match="cannot be split"):
        shd.mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)
    with pytest.raises(ConfigError, match="mesh.rules"):
        shd.rules_dict((("embed", "model"),))
