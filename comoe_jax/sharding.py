"""Device meshes, logical-axis rules and multi-host start-up.

Parameters carry logical axis names (``axes`` metadata, e.g. ``('embed', 'mlp')``);
``mesh.rules`` in the config maps each to a mesh axis. A mesh axis that does not
divide a dimension is dropped for that dimension (the array stays replicated
along it) instead of failing, so one rule set serves every model size.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import json
import logging
import math
import operator
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from comoe_jax.config import ConfigError, MeshConfig
from comoe_jax.constants import LOGICAL_AXES, MESH_AXES

log = logging.getLogger(__name__)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar("comoe_rules", default=None)


def init_distributed(cfg: MeshConfig) -> None:
    """Start ``jax.distributed`` for a multi-host run (no-op for a single process)."""
    if not cfg.coordinator_address:
        return
    if cfg.coordinator_address == "auto":
        jax.distributed.initialize(heartbeat_timeout_seconds=cfg.heartbeat_timeout)
    else:
        jax.distributed.initialize(cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id,
                                   heartbeat_timeout_seconds=cfg.heartbeat_timeout)
    log.info("jax.distributed: process %d of %d, %d devices in all", jax.process_index(), jax.process_count(),
             jax.device_count())


def mesh_shape(cfg: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) of one slice: resolve ``-1`` and check the product is the slice's device count."""
    if device_count % cfg.dcn:
        raise ConfigError(f"mesh.dcn={cfg.dcn} slices do not divide the {device_count} devices")
    device_count //= cfg.dcn
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
    """A ('dcn', 'data', 'fsdp', 'tensor') mesh over ``devices`` (default: the first ``cfg.num_devices``).

    With ``mesh.dcn > 1`` the devices of one TPU slice share a dcn index
    (``mesh_utils.create_hybrid_device_mesh``), so only the batch split crosses the data-center network.
    """
    if devices is None:
        devices = jax.devices()
        if cfg.num_devices != -1:
            if cfg.num_devices > len(devices):
                raise ConfigError(f"mesh.num_devices={cfg.num_devices} but only {len(devices)} devices are visible")
            devices = devices[: cfg.num_devices]
    devices = list(devices)
    shape = (cfg.dcn, *mesh_shape(cfg, len(devices)))
    types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        if cfg.dcn > 1:
            grid = mesh_utils.create_hybrid_device_mesh((1, *shape[1:]), (cfg.dcn, 1, 1, 1), devices=devices)
            return Mesh(grid, MESH_AXES, axis_types=types)
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except (ValueError, NotImplementedError, AssertionError, AttributeError):
        # Abstract or unusual device sets (no slice_index, no physical layout): plain row-major order,
        # which keeps consecutive devices (one host's, one slice's) together.
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


def rules_dict(rules) -> dict:
    """Config rules ``((logical, mesh_axis_or_axes_or_None), ...)`` -> dict, checking mesh axis names."""
    out = {}
    for item in rules:
        if len(item) != 2:
            raise ConfigError(f"mesh.rules: entry {item!r} is not a (logical_axis, mesh_axes) pair")
        name, target = item
        if name not in LOGICAL_AXES:
            close = difflib.get_close_matches(str(name), LOGICAL_AXES, n=1)
            raise ConfigError(f"mesh.rules: {name!r} is not a logical axis" + (f" (did you mean {close[0]!r}?)"
                                                                                if close else "")
                              + f"; logical axes are {', '.join(LOGICAL_AXES)}")
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for t in targets:
            if t not in MESH_AXES:
                raise ConfigError(f"mesh.rules: {name!r} -> {t!r}: mesh axes are {', '.join(MESH_AXES)}")
            if targets.count(t) > 1:
                raise ConfigError(f"mesh.rules: {name!r} maps to mesh axis {t!r} twice; name each mesh axis once")
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


def named_sharding(axes, shape, rules: dict, mesh: Mesh, spread: str | None = None) -> NamedSharding:
    """The sharding of an array with logical ``axes``; ``spread``: also split it over that mesh axis
    (see :func:`spread_over`)."""
    spec = logical_to_spec(axes, shape, rules, mesh)
    return NamedSharding(mesh, spread_over(spec, shape, mesh, spread) if spread else spec)


def spread_over(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, axis: str) -> PartitionSpec:
    """``spec`` with mesh ``axis`` added on the largest dimension it divides, when no dimension uses it yet.

    ZeRO-style: trainable parameters and their optimizer state are split over the ``fsdp`` axis even
    where their logical axes leave them replicated (a ``lora_b`` whose output axis is ``heads`` would
    otherwise be whole on every chip). Gradients are then reduce-scattered instead of all-reduced.
    """
    size = mesh.shape[axis]
    parts = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for p in parts if p for a in ((p,) if isinstance(p, str) else p)}
    free = [i for i, (p, d) in enumerate(zip(parts, shape)) if p is None and d % size == 0]
    if size == 1 or axis in used or not free:
        return spec
    parts[max(free, key=lambda i: shape[i])] = axis
    return PartitionSpec(*parts)


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


def exact_reduction(mode: str, mesh: Mesh) -> bool:
    """Whether the train step adds the devices' gradients in device order (``mesh.reduction``): 'exact'
    (needs every device to hold whole weights: mesh.fsdp = mesh.tensor = 1), 'xla' (XLA's all-reduce),
    'auto' (exact on CPU devices with whole weights, where multi-process runs are tests and the order
    matters more than the collective's speed; XLA's on accelerators)."""
    whole = all(mesh.shape.get(a, 1) == 1 for a in ("fsdp", "tensor"))
    if mode == "exact" and not whole:
        raise ConfigError(f"mesh.reduction='exact' needs every device to hold whole weights (mesh.fsdp = mesh.tensor "
                          f"= 1; this mesh has fsdp={mesh.shape.get('fsdp', 1)}, tensor={mesh.shape.get('tensor', 1)})"
                          "; use 'auto' or 'xla'")
    if mode == "auto":
        return whole and mesh.devices.flat[0].platform == "cpu"
    return mode == "exact"


def ordered_sum(tree, axes: tuple[str, ...]):
    """Inside ``shard_map``: the sum over the devices of ``axes`` of each device's ``tree`` (every leaf
    whole on every device), added in device order, so the result is the same bits whatever the
    process layout or the collective's algorithm (gloo's ring all-reduce adds in another order than
    the in-process CPU collectives).

    An all-reduce made of exact moves: ``all_to_all`` hands each device one chunk of every device's
    values, the device adds its chunk's S parts in order, and ``all_gather`` returns the chunks.
    Traffic is a ring all-reduce's; memory O(size) (a few copies of the flat values, not S x size).
    Leaves are numeric arrays (booleans would be or-ed, not counted).
    """
    size = jax.lax.axis_size(axes)
    leaves, treedef = jax.tree.flatten(tree)
    out = list(leaves)
    for dtype in sorted({leaf.dtype for leaf in leaves}, key=str):  # one collective per dtype
        picked = [i for i, leaf in enumerate(leaves) if leaf.dtype == dtype]
        flat = jnp.concatenate([leaves[i].reshape(-1) for i in picked])
        chunks = jnp.pad(flat, (0, -flat.size % size)).reshape(size, -1)
        parts = jax.lax.all_to_all(chunks, axes, 0, 0)  # [S, chunk]: row j is device j's part of my chunk
        mine = functools.reduce(operator.add, [parts[j] for j in range(size)])
        whole = jax.lax.all_gather(mine, axes, tiled=True)[: flat.size]
        offsets = np.cumsum([0] + [leaves[i].size for i in picked])
        for i, start, end in zip(picked, offsets[:-1], offsets[1:]):
            out[i] = whole[start:end].reshape(leaves[i].shape)
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def shared_sum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Inside ``shard_map``: the sum of ``x`` over the devices of ``axes`` (:func:`ordered_sum`), for a
    value that every device then uses alike, scaled by 1 / S in its share of the loss (the load-balance
    loss of the whole batch). Its gradient is the total of all devices' cotangents, which under that use
    is S times this device's."""
    return ordered_sum(x, axes)


def _shared_sum_fwd(x, axes):
    return ordered_sum(x, axes), None


def _shared_sum_bwd(axes, _, cotangent):
    return (cotangent * jax.lax.axis_size(axes),)


shared_sum.defvjp(_shared_sum_fwd, _shared_sum_bwd)


def active_batch_shards(batch: int) -> int:
    """Into how many shards the active rules split a batch of ``batch`` rows (1 outside
    :func:`activation_rules`, or when the batch axes do not divide it)."""
    active = _ACTIVE.get()
    if active is None:
        return 1
    mesh, rules = active
    size = math.prod(mesh.shape[a] for a in rules.get("batch", ()))
    return size if batch % size == 0 else 1


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


def local_rows(mesh: Mesh, rules: dict, batch_size: int, ndim: int = 3, batch_axis: int = 1) -> list[int]:
    """The rows of a ``batch_size``-row global batch that this process's devices hold (and so must feed)."""
    shape = [1] * ndim
    shape[batch_axis] = batch_size
    indices = batch_sharding(mesh, rules, ndim, batch_axis).addressable_devices_indices_map(tuple(shape))
    return sorted({r for index in indices.values() for r in range(*index[batch_axis].indices(batch_size))})


def batch_from_local_rows(arrays: dict[str, np.ndarray], mesh: Mesh, rules: dict, batch_size: int,
                          batch_axis: int = 1) -> dict[str, jax.Array]:
    """Global batch arrays (``batch_size`` rows) from each process's own rows (:func:`local_rows`)."""
    out = {}
    for name, local in arrays.items():
        shape = list(local.shape)
        shape[batch_axis] = batch_size
        sharding = batch_sharding(mesh, rules, local.ndim, batch_axis)
        out[name] = jax.make_array_from_process_local_data(sharding, local, tuple(shape))
    return out


def merge_across_processes(values: dict) -> dict:
    """The union of every process's JSON-ready dict (e.g. the data position of each one's rows)."""
    if jax.process_count() == 1:
        return values
    blob = np.frombuffer(json.dumps(values).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([blob.size], np.int32)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    blobs = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    merged = {}
    for size, row in zip(sizes, blobs):
        merged |= json.loads(row[: int(size)].tobytes())
    return merged


def place_rows(mesh: Mesh | None, *arrays: np.ndarray):
    """Host arrays built alike on every process (evaluation batches), their axis 0 split over the mesh's
    batch axes, so each device (and host) scores its share of the rows. ``mesh=None``: unchanged."""
    if mesh is None:
        return arrays
    axes = tuple(a for a in ("dcn", "data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1) or None
    out = []
    for value in arrays:
        sharding = NamedSharding(mesh, PartitionSpec(axes, *([None] * (value.ndim - 1))))
        out.append(jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx]))
    return out


def eval_mesh(state, batch_size: int) -> tuple[Mesh | None, int]:
    """The mesh of a model's arrays (None off-mesh) and ``batch_size`` rounded up to its batch shards."""
    mesh = mesh_of(state)
    shards = batch_shards(mesh) if mesh is not None else 1
    return mesh, -(-batch_size // shards) * shards


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch axis is split (``dcn x data x fsdp``)."""
    return math.prod(mesh.shape[a] for a in ("dcn", "data", "fsdp") if a in mesh.shape)


def to_host(x) -> np.ndarray:
    """A (possibly sharded, multi-process) array as one NumPy array on every process."""
    if jax.process_count() > 1 and not getattr(x, "is_fully_addressable", True):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def mesh_of(state) -> Mesh | None:
    """The mesh a model's arrays live on (None for single-device arrays)."""
    for leaf in jax.tree.leaves(state):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if isinstance(mesh, Mesh):
            return mesh
    return None
