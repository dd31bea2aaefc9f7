"""What a user can get wrong, end to end through the command-line scripts: every bad input gets a one-line
message naming the culprit and its exit code (2 bad input; see comoe_jax/cli.py), never a traceback, and
nothing already written in a run folder is lost or overwritten.

Each case builds its bad input under ``tmp_path`` (from shared fixtures: a tiny finished run, a tiny
Hugging Face model folder) and returns the script and its arguments.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import analyze
import compare
import evaluate
import sweep
import train
from comoe_jax.commands import export

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train": train, "evaluate": evaluate, "analyze": analyze, "export": export, "compare": compare,
           "sweep": sweep}
# The tiny random Llama, 2 steps, no evaluation: a bad input fails within a second or two.
FAST = ["mesh.num_devices=1", "train.steps=4", "train.save_every=2", "train.batch_size=4", "adapter.rank=4",
        "data.train=builtin:add", "eval.before_training=false", "eval.after_training=false",
        "eval.sources=builtin:add", "eval.max_per_task=2", "eval.max_new_tokens=2"]


def tiny(*extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "tiny.py"), *FAST, *extra]


def out(tmp: Path) -> str:
    return f"train.output_dir={tmp / 'new_run'}"


# --------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny run with checkpoints at steps 2 and 4, adapters, config.json, metrics.jsonl, eval_after."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(tiny(f"train.output_dir={run}", "eval.after_training=true")) == 0
    return run


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    """A tiny Llama saved by transformers (config.json, model.safetensors) with a byte-level tokenizer."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from comoe_jax.loading import byte_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=272, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / src.name
    shutil.copytree(src, dst)
    return dst


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _json(path: Path, data) -> Path:
    return _write(path, json.dumps(data))


def _config_file(tmp: Path, body: str) -> Path:
    return _write(tmp / "my_config.py", "from comoe_jax.config import Config\n\n\ndef get_config():\n"
                                        "    c = Config()\n    c.model.path = 'random'\n" + body)


def _hf_copy(ctx, tmp) -> Path:
    return _copy(ctx["hf_model"], tmp)


def _model_args(folder: Path, tmp: Path) -> list[str]:
    return tiny(f"model.path={folder}", "data.template=plain", out(tmp))


def _damage_state(run: Path, step: int) -> None:
    for f in (run / "checkpoints" / str(step) / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage" * 8)


# --------------------------------------------------------------------------- the corpus
# (id, setup(ctx, tmp) -> (script, argv), exit code, regex the message must match, folder that must be kept)


def _jsonl(name, text, *extra):
    def setup(ctx, tmp):
        return "train", tiny(f"data.train=jsonl:{_write(tmp / name, text)}", out(tmp), *extra)
    return setup


def _source(fmt, name, content, *extra):
    def setup(ctx, tmp):
        path = _json(tmp / name, content) if not isinstance(content, (str, bytes)) else _write(tmp / name, content)
        return "train", tiny(f"data.train={fmt}:{path}", out(tmp), *extra)
    return setup


def _bare_path(name, content=None):
    """A data file (or, with ``content=None``, a folder) given without its ``<format>:`` prefix."""
    def setup(ctx, tmp):
        path = _write(tmp / name, content) if content is not None else tmp / name
        path.mkdir(exist_ok=True) if content is None else None
        return "train", tiny(f"data.train={path}", out(tmp))
    return setup


def _override(*items):
    return lambda ctx, tmp: ("train", tiny(*items, out(tmp)))


def _config(body):
    return lambda ctx, tmp: ("train", ["--config", str(_config_file(tmp, body))])


def _hf(damage):
    def setup(ctx, tmp):
        folder = _hf_copy(ctx, tmp)
        damage(folder)
        return "train", _model_args(folder, tmp)
    return setup


def _run(change, script="train", *extra):
    """A copy of the finished run, changed by ``change(run)``, then trained again (or evaluated...);
    ``{run}`` / ``{tmp}`` in ``extra`` are filled in."""
    def setup(ctx, tmp):
        run = _copy(ctx["finished_run"], tmp)
        change(run)
        extra_args = [a.format(run=run, tmp=tmp) for a in extra]
        if script == "train":
            return "train", tiny(f"train.output_dir={run}", *extra_args)
        if script == "evaluate":
            return "evaluate", ["--run", str(run), *extra_args]
        return "analyze", [str(run), "--out", str(tmp / "cmp"), *extra_args]
    return setup


def _export(change, *argv):
    """``comoe-export --run <copy of the finished run> ARGV`` (``{run}`` / ``{tmp}`` in ARGV filled in)."""
    def setup(ctx, tmp):
        run = _copy(ctx["finished_run"], tmp)
        change(run)
        return "export", ["--run", str(run), *(a.format(run=run, tmp=tmp) for a in argv)]
    return setup


def _no_adapter(run: Path) -> Path:
    shutil.rmtree(run / "adapter")
    return run


def _no_checkpoints(run: Path, *others: str) -> None:
    for name in ("checkpoints", *others):
        shutil.rmtree(run / name)


def _hf_rows(name: str, rows: dict):
    def setup(ctx, tmp):
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_dict(rows).save_to_disk(tmp / name)
        return "train", tiny(f"data.train=hf:{tmp / name}", out(tmp))
    return setup


def _set_config(run: Path, **changes):
    cfg = json.loads((run / "config.json").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    _json(run / "config.json", cfg)


def _set_adapter_config(run: Path, **changes):
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())
    meta["adapter"].update(changes)
    _json(run / "adapter" / "adapter_config.json", meta)


def _hf_run(ctx, tmp) -> Path:
    """A copy of the finished run whose config names a copy of the tiny transformers model as model.path."""
    run = _copy(ctx["finished_run"], tmp)
    _set_config(run, model__path=str(_hf_copy(ctx, tmp)))
    return run


def _link(target: Path, link: Path) -> Path:
    link.symlink_to(target, target_is_directory=True)
    return link


def _safetensors(path: Path, tensors: dict):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


def _edit_adapter(run: Path, edit):
    from safetensors.numpy import load_file

    path = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    _safetensors(path, tensors)


def _edit_weights(folder: Path, edit):
    from safetensors.numpy import load_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    _safetensors(path, tensors)


NOT_A_LIST = r"is not allowed: expected a list"
CASES = [
    # ---- command-line overrides
    ("override-typo", _override("train.stpes=3"), 2, r"unknown config key 'train\.stpes'; did you mean train\.steps"),
    ("override-section-typo", _override("trian.steps=3"), 2, r"unknown config key 'trian\.steps'; did you mean"),
    ("override-no-equals", _override("train.steps"), 2, r"override 'train\.steps' is not of the form section\.key="),
    ("override-int", _override("train.steps=ten"), 2, r"train\.steps='ten' is not allowed: expected an integer"),
    ("override-float-int", _override("train.steps=1.5"), 2, r"train\.steps='1\.5' is not allowed: expected an int"),
    ("temperature-inf", _override("loss.temperature=inf"), 2, r"loss\.temperature=inf is not allowed: a finite"),
    ("lr-inf", _override("optim.learning_rate=inf"), 2, r"optim\.learning_rate=inf is not allowed: a finite number"),
    ("lr-nan", _override("optim.learning_rate=nan"), 2, r"optim\.learning_rate=nan is not allowed: a finite number"),
    ("lr-negative", _override("optim.learning_rate=-1"), 2, r"optim\.learning_rate=-1\.0 is not allowed: a positive"),
    ("bool", _override("train.resume=maybe"), 2, r"train\.resume='maybe' is not allowed: expected true or false"),
    ("module-numbers", _override("adapter.target_modules=[1,2]"), 2,
     r"adapter\.target_modules=\(1, 2\) is not allowed: a list of text entries"),
    ("module-unknown", _override("adapter.target_modules=q_proj,qkv"), 2,
     r"adapter\.target_modules='qkv' is not allowed: one of q_proj"),
    ("method-unknown", _override("adapter.method=adalora"), 2, r"adapter\.method='adalora' is not allowed: one of"),
    ("top-k-one", _override("adapter.top_k=1"), 2, r"adapter\.top_k=1 is not allowed: .*needs k >= 2"),
    ("top-k-over-n", _override("adapter.top_k=9"), 2, r"adapter\.top_k=9 is not allowed: 1 <= top_k <= num_experts"),
    ("two-experts", _override("adapter.num_experts=2"), 2, r"adapter\.num_experts=2 is not allowed: .*n >= 3"),
    ("layers-name", _override("adapter.layers=bottom"), 2, r"adapter\.layers='bottom' is not allowed: use one of all"),
    ("layers-out-of-model", _override("adapter.layers=1:9"), 2,
     r"adapter\.layers='1:9' is out of bounds: the model has 2 layers"),
    ("rank-zero", _override("adapter.rank=0"), 2, r"adapter\.rank=0 is not allowed: a positive integer"),
    ("dropout-one", _override("adapter.dropout=1"), 2, r"adapter\.dropout=1\.0 is not allowed: 0 <= dropout < 1"),
    ("negatives", _override("loss.num_negatives=9"), 2, r"loss\.num_negatives=9 is not allowed: 0 \(all inactive"),
    ("anchor", _override("loss.anchor=first"), 2, r"loss\.anchor='first' is not allowed: one of random, all"),
    ("form", _override("loss.form=fast"), 2, r"loss\.form='fast' is not allowed: one of gram, reference"),
    ("dtype", _override("model.dtype=float16"), 2, r"model\.dtype='float16' is not allowed: one of float32, bfloat16"),
    ("model-missing", _override("model.path=/no/such/model"), 2, r"model\.path='/no/such/model' is not allowed: no "),
    ("random-arch", _override('model.random_arch={"hidden_size": "big"}'), 2, r"model\.random_arch=.* not a transf"),
    ("random-arch-typo", _override('model.random_arch={"hiden_size": 64, "num_hidden_layers": 1}'), 2,
     r"model\.random_arch: unknown field 'hiden_size' for model_type 'llama'; did you mean 'hidden_size'\?"),
    ("template", _override("data.template=chatml"), 2, r"data\.template='chatml' is not allowed: one of alpaca"),
    ("chat-replies", _override("data.chat_replies=first"), 2, r"data\.chat_replies='first' is not allowed: one of all, "
     r"last"),
    ("template-chat-without-one", _override("data.template=chat"), 2,
     r"data\.template=chat needs a tokenizer with a chat template"),
    ("eval-every", _override("eval.every=-2"), 2, r"eval\.every=-2 is not allowed: >= 0"),
    ("eval-every-free-form", _override("eval.every=2", "eval.mode=label", "eval.sources=builtin:add"), 2,
     r"eval\.mode=label needs multiple-choice items, but task 'add' has free-form answers"),
    ("keep-best-alone", _override("eval.keep_best=true"), 2,
     r"eval\.keep_best=True is not allowed: only with eval\.every > 0"),
    ("keep-best-on-the-test-items", lambda ctx, tmp: ("train", tiny(
        f"eval.sources=jsonl:{_write(tmp / 'qa.jsonl', json.dumps({'question': 'q', 'answer': 'a'}))}",
        "eval.every=2", "eval.keep_best=true", out(tmp))), 2,
     r"eval\.keep_best=True is not allowed: only with validation items apart from the test items: jsonl:.*qa\.jsonl "
     r"has no splits"),
    ("keep-best-on-a-pinned-hub-split", _override("eval.sources=hf:acme/qa@test", "eval.every=2",
                                                  "eval.keep_best=true"), 2,
     r"eval\.keep_best=True is not allowed: only with validation items apart from the test items: hf:acme/qa@test "
     r"has no splits \(or is pinned to one\)"),
    ("process-id", _override("mesh.coordinator_address=127.0.0.1:1234", "mesh.num_processes=2",
                             "mesh.process_id=2"), 2,
     r"mesh\.process_id=2 is not allowed: 0 <= process_id < mesh\.num_processes \(2\)"),
    ("coordinator-address", _override("mesh.coordinator_address=host0", "mesh.num_processes=2"), 2,
     r"mesh\.coordinator_address='host0' is not allowed: host:port of process 0, 'auto'"),
    ("processes-without-coordinator", _override("mesh.num_processes=4"), 2,
     r"mesh\.num_processes=4 is not allowed: 1, or more with mesh\.coordinator_address"),
    ("seq-len", _override("data.seq_len=4"), 2, r"data\.seq_len=4 is not allowed: >= 8 tokens"),
    ("seq-len-over-context", _override("data.seq_len=4096"), 2,
     r"data\.seq_len=4096 is longer than the model's context \(max_position_embeddings=2048 in random's config\)"),
    ("source-format", _override("data.train=csv:/x.csv"), 2, r"data\.train='csv:/x\.csv' is not allowed: mix, "),
    ("source-missing", _override("data.train=jsonl:/no/such.jsonl"), 2, r"/no/such\.jsonl does not exist"),
    ("source-bare-jsonl", _bare_path("sft.jsonl", '{"instruction": "a", "output": "b"}\n'), 2,
     r"data\.train='.*/sft\.jsonl' is not allowed: .*; for this path: data\.train=jsonl:/.*/sft\.jsonl$"),
    ("source-bare-json", _bare_path("train.json", "[]"), 2,
     r"for this path: data\.train=jsonl:/.*/train\.json or data\.train=llm_adapters:/.*/train\.json or "
     r"data\.train=bigbench:/.*/train\.json$"),
    ("source-damaged-parquet", _source("hf", "d.parquet", "PAR1 but not really"), 2,
     r"d\.parquet: not a readable parquet file"),
    ("source-bare-parquet", _bare_path("train.parquet", "x"), 2, r"for this path: data\.train=hf:/.*/train\.parquet$"),
    ("source-bare-folder", _bare_path("saved"), 2, r"for this path: data\.train=hf:/.*/saved$"),
    ("builtin-task", _override("data.train=builtin:nosuch"), 2, r"unknown built-in task\(s\) nosuch"),
    ("mix-weight-negative", _override('data.mix_weights={"add": -1}'), 2,
     r"data\.mix_weights=.* positive finite numbers"),
    ("mix-weight-task", _override('data.mix_weights={"nosuch": 1}'), 2, r"data\.mix_weights names task\(s\) nosuch"),
    ("tasks", _override("data.tasks=nosuch"), 2, r"data\.tasks names nosuch, not found in builtin:add"),
    ("eval-mode", _override("eval.mode=exact"), 2, r"eval\.mode='exact' is not allowed: one of label, loglik"),
    ("eval-split", _override("eval.split=dev"), 2, r"eval\.split='dev' is not allowed: one of train, validation"),
    ("mesh-size", _override("mesh.num_devices=-1", "mesh.data=3"), 2, r"mesh: data x fsdp x tensor = 3 x 1 x 1 = 3"),
    ("mesh-devices", _override("mesh.num_devices=99"), 2, r"mesh\.num_devices=99 but only \d+ devices are visible"),
    ("mesh-batch", _override("mesh.num_devices=8", "train.batch_size=4"), 2,
     r"train\.batch_size=4 must be a multiple of the dcn x data x fsdp mesh size \(1 x 8 x 1 = 8\)"),
    ("mesh-rules", _override('mesh.rules=[["embed", "model"]]'), 2, r"mesh\.rules: 'embed' -> 'model': mesh axes are"),
    ("mesh-reduction", _override("mesh.reduction=ordered"), 2,
     r"mesh\.reduction='ordered' is not allowed: one of auto, exact, xla"),
    ("mesh-reduction-fsdp", _override("mesh.num_devices=4", "mesh.fsdp=2", "mesh.reduction=exact"), 2,
     r"mesh\.reduction='exact' is not allowed: 'auto' or 'xla' with mesh\.fsdp=2"),
    ("mesh-reduction-resolved", _override("mesh.num_devices=4", "mesh.data=1", "mesh.fsdp=-1", "mesh.reduction=exact"),
     2, r"mesh\.reduction='exact' needs every device to hold whole weights .*fsdp=4, tensor=1"),
    ("max-skipped", _override("train.max_skipped_steps=0"), 2, r"train\.max_skipped_steps=0 is not allowed: >= 1"),
    ("beta2", _override("optim.b2=1"), 2, r"optim\.b2=1\.0 is not allowed: 0 <= beta < 1"),
    ("accumulation", _override("optim.grad_accum_steps=0"), 2, r"optim\.grad_accum_steps=0 is not allowed: >= 1"),
    ("save-every", _override("train.save_every=0"), 2, r"train\.save_every=0 is not allowed: >= 1"),
    # ---- config files (executed Python)
    ("config-missing", lambda ctx, tmp: ("train", ["--config", str(tmp / "nope.py")]), 2,
     r"config file .*nope\.py does not exist"),
    ("config-folder", lambda ctx, tmp: ("train", ["--config", str(tmp)]), 2, r"does not exist \(it is a folder\)"),
    ("config-syntax", _config("    c.train.steps = (3\n    return c\n"), 2, r"my_config\.py:\d+: syntax error"),
    ("config-typo", _config("    c.train.stpes = 3\n    return c\n"), 2,
     r"my_config\.py:7: unknown config key 'train\.stpes'; did you mean train\.steps"),
    ("config-section-typo", _config("    c.trian.steps = 3\n    return c\n"), 2,
     r"my_config\.py:7: unknown config key 'trian'; did you mean train\?"),
    ("config-type", _config("    c.train.steps = '10'\n    return c\n"), 2,
     r"my_config\.py:7: train\.steps='10' is not allowed: expected an integer, got str"),
    ("config-inf", _config("    c.loss.temperature = float('inf')\n    return c\n"), 2,
     r"my_config\.py:7: loss\.temperature=inf is not allowed: a finite number"),
    ("config-section-replaced", _config("    c.train = 5\n    return c\n"), 2,
     r"my_config\.py:7: config section 'train' was replaced by int"),
    ("config-name-error", _config("    c.train.steps = STEPS\n    return c\n"), 2,
     r"my_config\.py:7: NameError: name 'STEPS' is not defined"),
    ("config-no-get-config", lambda ctx, tmp: ("train", ["--config", str(_write(tmp / "c.py", "X = 1\n"))]), 2,
     r"c\.py: defines no get_config\(\) function"),
    ("config-returns-dict", lambda ctx, tmp: ("train", ["--config", str(_write(
        tmp / "c.py", "def get_config():\n    return {}\n"))]), 2, r"c\.py: get_config\(\) returned dict, expected"),
    ("config-list-of-numbers", _config("    c.data.train = (1, 2)\n    return c\n"), 2,
     r"my_config\.py:7: data\.train=\(1, 2\) is not allowed: a list of text entries"),
    # ---- data files
    ("jsonl-malformed", _jsonl("d.jsonl", '{"instruction": "a", "answer": "b"}\n{"instruction": \n'), 2,
     r"d\.jsonl:2: malformed JSON"),
    ("jsonl-missing-answer", _jsonl("d.jsonl", '{"instruction": "a"}\n'), 2, r"d\.jsonl:1: missing field 'answer'"),
    ("jsonl-chat-ends-with-user", _jsonl("d.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n'), 2,
     r"d\.jsonl:1: the last message is from 'user'; a conversation must end with the assistant's reply"),
    ("jsonl-chat-role", _jsonl("d.jsonl", '{"messages": [{"role": "human", "content": "a"}, '
                                          '{"role": "assistant", "content": "b"}]}\n'), 2,
     r"d\.jsonl:1: messages\[0\] should be an object with 'role' \(system, user, assistant\)"),
    ("jsonl-missing-instruction", _jsonl("d.jsonl", '{"answer": "a"}\n'), 2,
     r"d\.jsonl:1: missing field 'instruction' \(or 'question'; or a 'prompt'"),
    ("jsonl-not-utf8", _jsonl("d.jsonl", b'{"instruction": "a", "answer": "b"}\n'
                                         b'{"instruction": "\xff", "answer": "c"}\n'), 2, r"d\.jsonl:2: not UTF-8"),
    ("jsonl-folder", lambda ctx, tmp: ("train", tiny(f"data.train=jsonl:{tmp}", out(tmp))), 2,
     r": is a folder; give the data file itself"),
    ("jsonl-empty", _jsonl("d.jsonl", "\n\n"), 2, r"d\.jsonl: no examples"),
    ("jsonl-answer-not-option", _jsonl("d.jsonl", '{"question": "q", "options": ["a", "b"], "answer": "c"}\n'), 2,
     r"d\.jsonl:1: field 'answer' 'c' is not among the options"),
    ("jsonl-options-not-list", _jsonl("d.jsonl", '{"question": "q", "options": "ab", "answer": "a"}\n'), 2,
     r"d\.jsonl:1: field 'options' should be a list of option texts, got str"),
    ("jsonl-record-list", _jsonl("d.jsonl", '["a", "b"]\n'), 2, r"d\.jsonl record 0: expected a JSON object, got str"),
    ("jsonl-instruction-object", _jsonl("d.jsonl", '{"instruction": {"a": 1}, "answer": "b"}\n'), 2,
     r"d\.jsonl:1: field 'instruction' should be text, got dict"),
    ("jsonl-gzip-cut", _jsonl("d.jsonl.gz", gzip.compress(b'{"instruction": "a", "answer": "b"}\n')[:-6]), 2,
     r"d\.jsonl\.gz: a damaged gzip file"),
    ("jsonl-wrapper-object", _jsonl("d.json", '{"data": [\n {"instruction": "a", "output": "b"}\n]}\n'), 2,
     r"d\.json:1: missing field 'instruction' .* its field 'data' holds a list of 1 objects"),
    ("jsonl-pretty-malformed", _jsonl("d.jsonl", '{\n "instruction": "a"\n "output": "b"\n}\n'), 2,
     r"d\.jsonl:3: malformed JSON \(Expecting ',' delimiter at column 2\), in the record that starts on line 1"),
    ("jsonl-chat-last-weight-0", _jsonl("d.jsonl", json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]})), 2,
     r"d\.jsonl:1: the last assistant reply in field 'messages' has weight 0"),
    ("llm-adapters-not-list", _source("llm_adapters", "t.json", {"a": 1}), 2, r"t\.json: expected a JSON list"),
    ("llm-adapters-label", _source("llm_adapters", "t.json", [
        {"instruction": "Q?\nAnswer format: true/false", "answer": "maybe", "output": "x"}]), 2,
     r"t\.json record 0: field 'answer' 'maybe' is not among the labels true/false"),
    ("llm-adapters-malformed", _source("llm_adapters", "t.json", '[{"instruction": "a",'), 2,
     r"t\.json:1: malformed JSON"),
    ("bigbench-no-examples", _source("bigbench", "task.json", {"name": "x"}), 2,
     r"task\.json: field 'examples' is missing or empty"),
    ("bigbench-example-not-object", _source("bigbench", "task.json", {"examples": ["q"]}), 2,
     r"task\.json example 0: expected a JSON object, got str"),
    ("bigbench-two-correct", _source("bigbench", "task.json", {"examples": [
        {"input": "q", "target_scores": {"a": 1, "b": 1}}]}), 2,
     r"task\.json example 0: field 'target_scores' marks 2 options correct"),
    ("bigbench-scores-list", _source("bigbench", "task.json", {"examples": [
        {"input": "q", "target_scores": ["a"]}]}), 2, r"task\.json example 0: field 'target_scores' should map"),
    ("bigbench-examples-not-list", _source("bigbench", "task.json", {"examples": {"a": 1}}), 2,
     r"task\.json: field 'examples' should be a list, got dict"),
    ("hf-not-a-dataset", lambda ctx, tmp: ("train", tiny(f"data.train=hf:{_write(tmp / 'ds' / 'x.txt', 'x').parent}",
                                                           out(tmp))), 2, r"ds: not a dataset saved with save_to_disk"),
    ("responses-cut", _jsonl("d.jsonl", '{"instruction": "' + "long " * 40 + '", "answer": "b"}\n', "data.seq_len=8"),
     2, r"no usable training examples for task\(s\) d: every response was cut off by data\.seq_len=8"),
    # ---- model folders
    ("model-no-config", _hf(lambda f: (f / "config.json").unlink()), 2,
     r"llama has no config\.json \(a Hugging Face model folder\) and 0 \.gguf files"),
    ("model-config-malformed", _hf(lambda f: _write(f / "config.json", '{"model_type": "llama",')), 2,
     r"config\.json: cannot be read as a transformers config"),
    ("model-unsupported", _hf(lambda f: _json(f / "config.json", json.loads((f / "config.json").read_text())
                                              | {"model_type": "gpt2"})), 2,
     r"config\.json: model_type 'gpt2' is not supported; comoe-jax implements llama"),
    ("model-rope", _hf(lambda f: _json(f / "config.json", json.loads((f / "config.json").read_text())
                                       | {"rope_parameters": {"rope_type": "ntk-magic", "rope_theta": 1e4}})), 2,
     r"config\.json: .*ntk-magic"),
    ("model-no-tokenizer", _hf(lambda f: [p.unlink() for p in f.glob("*token*")]), 2,
     r"llama: no tokenizer files \(tokenizer\.json"),
    ("model-generation-config-malformed", _hf(lambda f: _write(f / "generation_config.json", '{"eos_token_id": [')),
     2, r"generation_config\.json:1: not valid JSON"),
    ("model-generation-config-eos", _hf(lambda f: _json(f / "generation_config.json", {"eos_token_id": "</s>"})), 2,
     r"generation_config\.json: field 'eos_token_id' should be a token id or a list of token ids, got \"</s>\""),
    ("model-weights-garbage", _hf(lambda f: _write(f / "model.safetensors", b"garbage" * 50)), 2,
     r"model\.safetensors: not a readable safetensors file"),
    ("model-weights-truncated", _hf(lambda f: _write(f / "model.safetensors",
                                                     (f / "model.safetensors").read_bytes()[:-4000])), 2,
     r"model\.safetensors: (not a readable safetensors file|tensor .* cannot be read)"),
    ("model-weights-shape", _hf(lambda f: _edit_weights(f, lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.weight": np.zeros((32, 31), np.float32)}))), 2,
     r"tensor for layers\.0\.self_attn\.q_proj\.kernel has shape \(31, 32\), the config implies \(32, 32\)"),
    ("model-weights-missing", _hf(lambda f: _edit_weights(f, lambda t: t.pop("model.norm.weight"))), 2,
     r"tensors missing from the safetensors files: model\.norm\.weight"),
    ("model-index-shard-missing", _hf(lambda f: _json(f / "model.safetensors.index.json", {
        "weight_map": {"model.norm.weight": "model-00002.safetensors"}})), 2,
     r"model\.safetensors\.index\.json: names shard file\(s\) that are not in the folder: model-00002"),
    ("gguf-garbage", lambda ctx, tmp: ("train", _model_args(_write(tmp / "m.gguf", b"GGUF" + b"\x00" * 64), tmp)), 2,
     r"m\.gguf: not a readable GGUF file"),
    # ---- run folders and checkpoints
    ("output-is-a-file", lambda ctx, tmp: ("train", tiny(f"train.output_dir={_write(tmp / 'f', 'keep me')}")), 2,
     r"train\.output_dir=.*f is a file, not a folder"),
    ("output-not-writable", lambda ctx, tmp: ("train", tiny("train.output_dir=/sys/kernel/comoe_run")), 2,
     r"train\.output_dir=/sys/kernel/comoe_run cannot be written \(.*\); choose a writable folder"),
    ("output-inside-a-file", lambda ctx, tmp: ("train", tiny(f"train.output_dir={_write(tmp / 'f', 'x')}/run")), 2,
     r"train\.output_dir=.*f/run cannot be written"),
    ("resume-changed-config", _run(lambda run: None, "train", "adapter.rank=8"), 2,
     r"holds a run with a different config, so it cannot be resumed: adapter\.rank: checkpoint 4, now 8"),
    ("resume-refused", _run(lambda run: None, "train", "train.resume=false"), 2,
     r"already holds checkpoints up to step 4; pass train\.resume=true"),
    ("all-checkpoints-damaged", _run(lambda run: [_damage_state(run, s) for s in (2, 4)], "train", "train.steps=6"),
     2, r"no checkpoint can be read back \(the damaged ones were moved to .*damaged_checkpoints"),
    ("evaluate-config-damaged", _run(lambda run: _write(run / "config.json", '{"model": {'), "evaluate"), 2,
     r"config\.json:1: not valid JSON"),
    ("evaluate-config-unknown-key", _run(lambda run: _set_config(run, train__stpes=3), "evaluate"), 2,
     r"config\.json: unknown config key 'train\.stpes'; did you mean train\.steps"),
    ("evaluate-config-bad-type", _run(lambda run: _set_config(run, train__steps="4"), "evaluate"), 2,
     r"config\.json: train\.steps='4' is not allowed: expected an integer"),
    ("evaluate-no-adapter", _run(lambda run: shutil.rmtree(run / "adapter"), "evaluate"), 2,
     r"adapter_model\.safetensors does not exist \(expected an adapter folder"),
    ("evaluate-not-a-run", lambda ctx, tmp: ("evaluate", ["--run", str(tmp)]), 2,
     r"config\.json does not exist: .* is not a comoe-jax run folder"),
    ("analyze-eval-damaged", _run(lambda run: _write(run / "eval_after.json", "{"), "analyze"), 2,
     r"eval_after\.json:1: not valid JSON"),
    ("analyze-eval-foreign", _run(lambda run: _json(run / "eval_after.json", {"score": 1}), "analyze"), 2,
     r"eval_after\.json: not an evaluation result written by comoe-jax"),
    # ---- adapter folders
    ("adapter-config-malformed", _run(lambda run: _write(run / "adapter" / "adapter_config.json", "{"), "evaluate"), 2,
     r"adapter_config\.json:1: not valid JSON"),
    ("adapter-config-format", _run(lambda run: _json(run / "adapter" / "adapter_config.json", {"format": "x"}),
                                   "evaluate"), 2, r"adapter_config\.json: field 'format' is 'x', expected"),
    ("adapter-weights-garbage", _run(lambda run: _write(run / "adapter" / "adapter_model.safetensors", b"xx" * 40),
                                     "evaluate"), 2, r"adapter_model\.safetensors: not a readable safetensors file"),
    ("adapter-tensor-missing", _run(lambda run: _edit_adapter(run, lambda t: t.pop(
        "layers.1.self_attn.v_proj.router")), "evaluate"), 2,
     r"the adapter file lacks 1 tensors the model needs, e\.g\. layers\.1\.self_attn\.v_proj\.router"),
    ("adapter-tensor-shape", _run(lambda run: _edit_adapter(run, lambda t: t.update(
        {"layers.0.self_attn.q_proj.lora_a": np.zeros((4, 64, 3), np.float32)})), "evaluate"), 2,
     r"adapter tensor layers\.0\.self_attn\.q_proj\.lora_a: shape \(4, 64, 3\), the model expects \(4, 64, 4\)"),
    ("adapter-tensor-nan", _run(lambda run: _edit_adapter(run, lambda t: t.update(
        {"layers.0.self_attn.q_proj.lora_b": np.full((4, 4, 64), np.nan, np.float32)})), "evaluate"), 2,
     r"tensor layers\.0\.self_attn\.q_proj\.lora_b holds non-finite values"),
    # ---- found by trying what users get wrong (second round)
    ("layers-low-on-two-layers", _override("adapter.layers=low"), 2,
     r"adapter\.layers=low adapts no layer of a 2-layer model"),
    ("layers-empty-range", _override("adapter.layers=2:1"), 2,
     r"adapter\.layers='2:1' is not allowed: 'start:end' with 0 <= start < end$"),
    ("random-arch-no-layers", _override('model.random_arch={"num_hidden_layers": 0, "hidden_size": 32, '
                                        '"intermediate_size": 64, "num_attention_heads": 4, "vocab_size": 320}'), 2,
     r"model\.random_arch: num_hidden_layers=0; a decoder needs a positive integer"),
    ("mix-weight-bool", _override('data.mix_weights={"add": true}'), 2,
     r"data\.mix_weights=\{'add': True\} is not allowed: positive finite numbers"),
    ("mesh-rules-logical-typo", _override('mesh.rules=[["emb", "fsdp"]]'), 2,
     r"mesh\.rules: 'emb' is not a logical axis \(did you mean 'embed'\?\); logical axes are batch"),
    ("eval-after-free-form-label", _override("eval.mode=label", "eval.after_training=true"), 2,
     r"eval\.mode=label needs multiple-choice items, but task 'add' has free-form answers"),
    ("validation-source-format", _override("eval.every=2", "eval.validation_sources=csv:/x.csv"), 2,
     r"eval\.validation_sources='csv:/x\.csv' is not allowed: mix, builtin"),
    ("validation-source-missing", _override("eval.every=2", "eval.validation_sources=jsonl:/no/val.jsonl"), 2,
     r"eval\.validation_sources='jsonl:/no/val\.jsonl' is not allowed: /no/val\.jsonl does not exist"),
    ("validation-longer-than-seq-len", lambda ctx, tmp: ("train", tiny(
        "eval.every=2", "data.seq_len=64", "eval.validation_sources=jsonl:" + str(_write(
            tmp / "val.jsonl", json.dumps({"instruction": "word " * 40, "output": "yes"}))), out(tmp))), 2,
     r"no validation item of .*val\.jsonl keeps a response token within data\.seq_len=64"),
    ("source-empty-path", _override("data.train=jsonl:"), 2, r"data\.train='jsonl:' is not allowed: a path after"),
    ("config-not-python", lambda ctx, tmp: ("train", ["--config", str(_write(tmp / "my_config.txt", "x = 1\n"))]), 2,
     r"config file .*my_config\.txt: expected a Python config file \(\.py, defining get_config\(\)\) or a run's "),
    ("config-mix-weight-key", _config("    c.data.mix_weights = {1: 2.0}\n    return c\n"), 2,
     r"data\.mix_weights=\{1: 2\.0\} is not allowed: task names \(text\) as keys"),
    ("jsonl-labels-number", _jsonl("d.jsonl", '{"instruction": "q", "answer": "a", "labels": 5}\n'), 2,
     r"d\.jsonl:1: field 'labels' should be a list of label texts"),
    ("jsonl-labels-string", _jsonl("d.jsonl", '{"instruction": "q", "answer": "a", "labels": "abc"}\n'), 2,
     r"d\.jsonl:1: field 'labels' should be a list of label texts .*got \"abc\""),
    ("jsonl-answer-empty", _jsonl("d.jsonl", '{"instruction": "q", "answer": ""}\n'), 2,
     r"d\.jsonl:1: field 'answer' is empty"),
    ("jsonl-answer-index", _jsonl("d.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 2}\n'), 2,
     r"d\.jsonl:1: field 'answer' is index 2, but there are 2 options \(0 to 1\)"),
    ("hf-label-out-of-range", _hf_rows("piqa", {"goal": ["g"], "sol1": ["a"], "sol2": ["b"], "label": [5]}), 2,
     r"piqa row 0: field 'label' is 5; with 2 options it should be 0 to 1"),
    ("hf-a-file", _source("hf", "d.jsonl", '{"instruction": "q", "answer": "a"}\n'), 2,
     r"d\.jsonl: hf: reads a folder written by save_to_disk, a hub name .* or a data file ending in "
     r"\.parquet.* use jsonl:"),
    ("model-weights-file", lambda ctx, tmp: ("train", _model_args(_hf_copy(ctx, tmp) / "model.safetensors", tmp)), 2,
     r"model\.path=.*model\.safetensors' is not allowed: a \.safetensors file; give the folder that holds"),
    ("run-finished-without-checkpoints", _run(lambda run: _no_checkpoints(run), "train", "adapter.rank=8"), 2,
     r"holds a finished run's adapter/ but no checkpoint to resume from; training again would overwrite it"),
    ("run-earlier-session-other-config", _run(lambda run: _no_checkpoints(run, "adapter"), "train", "adapter.rank=8"),
     2, r"holds an earlier run \(config\.json, no checkpoint yet\) with a different config: adapter\.rank"),
    ("resume-fewer-steps", _run(lambda run: None, "train", "train.steps=2"), 2,
     r"train\.steps=2 is below the step the run in .* has reached \(4\); raise train\.steps"),
    ("analyze-single-expert-run", _run(lambda run: _set_config(run, adapter__method="lora", adapter__num_experts=1),
                                       "analyze"), 2,
     r"adapter\.method=lora has one expert and no router; analyze\.py compares routed runs"),
    ("analyze-second-run-unfinished", lambda ctx, tmp: ("analyze", [
        str(_copy(ctx["finished_run"], tmp)), str(_no_adapter(_copy(ctx["finished_run"], tmp / "b"))), "--out",
        str(tmp / "cmp")]), 2, r"b/run: no finished adapter \(.*adapter_config\.json\); a run writes it when training"),
    ("analyze-module-unknown", _run(lambda run: None, "analyze", "--module", "layers.0.mlp.nosuch"), 2,
     r"--module layers\.0\.mlp\.nosuch: not an adapted module of"),
    ("analyze-out-a-file", lambda ctx, tmp: ("analyze", [str(_copy(ctx["finished_run"], tmp)), "--out",
                                                         str(_write(tmp / "f", "x"))]), 2,
     r"--out=.*f is a file, not a folder"),
    ("evaluate-run-empty", lambda ctx, tmp: ("evaluate", ["--run", ""]), 2, r"--run '': empty; give a run folder"),
    ("evaluate-run-a-file", lambda ctx, tmp: ("evaluate", ["--run", str(_copy(ctx["finished_run"], tmp) /
                                                                    "config.json")]), 2,
     r"config\.json is a file, not a comoe-jax run folder; give its folder .*run$"),
    ("evaluate-run-its-adapter", lambda ctx, tmp: ("evaluate", ["--run", str(_copy(ctx["finished_run"], tmp) /
                                                                          "adapter")]), 2,
     r"adapter is a run's adapter folder; give the run folder .*run$"),
    ("evaluate-adapter-missing", _run(lambda run: None, "evaluate", "--adapter", "{run}/best_adapter"), 2,
     r"--adapter .*best_adapter: no adapter_config\.json there; give an adapter folder such as .*best_adapter"),
    ("evaluate-adapter-without-run", lambda ctx, tmp: ("evaluate", ["--adapter", str(tmp)]), 2,
     r"--adapter needs --run \(the run whose config the adapter was trained with\)"),
    ("evaluate-out-empty", _run(lambda run: None, "evaluate", "--out", ""), 2, r"--out '': empty; give an output"),
    ("evaluate-out-a-folder", _run(lambda run: None, "evaluate", "--out", "{tmp}"), 2,
     r"--out .* is a folder; give a path stem inside it such as .*eval"),
    ("evaluate-other-base-model", lambda ctx, tmp: ("evaluate", ["--run", str(_copy(ctx["finished_run"], tmp)),
                                                                 f"model.path={ctx['hf_model']}"]), 2,
     r"adapter: .*the adapter was trained on base model 'random' \(its adapter_config\.json\), not on .*llama"),
    ("model-path-a-run", lambda ctx, tmp: ("train", tiny(f"model.path={_copy(ctx['finished_run'], tmp)}",
                                                         out(tmp))), 2,
     r"run is a comoe-jax run folder, not a base model; give a run with --run"),
    ("evaluate-out-under-a-file", _run(lambda run: None, "evaluate", "--out", "{run}/config.json/stem"), 2,
     r"--out \(its folder\)=.*config\.json is a file, not a folder"),
    ("export-out-is-the-run", _export(lambda run: None, "--format", "comoe", "--out", "{run}", "--overwrite"), 2,
     r"--out .*: would replace the run .* or what the export reads from it"),
    ("export-out-is-its-adapter", _export(lambda run: None, "--format", "comoe", "--out", "{run}/adapter",
                                          "--overwrite"), 2, r"would replace the run .* or what the export reads"),
    ("export-mixture-as-merged", _export(lambda run: _write(run.parent / "mine" / "keep.txt", "keep"), "--format",
                                         "merged", "--out", "{tmp}/mine", "--overwrite"), 2,
     r"adapter\.method=comoe-lora cannot export as merged: only lora / dora runs"),
    ("export-damaged-adapter-keeps-out", _export(lambda run: (
        _set_config(run, adapter__method="lora", adapter__num_experts=1),
        _set_adapter_config(run, method="lora", num_experts=1),
        _write(run / "adapter" / "adapter_model.safetensors", b"xx" * 40),
        _write(run.parent / "mine" / "adapter_config.json", "{}")), "--format", "peft", "--out", "{tmp}/mine",
        "--overwrite"), 2, r"adapter_model\.safetensors: not a readable safetensors file"),
    ("export-out-empty", _export(lambda run: None, "--format", "comoe", "--out", ""), 2,
     r"--out '': empty; give an output folder"),
    ("export-adapter-of-another-run", _export(lambda run: _set_config(run, adapter__method="lora",
                                                                      adapter__num_experts=1), "--format", "merged"),
     2, r"adapter_config\.json: method='comoe-lora', num_experts=4, but the run's config says "
        r"adapter\.method='lora', adapter\.num_experts=1: the adapter was trained with other settings"),
    ("evaluate-adapter-overrides", _run(lambda run: None, "evaluate", "adapter.alpha=1000"), 2,
     r"adapter_config\.json: alpha=.*, but the run's config says adapter\.alpha=1000\.0: the adapter was trained "
     r"with other settings"),
    ("evaluate-fewer-targets", _run(lambda run: None, "evaluate", "adapter.target_modules=q_proj"), 2,
     r"adapter_config\.json: target_modules=\['q_proj', 'v_proj'\], but the run's config says "
     r"adapter\.target_modules=\['q_proj'\]"),
    ("export-out-a-link-to-the-run", lambda ctx, tmp: ("export", [
        "--run", str(_link(_copy(ctx["finished_run"], tmp), tmp / "link")), "--format", "comoe", "--out", str(tmp),
        "--overwrite"]), 2, r"--out .*: would replace the run .*link or what the export reads from it"),
    ("export-overwrite-another-run", lambda ctx, tmp: ("export", [
        "--run", str(_copy(ctx["finished_run"], tmp)), "--format", "comoe", "--out",
        str(_copy(ctx["finished_run"], tmp / "other")), "--overwrite"]), 2,
     r"--out .*other/run is a training run \(it holds checkpoints/ or metrics\.jsonl\); --overwrite replaces only"),
    ("export-out-the-base-model", lambda ctx, tmp: ("export", [
        "--run", str(_hf_run(ctx, tmp)), "--format", "comoe", "--out", str(tmp / "llama"), "--overwrite"]), 2,
     r"--out .*llama: would replace the base model .*llama \(model\.path\), which the export reads"),
    ("export-overwrite-other-files", _export(lambda run: _write(run.parent / "mine" / "notes.txt", "keep"),
                                             "--format", "comoe", "--out", "{tmp}/mine", "--overwrite"), 2,
     r"--out .*mine holds files but no earlier export \(notes\.txt; no adapter_config\.json or config\.json\); "
     r"--overwrite replaces only an earlier export"),
    ("export-unfinished-run", _export(lambda run: shutil.rmtree(run / "adapter"), "--format", "comoe"), 2,
     r"no finished adapter \(.*adapter_config\.json\); a run writes it when training ends"),
    ("export-format", _export(lambda run: None, "--format", "onnx"), 2, r"argument --format: invalid choice: 'onnx'"),
    ("compare-methods-empty", lambda ctx, tmp: ("compare", ["--config", "tiny", "--methods", ",", "--out",
                                                            str(tmp / "cmp")]), 2,
     r"--methods=',': give distinct methods"),
    ("compare-tasks-unknown", lambda ctx, tmp: ("compare", ["--config", "tiny", "--tasks", "nosuch", "--out",
                                                            str(tmp / "cmp"), "data.train=builtin:add"]), 2,
     r"--tasks: nosuch not among the training sources' tasks \(add\)"),
    ("hf-hub-empty-split", _override("data.train=hf:org/name@"), 2,
     r"data\.train='hf:org/name@' is not allowed: a hub dataset as hf:org/name\[:subset\]\[@split\], with a "
     r"non-empty subset"),
    ("sweep-grid-output-dir", lambda ctx, tmp: ("sweep", ["--config", "tiny", "--grid", "train.output_dir=a,b",
                                                          "--out", str(tmp / "sw")]), 2,
     r"--grid 'train\.output_dir=a,b': train\.output_dir cannot be swept; every cell runs in <out>/<cell name>"),
    ("sweep-grid-repeated", lambda ctx, tmp: ("sweep", ["--config", "tiny", "--grid", "train.seed=0,0", "--out",
                                                        str(tmp / "sw")]), 2,
     r"--grid 'train\.seed=0,0': a value is repeated"),
    # ---- found by trying what users get wrong (third round)
    ("seed-negative", _override("train.seed=-1"), 2, r"train\.seed=-1 is not allowed: 0 <= seed <= 4294967295"),
    ("seed-past-32-bits", _override("train.seed=4294967296"), 2, r"train\.seed=4294967296 is not allowed: 0 <= seed"),
    ("mix-weight-infinite", _override('data.mix_weights={"add": Infinity}'), 2,
     r"data\.mix_weights=\{'add': inf\} is not allowed: positive finite numbers"),
    ("source-twice", _override("data.train=builtin:add,builtin:add"), 2,
     r"data\.train=.* is not allowed: each source once \(to weigh a task more, set data\.mix_weights\)"),
    ("random-arch-past-host-memory", _override('model.random_arch={"vocab_size": 320, "hidden_size": 65536, '
                                               '"intermediate_size": 262144, "num_hidden_layers": 64, '
                                               '"num_attention_heads": 64}'), 2,
     r"model\.random_arch=.*: the weights \(\d+\.\d+ B parameters, model\.param_dtype=float32\) need .* GiB on this "
     r"host's 1 CPU device\(s\), more than its .* GiB of memory"),
    ("random-arch-unsupported-type", _override('model.random_arch={"model_type": "gpt2", "intermediate_size": 64}'), 2,
     r"model\.random_arch: model_type 'gpt2' is not supported; comoe-jax implements llama"),
    ("compilation-cache-a-file", lambda ctx, tmp: ("train", tiny(
        f"train.compilation_cache={_write(tmp / 'cache', 'x')}", out(tmp))), 2,
     r"train\.compilation_cache=.*cache is a file, not a folder"),
    ("config-exits", _config("    import sys\n    sys.exit('bad value')\n"), 2,
     r"my_config\.py:8: the config file exits \('bad value'\)"),
    ("config-empty-name", lambda ctx, tmp: ("train", ["--config", ""]), 2,
     r"--config '': empty; give a config file or a shipped config's name \(default, tiny\)"),
    ("jsonl-nan-field", _jsonl("d.jsonl", '{"instruction": NaN, "output": "b"}\n'), 2,
     r"d\.jsonl:1: missing field 'instruction' \(NaN, a missing value\)"),
    ("jsonl-a-row-of-long-examples", _jsonl("d.jsonl", "".join(json.dumps(
        {"instruction": "word " * (90 if i == 1 else 2), "output": "yes"}) + "\n" for i in range(4))), 2,
     r"batch row \d of train\.batch_size=4 has no training example: the 1 example\(s\) assigned to it "
     r"\(.*d\.jsonl:2\) keep no response token within data\.seq_len=64"),
    ("model-vocab-below-the-tokenizer", _hf(lambda f: (_edit_weights(f, lambda t: t.update(
        {k: t[k][:100] for k in ("model.embed_tokens.weight", "lm_head.weight")})), _json(
        f / "config.json", json.loads((f / "config.json").read_text()) | {"vocab_size": 100}))), 2,
     r"the tokenizer gives token id \d+ \(\d+ tokens\), but the model .* has vocab_size=100: the tokenizer does not "
     r"belong to this model"),
    ("model-weights-nan", _hf(lambda f: _edit_weights(f, lambda t: t["model.layers.1.mlp.down_proj.weight"].__setitem__(
        (0, 0), np.nan))), 2, r"tensor for layers\.1\.mlp\.down_proj\.kernel holds non-finite values"),
    ("model-weights-int8", _hf(lambda f: _edit_weights(f, lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.weight": np.ones((32, 32), np.int8)}))), 2,
     r"tensor for layers\.0\.self_attn\.q_proj\.kernel is int8, not floating point \(a quantised checkpoint\?\)"),
    ("model-weights-of-more-layers", _hf(lambda f: _edit_weights(f, lambda t: t.update(
        {"model.layers.7.mlp.down_proj.weight": t["model.layers.1.mlp.down_proj.weight"]}))), 2,
     r"the safetensors files hold layer 7's weights, but config\.json has num_hidden_layers=2"),
    ("model-tokenizer-without-vocabulary", _hf(lambda f: ([p.unlink() for p in f.glob("*token*")], _json(
        f / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer"}))), 2,
     r"the tokenizer \(.*\) turns text into no tokens: its vocabulary files .* are missing or broken"),
    ("output-a-model-folder", lambda ctx, tmp: ("train", tiny(f"train.output_dir={_hf_copy(ctx, tmp)}")), 2,
     r"train\.output_dir=.*llama holds a config\.json that is not a comoe-jax run's \(fields .*; a model folder\?\)"),
    ("output-the-base-model", lambda ctx, tmp: ("train", tiny(
        f"model.path={_hf_copy(ctx, tmp)}", "data.template=plain", f"train.output_dir={tmp / 'llama'}")), 2,
     r"train\.output_dir=.*llama is the base model's folder \(model\.path\)"),
    ("output-config-a-list", lambda ctx, tmp: ("train", tiny(
        f"train.output_dir={_write(tmp / 'run' / 'config.json', '[1, 2]').parent}")), 2,
     r"config\.json: holds a JSON list, not an object of named fields; the file is damaged"),
    ("evaluate-out-the-run-config", _run(lambda run: None, "evaluate", "--out", "{run}/config"), 2,
     r"--out .*/config: would overwrite .*config\.json, which is not an evaluation result written by evaluate\.py"),
    ("evaluate-out-the-adapter-config", _run(lambda run: None, "evaluate", "--out", "{run}/adapter/adapter_config"), 2,
     r"would overwrite .*adapter_config\.json, which is not an evaluation result"),
    ("evaluate-out-eval-after", _run(lambda run: None, "evaluate", "--out", "{run}/eval_after"), 2,
     r"--out .*eval_after: would overwrite the run's own evaluation at the end of training"),
    ("analyze-out-the-run", lambda ctx, tmp: ("analyze", [str(run := _copy(ctx["finished_run"], tmp)), "--out",
                                                          str(run)]), 2,
     r"--out=.*run is a training run, whose plots and tables the results would overwrite"),
    ("analyze-out-empty", lambda ctx, tmp: ("analyze", [str(_copy(ctx["finished_run"], tmp)), "--out", ""]), 2,
     r"--out '': empty; give a folder for the results"),
    ("hf-saved-empty", _hf_rows("empty", {"instruction": [], "answer": []}), 2,
     r"empty: no examples \(the saved dataset, or one of its splits, is empty\)"),
    ("hf-folder-unknown-split", lambda ctx, tmp: ("train", tiny(f"data.train=hf:{_saved(tmp / 'ds')}@dev", out(tmp))),
     2, r"ds: split 'dev' not found; the dataset has test"),
    ("jsonl-empty-option", _jsonl("d.jsonl", '{"question": "q", "options": ["", "b"], "answer": "b"}\n'), 2,
     r"d\.jsonl:1: field 'options' has an empty option \(option A\)"),
    ("jsonl-blank-label", _jsonl("d.jsonl", '{"instruction": "q", "answer": "a", "labels": ["a", "  "]}\n'), 2,
     r"d\.jsonl:1: field 'labels' \['a', '  '\] has an empty or a repeated label"),
    ("mesh-rules-axis-twice", _override('mesh.rules=[["embed", ["fsdp", "fsdp"]]]'), 2,
     r"mesh\.rules: 'embed' maps to mesh axis 'fsdp' twice"),
]


def _saved(folder: Path) -> Path:
    """A save_to_disk DatasetDict holding only a test split."""
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"instruction": ["q"], "answer": ["a"]})}).save_to_disk(
        folder)
    return folder


def _snapshot(folder: Path) -> list[str]:
    """Content hashes of every file under ``folder`` (what must not be lost)."""
    return sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file())


# Run as a real process (what a user sees on the terminal): one case of each kind, and the one whose
# library warning goes through logging handlers that pytest's in-process capture cannot stand in for.
IN_A_PROCESS = {"override-typo", "config-typo", "jsonl-not-utf8", "model-rope", "all-checkpoints-damaged",
                "adapter-tensor-nan"}


def _run_script(script: str, argv: list[str], capsys, in_a_process: bool) -> tuple[int, str]:
    if not in_a_process:
        capsys.readouterr()
        try:
            code = SCRIPTS[script].main(argv)
        except SystemExit as e:  # argparse refusing an option: usage and a one-line error, exit 2
            code = e.code
        return code, capsys.readouterr().err
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return done.returncode, done.stderr


@pytest.mark.parametrize("setup, code, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_a_clear_message(setup, code, message, tmp_path, capsys, request):
    script, argv = setup(_Lazy(request), tmp_path)
    before = _snapshot(tmp_path)
    returned, err = _run_script(script, [str(a) for a in argv], capsys, request.node.callspec.id in IN_A_PROCESS)
    assert returned == code, err
    assert "Traceback" not in err, err
    last = [line for line in err.splitlines() if line.strip()][-1]  # the one-line message
    assert re.search(message, last), f"{message!r} not in the last line of:\n{err}"
    assert not set(before) - set(_snapshot(tmp_path)), "a file already written was lost or changed"


class _Lazy(dict):
    """The shared fixtures, built on first use (most cases need neither)."""

    def __init__(self, request):
        super().__init__()
        self.request = request

    def __missing__(self, name):
        self[name] = self.request.getfixturevalue(name)
        return self[name]


def test_the_corpus_is_large_and_covers_every_kind_of_input():
    kinds = {"override": 0, "config": 0, "data": 0, "model": 0, "run": 0, "adapter": 0}
    for name, *_ in CASES:
        head = name.split("-")[0]
        kind = ("config" if head == "config" else "data" if head in {"jsonl", "llm", "bigbench", "hf", "responses"}
                else "model" if head in {"model", "gguf"} else "adapter" if head == "adapter"
                else "run" if head in {"output", "resume", "all", "evaluate", "analyze", "run", "export", "compare",
                                       "sweep"} else "override")
        kinds[kind] += 1
    assert len(CASES) >= 80 and all(v >= 5 for v in kinds.values()), kinds


# --------------------------------------------------------------------------- damaged runs recover


def _cut_metrics(run: Path) -> None:
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[: len(text) - 25])  # the last line cut mid-write


def _damage_config_json(run: Path, step: int) -> None:
    _write(run / "checkpoints" / str(step) / "config" / "metadata", "{damaged")


@pytest.mark.parametrize("damage, warning, resumed_from, logged", [
    (lambda run: _damage_state(run, 4), r"warning: checkpoint 4 cannot be read back .*moved to .*damaged_checkpoints/4",
     2, [1, 2, 3, 4, 5, 6]),
    (lambda run: _damage_config_json(run, 4), r"warning: checkpoint 4 cannot be read back", 2, [1, 2, 3, 4, 5, 6]),
    (_cut_metrics, r"warning: .*metrics\.jsonl: dropped 1 damaged line\(s\) \(4\); 3 intact rows kept", 4,
     [1, 2, 3, 5, 6]),  # the row cut mid-write is gone; every intact one is kept
], ids=["checkpoint-state", "checkpoint-config", "metrics-tail"])
def test_a_damaged_run_resumes_from_what_is_intact(damage, warning, resumed_from, logged, finished_run, tmp_path,
                                                   capsys):
    run = _copy(finished_run, tmp_path)
    damage(run)
    damaged = _snapshot(run / "checkpoints" / "4")
    assert train.main(tiny(f"train.output_dir={run}", "train.steps=6")) == 0
    printed = "".join(capsys.readouterr())
    assert re.search(warning, printed), printed
    assert f"resumed from step {resumed_from} of" in printed
    from comoe_jax.report import load_history

    assert [r["step"] for r in load_history(run)] == logged
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    if resumed_from == 2:  # the damaged checkpoint is kept aside, byte for byte
        assert _snapshot(run / "damaged_checkpoints" / "4") == damaged


def test_evaluation_settings_may_change_when_a_run_is_resumed(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    assert train.main(tiny(f"train.output_dir={run}", "eval.max_per_task=1", "eval.after_training=true")) == 0
    result = json.loads((run / "eval_after.json").read_text())
    assert sum(r["total"] for r in result["per_task"].values()) == 1


def test_an_interrupted_run_exits_75_and_resumes(monkeypatch, tmp_path, capsys):
    import signal

    from comoe_jax import trainer

    real, calls = trainer.next_global_batch, []

    def interrupting(stream, cfg):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(stream, cfg)

    monkeypatch.setattr(trainer, "next_global_batch", interrupting)
    args = tiny(f"train.output_dir={tmp_path / 'run'}")
    assert train.main(args) == 75
    assert "SIGTERM: saving step 2 and stopping" in capsys.readouterr().out
    monkeypatch.setattr(trainer, "next_global_batch", real)
    assert train.main(args) == 0


def test_sigterm_while_the_model_loads_exits_75_with_a_message(monkeypatch, tmp_path, capsys):
    """Outside the training loop (loading, evaluation) SIGTERM also ends with the interrupted code, not a bare 143,
    and the handler the command replaced is put back."""
    import signal

    from comoe_jax import trainer

    real = trainer.build_model

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "build_model", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    assert train.main(tiny(f"train.output_dir={tmp_path / 'run'}")) == 75
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("interrupted (SIGTERM); what was saved is kept: rerun "
                                                                "the same command to continue")
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_grid_cell_is_reused_only_when_its_run_really_finished(finished_run, tmp_path):
    from comoe_jax.config import load_run_config
    from comoe_jax.experiments import finished

    run = _copy(finished_run, tmp_path)
    cfg = load_run_config(run)
    cfg.train.output_dir = str(run)
    assert finished(cfg)
    longer = load_run_config(run)
    longer.train.output_dir, longer.train.steps = str(run), 8
    assert not finished(longer)  # more steps asked than were trained
    other = load_run_config(run)
    other.train.output_dir, other.adapter.rank = str(run), 8
    assert not finished(other)  # another config in the same folder
    _write(run / "eval_after.json", "{")
    assert not finished(cfg)  # a damaged result is redone
    (run / "eval_after.json").unlink()
    assert not finished(cfg)


def test_reports_of_reads_abandoned_by_a_failed_restore_are_dropped_and_nothing_else(tmp_path, capsys):
    from comoe_jax.checkpoint import Checkpointer

    Checkpointer(tmp_path / "run", keep=1)  # installs the filter before any restore can fail
    closed = RuntimeError("Event loop is closed")
    sys.excepthook(RuntimeError, closed, None)  # tensorstore reports a failed callback with PyErr_Print
    sys.unraisablehook(type("Report", (), {"exc_value": closed, "exc_type": RuntimeError, "exc_traceback": None,
                                           "err_msg": None, "object": None})())
    assert capsys.readouterr().err == ""
    sys.excepthook(ValueError, ValueError("a real error"), None)
    assert "ValueError: a real error" in capsys.readouterr().err


def test_failed_reads_abandoned_by_a_failed_restore_are_not_logged_and_other_tasks_are(caplog):
    import asyncio
    import gc

    from comoe_jax.checkpoint import _quiet_abandoned_reads

    _quiet_abandoned_reads()

    async def async_deserialize():  # named as orbax's per-tensor read
        raise ValueError("OUT_OF_RANGE: the damaged tensor")

    async def other_work():
        raise ValueError("a real error")

    def abandon(coroutine):  # a task that fails and is dropped unawaited, as asyncio then reports it
        loop = asyncio.new_event_loop()
        task = loop.create_task(coroutine())
        loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()
        del task
        gc.collect()

    def drop_failed_future(error):  # tensorstore's read futures fail the same way, without a task
        loop = asyncio.new_event_loop()
        future = loop.create_future()
        future.set_exception(error)
        loop.close()
        del future
        gc.collect()

    with caplog.at_level("ERROR", logger="asyncio"):
        abandon(async_deserialize)
        drop_failed_future(ValueError("OUT_OF_RANGE: Error opening \"zarr\" driver [tensorstore_spec='{}']"))
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
        abandon(other_work)
        drop_failed_future(ValueError("another real error"))
        messages = [r.getMessage() for r in caplog.records]
        assert any("other_work" in m for m in messages) and any("another real error" in m for m in messages)
