"""Device meshes, logical-axis rules and multi-host start-up.

Parameters carry logical axis names (``axes`` metadata, e.g. ``('embed', 'mlp')``);
``mesh.rules`` in the config maps each to a mesh axis. A mesh axis that does not
divide a dimension is dropped for that dimension (the array stays replicated
along it) instead of failing, so one rule set serves every model size.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from comoe_jax.config import ConfigError, MeshConfig
from comoe_jax.constants import MESH_AXES

log = logging.getLogger(__name__)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar("comoe_rules", default=None)


def init_distributed(cfg: MeshConfig) -> None:
    """Start ``jax.distributed`` for a multi-host run (no-op for a single process)."""
    if not cfg.coordinator_address:
        return
    if cfg.coordinator_address == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id)
    log.info("jax.distributed: process %d of %d, %d devices in all", jax.process_index(), jax.process_count(),
             jax.device_count())


def mesh_shape(cfg: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """Resolve ``-1`` axis sizes and check the product equals the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    if -1 in sizes:
        if device_count % fixed:
            raise ConfigError(f"mesh: {device_count} devices cannot be split into data x fsdp x tensor with "
                              f"fsdp={cfg.fsdp}, tensor={cfg.tensor}")
        sizes[sizes.index(-1)] = device_count // fixed
    if math.prod(sizes) != device_count:
        raise ConfigError(f"mesh: data x fsdp x tensor = {sizes[0]} x {sizes[1]} x {sizes[2]} = {math.prod(sizes)} "
                          f"but there are {device_count} devices; set one axis to -1 to fill")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over ``devices`` (default: the first ``cfg.num_devices``)."""
    if devices is None:
        devices = jax.devices()
        if cfg.num_devices != -1:
            if cfg.num_devices > len(devices):
                raise ConfigError(f"mesh.num_devices={cfg.num_devices} but only {len(devices)} devices are visible")
            devices = devices[: cfg.num_devices]
    devices = list(devices)
    shape = mesh_shape(cfg, len(devices))
    types = (jax.sharding.AxisType.Auto,) * 3
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Abstract or unusual device sets: plain row-major order.
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


def rules_dict(rules) -> dict:
    """Config rules ``((logical, mesh_axis_or_axes_or_None), ...)`` -> dict, checking mesh axis names."""
    out = {}
    for item in rules:
        if len(item) != 2:
            raise ConfigError(f"mesh.rules: entry {item!r} is not a (logical_axis, mesh_axes) pair")
        name, target = item
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for t in targets:
            if t not in MESH_AXES:
                raise ConfigError(f"mesh.rules: {name!r} -> {t!r}: mesh axes are {', '.join(MESH_AXES)}")
        out[name] = targets
    return out


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], rules: dict, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array with logical ``axes``; non-dividing or reused mesh axes are dropped."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        chosen = []
        for axis in rules.get(name, ()) if name else ():
            size = mesh.shape[axis]
            if axis in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def named_sharding(axes, shape, rules: dict, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, rules, mesh))


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: dict) -> Iterator[None]:
    """Within this context, :func:`constrain` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axis names; a no-op outside :func:`activation_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, x.shape, rules, mesh))


def batch_sharding(mesh: Mesh, rules: dict, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Sharding of a batch array: ``batch_axis`` over the 'batch' rule's mesh axes, the rest replicated."""
    spec = [None] * ndim
    spec[batch_axis] = tuple(rules.get("batch", ())) or None
    return NamedSharding(mesh, PartitionSpec(*spec))


def global_batch(arrays: dict[str, np.ndarray], mesh: Mesh, rules: dict, batch_axis: int = 0) -> dict[str, jax.Array]:
    """Place host arrays (the same global batch on every process) as sharded global arrays."""
    out = {}
    for name, value in arrays.items():
        sharding = batch_sharding(mesh, rules, value.ndim, batch_axis)
        out[name] = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
    return out
