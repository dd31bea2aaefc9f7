"""Hub model ids (``model.path=org/name[@revision]``) through the Hugging Face cache, offline: the test lays the
cache out itself (``models--org--name/{refs,snapshots}``), as ``huggingface_hub`` would after a download."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from comoe_jax.config import Config, validate  # noqa: E402
from comoe_jax.errors import LoadError  # noqa: E402
from comoe_jax.loading import byte_tokenizer, from_pretrained, load_tokenizer  # noqa: E402
from comoe_jax.paths import hub_id  # noqa: E402
from tests.support import randomised  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline hub cache holding ``acme/tiny-llama`` at ``main`` = COMMIT; returns (cache, source folder)."""
    from huggingface_hub import constants
    from transformers import LlamaConfig, LlamaForCausalLM

    source = tmp_path / "source"
    randomised(LlamaForCausalLM, LlamaConfig(vocab_size=272, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
               0).save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    shutil.copytree(source, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub", source


def test_hub_ids_are_told_from_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_id("acme/tiny-llama") == ("acme/tiny-llama", None)
    assert hub_id("Qwen/Qwen2.5-0.5B@v1.0") == ("Qwen/Qwen2.5-0.5B", "v1.0")
    (tmp_path / "acme" / "tiny-llama").mkdir(parents=True)
    for local in ("acme/tiny-llama", "./x/y", "/abs/folder", "~/m/n", "a/b/c", "model.gguf", "gs://b/m"):
        assert hub_id(local) is None, local


def test_a_cached_hub_model_loads_offline_like_its_folder(hub_cache):
    _, source = hub_cache
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 200, size=(2, 7)), jnp.int32)
    want = np.asarray(from_pretrained(str(source))(ids))
    for name in ("acme/tiny-llama", f"acme/tiny-llama@{COMMIT}"):
        np.testing.assert_array_equal(np.asarray(from_pretrained(name)(ids)), want)
    assert load_tokenizer("acme/tiny-llama")("hi")["input_ids"] == load_tokenizer(str(source))("hi")["input_ids"]
    cfg = Config()
    cfg.model.path = "acme/tiny-llama"
    validate(cfg)


def test_a_hub_model_missing_from_the_cache_offline_is_a_clear_error(hub_cache):
    with pytest.raises(LoadError, match=r"model.path='acme/other': not a local file or folder, and not in the "
                                        r"Hugging Face cache while offline .*hf download acme/other"):
        from_pretrained("acme/other")
    with pytest.raises(LoadError, match=r"'acme/tiny-llama@v9'.*not in the Hugging Face cache"):
        load_tokenizer("acme/tiny-llama@v9")


def test_a_tokenizer_without_a_pad_token_pads_with_eos(hub_cache, tmp_path):
    _, source = hub_cache
    folder = tmp_path / "nopad"
    shutil.copytree(source, folder)
    tok = byte_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(folder)
    loaded = load_tokenizer(str(folder))
    assert loaded.pad_token == loaded.eos_token and loaded.pad_token_id == loaded.eos_token_id is not None


def test_peft_records_hub_bases_with_their_revision_and_local_bases_absolute(hub_cache, tmp_path, monkeypatch):
    import json

    from comoe_jax.interop import base_model_fields, recorded_base

    _, source = hub_cache
    assert base_model_fields(f"acme/tiny-llama@{COMMIT}") == {"base_model_name_or_path": "acme/tiny-llama",
                                                              "revision": COMMIT}
    monkeypatch.chdir(source.parent)
    assert base_model_fields("source") == {"base_model_name_or_path": str(source.resolve()), "revision": None}
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", **base_model_fields(f"acme/tiny-llama@{COMMIT}")}))
    assert recorded_base(folder) == f"acme/tiny-llama@{COMMIT}"
    # a GGUF alias: peft is told the hub model it was quantised from; comoe-jax reads back the alias
    assert base_model_fields("smollm2-135m") == {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                 "revision": None}
    (folder / "comoe_base_model.json").write_text(json.dumps({"base_model": "smollm2-135m"}))
    assert recorded_base(folder) == "smollm2-135m"


def test_train_command_on_a_hub_id(hub_cache, tmp_path):
    import train

    out = tmp_path / "run"
    argv = ["--config", "tiny", "model.path=acme/tiny-llama", "adapter.target_modules=q_proj", "train.steps=2",
            "train.batch_size=2", "data.train=builtin:add", "eval.before_training=false", "eval.after_training=false",
            "mesh.num_devices=1", f"train.output_dir={out}"]
    assert train.main(argv) == 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
