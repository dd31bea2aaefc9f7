"""Test session set-up: 8 virtual CPU devices (sharded tests on one machine) and a compilation cache."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

# Many tests compile the same tiny train step; the persistent cache compiles it once per session.
jax.config.update("jax_compilation_cache_dir", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the top-level scripts (train.py, ...) import
