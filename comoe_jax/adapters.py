"""Frozen linear layers and the mixture-of-LoRA-experts adapter (thin Flax NNX wrappers over ``ops``).

``y = W0 x + (alpha / r) * sum_i g_i(x) E_i(dropout(x))`` with top-k router weights
``g``; B starts at zero so the adapted model equals the base model at step 0.
Every method of ``adapter.method`` is this one layer: plain LoRA has one expert and no
router; soft routing (moe-soft, omoe) weights every expert by the softmax; OMoE mixes
Gram-Schmidt-orthogonalised expert outputs; DoRA experts (dora, comoe-dora) rescale
each output unit by ``m_i / ||W0 + s B_i A_i||`` as peft's DoRA does.

Layers return plain arrays. Given a :class:`ForwardContext`, an adapter also sows its
statistics: :class:`AdapterStat` (the loss terms and the expert load, read by the train step)
and :class:`RoutingTrace` (per-token routing, read by the analyses). Run the model under
``nnx.capture(model.forward, AdapterStat)`` to collect them (``CausalLM.stat`` reads them per
module); outside a capture nothing is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from comoe_jax import ops
from comoe_jax import sharding as shd
from comoe_jax.constants import DORA_METHODS, SOFT_ROUTED_METHODS, SPARSE_FROM_EXPERTS


class Frozen(nnx.Variable):
    """A base-model weight: never trained, no optimizer state, not in checkpoints."""


@dataclass(frozen=True)
class MoESpec:
    """Static settings of every adapter in a model (from ``adapter.*`` and ``loss.*``)."""

    num_experts: int = 4
    top_k: int = 2
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    router_init_std: float = 0.02
    contrastive: bool = True  # compute the term
    contrastive_grad: bool = True  # False: monitored only (weight 0)
    temperature: float = 0.07
    eps: float = 1e-3
    anchor: str = "random"
    num_negatives: int = 0
    form: str = "gram"
    routing: str = "topk"  # "topk" | "soft" (every expert weighted; the top k count as activated)
    dora: bool = False
    orthogonal: bool = False  # OMoE: Gram-Schmidt-orthogonalised expert outputs
    experts: str = "dense"  # "dense": every expert for every token | "sparse": only the selected ones

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def negatives_per_anchor(self) -> int:
        return self.num_negatives or self.num_experts - self.top_k

    @classmethod
    def from_sections(cls, a, lo) -> MoESpec:
        """From the ``adapter`` (``AdapterConfig``) and ``loss`` (``LossConfig``) config sections."""
        routed = a.num_experts > 1
        return cls(
            num_experts=a.num_experts, top_k=a.top_k if routed else 1, rank=a.rank, alpha=a.alpha,
            dropout=a.dropout, router_init_std=a.router_init_std,
            contrastive=routed and (lo.contrastive_weight > 0 or lo.monitor_contrastive),
            contrastive_grad=lo.contrastive_weight > 0, temperature=lo.temperature, eps=lo.eps,
            anchor=lo.anchor, num_negatives=lo.num_negatives, form=lo.form,
            routing="soft" if a.method in SOFT_ROUTED_METHODS else "topk", dora=a.method in DORA_METHODS,
            orthogonal=a.method == "omoe", experts=resolve_experts(a, lo),
        )


def resolve_experts(a, lo) -> str:
    """``adapter.experts`` with ``auto`` resolved: sparse for top-k routing from ``SPARSE_FROM_EXPERTS``
    experts on, unless the contrastive term reads every expert anyway (all inactive ones as negatives)."""
    if a.experts != "auto":
        return a.experts
    top_k_routed = a.num_experts > 1 and a.method not in SOFT_ROUTED_METHODS
    term_reads_all = (lo.contrastive_weight > 0 or lo.monitor_contrastive) and not lo.num_negatives
    return "sparse" if top_k_routed and a.num_experts >= SPARSE_FROM_EXPERTS and not term_reads_all else "dense"


@flax.struct.dataclass
class ForwardContext:
    """What a training (or analysis) forward pass tells the adapters.

    token_mask: ``[B, T]`` float32, 1 for real tokens, 0 for padding.
    token_count: scalar, real tokens in the whole optimizer batch (all micro-batches),
      so per-module sums of ``token_mask * value / token_count`` add up to batch means.
    key: PRNG key for dropout and anchor / negative sampling; None = deterministic.
    row_ids: ``[B]`` int32, each row's index in the whole (global) batch; None = ``0 .. B-1``. Random
      draws are made per row from ``fold_in(key, row_id)``, so they do not depend on how the batch is
      split over devices and processes (a device that holds rows 4..7 draws what one device holding
      every row draws for them).
    shard_axes: mesh axes the batch is split over when the forward pass runs per device inside
      ``shard_map`` (the exact reduction of :mod:`comoe_jax.step`): the load-balance loss, not a sum
      over tokens, is then sown as its token sums for the step to add over the devices. None = the
      whole batch is here.
    """

    token_mask: jax.Array
    token_count: jax.Array
    key: jax.Array | None = None
    row_ids: jax.Array | None = None
    shard_axes: tuple[str, ...] | None = flax.struct.field(pytree_node=False, default=None)

    def row_keys(self, index: int, streams: int) -> list[jax.Array]:
        """``streams`` independent ``[B]`` key arrays for module ``index``, one key per row."""
        rows = self.row_ids if self.row_ids is not None else jnp.arange(self.token_mask.shape[0])
        module = jax.random.fold_in(self.key, index)
        keys = jax.vmap(lambda r: jax.random.split(jax.random.fold_in(module, r), streams))(rows)  # [B, streams]
        return [keys[:, i] for i in range(streams)]


class AdapterStat(nnx.Intermediate):
    """Training statistics an adapter sows, per module (sums over real tokens / ``token_count``):
    ``contrastive`` and ``mi_gap`` (scalars, when the term is on), ``load`` ``[n]`` (share of
    routing slots per expert) and ``load_balance`` (scalar; per device, ``balance_sums`` ``[2n + 1]``,
    see :attr:`ForwardContext.shard_axes`)."""


class RoutingTrace(nnx.Intermediate):
    """Per-token routing an adapter sows for the analyses: ``topk [..., k]``, ``router_entropy [...]``
    (nats) and the experts' rank-r codes ``codes [..., n, r]``."""


def _replace(previous, value):
    """``sow`` reduction: one value per module and forward pass (not a tuple of calls)."""
    return value


def captured_types(module: nnx.Module) -> tuple[type, ...]:
    """Variable types an enclosing ``nnx.capture`` records for ``module`` (empty outside one).

    Flax keeps them in ``module.__captures__`` while a capture runs; the scanned layer stacks
    use this to capture the same types inside their ``lax.scan`` body.
    """
    return tuple(type(v) for v in getattr(module, "__captures__", ()))


class Linear(nnx.Module):
    """Frozen ``y = x W0 (+ b)``; ``W0`` is ``[d_in, d_out]`` with logical ``axes``."""

    def __init__(self, d_in: int, d_out: int, *, axes: tuple, use_bias: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = jax.nn.initializers.lecun_normal()  # only random test models keep it; loaders overwrite it
        self.kernel = Frozen(init(rngs.params(), (d_in, d_out), param_dtype), axes=axes)
        self.bias = Frozen(jnp.zeros((d_out,), param_dtype), axes=axes[1:]) if use_bias else None
        self.dtype = dtype

    def project(self, x: jax.Array) -> jax.Array:
        """``x W0`` without the bias."""
        return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)

    def base(self, x: jax.Array) -> jax.Array:
        y = self.project(x)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)

    def __call__(self, x: jax.Array, ctx: ForwardContext | None = None) -> jax.Array:
        """``x [..., d_in] -> [..., d_out]``."""
        return self.base(x)


class MoLoRALinear(Linear):
    """A frozen linear layer with n LoRA experts and a float32 top-k router.

    Params: ``lora_a [n, d_in, r]`` (LoRA's Kaiming-uniform init), ``lora_b [n, r, d_out]``
    (zeros), ``router [d_in, n]`` (float32, absent when n = 1), and for DoRA experts
    ``magnitude [n, d_out]`` (the column norms of W0; set by the loader once W0 is known).
    ``index`` makes each module's random draws distinct.
    """

    def __init__(self, d_in: int, d_out: int, *, axes: tuple, spec: MoESpec, index: int, use_bias: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(d_in, d_out, axes=axes, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        n, r = spec.num_experts, spec.rank
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(rngs.params(), (n, d_in, r), jnp.float32, -bound, bound)
        self.lora_a = nnx.Param(a, axes=("expert", axes[0], "rank"))
        self.lora_b = nnx.Param(jnp.zeros((n, r, d_out), jnp.float32), axes=("expert", "rank", axes[1]))
        router = spec.router_init_std * jax.random.normal(rngs.params(), (d_in, n), jnp.float32)
        self.router = nnx.Param(router, axes=(axes[0], "expert")) if n > 1 else None
        if spec.dora:
            norm = jnp.linalg.norm(self.kernel[...].astype(jnp.float32), axis=0)
            self.magnitude = nnx.Param(jnp.broadcast_to(norm, (n, d_out)), axes=("expert", axes[1]))
        else:
            self.magnitude = None
        self.spec = spec
        self.index = index

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Router probabilities ``[..., n]``, mixing weights ``[..., n]`` and activated experts ``[..., k]``."""
        logits = x.astype(jnp.float32) @ self.router[...]
        route = ops.soft_route if self.spec.routing == "soft" else ops.topk_route
        weights, topk = route(logits, self.spec.top_k)
        return ops.router_probs(logits), weights, topk

    def effective_b(self) -> tuple[jax.Array, jax.Array | None]:
        """float32 ``B [n, r, d_out]`` with DoRA's per-unit scale folded in, and that scale ``[n, d_out]``.

        A DoRA expert's update is ``c_i * (s B_i A_i x)`` with ``c_i = m_i / ||W0 + s B_i A_i||``,
        i.e. a LoRA expert with ``B_i`` scaled column-wise; ``c`` is None for LoRA experts.
        """
        b = self.lora_b[...]
        if not self.spec.dora:
            return b, None
        c = ops.dora_column_scale(self.kernel[...], self.lora_a[...], b, self.spec.scaling, self.magnitude[...])
        return b * c[:, None, :], c

    def __call__(self, x: jax.Array, ctx: ForwardContext | None = None) -> jax.Array:
        """``x [..., d_in] -> y [..., d_out]``; with ``ctx`` and n > 1 the statistics are sown too."""
        spec = self.spec
        keys = [None] * 3
        if ctx is not None and ctx.key is not None:
            keys = ctx.row_keys(self.index, 3)
        dropped = keys[0] is not None and spec.dropout > 0
        x_in = jax.vmap(ops.dropout, in_axes=(0, None, 0))(x, spec.dropout, keys[0]) if dropped else x
        b, c = self.effective_b()
        w0x = self.project(x)
        y = w0x if self.bias is None else w0x + self.bias[...].astype(self.dtype)
        if self.router is None:
            h = ops.expert_hidden(x_in.astype(self.dtype), self.lora_a[...].astype(self.dtype))  # [..., 1, r]
            weights = jnp.ones(h.shape[:-1], jnp.float32)
            update = ops.mix_experts(h, weights, b.astype(self.dtype))
        else:
            probs, weights, topk = self.route(x)
            sow = ctx is not None and bool(captured_types(self))
            mix = self._sparse if spec.experts == "sparse" else self._dense
            update, weights = mix(x_in, b, weights, topk, probs, keys, ctx if sow else None)
        y = y + spec.scaling * update
        if c is not None:  # DoRA rescales the (dropped-out) base output too: sum_i g_i (c_i - 1) * W0 x
            base_in = self.project(x_in) if dropped else w0x
            y = y + (weights @ (c - 1.0)).astype(self.dtype) * base_in
        return y

    def _dense(self, x_in, b, weights, topk, probs, keys, ctx):
        """Every expert's rank-r codes; the mixture ``sum_i g_i B_i h_i`` as one matmul. -> (update, weights)."""
        spec = self.spec
        h = ops.expert_hidden(x_in.astype(self.dtype), self.lora_a[...].astype(self.dtype))  # [..., n, r]
        gram = ops.gram_matrix(b) if spec.orthogonal or spec.contrastive else None
        if spec.orthogonal:
            weights = ops.gram_schmidt_weights(h, gram, weights)
        if ctx is not None:
            term = None
            if spec.contrastive and AdapterStat in captured_types(self):
                term = self._contrastive(x_in, h, topk, keys, b, gram)
            self._sow_statistics(ctx, h, probs, topk, term)
        return ops.mix_experts(h, weights, b.astype(self.dtype)), weights

    def _sparse(self, x_in, b, weights, topk, probs, keys, ctx):
        """Only the k activated experts (and, for the contrastive term, the token's negatives), computed
        on rows grouped by expert (:func:`ops.selected_expert_outputs`). -> (update, weights)."""
        spec = self.spec
        term_on = ctx is not None and spec.contrastive and AdapterStat in captured_types(self)
        selected = jnp.concatenate([topk, self._negatives(topk, keys[2])], axis=-1) if term_on else topk
        # One dispatch per batch shard: all of a device's tokens are grouped together, never across devices.
        lead, groups = x_in.shape[:-1], shd.active_batch_shards(x_in.shape[0])
        grouped = shd.constrain(x_in.reshape(groups, -1, x_in.shape[-1]), ("batch", None, None))
        _, outputs = ops.selected_expert_outputs(grouped.astype(self.dtype), self.lora_a[...].astype(self.dtype),
                                                 b.astype(self.dtype), selected.reshape(groups, -1, selected.shape[-1]))
        outputs = outputs.reshape(*lead, *outputs.shape[-2:])  # [..., k (+ m), d_out]
        gates = jnp.take_along_axis(weights, topk, axis=-1).astype(self.dtype)  # [..., k]
        update = jnp.einsum("...k,...ko->...o", gates, outputs[..., : spec.top_k, :])
        if ctx is not None:
            term = None
            if term_on:
                e = outputs if spec.contrastive_grad else jax.lax.stop_gradient(outputs)
                term = ops.contrastive_loss_selected(e, spec.top_k, self._anchor_slot(topk, keys[1]),
                                                     temperature=spec.temperature, eps=spec.eps)
            h = None
            if RoutingTrace in captured_types(self):  # the analyses read every expert's codes
                h = ops.expert_hidden(x_in.astype(self.dtype), self.lora_a[...].astype(self.dtype))
            self._sow_statistics(ctx, h, probs, topk, term)
        return update, weights

    def _anchor_slot(self, topk, key) -> jax.Array | None:
        """Algorithm 1's random anchor slot ``[...]``; deterministic evaluation: the top-1 expert (slot 0);
        None for every anchor (Eq. 12)."""
        if self.spec.anchor == "all":
            return None
        if key is None:
            return jnp.zeros(topk.shape[:-1], jnp.int32)
        return jax.vmap(ops.sample_anchor_slot, in_axes=(0, None, None))(key, topk.shape[1:-1], self.spec.top_k)

    def _negatives(self, topk, key) -> jax.Array:
        """Each token's negatives ``[..., m]``: ``loss.num_negatives`` sampled inactive experts (a fixed key
        when deterministic), or every inactive expert."""
        spec = self.spec
        if not spec.num_negatives:
            return ops.inactive_experts(topk, spec.num_experts)
        if key is None:  # one fixed draw for the whole batch
            return ops.sample_negatives(jax.random.key(self.index), topk, spec.num_experts, spec.num_negatives)
        return jax.vmap(ops.sample_negatives, in_axes=(0, 0, None, None))(key, topk, spec.num_experts,
                                                                          spec.num_negatives)

    def _sow_statistics(self, ctx, h, probs, topk, term) -> None:
        """Sow :class:`AdapterStat` (sums over real tokens / ``ctx.token_count``; ``term``: the per-token
        contrastive loss or None) and :class:`RoutingTrace` (``h``: every expert's codes), each only when
        an enclosing ``nnx.capture`` collects it."""
        spec, kinds = self.spec, captured_types(self)
        values = {}
        if AdapterStat in kinds:
            w = ctx.token_mask / ctx.token_count
            active = ops.active_mask(topk, spec.num_experts).astype(jnp.float32)
            stats = {"load": jnp.einsum("bt,btn->n", w, active) / spec.top_k}
            if ctx.shard_axes is None:
                stats["load_balance"] = ops.load_balance_loss(probs, topk, ctx.token_mask)
            else:  # this device's token sums; the step adds them over the devices and forms the loss
                stats["balance_sums"] = ops.load_balance_sums(probs, topk, ctx.token_mask)
            if term is not None:
                anchors = spec.top_k if spec.anchor == "all" else 1
                stats["contrastive"] = jnp.sum(w * term)
                stats["mi_gap"] = jnp.sum(w * ops.mi_gap_estimate(term / anchors, spec.negatives_per_anchor))
            values[AdapterStat] = stats
        if RoutingTrace in kinds:
            values[RoutingTrace] = {"topk": topk, "codes": h.astype(jnp.float32),
                                    "router_entropy": -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)}
        for kind, named in values.items():
            for name, value in named.items():
                self.sow(kind, name, value, reduce_fn=_replace, init_fn=lambda: None)

    def _contrastive(self, x_in, h, topk, keys, b, gram) -> jax.Array:
        """Per-token contrastive loss ``[B, T]`` of the dense path, in the configured form and anchor mode.

        The expert representations are the experts' updates ``B_i A_i x`` (DoRA: with the
        magnitude scale folded into ``b``).
        """
        spec = self.spec
        a = self.lora_a[...]
        if not spec.contrastive_grad:
            x_in, h, a, b, gram = (jax.lax.stop_gradient(v) for v in (x_in, h, a, b, gram))
        anchor_key, negative_key = keys[1:]
        slot = self._anchor_slot(topk, anchor_key)
        negatives = self._negatives(topk, negative_key) if spec.num_negatives else None
        kw = dict(temperature=spec.temperature, eps=spec.eps, negative_indices=negatives)
        if spec.form == "reference":
            e = ops.expert_outputs(x_in.astype(jnp.float32), a, b)
            if spec.anchor == "all":
                return ops.contrastive_loss_all_anchors(e, topk, **kw)
            return ops.contrastive_loss(e, topk, slot, **kw)
        if spec.anchor == "all":
            return ops.contrastive_loss_gram_all_anchors(h, gram, topk, **kw)
        return ops.contrastive_loss_gram(h, gram, topk, slot, **kw)
