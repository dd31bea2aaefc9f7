"""transformers configs -> :class:`DecoderSpec`: which model types comoe-jax implements and how they read.

Reads only the config object (``config.json``, a GGUF header or ``model.random_arch``), so an
unsupported model is refused before any weight is read.
"""

from __future__ import annotations

import re

import numpy as np

from comoe_jax.errors import LoadError
from comoe_jax.model import ACTIVATIONS, DecoderSpec
from comoe_jax.rope import RopeSpec

# transformers model_type -> ours
# (ministral: Mistral with per-layer windows from layer_types; transformers' AutoConfig turns a mistral
# config.json that lists layer_types into one. smollm3: Llama with layers without RoPE. granite: Llama with
# scaled embeddings, block outputs, queries and logits. olmo3: OLMo 2 with windows and a RoPE per layer type.
# phi3: Mistral-like with q/k/v and gate/up fused in its checkpoints, split on load, and a partial rotary)
FAMILIES = {"llama": "llama", "mistral": "mistral", "ministral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
            "smollm3": "llama", "granite": "llama", "olmo2": "olmo2", "olmo3": "olmo2", "gemma": "gemma",
            "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3", "phi3": "phi3"}


def check_model_type(model_type: str, source: str) -> str:
    """``model_type`` if comoe-jax implements it; else a LoadError naming ``source`` and the supported types."""
    if model_type not in FAMILIES:
        raise LoadError(f"{source}: model_type {model_type!r} is not supported; comoe-jax implements "
                        f"{', '.join(FAMILIES)}")
    return model_type


def decoder_spec(hf, source: str = "config.json") -> DecoderSpec:
    """The :class:`DecoderSpec` of a transformers config; ``source`` names it in error messages."""
    model_type = check_model_type(getattr(hf, "model_type", "llama"), source)
    tied = getattr(hf, "tie_word_embeddings", False)
    if model_type == "gemma3":  # the multimodal checkpoint: its language model (tied as the top level says)
        hf = hf.text_config
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        value = getattr(hf, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LoadError(f"{source}: {name}={value!r}; a decoder needs a positive integer")
    family = FAMILIES[model_type]
    # Gemma 2 / 3 read hidden_activation; the others (Gemma 1 included, in transformers 5) hidden_act only
    act = (family in ("gemma2", "gemma3") and getattr(hf, "hidden_activation", None)) or getattr(hf, "hidden_act",
                                                                                                 "silu")
    if act not in ACTIVATIONS:
        raise LoadError(f"{source}: hidden activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    if hf.num_attention_heads % kv:
        raise LoadError(f"{source}: num_attention_heads ({hf.num_attention_heads}) is not a multiple of "
                        f"num_key_value_heads ({kv})")
    if getattr(hf, "use_bidirectional_attention", None):
        raise LoadError(f"{source}: use_bidirectional_attention=True is not supported (a causal decoder is)")
    common = dict(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads, num_kv_heads=kv,
        rms_norm_eps=float(hf.rms_norm_eps), tie_word_embeddings=bool(tied),
        attention_bias=bool(getattr(hf, "attention_bias", False)), mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        family=family, hidden_act=act,
    )
    if family.startswith("gemma"):
        return DecoderSpec(**common, **_gemma_fields(hf, source, family))
    if family == "olmo2":  # (transformers builds OLMo's MLP without biases whatever mlp_bias says)
        return DecoderSpec(**(common | dict(mlp_bias=False)), **_olmo_fields(hf, source, model_type))
    rope = _rope(hf, source, partial=family == "phi3")
    if model_type == "smollm3":
        window = _window(hf, source) if getattr(hf, "use_sliding_window", False) else None
        if window is None and _window(hf, source) and "sliding_attention" in (getattr(hf, "layer_types", None) or ()):
            # transformers' eager / SDPA attention would window those layers, its flash attention would not
            raise LoadError(f"{source}: layer_types lists sliding_attention layers but use_sliding_window is false; "
                            "set use_sliding_window=true or make those layers full_attention")
        sliding = _sliding_layers(hf, source, window)
        return DecoderSpec(head_dim=rope.head_dim, rope=rope, nope_layers=_nope_layers(hf, source),
                           sliding_window=window, sliding_layers=sliding if any(sliding) else (),
                           **common)
    if model_type == "granite":
        return DecoderSpec(head_dim=rope.head_dim, rope=rope, **common, **_granite_fields(hf, source))
    if family == "llama":
        return DecoderSpec(head_dim=rope.head_dim, rope=rope, **common)
    # As transformers builds them: Mistral, Qwen2 and Phi-3 have no attention_bias field (Qwen2: q/k/v biased, o
    # not), none an mlp_bias one; Mistral and Phi-3 window every layer, Qwen2/3 the layers layer_types names.
    common |= dict(mlp_bias=False, qkv_bias=family == "qwen2", qk_norm=family == "qwen3")
    if family in ("mistral", "qwen2", "phi3"):
        common["attention_bias"] = False
    window = _window(hf, source)
    if model_type in ("mistral", "phi3"):
        sliding = (window is not None,) * hf.num_hidden_layers
    else:
        sliding = _sliding_layers(hf, source, window)
    return DecoderSpec(head_dim=rope.head_dim, rope=rope, sliding_window=window,
                       sliding_layers=sliding if any(sliding) else (), **common)


def _rope(hf, source: str, layer_type: str | None = None, partial: bool = False) -> RopeSpec:
    try:
        return RopeSpec.from_hf(hf, layer_type, partial)
    except ValueError as e:
        raise LoadError(f"{source}: {e}") from None


def _gemma_fields(hf, source: str, family: str) -> dict:
    """Gemma: Llama's fields; Gemma 2 adds the query scale, soft-caps and windows; Gemma 3 a local RoPE."""
    if family == "gemma":
        rope = _rope(hf, source)
        return dict(head_dim=rope.head_dim, rope=rope)
    if family == "gemma3" and getattr(hf, "attn_logit_softcapping", None) is not None:
        # transformers' Gemma 3 ignores the field: honouring it would break parity, ignoring it would hide it
        raise LoadError(f"{source}: attn_logit_softcapping={hf.attn_logit_softcapping!r} is not supported for "
                        "Gemma 3 (its checkpoints set null; transformers ignores the field)")
    cap = "a soft-cap is a positive finite number or null"
    caps = dict(attn_logit_softcap=_positive(hf, "attn_logit_softcapping", source, cap, optional=True),
                final_logit_softcap=_positive(hf, "final_logit_softcapping", source, cap, optional=True))
    scalar = _positive(hf, "query_pre_attn_scalar", source, "it must be a positive number (queries are scaled by "
                       "its inverse square root)")
    window = _window(hf, source)
    rope = _rope(hf, source, "full_attention" if family == "gemma3" else None)
    local = dict(local_rope=_rope(hf, source, "sliding_attention")) if family == "gemma3" else {}
    return dict(head_dim=rope.head_dim, rope=rope, query_scale=scalar ** -0.5,
                sliding_window=window, sliding_layers=_sliding_layers(hf, source, window, needs_window=True),
                **caps, **local)


def _granite_fields(hf, source: str) -> dict:
    keys = dict(embedding_multiplier="embedding_multiplier", residual_multiplier="residual_multiplier",
                query_scale="attention_multiplier", logits_scaling="logits_scaling")
    return {field: _positive(hf, key, source, "Granite's multipliers are positive finite numbers", default=1.0)
            for field, key in keys.items()}


def _positive(hf, key: str, source: str, rule: str, default=None, optional: bool = False) -> float | None:
    """``hf.<key>`` as a float, refused with ``rule`` unless a positive finite number (or None if ``optional``)."""
    value = getattr(hf, key, default)
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise LoadError(f"{source}: {key}={value!r}; {rule}")
    return float(value)


def _olmo_fields(hf, source: str, model_type: str) -> dict:
    """OLMo 2: Llama's RoPE; OLMo 3 adds windows from ``layer_types`` with a RoPE per layer type."""
    if model_type == "olmo2":
        rope = _rope(hf, source)
        return dict(head_dim=rope.head_dim, rope=rope)
    rope, window = _rope(hf, source, "full_attention"), _window(hf, source)
    sliding = _sliding_layers(hf, source, window, needs_window=True)
    return dict(head_dim=rope.head_dim, rope=rope, local_rope=_rope(hf, source, "sliding_attention"),
                sliding_window=window, sliding_layers=sliding if any(sliding) else ())


def _nope_layers(hf, source: str) -> tuple[bool, ...]:
    """SmolLM3's ``no_rope_layers`` (per layer: 1 uses RoPE, 0 does not; as in transformers, entries past
    the last layer are not read) as per-layer 'no RoPE' flags."""
    flags = getattr(hf, "no_rope_layers", None)
    if flags is None:
        return ()
    if (not isinstance(flags, (list, tuple)) or len(flags) < hf.num_hidden_layers
            or any(f not in (0, 1) or isinstance(f, float) for f in flags)):
        raise LoadError(f"{source}: no_rope_layers must list 1 (RoPE) or 0 (no RoPE) for each of the "
                        f"{hf.num_hidden_layers} layers (got {flags!r})")
    return tuple(not f for f in flags[:hf.num_hidden_layers])


def _window(hf, source: str) -> int | None:
    window = getattr(hf, "sliding_window", None)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise LoadError(f"{source}: sliding_window={window!r}; it must be a positive integer (tokens) or null")
    return window


def _sliding_layers(hf, source: str, window, needs_window: bool = False) -> tuple[bool, ...]:
    """Per layer: sliding-window attention, from ``layer_types`` (none without a ``sliding_window``, unless
    ``needs_window``: families whose sliding layers transformers cannot run without one)."""
    types = tuple(getattr(hf, "layer_types", None) or ("full_attention",) * hf.num_hidden_layers)
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != hf.num_hidden_layers:
        extra = f", unknown {unknown}" if unknown else ""
        raise LoadError(f"{source}: layer_types must list 'sliding_attention' / 'full_attention' for each of the "
                        f"{hf.num_hidden_layers} layers (got {len(types)} entries{extra})")
    if needs_window and window is None and "sliding_attention" in types:
        raise LoadError(f"{source}: layer_types lists sliding_attention layers but sliding_window is null; set "
                        "sliding_window (tokens) or make those layers full_attention")
    return tuple(window is not None and t == "sliding_attention" for t in types)


# --------------------------------------------------------------------------- checkpoint layouts

# Phi-3 checkpoints stack several of our projections' weights by rows into one tensor per layer
FUSED = {"phi3": {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}}


def projection_rows(spec: DecoderSpec, proj: str) -> int:
    """The output size of one of a layer's projections (``q_proj``, ..., ``down_proj``)."""
    if proj in ("gate_proj", "up_proj"):
        return spec.intermediate_size
    if proj in ("o_proj", "down_proj"):
        return spec.hidden_size
    return (spec.num_heads if proj == "q_proj" else spec.num_kv_heads) * spec.head_dim


def fused_source(spec: DecoderSpec, name: str) -> tuple[str, int, int, int] | None:
    """Where a family that fuses projections in its checkpoints (Phi-3) keeps our per-layer weight ``name``
    (``layers.<i>.<block>.<proj>.kernel``): (the fused weight's name in our naming, first row, end row, the
    fused weight's rows), rows in the checkpoint's ``[d_out, d_in]`` layout; None where it is stored as itself."""
    m = re.fullmatch(r"(layers\.\d+)\.(self_attn|mlp)\.(\w+)\.kernel", name)
    for fused, parts in FUSED.get(spec.family, {}).items() if m else ():
        if fused.startswith(m[2] + ".") and m[3] in parts:
            sizes = [projection_rows(spec, p) for p in parts]
            start = sum(sizes[: parts.index(m[3])])
            return f"{m[1]}.{fused}.kernel", start, start + sizes[parts.index(m[3])], sum(sizes)
    return None


def fuse_for_checkpoint(spec: DecoderSpec, tensors):
    """(name, ``[d_out, d_in]`` weight) pairs in our naming -> the same with the projections a family fuses
    (Phi-3) joined as its checkpoints store them; a fused weight is yielded once all its parts have come."""
    pending: dict[str, dict[int, object]] = {}
    for name, weight in tensors:
        where = fused_source(spec, name)
        if where is None:
            yield name, weight
            continue
        fused, start, _, rows = where
        parts = pending.setdefault(fused, {})
        parts[start] = weight
        if sum(part.shape[0] for part in parts.values()) == rows:
            yield fused, np.concatenate([parts[k] for k in sorted(parts)], axis=0)
            del pending[fused]
    if pending:  # a fused weight must never be left out of a checkpoint
        raise ValueError(f"parts of {sorted(pending)} never came: a checkpoint needs all of them")
