"""Rotary position embeddings with every ``rope_type`` of transformers' Llama (and Gemma 3) configs.

``rope_frequencies`` returns the inverse frequencies and the attention scaling that
transformers' ``ROPE_INIT_FUNCTIONS`` compute (default, linear, dynamic, yarn,
longrope, llama3), so no torch is needed. The sequence-length dependent types (dynamic,
longrope) take the length as transformers' ``dynamic_rope_update`` does, ``max(positions) + 1``, so
left padding, a KV cache's spare slots and padding do not change it; per batch row, so a row's
frequencies do not depend on the other rows or on how the batch is split over devices
(transformers takes the maximum over the whole batch: the same whenever the rows' lengths lie on the
same side of the limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """The RoPE part of a Llama config. ``params`` holds the type's extra fields (factor, ...)."""

    head_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    max_position_embeddings: int = 2048
    params: tuple = field(default_factory=tuple)  # sorted (key, value) pairs, hashable

    def get(self, key, default=None):
        return dict(self.params).get(key, default)

    @property
    def rotary_dim(self) -> int:
        """The leading dimensions of each head that rotate (Phi-3's ``partial_rotary_factor``; the rest pass)."""
        return int(self.head_dim * self.get("partial_rotary_factor", 1.0))

    @classmethod
    def from_hf(cls, hf_config, layer_type: str | None = None, partial: bool = False) -> RopeSpec:
        """``layer_type`` picks one entry of per-layer-type ``rope_parameters`` (Gemma 3: full / sliding);
        ``partial``: the family rotates part of each head (Phi-3), so ``partial_rotary_factor`` may be below 1."""
        params = dict(getattr(hf_config, "rope_parameters", None) or {})
        if layer_type is not None:
            params = dict(params.get(layer_type) or {})
        legacy = getattr(hf_config, "rope_scaling", None)
        if legacy and not params.get("rope_type"):
            params.update(legacy)
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        theta = params.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or 10000.0
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; "
                             f"supported: {', '.join(ROPE_TYPES)}")
        factor = params.get("partial_rotary_factor", 1.0)
        if factor != 1.0 and not partial:
            raise ValueError(f"partial_rotary_factor={factor!r} is not supported for this model type (rotary "
                             "embeddings on the whole head only; Phi-3 rotates part of each head)")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1 \
                or int(head_dim * factor) < 2 or int(head_dim * factor) % 2:
            raise ValueError(f"partial_rotary_factor={factor!r}; it must be in (0, 1] and leave an even number of "
                             f"rotary dimensions of the head's {head_dim}")
        top = getattr(hf_config, "original_max_position_embeddings", None)
        if layer_type is None and top and rope_type in ("llama3", "yarn", "longrope"):
            # As transformers' standardize_rope_params: a top-level value (Phi-3 style configs) wins.
            params["original_max_position_embeddings"] = top
        items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
        return cls(head_dim, float(theta), rope_type, int(hf_config.max_position_embeddings), items)


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))


def _yarn(spec: RopeSpec, dim: int, base: float):
    factor = spec.get("factor")
    original = spec.get("original_max_position_embeddings") or spec.max_position_embeddings
    if factor is None:
        factor = spec.max_position_embeddings / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = spec.get("attention_factor")
    if attention is None:
        m, m_all = spec.get("mscale"), spec.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = spec.get("beta_fast") or 32, spec.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if spec.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (np.arange(0, dim, 2).astype(np.float32) / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, attention


def _llama3(spec: RopeSpec, dim: int, base: float):
    inv = _default_inv_freq(base, dim)
    factor, low_f, high_f = spec.get("factor"), spec.get("low_freq_factor"), spec.get("high_freq_factor")
    old = spec.get("original_max_position_embeddings")
    low_wavelen, high_wavelen = old / low_f, old / high_f
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled), 1.0


def _longrope(spec: RopeSpec, dim: int, base: float, seq_len):
    original = spec.get("original_max_position_embeddings")
    factor = spec.get("factor") or spec.max_position_embeddings / original
    attention = spec.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    exponents = np.arange(0, dim, 2).astype(np.float32) / dim
    short, long = (1.0 / (np.asarray(spec.get(f"{which}_factor"), np.float32) * base ** exponents)
                   for which in ("short", "long"))
    return jnp.where(jnp.asarray(seq_len)[..., None] > original, long, short), attention


def _dynamic(spec: RopeSpec, dim: int, base: float, seq_len):
    """NTK scaling of the base past ``max_position_embeddings``; float32 throughout, as transformers computes it
    from a tensor length."""
    limit, factor = spec.max_position_embeddings, spec.get("factor")
    seq_len = jnp.asarray(seq_len)[..., None]
    length = jnp.maximum(seq_len.astype(jnp.float32), limit)  # the unscaled base at or below the limit
    scaled = base * ((factor * length / limit) - (factor - 1)) ** (dim / (dim - 2))
    inv = 1.0 / (scaled ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    return jnp.where(seq_len > limit, inv, _default_inv_freq(base, dim)), 1.0


def rope_frequencies(spec: RopeSpec, seq_len) -> tuple[jax.Array, float]:
    """Inverse frequencies ``[rotary_dim // 2]`` float32 and the cos/sin scaling factor. ``seq_len`` (integers of
    any shape S) matters to dynamic and longrope only, whose frequencies are ``[*S, rotary_dim // 2]``."""
    dim, base = spec.rotary_dim, spec.theta
    kind = spec.rope_type
    if kind == "default":
        return _default_inv_freq(base, dim), 1.0
    if kind == "linear":
        return _default_inv_freq(base, dim) / spec.get("factor"), 1.0
    if kind == "dynamic":
        return _dynamic(spec, dim, base, seq_len)
    if kind == "yarn":
        return _yarn(spec, dim, base)
    if kind == "llama3":
        return _llama3(spec, dim, base)
    return _longrope(spec, dim, base, seq_len)


def rope_cos_sin(spec: RopeSpec, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[..., T, rotary_dim]`` (float32) for integer ``positions [..., T]``; the length of dynamic and
    longrope is ``max(positions) + 1`` of each row, as in transformers."""
    length_dependent = spec.rope_type in ("dynamic", "longrope")  # the others need no reduction over positions
    inv_freq, scaling = rope_frequencies(spec, jnp.max(positions, axis=-1, keepdims=True) + 1 if length_dependent
                                         else None)
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, dtype=None) -> jax.Array:
    """Rotate-half RoPE (Hugging Face layout). ``x [B, T, heads, hd]``, cos/sin ``[B, T, rd]``: the first ``rd``
    dimensions of each head rotate, the rest pass unchanged (``rd < hd``: Phi-3's partial rotary); computed in
    ``dtype`` (default: x's) and returned in x's."""
    dtype = dtype or x.dtype
    rd = cos.shape[-1]
    y, kept = x[..., :rd].astype(dtype), x[..., rd:]
    half = rd // 2
    rotated = jnp.concatenate([-y[..., half:], y[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(dtype), sin[:, :, None, :].astype(dtype)
    out = (y * cos + rotated * sin).astype(x.dtype)
    return out if rd == x.shape[-1] else jnp.concatenate([out, kept], axis=-1)
