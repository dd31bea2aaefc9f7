"""Test session set-up (8 virtual CPU devices, a compilation cache) and the shared builders as fixtures.

Conventions: tests are pytest functions that take the shared builders of ``tests/support.py``
as the fixtures below (module-level helpers and the subprocess workers import
``tests.support`` directly); numeric kernels checked with ``chex.variants`` (jit and no-jit)
are ``parameterized.TestCase`` classes, as chex requires. No test module imports another.
"""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Compilation, not execution, dominates the suite (hundreds of tiny steps, each compiled once): LLVM at -O0
# compiles them about twice as fast and the whole suite runs about 1.5x faster. HLO optimisation is unchanged;
# subprocesses inherit the flag, so in-process and subprocess runs compile alike.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax  # noqa: E402

# Many tests compile the same tiny train step; the persistent cache compiles it once per session.
jax.config.update("jax_compilation_cache_dir", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the top-level scripts (train.py, ...) import

import pytest  # noqa: E402

from tests import support  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(tmp_path=None, **{"section__key": value})``: the tiny random-Llama run config."""
    return support.tiny_config


@pytest.fixture(scope="session")
def setup_step():
    """``setup_step(cfg, devices=None)`` -> (step, state, frozen, data stream, mesh, rules)."""
    return support.setup_step


@pytest.fixture(scope="session")
def next_batch():
    """``next_batch(data, cfg, mesh, rules)``: the stream's next global batch on the mesh."""
    return support.next_batch


@pytest.fixture(scope="session")
def run_steps():
    """``run_steps(cfg, devices, steps=3)`` -> [[loss, ce, contrastive], ...]."""
    return support.run_steps


@pytest.fixture(scope="session")
def sharded():
    """Config overrides for a 2 x 2 x 2 (data, fsdp, tensor) mesh of 8 devices."""
    return dict(support.SHARDED)
