"""Flax NNX decoder for the Llama family, with mixture-of-LoRA adapters on chosen projections.

RMSNorm, RoPE (every transformers rope_type), grouped-query attention, SwiGLU,
tied or untied embeddings, causal + padding mask. Frozen weights are ``Frozen``
variables, adapters and routers ``nnx.Param``.

Decoder layers live in stacks (``layers.<g>.layer.*``, leading axis = layer) that
the forward pass scans over. Per-layer names follow Hugging Face
(``layers.3.self_attn.q_proj.kernel`` is ``model.layers.3.self_attn.q_proj.weight``
transposed); :func:`unstack` / :func:`stack` convert between the two, so loaders
and adapter exports use per-layer names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from comoe_jax.adapters import ForwardContext, Frozen, Linear, MoESpec, MoLoRALinear
from comoe_jax.rope import RopeSpec, apply_rope, rope_cos_sin
from comoe_jax.sharding import constrain

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaSpec:
    """Architecture hyper-parameters (read from a transformers ``LlamaConfig``)."""

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

    @classmethod
    def from_hf(cls, hf, source: str = "config.json") -> LlamaSpec:
        if getattr(hf, "model_type", "llama") not in ("llama",):
            raise ValueError(f"{source}: model_type {hf.model_type!r} is not supported; comoe-jax implements 'llama'")
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act {act!r} is not supported; Llama uses 'silu'")
        kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        if hf.num_attention_heads % kv:
            raise ValueError(f"{source}: num_attention_heads ({hf.num_attention_heads}) is not a multiple of "
                             f"num_key_value_heads ({kv})")
        rope = RopeSpec.from_hf(hf)
        return cls(
            vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads, num_kv_heads=kv,
            head_dim=rope.head_dim, rms_norm_eps=float(hf.rms_norm_eps),
            rope=rope, tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", False)), mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        )


@dataclass(frozen=True)
class AdapterPlacement:
    """Which projections of which layers carry adapters, and their settings."""

    spec: MoESpec
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    stats: dict  # {"layers.3.self_attn.q_proj": {"load": [n], "contrastive": [], ...}, ...}
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
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = Frozen(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, spec: LlamaSpec, build: _Builder):
        d, hd = spec.hidden_size, spec.head_dim
        bias = spec.attention_bias
        self.q_proj = build.linear("q_proj", d, spec.num_heads * hd, ("embed", "heads"), bias)
        self.k_proj = build.linear("k_proj", d, spec.num_kv_heads * hd, ("embed", "kv_heads"), bias)
        self.v_proj = build.linear("v_proj", d, spec.num_kv_heads * hd, ("embed", "kv_heads"), bias)
        self.o_proj = build.linear("o_proj", spec.num_heads * hd, d, ("heads", "embed"), bias)
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, hd

    def __call__(self, x, cos, sin, mask, ctx, kv=None):
        """``kv = (k_cache, v_cache, index)`` (``[B, S, K, hd]`` each): write this call's keys and
        values at ``index`` and attend over the whole cache (``mask`` is then ``[B, 1, T, S]``)."""
        b, t, _ = x.shape
        q, sq = self.q_proj(x, ctx)
        k, sk = self.k_proj(x, ctx)
        v, sv = self.v_proj(x, ctx)
        q = apply_rope(q.reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if kv is None:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
        else:
            k_cache, v_cache, index = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)
            kv = (k, v)
        y, so = self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim), ctx)
        return y, _named(zip(ATTENTION_PROJECTIONS, (sq, sk, sv, so))), kv


class MLP(nnx.Module):
    def __init__(self, spec: LlamaSpec, build: _Builder):
        d, f, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_proj = build.linear("gate_proj", d, f, ("embed", "mlp"), bias)
        self.up_proj = build.linear("up_proj", d, f, ("embed", "mlp"), bias)
        self.down_proj = build.linear("down_proj", f, d, ("mlp", "embed"), bias)

    def __call__(self, x, ctx):
        gate, sg = self.gate_proj(x, ctx)
        up, su = self.up_proj(x, ctx)
        y, sd = self.down_proj(jax.nn.silu(gate) * up, ctx)
        return y, _named(zip(MLP_PROJECTIONS, (sg, su, sd)))


def _named(pairs) -> dict:
    return {name: s for name, s in pairs if s}


class DecoderLayer(nnx.Module):
    def __init__(self, spec: LlamaSpec, build: _Builder):
        norm = dict(dtype=build.dtype, param_dtype=build.param_dtype)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, **norm)
        self.self_attn = Attention(spec, build)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, **norm)
        self.mlp = MLP(spec, build)
        self.num_adapters = build.count

    def __call__(self, x, cos, sin, mask, ctx, kv=None):
        attn, s_attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, ctx, kv)
        x = x + attn
        mlp, s_mlp = self.mlp(self.post_attention_layernorm(x), ctx)
        x = constrain(x + mlp, ("batch", "length", "act_embed"))
        stats = {f"self_attn.{k}": v for k, v in s_attn.items()} | {f"mlp.{k}": v for k, v in s_mlp.items()}
        return x, (stats, kv)


class LayerStack(nnx.Module):
    """Consecutive decoder layers of one structure, weights stacked on a leading ``layers`` axis.

    The forward pass is one ``lax.scan`` over the stack, so compile time does not grow
    with depth. A model has one stack, or three when adapters sit on a layer range.
    """

    def __init__(self, spec: LlamaSpec, layers: range, placement, *, dtype, param_dtype, rngs: nnx.Rngs, remat: bool):
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

    def __call__(self, x, cos, sin, mask, ctx, cache=None, cache_index=None):
        """Scan the stack. ``cache = (k, v)`` stacked ``[layers, B, S, K, hd]``; returns it updated."""
        graphdef, state = nnx.split(self.layer)

        def body(x, scanned):
            index, layer_state, layer_cache = scanned
            layer_ctx = ctx if ctx is None or ctx.key is None else ctx.replace(key=jax.random.fold_in(ctx.key, index))
            kv = None if layer_cache is None else (*layer_cache, cache_index)
            return nnx.merge(graphdef, layer_state)(x, cos, sin, mask, layer_ctx, kv)

        if self.remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        indices = jnp.arange(self.first, self.first + self.size, dtype=jnp.int32)
        x, (stats, cache) = jax.lax.scan(body, x, (indices, state, cache))
        per_layer = {f"layers.{self.first + j}.{name}": jax.tree.map(lambda v, j=j: v[j], s)
                     for j in range(self.size) for name, s in stats.items()}
        return x, per_layer, cache


def layer_groups(num_layers: int, placement: AdapterPlacement | None) -> list[range]:
    """Split ``range(num_layers)`` into runs of layers that all have, or all lack, adapters."""
    if placement is None or not placement.layers:
        return [range(num_layers)]
    lo, hi = min(placement.layers), max(placement.layers) + 1
    return [r for r in (range(0, lo), range(lo, hi), range(hi, num_layers)) if len(r)]


class CausalLM(nnx.Module):
    """Llama decoder + LM head. ``model(input_ids)`` gives logits ``[B, T, V]`` (float32)."""

    def __init__(self, spec: LlamaSpec, placement: AdapterPlacement | None = None, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        embed = jax.nn.initializers.normal(1.0)(rngs.params(), (spec.vocab_size, spec.hidden_size), param_dtype)
        self.embed_tokens = Frozen(embed, axes=("vocab", "embed"))
        self.groups = tuple(layer_groups(spec.num_layers, placement))
        stack = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat=remat)
        self.layers = nnx.List([LayerStack(spec, group, placement, **stack) for group in self.groups])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        head = Linear(spec.hidden_size, spec.vocab_size, axes=("embed", "vocab"), dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if spec.tie_word_embeddings else head
        self.spec, self.placement, self.dtype = spec, placement, dtype
        self.num_adapters = sum(stack.num_adapters for stack in self.layers)

    def adapter_modules(self) -> list[str]:
        """Names of the adapted modules, in the order of ``forward``'s statistics (layer, then module)."""
        if self.placement is None:
            return []
        parts = [("self_attn", n) for n in ATTENTION_PROJECTIONS] + [("mlp", n) for n in MLP_PROJECTIONS]
        return [f"layers.{layer}.{block}.{name}" for layer in self.placement.layers for block, name in parts
                if name in self.placement.target_modules]

    def init_cache(self, batch: int, length: int) -> tuple:
        """An empty KV cache for ``batch`` sequences of up to ``length`` tokens (one (k, v) per stack)."""
        shape = (batch, length, self.spec.num_kv_heads, self.spec.head_dim)
        return tuple((jnp.zeros((s.size, *shape), self.dtype), jnp.zeros((s.size, *shape), self.dtype))
                     for s in self.layers)

    def _mask(self, t, attention_mask, segment_ids, cache, cache_index):
        if cache is not None:  # keys: every valid cache slot up to each query's absolute position
            s = cache[0][0].shape[2]
            causal = jnp.arange(s)[None, :] <= (cache_index + jnp.arange(t))[:, None]
            valid = jnp.ones((1, s), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
            return valid[:, None, None, :] & causal[None, None]
        if segment_ids is not None:
            return ((segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0))[:, None]
        return None if attention_mask is None else attention_mask.astype(jnp.bool_)[:, None, None, :]

    def forward(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                positions: jax.Array | None = None, ctx: ForwardContext | None = None,
                segment_ids: jax.Array | None = None, cache: tuple | None = None,
                cache_index: jax.Array | int = 0) -> ModelOutput:
        """``input_ids [B, T]`` int, ``attention_mask [B, T]`` (1 = real token), ``positions [B, T]``.

        ``segment_ids [B, T]`` (packed rows: 1, 2, ... per example, 0 = padding) keeps attention
        inside each example; it replaces ``attention_mask`` for masking. With ``cache`` (from
        :meth:`init_cache`) the tokens are written at ``cache_index`` and ``attention_mask`` is
        ``[B, S]`` over the cache's slots. Returns logits ``[B, T, V]`` float32, per-adapter
        statistics when ``ctx`` is given, and the updated cache.
        """
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        rope_len = t if cache is None else cache[0][0].shape[2]
        cos, sin = rope_cos_sin(self.spec.rope, positions, rope_len)
        mask = self._mask(t, attention_mask, segment_ids, cache, cache_index)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        stats, new_cache = {}, []
        for i, stack in enumerate(self.layers):
            x, stack_stats, stack_cache = stack(x, cos, sin, mask, ctx, None if cache is None else cache[i],
                                                cache_index)
            stats |= stack_stats
            new_cache.append(stack_cache)
        if stats:  # scan outputs come back with sorted keys; restore (layer, module) order
            stats = {name: stats[name] for name in self.adapter_modules()}
        x = self.norm(x)
        if self.lm_head is None:
            head = self.embed_tokens[...].astype(self.dtype).T
        else:
            head = self.lm_head.kernel[...].astype(self.dtype)
        logits = jnp.dot(x, head, preferred_element_type=jnp.float32)
        return ModelOutput(logits, stats, None if cache is None else tuple(new_cache))

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
