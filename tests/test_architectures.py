"""Mistral, Qwen2, Qwen3, SmolLM3, Granite, OLMo 2 / 3, Phi-3, Gemma and Gemma 2: logits parity with
transformers' PyTorch models, adapters, training, exports; refusals."""

import shutil
from functools import partial
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from flax import nnx

torch = pytest.importorskip("torch")
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    MinistralConfig,
    MinistralForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Olmo3Config,
    Olmo3ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from comoe_jax import AdapterConfig, from_pretrained  # noqa: E402
from comoe_jax.config import ModelConfig  # noqa: E402
from comoe_jax.evaluate import Scorer  # noqa: E402
from comoe_jax.generate import greedy_generate  # noqa: E402
from comoe_jax.loading import LoadError, model_factory, model_spec  # noqa: E402
from comoe_jax.model import flat_values, split_model  # noqa: E402
from tests.support import padded_inputs, randomised  # noqa: E402

LENGTH = 14  # longer than the windows below
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
CLASSES = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "qwen3": (Qwen3Config, Qwen3ForCausalLM), "ministral": (MinistralConfig, MinistralForCausalLM),
           "smollm3": (SmolLM3Config, SmolLM3ForCausalLM), "gemma": (GemmaConfig, GemmaForCausalLM),
           "gemma2": (Gemma2Config, Gemma2ForCausalLM), "olmo2": (Olmo2Config, Olmo2ForCausalLM),
           "olmo3": (Olmo3Config, Olmo3ForCausalLM), "granite": (GraniteConfig, GraniteForCausalLM),
           "phi3": (Phi3Config, Phi3ForCausalLM)}
# name -> (model_type, config fields, expected spec fields)
CONFIGS = {
    "mistral_window5_gqa": ("mistral", dict(sliding_window=5),
                            dict(sliding_window=5, sliding_layers=(True, True), qkv_bias=False, qk_norm=False)),
    "mistral_no_window_mha_tied": ("mistral", dict(sliding_window=None, num_key_value_heads=4, tie_word_embeddings=True,
                                                   rope_parameters=dict(rope_type="default", rope_theta=500.0)),
                                   dict(sliding_window=None, sliding_layers=())),
    "qwen2_qkv_biases_gqa": ("qwen2", dict(), dict(qkv_bias=True, attention_bias=False, sliding_layers=())),
    "qwen2_window4_on_layer1": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                              num_key_value_heads=1),
                                dict(qkv_bias=True, sliding_window=4, sliding_layers=(False, True))),
    "ministral_window4_on_layer1": ("ministral", dict(sliding_window=4, head_dim=8,  # (its config needs one)
                                                     layer_types=["full_attention", "sliding_attention"]),
                                   dict(qkv_bias=False, attention_bias=False, sliding_window=4,
                                        sliding_layers=(False, True))),
    "qwen3_qk_norm_gqa": ("qwen3", dict(head_dim=16), dict(qk_norm=True, qkv_bias=False, attention_bias=False,
                                                           head_dim=16, sliding_layers=())),
    "qwen3_attention_bias_tied": ("qwen3", dict(head_dim=8, attention_bias=True, tie_word_embeddings=True),
                                  dict(qk_norm=True, attention_bias=True, head_dim=8)),
    # (SmolLM3's default special-token ids lie outside this vocabulary)
    "smollm3_nope_on_layer1": ("smollm3", dict(no_rope_layer_interval=2, pad_token_id=None),
                               dict(family="llama", nope_layers=(False, True), sliding_layers=())),
    "smollm3_nope_on_layer0_window4": ("smollm3", dict(no_rope_layers=[0, 1], use_sliding_window=True,
                                                       sliding_window=4, pad_token_id=None, tie_word_embeddings=False,
                                                       layer_types=["sliding_attention", "full_attention"]),
                                       dict(nope_layers=(True, False), sliding_window=4,
                                            sliding_layers=(True, False), tie_word_embeddings=False)),
    "granite_multipliers": ("granite", dict(embedding_multiplier=3.0, residual_multiplier=0.4,
                                            attention_multiplier=0.3, logits_scaling=2.5),
                            dict(family="llama", embedding_multiplier=3.0, residual_multiplier=0.4, query_scale=0.3,
                                 logits_scaling=2.5)),
    # (Phi-3's default special-token ids lie outside this vocabulary)
    "phi3_window5_half_rotary": ("phi3", dict(pad_token_id=None, eos_token_id=2, sliding_window=5, rope_parameters=dict(
        rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
        dict(sliding_window=5, sliding_layers=(True, True), attention_bias=False, qkv_bias=False)),
    "phi3_longrope_mha_tied": ("phi3", dict(pad_token_id=None, eos_token_id=2, num_key_value_heads=4,
                                            tie_word_embeddings=True, original_max_position_embeddings=8,
                                            partial_rotary_factor=0.75, rope_parameters=dict(
                                                rope_type="longrope", rope_theta=1e4, short_factor=[1.0, 1.1, 1.2],
                                                long_factor=[4.0, 8.0, 16.0])),
                               dict(sliding_window=None, sliding_layers=(), tie_word_embeddings=True)),
    # one KV head and head_dim 16, not hidden / heads = 8: the fused rows split by head_dim
    "phi3_mqa_head16_quarter_rotary": ("phi3", dict(pad_token_id=None, eos_token_id=2, head_dim=16,
                                                    num_key_value_heads=1, rope_parameters=dict(
                                                        rope_type="default", rope_theta=1e4,
                                                        partial_rotary_factor=0.25)),
                                       dict(head_dim=16, num_kv_heads=1, sliding_layers=())),
    "olmo2_post_norms_gqa": ("olmo2", dict(pad_token_id=None), dict(sliding_layers=(), qk_norm=False)),
    "olmo3_window4_on_layer0_two_ropes": ("olmo3", dict(
        pad_token_id=None, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}),
        dict(sliding_window=4, sliding_layers=(True, False), tie_word_embeddings=True)),
    "gemma_mqa_head16_tied": ("gemma", dict(head_dim=16, num_key_value_heads=1),
                              dict(head_dim=16, tie_word_embeddings=True, sliding_layers=(), query_scale=None,
                                   attn_logit_softcap=None, final_logit_softcap=None, qk_norm=False)),
    # caps small enough to bite on these random weights (Gemma 2 ships 50 / 30)
    "gemma2_softcaps_window4": ("gemma2", dict(head_dim=8, sliding_window=4, query_pre_attn_scalar=12,
                                               attn_logit_softcapping=1.5, final_logit_softcapping=4.0),
                                dict(sliding_window=4, sliding_layers=(True, False), query_scale=12 ** -0.5,
                                     attn_logit_softcap=1.5, final_logit_softcap=4.0, qk_norm=False)),
}


class Saved(NamedTuple):
    folder: str  # save_pretrained of the reference
    ids: np.ndarray  # padded_inputs [3, LENGTH]
    mask: np.ndarray
    want: np.ndarray  # transformers' logits
    got: np.ndarray  # ours (no adapters)


def _hf_model(name):
    model_type, fields, _ = CONFIGS[name]
    config_class, model_class = CLASSES[model_type]
    return randomised(model_class, config_class(**(BASE | fields)))


def _logits(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


def _ours(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(name)``: the random transformers model of ``CONFIGS[name]`` saved once, with both logits."""
    cache = {}

    def get(name) -> Saved:
        if name not in cache:
            hf_model, folder = _hf_model(name), tmp_path_factory.mktemp(name)
            hf_model.save_pretrained(folder)
            ids, mask = padded_inputs(hf_model.config.vocab_size, length=LENGTH)
            got = _ours(from_pretrained(str(folder)), ids, mask)
            cache[name] = Saved(str(folder), ids, mask, _logits(hf_model, ids, mask), got)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, saved):
    ref = saved(name)
    model_type, _, expected = CONFIGS[name]
    spec = model_spec(ref.folder)
    assert spec.family == {"ministral": "mistral", "smollm3": "llama", "granite": "llama",
                           "olmo3": "olmo2"}.get(model_type, model_type)
    assert {k: getattr(spec, k) for k in expected} == expected
    assert ref.got.shape == ref.want.shape and ref.got.dtype == np.float32
    real = ref.mask.astype(bool)
    np.testing.assert_allclose(ref.got[real], ref.want[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["mistral_window5_gqa", "qwen2_window4_on_layer1", "ministral_window4_on_layer1",
                                  "phi3_window5_half_rotary"])
def test_the_sliding_window_is_what_makes_parity(name, saved):
    """Without its window the reference differs past it: the parity above is not that of full attention."""
    ref, hf_model = saved(name), _hf_model(name)  # the same seed: the same weights
    window = hf_model.config.sliding_window
    if not name.startswith(("mistral", "phi3")):  # the mask of each layer follows layer_types
        hf_model.config.layer_types = ["full_attention"] * 2
        for layer in hf_model.model.layers:
            layer.self_attn.sliding_window = None
    else:
        hf_model.config.sliding_window = None
    full = _logits(hf_model, ref.ids, ref.mask)
    np.testing.assert_allclose(ref.got[0, :window], full[0, :window], atol=1e-4)  # inside the window
    assert np.abs(ref.got[0, window + 2:] - full[0, window + 2:]).max() > 1e-2


@pytest.mark.parametrize("name", ["mistral_window5_gqa", "gemma2_softcaps_window4", "smollm3_nope_on_layer0_window4",
                                  "olmo3_window4_on_layer0_two_ropes", "phi3_window5_half_rotary"])
def test_cached_generation_under_a_window_equals_full_recompute(name, saved):
    model = from_pretrained(saved(name).folder)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(3, 97, size=n)) for n in (7, 2)]  # 7 + 4 tokens: past the window of 5
    got = greedy_generate(model, prompts, max_new_tokens=4, eos_id=-1, pad_id=0, batch_size=2)
    ids, mask = np.zeros((2, 11), np.int32), np.zeros((2, 11), np.int32)
    for row, (p, g) in enumerate(zip(prompts, got)):
        ids[row, :len(p) + len(g)], mask[row, :len(p) + len(g)] = p + g, 1
    logits = _ours(model, ids, mask)  # each new token: the argmax of a full (windowed) forward of what precedes it
    for row, (p, g) in enumerate(zip(prompts, got)):
        assert len(g) == 4 and g == [int(i) for i in logits[row, len(p) - 1:len(p) + 3].argmax(-1)]


def test_smollm3_parity_needs_its_nope_layers(saved):
    """With RoPE on every layer the reference differs: the parity above is not that of a plain Llama."""
    ref, hf_model = saved("smollm3_nope_on_layer1"), _hf_model("smollm3_nope_on_layer1")
    for layer in hf_model.model.layers:
        layer.self_attn.use_rope = 1
    real = ref.mask.astype(bool)
    assert np.abs(_logits(hf_model, ref.ids, ref.mask)[real] - ref.got[real]).max() > 1e-2


def test_smollm3_windows_a_layer_only_with_use_sliding_window():
    """As transformers' SmolLM3 attention: a window needs use_sliding_window (a config whose layer_types
    disagree with it is refused, in the test below)."""
    arch = BASE | dict(model_type="smollm3", sliding_window=4)
    assert model_spec("random", arch).sliding_layers == ()
    both = arch | dict(use_sliding_window=True, layer_types=["sliding_attention"] * 2)
    assert model_spec("random", both).sliding_layers == (True, True)
    with pytest.raises(LoadError, match=r"no_rope_layers must list 1 \(RoPE\) or 0 \(no RoPE\) for each of the 2 "
                                        r"layers \(got \[1, 1, 2\]\)"):
        model_spec("random", arch | dict(no_rope_layers=[1, 1, 2]))


@pytest.mark.parametrize("key, value", [("embedding_multiplier", 1.0), ("residual_multiplier", 1.0),
                                        ("attention_multiplier", 2.0), ("logits_scaling", 1.0)])
def test_granite_parity_needs_each_multiplier(key, value, saved):
    """Each of Granite's four multipliers changed (to 1, or a sharper query scale) changes the reference's logits."""
    ref, hf_model = saved("granite_multipliers"), _hf_model("granite_multipliers")
    if key == "attention_multiplier":
        for layer in hf_model.model.layers:
            layer.self_attn.scaling = value
    elif key == "residual_multiplier":
        for layer in hf_model.model.layers:
            layer.residual_multiplier = value
    elif key == "embedding_multiplier":
        hf_model.model.embedding_multiplier = value
    setattr(hf_model.config, key, value)
    real = ref.mask.astype(bool)
    assert np.abs(_logits(hf_model, ref.ids, ref.mask)[real] - ref.got[real]).max() > 1e-2


@pytest.mark.parametrize("fields, match", [
    (dict(model_type="granite", residual_multiplier=0), r"residual_multiplier=0; Granite's multipliers are positive"),
    (dict(model_type="granite", logits_scaling=-1.0), r"logits_scaling=-1\.0; Granite's multipliers are positive"),
    (dict(model_type="granite", embedding_multiplier=float("inf")), r"embedding_multiplier=inf; Granite's multipliers"),
    (dict(model_type="gemma2", query_pre_attn_scalar=0), r"query_pre_attn_scalar=0; it must be a positive number"),
    (dict(model_type="mistral", sliding_window=0), r"sliding_window=0; it must be a positive integer \(tokens\)"),
    (dict(model_type="olmo3", sliding_window=-4), r"sliding_window=-4; it must be a positive integer"),
    (dict(model_type="smollm3", no_rope_layers=[1, 2]), r"no_rope_layers must list 1 \(RoPE\) or 0 \(no RoPE\)"),
    (dict(model_type="smollm3", sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
     r"layer_types lists sliding_attention layers but use_sliding_window is false"),
    (dict(model_type="gemma2", sliding_window=None), r"layer_types lists sliding_attention layers but sliding_window "
                                                     r"is null"),
    (dict(model_type="olmo3", sliding_window=None), r"layer_types lists sliding_attention layers but sliding_window"),
    (dict(model_type="gemma", use_bidirectional_attention=True), r"use_bidirectional_attention=True is not supported"),
    (dict(model_type="llama", rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     r"partial_rotary_factor=0\.5 is not supported for this model type \(rotary embeddings on the whole head only"),
    (dict(model_type="phi3", pad_token_id=None, rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                                     partial_rotary_factor=0.2)),
     r"partial_rotary_factor=0\.2; it must be in \(0, 1\] and leave an even number of rotary dimensions of the "
     r"head's 8"),
])
def test_architecture_numbers_a_model_cannot_run_are_refused(fields, match):
    with pytest.raises(LoadError, match=rf"^model\.random_arch: {match}"):
        model_spec("random", BASE | fields)


def test_what_smollm3_and_gemma_read_as_transformers_does():
    """SmolLM3 reads only its first num_hidden_layers no_rope_layers; Gemma 1 (in transformers 5) takes its
    activation from hidden_act, Gemma 2 / 3 from hidden_activation."""
    spec = model_spec("random", BASE | dict(model_type="smollm3", no_rope_layers=[0, 1, 1, 0]))
    assert spec.nope_layers == (True, False)
    from comoe_jax.architectures import decoder_spec

    for config_class, want in ((GemmaConfig, "silu"), (Gemma2Config, "gelu")):
        config = config_class(**BASE, hidden_act="silu")
        config.hidden_activation = "gelu"  # (a field Gemma 1's config does not define: set as a loaded one would)
        assert decoder_spec(config).hidden_act == want


def test_olmo_norms_and_rope_round_in_float32_as_transformers():
    """In bfloat16 OLMo scales its norms and rotates in float32 before rounding; Llama rounds first."""
    from comoe_jax.model import RMSNorm
    from comoe_jax.rope import apply_rope

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 16)) * 3, jnp.bfloat16)
    w = rng.normal(size=16).astype(np.float32) * 2
    x64 = np.asarray(x, np.float64)
    normed = (x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6)).astype(np.float32)
    olmo, llama = (RMSNorm(16, 1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32, style=s) for s in ("olmo", "llama"))
    olmo.scale[...] = llama.scale[...] = jnp.asarray(w)
    np.testing.assert_array_equal(np.asarray(olmo(x), np.float32),
                                  np.asarray(jnp.asarray(w * normed).astype(jnp.bfloat16), np.float32))
    assert olmo(x).dtype == llama(x).dtype == jnp.bfloat16
    assert not np.array_equal(np.asarray(olmo(x), np.float32), np.asarray(llama(x), np.float32))
    cos, sin = (jnp.asarray(f(rng.normal(size=(2, 3, 16))), jnp.float32) for f in (np.cos, np.sin))
    rotated = apply_rope(x, cos, sin, jnp.float32)
    half = np.concatenate([-x64[..., 8:], x64[..., :8]], -1)
    want = x64 * np.asarray(cos)[:, :, None] + half * np.asarray(sin)[:, :, None]
    assert rotated.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(rotated, np.float32),
                                  np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16), np.float32))


def test_gemma2_parity_needs_its_attention_soft_cap(saved):
    """Without the cap on its attention scores the reference differs: the parity above is not that of
    plain attention (the cap sits inside the attention, where jax.nn.dot_product_attention has none)."""
    ref, hf_model = saved("gemma2_softcaps_window4"), _hf_model("gemma2_softcaps_window4")
    for layer in hf_model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    real = ref.mask.astype(bool)
    assert np.abs(_logits(hf_model, ref.ids, ref.mask)[real] - ref.got[real]).max() > 1e-2


class SoftcappedAttentionTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((2, 5, 7, 6, 3, 4, 0.8, 0.37), (1, 3, 3, 4, 1, 8, 2.0, None),
                              (3, 6, 2, 2, 2, 5, 0.3, 1.1))
    def test_equals_a_float64_loop(self, b, t, s, n, kv, hd, cap, scale):
        """``softcapped_attention`` against the plain definition, one query, head and key at a time."""
        from comoe_jax.model import softcapped_attention

        rng = np.random.default_rng(b * t * s + n)
        q, k, v = rng.normal(size=(b, t, n, hd)), rng.normal(size=(b, s, kv, hd)), rng.normal(size=(b, s, kv, hd))
        mask = rng.random((b, 1, t, s)) < 0.7
        mask[..., 0] = True  # every query sees a key
        attend = self.variant(partial(softcapped_attention, scale=scale, cap=cap, causal=False))
        got = attend(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), jnp.asarray(mask))
        want = np.zeros((b, t, n, hd))
        factor = hd ** -0.5 if scale is None else scale
        for i in range(b):
            for j in range(t):
                for h in range(n):
                    g = h // (n // kv)
                    scores = [cap * np.tanh(q[i, j, h] @ k[i, m, g] * factor / cap) for m in range(s)]
                    weights = [np.exp(x) if mask[i, 0, j, m] else 0.0 for m, x in enumerate(scores)]
                    want[i, j, h] = sum(w * v[i, m, g] for m, w in enumerate(weights)) / sum(weights)
        chex.assert_shape(got, (b, t, n, hd))
        chex.assert_type(got, jnp.float32)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
        half = attend(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), jnp.asarray(mask))
        chex.assert_type(half, jnp.bfloat16)  # scores and softmax in float32 inside
        np.testing.assert_allclose(np.asarray(half, np.float32), want, atol=0.05)
        q2, k2, v2 = (jnp.asarray(a[:, :min(t, s)], jnp.float32) for a in (q, k, v))
        causal = self.variant(partial(softcapped_attention, scale=scale, cap=cap, causal=True))(q2, k2, v2, None)
        tril = jnp.asarray(np.tril(np.ones((q2.shape[1],) * 2, bool)))[None, None]
        np.testing.assert_allclose(np.asarray(causal), np.asarray(attend(q2, k2, v2, tril)), atol=1e-6)


def test_phi3_parity_needs_its_partial_rotary(saved):
    """Rotating whole heads the reference differs: the parity above is that of Phi-3's half-rotated heads."""
    ref, hf_model = saved("phi3_window5_half_rotary"), _hf_model("phi3_window5_half_rotary")
    hf_model.config.rope_parameters["partial_rotary_factor"] = 1.0
    hf_model.model.rotary_emb = type(hf_model.model.rotary_emb)(hf_model.config)
    real = ref.mask.astype(bool)
    assert np.abs(_logits(hf_model, ref.ids, ref.mask)[real] - ref.got[real]).max() > 1e-2


def test_phi3_fused_weights_are_split_by_rows(saved):
    """Phi-3's qkv_proj rows are q (heads x hd), k, v (kv heads x hd); gate_up_proj's gate then up."""
    ref, hf_model = saved("phi3_window5_half_rotary"), _hf_model("phi3_window5_half_rotary")
    layer = from_pretrained(ref.folder).layers[0].layer
    qkv = hf_model.model.layers[1].self_attn.qkv_proj.weight.detach().numpy()
    gate_up = hf_model.model.layers[1].mlp.gate_up_proj.weight.detach().numpy()
    attn, mlp = layer.self_attn, layer.mlp
    np.testing.assert_array_equal(np.asarray(attn.q_proj.kernel[...][1]).T, qkv[:32])
    np.testing.assert_array_equal(np.asarray(attn.k_proj.kernel[...][1]).T, qkv[32:48])
    np.testing.assert_array_equal(np.asarray(attn.v_proj.kernel[...][1]).T, qkv[48:])
    np.testing.assert_array_equal(np.asarray(mlp.gate_proj.kernel[...][1]).T, gate_up[:48])
    np.testing.assert_array_equal(np.asarray(mlp.up_proj.kernel[...][1]).T, gate_up[48:])


def test_phi3_fused_tensor_of_the_wrong_size_is_named(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(saved("phi3_window5_half_rotary").folder, tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.self_attn.qkv_proj.weight"
    tensors[key] = tensors[key][:-8]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadError, match=rf"model\.safetensors: tensor {key} has shape \(56, 32\), the config implies "
                                        r"64 rows \(its projections stacked\)"):
        from_pretrained(str(tmp_path))


def test_phi3_longrope_generation_encodes_again_past_its_original_length_as_transformers(saved, monkeypatch):
    """transformers' Phi-3 generate encodes the whole sequence again when it grows past
    original_max_position_embeddings (8 here), so every key takes the long factors: our cached generation
    gives its tokens, for prompts that cross the limit while generating, start past it, or never reach it;
    keeping the prompt's short-factor keys instead would not."""
    from comoe_jax.model import DecoderSpec

    ref, hf_model = saved("phi3_longrope_mha_tied"), _hf_model("phi3_longrope_mha_tied")
    hf_model.generation_config.eos_token_id, hf_model.generation_config.pad_token_id = None, 0
    model = from_pretrained(ref.folder)
    assert model.spec.reencode_at == 8
    rng = np.random.default_rng(5)
    prompts = [list(map(int, rng.integers(3, 97, size=n))) for n in (3, 5, 6, 7, 8, 9, 2)]
    want = []
    for p in prompts:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)
        want.append(out[0, len(p):].tolist())
    assert greedy_generate(model, prompts, max_new_tokens=6, eos_id=-1, pad_id=0, batch_size=4) == want
    monkeypatch.setattr(DecoderSpec, "reencode_at", property(lambda self: None))
    jax.clear_caches()  # the compiled generation is keyed on the model's structure, which the patch leaves as it is
    assert greedy_generate(from_pretrained(ref.folder), prompts, max_new_tokens=6, eos_id=-1, pad_id=0,
                           batch_size=4) != want


class ApplyRopeTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((2, 5, 3, 8, 8), (1, 7, 2, 12, 6), (3, 4, 1, 10, 4))
    def test_partial_rotation_equals_a_float64_loop(self, b, t, heads, hd, rd):
        """The first ``rd`` dimensions of each head rotate in pairs (i, i + rd / 2); the rest pass unchanged."""
        from comoe_jax.rope import apply_rope

        rng = np.random.default_rng(hd * 10 + rd)
        x, angles = rng.normal(size=(b, t, heads, hd)), rng.normal(size=(b, t, rd // 2))
        cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
        got = self.variant(apply_rope)(*(jnp.asarray(a, jnp.float32) for a in (x, cos, sin)))
        want = x.copy()
        for i in range(b):
            for j in range(t):
                for h in range(heads):
                    for d in range(rd // 2):
                        a, c = x[i, j, h, d], x[i, j, h, d + rd // 2]
                        want[i, j, h, d] = a * np.cos(angles[i, j, d]) - c * np.sin(angles[i, j, d])
                        want[i, j, h, d + rd // 2] = c * np.cos(angles[i, j, d]) + a * np.sin(angles[i, j, d])
        chex.assert_shape(got, (b, t, heads, hd))
        chex.assert_type(got, jnp.float32)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("name", ["mistral_window5_gqa", "qwen2_window4_on_layer1", "gemma2_softcaps_window4",
                                  "olmo3_window4_on_layer0_two_ropes"])
def test_packed_option_scores_keep_the_window_in_positions(name, saved):
    """Packed rows put an item's options after one another; a window counts positions, not slots."""
    model = from_pretrained(saved(name).folder)
    rng = np.random.default_rng(4)
    contexts = [[5, 6] + list(rng.integers(3, 97, size=n)) for n in (9, 3, 12)]
    options = [[list(rng.integers(3, 97, size=m)) for m in sizes] for sizes in ([6, 2], [1, 7, 3], [4, 4])]
    scorer = Scorer(model, 0, batch_size=2, row_len=32)
    packed = np.concatenate(scorer.option_logprobs(contexts, options))
    whole = scorer.continuation_logprobs([(c, o) for c, opts in zip(contexts, options) for o in opts])
    np.testing.assert_allclose(packed, [total for total, _ in whole], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mistral_window5_gqa", "qwen2_qkv_biases_gqa", "qwen3_qk_norm_gqa",
                                  "gemma2_softcaps_window4", "smollm3_nope_on_layer1", "olmo2_post_norms_gqa",
                                  "granite_multipliers", "phi3_window5_half_rotary"])
def test_comoe_adapters_start_at_the_base_model_and_train(name, saved):
    """CoMoE experts attach to all seven projections by name; on q_proj and o_proj (biased and not in Qwen2,
    after / before the q/k norms in Qwen3) the logits at initialisation are the base model's, and gradient
    steps on the next-token loss (through Mistral's window) lower it and move only the adapters."""
    ref = saved(name)
    every = model_factory(ModelConfig(path=ref.folder), AdapterConfig(target_modules=ALL_PROJECTIONS), None, 0)
    assert [m.rsplit(".", 1)[-1] for m in nnx.eval_shape(every).adapter_modules()] == list(ALL_PROJECTIONS) * 2
    adapted = from_pretrained(ref.folder, adapter=AdapterConfig(target_modules=("q_proj", "o_proj")))
    assert adapted.num_adapters == 4
    attn = adapted.layers[0].layer.self_attn
    assert (attn.q_proj.bias is not None, attn.o_proj.bias is not None) == (name.startswith("qwen2"), False)
    assert hasattr(attn, "q_norm") == name.startswith(("qwen3", "olmo"))
    ids, mask, bare = jnp.asarray(ref.ids, jnp.int32), jnp.asarray(ref.mask), ref.got
    graphdef, params, frozen = split_model(adapted)

    @jax.jit
    def step(params, frozen):
        def loss(params):
            logits = nnx.merge(graphdef, params, frozen)(ids, mask)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
            return (ce * mask[:, 1:]).sum() / mask[:, 1:].sum(), logits

        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - 2.0 * g, params, grads), value, logits

    start, frozen_before = flat_values(params), flat_values(frozen)
    losses = []
    for _ in range(3):
        params, value, logits = step(params, frozen)
        losses.append(float(value))
        if len(losses) == 1:
            np.testing.assert_allclose(np.asarray(logits), bare, atol=1e-5, rtol=0)
    assert np.isfinite(losses).all() and losses[0] > losses[1] > losses[2], losses
    moved = {k for k, v in flat_values(params).items() if not np.array_equal(np.asarray(v), np.asarray(start[k]))}
    assert {k.rsplit(".", 1)[-1] for k in moved} >= {"lora_a", "lora_b"}
    assert all(k in moved for k in start if k.endswith("lora_b"))
    assert all(np.array_equal(np.asarray(v), np.asarray(frozen_before[k])) for k, v in flat_values(frozen).items())


@pytest.mark.parametrize("name", ["mistral_window5_gqa", "qwen2_window4_on_layer1", "qwen3_attention_bias_tied",
                                  "gemma_mqa_head16_tied", "gemma2_softcaps_window4", "smollm3_nope_on_layer1",
                                  "olmo2_post_norms_gqa", "olmo3_window4_on_layer0_two_ropes", "granite_multipliers",
                                  "phi3_longrope_mha_tied"])
def test_lora_exports_merged_and_peft_load_in_transformers(name, saved, tmp_path, monkeypatch):
    """A trained LoRA on every projection of Mistral / Qwen2 (biases) / Qwen3 (q/k norms, tied embeddings) / ...:
    the merged folder (AutoModelForCausalLM, no peft) and the peft folder give our adapted logits."""
    from transformers import AutoModelForCausalLM

    from comoe_jax import interop
    from comoe_jax.interop import export_merged

    ref, cfg, model, ours = _exported(name, saved, tmp_path, "lora", ALL_PROJECTIONS)
    real = ref.mask.astype(bool)
    if name.startswith("qwen3"):  # bfloat16, in shards with an index (as transformers shards a large model)
        monkeypatch.setattr(interop, "SHARD_BYTES", 2**13)
        half = AutoModelForCausalLM.from_pretrained(export_merged(model, cfg, tmp_path / "bf16", dtype="bfloat16"))
        assert half.dtype == torch.bfloat16 and (tmp_path / "bf16" / "model.safetensors.index.json").exists()
        assert len(list((tmp_path / "bf16").glob("model-*-of-*.safetensors"))) > 2
        np.testing.assert_allclose(_logits(half, ref.ids, ref.mask)[real], ours[real], atol=0.1, rtol=0)


def _exported(name, saved, tmp_path, method, targets):
    """A random single-expert ``method`` adapter on ``targets``; asserts the merged and peft exports give our
    logits in transformers; -> (saved reference, Config, our model, our logits)."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from comoe_jax.config import Config
    from comoe_jax.interop import export_merged, export_peft
    from comoe_jax.loading import byte_tokenizer
    from comoe_jax.model import state_from_flat

    ref = saved(name)
    byte_tokenizer().save_pretrained(ref.folder)  # the merged folder carries the base's tokenizer
    cfg = Config()
    cfg.model.path = ref.folder
    cfg.adapter.method, cfg.adapter.num_experts, cfg.adapter.top_k = method, 1, 1
    cfg.adapter.rank, cfg.adapter.alpha, cfg.adapter.target_modules = 4, 8.0, targets
    model = from_pretrained(ref.folder, adapter=cfg.adapter)
    _, adapters, _ = split_model(model)
    rng = np.random.default_rng(11)
    values = {k: rng.normal(size=v.shape) * 0.2 + (np.asarray(v) if k.endswith("magnitude") else 0)
              for k, v in flat_values(adapters).items()}
    nnx.update(model, state_from_flat(adapters, {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}))
    ours = _ours(model, ref.ids, ref.mask)
    real = ref.mask.astype(bool)
    assert np.abs(ours[real] - ref.got[real]).max() > 1e-2  # the adapters change the logits
    merged = AutoModelForCausalLM.from_pretrained(export_merged(model, cfg, tmp_path / "merged"))
    np.testing.assert_allclose(_logits(merged, ref.ids, ref.mask)[real], ours[real], atol=1e-4, rtol=0)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(export_peft(model, cfg, tmp_path / "peft")))
    np.testing.assert_allclose(_logits(peft_model, ref.ids, ref.mask)[real], ours[real], atol=1e-4, rtol=0)
    return ref, cfg, model, ours


def test_the_merged_export_holds_one_layer_at_a_time(saved):
    """The merged weights come layer by layer, each fused Phi-3 weight as soon as its layer's parts have come."""
    from comoe_jax.config import AdapterConfig
    from comoe_jax.interop import merged_tensors

    adapter = AdapterConfig(method="lora", num_experts=1, top_k=1, rank=2, target_modules=("q_proj", "up_proj"))
    model = from_pretrained(saved("phi3_mqa_head16_quarter_rotary").folder, adapter=adapter)
    names = [name for name, _ in merged_tensors(model, adapter)]
    layers = [int(name.split(".")[2]) for name in names if name.startswith("model.layers.")]
    assert layers == sorted(layers) and set(layers) == {0, 1}
    assert {"model.layers.1.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= set(names)
    assert not any(part in name for name in names for part in (".q_proj", ".k_proj", ".v_proj", ".up_proj"))


def test_phi3_dora_on_some_fused_parts_exports_to_peft_and_merged(saved, tmp_path):
    """DoRA on q_proj, v_proj and up_proj only: peft adapts Phi-3's fused qkv_proj / gate_up_proj, so the export is
    one DoRA per fused module, A stacked by rank and B block-diagonal with empty blocks for k_proj and gate_proj
    (their magnitudes are W0's norms: scale 1); merged and peft folders give our logits. Such a folder is refused
    as an adapter to read back, with the way out."""
    import json

    from comoe_jax.errors import AdapterFormatError
    from comoe_jax.interop import read_peft

    _exported("phi3_window5_half_rotary", saved, tmp_path, "dora", ("q_proj", "v_proj", "up_proj"))
    meta = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert meta["target_modules"] == ["gate_up_proj", "qkv_proj"] and meta["use_dora"]
    assert meta["rank_pattern"] == {"qkv_proj": 8, "gate_up_proj": 4}
    assert meta["alpha_pattern"] == {"qkv_proj": 16.0, "gate_up_proj": 8.0}
    with pytest.raises(AdapterFormatError, match=r"a peft adapter on gate_up_proj, qkv_proj \(Phi-3's fused "
                                                 r"projections\) cannot be read.*<run>/adapter"):
        read_peft(tmp_path / "peft", 2)


@pytest.mark.parametrize("name", ["olmo3_window4_on_layer0_two_ropes", "smollm3_nope_on_layer0_window4",
                                  "qwen2_window4_on_layer1", "granite_multipliers", "phi3_window5_half_rotary"])
def test_train_step_on_eight_devices_equals_one(name, tiny_config, run_steps, sharded):
    """CE + contrastive steps on a 2 x 2 x 2 mesh (data, fsdp, tensor): OLMo's norms over the whole
    (tensor-sharded) projections, SmolLM3's layers without RoPE, Qwen2's biases and Phi-3's half-rotated heads
    shard like the rest."""
    model_type, fields, _ = CONFIGS[name]
    arch = BASE | fields | {"model_type": model_type, "vocab_size": 320}
    one, eight = tiny_config(), tiny_config(**sharded)
    one.model.random_arch = eight.model.random_arch = arch
    np.testing.assert_allclose(run_steps(eight, jax.devices()[:8]), run_steps(one, jax.devices()[:1]), rtol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "phi"])
def test_unsupported_model_types_are_refused_with_the_supported_list(model_type, tmp_path):
    (tmp_path / "config.json").write_text(f'{{"model_type": "{model_type}", "num_hidden_layers": 2}}')
    with pytest.raises(LoadError, match=rf"model_type '{model_type}' is not supported; comoe-jax implements "
                                        r"llama, mistral, ministral, qwen2, qwen3, smollm3, granite, olmo2, "
                                        r"olmo3, gemma, gemma2, gemma3_text, gemma3, phi3"):
        from_pretrained(str(tmp_path))
    with pytest.raises(LoadError, match="model.random_arch: model_type 'phi' is not supported"):
        model_spec("random", dict(model_type="phi"))
    with pytest.raises(LoadError, match="model.random_arch: model_type 'gpt2' is not supported"):  # not its fields
        model_spec("random", dict(model_type="gpt2", intermediate_size=64))


def test_gguf_of_another_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "qwen2.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LoadError, match=r"GGUF architecture 'qwen2' is not supported.*Hugging Face folders"):
        from_pretrained(str(path))
