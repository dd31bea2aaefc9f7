"""Built-in data (templates, response-only loss mask, determinism) and adapter export / import."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comoe_jax.checkpoint import load_adapters, save_adapters, set_adapters
from comoe_jax.data import TEMPLATES, BuiltinData, encode
from comoe_jax.loading import build_model, byte_tokenizer
from comoe_jax.model import flat_values, split_model
from tests.test_train import tiny_config


def test_encode_masks_only_the_response_and_eos():
    tok = byte_tokenizer()
    ids, is_response, length, truncated = encode(tok, "Q: hi\nA: ", "yo", seq_len=16)
    assert ids.shape == is_response.shape == (17,)
    assert length == len("Q: hi\nA: ") + 2 + 1 and not truncated
    assert tok.decode(ids[:length][is_response[:length] == 1]) == "yo</s>"
    assert (ids[length:] == tok.pad_token_id).all() and (is_response[length:] == 0).all()
    _, _, short, cut = encode(tok, "Q: hi\nA: ", "a long answer", seq_len=10)
    assert short == 11 and cut


def test_batches_are_shifted_and_masked():
    tok = byte_tokenizer()
    data = BuiltinData(tok, ("add", "antonym"), seq_len=64, template="plain", size=32)
    assert data.truncated == 0
    b = data.batch(0, 4)
    np.testing.assert_array_equal(b.input_ids[:, 1:], b.targets[:, :-1])
    for row in range(4):
        targets = b.targets[row][b.loss_mask[row] == 1]
        assert tok.decode(targets).endswith("</s>")
        assert tok.decode(targets[:-1]).strip() != ""
        # the loss never looks at padding, and attention covers the prompt too
        assert (b.attention_mask[row][b.loss_mask[row] == 1] == 1).all()
        assert b.attention_mask[row].sum() > b.loss_mask[row].sum()


def test_batches_depend_only_on_seed_and_step():
    tok = byte_tokenizer()
    one = BuiltinData(tok, ("add", "reverse"), 48, seed=3, template="plain", size=20)
    two = BuiltinData(tok, ("add", "reverse"), 48, seed=3, template="plain", size=20)
    other = BuiltinData(tok, ("add", "reverse"), 48, seed=4, template="plain", size=20)
    for step in (0, 4, 11):  # 11 * 4 crosses several epochs of 20 examples
        np.testing.assert_array_equal(one.batch(step, 4).input_ids, two.batch(step, 4).input_ids)
    assert not np.array_equal(one.batch(0, 4).input_ids, other.batch(0, 4).input_ids)
    seen = np.concatenate([one.indices(s, 4) for s in range(5)])
    assert sorted(seen) == list(range(20))  # one epoch = every example once


def test_truncation_is_counted_and_empty_responses_dropped():
    tok = byte_tokenizer()
    data = BuiltinData(tok, ("upper",), seq_len=180, template="alpaca", size=16)
    assert data.size + data.dropped == 16 and data.dropped > 0 and data.truncated == data.size
    assert BuiltinData(tok, ("upper",), seq_len=200, template="alpaca", size=16).truncated == 0
    with pytest.raises(ValueError, match="leaves no response tokens"):
        BuiltinData(tok, ("upper",), seq_len=20, template="alpaca", size=4)


def test_tokenizer_without_pad_token_is_refused():
    tok = byte_tokenizer()
    tok.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        encode(tok, "a", "b", 8)
    assert set(TEMPLATES) == {"alpaca", "plain"}


def test_adapter_export_round_trip(tmp_path):
    cfg = tiny_config(adapter__layers="1:2")
    model = build_model(cfg)
    _, adapters, _ = split_model(model)
    rng = np.random.default_rng(0)
    trained = {k: jnp.asarray(rng.normal(size=v.shape), v.dtype) for k, v in flat_values(adapters).items()}
    save_adapters(tmp_path / "adapter", trained, model.groups, cfg)
    tensors, meta = load_adapters(tmp_path / "adapter")
    assert meta["adapter"]["layers"] == "1:2"
    assert set(tensors) == {f"layers.1.self_attn.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
                            for w in ("lora_a", "lora_b", "router")}
    assert tensors["layers.1.self_attn.q_proj.lora_a"].shape == (4, 32, 4)

    fresh = build_model(tiny_config(adapter__layers="1:2", train__seed=7))
    ids = jnp.asarray(rng.integers(0, 300, size=(2, 9)), jnp.int32)
    before = np.asarray(fresh(ids))
    set_adapters(fresh, tensors)
    for name, value in flat_values(split_model(fresh)[1]).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(trained[name]))
    assert not np.allclose(np.asarray(fresh(ids)), before)
    bad = dict(tensors)
    bad["layers.1.self_attn.q_proj.lora_a"] = bad["layers.1.self_attn.q_proj.lora_a"][:, :, :2]
    with pytest.raises(ValueError, match=r"q_proj\.lora_a: shape"):
        set_adapters(fresh, bad)


def test_statistics_follow_adapter_module_order():
    from comoe_jax.adapters import ForwardContext

    model = build_model(tiny_config(adapter__target_modules=("q_proj", "down_proj")))
    ids = jnp.ones((2, 6), jnp.int32)
    out = model.forward(ids, ctx=ForwardContext(jnp.ones((2, 6)), jnp.float32(12), jax.random.key(0)))
    assert list(out.stats) == model.adapter_modules()
    assert model.adapter_modules()[:2] == ["layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"]
