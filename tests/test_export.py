"""Adapter export / import and the order of per-module statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comoe_jax.checkpoint import load_adapters, save_adapters, set_adapters
from comoe_jax.loading import build_model
from comoe_jax.model import flat_values, split_model
from tests.test_train import tiny_config


def test_adapter_export_round_trip(tmp_path):
    cfg = tiny_config(adapter__layers="1:2")
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

    fresh = build_model(tiny_config(adapter__layers="1:2", train__seed=7))
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


def test_statistics_follow_adapter_module_order():
    from comoe_jax.adapters import ForwardContext

    model = build_model(tiny_config(adapter__target_modules=("q_proj", "down_proj")))
    ids = jnp.ones((2, 6), jnp.int32)
    out = model.forward(ids, ctx=ForwardContext(jnp.ones((2, 6)), jnp.float32(12), jax.random.key(0)))
    assert list(out.stats) == model.adapter_modules()
    assert model.adapter_modules()[:2] == ["layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"]
