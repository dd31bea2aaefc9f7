"""comoe_jax.ops against plain-loop float64 NumPy references (tests/reference.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

from comoe_jax import ops
from tests import reference as ref


def _random_setup(seed, tokens, n, k, r, d_in, d_out):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, d_in)).astype(np.float32)
    a = rng.normal(size=(n, d_in, r)).astype(np.float32) / np.sqrt(d_in)
    b = rng.normal(size=(n, r, d_out)).astype(np.float32)
    logits = rng.normal(size=(tokens, n)).astype(np.float32) * 2
    return rng, x, a, b, logits


def _math_layout(a, b):
    return [ai.T for ai in a], [bi.T for bi in b]


class RouterTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((7, 5, 2), (13, 4, 1), (3, 9, 4), (11, 16, 2))
    def test_topk_route(self, tokens, n, k):
        logits = np.random.default_rng(tokens * n + k).normal(size=(tokens, n)).astype(np.float32) * 3
        weights, indices = self.variant(ops.topk_route, static_argnums=1)(logits, k)
        chex.assert_shape(weights, (tokens, n))
        chex.assert_shape(indices, (tokens, k))
        chex.assert_type(weights, jnp.float32)
        want_w, want_i = ref.topk_route(logits, k)
        np.testing.assert_allclose(weights, want_w, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(indices, want_i)

    def test_topk_route_bf16_logits_route_in_float32(self):
        logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 6)), jnp.bfloat16)
        weights, indices = ops.topk_route(logits, 2)
        chex.assert_type(weights, jnp.float32)
        chex.assert_shape(indices, (2, 3, 2))
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


class ExpertTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((5, 3, 4, 7, 6), (9, 1, 2, 5, 11), (4, 6, 3, 10, 3))
    def test_expert_outputs_and_mix(self, tokens, n, r, d_in, d_out):
        _, x, a, b, logits = _random_setup(tokens + n, tokens, n, 1, r, d_in, d_out)
        out = self.variant(ops.expert_outputs)(x, a, b)
        chex.assert_shape(out, (tokens, n, d_out))
        a_m, b_m = _math_layout(a, b)
        want = np.array([[ref.expert_output(x[t], a_m[i], b_m[i]) for i in range(n)] for t in range(tokens)])
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)

        weights = np.random.default_rng(1).random((tokens, n)).astype(np.float32)
        h = self.variant(ops.expert_hidden)(x, a)
        chex.assert_shape(h, (tokens, n, r))
        mixed = self.variant(ops.mix_experts)(h, weights, b)
        want_mix = np.einsum("tn,tnd->td", weights, want)
        np.testing.assert_allclose(mixed, want_mix, rtol=1e-4, atol=1e-4)

    def test_gram_gives_expert_dot_products(self):
        _, x, a, b, _ = _random_setup(3, 6, 5, 2, 3, 8, 12)
        e = np.asarray(ops.expert_outputs(x, a, b), np.float64)
        h = np.asarray(ops.expert_hidden(x, a), np.float64)
        gram = np.asarray(ops.gram_matrix(b), np.float64)
        for t in range(6):
            for i in range(5):
                for j in range(5):
                    np.testing.assert_allclose(h[t, i] @ gram[i, j] @ h[t, j], e[t, i] @ e[t, j], rtol=1e-4)


def _contrastive_case(seed, lead, n, k, r, d_in, d_out, m=None):
    rng = np.random.default_rng(seed)
    tokens = int(np.prod(lead))
    x = rng.normal(size=(*lead, d_in)).astype(np.float32)
    a = (rng.normal(size=(n, d_in, r)) / np.sqrt(d_in)).astype(np.float32)
    b = rng.normal(size=(n, r, d_out)).astype(np.float32)
    _, topk = ops.topk_route(jnp.asarray(rng.normal(size=(*lead, n)), jnp.float32), k)
    slot = rng.integers(0, k, size=lead)
    neg = None
    if m is not None:
        neg = ops.sample_negatives(jax.random.key(seed), topk, n, m)
    flat = dict(
        e=np.asarray(ops.expert_outputs(x, a, b), np.float64).reshape(tokens, n, d_out),
        topk=np.asarray(topk).reshape(tokens, k),
        slot=slot.reshape(tokens),
        neg=None if neg is None else np.asarray(neg).reshape(tokens, m),
    )
    return x, a, b, topk, jnp.asarray(slot), neg, flat


CASES = [
    # lead shape, n, k, r, d_in, d_out, sampled negatives
    ((3, 5), 4, 2, 3, 7, 9, None),
    ((13,), 6, 3, 2, 5, 4, None),
    ((2, 1, 3), 9, 2, 4, 6, 10, None),
    ((4, 3), 8, 2, 3, 5, 6, 3),
    ((7,), 11, 3, 2, 4, 5, 1),
]


def _distinct_choices(rng, lead, n, s):
    """``[*lead, s]`` distinct expert indices per token (the top-k and the negatives of a token)."""
    flat = [rng.permutation(n)[:s] for _ in range(int(np.prod(lead)))]
    return np.array(flat, np.int32).reshape(*lead, s)


class DropoutTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(((3, 7), 0.05), ((2, 5, 8), 0.3), ((1, 1), 0.5), ((4, 9), 0.9), ((2, 3), 0.999999))
    def test_against_the_random_words_read_by_hand(self, shape, rate):
        x = np.random.default_rng(len(shape)).normal(size=shape).astype(np.float32)
        key = jax.random.key(sum(shape))
        got = np.asarray(self.variant(ops.dropout, static_argnums=1)(x, rate, key))
        chex.assert_shape(got, shape)
        half = -(-shape[-1] // 2)
        words = np.asarray(jax.random.bits(key, (*shape[:-1], half), jnp.uint32)).astype(np.int64)
        threshold = min(round(rate * 65536), 65535)  # a rate just below 1 still keeps 1 / 65536
        for index in np.ndindex(*shape):  # element j reads word j // 2: its low 16 bits if j is even, else the high
            lead, j = index[:-1], index[-1]
            draw = words[lead][j // 2] & 0xFFFF if j % 2 == 0 else words[lead][j // 2] >> 16
            want = x[index] * 65536 / (65536 - threshold) if draw >= threshold else 0.0
            np.testing.assert_allclose(got[index], want, rtol=1e-6)

    def test_drop_rate_and_mean(self):
        x = jnp.ones((64, 1000), jnp.float32)
        y = np.asarray(ops.dropout(x, 0.05, jax.random.key(3)))
        dropped = np.mean(y == 0)
        assert abs(dropped - 0.05) < 4 * np.sqrt(0.05 * 0.95 / y.size)  # binomial, 4 sigma
        assert abs(y.mean() - 1.0) < 0.01  # kept values are scaled by 1 / (1 - rate)

    def test_keys_dtypes_and_rate_zero(self):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 11)), jnp.bfloat16)
        a, b = (ops.dropout(x, 0.2, jax.random.key(i)) for i in (1, 2))
        chex.assert_type(a, jnp.bfloat16)
        assert not np.array_equal(np.asarray(a == 0), np.asarray(b == 0))
        np.testing.assert_array_equal(np.asarray(ops.dropout(x, 0.2, jax.random.key(1))), np.asarray(a))
        assert ops.dropout(x, 0.0, jax.random.key(1)) is x


class SparseExpertTest(parameterized.TestCase):
    @parameterized.parameters((13, 5, 4), (1, 3, 8), (40, 9, 16), (7, 64, 8))
    def test_dispatch_groups_rows_by_expert_into_owned_blocks(self, rows, n, block):
        experts = np.random.default_rng(rows + n).integers(0, n, size=rows).astype(np.int32)
        plan = jax.jit(ops.dispatch, static_argnums=(1, 2))(experts, n, block)
        source, dest, owner = (np.asarray(v) for v in (plan.source, plan.dest, plan.block_expert))
        assert source.shape == ((-(-rows // block) + n) * block,) and owner.shape == (source.size // block,)
        assert sorted(dest.tolist()) == sorted(set(dest.tolist()))  # every row has its own slot
        for row in range(rows):  # a row sits in a block of its expert, and the slot points back to it
            assert source[dest[row]] == row and owner[dest[row] // block] == experts[row]
        empty = [slot for slot in range(source.size) if slot not in set(dest.tolist())]
        assert all(source[slot] == rows for slot in empty)
        for e in range(n):  # an expert's rows keep their order
            slots = [dest[row] for row in range(rows) if experts[row] == e]
            assert slots == sorted(slots)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(((2, 7), 6, 3, 3, 5, 4, None), ((11,), 9, 4, 2, 3, 7, 8),
                              ((3, 1, 5), 4, 2, 6, 2, 3, None))
    def test_selected_expert_outputs_against_loops(self, lead, n, s, r, d_in, d_out, block):
        rng = np.random.default_rng(sum(lead) + n)
        x = rng.normal(size=(*lead, d_in)).astype(np.float32)
        a = rng.normal(size=(n, d_in, r)).astype(np.float32)
        b = rng.normal(size=(n, r, d_out)).astype(np.float32)
        experts = _distinct_choices(rng, lead, n, s)
        codes, outputs = self.variant(ops.selected_expert_outputs, static_argnums=4)(x, a, b, experts, block)
        chex.assert_shape([codes, outputs], [(*lead, s, r), (*lead, s, d_out)])
        chex.assert_type([codes, outputs], jnp.float32)
        a_m, b_m = _math_layout(a, b)
        for t in np.ndindex(*lead):
            for slot, e in enumerate(experts[t]):
                h = np.asarray(a_m[e], np.float64) @ x[t].astype(np.float64)
                np.testing.assert_allclose(codes[t][slot], h, rtol=1e-4, atol=1e-4)
                np.testing.assert_allclose(outputs[t][slot], ref.expert_output(x[t], a_m[e], b_m[e]), rtol=1e-4,
                                           atol=1e-4)

    def test_selected_expert_gradients_equal_the_dense_path(self):
        rng = np.random.default_rng(7)
        x = rng.normal(size=(2, 9, 5)).astype(np.float32)
        a = rng.normal(size=(6, 5, 3)).astype(np.float32)
        b = rng.normal(size=(6, 3, 4)).astype(np.float32)
        experts = jnp.asarray(_distinct_choices(rng, (2, 9), 6, 3))
        cot = rng.normal(size=(2, 9, 3, 4)).astype(np.float32)
        code_cot = rng.normal(size=(2, 9, 3, 3)).astype(np.float32)

        def sparse(x, a, b):
            codes, outputs = ops.selected_expert_outputs(x, a, b, experts, 8)
            return jnp.sum(outputs * cot) + jnp.sum(jnp.sin(codes) * code_cot)

        def dense(x, a, b):
            pick = lambda every: jnp.take_along_axis(every, experts[..., None], axis=-2)  # noqa: E731
            codes, outputs = pick(ops.expert_hidden(x, a)), pick(ops.expert_outputs(x, a, b))
            return jnp.sum(outputs * cot) + jnp.sum(jnp.sin(codes) * code_cot)

        for got, want in zip(jax.grad(sparse, (0, 1, 2))(x, a, b), jax.grad(dense, (0, 1, 2))(x, a, b)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        check_grads(lambda x, a, b: ops.selected_expert_outputs(x, a, b, experts, 8), (x, a, b), order=1,
                    modes=["rev"], atol=5e-2, rtol=5e-2)

    def test_inactive_experts(self):
        topk = np.array([[3, 0], [1, 4], [2, 1]], np.int32)
        got = np.asarray(ops.inactive_experts(jnp.asarray(topk), 5))
        want = [[i for i in range(5) if i not in row] for row in topk.tolist()]
        np.testing.assert_array_equal(got, want)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((5, 6, 2, 2, True), (4, 7, 3, 4, False), (6, 5, 2, 0, True))
    def test_contrastive_on_selected_outputs_equals_the_reference(self, tokens, n, k, m, one_anchor):
        rng = np.random.default_rng(tokens * n + k)
        e = rng.normal(size=(tokens, n, 8)).astype(np.float32)
        choice = _distinct_choices(rng, (tokens,), n, k + (m or n - k))
        topk, negatives = choice[:, :k], choice[:, k:]
        if not m:  # every inactive expert
            negatives = np.array([[i for i in range(n) if i not in row] for row in topk.tolist()], np.int32)
        slot = rng.integers(0, k, size=tokens).astype(np.int32) if one_anchor else None
        selected = np.take_along_axis(e, np.concatenate([topk, negatives], 1)[..., None], axis=1)
        got = self.variant(ops.contrastive_loss_selected, static_argnums=1)(selected, k, slot, temperature=0.3)
        chex.assert_shape(got, (tokens,))
        want = ref.contrastive(e, topk, slot, 0.3, 1e-3, negatives)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class ContrastiveTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*CASES)
    def test_reference_form_random_anchor(self, lead, n, k, r, d_in, d_out, m):
        x, a, b, topk, slot, neg, flat = _contrastive_case(1, lead, n, k, r, d_in, d_out, m)
        def fn(e, t, s, ng):
            return ops.contrastive_loss(e, t, s, temperature=0.3, eps=1e-3, negative_indices=ng)

        got = self.variant(fn)(ops.expert_outputs(x, a, b), topk, slot, neg)
        chex.assert_shape(got, lead)
        chex.assert_type(got, jnp.float32)
        want = ref.contrastive(flat["e"], flat["topk"], flat["slot"], 0.3, 1e-3, flat["neg"])
        np.testing.assert_allclose(np.asarray(got).reshape(-1), want, rtol=2e-5, atol=2e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*CASES)
    def test_reference_form_all_anchors(self, lead, n, k, r, d_in, d_out, m):
        x, a, b, topk, _, neg, flat = _contrastive_case(2, lead, n, k, r, d_in, d_out, m)
        def fn(e, t, ng):
            return ops.contrastive_loss_all_anchors(e, t, temperature=0.5, eps=1e-3, negative_indices=ng)

        got = self.variant(fn)(ops.expert_outputs(x, a, b), topk, neg)
        want = ref.contrastive(flat["e"], flat["topk"], None, 0.5, 1e-3, flat["neg"])
        np.testing.assert_allclose(np.asarray(got).reshape(-1), want, rtol=2e-5, atol=2e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*CASES)
    def test_gram_form_equals_reference(self, lead, n, k, r, d_in, d_out, m):
        x, a, b, topk, slot, neg, flat = _contrastive_case(3, lead, n, k, r, d_in, d_out, m)
        h, gram = ops.expert_hidden(x, a), ops.gram_matrix(b)

        def fast(h, g, t, s, ng):
            kw = dict(temperature=0.2, eps=1e-3, negative_indices=ng)
            return ops.contrastive_loss_gram(h, g, t, s, **kw), ops.contrastive_loss_gram_all_anchors(h, g, t, **kw)

        one, every = self.variant(fast)(h, gram, topk, slot, neg)
        chex.assert_shape([one, every], lead)
        want_one = ref.contrastive(flat["e"], flat["topk"], flat["slot"], 0.2, 1e-3, flat["neg"])
        want_all = ref.contrastive(flat["e"], flat["topk"], None, 0.2, 1e-3, flat["neg"])
        np.testing.assert_allclose(np.asarray(one).reshape(-1), want_one, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(every).reshape(-1), want_all, rtol=1e-4, atol=1e-4)

    def test_gram_form_gradients_equal_reference_form(self):
        x, a, b, topk, slot, neg, _ = _contrastive_case(4, (6,), 5, 2, 3, 4, 7)

        def via_reference(a, b):
            return ops.contrastive_loss(ops.expert_outputs(x, a, b), topk, slot, temperature=0.3).sum()

        def via_gram(a, b):
            h = ops.expert_hidden(x, a)
            return ops.contrastive_loss_gram(h, ops.gram_matrix(b), topk, slot, temperature=0.3).sum()

        g_ref = jax.grad(via_reference, argnums=(0, 1))(a, b)
        g_fast = jax.grad(via_gram, argnums=(0, 1))(a, b)
        for u, v in zip(g_ref, g_fast):
            np.testing.assert_allclose(u, v, rtol=2e-3, atol=2e-4)

    def test_padding_tokens_are_masked_out_of_the_mean(self):
        x, a, b, topk, slot, _, flat = _contrastive_case(5, (2, 6), 4, 2, 3, 5, 6)
        mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], np.float32)
        per_token = ops.contrastive_loss_gram(ops.expert_hidden(x, a), ops.gram_matrix(b), topk, slot, temperature=0.3)
        got = float(jnp.sum(per_token * mask) / mask.sum())
        losses = ref.contrastive(flat["e"], flat["topk"], flat["slot"], 0.3, 1e-3)
        want = np.mean([losses[i] for i in range(12) if mask.reshape(-1)[i] > 0])
        np.testing.assert_allclose(got, want, rtol=1e-4)

    def test_check_grads(self):
        x, a, b, topk, slot, neg, _ = _contrastive_case(6, (5,), 6, 2, 2, 3, 4, 2)
        with jax.enable_x64(True):
            x, a, b = (jnp.asarray(v, jnp.float64) for v in (x, a, b))

            def f_ref(e):
                return ops.contrastive_loss(e, topk, slot, temperature=0.5)

            def f_gram(h, g):
                return ops.contrastive_loss_gram(h, g, topk, slot, temperature=0.5, negative_indices=neg)

            def f_gram_all(h, g):
                return ops.contrastive_loss_gram_all_anchors(h, g, topk, temperature=0.5)

            # jitted: check_grads evaluates each function many times, op by op it takes half a minute
            check_grads(jax.jit(f_ref), (ops.expert_outputs(x, a, b),), order=2, modes=("rev",))
            h, g = ops.expert_hidden(x, a), ops.gram_matrix(b)
            check_grads(jax.jit(f_gram), (h, g), order=2, modes=("rev",))
            check_grads(jax.jit(f_gram_all), (h, g), order=1, modes=("rev", "fwd"))

    def test_zero_experts_give_finite_loss_and_gradients(self):
        # B = 0 at initialisation: every expert output is 0.
        x, a, b, topk, slot, _, _ = _contrastive_case(7, (4,), 4, 2, 3, 5, 6)
        b = np.zeros_like(b)

        def loss(a, b):
            h = ops.expert_hidden(x, a)
            return ops.contrastive_loss_gram(h, ops.gram_matrix(b), topk, slot, temperature=0.07).mean()

        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(a, b)
        # all cosines 0: -log((k-1) / (n-1 + eps)) with n=4, k=2
        np.testing.assert_allclose(value, -np.log(1.0 / (3.0 + 1e-3)), rtol=1e-5)
        assert all(np.isfinite(g).all() for g in grads)

    def test_small_temperature_does_not_overflow(self):
        x, a, b, topk, slot, _, flat = _contrastive_case(8, (5,), 5, 2, 3, 4, 6)
        got = ops.contrastive_loss(ops.expert_outputs(x, a, b), topk, slot, temperature=0.005)
        assert np.isfinite(got).all()
        want = ref.contrastive(flat["e"], flat["topk"], flat["slot"], 0.005, 1e-3)
        finite = np.isfinite(want)  # the float64 reference itself overflows for tiny tau
        np.testing.assert_allclose(np.asarray(got)[finite], want[finite], rtol=1e-4)

    def test_sampled_negatives_are_inactive_and_distinct(self):
        rng = np.random.default_rng(0)
        _, topk = ops.topk_route(jnp.asarray(rng.normal(size=(50, 12)), jnp.float32), 3)
        neg = np.asarray(ops.sample_negatives(jax.random.key(1), topk, 12, 5))
        for t in range(50):
            assert len(set(neg[t])) == 5
            assert not set(neg[t]) & set(np.asarray(topk[t]))
        # uniform over the inactive experts: every inactive expert is drawn sometimes
        draws = ops.sample_negatives(jax.random.key(2), topk[:1].repeat(2000, 0), 12, 1)
        counts = np.bincount(np.asarray(draws).ravel(), minlength=12)
        inactive = [i for i in range(12) if i not in np.asarray(topk[0])]
        assert all(counts[i] > 2000 / 9 * 0.7 for i in inactive)

    def test_mi_gap(self):
        got = ops.mi_gap_estimate(jnp.array([0.5, 1.0]), 3)
        np.testing.assert_allclose(got, np.log(3) - np.array([0.5, 1.0]), rtol=1e-6)


class LoadBalanceTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((17, 5, 2), (8, 8, 1), (30, 4, 3))
    def test_against_reference(self, tokens, n, k):
        rng = np.random.default_rng(tokens)
        logits = rng.normal(size=(tokens, n)).astype(np.float32)
        probs = ops.router_probs(logits)
        _, topk = ops.topk_route(logits, k)
        mask = (rng.random(tokens) > 0.3).astype(np.float32)
        got = self.variant(ops.load_balance_loss)(probs, topk, mask)
        chex.assert_shape(got, ())
        want = ref.load_balance(np.asarray(probs, np.float64), np.asarray(topk), mask)
        np.testing.assert_allclose(got, want, rtol=1e-5)

    def test_sums_of_a_batch_split_add_up_to_the_batch(self):
        """What a device holding part of the batch sows (``load_balance_sums``) adds up over the parts
        to the whole batch's loss, not to the mean of the parts' losses."""
        rng = np.random.default_rng(3)
        logits = rng.normal(size=(23, 5)).astype(np.float32)
        probs, (_, topk) = ops.router_probs(logits), ops.topk_route(logits, 2)
        mask = (rng.random(23) > 0.2).astype(np.float32)
        parts = [ops.load_balance_sums(probs[s], topk[s], mask[s]) for s in (slice(0, 9), slice(9, 16), slice(16, 23))]
        chex.assert_shape(parts, (11,))
        got = ops.load_balance_from_sums(sum(parts))
        want = ref.load_balance(np.asarray(probs, np.float64), np.asarray(topk), mask)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert not np.isclose(np.mean([ops.load_balance_from_sums(p) for p in parts]), want, rtol=1e-4)

    def test_uniform_routing_gives_k(self):
        probs = jnp.full((8, 4), 0.25)
        topk = jnp.array([[i % 4, (i + 1) % 4] for i in range(8)])
        np.testing.assert_allclose(ops.load_balance_loss(probs, topk), 2.0, rtol=1e-6)

    def test_gradient_is_n_f_over_tokens_through_the_probabilities_only(self):
        # dL/dP[t, i] = n f_i w_t: the selected fraction f acts as a constant (Switch Transformer), so the
        # gradient moves probability towards under-used experts. Any gradient through f, or a missing
        # one through P, changes these values.
        rng = np.random.default_rng(0)
        logits = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
        mask = jnp.asarray([1, 1, 0, 1, 1, 1], jnp.float32)
        _, topk = ops.topk_route(logits, 2)
        probs = ops.router_probs(logits)
        g = jax.grad(lambda p: ops.load_balance_loss(p, topk, mask))(probs)
        f = np.zeros(4)
        for t in range(6):
            for i in np.asarray(topk[t]):
                f[i] += mask[t] / 5
        np.testing.assert_allclose(g, 4 * np.asarray(mask)[:, None] / 5 * f[None, :], rtol=1e-6)
        g_logits = jax.grad(lambda z: ops.load_balance_loss(ops.router_probs(z), topk, mask))(logits)
        assert np.abs(np.asarray(g_logits[2])).sum() == 0 and np.abs(np.asarray(g_logits)).sum() > 0


if __name__ == "__main__":
    pytest.main([__file__])
