"""Adapter export / import and the order of per-module statistics."""

import jax.numpy as jnp
import numpy as np
import pytest

from comoe_jax.checkpoint import load_adapters, save_adapters, set_adapters
from comoe_jax.loading import build_model
from comoe_jax.model import flat_values, split_model


def test_adapter_export_round_trip(tmp_path, tiny_config):
    cfg = tiny_config(adapter__layers="1:2", adapter__target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    model = build_model(cfg)
    _, adapters, _ = split_model(model)
    rng = np.random.default_rng(0)
    trained = {k: jnp.asarray(rng.normal(size=v.shape), v.dtype) for k, v in flat_values(adapters).items()}
    save_adapters(tmp_path / "adapter", trained, model.groups, cfg)
    tensors, meta = load_adapters(tmp_path / "adapter")
    assert meta["adapter"]["layers"] == "1:2"
    assert set(tensors) == {f"layers.1.self_attn.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
                            for w in ("lora_a", "lora_b", "router")}
    assert tensors["layers.1.self_attn.q_proj.lora_a"].shape == (4, 32, 4)

    fresh = build_model(tiny_config(adapter__layers="1:2", adapter__target_modules=cfg.adapter.target_modules,
                                    train__seed=7))
    ids = jnp.asarray(rng.integers(0, 300, size=(2, 9)), jnp.int32)
    before = np.asarray(fresh(ids))
    set_adapters(fresh, tensors)
    for name, value in flat_values(split_model(fresh)[1]).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(trained[name]))
    assert not np.allclose(np.asarray(fresh(ids)), before)
    bad = dict(tensors)
    bad["layers.1.self_attn.q_proj.lora_a"] = bad["layers.1.self_attn.q_proj.lora_a"][:, :, :2]
    with pytest.raises(ValueError, match=r"q_proj\.lora_a: shape"):
        set_adapters(fresh, bad)


def test_statistics_follow_adapter_module_order(tiny_config):
    from flax import nnx

    from comoe_jax.adapters import AdapterStat, ForwardContext

    model = build_model(tiny_config(adapter__target_modules=("q_proj", "down_proj"), adapter__layers="1:3",
                                    model__random_arch=dict(tiny_config().model.random_arch, num_hidden_layers=4)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 6)), jnp.int32)
    logits, stats = nnx.capture(model.forward, AdapterStat)(
        ids, ctx=ForwardContext(jnp.ones((2, 6)), jnp.float32(12)))
    assert model.adapter_modules() == ["layers.1.self_attn.q_proj", "layers.1.mlp.down_proj",
                                       "layers.2.self_attn.q_proj", "layers.2.mlp.down_proj"]
    load = model.stat(stats, "load")
    assert load.shape == (4, 4)
    stack = stats["layers"][1]["layer"]  # the adapted stack holds layers 1 and 2
    for row, name in enumerate(model.adapter_modules()):
        layer, block, proj = name.split(".")[1:]
        np.testing.assert_array_equal(load[row], stack[block][proj]["load"].get_value()[int(layer) - 1])
    assert not np.allclose(load[0], load[2])  # rows really are different modules
    # outside a capture nothing is sown and the model is unchanged
    np.testing.assert_array_equal(model.forward(ids, ctx=ForwardContext(jnp.ones((2, 6)), jnp.float32(12))).logits,
                                  logits.logits)
    assert not nnx.state(model, AdapterStat)
