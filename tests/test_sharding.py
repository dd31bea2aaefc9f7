"""Sharded training equals single-device training: 8 virtual CPU devices, and 2 processes via jax.distributed."""

import json
import os
import socket
import subprocess
import sys
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
    assert state.params["layers.0.layer.self_attn.q_proj.lora_b"].sharding.spec == P(None, None, None, "tensor")
    mu = state.opt_state[1][0].mu["layers.0.layer.self_attn.q_proj.lora_a"]  # AdamW moments follow the params
    assert mu.sharding.spec == P(None, None, "fsdp", None)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed_equal_one_device(single_device_losses, tmp_path):
    port, out = _free_port(), tmp_path / "losses.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed_worker", str(i), "2", str(port), str(out)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)
    result = json.loads(out.read_text())
    assert result["devices"] == 8
    np.testing.assert_allclose(result["losses"], single_device_losses, rtol=1e-5)


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
