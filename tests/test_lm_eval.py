"""The lm-evaluation-harness backend (``--model comoe-jax``) against lm_eval's own ``hf`` backend on the same
tiny random Llama folder: multiple-choice task results, log-likelihoods, rolling windows, generation; and
with an adapter, against our own scorer."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
from lm_eval.api.instance import Instance  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from comoe_jax.lm_eval_model import ComoeJaxLM  # noqa: E402
from comoe_jax.loading import load_tokenizer  # noqa: E402
from tests.support import randomised  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TASK = "comoe_tiny_mc"
# Contexts ending in a space or a newline exercise the hf backend's move of trailing whitespace onto the
# continuation; the choices get lm_eval's " " target delimiter.
DOCS = [
    {"question": "Question: What is 2 + 3?\nAnswer:", "choices": ["5", "6", "23"], "answer": 0},
    {"question": "The capital of France is ", "choices": ["Paris", "Rome", "a city in Europe"], "answer": 0},
    {"question": "Pick the colour of the sky.\n", "choices": ["blue", "green", "red", "Blue!"], "answer": 0},
    {"question": "Complete: once upon a", "choices": ["time", "tree", "dime"], "answer": 1},
    {"question": "Is water wet?", "choices": ["yes", "no"], "answer": 1},
    {"question": "Numbers: 1, 2, 3,", "choices": ["4", "5, 6", "four"], "answer": 2},
]
PAIRS = [("Question: 2 + 2 =", " 4"), ("The sky is ", "blue"), ("Hello\n\n", "world, again"), ("", "Just text."),
         ("a" * 3, " b c d e f g")]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's (bundled) tokenizer: the vocab covers the tokenizer's ids."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    randomised(LlamaForCausalLM, config, seed=0).save_pretrained(folder)
    load_tokenizer("smollm2-135m").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours(hf_folder):
    return ComoeJaxLM(path=str(hf_folder), batch_size=4)


@pytest.fixture(scope="module")
def hf(hf_folder):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_folder), dtype="float32", device="cpu", batch_size=4)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _task_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n"
        + "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in ("acc", "acc_norm")))
    return root


def _by_doc(samples) -> dict[int, list[tuple[float, bool]]]:
    """doc id -> (log-likelihood, is_greedy) per choice (the samples file holds them as strings)."""
    return {s["doc_id"]: [(float(r[0][0]), str(r[0][1]) == "True") for r in s["resps"]] for s in samples}


def test_multiple_choice_task_matches_the_hf_backend(hf_folder, hf, tmp_path, monkeypatch, capsys):
    """The documented command (``python -m comoe_jax.lm_eval_model --model comoe-jax ...``, run here with runpy
    as ``-m`` runs it) on a local task gives the hf backend's per-choice log-likelihoods, greedy flags, acc and
    acc_norm."""
    import runpy
    import warnings

    import lm_eval
    from lm_eval.tasks import TaskManager

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    tasks = _task_folder(tmp_path / "tasks")
    out = tmp_path / "out"
    # The CLI indexes lm_eval's own ~10k task files too (8 s on 2 cores); this task is local.
    index = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__",
                        lambda self, *a, **k: index(self, *a, **k | {"include_defaults": False}))
    monkeypatch.setattr(sys, "argv", [
        "lm_eval_model.py", "--model", "comoe-jax", "--model_args", f"path={hf_folder},dtype=float32", "--tasks",
        TASK, "--include_path", str(tasks), "--batch_size", "4", "--log_samples", "--output_path", str(out)])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported already (by this file)
        runpy.run_module("comoe_jax.lm_eval_model", run_name="__main__")
    assert exit_.value.code == 0, capsys.readouterr().err[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(out.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()]
    assert results["config"]["model"] == "comoe-jax" and len(samples) == len(DOCS)

    want = lm_eval.simple_evaluate(model=hf, tasks=[TASK], task_manager=TaskManager(include_path=str(tasks)),
                                   log_samples=True)
    got_docs, want_docs = _by_doc(samples), _by_doc(want["samples"][TASK])
    assert sorted(got_docs) == sorted(want_docs) == list(range(len(DOCS)))
    for doc in want_docs:
        got, ref = np.array(got_docs[doc]), np.array(want_docs[doc])
        np.testing.assert_allclose(got[:, 0], ref[:, 0], atol=1e-3, rtol=0)
        np.testing.assert_array_equal(got[:, 1], ref[:, 1])
    by_doc = lambda rows, metric: [s[metric] for s in sorted(rows, key=lambda s: s["doc_id"])]  # noqa: E731
    for metric in ("acc", "acc_norm"):
        assert results["results"][TASK][f"{metric},none"] == want["results"][TASK][f"{metric},none"]
        assert by_doc(samples, metric) == by_doc(want["samples"][TASK], metric)


def test_loglikelihood_tokenisation_and_values_match_the_hf_backend(ours, hf):
    """Empty context (the prefix token), trailing whitespace, multi-token continuations; and the context cut
    from the left when context + continuation exceed max_length (as hf does)."""
    assert ours.max_length == hf.max_length == 128  # both from config.json's max_position_embeddings
    assert [ours._encode_pair(c, x) for c, x in PAIRS if c] == [hf._encode_pair(c, x) for c, x in PAIRS if c]
    got, want = ours.loglikelihood(_requests("loglikelihood", PAIRS)), hf.loglikelihood(_requests("loglikelihood",
                                                                                                 PAIRS))
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-3, rtol=0)
    assert [g[1] for g in got] == [w[1] for w in want]
    long = [("word " * 40, " end of it"), ("x " * 30, " " + "token " * 8)]
    ours._max_length, hf._max_length = 16, 16
    try:
        got, want = (lm.loglikelihood(_requests("loglikelihood", long)) for lm in (ours, hf))
    finally:
        ours._max_length, hf._max_length = 128, None
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-3, rtol=0)


def test_add_bos_token_as_the_hf_backend(hf_folder, ours):
    """add_bos_token=True makes a tokenizer that adds no BOS of its own (SmolLM2's) add one, as hf does."""
    from lm_eval.models.huggingface import HFLM

    with_bos = ComoeJaxLM(path=str(hf_folder), batch_size=4, add_bos_token=True)
    hf = HFLM(pretrained=str(hf_folder), dtype="float32", device="cpu", batch_size=4, add_bos_token=True)
    assert with_bos.tok_encode("hi there") == hf.tok_encode("hi there") == [1, *ours.tok_encode("hi there")]
    pairs = [c for c in PAIRS if c[0]]
    got, want = (lm.loglikelihood(_requests("loglikelihood", pairs)) for lm in (with_bos, hf))
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-3, rtol=0)
    assert not np.allclose([g[0] for g in got], [g[0] for g in ours.loglikelihood(_requests("loglikelihood", pairs))])


def _rolling_reference(model, tokens: list[int], prefix: int, window: int) -> float:
    """Sum of log p(token | its window): the tokens predicted in chunks of ``window``, each chunk seeing the
    ``window`` tokens before its last (the first chunk: ``prefix`` then the document)."""
    seq = [prefix, *tokens]
    total = 0.0
    for start in range(0, len(tokens), window):
        end = min(start + window, len(tokens))
        first = max(0, end - window)  # inputs seq[first:end] predict seq[first + 1:end + 1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq[first:end]])).logits[0].double(), -1).numpy()
        for j in range(start + 1, end + 1):  # seq[j] = tokens[j - 1], predicted at input position j - 1 - first
            total += logp[j - 1 - first, seq[j]]
    return total


def test_loglikelihood_rolling_matches_a_plain_reference(ours, hf):
    docs = ["The quick brown fox jumps over the lazy dog, and then it runs away into the forest.", "short",
            "Numbers 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24."]
    full = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(d,) for d in docs]))
    ours._max_length = 8  # several windows per document
    try:
        windowed = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(d,) for d in docs]))
    finally:
        ours._max_length = 128
    model, tok = hf.model, hf.tokenizer
    for doc, got_full, got_windowed in zip(docs, full, windowed):
        tokens = tok.encode(doc)
        assert len(tokens) < 128
        np.testing.assert_allclose(got_full, _rolling_reference(model, tokens, tok.bos_token_id, 128), atol=1e-3,
                                   rtol=1e-5)
        np.testing.assert_allclose(got_windowed, _rolling_reference(model, tokens, tok.bos_token_id, 8), atol=1e-3,
                                   rtol=1e-5)
    assert abs(windowed[0] - full[0]) > 1e-2  # the windows really cut the context


def test_generate_until_is_greedy_and_stops_at_until(ours, hf):
    prompts = ["Once upon a time", "The answer is", "1, 2, 3,"]
    free = ours.generate_until(_requests("generate_until", [(p, {"until": [], "max_gen_toks": 10}) for p in prompts]))
    want = hf.generate_until(_requests("generate_until", [(p, {"until": [], "max_gen_toks": 10}) for p in prompts]))
    assert free == want and all(len(text) > 4 for text in free)  # also: max_gen_toks honoured, as hf
    stops = [text[2:4] for text in free]  # a string inside each free continuation
    stopped = ours.generate_until(_requests("generate_until", [(p, {"until": [s], "max_gen_toks": 10})
                                                               for p, s in zip(prompts, stops)]))
    assert stopped == [text[:text.index(s)] for text, s in zip(free, stops)]


def test_adapter_run_scores_as_our_own_scorer(hf_folder, ours, tmp_path):
    """``adapter=<run folder>`` loads the run's adapters; its log-likelihoods are comoe_jax.evaluate's
    Scorer's on the same model and tokens, and differ from the base model's; ``adapter=<run>/adapter``
    gives the same."""
    import jax.numpy as jnp
    from flax import nnx

    from comoe_jax.checkpoint import save_adapters
    from comoe_jax.config import Config, apply_overrides
    from comoe_jax.evaluate import Scorer
    from comoe_jax.loading import build_model
    from comoe_jax.model import flat_values, split_model, state_from_flat

    cfg = Config()
    cfg.model.path = str(hf_folder)
    apply_overrides(cfg, ["adapter.rank=4", "adapter.target_modules=q_proj,v_proj,down_proj", "mesh.num_devices=1"])
    model = build_model(cfg)
    _, adapters, _ = split_model(model)
    rng = np.random.default_rng(0)
    values = {k: jnp.asarray(rng.normal(size=v.shape) * 0.5 if k.endswith("lora_b") else v, jnp.float32)
              for k, v in flat_values(adapters).items()}
    nnx.update(model, state_from_flat(adapters, values))
    run = tmp_path / "run"
    save_adapters(run / "adapter", values, model.groups, cfg)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), default=list))

    adapted = ComoeJaxLM(adapter=str(run), batch_size=4)
    assert adapted.base == str(hf_folder)
    pairs = [p for p in PAIRS if p[0]]
    got = [ll for ll, _ in adapted.loglikelihood(_requests("loglikelihood", pairs))]
    tokens = [adapted._encode_pair(c, x) for c, x in pairs]
    want = [ll for ll, _ in Scorer(model, adapted.pad_id, batch_size=4).continuation_logprobs(tokens)]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    base = [ll for ll, _ in ours.loglikelihood(_requests("loglikelihood", pairs))]
    assert np.abs(np.array(got) - np.array(base)).min() > 1e-2
    # the run's adapter folder alone (comoe_jax.interop.load_adapted; base model as recorded there)
    folder = ComoeJaxLM(adapter=str(run / "adapter"), batch_size=4, num_devices=1)
    assert folder.base == str(hf_folder)
    np.testing.assert_allclose([ll for ll, _ in folder.loglikelihood(_requests("loglikelihood", pairs))], got,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("args, message", [
    ("adpater=runs/x", r"model_args: unknown key 'adpater' \(did you mean 'adapter'\?\); comoe-jax takes path, "),
    ("bogus=1", r"model_args: unknown key 'bogus'; comoe-jax takes path, pretrained, adapter"),
    ("max_length=-5", r"model_args max_length=-5: expected a positive integer"),
    ("dtype=float8", r"model_args dtype='float8': expected one of auto, float32, bfloat16"),
    ("num_devices=0", r"model_args num_devices=0: expected a positive number of devices, or -1 for all"),
    ("fsdp=abc", r"model_args fsdp='abc': expected an integer"),
    ("batch_size=0", r"--batch_size \(or model_args batch_size\)=0: expected a positive integer"),
    ("num_devices=99", r"model_args num_devices=99: only \d+ devices are visible"),
])
def test_bad_model_args_are_refused_before_loading(hf_folder, args, message):
    from comoe_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        ComoeJaxLM.create_from_arg_string(f"path={hf_folder},{args}", {"batch_size": 4, "device": None})


def test_lm_eval_flags_every_model_receives_are_accepted(hf_folder):
    """lm_eval's --trust_remote_code puts trust_remote_code=True into every model's args."""
    lm = ComoeJaxLM.create_from_arg_string(f"path={hf_folder},trust_remote_code=True",
                                           {"batch_size": 8, "max_batch_size": 64, "device": "cuda"})
    assert lm.batch_size == 8


def test_batch_size_in_model_args_and_on_the_command_line(hf_folder, caplog):
    """lm_eval always passes its --batch_size: model_args' value wins, with a warning (no duplicate-key crash)."""
    # (sizes that are multiples of 8: the scorer rounds a batch up to a multiple of the devices)
    lm = ComoeJaxLM.create_from_arg_string(f"path={hf_folder},batch_size=16", {"batch_size": 8, "max_batch_size": None,
                                                                                "device": "cpu"})
    assert lm.batch_size == 16
    assert "model_args batch_size=16 overrides lm_eval's --batch_size 8" in caplog.text
    assert ComoeJaxLM.create_from_arg_obj({"path": str(hf_folder)}, {"batch_size": "24"}).batch_size == 24
