"""The sharded train step compiles ahead of time for a TPU slice, on abstract devices (libtpu, no TPU)."""

import importlib.util

import pytest

from comoe_jax.config import Config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")


def _config() -> Config:
    cfg = Config()
    cfg.model.path = "random"
    cfg.model.random_arch = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                 num_attention_heads=8, num_key_value_heads=4)
    cfg.model.dtype = cfg.model.param_dtype = "bfloat16"
    cfg.model.remat = True
    cfg.adapter.layers = "1:3"
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 4, 2
    cfg.train.batch_size = 16
    cfg.optim.grad_accum_steps = 2
    return cfg


def test_train_step_compiles_for_v5e_4x4():
    from comoe_jax.aot import compile_train_step, tpu_devices

    devices = tpu_devices("v5e:4x4")
    assert len(devices) == 16 and devices[0].platform == "tpu"
    result = compile_train_step(_config(), devices, seq_len=128)
    assert dict(result.mesh.shape) == {"dcn": 1, "data": 2, "fsdp": 4, "tensor": 2}
    memory = result.memory_per_device()
    assert memory["argument"] > 0 and memory["peak_estimate"] > memory["temp"]
    hlo = result.compiled.as_text()
    assert "all-reduce" in hlo or "reduce-scatter" in hlo  # gradients cross the data axes
    # frozen base: 128*512 embed + 512*128 head + 3 layers of attention/MLP; adapters only on layers 1-2
    assert result.trainable_parameters < result.frozen_parameters


def test_train_step_compiles_for_two_v5e_slices_over_the_dcn_axis():
    from comoe_jax.aot import compile_train_step, tpu_devices

    devices = tpu_devices("v5e:2x2", num_slices=2)
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
    cfg = _config()  # one layer, no accumulation: what is new here is the dcn axis (the 4x4 test covers the rest)
    cfg.model.random_arch = dict(cfg.model.random_arch, num_hidden_layers=1, intermediate_size=128)
    cfg.adapter.layers = "all"
    cfg.optim.grad_accum_steps, cfg.train.batch_size = 1, 8
    cfg.mesh.dcn, cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 1, 2, 2
    result = compile_train_step(cfg, devices, seq_len=32)
    assert dict(result.mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 2, "tensor": 2}
    for s, devs in enumerate(result.mesh.devices):  # each dcn index is one whole slice
        assert {d.slice_index for d in devs.ravel()} == {s}
    assert "all-reduce" in result.compiled.as_text()  # gradients cross the slices
