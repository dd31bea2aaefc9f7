"""Config loading, overrides and every refusal's message."""

import json
from pathlib import Path

import pytest

from comoe_jax.config import (
    Config,
    ConfigError,
    apply_overrides,
    describe,
    load_config_file,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides):
    cfg = Config()
    cfg.model.path = "random"
    return apply_overrides(cfg, list(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["adapter.top_k=1"], r"adapter\.top_k=1 is not allowed: .*needs k >= 2"),
    (["adapter.top_k=4"], r"adapter\.top_k=4 is not allowed: .*needs k < n \(4\)"),
    (["adapter.top_k=5"], r"adapter\.top_k=5 is not allowed: 1 <= top_k <= num_experts \(4\)"),
    (["adapter.num_experts=2"], r"adapter\.num_experts=2 is not allowed: .*needs n >= 3"),
    (["adapter.target_modules=q_proj,qkv"], r"adapter\.target_modules='qkv' is not allowed: one of q_proj k_proj"),
    (["adapter.layers=bottom"], r"adapter\.layers='bottom' is not allowed: use one of all, low, middle, high"),
    (["adapter.rank=0"], r"adapter\.rank=0 is not allowed: a positive integer"),
    (["adapter.rank=-3"], r"adapter\.rank=-3 is not allowed"),
    (["loss.temperature=0"], r"loss\.temperature=0\.0 is not allowed: tau > 0"),
    (["loss.temperature=-0.5"], r"loss\.temperature=-0\.5 is not allowed: tau > 0"),
    (["loss.anchor=first"], r"loss\.anchor='first' is not allowed: one of random, all"),
    (["loss.num_negatives=3"], r"loss\.num_negatives=3 is not allowed: 0 \(all inactive experts\) to n - k = 2"),
    (["loss.form=fast"], r"loss\.form='fast' is not allowed: one of gram, reference"),
    (["model.path=/no/such/model"], r"model\.path='/no/such/model' is not allowed: no such file or folder"),
    (["model.path="], r"model\.path='' is not allowed"),
    (["model.dtype=float16"], r"model\.dtype='float16' is not allowed: one of float32, bfloat16"),
    (["data.train=builtin:add", "data.template=html"], r"data\.template='html' is not allowed: one of alpaca"),
    (["data.train=csv:x.csv"], r"data\.train='csv:x.csv' is not allowed: mix, builtin\[:task\+task\] or <format>"),
    (["eval.sources=jsonl:/no/file.jsonl"], r"eval\.sources='jsonl:/no/file.jsonl' is not allowed: /no/file\.jsonl"),
    (["eval.mode=vote"], r"eval\.mode='vote' is not allowed: one of label, loglik, generate"),
    (["eval.split=dev"], r"eval\.split='dev' is not allowed: one of train, validation, test"),
    (["eval.mode=generate", "eval.max_len=16", "eval.max_new_tokens=16"],
     r"eval\.max_len=16 is not allowed: 0 .* or more than 16 tokens \(eval\.max_new_tokens=16 with "
     r"eval\.mode=generate"),
    (["eval.mode=label", "eval.max_len=1"], r"eval\.max_len=1 is not allowed: 0 .* or more than 1 tokens$"),
    (["mesh.tensor=0"], r"mesh\.tensor=0 is not allowed"),
    (["optim.grad_accum_steps=0"], r"optim\.grad_accum_steps=0 is not allowed: >= 1"),
    (["adapter.method=adalora"], r"adapter\.method='adalora' is not allowed: one of comoe-lora, comoe-dora, lora"),
    (["adapter.method=lora", "adapter.num_experts=4"], r"adapter\.num_experts=4 is not allowed: 1 for adapter"),
    (["adapter.method=mixlora", "adapter.num_experts=1", "adapter.top_k=1"],
     r"adapter\.num_experts=1 is not allowed: >= 2 for the routed method adapter\.method=mixlora"),
    (["adapter.method=dora", "loss.contrastive_weight=0.01"], r"adapter\.num_experts=1 is not allowed: .*n >= 3"),
])
def test_refusals_name_key_and_allowed_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(_cfg(*overrides))


def test_plain_lora_and_lambda_zero_are_valid():
    validate(_cfg("adapter.method=lora"))
    validate(_cfg("eval.mode=label", "eval.max_len=16", "eval.max_new_tokens=32"))  # generation's budget unused
    validate(_cfg("adapter.top_k=4", "loss.contrastive_weight=0"))  # soft routing over all experts


def test_method_switch_sets_the_methods_defaults_and_later_overrides_win():
    cfg = _cfg("loss.load_balance_weight=0.05", "adapter.method=mixlora")  # method applied first
    assert (cfg.adapter.num_experts, cfg.loss.contrastive_weight, cfg.loss.load_balance_weight) == (4, 0.0, 0.05)
    cfg = _cfg("adapter.method=dora")
    assert (cfg.adapter.num_experts, cfg.adapter.top_k, cfg.loss.contrastive_weight) == (1, 1, 0.0)
    validate(cfg)
    cfg = _cfg("adapter.method=lora", "adapter.method=comoe-dora")  # back to the paper's 4 experts, top-2
    assert (cfg.adapter.num_experts, cfg.adapter.top_k, cfg.loss.contrastive_weight) == (4, 2, 0.01)
    validate(_cfg("adapter.method=omoe", "loss.contrastive_weight=0.01"))  # auxiliary terms compose


def test_layer_range_out_of_bounds_is_refused_with_the_model_depth():
    from comoe_jax.config import parse_layer_range

    with pytest.raises(ConfigError, match=r"adapter\.layers='3:40' is out of bounds: the model has 30 layers"):
        parse_layer_range("3:40", 30)
    cfg = _cfg("adapter.layers=1:9")  # the random model has 2 layers: refused when the model is built
    from comoe_jax.loading import build_model

    with pytest.raises(ConfigError, match="the model has 2 layers"):
        build_model(validate(cfg))


def test_overrides_parse_types():
    cfg = _cfg("adapter.rank=8", "loss.temperature=0.2", "train.resume=false", "adapter.target_modules=q_proj v_proj",
               "--optim.learning_rate=1e-3", 'mesh.rules=[["batch", ["data"]]]')
    assert cfg.adapter.rank == 8 and cfg.loss.temperature == 0.2 and cfg.train.resume is False
    assert cfg.adapter.target_modules == ("q_proj", "v_proj")
    assert cfg.optim.learning_rate == 1e-3
    assert cfg.mesh.rules == (("batch", ("data",)),)


def test_list_and_dict_overrides_in_the_forms_users_type(tmp_path):
    """JSON, Python literals, bare bracketed lists, commas or spaces; a path with spaces and parentheses stays
    whole (JSON strings are no longer rewritten: '(' inside a path used to become '[')."""
    data = tmp_path / "my data (1).jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    for text in ("[q_proj,v_proj]", "q_proj,v_proj", "q_proj, v_proj", "q_proj v_proj", '["q_proj", "v_proj"]',
                 "('q_proj', 'v_proj')", "(q_proj, v_proj)"):
        assert _cfg(f"adapter.target_modules={text}").adapter.target_modules == ("q_proj", "v_proj"), text
    for text in (f'["jsonl:{data}"]', f"jsonl:{data}"):
        assert _cfg(f"data.train={text}").data.train == (f"jsonl:{data}",), text
    assert _cfg('adapter.target_modules=("q_proj")').adapter.target_modules == ("q_proj",)
    for text in ('{"add": 2}', "{'add': 2}"):
        assert _cfg(f"data.mix_weights={text}").data.mix_weights == {"add": 2}, text
    with pytest.raises(ConfigError, match=r"data\.mix_weights='\{add:2\}' is not allowed: expected a dict, e\.g\. "
                                          r"\{\"add\": 2, \"sort\": 1\} \(JSON\)"):
        _cfg("data.mix_weights={add:2}")
    with pytest.raises(ConfigError, match=r"expected a dict"):
        _cfg('data.mix_weights={["a"]: 1}')  # literal_eval's TypeError (an unhashable key)
    with pytest.raises(ConfigError, match=r"expected a list, e\.g\. \[\"q_proj\", \"v_proj\"\] \(JSON\) or "
                                          r"q_proj,v_proj"):
        _cfg("adapter.target_modules=[q_proj,")


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'adapter.rnak'; did you mean adapter\.rank"):
        _cfg("adapter.rnak=4")
    with pytest.raises(ConfigError, match=r"adapter\.rank='four' is not allowed: expected an integer"):
        _cfg("adapter.rank=four")
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        _cfg("adapter.rank")


def test_config_files_load_and_validate():
    for path in sorted((ROOT / "configs").glob("*.py")):
        cfg = load_config_file(path)
        if cfg.model.path == "smollm2-135m":
            continue  # needs the wheel; the main-job test covers it
        validate(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(ROOT / "configs" / "nope.py")


def test_a_runs_config_json_is_a_config_file(tmp_path):
    import json

    cfg = _cfg("adapter.rank=5", "loss.contrastive_weight=0.1")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict(), default=list))
    again = load_config_file(tmp_path / "config.json")
    assert again.to_dict() == cfg.to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"adapter": {"rnak": 5}}))
    with pytest.raises(ConfigError, match=r"config\.json: unknown config key 'adapter\.rnak'"):
        load_config_file(tmp_path / "config.json")


def test_paths_under_home_and_hub_datasets_by_name_are_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text('{"instruction": "q", "answer": "a"}\n')
    cfg = validate(_cfg("model.path=~/model", "data.train=jsonl:~/d.jsonl,hf:acme/sft:chat"))
    assert cfg.data.train == ("jsonl:~/d.jsonl", "hf:acme/sft:chat")
    from comoe_jax.data import load_source
    from comoe_jax.loading import resolve_model_path

    assert resolve_model_path("~/model") == tmp_path / "model"
    assert load_source("jsonl:~/d.jsonl", "train")[0].answer == "a"


def test_every_key_is_documented():
    text = describe()
    for line in text.splitlines()[1::2]:
        assert len(line.strip()) > 10, line


def test_a_run_is_read_without_how_it_was_launched(tmp_path):
    """A pod run's folder read on one machine must not wait for the pod's other hosts."""
    from comoe_jax.config import load_run_config

    cfg = Config()
    cfg.mesh.coordinator_address, cfg.mesh.num_processes, cfg.mesh.process_id = "10.0.0.1:1234", 4, 2
    cfg.mesh.fsdp, cfg.train.steps = 4, 7
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    read = load_run_config(tmp_path)
    assert (read.mesh.coordinator_address, read.mesh.num_processes, read.mesh.process_id) == ("", 1, 0)
    assert (read.mesh.fsdp, read.train.steps) == (4, 7)  # the rest is the run's


def test_resuming_an_older_run_ignores_keys_added_since_and_relative_model_paths(tmp_path, monkeypatch):
    from comoe_jax.checkpoint import config_changes

    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = validate(_cfg("model.path=base"))
    assert cfg.model.path == str(tmp_path / "base")  # stored absolute: read from any folder later
    saved = json.loads(json.dumps(cfg.to_dict()))
    del saved["data"]["chat_replies"]  # a run started before the key existed
    saved["model"]["path"] = "base"  # ... and stored the path as typed
    assert config_changes(saved, cfg) == []
    saved["adapter"]["rank"] = 99
    assert config_changes(saved, cfg) == [f"adapter.rank: checkpoint 99, now {cfg.adapter.rank}"]
    saved["adapter"]["rank"], saved["data"]["template"], cfg.data.template = cfg.adapter.rank, "chat", "chat"
    # a chat run from before data.chat_replies trained on the last reply: resuming it with "all" is a change
    assert config_changes(saved, cfg) == ["data.chat_replies: checkpoint 'last', now 'all'"]
    cfg.data.chat_replies = "last"
    assert config_changes(saved, cfg) == []


def test_random_arch_takes_every_transformers_field_and_refuses_typos():
    from comoe_jax.config import ModelConfig
    from comoe_jax.loading import LoadError, hf_config

    fine = [dict(rope_theta=1e4), dict(torch_dtype="float32"),
            dict(model_type="qwen2", head_dim=16, use_sliding_window=True, max_window_layers=1,
                 rope_scaling={"rope_type": "linear", "factor": 2.0}),
            dict(model_type="gemma3_text", sliding_window_pattern=2, rope_local_base_freq=1e4)]
    for arch in fine:  # fields transformers folds into others (rope_parameters, layer_types) are still fields
        hf_config(ModelConfig(path="random", random_arch=arch))
    with pytest.raises(LoadError, match=r"unknown field 'hiden_size' for model_type 'llama'; did you mean 'hidden_"):
        hf_config(ModelConfig(path="random", random_arch={"hiden_size": 64}))


def test_an_adapter_is_compared_with_the_run_by_what_its_settings_do(tmp_path):
    from comoe_jax.checkpoint import check_adapter_settings
    from comoe_jax.errors import AdapterFormatError

    cfg = validate(_cfg("model.path=random", "adapter.target_modules=q_proj,v_proj", "adapter.layers=all"))
    layers = cfg.model.random_arch["num_hidden_layers"]
    saved = dict(cfg.to_dict()["adapter"], target_modules=["v_proj", "q_proj"], layers=f"0:{layers}")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"adapter": saved}))
    check_adapter_settings(tmp_path, cfg)  # the same modules in another order, "all" as its range
    (tmp_path / "adapter_config.json").write_text(json.dumps({"adapter": dict(saved, rank=saved["rank"] * 2)}))
    with pytest.raises(AdapterFormatError, match=r"rank=.*, but the run's config says adapter\.rank="):
        check_adapter_settings(tmp_path, cfg)
