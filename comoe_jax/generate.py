"""Greedy generation with a KV cache: one jitted prefill plus a ``lax.scan`` of single-token steps.

Prompts are left-padded, so every row's last prompt token sits at the same slot and
positions count real tokens only (as Hugging Face ``generate`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from comoe_jax import sharding as shd
from comoe_jax.model import CausalLM

LENGTH_BUCKETS = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)  # padded lengths: a few compiles, <= 1.5x padding


def bucket(length: int, buckets: tuple[int, ...] | int = LENGTH_BUCKETS) -> int:
    """The smallest bucket >= ``length`` (multiples of the largest beyond it); an int: the next multiple of it."""
    if isinstance(buckets, int):
        return -(-length // buckets) * buckets
    for size in buckets:
        if length <= size:
            return size
    return -(-length // buckets[-1]) * buckets[-1]


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """The tokens that end a generation: the tokenizer's EOS and the ``eos_token_id`` of the model folder's
    generation config, as transformers' ``generate`` stops. Chat models end a turn with a token of their own
    that is not always the tokenizer's EOS (Gemma 3 instruct: ``<end_of_turn>`` beside ``<eos>``)."""
    ids = [tokenizer.eos_token_id, *getattr(tokenizer, "generation_eos_ids", ())]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


@partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(graphdef, state, ids, mask, max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int):
    model: CausalLM = nnx.merge(graphdef, state)
    batch, prompt_len = ids.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    valid = jnp.concatenate([mask, jnp.ones((batch, max_new_tokens), mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    hidden, cache = model.hidden(ids, valid, positions, cache=cache, cache_index=0)
    first = jnp.argmax(model.head(hidden[:, -1]), axis=-1).astype(jnp.int32)  # the LM head at the last slot only
    stop = jnp.asarray(eos_ids, jnp.int32)
    limit = model.spec.reencode_at

    def step(carry, _):
        token, cache, position, index, done, seq = carry
        if limit is not None:
            seq = jax.lax.dynamic_update_slice(seq, token[:, None], (0, index))
            cache = _reencode(model, seq, valid, index, position == limit, cache)
        out = model.forward(token[:, None], valid, position[:, None], cache=cache, cache_index=index)
        nxt = jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_id, nxt)
        return (nxt, out.cache, position + 1, index + 1, done | jnp.isin(nxt, stop), seq), token

    seq = jnp.concatenate([ids, jnp.zeros((batch, max_new_tokens), ids.dtype)], axis=1) if limit is not None else None
    carry = (first, cache, positions[:, -1] + 1, jnp.int32(prompt_len), jnp.isin(first, stop), seq)
    _, tokens = jax.lax.scan(step, carry, None, length=max_new_tokens)
    return tokens.T  # [B, max_new_tokens]; after EOS: pad


def _reencode(model: CausalLM, seq, valid, index, crossing, cache):
    """The cache of the rows whose next token is the first past ``spec.reencode_at`` (``crossing [B]``)
    rebuilt from all their tokens so far (``seq [B, S]``, slots up to ``index``), as transformers' Phi-3
    generate does once; the other rows keep theirs. Slots past ``index`` hold pad keys that later steps
    overwrite before any query sees them."""
    def rebuild(cache):
        seen = valid * (jnp.arange(seq.shape[1]) <= index)[None].astype(valid.dtype)
        positions = jnp.maximum(jnp.cumsum(seen, axis=1) - 1, 0).astype(jnp.int32)
        fresh = model.hidden(seq, seen, positions, cache=jax.tree.map(jnp.zeros_like, cache), cache_index=0)[1]
        return jax.tree.map(lambda new, old: jnp.where(crossing[None, :, None, None, None], new, old), fresh, cache)

    return jax.lax.cond(jnp.any(crossing), rebuild, lambda cache: cache, cache)


def greedy_generate(model: CausalLM, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int | Sequence[int],
                    pad_id: int, batch_size: int = 16, progress=None) -> list[list[int]]:
    """Greedy continuations of token-id prompts, cut at the first end token (``eos_id``: one id or several, as
    a generation config's ``eos_token_id`` list; not included). Prompt lengths are padded to
    :data:`LENGTH_BUCKETS` (a few compiles); ``progress(done, total)`` is called per batch."""
    eos_ids = tuple(sorted({int(eos_id)} if isinstance(eos_id, (int, np.integer)) else set(map(int, eos_id))))

    graphdef, state = nnx.split(model)
    mesh, batch_size = shd.eval_mesh(state, batch_size)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        length = bucket(max(len(p) for p in chunk))
        ids = np.full((batch_size, length), pad_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for row, p in enumerate(chunk):
            ids[row, length - len(p):], mask[row, length - len(p):] = p, 1
        mask[len(chunk):, -1] = 1  # filler rows: one real token so nothing is fully masked
        ids, mask = shd.place_rows(mesh, ids, mask)
        tokens = shd.to_host(_generate(graphdef, state, ids, mask, max_new_tokens, eos_ids, pad_id))
        for row in range(len(chunk)):
            seq = tokens[row].tolist()
            end = next((i for i, token in enumerate(seq) if token in eos_ids), len(seq))
            out.append(seq[:end])
        if progress is not None:
            progress(len(chunk), len(prompts))
    return out
