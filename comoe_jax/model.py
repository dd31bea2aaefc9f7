"""Flax NNX decoder for the Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/2/3 and OLMo 2/3 families, with mixture-of-LoRA
adapters.

Llama: RMSNorm, RoPE (every transformers rope_type), grouped-query attention, SwiGLU,
tied or untied embeddings, causal + padding mask; SmolLM3 leaves RoPE out of some layers
(``spec.nope_layers``); Granite scales embeddings, block outputs and logits. Mistral adds a
sliding window on every layer, Qwen2 biases on q/k/v (not o), Qwen3 RMSNorm on queries and keys
(``spec.qkv_bias``, ``spec.qk_norm``, ``spec.sliding_layers``); Phi-3 is Mistral with part of each head
rotated (its fused checkpoint tensors are split on load). OLMo 2 / 3 norm only each block's
output, and the whole query and key projections. Gemma (``spec.family``) has norms scaled by
``1 + w``, embeddings scaled by ``sqrt(hidden)`` and GeGLU; Gemma 2 adds norms after
attention and MLP as well as before, soft-capped attention scores and logits, and a sliding
window on every other layer; Gemma 3 adds RMSNorm on queries and keys and its own RoPE on the
sliding-window layers. Frozen weights are ``Frozen`` variables, adapters and routers ``nnx.Param``.

Decoder layers live in stacks (``layers.<g>.layer.*``, leading axis = layer) that
the forward pass scans over. Per-layer names follow Hugging Face
(``layers.3.self_attn.q_proj.kernel`` is ``model.layers.3.self_attn.q_proj.weight``
transposed); :func:`unstack` / :func:`stack` convert between the two, so loaders
and adapter exports use per-layer names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial, reduce
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from comoe_jax.adapters import ForwardContext, Frozen, Linear, MoESpec, MoLoRALinear, _replace, captured_types
from comoe_jax.rope import RopeSpec, apply_rope, rope_cos_sin
from comoe_jax.sharding import constrain

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
               "gelu": partial(jax.nn.gelu, approximate=False)}


@dataclass(frozen=True)
class DecoderSpec:
    """Architecture hyper-parameters (``architectures.decoder_spec`` reads them from a transformers config)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    family: str = "llama"  # "llama" | "mistral" | "qwen2" | "qwen3" | "gemma" | "gemma2" | "gemma3" | "olmo2" | "phi3"
    hidden_act: str = "silu"
    query_scale: float | None = None  # attention logit scale; None: head_dim ** -0.5
    sliding_window: int | None = None  # local layers see keys at distance < sliding_window
    sliding_layers: tuple[bool, ...] = ()  # per layer: local (sliding-window) attention
    nope_layers: tuple[bool, ...] = ()  # per layer: no RoPE on queries and keys (SmolLM3's NoPE layers)
    embedding_multiplier: float = 1.0  # Granite: embeddings times this
    residual_multiplier: float = 1.0  # Granite: each block's output times this before it joins the residual
    logits_scaling: float = 1.0  # Granite: logits divided by this
    local_rope: RopeSpec | None = None  # RoPE of the local layers
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap): Gemma 2 / 3
    attn_logit_softcap: float | None = None  # the same on attention scores, before the mask: Gemma 2
    qkv_bias: bool = False  # biases on q/k/v even without attention_bias (which biases all four): Qwen2
    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head before RoPE: Qwen3 (Gemma 3 always)
    # (OLMo 2 / 3 instead norm the whole query and key projections, over all heads at once)

    @property
    def gemma(self) -> bool:
        """Norms scaled by ``1 + w`` and embeddings by ``sqrt(hidden)``."""
        return self.family in ("gemma", "gemma2", "gemma3")

    @property
    def norm_style(self) -> str:
        """How RMSNorm scales and rounds (:class:`RMSNorm`)."""
        return "gemma" if self.gemma else "olmo" if self.family == "olmo2" else "llama"

    @property
    def reencode_at(self) -> int | None:
        """Phi-3 with longrope: transformers' generate encodes the whole sequence again once it grows past
        ``original_max_position_embeddings`` (so every cached key takes the long factors); the length, or None."""
        if self.family == "phi3" and self.rope.rope_type == "longrope":
            return int(self.rope.get("original_max_position_embeddings"))
        return None

    @property
    def norms(self) -> str:
        """Where each layer norms: 'pre' (before attention and MLP: Llama), 'sandwich' (before and after:
        Gemma 2 / 3) or 'post' (after only: OLMo 2 / 3)."""
        return {"gemma2": "sandwich", "gemma3": "sandwich", "olmo2": "post"}.get(self.family, "pre")


@dataclass(frozen=True)
class AdapterPlacement:
    """Which projections of which layers carry adapters, and their settings."""

    spec: MoESpec
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    cache: tuple | None = None  # per layer stack (k, v) [layers, B, S, K, hd], when decoding with a KV cache


class _Builder:
    """Makes the projections of one decoder layer, numbering its adapters in construction order."""

    def __init__(self, placement, adapted: bool, dtype, param_dtype, rngs):
        self.placement = placement if adapted else None
        self.dtype, self.param_dtype, self.rngs = dtype, param_dtype, rngs
        self.count = 0

    def linear(self, name: str, d_in: int, d_out: int, axes: tuple, use_bias: bool):
        kw = dict(axes=axes, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)
        if self.placement is None or name not in self.placement.target_modules:
            return Linear(d_in, d_out, **kw)
        self.count += 1
        return MoLoRALinear(d_in, d_out, spec=self.placement.spec, index=self.count - 1, **kw)


class RMSNorm(nnx.Module):
    """``style`` as each family's checkpoints and transformers round it (they differ only below float32):
    'llama' ``w * norm(x)`` in the compute dtype, 'olmo' the same in float32, 'gemma' ``(1 + w) * norm(x)``
    in float32 (weights stored as w)."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, style: str = "llama"):
        self.scale = Frozen((jnp.zeros if style == "gemma" else jnp.ones)((dim,), param_dtype), axes=("norm",))
        self.eps, self.dtype, self.style = eps, dtype, style

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.style == "gemma":
            return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        if self.style == "olmo":
            return (self.scale[...].astype(jnp.float32) * normed).astype(x.dtype)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


class AttentionInputs(NamedTuple):
    """What one kind of attention layer (global or local) needs: RoPE tables and the mask."""

    cos: jax.Array  # [B, T, hd]
    sin: jax.Array
    mask: jax.Array | None  # [B|1, 1, T, S] bool, or None: causal only


class Attention(nnx.Module):
    def __init__(self, spec: DecoderSpec, build: _Builder):
        d, hd = spec.hidden_size, spec.head_dim
        bias = spec.attention_bias or spec.qkv_bias
        self.q_proj = build.linear("q_proj", d, spec.num_heads * hd, ("embed", "heads"), bias)
        self.k_proj = build.linear("k_proj", d, spec.num_kv_heads * hd, ("embed", "kv_heads"), bias)
        self.v_proj = build.linear("v_proj", d, spec.num_kv_heads * hd, ("embed", "kv_heads"), bias)
        self.o_proj = build.linear("o_proj", spec.num_heads * hd, d, ("heads", "embed"), spec.attention_bias)
        self.qk_norm = spec.qk_norm or spec.family == "gemma3"
        self.projection_norm = spec.family == "olmo2"
        norm = partial(RMSNorm, eps=spec.rms_norm_eps, dtype=build.dtype, param_dtype=build.param_dtype,
                       style=spec.norm_style)
        if self.qk_norm:
            self.q_norm, self.k_norm = norm(hd), norm(hd)
        elif self.projection_norm:
            self.q_norm, self.k_norm = norm(spec.num_heads * hd), norm(spec.num_kv_heads * hd)
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, hd
        self.scale, self.softcap = spec.query_scale, spec.attn_logit_softcap
        self.rope_dtype = jnp.float32 if spec.family == "olmo2" else None  # OLMo rotates in float32, then rounds

    def __call__(self, x, inputs: AttentionInputs, ctx, kv=None):
        """``kv = (k_cache, v_cache, index)`` (``[B, S, K, hd]`` each): write this call's keys and
        values at ``index`` and attend over the whole cache (``mask`` is then ``[B, 1, T, S]``)."""
        b, t, _ = x.shape
        q, k, v = self.q_proj(x, ctx), self.k_proj(x, ctx), self.v_proj(x, ctx)
        if self.projection_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = (apply_rope(a, inputs.cos, inputs.sin, self.rope_dtype) for a in (q, k))
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if kv is not None:
            k_cache, v_cache, index = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            kv = (k, v)
        causal = kv is None  # with a cache the mask says which slots each query sees
        if self.softcap:
            out = softcapped_attention(q, k, v, inputs.mask, self.scale, self.softcap, causal)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=inputs.mask, scale=self.scale, is_causal=causal)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim), ctx), kv


def softcapped_attention(q, k, v, mask, scale: float | None, cap: float, causal: bool) -> jax.Array:
    """Attention with Gemma 2's soft-capped scores ``cap * tanh(scores / cap)``, which
    ``jax.nn.dot_product_attention`` cannot do. ``q [B, T, N, hd]``, ``k, v [B, S, K, hd]``
    (K divides N), ``mask [B|1, 1, T, S]`` bool or None -> ``[B, T, N, hd]``."""
    b, t, n, hd = q.shape
    s, heads_kv = k.shape[1], k.shape[2]
    q = q.reshape(b, t, heads_kv, n // heads_kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (hd ** -0.5 if scale is None else scale)
    scores = cap * jnp.tanh(scores / cap)
    allowed = jnp.ones((1, 1, t, s), bool) if mask is None else mask
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((t, s), bool))
    scores = jnp.where(allowed[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, n, hd)


class MLP(nnx.Module):
    def __init__(self, spec: DecoderSpec, build: _Builder):
        d, f, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_proj = build.linear("gate_proj", d, f, ("embed", "mlp"), bias)
        self.up_proj = build.linear("up_proj", d, f, ("embed", "mlp"), bias)
        self.down_proj = build.linear("down_proj", f, d, ("mlp", "embed"), bias)
        self.act = spec.hidden_act

    def __call__(self, x, ctx):
        return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x, ctx)) * self.up_proj(x, ctx), ctx)


class DecoderLayer(nnx.Module):
    """Llama: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``; Gemma 2 / 3 also norm each block's output,
    OLMo 2 / 3 norm only the outputs (``spec.norms``). Norm names follow each family's checkpoints."""

    def __init__(self, spec: DecoderSpec, build: _Builder):
        norm = partial(RMSNorm, spec.hidden_size, spec.rms_norm_eps, dtype=build.dtype,
                       param_dtype=build.param_dtype, style=spec.norm_style)
        self.norms = spec.norms
        if self.norms != "post":
            self.input_layernorm = norm()
        self.self_attn = Attention(spec, build)
        self.post_attention_layernorm = norm()  # Llama: the norm before the MLP
        if self.norms == "sandwich":
            self.pre_feedforward_layernorm = norm()
        if self.norms != "pre":
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(spec, build)
        self.num_adapters = build.count
        self.residual_multiplier = spec.residual_multiplier

    def __call__(self, x, inputs: AttentionInputs, ctx, kv=None):
        if self.norms == "post":
            attn, kv = self.self_attn(x, inputs, ctx, kv)
            x = x + self.post_attention_layernorm(attn)
            x = x + self.post_feedforward_layernorm(self.mlp(x, ctx))
            return constrain(x, ("batch", "length", "act_embed")), kv
        attn, kv = self.self_attn(self.input_layernorm(x), inputs, ctx, kv)
        if self.norms == "sandwich":
            x = x + self.post_attention_layernorm(attn)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), ctx))
        elif self.residual_multiplier != 1.0:
            x = x + attn * self.residual_multiplier
            x = x + self.mlp(self.post_attention_layernorm(x), ctx) * self.residual_multiplier
        else:
            x = x + attn
            x = x + self.mlp(self.post_attention_layernorm(x), ctx)
        return constrain(x, ("batch", "length", "act_embed")), kv


class LayerStack(nnx.Module):
    """Consecutive decoder layers of one structure, weights stacked on a leading ``layers`` axis.

    The forward pass is one ``lax.scan`` over the stack, so compile time does not grow
    with depth. A model has one stack, or three when adapters sit on a layer range.
    """

    def __init__(self, spec: DecoderSpec, layers: range, placement, *, dtype, param_dtype, rngs: nnx.Rngs, remat: bool):
        adapted = placement is not None and layers.start in placement.layers

        def make(key):
            return DecoderLayer(spec, _Builder(placement, adapted, dtype, param_dtype, nnx.Rngs(key)))

        graphdef = nnx.graphdef(nnx.eval_shape(make, jax.random.key(0)))
        keys = jax.random.split(rngs.params(), len(layers))
        self.layer = nnx.merge(graphdef, jax.vmap(lambda k: nnx.state(make(k)))(keys))
        for _, node in nnx.iter_graph(self.layer):
            if isinstance(node, nnx.Variable):
                node.set_metadata(axes=("layers",) + tuple(node.get_metadata()["axes"]))
        self.first, self.size, self.remat = layers.start, len(layers), remat
        self.num_adapters = self.layer.num_adapters * len(layers)
        self.sliding = tuple(bool(spec.sliding_layers[i]) for i in layers) if spec.sliding_layers else ()
        self.nope = tuple(bool(spec.nope_layers[i]) for i in layers) if any(spec.nope_layers) else ()

    def __call__(self, x, attention: tuple[AttentionInputs, AttentionInputs | None], ctx, cache=None,
                 cache_index=None):
        """Scan the stack. ``attention = (global, local)`` inputs (local: sliding-window layers, or None);
        ``cache = (k, v)`` stacked ``[layers, B, S, K, hd]``; returns it updated.

        Statistics the adapters sow inside the scan come out stacked (``[layers, ...]``) and are
        sown again on the stack's own adapter modules, so a capture of the whole model sees
        them under ``layers.<g>.layer.<block>.<proj>.<name>``.
        """
        graphdef, state = nnx.split(self.layer)
        full, local = attention
        kinds = captured_types(self)

        def body(x, scanned):
            index, sliding, nope, layer_state, layer_cache = scanned
            layer_ctx = ctx if ctx is None or ctx.key is None else ctx.replace(key=jax.random.fold_in(ctx.key, index))
            kv = None if layer_cache is None else (*layer_cache, cache_index)
            inputs = full if local is None else jax.tree.map(lambda g, w: jnp.where(sliding, w, g), full, local)
            if self.nope:  # cos 1, sin 0: RoPE is then exactly the identity
                inputs = inputs._replace(cos=jnp.where(nope, jnp.ones_like(inputs.cos), inputs.cos),
                                         sin=jnp.where(nope, jnp.zeros_like(inputs.sin), inputs.sin))
            layer = nnx.merge(graphdef, layer_state)
            if not kinds:
                x, kv = layer(x, inputs, layer_ctx, kv)
                return x, (kv, ())
            (x, kv), *sown = nnx.capture(layer, *kinds)(x, inputs, layer_ctx, kv)
            return x, (kv, tuple(sown))

        # Even without remat a layer saves only its weight matmuls' outputs for the backward pass and recomputes
        # the memory-bound rest (norms, RoPE, softmax and its score matmuls, SwiGLU): writing every elementwise
        # residual into the scan's stacked buffers cost more than recomputing it (the main-job step 1.13x faster;
        # docs/performance.md). prevent_cse=False is safe inside a scan.
        policies = jax.checkpoint_policies
        body = jax.checkpoint(body, prevent_cse=False, policy=policies.nothing_saveable if self.remat
                              else policies.dots_with_no_batch_dims_saveable)
        indices = jnp.arange(self.first, self.first + self.size, dtype=jnp.int32)
        sliding = jnp.asarray(self.sliding or (False,) * self.size)
        nope = jnp.asarray(self.nope or (False,) * self.size)
        x, (cache, sown) = jax.lax.scan(body, x, (indices, sliding, nope, state, cache))
        for collected in sown:
            for path, variable in nnx.to_flat_state(collected):
                module = reduce(getattr, path[:-1], self.layer)
                module.sow(type(variable), path[-1], variable.get_value(), reduce_fn=_replace, init_fn=lambda: None)
        return x, cache


def layer_groups(num_layers: int, placement: AdapterPlacement | None) -> list[range]:
    """Split ``range(num_layers)`` into runs of layers that all have, or all lack, adapters."""
    if placement is None or not placement.layers:
        return [range(num_layers)]
    lo, hi = min(placement.layers), max(placement.layers) + 1
    return [r for r in (range(0, lo), range(lo, hi), range(hi, num_layers)) if len(r)]


class CausalLM(nnx.Module):
    """Decoder + LM head. ``model(input_ids)`` gives logits ``[B, T, V]`` (float32)."""

    def __init__(self, spec: DecoderSpec, placement: AdapterPlacement | None = None, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        embed = jax.nn.initializers.normal(1.0)(rngs.params(), (spec.vocab_size, spec.hidden_size), param_dtype)
        self.embed_tokens = Frozen(embed, axes=("vocab", "embed"))
        self.groups = tuple(layer_groups(spec.num_layers, placement))
        stack = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat=remat)
        self.layers = nnx.List([LayerStack(spec, group, placement, **stack) for group in self.groups])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                            style=spec.norm_style)
        head = Linear(spec.hidden_size, spec.vocab_size, axes=("embed", "vocab"), dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if spec.tie_word_embeddings else head
        self.spec, self.placement, self.dtype = spec, placement, dtype
        self.num_adapters = sum(stack.num_adapters for stack in self.layers)

    def _adapted_projections(self) -> list[tuple[str, str]]:
        """(block, projection) of each adapter within a layer, in forward order."""
        parts = [("self_attn", n) for n in ATTENTION_PROJECTIONS] + [("mlp", n) for n in MLP_PROJECTIONS]
        return [p for p in parts if self.placement is not None and p[1] in self.placement.target_modules]

    def adapter_modules(self) -> list[str]:
        """Names of the adapted modules, layer by layer (the rows of :meth:`stat`)."""
        if self.placement is None:
            return []
        return [f"layers.{layer}.{block}.{name}" for layer in self.placement.layers
                for block, name in self._adapted_projections()]

    def stat(self, captured: nnx.State, name: str) -> jax.Array:
        """Statistic ``name`` of every adapted module, ``[modules, ...]`` in :meth:`adapter_modules` order.

        ``captured`` is what ``nnx.capture(model.forward, AdapterStat or RoutingTrace)`` returned:
        per layer stack ``layers.<g>.layer.<block>.<proj>.<name>`` with a leading layer axis.
        """
        rows = []
        for g, stack in enumerate(self.layers):
            if stack.num_adapters == 0:
                continue
            per_module = [captured["layers"][g]["layer"][block][proj][name].get_value()
                          for block, proj in self._adapted_projections()]
            rows.append(jnp.stack(per_module, axis=1).reshape(-1, *per_module[0].shape[1:]))  # layer-major
        return jnp.concatenate(rows)

    def init_cache(self, batch: int, length: int) -> tuple:
        """An empty KV cache for ``batch`` sequences of up to ``length`` tokens (one (k, v) per stack)."""
        shape = (batch, length, self.spec.num_kv_heads, self.spec.head_dim)
        return tuple((jnp.zeros((s.size, *shape), self.dtype), jnp.zeros((s.size, *shape), self.dtype))
                     for s in self.layers)

    def _mask(self, t, attention_mask, segment_ids, cache, cache_index, pair_mask, positions,
              window: int | None = None):
        """``[B|1, 1, T, S]`` bool, or None (causal only). ``window``: keys at distance < window only,
        and the causal part made explicit (local layers' mask is selected against the global one)."""
        if pair_mask is not None:  # packed trees: tokens of one row sit at positions unlike their slots
            if window is None:
                return pair_mask[:, None]
            return (pair_mask & (positions[:, :, None] - positions[:, None, :] < window))[:, None]
        if cache is not None:  # keys: every valid cache slot up to each query's absolute position
            s = cache[0][0].shape[2]
            query, key = (cache_index + jnp.arange(t))[:, None], jnp.arange(s)[None, :]
            allowed = (key <= query) & (True if window is None else key > query - window)
            valid = jnp.ones((1, s), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
            return valid[:, None, None, :] & allowed[None, None]
        if segment_ids is not None:
            mask = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0))[:, None]
        else:
            mask = None if attention_mask is None else attention_mask.astype(jnp.bool_)[:, None, None, :]
        if window is None:
            return mask
        i = jnp.arange(t)
        local = ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window))[None, None]
        return local if mask is None else mask & local

    def _attention_inputs(self, positions, *mask_args) -> tuple[AttentionInputs, AttentionInputs | None]:
        """(global, local) attention inputs; local is None for models without sliding-window layers
        (or with one on every layer and no RoPE of its own, as Mistral: then global is windowed)."""
        spec, t = self.spec, positions.shape[-1]
        if spec.sliding_layers and all(spec.sliding_layers) and spec.local_rope in (None, spec.rope):
            cached = mask_args[2] is not None or mask_args[4] is not None  # else a window >= T masks nothing
            window = spec.sliding_window if cached or spec.sliding_window < t else None
            rope = rope_cos_sin(spec.rope, positions)
            return AttentionInputs(*rope, self._mask(t, *mask_args, window=window)), None
        full = AttentionInputs(*rope_cos_sin(spec.rope, positions), self._mask(t, *mask_args))
        if not any(spec.sliding_layers):
            return full, None
        if full.mask is None:  # both masks explicit: a layer selects one with jnp.where
            full = full._replace(mask=self._mask(t, *mask_args, window=t))
        return full, AttentionInputs(*rope_cos_sin(spec.local_rope or spec.rope, positions),
                                     self._mask(t, *mask_args, window=spec.sliding_window))

    def forward(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                positions: jax.Array | None = None, ctx: ForwardContext | None = None,
                segment_ids: jax.Array | None = None, cache: tuple | None = None,
                cache_index: jax.Array | int = 0, pair_mask: jax.Array | None = None) -> ModelOutput:
        """``input_ids [B, T]`` int, ``attention_mask [B, T]`` (1 = real token), ``positions [B, T]``.

        ``segment_ids [B, T]`` (packed rows: 1, 2, ... per example, 0 = padding) keeps attention
        inside each example; it replaces ``attention_mask`` for masking. With ``cache`` (from
        :meth:`init_cache`) the tokens are written at ``cache_index`` and ``attention_mask`` is
        ``[B, S]`` over the cache's slots. Returns logits ``[B, T, V]`` float32 and the updated
        cache. With ``ctx`` the adapters sow their statistics (see :meth:`stat`). ``pair_mask [B, T, T]``
        bool (which earlier tokens each token sees, no cache) replaces the other masks; sliding windows
        then count ``positions``.
        """
        hidden, cache = self.hidden(input_ids, attention_mask, positions, ctx, segment_ids, cache, cache_index,
                                    pair_mask)
        return ModelOutput(self.head(hidden), cache)

    def hidden(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, ctx: ForwardContext | None = None,
               segment_ids: jax.Array | None = None, cache: tuple | None = None,
               cache_index: jax.Array | int = 0, pair_mask: jax.Array | None = None) -> tuple[jax.Array, tuple | None]:
        """:meth:`forward` without the final norm and LM head: ``(hidden [B, T, d], cache)``, so the head
        can be applied to only the positions a loss or a score needs (:meth:`head`)."""
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        attention = self._attention_inputs(positions, attention_mask, segment_ids, cache, cache_index,
                                           pair_mask, positions)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0)
        if self.spec.gemma:  # in the weights' dtype, as transformers' GemmaTextScaledWordEmbedding
            x = x * jnp.asarray(math.sqrt(self.spec.hidden_size), x.dtype)
        if self.spec.embedding_multiplier != 1.0:
            x = x * self.spec.embedding_multiplier
        x = constrain(x.astype(self.dtype), ("batch", "length", "act_embed"))
        new_cache = []
        for i, stack in enumerate(self.layers):
            x, stack_cache = stack(x, attention, ctx, None if cache is None else cache[i], cache_index)
            new_cache.append(stack_cache)
        return x, None if cache is None else tuple(new_cache)

    def head(self, hidden: jax.Array) -> jax.Array:
        """Final norm and LM head: ``[..., d] -> [..., V]`` float32 logits (soft-capped where the model is)."""
        x = self.norm(hidden)
        if self.lm_head is None:
            head = self.embed_tokens[...].astype(self.dtype).T
        else:
            head = self.lm_head.kernel[...].astype(self.dtype)
        logits = jnp.dot(x, head, preferred_element_type=jnp.float32)
        if self.spec.logits_scaling != 1.0:
            logits = logits / self.spec.logits_scaling
        if self.spec.final_logit_softcap:
            logits = jnp.tanh(logits / self.spec.final_logit_softcap) * self.spec.final_logit_softcap
        return logits

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        return self.forward(input_ids, attention_mask, positions).logits


# --------------------------------------------------------------------------- state helpers


def flat_values(state: nnx.State) -> dict[str, jax.Array]:
    """``nnx.State`` -> ``{"layers.0.self_attn.q_proj.lora_a": array, ...}``."""
    return {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(state)}


def state_from_flat(template: nnx.State, values: dict[str, jax.Array]) -> nnx.State:
    """Inverse of :func:`flat_values`, keeping the template's variable types and metadata."""
    return nnx.from_flat_state([(p, v.replace(values[".".join(map(str, p))])) for p, v in nnx.to_flat_state(template)])


def flat_axes(state: nnx.State) -> dict[str, tuple]:
    """Logical axis names of every variable, by flat name."""
    return {".".join(map(str, path)): var.get_metadata().get("axes") for path, var in nnx.to_flat_state(state)}


_STACKED = re.compile(r"layers\.(\d+)\.layer\.(.+)$")


def unstack(values: dict, groups: tuple[range, ...]) -> dict:
    """Stacked flat values -> per-layer names (``layers.<i>.<rest>``); other names unchanged."""
    out = {}
    for name, value in values.items():
        m = _STACKED.match(name)
        if not m:
            out[name] = value
            continue
        for j, layer in enumerate(groups[int(m.group(1))]):
            out[f"layers.{layer}.{m.group(2)}"] = value[j]
    return out


def stacked_sources(name: str, groups: tuple[range, ...]) -> list[str] | None:
    """Per-layer names stacked into the stacked ``name`` (None for names outside the stacks)."""
    m = _STACKED.match(name)
    if not m:
        return None
    return [f"layers.{layer}.{m.group(2)}" for layer in groups[int(m.group(1))]]


def stack(per_layer: dict, template_names, groups: tuple[range, ...], stack_fn=None) -> dict:
    """Inverse of :func:`unstack` for the stacked ``template_names``."""
    import numpy as np

    stack_fn = stack_fn or np.stack
    out = {}
    for name in template_names:
        sources = stacked_sources(name, groups)
        out[name] = per_layer[name] if sources is None else stack_fn([per_layer[s] for s in sources])
    return out


def trainable_parameters(model: CausalLM) -> dict[str, int]:
    """Exact trainable parameter counts by kind (lora_a, lora_b, router, magnitude) and ``total``.

    Works on an abstract model (``nnx.eval_shape``) too: only shapes are read.
    """
    counts: dict[str, int] = {}
    for name, value in flat_values(nnx.state(model, nnx.Param)).items():
        kind = name.rsplit(".", 1)[-1]
        counts[kind] = counts.get(kind, 0) + int(np.prod(value.shape))
    return counts | {"total": sum(counts.values())}


def split_model(model: CausalLM):
    """``(graphdef, adapters, frozen)``: trainable ``nnx.Param`` state and the frozen base."""
    return nnx.split(model, nnx.Param, Frozen)
