"""The mixture-of-LoRA layer against the float64 reference; placement; statistics; dropout."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from comoe_jax import ops
from comoe_jax.adapters import AdapterStat, ForwardContext, MoESpec, MoLoRALinear, RoutingTrace
from comoe_jax.config import AdapterConfig, Config, parse_layer_range
from comoe_jax.loading import build_model
from comoe_jax.model import flat_values, split_model
from tests import reference as ref


def _layer(d_in, d_out, spec, seed=0):
    layer = MoLoRALinear(d_in, d_out, axes=("embed", "mlp"), spec=spec, index=0, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    layer.lora_b[...] = jnp.asarray(rng.normal(size=layer.lora_b.shape), jnp.float32)  # B != 0 to see the experts
    layer.kernel[...] = jnp.asarray(rng.normal(size=layer.kernel.shape) * 0.3, jnp.float32)
    if layer.router is not None:
        layer.router[...] = jnp.asarray(rng.normal(size=layer.router.shape), jnp.float32)
    return layer


def _call(layer, x, ctx=None):
    """(y, {statistic: value}) of a functional copy of ``layer``, its sown AdapterStat captured."""
    y, stats = nnx.capture(nnx.merge(*nnx.split(layer)), AdapterStat)(x, ctx)
    return y, {path[-1]: v.get_value() for path, v in nnx.to_flat_state(stats)}


class MoLoRALinearTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((5, 7, 4, 2, 3), (6, 3, 6, 3, 2), (7, 9, 1, 1, 4))
    def test_forward_matches_reference(self, d_in, d_out, n, k, r):
        spec = MoESpec(num_experts=n, top_k=k, rank=r, alpha=2.0 * r + 1, dropout=0.3, contrastive=False)
        layer = _layer(d_in, d_out, spec, seed=n + d_in)
        x = np.random.default_rng(1).normal(size=(2, 5, d_in)).astype(np.float32)
        y, stats = self.variant(lambda x: _call(layer, x))(x)  # no ctx: inference, no dropout
        chex.assert_shape(y, (2, 5, d_out))
        chex.assert_type(y, jnp.float32)
        assert stats == {}
        a = [np.asarray(layer.lora_a[...][i]).T for i in range(n)]
        b = [np.asarray(layer.lora_b[...][i]).T for i in range(n)]
        router = np.ones((1, d_in)) if n == 1 else np.asarray(layer.router[...]).T
        want = ref.moe_lora_linear(x.reshape(-1, d_in), np.asarray(layer.kernel[...]).T, a, b, router, k, spec.scaling)
        np.testing.assert_allclose(np.asarray(y).reshape(-1, d_out), want, rtol=2e-5, atol=2e-5)

    def test_dropout_uses_the_key(self):
        spec = MoESpec(num_experts=4, top_k=2, rank=3, dropout=0.5, contrastive=False)
        layer = _layer(6, 5, spec)
        x = jnp.ones((2, 4, 6))
        ctx = lambda key: ForwardContext(jnp.ones((2, 4)), jnp.float32(8), key)  # noqa: E731
        y1, _ = _call(layer, x, ctx(jax.random.key(1)))
        y1_again, _ = _call(layer, x, ctx(jax.random.key(1)))
        y2, _ = _call(layer, x, ctx(jax.random.key(2)))
        y_eval, _ = _call(layer, x, ctx(None))
        np.testing.assert_array_equal(y1, y1_again)
        assert not np.allclose(y1, y2)
        np.testing.assert_allclose(y_eval, _call(layer, x)[0])

    @parameterized.parameters("dense", "sparse")
    def test_random_draws_follow_the_rows_not_the_batch_split(self, experts):
        """Dropout, anchors and sampled negatives are drawn per row (``fold_in(key, row)``): a device that
        holds rows 3..4 of a batch draws for them what one device holding all 5 rows draws."""
        spec = MoESpec(num_experts=6, top_k=2, rank=3, dropout=0.4, num_negatives=2, experts=experts)
        layer = _layer(7, 5, spec, seed=4)
        x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 6, 7)), jnp.float32)
        per_token = {}

        def contrastive_per_row(rows, row_ids):
            ctx = ForwardContext(jnp.ones((len(rows), 6)), jnp.float32(6), jax.random.key(8),
                                 None if row_ids is None else jnp.asarray(row_ids, jnp.int32))
            y, stats = _call(layer, x[np.asarray(rows)], ctx)
            return np.asarray(y), float(stats["contrastive"])

        for rows in ([0], [1], [2], [3], [4]):  # one row at a time, each with its global index
            per_token[rows[0]] = contrastive_per_row(rows, rows)
        whole_y, whole_term = contrastive_per_row(list(range(5)), None)
        np.testing.assert_allclose(whole_y, np.concatenate([per_token[r][0] for r in range(5)]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(whole_term, sum(per_token[r][1] for r in range(5)), rtol=1e-5)
        split_y, _ = contrastive_per_row([3, 4], [3, 4])
        np.testing.assert_allclose(split_y, whole_y[3:], rtol=1e-5, atol=1e-5)
        shifted_y, _ = contrastive_per_row([3, 4], [0, 1])  # the wrong rows' draws: other dropout masks
        assert not np.allclose(shifted_y, whole_y[3:])

    def test_statistics_against_loops(self):
        spec = MoESpec(num_experts=5, top_k=2, rank=3, dropout=0.0, anchor="all", temperature=0.4)
        layer = _layer(6, 7, spec, seed=3)
        rng = np.random.default_rng(4)
        x = rng.normal(size=(2, 6, 6)).astype(np.float32)
        mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], np.float32)
        count = 2 * mask.sum()  # as if this were half of the whole batch
        _, stats = _call(layer, x, ForwardContext(jnp.asarray(mask), jnp.float32(count), jax.random.key(0)))
        flat_x, flat_mask = x.reshape(-1, 6), mask.reshape(-1)
        logits = flat_x.astype(np.float64) @ np.asarray(layer.router[...], np.float64)
        _, topk = ref.topk_route(logits, 2)
        load = np.zeros(5)
        for t in range(len(flat_x)):
            for i in topk[t]:
                load[i] += flat_mask[t] / count / 2
        np.testing.assert_allclose(stats["load"], load, rtol=1e-5, atol=1e-7)
        e = np.asarray(ops.expert_outputs(flat_x, layer.lora_a[...], layer.lora_b[...]), np.float64)
        per_token = ref.contrastive(e, topk, None, 0.4, 1e-3)
        np.testing.assert_allclose(stats["contrastive"], np.sum(per_token * flat_mask) / count, rtol=1e-4)
        mi = np.sum((np.log(3) - per_token / 2) * flat_mask) / count
        np.testing.assert_allclose(stats["mi_gap"], mi, rtol=1e-4, atol=1e-6)
        probs = np.stack([ref.softmax(v) for v in logits])
        np.testing.assert_allclose(stats["load_balance"], ref.load_balance(probs, topk, flat_mask), rtol=1e-5)

    def test_reference_and_gram_forms_give_the_same_statistics(self):
        x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4, 6)), jnp.float32)
        ctx = ForwardContext(jnp.ones((3, 4)), jnp.float32(12), jax.random.key(3))
        out = {}
        for form in ("gram", "reference"):
            spec = MoESpec(num_experts=6, top_k=2, rank=2, dropout=0.2, num_negatives=2, form=form)
            out[form] = _call(_layer(6, 5, spec, seed=9), x, ctx)[1]
        np.testing.assert_allclose(out["gram"]["contrastive"], out["reference"]["contrastive"], rtol=1e-5)


class SparseExpertsTest(parameterized.TestCase):
    @parameterized.parameters(
        dict(n=6, k=2, m=2, anchor="random", dora=False, grad=True),
        dict(n=7, k=3, m=0, anchor="all", dora=False, grad=True),  # every inactive expert a negative
        dict(n=5, k=2, m=1, anchor="random", dora=True, grad=True),
        dict(n=6, k=2, m=3, anchor="random", dora=False, grad=False),  # the term monitored only
    )
    def test_sparse_experts_equal_the_dense_path(self, n, k, m, anchor, dora, grad):
        rng = np.random.default_rng(n + k + m)
        x = jnp.asarray(rng.normal(size=(2, 7, 6)), jnp.float32)
        mask = jnp.asarray(np.array([[1] * 7, [1] * 4 + [0] * 3]), jnp.float32)
        ctx = ForwardContext(mask, jnp.sum(mask), jax.random.key(3))
        cot = jnp.asarray(rng.normal(size=(2, 7, 5)), jnp.float32)

        def run(experts):
            spec = MoESpec(num_experts=n, top_k=k, rank=3, dropout=0.2, num_negatives=m, anchor=anchor, dora=dora,
                           temperature=0.5, contrastive_grad=grad, experts=experts)
            graphdef, params, rest = nnx.split(_layer(6, 5, spec, seed=11), nnx.Param, ...)

            def loss(params):
                y, stats = nnx.capture(nnx.merge(graphdef, params, rest), AdapterStat)(x, ctx)
                stats = {path[-1]: v.get_value() for path, v in nnx.to_flat_state(stats)}
                return jnp.sum(y * cot) + stats["contrastive"], (y, stats)

            (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
            inference = nnx.merge(graphdef, params, rest)(x)
            return y, stats, {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(grads)}, inference

        dense, sparse = run("dense"), run("sparse")
        for got, want in zip(jax.tree.leaves(sparse), jax.tree.leaves(dense)):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        assert set(sparse[1]) == {"load", "load_balance", "contrastive", "mi_gap"}

    def test_sparse_experts_sow_every_expert_code_for_the_analyses(self):
        spec = MoESpec(num_experts=5, top_k=2, rank=3, num_negatives=1, experts="sparse")
        layer = _layer(6, 4, spec, seed=2)
        x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 6)), jnp.float32)
        ctx = ForwardContext(jnp.ones((1, 3)), jnp.float32(3), None)
        _, trace = nnx.capture(nnx.merge(*nnx.split(layer)), RoutingTrace)(x, ctx)
        codes = {path[-1]: v.get_value() for path, v in nnx.to_flat_state(trace)}["codes"]
        np.testing.assert_allclose(codes, ops.expert_hidden(x, layer.lora_a[...]), rtol=1e-6)


class PlacementTest(parameterized.TestCase):
    @parameterized.parameters(("all", 9, range(0, 9)), ("low", 9, range(0, 3)), ("middle", 9, range(3, 6)),
                              ("high", 9, range(6, 9)), ("2:5", 9, range(2, 5)), ("middle", 10, range(3, 7)))
    def test_layer_ranges(self, layers, num_layers, want):
        self.assertEqual(parse_layer_range(layers, num_layers), want)

    def test_adapters_only_where_configured(self):
        cfg = Config()
        cfg.model.path = "random"
        cfg.model.random_arch = dict(cfg.model.random_arch, num_hidden_layers=5)
        cfg.adapter = AdapterConfig(num_experts=3, top_k=2, rank=2, target_modules=("v_proj", "down_proj"),
                                    layers="1:3")
        model = build_model(cfg)
        _, adapters, frozen = split_model(model)
        names = set(flat_values(adapters))
        assert model.num_adapters == 4
        assert [len(g) for g in model.groups] == [1, 2, 2]
        want = {f"layers.1.layer.{m}.{p}" for m in ("self_attn.v_proj", "mlp.down_proj")
                for p in ("lora_a", "lora_b", "router")}
        assert names == want
        # frozen weights hold every projection of every layer
        assert "layers.0.layer.self_attn.q_proj.kernel" in flat_values(frozen)
        chex.assert_shape(flat_values(adapters)["layers.1.layer.self_attn.v_proj.lora_a"], (2, 3, 64, 2))

    def test_plain_lora_has_no_router(self):
        cfg = Config()
        cfg.model.path = "random"
        cfg.adapter = AdapterConfig(method="lora", num_experts=1, top_k=1, rank=4)
        cfg.loss.contrastive_weight = 0.0
        _, adapters, _ = split_model(build_model(cfg))
        assert not any(k.endswith("router") for k in flat_values(adapters))


if __name__ == "__main__":
    pytest.main([__file__])
