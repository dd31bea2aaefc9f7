"""Independent float64 NumPy references, written the plain way: loops over tokens and experts.

Math-layout convention of the paper: ``A_i`` is ``[r, d_in]``, ``B_i`` is ``[d_out, r]``.
The tests transpose the library's Flax-layout arrays into these before calling.
"""

from __future__ import annotations

import math

import numpy as np


def softmax(v):
    v = np.asarray(v, np.float64)
    e = np.exp(v - v.max())
    return e / e.sum()


def topk_route(logits, k):
    """logits [T, n] -> weights [T, n], indices [T, k]."""
    logits = np.asarray(logits, np.float64)
    t_count, n = logits.shape
    weights = np.zeros((t_count, n))
    indices = np.zeros((t_count, k), np.int64)
    for t in range(t_count):
        p = softmax(logits[t])
        order = sorted(range(n), key=lambda i: (-p[i], i))[:k]
        total = sum(p[i] for i in order)
        for slot, i in enumerate(order):
            weights[t, i] = p[i] / total
            indices[t, slot] = i
    return weights, indices


def expert_output(x, a_math, b_math):
    """One token, one expert: B (A x)."""
    return np.asarray(b_math, np.float64) @ (np.asarray(a_math, np.float64) @ np.asarray(x, np.float64))


def moe_lora_linear(x, w0, a_math, b_math, router, k, scale):
    """y = W0 x + scale * sum_i g_hat_i E_i(x) for tokens x [T, d_in]. w0 [d_out, d_in], router [n, d_in]."""
    x = np.asarray(x, np.float64)
    out = []
    for t in range(x.shape[0]):
        y = np.asarray(w0, np.float64) @ x[t]
        g = np.asarray(router, np.float64) @ x[t]
        weights, _ = topk_route(g[None], k)
        for i in range(len(a_math)):
            if weights[0, i] > 0:
                y = y + scale * weights[0, i] * expert_output(x[t], a_math[i], b_math[i])
        out.append(y)
    return np.stack(out)


def normalize(v, eps=1e-6):
    v = np.asarray(v, np.float64)
    return v / max(np.linalg.norm(v), eps)


def info_nce_token(e, topk, anchor_slot, temperature, eps, negatives=None):
    """Algorithm 1 for one token. e [n, d] expert outputs, topk list of k indices."""
    n = len(e)
    anchor = topk[anchor_slot]
    q = normalize(e[anchor])
    pos = [normalize(e[topk[j]]) for j in range(len(topk)) if j != anchor_slot]
    neg_ids = [j for j in range(n) if j not in topk] if negatives is None else list(negatives)
    neg = [normalize(e[j]) for j in neg_ids]
    s_pos = [float(q @ p) / temperature for p in pos]
    s_neg = [float(q @ v) / temperature for v in neg]
    num = sum(math.exp(s) for s in s_pos)
    den = sum(math.exp(s) for s in s_pos + s_neg) + eps
    return -math.log(num / den)


def contrastive(e, topk, anchor_slot, temperature, eps, negatives=None):
    """e [T, n, d]; topk [T, k]; anchor_slot [T] or None (every slot, summed)."""
    losses = []
    for t in range(len(e)):
        slots = range(len(topk[t])) if anchor_slot is None else [int(anchor_slot[t])]
        neg = None if negatives is None else negatives[t]
        losses.append(sum(info_nce_token(e[t], list(topk[t]), s, temperature, eps, neg) for s in slots))
    return np.array(losses)


def load_balance(probs, topk, mask):
    """n * sum_i f_i P_i over real tokens."""
    t_count, n = probs.shape
    real = [t for t in range(t_count) if mask[t] > 0]
    f = np.zeros(n)
    p = np.zeros(n)
    for t in real:
        for i in range(n):
            f[i] += (i in list(topk[t])) / len(real)
            p[i] += probs[t, i] / len(real)
    return n * float(np.sum(f * p))


def gram_schmidt(vectors):
    """Classical Gram-Schmidt in order, without renormalising: O_i = E_i - sum_{j<i} proj_{O_j} E_i."""
    out = []
    for v in vectors:
        o = np.asarray(v, np.float64).copy()
        for u in out:
            o = o - (float(np.asarray(v, np.float64) @ u) / float(u @ u)) * u
        out.append(o)
    return out


def dora_scale(w0, a_math, b_math, scale, magnitude):
    """m / ||W0 + s B A|| per output row (peft's DoRA). w0 [d_out, d_in] -> [d_out]."""
    w = np.asarray(w0, np.float64) + scale * np.asarray(b_math, np.float64) @ np.asarray(a_math, np.float64)
    return np.array([magnitude[o] / np.linalg.norm(w[o]) for o in range(w.shape[0])])


def adapter_layer(x, w0, a_math, b_math, router, k, scale, *, routing="topk", magnitude=None, orthogonal=False):
    """Every method's layer for tokens x [T, d_in] (no dropout): W0 x + scale * sum_i g_i E'_i(x).

    routing: topk | soft | none (one expert, weight 1). DoRA experts (magnitude [n, d_out]) give
    E'_i = (c_i - 1) W0 x / scale + c_i B_i A_i x; OMoE orthogonalises the LoRA outputs first.
    """
    x = np.asarray(x, np.float64)
    n = len(a_math)
    out = []
    for t in range(x.shape[0]):
        base = np.asarray(w0, np.float64) @ x[t]
        if routing == "none":
            g = np.ones(1)
        elif routing == "soft":
            g = softmax(np.asarray(router, np.float64) @ x[t])
        else:
            g = topk_route((np.asarray(router, np.float64) @ x[t])[None], k)[0][0]
        e = [expert_output(x[t], a_math[i], b_math[i]) for i in range(n)]
        if orthogonal:
            e = gram_schmidt(e)
        y = base.copy()
        for i in range(n):
            if magnitude is None:
                y = y + scale * g[i] * e[i]
            else:
                c = dora_scale(w0, a_math[i], b_math[i], scale, magnitude[i])
                y = y + g[i] * ((c - 1) * base + c * scale * e[i])
        out.append(y)
    return np.stack(out)
