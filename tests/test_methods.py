"""The baselines (LoRA, DoRA, MixLoRA, soft MoE, OMoE, CoMoE-DoRA): math, peft parity, export, counts, training."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from comoe_jax import ops
from comoe_jax.adapters import MoESpec, MoLoRALinear
from comoe_jax.checkpoint import save_adapters
from comoe_jax.config import AdapterConfig, Config, LossConfig, apply_overrides, validate
from comoe_jax.constants import METHODS
from comoe_jax.interop import AdapterFormatError, export_peft, generate_text, load_adapted, read_peft
from comoe_jax.loading import build_model, byte_tokenizer, from_pretrained, trainable_parameter_counts
from comoe_jax.model import flat_values, split_model, state_from_flat
from tests import reference as ref


class OpsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((5, 3, 2, 7, 9), (3, 5, 3, 4, 6), (6, 2, 1, 5, 3))
    def test_gram_schmidt_weights_mix_orthogonalised_outputs(self, tokens, n, r, d_in, d_out):
        rng = np.random.default_rng(tokens * n + r)
        x = rng.normal(size=(tokens, d_in)).astype(np.float32)
        a = rng.normal(size=(n, d_in, r)).astype(np.float32)
        b = rng.normal(size=(n, r, d_out)).astype(np.float32)
        g = rng.dirichlet(np.ones(n), size=tokens).astype(np.float32)
        h = ops.expert_hidden(x, a)
        got = self.variant(ops.gram_schmidt_weights)(h, ops.gram_matrix(b), g)
        chex.assert_shape(got, (tokens, n))
        chex.assert_type(got, jnp.float32)
        mixed = np.asarray(ops.mix_experts(h, got, b))
        for t in range(tokens):
            e = [ref.expert_output(x[t], a[i].T, b[i].T) for i in range(n)]
            o = ref.gram_schmidt(e)
            want = sum(g[t, i] * o[i] for i in range(n))
            np.testing.assert_allclose(mixed[t], want, rtol=2e-3, atol=2e-3 * np.abs(want).max())

    def test_gram_schmidt_weights_are_the_router_weights_when_outputs_are_zero(self):
        g = jax.nn.softmax(jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32))
        got = ops.gram_schmidt_weights(jnp.ones((4, 5, 3)), jnp.zeros((5, 5, 3, 3)), g)
        np.testing.assert_allclose(got, g, rtol=1e-6)
        grad = jax.grad(lambda b: ops.gram_schmidt_weights(jnp.ones((4, 5, 3)), ops.gram_matrix(b), g).sum())
        assert np.isfinite(np.asarray(grad(jnp.zeros((5, 3, 7))))).all()

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((3, 4, 5, 2), (1, 6, 3, 4))
    def test_dora_column_scale(self, n, d_in, d_out, r):
        rng = np.random.default_rng(n + d_in)
        w0 = rng.normal(size=(d_in, d_out)).astype(np.float32)
        a = rng.normal(size=(n, d_in, r)).astype(np.float32)
        b = rng.normal(size=(n, r, d_out)).astype(np.float32)
        m = rng.uniform(0.5, 2, size=(n, d_out)).astype(np.float32)
        got = self.variant(ops.dora_column_scale, static_argnums=3)(w0, a, b, 1.5, m)
        chex.assert_shape(got, (n, d_out))
        want = [ref.dora_scale(w0.T, a[i].T, b[i].T, 1.5, m[i]) for i in range(n)]
        np.testing.assert_allclose(got, np.stack(want), rtol=1e-5)
        # the norm is detached (peft): the scale's gradient w.r.t. B is zero
        db = jax.grad(lambda bb: ops.dora_column_scale(w0, a, bb, 1.5, m).sum())(b)
        np.testing.assert_array_equal(db, 0.0)

    def test_soft_route_weights_every_expert(self):
        logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7, 5)), jnp.float32)
        weights, topk = ops.soft_route(logits, 2)
        np.testing.assert_allclose(weights, jax.nn.softmax(logits, -1), rtol=1e-6)
        np.testing.assert_array_equal(topk, jax.lax.top_k(logits, 2)[1])


_LAYER_CASES = {  # method -> (routing, n, k, dora, orthogonal)
    "lora": ("none", 1, 1, False, False), "dora": ("none", 1, 1, True, False),
    "mixlora": ("topk", 5, 2, False, False), "moe-soft": ("soft", 4, 2, False, False),
    "omoe": ("soft", 3, 2, False, True), "comoe-dora": ("topk", 4, 2, True, False),
}


class LayerTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*_LAYER_CASES)
    def test_each_method_layer_against_float64_loops(self, method):
        routing, n, k, dora, orthogonal = _LAYER_CASES[method]
        d_in, d_out, r, tokens = 7, 5, 3, 6
        spec = MoESpec(num_experts=n, top_k=k, rank=r, alpha=4.5, dropout=0.1, contrastive=False,
                       routing="soft" if routing == "soft" else "topk", dora=dora, orthogonal=orthogonal)
        layer = MoLoRALinear(d_in, d_out, axes=("embed", "mlp"), spec=spec, index=0, rngs=nnx.Rngs(3))
        rng = np.random.default_rng(len(method))
        layer.lora_b.set_value(jnp.asarray(rng.normal(size=(n, r, d_out)), jnp.float32))
        if dora:  # init = column norms of W0; move away from it
            np.testing.assert_allclose(layer.magnitude[...][0], np.linalg.norm(layer.kernel[...], axis=0), rtol=1e-6)
            layer.magnitude.set_value(layer.magnitude[...] * jnp.asarray(rng.uniform(0.5, 1.5, (n, d_out))))
        graphdef, state = nnx.split(layer)
        x = rng.normal(size=(2, tokens // 2, d_in)).astype(np.float32)
        y = self.variant(lambda s, v: nnx.merge(graphdef, s)(v))(state, x)
        chex.assert_shape(y, (2, tokens // 2, d_out))
        want = ref.adapter_layer(
            x.reshape(tokens, d_in), np.asarray(layer.kernel[...]).T, [v.T for v in np.asarray(layer.lora_a[...])],
            [v.T for v in np.asarray(layer.lora_b[...])], None if n == 1 else np.asarray(layer.router[...]).T, k,
            spec.scaling, routing=routing, magnitude=np.asarray(layer.magnitude[...]) if dora else None,
            orthogonal=orthogonal)
        np.testing.assert_allclose(np.asarray(y).reshape(tokens, d_out), want, rtol=2e-4, atol=2e-4)


# --------------------------------------------------------------------------- peft parity, export and import


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=272, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("hf_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _perturbed(model, seed):
    """Random non-trivial adapters (B != 0, magnitudes away from their init) put into ``model``."""
    _, adapters, _ = split_model(model)
    rng = np.random.default_rng(seed)
    values = {}
    for name, value in flat_values(adapters).items():
        v = np.asarray(value)
        if name.endswith("lora_b"):
            v = rng.normal(size=v.shape) * 0.3
        elif name.endswith("magnitude"):
            v = v * rng.uniform(0.7, 1.3, size=v.shape)
        values[name] = jnp.asarray(v, jnp.float32)
    nnx.update(model, state_from_flat(adapters, values))
    return model


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_round_trip_gives_the_same_logits_and_gradients(hf_folder, tmp_path, method):
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    adapter = AdapterConfig(method=method, num_experts=1, top_k=1, rank=4, alpha=8.0, dropout=0.0,
                            target_modules=("q_proj", "v_proj", "down_proj"), layers="1:3")
    ours = _perturbed(from_pretrained(str(hf_folder), adapter=adapter, loss=LossConfig(contrastive_weight=0)), 1)
    cfg = Config(adapter=adapter)
    cfg.model.path = str(hf_folder)
    export_peft(ours, cfg, tmp_path / "peft")

    ids = np.random.default_rng(2).integers(0, 96, size=(2, 11))
    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(hf_folder), tmp_path / "peft", is_trainable=True)
    logits_t = hf(torch.as_tensor(ids)).logits
    logits_j = ours(jnp.asarray(ids, jnp.int32))
    assert float(np.abs(logits_t.detach().numpy() - np.asarray(logits_j)).max()) <= 1e-4

    # gradients of the same scalar w.r.t. B (and DoRA's magnitude) agree with peft's
    weight = np.random.default_rng(3).normal(size=logits_t.shape).astype(np.float32)
    (logits_t * torch.as_tensor(weight)).sum().backward()
    graphdef, adapters, frozen = split_model(ours)
    loss = lambda a: jnp.sum(nnx.merge(graphdef, a, frozen)(jnp.asarray(ids)) * weight)  # noqa: E731
    grads = flat_values(jax.grad(loss)(adapters))
    module = hf.base_model.model.model.layers[1].self_attn.q_proj
    np.testing.assert_allclose(grads["layers.1.layer.self_attn.q_proj.lora_b"][0, 0].T,
                               module.lora_B["default"].weight.grad.numpy(), rtol=2e-3, atol=1e-5)
    if method == "dora":
        np.testing.assert_allclose(grads["layers.1.layer.self_attn.q_proj.magnitude"][0, 0],
                                   module.lora_magnitude_vector["default"].weight.grad.numpy(), rtol=2e-3, atol=1e-5)

    # and back: the peft folder loads into a fresh comoe-jax model with the same logits
    model, _ = load_adapted(tmp_path / "peft", base=str(hf_folder))
    assert model.placement.spec.dora == (method == "dora")
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids, jnp.int32))), np.asarray(logits_j), atol=1e-5)
    # peft adapters trained in bfloat16 are saved in bfloat16 (safetensors' BF16)
    from safetensors.torch import load_file, save_file

    half = tmp_path / "peft_bf16"
    half.mkdir()
    (half / "adapter_config.json").write_bytes((tmp_path / "peft" / "adapter_config.json").read_bytes())
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()},
              half / "adapter_model.safetensors")
    model, _ = load_adapted(half, base=str(hf_folder))
    got = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, np.asarray(logits_j), atol=5e-2)
    assert np.abs(got - np.asarray(logits_j)).max() > 0  # read as the rounded values they are


def test_peft_import_refuses_what_it_cannot_represent(tmp_path, hf_folder):
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(hf_folder),
                                LoraConfig(r=2, target_modules=["q_proj"], use_rslora=True))
    peft_model.save_pretrained(tmp_path / "rs")
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json: field 'use_rslora' is True"):
        read_peft(tmp_path / "rs", 3)
    meta = json.loads((tmp_path / "rs" / "adapter_config.json").read_text())
    meta |= {"use_rslora": False, "target_modules": ["q_proj", "qkv"]}
    (tmp_path / "rs" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterFormatError, match=r"field 'target_modules' is \['q_proj', 'qkv'\]"):
        read_peft(tmp_path / "rs", 3)
    meta["target_modules"] = ["q_proj"]
    for field, value, message in (
            ("init_lora_weights", "pissa_niter_4", r"field 'init_lora_weights' is 'pissa_niter_4': that adapter is "
                                                   r"meant for a base model peft modified"),
            ("init_lora_weights", "olora", r"'init_lora_weights' is 'olora'"),
            ("alora_invocation_tokens", [5, 6], r"field 'alora_invocation_tokens' is \[5, 6\]; comoe-jax reads only "
                                                r"None"),
            ("exclude_modules", ["layers.0.self_attn.q_proj"], r"field 'exclude_modules' is")):
        (tmp_path / "rs" / "adapter_config.json").write_text(json.dumps(meta | {field: value}))
        with pytest.raises(AdapterFormatError, match=message):
            read_peft(tmp_path / "rs", 3)
    for harmless in ({"init_lora_weights": "gaussian"}, {"init_lora_weights": False}, {"exclude_modules": []},
                     {"use_bdlora": None}, {"loftq_config": {}}):
        (tmp_path / "rs" / "adapter_config.json").write_text(json.dumps(meta | harmless))
        read_peft(tmp_path / "rs", 3)
    (tmp_path / "rs" / "adapter_config.json").write_text("{\n  'r': 2")
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json:2: not valid JSON"):
        load_adapted(tmp_path / "rs", base=str(hf_folder))


def test_mixture_export_import_round_trip_and_inference_api(hf_folder, tmp_path):
    cfg = Config()
    cfg.model.path = str(hf_folder)
    apply_overrides(cfg, ["adapter.method=comoe-dora", "adapter.rank=4", "adapter.layers=0:2",
                          "adapter.target_modules=q_proj,up_proj"])
    model = _perturbed(build_model(cfg), 5)
    with pytest.raises(ValueError, match="mixtures export with comoe_jax.checkpoint.save_adapters"):
        export_peft(model, cfg, tmp_path / "nope")
    save_adapters(tmp_path / "adapter", flat_values(split_model(model)[1]), model.groups, cfg)
    loaded, tokenizer = load_adapted(tmp_path / "adapter")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, size=(3, 8)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))
    assert loaded.placement.spec.dora and loaded.placement.spec.num_experts == 4
    prompts = ["abc", "the model"]
    texts = generate_text(loaded, tokenizer, prompts, max_new_tokens=4)
    assert len(texts) == 2 and texts == generate_text(model, tokenizer, prompts, max_new_tokens=4)


def _run_folder(folder, cfg, model):
    import json

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), default=list))
    save_adapters(folder / "adapter", flat_values(split_model(model)[1]), model.groups, cfg)
    return folder


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_export_command_peft_and_merged_load_in_transformers(hf_folder, tmp_path, method, capsys):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from comoe_jax.commands import export

    cfg = Config()
    cfg.model.path = str(hf_folder)
    apply_overrides(cfg, [f"adapter.method={method}", "adapter.rank=4", "adapter.alpha=12", "adapter.layers=1:3",
                          "adapter.target_modules=q_proj,o_proj,up_proj"])
    model = _perturbed(build_model(cfg), 7)
    run = _run_folder(tmp_path / "run", cfg, model)
    ids = np.random.default_rng(4).integers(0, 96, size=(2, 9))
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))

    assert export.main(["--run", str(run), "--format", "peft"]) == 0
    peft_model = AutoPeftModelForCausalLM.from_pretrained(run / "peft")  # base found from adapter_config.json
    with torch.no_grad():
        np.testing.assert_allclose(peft_model(torch.as_tensor(ids)).logits.numpy(), ours, atol=1e-4, rtol=0)
    assert export.main(["--run", str(run), "--format", "merged"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert AutoTokenizer.from_pretrained(run / "merged")("ab")["input_ids"]
    generation = (hf_folder / "generation_config.json").read_text()  # the base's end tokens travel with it
    assert (run / "merged" / "generation_config.json").read_text() == generation
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.as_tensor(ids)).logits.numpy(), ours, atol=1e-4, rtol=0)
    before = (run / "merged" / "model.safetensors").read_bytes()
    assert export.main(["--run", str(run), "--format", "merged"]) == 2  # never overwritten without asking
    assert "pass --overwrite" in capsys.readouterr().err
    assert (run / "merged" / "model.safetensors").read_bytes() == before
    (run / "merged" / "stale.txt").write_text("from before")
    assert export.main(["--run", str(run), "--format", "merged", "--overwrite"]) == 0
    assert not (run / "merged" / "stale.txt").exists() and (run / "merged" / "model.safetensors").exists()


def test_export_command_refuses_a_mixture_for_peft(hf_folder, tmp_path, capsys):
    from comoe_jax.commands import export

    cfg = Config()
    cfg.model.path = str(hf_folder)
    apply_overrides(cfg, ["adapter.rank=2", "adapter.layers=0:1", "adapter.target_modules=q_proj"])
    run = _run_folder(tmp_path / "run", cfg, build_model(cfg))
    assert export.main(["--run", str(run), "--format", "merged"]) == 2
    assert "adapter.method=comoe-lora cannot export as merged" in capsys.readouterr().err
    assert not (run / "merged").exists()
    assert export.main(["--run", str(run), "--format", "comoe", "--out", str(tmp_path / "copy")]) == 0
    assert load_adapted(tmp_path / "copy")[0].placement.spec.num_experts == 4


# --------------------------------------------------------------------------- parameter counts and training


@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_parameter_counts_match_a_hand_count(method, tiny_config):
    # hidden 32, MLP 64, 2 layers, 4 heads / 2 kv heads (head_dim 8), r 4
    cfg = tiny_config(adapter__target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    apply_overrides(cfg, [f"adapter.method={method}"])
    n, r = cfg.adapter.num_experts, cfg.adapter.rank
    shapes = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32), "down_proj": (64, 32)}
    lora = sum(n * r * (d_in + d_out) for d_in, d_out in shapes.values())
    router = 0 if n == 1 else sum(d_in * n for d_in, _ in shapes.values())
    magnitude = sum(n * d_out for _, d_out in shapes.values()) if method in ("dora", "comoe-dora") else 0
    counts = trainable_parameter_counts(validate(cfg))
    assert counts["total"] == 2 * (lora + router + magnitude)
    assert counts.get("router", 0) == 2 * router and counts.get("magnitude", 0) == 2 * magnitude


@pytest.mark.parametrize("method", [m for m in METHODS if m != "comoe-lora"])  # comoe-lora: test_train.py
def test_each_method_trains(method, tiny_config, setup_step, next_batch):
    cfg = tiny_config(train__steps=10, adapter__target_modules=("q_proj", "v_proj", "up_proj"))
    apply_overrides(cfg, [f"adapter.method={method}"])
    step_fn, state, frozen, data, mesh, rules = setup_step(validate(cfg))
    before = jax.tree.map(np.asarray, state.params)
    batch = next_batch(data, cfg, mesh, rules)
    losses = []
    for _ in range(10):
        state, metrics = step_fn(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
    for name, value in state.params.items():
        assert not np.allclose(np.asarray(value), before[name]), f"{name} did not train"
    if cfg.loss.load_balance_weight:
        assert np.isfinite(float(metrics["load_balance"]))
