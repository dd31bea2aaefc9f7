"""The jitted, sharded train step: ``L = CE + lambda * L_con (+ mu * L_balance)``, AdamW, accumulation.

Gradients are taken for adapter and router parameters only; the frozen base is an
argument of the step (never a compile-time constant) and gets no gradient and no
optimizer state. Micro-batches are accumulated with ``lax.scan`` inside the step,
with every term normalised by the whole batch's token counts, so accumulating A
micro-batches gives the gradient of one A-times larger batch. On a data-parallel mesh the
devices' gradients are added by XLA's all-reduce or, with ``mesh.reduction=exact``, per device
inside ``shard_map`` and added in device order (the same bits on any process layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from comoe_jax import ops
from comoe_jax import sharding as shd
from comoe_jax.adapters import AdapterStat, ForwardContext
from comoe_jax.config import Config
from comoe_jax.data import BATCH_ARRAYS
from comoe_jax.model import flat_axes, flat_values, state_from_flat


class TrainState(flax.struct.PyTreeNode):
    """Everything a checkpoint holds: step, adapter params, optimizer state, PRNG key data, skip counts."""

    step: jax.Array  # optimizer steps taken (batches consumed), skipped ones included
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data (jax.random.key_data), checkpoint-friendly
    skipped: jax.Array  # consecutive non-finite steps up to now (0 after a good step)
    skipped_total: jax.Array  # non-finite steps in the whole run


SCHEDULE_KEYS = ("peak", "alpha", "warmup", "decay")


def schedule_values(cfg: Config) -> dict[str, np.float32]:
    """The learning-rate schedule's numbers (``warmup_cosine``'s ``values``), float32 scalars.

    A run shorter than its warm-up warms up over all but its last step (so a 1-step smoke run
    trains at the peak rate instead of failing).
    """
    o, steps = cfg.optim, cfg.train.steps
    warmup = max(min(o.warmup_steps, steps - 1), 0)
    values = (o.learning_rate, o.end_lr_ratio, warmup, max(steps, 1) - warmup)
    return {k: np.float32(v) for k, v in zip(SCHEDULE_KEYS, values)}


def warmup_cosine(count: jax.Array, values: dict[str, jax.Array]) -> jax.Array:
    """``optax.warmup_cosine_decay_schedule(0, peak, warmup, warmup + decay, alpha * peak)(count)`` (its formula,
    equal to float32 rounding), with the numbers as arguments instead of constants.

    Passed to the jitted step, they keep ``train.steps``, ``optim.learning_rate``, ``optim.warmup_steps`` and
    ``optim.end_lr_ratio`` out of the compiled program: a learning-rate sweep, a resume with more steps or a
    test suite compiles the step once (the persistent compilation cache then hits).
    """
    peak, alpha, warmup, decay = values["peak"], values["alpha"], values["warmup"], values["decay"]
    warm_count = jnp.clip(count, 0, warmup)
    warm = (0.0 - peak) * (1 - warm_count / jnp.maximum(warmup, 1)) + peak
    cool_count = jnp.minimum(count - warmup, decay)
    cosine = 0.5 * (1 + jnp.cos(jnp.pi * cool_count / decay))
    cool = peak * ((1 - alpha) * cosine + alpha)
    return jnp.where(count < warmup, warm, cool)


def optimizer(cfg: Config, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """AdamW at ``learning_rate`` (a number or a schedule of optax's update count), after global-norm clipping.

    The optimizer state's layout does not depend on ``learning_rate``.
    """
    o = cfg.optim
    adamw = optax.adamw(learning_rate, b1=o.b1, b2=o.b2, eps=o.adam_eps, weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.max_grad_norm), adamw) if o.max_grad_norm > 0 else adamw


def make_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up and cosine decay, after global-norm clipping, and its schedule, with the
    schedule's numbers as constants (the train step passes them as arguments instead)."""
    values = schedule_values(cfg)
    schedule = lambda count: warmup_cosine(count, values)  # noqa: E731
    return optimizer(cfg, schedule), schedule


@dataclass
class TrainStep:
    """A compiled-on-first-use train step for one model structure, optimizer and mesh.

    ``step(state, frozen, batch) -> (state, metrics)``; ``batch`` arrays are
    ``[grad_accum_steps, batch_size, T]``, sharded over the mesh's batch axes. The learning-rate
    schedule's numbers are a runtime argument (``schedule_values``), not part of the compiled step.
    """

    cfg: Config
    graphdef: nnx.GraphDef
    adapters_template: nnx.State
    frozen_template: nnx.State
    mesh: Mesh
    rules: dict

    def __post_init__(self):
        self.tx, _ = make_optimizer(self.cfg)  # init and state layout (the step builds its own, same layout)
        self.param_shardings = self._shardings(self.adapters_template, spread="fsdp")  # ZeRO: never whole
        self.frozen_shardings = self._shardings(self.frozen_template)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        abstract = jax.eval_shape(self.tx.init, self._abstract(self.adapters_template))
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, abstract, self.param_shardings,
            transform_non_params=lambda _: self.replicated, is_leaf=lambda x: isinstance(x, NamedSharding))
        self.state_shardings = TrainState(step=self.replicated, params=self.param_shardings,
                                          opt_state=opt_shardings, rng=self.replicated, skipped=self.replicated,
                                          skipped_total=self.replicated)
        self.batch_shardings = {k: shd.batch_sharding(self.mesh, self.rules, 3, batch_axis=1) for k in BATCH_ARRAYS}
        self.jitted = jax.jit(self._step, in_shardings=(self.state_shardings, self.frozen_shardings,
                                                        self.batch_shardings, self.replicated),
                              out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))

    # ------------------------------------------------------------------ set-up helpers

    @cached_property
    def schedule(self) -> dict[str, jax.Array]:
        """``schedule_values`` on the mesh, replicated (a jit output: a global array on several processes too)."""
        return jax.jit(lambda: schedule_values(self.cfg), out_shardings=self.replicated)()

    def _shardings(self, template: nnx.State, spread: str | None = None) -> dict:
        shapes = {k: v.shape for k, v in flat_values(template).items()}
        return {k: shd.named_sharding(axes, shapes[k], self.rules, self.mesh, spread)
                for k, axes in flat_axes(template).items()}

    @staticmethod
    def _abstract(template: nnx.State) -> dict:
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat_values(template).items()}

    def init_state(self, params: dict) -> TrainState:
        """Fresh optimizer state for ``params`` (flat adapter dict), placed on the mesh."""
        def init(params):
            rng = jax.random.key_data(jax.random.key(self.cfg.train.seed))
            zero = jnp.zeros((), jnp.int32)
            return TrainState(step=zero, params=params, opt_state=self.tx.init(params), rng=rng, skipped=zero,
                              skipped_total=zero)

        params = jax.device_put(params, self.param_shardings)  # the model holds them as its logical axes say
        return jax.jit(init, in_shardings=(self.param_shardings,), out_shardings=self.state_shardings)(params)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs (with shardings) of the train state, for AOT compilation and restores."""
        shapes = jax.eval_shape(self.init_state, self._abstract(self.adapters_template))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_shardings)

    def abstract_inputs(self, seq_len: int):
        """(state, frozen, batch, schedule) ShapeDtypeStructs for ``self.jitted.lower(...)``."""
        frozen = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.frozen_shardings[k])
                  for k, v in flat_values(self.frozen_template).items()}
        shape = (self.cfg.optim.grad_accum_steps, self.cfg.train.batch_size, seq_len)
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s) for k, s in self.batch_shardings.items()}
        schedule = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=self.replicated) for k in SCHEDULE_KEYS}
        return self.abstract_state(), frozen, batch, schedule

    # ------------------------------------------------------------------ the step

    @property
    def head_positions(self) -> int:
        """Slots per row the LM head runs at (``train.head_positions``; the row length: every position)."""
        t, seq_len = self.cfg.train.head_positions, self.cfg.data.seq_len
        slots = -(-(seq_len // 4) // 8) * 8 if t == 0 else seq_len if t == -1 else t
        return min(max(slots, 1), seq_len)

    def cross_entropy(self, model, hidden: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
        """Summed CE over the supervised positions. The head runs at ``head_positions`` gathered slots per
        row (most tokens are prompt); a batch with a longer response falls back to every position."""
        def summed(h, t, m):
            return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(model.head(h), t) * m)

        slots = self.head_positions
        if slots >= hidden.shape[1]:
            return summed(hidden, targets, loss_mask)

        def gathered(h):
            order = jnp.argsort(-loss_mask, axis=1, stable=True)[:, :slots]  # supervised positions first
            take = lambda v: jnp.take_along_axis(v, order.reshape(order.shape + (1,) * (v.ndim - 2)), axis=1)  # noqa: E731
            return summed(take(h), take(targets), take(loss_mask))

        fits = jnp.max(jnp.sum(loss_mask, axis=1)) <= slots
        # Both branches rematerialised: a differentiated cond keeps the residuals of both, the untaken
        # one filled with zeros every step ([B, T, V] for the fallback); recomputing the gathered head in
        # the backward pass also measured faster on a CPU than carrying its [B, slots, V] out of the cond.
        remat = lambda f: jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)  # noqa: E731
        return jax.lax.cond(fits, remat(gathered), remat(lambda h: summed(h, targets, loss_mask)), hidden)

    def loss(self, params: dict, frozen: dict, batch: dict, key, counts: dict, rows: jax.Array | None = None):
        """Loss of one micro-batch (normalised by whole-batch counts) and its metrics; ``rows``: the global
        indices of the batch's rows when this is one device's share (:meth:`exact_gradients`)."""
        lo = self.cfg.loss
        model = nnx.merge(self.graphdef, state_from_flat(self.adapters_template, params),
                          state_from_flat(self.frozen_template, frozen))
        shard_axes = self.exact_axes if rows is not None else None
        ctx = ForwardContext(token_mask=batch["attention_mask"].astype(jnp.float32),
                             token_count=counts["tokens"], key=key, row_ids=rows, shard_axes=shard_axes)
        (hidden, _), stats = nnx.capture(model.hidden, AdapterStat)(
            batch["input_ids"], batch["attention_mask"], batch["positions"], ctx=ctx, segment_ids=batch["segment_ids"])
        ce = self.cross_entropy(model, hidden, batch["targets"], batch["loss_mask"].astype(jnp.float32))
        ce = ce / counts["response"]
        metrics = {"ce": ce, "response_tokens": jnp.sum(batch["loss_mask"]).astype(jnp.float32),
                   "tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32)}
        loss = ce
        spec = model.placement.spec if model.placement is not None else None
        if spec is not None and spec.num_experts > 1:  # routed adapters sow their statistics
            if spec.contrastive:
                contrastive = jnp.mean(model.stat(stats, "contrastive"))
                metrics |= {"contrastive": contrastive, "mi_gap": jnp.mean(model.stat(stats, "mi_gap"))}
                loss = loss + lo.contrastive_weight * contrastive
            # a per-micro-batch mean: average them
            balance = jnp.mean(self._load_balance(model, stats, shard_axes)) / self.cfg.optim.grad_accum_steps
            metrics["load_balance"] = balance
            if lo.load_balance_weight > 0:
                loss = loss + lo.load_balance_weight * balance
            metrics["expert_load"] = model.stat(stats, "load")  # [modules, n]
        metrics["loss"] = loss
        return loss, metrics

    @staticmethod
    def _load_balance(model, stats, shard_axes) -> jax.Array:
        """Each adapted module's load-balance loss ``[modules]`` over the whole micro-batch. On one device's
        share (``shard_axes``) its token sums are first added over the devices, and the loss, the same on
        every device, enters each device's loss as 1 / S of it (so the devices' losses add up to it)."""
        if shard_axes is None:
            return model.stat(stats, "load_balance")
        sums = shd.shared_sum(model.stat(stats, "balance_sums"), shard_axes)
        return jax.vmap(ops.load_balance_from_sums)(sums) / jax.lax.axis_size(shard_axes)

    @staticmethod
    def counts(batch: dict) -> dict:
        """The whole batch's real and response tokens (every micro-batch's loss is normalised by them)."""
        return {"tokens": jnp.maximum(jnp.sum(batch["attention_mask"]), 1).astype(jnp.float32),
                "response": jnp.maximum(jnp.sum(batch["loss_mask"]), 1).astype(jnp.float32)}

    def gradients(self, params: dict, frozen: dict, batch: dict, key, counts: dict | None = None,
                  rows: jax.Array | None = None) -> tuple[dict, dict]:
        """Gradients and summed metrics of the batch (micro-batches accumulated by ``lax.scan``); ``counts``:
        the whole batch's (default: this batch's), ``rows``: as for :meth:`loss`."""
        counts = self.counts(batch) if counts is None else counts
        micro_keys = jax.random.split(key, self.cfg.optim.grad_accum_steps)
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        if self.cfg.optim.grad_accum_steps == 1:  # no zero-filled accumulator: one pass less over the gradients
            only = jax.tree.map(lambda v: v[0], batch)
            (_, metrics), grads = grad_fn(params, frozen, only, micro_keys[0], counts, rows)
            return grads, metrics

        def micro(grads, xs):
            mb, k = xs
            (_, metrics), g = grad_fn(params, frozen, mb, k, counts, rows)
            return jax.tree.map(jnp.add, grads, g), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, metrics = jax.lax.scan(micro, zeros, (batch, micro_keys))
        return grads, jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)

    @cached_property
    def exact_axes(self) -> tuple[str, ...] | None:
        """The mesh axes the batch is split over when gradients are added in device order
        (``mesh.reduction``), None when XLA's collectives add them."""
        exact = shd.exact_reduction(self.cfg.mesh.reduction, self.mesh)  # refuses 'exact' with sharded weights
        axes = tuple(a for a in self.rules.get("batch", ()) if self.mesh.shape[a] > 1)
        return axes if axes and exact else None

    def exact_gradients(self, params: dict, frozen: dict, batch: dict, key) -> tuple[dict, dict]:
        """:meth:`gradients` with each device taking its rows' gradients and the devices' gradients added
        in device order (:func:`sharding.ordered_sum`): the same bits on any process layout."""
        axes = self.exact_axes

        def per_device(params, frozen, batch, key, counts):
            size = batch["input_ids"].shape[1]
            rows = jax.lax.axis_index(axes) * size + jnp.arange(size, dtype=jnp.int32)
            grads, metrics = self.gradients(params, frozen, batch, key, counts, rows)
            return shd.ordered_sum((grads, metrics), axes)  # the logged values too: the same bits everywhere

        row_spec = PartitionSpec(None, axes)
        return jax.shard_map(per_device, mesh=self.mesh, in_specs=(PartitionSpec(), PartitionSpec(),
                                                                    {k: row_spec for k in batch}, PartitionSpec(),
                                                                    PartitionSpec()),
                             out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)(
            params, frozen, batch, key, self.counts(batch))

    def batch_gradients(self, state: TrainState, frozen: dict, batch: dict, key) -> tuple[dict, dict]:
        """The whole batch's gradients and metrics, added over the devices as ``mesh.reduction`` says."""
        if self.exact_axes:
            return self.exact_gradients(state.params, frozen, batch, key)
        with shd.activation_rules(self.mesh, self.rules):
            return self.gradients(state.params, frozen, batch, key)

    def _step(self, state: TrainState, frozen: dict, batch: dict, schedule: dict):
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        grads, metrics = self.batch_gradients(state, frozen, batch, step_key)
        grad_norm = optax.tree.norm(grads)
        # The norm is non-finite exactly when a gradient is, or when their squares overflow float32 (a
        # step better skipped too: clipping would zero it, and unclipped it would put inf in Adam's second
        # moment for good). One pass over the gradients instead of two.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        # A non-finite loss or gradient leaves parameters and optimizer state as they were. A cond, not
        # a select over the whole state: the update then runs in place on the donated buffers (a select
        # kept old and new state alive, about 0.25 s a step for n = 64's 122 M adapter parameters on a CPU).
        learning_rate = lambda count: warmup_cosine(count, schedule)  # noqa: E731
        update = partial(self._update, optimizer(self.cfg, learning_rate))
        params, opt_state = jax.lax.cond(finite, update, lambda g, p, o: (p, o),
                                         grads, state.params, state.opt_state)
        skipped = jnp.where(finite, 0, state.skipped + 1)
        metrics |= {"grad_norm": grad_norm, "skipped": skipped,
                    "learning_rate": learning_rate(state.step - state.skipped_total)}  # = optax's count
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(key),
                         skipped=skipped, skipped_total=state.skipped_total + (1 - finite.astype(jnp.int32)))
        return new, metrics

    @staticmethod
    def _update(tx: optax.GradientTransformation, grads: dict, params: dict,
                opt_state: optax.OptState) -> tuple[dict, optax.OptState]:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def __call__(self, state: TrainState, frozen: dict, batch: dict):
        return self.jitted(state, frozen, batch, self.schedule)
