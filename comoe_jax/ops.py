"""The paper's math as pure functions: router, LoRA experts, contrastive term, aux losses.

No Flax in here. Shape letters: ``...`` any leading token axes (batch, time),
``n`` experts, ``k`` experts kept by top-k routing, ``r`` LoRA rank,
``d_in`` / ``d_out`` the frozen layer's widths, ``m`` sampled negatives.

Storage layout follows Flax kernels (``y = x @ W``): expert i has
``a[i]`` of shape ``[d_in, r]`` and ``b[i]`` of shape ``[r, d_out]``; the paper's
``A_i`` / ``B_i`` are their transposes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Norms below this are treated as this (as torch.nn.functional.normalize does, with
# a float32-safe floor), so zero expert outputs (B = 0 at step 0) give cosine 0 and
# finite gradients.
NORM_EPS = 1e-6


# --------------------------------------------------------------------------- router


def _at_least_f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def router_probs(router_logits: jax.Array) -> jax.Array:
    """Softmax over the expert axis in (at least) float32. ``[..., n] -> [..., n]``."""
    return jax.nn.softmax(_at_least_f32(router_logits), axis=-1)


def topk_route(router_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k routing with renormalised weights (SPEC section 1).

    Args:
      router_logits: ``[..., n]`` logits ``G x``.
      k: experts kept per token, ``1 <= k <= n``.
    Returns:
      weights ``[..., n]`` float32: the k largest softmax probabilities divided by
      their sum, zeros elsewhere; indices ``[..., k]`` int32, by decreasing weight.
    """
    n = router_logits.shape[-1]
    top, indices = jax.lax.top_k(router_probs(router_logits), k)
    top = top / jnp.sum(top, axis=-1, keepdims=True)
    weights = jnp.einsum("...k,...kn->...n", top, jax.nn.one_hot(indices, n, dtype=top.dtype))
    return weights, indices


def active_mask(topk_indices: jax.Array, n: int) -> jax.Array:
    """``[..., k]`` expert indices -> ``[..., n]`` bool, True where the expert is activated."""
    return jnp.any(jax.nn.one_hot(topk_indices, n, dtype=jnp.bool_), axis=-2)


# --------------------------------------------------------------------------- dropout

DROPOUT_LEVELS = 1 << 16  # the drop probability is rounded to a multiple of 1 / 65536


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout of ``x [..., d]``: each element is zeroed with probability ``rate`` (rounded to a
    multiple of 1 / 65536, at most 65535 / 65536) and the kept ones are scaled by ``1 / (1 - rate)``
    (in float32), so the mean is unchanged.

    Each 32-bit random word gives two neighbouring elements their 16-bit draws (low half, high half):
    half the random bits of ``jax.random.bernoulli`` (one threefry hash per element), which on a CPU is
    a large share of the step. Word ``j`` serves elements ``2j, 2j + 1``, so an ``x`` sharded on any
    axis (batch, or the last axis under tensor parallelism) draws its words where it lives.
    """
    threshold = min(round(rate * DROPOUT_LEVELS), DROPOUT_LEVELS - 1)
    if threshold == 0:
        return x
    d = x.shape[-1]
    words = jax.random.bits(key, (*x.shape[:-1], -(-d // 2)), jnp.uint32)
    draws = jnp.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(*x.shape[:-1], -1)[..., :d]
    keep = draws >= threshold
    scale = DROPOUT_LEVELS / (DROPOUT_LEVELS - threshold)
    return jnp.where(keep, (x.astype(jnp.float32) * scale).astype(x.dtype), jnp.zeros((), x.dtype))


# --------------------------------------------------------------------------- experts


def lora_expert(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """One expert ``E(x) = B A x``. ``x [..., d_in], a [d_in, r], b [r, d_out] -> [..., d_out]``."""
    return (x @ a) @ b


def expert_outputs(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """Every expert's output, ``lora_expert`` vmapped over the expert axis.

    ``x [..., d_in], a [n, d_in, r], b [n, r, d_out] -> [..., n, d_out]``.
    """
    return jax.vmap(lora_expert, in_axes=(None, 0, 0), out_axes=-2)(x, a, b)


def expert_hidden(x: jax.Array, a: jax.Array) -> jax.Array:
    """The rank-r codes ``h_i = A_i x`` of every expert. ``[..., d_in], [n, d_in, r] -> [..., n, r]``."""
    return jax.vmap(jnp.matmul, in_axes=(None, 0), out_axes=-2)(x, a)


def mix_experts(h: jax.Array, weights: jax.Array, b: jax.Array) -> jax.Array:
    """``sum_i g_i B_i h_i`` as one matmul with the concatenated B's.

    ``h [..., n, r], weights [..., n], b [n, r, d_out] -> [..., d_out]``.
    """
    n, r, d_out = b.shape
    gh = (weights[..., None].astype(h.dtype) * h).reshape(*h.shape[:-2], n * r)
    return gh @ b.reshape(n * r, d_out)


# --------------------------------------------------------------------------- sparse experts


class ExpertDispatch(NamedTuple):
    """Rows (one per token and selected expert) grouped by expert into blocks of ``block`` rows, every
    block owned by one expert (MegaBlocks-style, dropless: no row is ever dropped).

    ``source [P]``: the row each blocked slot holds (``R``, one past the last row: an empty slot);
    ``dest [R]``: the blocked slot of each row; ``block_expert [P // block]``: each block's expert.
    ``P = (ceil(R / block) + n) * block`` is a static bound on the padded row count.
    """

    source: jax.Array
    dest: jax.Array
    block_expert: jax.Array
    block: int


def dispatch_block(rows: int, n: int) -> int:
    """A power-of-two block size for ``rows`` rows over ``n`` experts, 8 to 128 rows: each block is a
    usable matmul (on a CPU blocks of 32 to 64 rows run several times faster per FLOP than blocks of 8
    or 16), while the static bound on blocked rows, ``rows + n * block``, stays at most twice the rows
    (typical padding is about ``n * block / 2``)."""
    target = max(rows // n, 8)
    return min(1 << (target.bit_length() - 1), 128)


def dispatch(experts: jax.Array, n: int, block: int) -> ExpertDispatch:
    """The plan that groups rows by their expert. ``experts [R]`` int in ``[0, n)`` -> :class:`ExpertDispatch`."""
    rows = experts.shape[0]
    num_blocks = -(-rows // block) + n
    experts = experts.astype(jnp.int32)
    counts = jnp.zeros(n, jnp.int32).at[experts].add(1)
    padded = -(-counts // block) * block
    start, padded_start = jnp.cumsum(counts) - counts, jnp.cumsum(padded) - padded
    order = jnp.argsort(experts, stable=True)
    rank = jnp.zeros(rows, jnp.int32).at[order].set(jnp.arange(rows, dtype=jnp.int32)) - start[experts]
    dest = padded_start[experts] + rank
    source = jnp.full(num_blocks * block, rows, jnp.int32).at[dest].set(jnp.arange(rows, dtype=jnp.int32),
                                                                       unique_indices=True)
    owner = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(num_blocks, dtype=jnp.int32) * block, side="right")
    # Materialised here: an index computation fused into a row gather runs per element on XLA:CPU
    # (tens of times slower than gathering with ready indices).
    source, dest, owner = jax.lax.optimization_barrier((source, dest, jnp.minimum(owner, n - 1).astype(jnp.int32)))
    return ExpertDispatch(source, dest, owner, block)


def _take_rows(table: jax.Array, index: jax.Array, block: int | None = None) -> jax.Array:
    """``table [N, w]`` rows at ``index [M]`` (in range), or a zero row where ``index == N``; with
    ``block``, reshaped to ``[M // block, block, w]``."""
    padded = jnp.concatenate([table, jnp.zeros((1, table.shape[-1]), table.dtype)])
    rows = jnp.take(padded, index, axis=0, mode="clip")  # in range by construction: skip fill masking
    return rows if block is None else rows.reshape(-1, block, table.shape[-1])


def _blocked_inputs(x, a, b, source, block_expert, s: int, block: int):
    """Tokens in blocked slots ``[G, block, d_in]`` (zeros in empty slots) and each block's expert weights
    ``[G, d_in, r]``, ``[G, r, d_out]``."""
    token = source // s  # slot -> its row's token; empty slots (source = T s) -> the zero row T
    weights = (jnp.take(w, block_expert, axis=0, mode="clip") for w in (a, b))
    return _take_rows(x, token, block), *weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _selected_lora(x, a, b, source, dest, block_expert, s: int, block: int):
    """One group: ``x [T, d_in]`` with the plan of its ``T * s`` rows -> codes ``[T * s, r]``, outputs
    ``[T * s, d_out]``. A custom VJP so that the backward pass gathers with the plan's inverse map
    instead of scatter-adding (slow on XLA:CPU), and keeps only the small codes, not the per-block weight
    copies, for the backward pass."""
    return _selected_lora_fwd(x, a, b, source, dest, block_expert, s, block)[0]


def _selected_lora_fwd(x, a, b, source, dest, block_expert, s, block):
    xb, ab, bb = _blocked_inputs(x, a, b, source, block_expert, s, block)
    hb = jnp.einsum("gbd,gdr->gbr", xb, ab)
    eb = jnp.einsum("gbr,gro->gbo", hb, bb)
    codes, outputs = (jnp.take(v.reshape(-1, v.shape[-1]), dest, axis=0, mode="clip") for v in (hb, eb))
    return (codes, outputs), (x, a, b, source, dest, block_expert, hb)


def _selected_lora_bwd(s, block, residuals, cotangents):
    x, a, b, source, dest, block_expert, hb = residuals
    d_codes, d_outputs = cotangents
    n = a.shape[0]
    xb, ab, bb = _blocked_inputs(x, a, b, source, block_expert, s, block)
    # "rows = blocked[dest]" maps rows one-to-one onto slots, so its transpose is "blocked = rows[source]".
    d_eb = _take_rows(d_outputs, source, block)
    d_hb = _take_rows(d_codes, source, block) + jnp.einsum("gbo,gro->gbr", d_eb, bb)
    # Blocks of one expert are adjacent (sorted owners): their weight gradients are a sorted segment sum.
    d_b = jax.ops.segment_sum(jnp.einsum("gbr,gbo->gro", hb, d_eb), block_expert, n, indices_are_sorted=True)
    d_a = jax.ops.segment_sum(jnp.einsum("gbr,gbd->grd", d_hb, xb), block_expert, n, indices_are_sorted=True)
    d_xb = jnp.einsum("gbr,gdr->gbd", d_hb, ab)
    d_rows = jnp.take(d_xb.reshape(-1, d_xb.shape[-1]), dest, axis=0, mode="clip")
    d_x = d_rows.reshape(x.shape[0], s, -1).sum(axis=1)  # a token's s rows
    return d_x.astype(x.dtype), jnp.swapaxes(d_a, 1, 2).astype(a.dtype), d_b.astype(b.dtype), None, None, None


_selected_lora.defvjp(_selected_lora_fwd, _selected_lora_bwd)


def _selected_group(x, a, b, experts, block):
    """:func:`selected_expert_outputs` of one group: ``x [T, d_in], experts [T, s]``."""
    t, s = experts.shape
    plan = dispatch(experts.reshape(t * s), a.shape[0], block)
    codes, outputs = _selected_lora(x, a, b, plan.source, plan.dest, plan.block_expert, s, block)
    return codes.reshape(t, s, -1), outputs.reshape(t, s, -1)


def selected_expert_outputs(x: jax.Array, a: jax.Array, b: jax.Array, experts: jax.Array,
                            block: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Codes and outputs of only the experts each token selects (sparse experts).

    Rows are grouped by expert into blocks (:func:`dispatch`) and each block runs one expert's
    matmuls, so the cost is ``2 (T s + n block) r (d_in + d_out)`` instead of the dense
    ``2 T n r (d_in + d_out)``. Each leading index is one group dispatched on its own: give every
    device's share of the batch as one group (bigger groups waste less padding), so a batch sharded
    over devices is never sorted across them.

    Args:
      x: ``[..., T, d_in]`` tokens (dropout already applied), ``T`` tokens per group.
      a, b: ``[n, d_in, r]`` and ``[n, r, d_out]``.
      experts: ``[..., T, s]`` int, the experts each token needs (distinct per token).
      block: rows per block (default :func:`dispatch_block`).
    Returns:
      codes ``[..., T, s, r]`` (``h_j = A_j x``) and outputs ``[..., T, s, d_out]`` (``E_j(x) = B_j h_j``).
    """
    t, s = experts.shape[-2:]
    block = block or dispatch_block(t * s, a.shape[0])
    lead = x.shape[:-2]
    xs, es = x.reshape(-1, t, x.shape[-1]), experts.reshape(-1, t, s)
    codes, outputs = jax.vmap(_selected_group, in_axes=(0, None, None, 0, None))(xs, a, b, es, block)
    return codes.reshape(*lead, t, s, -1), outputs.reshape(*lead, t, s, -1)


def inactive_experts(topk_indices: jax.Array, n: int) -> jax.Array:
    """Every expert a token did not activate, in index order. ``[..., k] -> [..., n - k]`` int32."""
    k = topk_indices.shape[-1]
    return jnp.argsort(active_mask(topk_indices, n), axis=-1, stable=True)[..., : n - k].astype(jnp.int32)


def gram_matrix(b: jax.Array) -> jax.Array:
    """Gram blocks of the B's: ``G[i, j] = B_i B_j^T``. ``[n, r, d_out] -> [n, n, r, r]``.

    With ``h_i = A_i x``: ``E_i(x) . E_j(x) = h_i^T G[i, j] h_j``, so the contrastive
    term never needs the ``d_out``-wide expert outputs.
    """
    b = _at_least_f32(b)
    return jnp.einsum("ipd,jqd->ijpq", b, b)


def soft_route(router_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Soft routing (the OMoE baseline): every expert weighted by its softmax probability.

    ``[..., n] -> weights [..., n]`` float32 (sum 1, none zero) and the ``k`` most probable
    experts ``[..., k]``, which count as "activated" for statistics and auxiliary terms.
    """
    probs = router_probs(router_logits)
    return probs, jax.lax.top_k(probs, k)[1]


def dora_column_scale(kernel: jax.Array, a: jax.Array, b: jax.Array, scaling: float,
                      magnitude: jax.Array) -> jax.Array:
    """DoRA's ``m / ||W0 + s B_i A_i||`` per expert and output unit, the norm detached (as peft does).

    ``kernel [d_in, d_out], a [n, d_in, r], b [n, r, d_out], magnitude [n, d_out] -> [n, d_out]``
    float32. The norm of each output unit runs over the input axis (peft's ``dim=1`` of
    torch's ``[d_out, d_in]`` weight). It is expanded as
    ``||w0||^2 + 2 s (A^T w0) . b + s^2 b^T (A^T A) b`` per column, so the ``[n, d_in, d_out]``
    adapted weights are never formed (the cost is one ``r x d_in x d_out`` product per expert).
    """
    w0, a, b = _at_least_f32(kernel), _at_least_f32(a), _at_least_f32(b)
    cross = jnp.einsum("nir,io->nro", a, w0)  # A_i^T W0
    gram_a = jnp.einsum("nir,nis->nrs", a, a)
    squared = (jnp.sum(w0 * w0, axis=0) + 2 * scaling * jnp.sum(cross * b, axis=1)
               + scaling**2 * jnp.einsum("nro,nrs,nso->no", b, gram_a, b))
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(squared, 0.0)))
    return magnitude / norm


def expert_gram(h: jax.Array, gram: jax.Array) -> jax.Array:
    """Per-token dot products of the expert outputs, ``M[i, j] = E_i . E_j = h_i^T G[i, j] h_j``.

    ``h [..., n, r], gram [n, n, r, r] -> [..., n, n]``.
    """
    h = _at_least_f32(h)
    return jnp.einsum("...ip,ijpq,...jq->...ij", h, gram, h)


def gram_schmidt_weights(h: jax.Array, gram: jax.Array, weights: jax.Array, ridge: float = 1e-5) -> jax.Array:
    """Router weights that mix Gram-Schmidt-orthogonalised expert outputs (OMoE's constraint).

    Gram-Schmidt in expert order turns the outputs ``E_i`` into orthogonal ``O_i`` (the part
    of ``E_i`` orthogonal to ``E_1..E_{i-1}``, not renormalised). With the Cholesky
    factor ``L`` of the outputs' Gram matrix, ``O = E L^{-T} diag(L)``, so
    ``sum_i g_i O_i = sum_j g'_j E_j`` with ``g' = L^{-T} (diag(L) g)``: the orthogonalised
    mixture is the ordinary one with these weights, from rank-r codes only. A ridge
    ``ridge * mean diag(M) + 1e-10`` keeps zero or dependent outputs (B = 0 at step 0) finite;
    with all outputs zero, ``g' = g``.

    ``h [..., n, r], gram [n, n, r, r], weights [..., n] -> [..., n]`` float32.
    """
    m = expert_gram(h, gram)
    n = m.shape[-1]
    floor = ridge * jnp.mean(jnp.diagonal(m, axis1=-2, axis2=-1), axis=-1)[..., None, None] + 1e-10
    chol = jnp.linalg.cholesky(m + floor * jnp.eye(n, dtype=m.dtype))
    v = jnp.diagonal(chol, axis1=-2, axis2=-1) * weights.astype(m.dtype)
    return jax.scipy.linalg.solve_triangular(chol, v[..., None], lower=True, trans=1)[..., 0]


# --------------------------------------------------------------------------- contrastive term


def info_nce(logits: jax.Array, positive: jax.Array, negative: jax.Array, eps: float) -> jax.Array:
    """``-log(sum_pos exp(s) / (sum_{pos+neg} exp(s) + eps))`` along the last axis.

    ``logits [..., c]`` (similarities already divided by tau), boolean masks
    ``[..., c]`` -> ``[...]``. Computed with log-sum-exps so no temperature overflows.
    """
    lse_pos = jax.nn.logsumexp(jnp.where(positive, logits, -jnp.inf), axis=-1)
    lse_all = jax.nn.logsumexp(jnp.where(positive | negative, logits, -jnp.inf), axis=-1)
    log_eps = jnp.log(jnp.asarray(eps, logits.dtype))
    return jnp.logaddexp(lse_all, log_eps) - lse_pos


def sample_anchor_slot(key: jax.Array, shape: tuple[int, ...], k: int) -> jax.Array:
    """Algorithm 1 step 1: a uniform slot in ``{0..k-1}`` per token. -> ``shape`` int32."""
    return jax.random.randint(key, shape, 0, k, dtype=jnp.int32)


def sample_negatives(key: jax.Array, topk_indices: jax.Array, n: int, m: int) -> jax.Array:
    """Fixed-size negatives (appendix H): m inactive experts per token, uniform, no replacement.

    ``topk_indices [..., k] -> [..., m]`` int32. Requires ``m <= n - k``.
    """
    scores = jax.random.uniform(key, topk_indices.shape[:-1] + (n,))
    scores = jnp.where(active_mask(topk_indices, n), -1.0, scores)
    return jax.lax.top_k(scores, m)[1].astype(jnp.int32)


def _inv_norm(squared: jax.Array) -> jax.Array:
    """``1 / max(||v||, NORM_EPS)`` from ``||v||^2``; a product, not a quotient, so
    gradients stay finite when v = 0."""
    return jax.lax.rsqrt(jnp.maximum(squared, NORM_EPS**2))


def _expert_masks(topk_indices, anchors, n, negative_indices):
    """Positives / negatives over the n experts for each anchor: ``[..., A, n]`` bool each."""
    active = active_mask(topk_indices, n)
    positive = active[..., None, :] & ~jax.nn.one_hot(anchors, n, dtype=jnp.bool_)
    negative = ~active if negative_indices is None else active_mask(negative_indices, n)
    return positive, jnp.broadcast_to(negative[..., None, :], positive.shape)


def _anchor_experts(topk_indices, anchor_slot):
    """Expert index of each anchor: ``[..., 1]`` for a slot, ``[..., k]`` for every slot."""
    if anchor_slot is None:
        return topk_indices
    return jnp.take_along_axis(topk_indices, anchor_slot[..., None].astype(jnp.int32), axis=-1)


def _reference(expert_out, topk_indices, anchor_slot, temperature, eps, negative_indices):
    n = expert_out.shape[-2]
    e = _at_least_f32(expert_out)
    e = e * _inv_norm(jnp.sum(e * e, axis=-1, keepdims=True))
    anchors = _anchor_experts(topk_indices, anchor_slot)
    q = jnp.take_along_axis(e, anchors[..., None], axis=-2)  # [..., A, d]
    logits = jnp.einsum("...ad,...nd->...an", q, e) / temperature
    positive, negative = _expert_masks(topk_indices, anchors, n, negative_indices)
    return jnp.sum(info_nce(logits, positive, negative, eps), axis=-1)


def contrastive_loss(
    expert_out: jax.Array,
    topk_indices: jax.Array,
    anchor_slot: jax.Array,
    *,
    temperature: float,
    eps: float = 1e-3,
    negative_indices: jax.Array | None = None,
) -> jax.Array:
    """Per-token InfoNCE of Algorithm 1 (SPEC section 2), reference form.

    Args:
      expert_out: ``[..., n, d_out]`` every expert's output ``E_j(x)``.
      topk_indices: ``[..., k]`` activated experts.
      anchor_slot: ``[...]`` int, which activated slot is the anchor (query).
      temperature: tau > 0.
      eps: added to the denominator, as in the paper.
      negative_indices: ``[..., m]`` sampled negatives; None uses every inactive expert.
    Returns:
      ``[...]`` float32 loss. The anchor is neither a positive nor in the denominator.
    """
    return _reference(expert_out, topk_indices, anchor_slot, temperature, eps, negative_indices)


def contrastive_loss_all_anchors(
    expert_out: jax.Array,
    topk_indices: jax.Array,
    *,
    temperature: float,
    eps: float = 1e-3,
    negative_indices: jax.Array | None = None,
) -> jax.Array:
    """Eq. 12 form: the Algorithm 1 loss summed over every activated expert as anchor.

    Same arguments as :func:`contrastive_loss` without ``anchor_slot``. -> ``[...]``.
    """
    return _reference(expert_out, topk_indices, None, temperature, eps, negative_indices)


def _gram_dense_logits(h, gram, anchors, temperature):
    """Cosine/tau of each anchor against all n experts from the Gram blocks. -> ``[..., A, n]``.

    Cost per token: ``A n^2 r^2`` multiply-adds, independent of ``d_out``.
    """
    n, r = h.shape[-2], h.shape[-1]
    num_anchors = anchors.shape[-1]
    diag = jnp.einsum("iipq->ipq", gram)
    squared = jnp.einsum("...jp,jpq,...jq->...j", h, diag, h)  # ||E_j||^2
    onehot = jax.nn.one_hot(anchors, n, dtype=h.dtype)  # [..., A, n]
    z = (onehot[..., None] * h[..., None, :, :]).reshape(*h.shape[:-2], num_anchors, n * r)
    gram_cat = gram.transpose(0, 2, 1, 3).reshape(n * r, n * r)
    y = (z @ gram_cat).reshape(*h.shape[:-2], num_anchors, n, r)
    dots = jnp.sum(y * h[..., None, :, :], axis=-1)  # E_a . E_j
    inv_anchor = _inv_norm(jnp.take_along_axis(squared, anchors, axis=-1))
    return dots * inv_anchor[..., None] * _inv_norm(squared)[..., None, :] / temperature


def _other_slots(k: int) -> jax.Array:
    """``[k, k-1]`` table: for each slot, the other slots in order."""
    return jnp.array([[j for j in range(k) if j != s] for s in range(k)], dtype=jnp.int32).reshape(k, k - 1)


def _gram_gathered_logits(h, gram, topk_indices, anchor_slot, negative_indices, temperature):
    """Cosine/tau of each anchor against its k-1 positives then its m negatives. -> ``[..., A, k-1+m]``.

    Gathers only the needed Gram blocks: cost per token ``A (k-1+m) r^2``, independent of n.
    """
    k = topk_indices.shape[-1]
    slots = jnp.arange(k, dtype=jnp.int32) if anchor_slot is None else anchor_slot[..., None]
    slots = jnp.broadcast_to(slots, topk_indices.shape[:-1] + slots.shape[-1:])
    anchors = jnp.take_along_axis(topk_indices, slots, axis=-1)  # [..., A]
    others = _other_slots(k)[slots]  # [..., A, k-1]
    positives = jnp.take_along_axis(topk_indices[..., None, :], others, axis=-1)
    negatives = jnp.broadcast_to(negative_indices[..., None, :], anchors.shape + negative_indices.shape[-1:])
    candidates = jnp.concatenate([positives, negatives], axis=-1)  # [..., A, C]

    def rows(idx):  # h rows for an index array [..., *s] -> [..., *s, r]
        flat = idx.reshape(*idx.shape[: h.ndim - 2], -1)
        return jnp.take_along_axis(h, flat[..., None], axis=-2).reshape(*idx.shape, h.shape[-1])

    h_a, h_c = rows(anchors), rows(candidates)
    diag = jnp.einsum("iipq->ipq", gram)
    dots = jnp.einsum("...ap,...acpq,...acq->...ac", h_a, gram[anchors[..., None], candidates], h_c)
    sq_a = jnp.einsum("...ap,...apq,...aq->...a", h_a, diag[anchors], h_a)
    sq_c = jnp.einsum("...acp,...acpq,...acq->...ac", h_c, diag[candidates], h_c)
    return dots * _inv_norm(sq_a)[..., None] * _inv_norm(sq_c) / temperature


def _gram(h, gram, topk_indices, anchor_slot, temperature, eps, negative_indices):
    h = _at_least_f32(h)
    gram = gram.astype(h.dtype)
    n, k = h.shape[-2], topk_indices.shape[-1]
    if negative_indices is None:
        anchors = _anchor_experts(topk_indices, anchor_slot)
        logits = _gram_dense_logits(h, gram, anchors, temperature)
        positive, negative = _expert_masks(topk_indices, anchors, n, None)
    else:
        logits = _gram_gathered_logits(h, gram, topk_indices, anchor_slot, negative_indices, temperature)
        positive = jnp.arange(logits.shape[-1]) < k - 1
        positive, negative = jnp.broadcast_to(positive, logits.shape), jnp.broadcast_to(~positive, logits.shape)
    return jnp.sum(info_nce(logits, positive, negative, eps), axis=-1)


def contrastive_loss_gram(
    h: jax.Array,
    gram: jax.Array,
    topk_indices: jax.Array,
    anchor_slot: jax.Array,
    *,
    temperature: float,
    eps: float = 1e-3,
    negative_indices: jax.Array | None = None,
) -> jax.Array:
    """Algorithm 1 from the rank-r codes and the Gram blocks (the training path).

    Equal to :func:`contrastive_loss` on ``expert_outputs``; never forms ``[..., n, d_out]``.

    Args:
      h: ``[..., n, r]`` codes ``A_i x`` (from :func:`expert_hidden`).
      gram: ``[n, n, r, r]`` from :func:`gram_matrix` (once per step, shared by all tokens).
      topk_indices, anchor_slot, temperature, eps, negative_indices: as in
        :func:`contrastive_loss`. With ``negative_indices`` only the needed Gram
        blocks are gathered, so the cost stops growing with n.
    Returns:
      ``[...]`` float32 loss.
    """
    return _gram(h, gram, topk_indices, anchor_slot, temperature, eps, negative_indices)


def contrastive_loss_gram_all_anchors(
    h: jax.Array,
    gram: jax.Array,
    topk_indices: jax.Array,
    *,
    temperature: float,
    eps: float = 1e-3,
    negative_indices: jax.Array | None = None,
) -> jax.Array:
    """Eq. 12 form of :func:`contrastive_loss_gram` (summed over every activated anchor). -> ``[...]``."""
    return _gram(h, gram, topk_indices, None, temperature, eps, negative_indices)


def contrastive_loss_selected(
    outputs: jax.Array,
    k: int,
    anchor_slot: jax.Array | None,
    *,
    temperature: float,
    eps: float = 1e-3,
) -> jax.Array:
    """Algorithm 1 on the outputs of only the experts a token selected (sparse experts).

    Args:
      outputs: ``[..., s, d_out]``: slots ``0..k-1`` the activated experts, slots ``k..s-1`` its
        negatives (sampled, or every inactive expert), from :func:`selected_expert_outputs`.
      k: activated experts per token.
      anchor_slot: ``[...]`` int in ``[0, k)``; None sums over every activated anchor (Eq. 12).
      temperature, eps: as in :func:`contrastive_loss`.
    Returns:
      ``[...]`` float32, equal to :func:`contrastive_loss` on every expert's output with the same
      activated experts and negatives.
    """
    lead, s = outputs.shape[:-2], outputs.shape[-2]
    slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), lead + (s,))
    return _reference(outputs, slots[..., :k], anchor_slot, temperature, eps, slots[..., k:])


def mi_gap_estimate(loss_per_anchor: jax.Array, num_negatives: int) -> jax.Array:
    """``log(N) - L``: lower bound on I(x; activated) - I(x; inactivated) (SPEC section 2)."""
    return math.log(num_negatives) - loss_per_anchor


# --------------------------------------------------------------------------- aux losses


def load_balance_loss(
    probs: jax.Array, topk_indices: jax.Array, token_mask: jax.Array | None = None
) -> jax.Array:
    """Switch / Mixtral load-balance loss ``n * sum_i f_i P_i``.

    Args:
      probs: ``[..., n]`` router softmax probabilities.
      topk_indices: ``[..., k]`` selected experts.
      token_mask: ``[...]`` 1 for real tokens, 0 for padding; None means all real.
    Returns:
      scalar; ``f_i`` is the fraction of tokens that select expert i (built from the integer
      indices, so it carries no gradient), ``P_i`` the mean probability of expert i. Equals k
      when routing is uniform.
    """
    return load_balance_from_sums(load_balance_sums(probs, topk_indices, token_mask))


def load_balance_sums(probs: jax.Array, topk_indices: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """The token sums the load-balance loss is made of, ``[2n + 1]``: real tokens, then per expert the
    tokens that select it and the summed probabilities. Sums of a batch's parts add up to the batch's."""
    n = probs.shape[-1]
    if token_mask is None:
        token_mask = jnp.ones(probs.shape[:-1], jnp.float32)
    probs = _at_least_f32(probs)
    w = token_mask.astype(probs.dtype)
    selected = jnp.einsum("...,...n->n", w, active_mask(topk_indices, n).astype(probs.dtype))
    return jnp.concatenate([jnp.sum(w)[None], selected, jnp.einsum("...,...n->n", w, probs)])


def load_balance_from_sums(sums: jax.Array) -> jax.Array:
    """:func:`load_balance_loss` from :func:`load_balance_sums` ``[2n + 1] -> scalar``."""
    n = (sums.shape[-1] - 1) // 2
    total = jnp.maximum(sums[0], 1.0)
    return n * jnp.sum((sums[1 : n + 1] / total) * (sums[n + 1 :] / total))
