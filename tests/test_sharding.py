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


@pytest.mark.parametrize("overrides", [
    {},  # CoMoE: dropout, random anchors, all negatives, dense experts
    {"loss__load_balance_weight": 0.5, "optim__grad_accum_steps": 2},  # a loss that is no sum over tokens
    {"adapter__experts": "sparse", "loss__num_negatives": 1},  # sampled negatives, sorted dispatch
    {"mesh__dcn": 2},  # rows split over two mesh axes (2 slices x 2 devices): their order in the batch
], ids=["comoe", "load-balance-accum", "sparse", "two-slices"])
def test_exact_reduction_equals_xla_and_one_device(tiny_config, setup_step, next_batch, overrides):
    """mesh.reduction=exact (per-device gradients in shard_map, added in device order) trains what XLA's
    all-reduce and a single device train: same losses and parameters to float32 rounding, load-balance
    gradient included (each device's 1 / S share of the whole batch's loss)."""
    def run(devices, reduction):
        single = {} if len(devices) > 1 else {"mesh__dcn": 1}
        cfg = tiny_config(mesh__reduction=reduction, **(overrides | single))
        step, state, frozen, data, mesh, rules = setup_step(cfg, devices)
        assert (step.exact_axes is not None) == (reduction == "exact" and len(devices) > 1)
        if step.exact_axes and "mesh__dcn" in overrides:
            assert step.exact_axes == ("dcn", "data")
        losses = []
        for _ in range(3):
            state, m = step(state, frozen, next_batch(data, cfg, mesh, rules))
            losses.append([float(m[k]) for k in ("loss", "ce", "contrastive", "load_balance", "grad_norm")])
        return np.asarray(losses), {k: np.asarray(v) for k, v in state.params.items()}

    one, one_params = run(jax.devices()[:1], "exact")
    for reduction in ("exact", "xla"):
        losses, params = run(jax.devices()[:4], reduction)
        np.testing.assert_allclose(losses, one, rtol=2e-6, err_msg=reduction)
        for name, value in params.items():
            np.testing.assert_allclose(value, one_params[name], rtol=0, atol=1e-5, err_msg=f"{reduction} {name}")


def test_exact_reduction_is_chosen_by_mesh_and_platform(tiny_config, setup_step):
    cpu = jax.devices()[:4]
    assert shd.exact_reduction("auto", shd.make_mesh(MeshConfig(), cpu))  # CPU, whole weights
    assert not shd.exact_reduction("xla", shd.make_mesh(MeshConfig(), cpu))
    assert not shd.exact_reduction("auto", shd.make_mesh(MeshConfig(data=2, fsdp=2), cpu))  # sharded weights
    with pytest.raises(ConfigError, match=r"mesh.reduction='exact' needs .*fsdp=2, tensor=1"):
        shd.exact_reduction("exact", shd.make_mesh(MeshConfig(data=2, fsdp=2), cpu))


def test_ordered_sum_adds_in_device_order_bit_for_bit():
    """Values spread over 40 binary orders of magnitude, so the order of the additions shows in the bits."""
    mesh = shd.make_mesh(MeshConfig(), jax.devices()[:4])
    rng = np.random.default_rng(7)
    tree = {"a": (rng.standard_normal((4, 3, 7)) * np.exp2(rng.integers(-20, 20, (4, 3, 7)))).astype(np.float32),
            "b": rng.standard_normal((4, 5)).astype(np.float32), "c": rng.integers(0, 9, (4, 2)).astype(np.int32)}
    placed = jax.device_put(tree, jax.sharding.NamedSharding(mesh, P("data")))
    summed = jax.jit(jax.shard_map(lambda t: shd.ordered_sum(jax.tree.map(lambda v: v[0], t), ("data",)),
                                   mesh=mesh, in_specs=P("data"), out_specs=P(), check_vma=False))(placed)
    for name, value in tree.items():
        want = value[0]
        for device in range(1, 4):  # float32 additions, device 0 first
            want = want + value[device]
        np.testing.assert_array_equal(np.asarray(summed[name]), want, err_msg=name)
        assert summed[name].dtype == value.dtype
