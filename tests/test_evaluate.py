"""Scoring modes against brute-force answers on a tiny model, generation with a KV cache, answer extraction,
accuracy bookkeeping, and the routing analyses (MI against hand-computed values)."""

import importlib
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from comoe_jax import AdapterConfig, from_pretrained
from comoe_jax.adapters import ForwardContext, RoutingTrace
from comoe_jax.analysis import collect_routing, expert_outputs_2d, mutual_information, task_expert_mi
from comoe_jax.data import Example, encode, multiple_choice, render, render_cloze
from comoe_jax.data.templates import separator
from comoe_jax.evaluate import Scorer, evaluate, extract_answer, is_correct, label_predictions, loglik_predictions
from comoe_jax.generate import greedy_generate
from comoe_jax.loading import byte_tokenizer
from comoe_jax.option_packing import pack_calls, shared_prefix

ARCH = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.fixture(scope="module")
def model():
    m = from_pretrained("random", adapter=AdapterConfig(num_experts=4, top_k=2, rank=4), random_arch=ARCH, seed=1)
    rng = np.random.default_rng(0)  # non-zero B, so the adapters matter
    for stack in m.layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            layer = getattr(stack.layer.self_attn, proj)
            layer.lora_b[...] = jnp.asarray(rng.normal(size=layer.lora_b.shape) * 0.3, jnp.float32)
    return m


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _items():
    return [
        multiple_choice("colours", "Which is a colour?", ["red", "run", "rain"], "red", "t#0"),
        multiple_choice("colours", "Which is not a colour?", ["blue", "bread"], "bread", "t#1"),
        multiple_choice("sums", "What is 2+2?", ["4", "5", "22", "3"], "4", "t#2"),
        Example("yesno", "Is ice cold?", "true", labels=("true", "false"), source="t#3"),
    ]


@nnx.jit
def _forward(model, ids):
    return model(ids)


def _logprobs(model, ids):
    """float64 log-probabilities ``[len(ids), V]`` of a plain causal forward over ``ids``, right-padded to a
    multiple of 128 so a few shapes compile (later tokens do not change earlier logits)."""
    padded = np.zeros((1, -(-len(ids) // 128) * 128), np.int32)
    padded[0, :len(ids)] = ids
    logits = np.asarray(_forward(model, jnp.asarray(padded)))[0, :len(ids)].astype(np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)


def _continuation(model, ctx, cont):
    lp = _logprobs(model, ctx + cont)
    return sum(lp[len(ctx) - 1 + j, tok_id] for j, tok_id in enumerate(cont)), len(cont)


@pytest.mark.parametrize("template", ["choice", "alpaca"])
def test_label_scoring_matches_brute_force(model, tok, template):
    items = _items()
    preds, cut = label_predictions(Scorer(model, tok.pad_token_id, batch_size=3), tok, items, template)
    assert cut == 0
    for ex, pred in zip(items, preds):
        prompt, _ = render(ex, template)
        ctx = tok(prompt)["input_ids"]
        scores = [_continuation(model, ctx, tok(separator(template) + lab, add_special_tokens=False)["input_ids"])[0]
                  for lab in ex.labels]
        assert pred == ex.labels[int(np.argmax(scores))], (ex.source, scores)


@pytest.mark.parametrize("template", ["choice", "alpaca"])
def test_a_label_that_extends_another_is_scored_with_the_answers_end(model, tok, template):
    """"A" vs "AB", "1" vs "10": the labels' tokens are followed by EOS, as training wrote them (else the longer
    could never win: its score is the shorter's plus one more log-probability)."""
    items = [Example("t", f"Pick {i}", answer, labels=labels, source=f"t#{i}")
             for i, (answer, labels) in enumerate([("AB", ("A", "AB")), ("1", ("1", "10", "2")), ("x", ("x", "y"))])]
    preds, _ = label_predictions(Scorer(model, tok.pad_token_id, batch_size=2), tok, items, template)
    for ex, pred in zip(items, preds):
        ctx = tok(render(ex, template)[0])["input_ids"]
        conts = [tok(separator(template) + lab, add_special_tokens=False)["input_ids"] for lab in ex.labels]
        end = [tok.eos_token_id] if any(b[:len(a)] == a and len(a) < len(b) for a in conts for b in conts) else []
        scores = [_continuation(model, ctx, c + end)[0] for c in conts]
        assert pred == ex.labels[int(np.argmax(scores))], (ex.source, scores)
    scorer, seen = Scorer(model, tok.pad_token_id, batch_size=2), []
    scorer.option_logprobs = lambda contexts, conts: seen.extend(conts) or [np.zeros(len(c)) for c in conts]
    label_predictions(scorer, tok, items, template)  # what is scored: EOS only where a label extends another
    assert [[c[-1] == tok.eos_token_id for c in conts] for conts in seen] == [[True] * 2, [True] * 3, [False] * 2]


def test_label_scoring_with_one_token_labels_reads_the_answer_position(model, tok):
    items = _items()[:3]  # one-token labels ("A" after alpaca's "### Response:\n"): one forward per item
    preds, _ = label_predictions(Scorer(model, tok.pad_token_id, batch_size=2), tok, items, "alpaca")
    for ex, pred in zip(items, preds):
        ctx = tok(render(ex, "alpaca")[0])["input_ids"]
        lp = _logprobs(model, ctx)[-1]
        label_ids = [tok(lab, add_special_tokens=False)["input_ids"][0] for lab in ex.labels]
        assert all(len(tok(lab, add_special_tokens=False)["input_ids"]) == 1 for lab in ex.labels)
        assert pred == ex.labels[int(np.argmax(lp[label_ids]))]


@pytest.mark.parametrize("template", ["choice", "alpaca", "plain"])
def test_generation_starts_where_the_trained_response_starts(model, tok, template, monkeypatch):
    """The generation prompt is the training prompt, token for token: the model was trained to write the
    response (the choice template's " A", its space included) right after it. A prompt with the response's
    leading space appended made a choice-trained SmolLM2 generate "2" for every item (0% against 38%)."""
    evaluation = importlib.import_module("comoe_jax.evaluate")  # the package's `evaluate` is the function
    seen = []
    monkeypatch.setattr(evaluation, "greedy_generate", lambda _m, prompts, **_: seen.extend(prompts) or
                        [[] for _ in prompts])
    items = _items()
    evaluation.generate_predictions(model, tok, items, template, max_new_tokens=4, batch_size=2)
    for ex, prompt in zip(items, seen, strict=True):
        ids, is_response, _ = encode(tok, *render(ex, template), seq_len=256)
        assert list(prompt) == ids[: int(np.argmax(is_response))].tolist()


def test_loglik_scoring_matches_brute_force(model, tok):
    items = _items()[:3]
    preds, _ = loglik_predictions(Scorer(model, tok.pad_token_id, batch_size=4), tok, items, "choice")
    for ex, pred in zip(items, preds):
        prompt, continuations = render_cloze(ex, "choice")
        ctx = tok(prompt)["input_ids"]
        scores = [s / n for s, n in (_continuation(model, ctx, tok(c, add_special_tokens=False)["input_ids"])
                                     for c in continuations)]
        assert pred == ex.labels[int(np.argmax(scores))]


def test_modes_refuse_items_they_cannot_score(model, tok):
    free = Example("add", "1+1?", "2", source="f#0")
    with pytest.raises(ValueError, match=r"f#0: eval.mode=label needs multiple-choice items.*use eval.mode=generate"):
        evaluate(model, tok, [free], mode="label", template="plain")
    embedded = Example("arc", "Pick one. Answer format: answer1/answer2", "answer1", labels=("answer1", "answer2"))
    with pytest.raises(ValueError, match="needs the option texts"):
        evaluate(model, tok, [embedded], mode="loglik", template="plain")


def test_cached_generation_equals_full_recompute_and_ignores_left_padding(model):
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(3, 259, size=n)) for n in (7, 19, 2, 11)]
    got = greedy_generate(model, prompts, max_new_tokens=5, eos_id=2, pad_id=0, batch_size=3)
    for p, g in zip(prompts, got):
        seq = list(p)
        for _ in range(5):
            nxt = int(np.argmax(_logprobs(model, seq)[-1]))
            if nxt == 2:
                break
            seq.append(nxt)
        assert g == seq[len(p):]
        assert greedy_generate(model, [p], max_new_tokens=5, eos_id=2, pad_id=0, batch_size=1)[0] == g


def test_generation_stops_at_any_end_token(model, tmp_path):
    """A chat model ends its turn with a token of its own (generation_config.json's eos_token_id list):
    generation stops there too, as transformers' generate does."""
    prompts = [list(np.random.default_rng(4).integers(3, 259, size=n)) for n in (9, 4)]
    free = greedy_generate(model, prompts, max_new_tokens=6, eos_id=2, pad_id=0, batch_size=2)
    for p, g in zip(prompts, free):
        assert len(g) >= 3, "the test needs generations that run past their third token"
        stop = g[2]
        cut = greedy_generate(model, [p], max_new_tokens=6, eos_id=[2, stop], pad_id=0, batch_size=1)[0]
        assert cut == g[: g.index(stop)]

    from comoe_jax.generate import stop_token_ids
    from comoe_jax.loading import load_tokenizer

    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert stop_token_ids(load_tokenizer(str(tmp_path))) == (2,)
    (tmp_path / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": [2, 106]}')
    assert stop_token_ids(load_tokenizer(str(tmp_path))) == (2, 106)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert stop_token_ids(load_tokenizer(str(tmp_path))) == (2, 7)


def test_answer_extraction_and_correctness():
    from comoe_jax.evaluate import after_reasoning

    free = Example("capitals", "Capital of France?", "Paris")
    assert is_correct(extract_answer(after_reasoning("<think>\nIt is Paris, not Lyon.\n</think>\n\nParis"), free), free)
    assert after_reasoning("no block: 12") == "no block: 12"
    choice = multiple_choice("t", "q", ["yes", "no"], "no", "s")
    assert extract_answer("The answer is (B) No", choice) == "B"
    assert extract_answer("a cat sat", choice) == ""  # a lowercase word is not the label A
    words = Example("arc", "q", "answer3", labels=("answer1", "answer2", "answer3", "answer10"))
    assert extract_answer("the correct answer is Answer3.", words) == "answer3"
    assert extract_answer("answer10 it is", words) == "answer10"
    number = Example("gsm8k", "q", "1234")
    assert extract_answer("5 apples, so the total is 1,234.", number) == "1234"
    assert is_correct("1234.0", number) and not is_correct("1235", number) and not is_correct("", number)
    text = Example("reverse", "q", "tac")
    assert is_correct(extract_answer(" Tac. ", text), text)


@pytest.mark.parametrize("answer, text", [
    ("20", "It takes 15-20"), ("0.5", "The answer is .5"), ("-3.5", "so it is -3.5 degrees"), ("-2", "x = \u22122"),
    ("$1,000", "The answer is $1,000."), ("1000", "$1,000"), ("50%", "about 50"), ("-4", "(-4)"),
    ("6", "8 - 2 = 6"), ("2023", "In 2023, they won")])
def test_numbers_are_read_as_written(answer, text):
    """A hyphen between digits is no minus sign; '.5', U+2212, currency signs, percent and commas are read."""
    item = Example("math", "q", answer)
    assert is_correct(extract_answer(text, item), item)
    assert not is_correct(extract_answer(text + " and then 7", item), item)  # the last number counts


@pytest.mark.parametrize("text, want", [
    ("A dog barks, so the answer is (B)", "B"),  # "A" begins a sentence's words: not an answer
    ("I think it is C.", "C"), ("The answer: J", "J"), ("(E) the fifth", "E"), ("b) dog", "B"),
    ("D. Paris", "D"), ("A", "A"), ("Between (F) and G, answer is G", "G"), ("I am not sure", "I"),
    ("no letter here", "")])
def test_letter_answers_are_found_where_a_reader_would_find_them(text, want):
    ten = multiple_choice("t", "q", [f"option {i}" for i in range(10)], "option 1", "s")
    assert extract_answer(text, ten) == want


def test_any_listed_answer_counts():
    item = Example("bb", "q", "42", also_correct=("forty-two",))
    for text, ok in (("It is 42.", True), ("forty-two", True), ("Forty-two.", True), ("41", False), ("", False)):
        assert is_correct(extract_answer(text, item), item) is ok, text
    word = Example("bb", "q", "Paris", also_correct=("paris, France",))
    assert is_correct("Paris, France", word) and is_correct("paris", word) and not is_correct("Lyon", word)


def test_accuracy_is_counted_per_task_and_averaged_over_tasks(model, tok):
    items = _items()
    result = evaluate(model, tok, items, mode="label", template="choice", batch_size=2)
    preds = {p["source"]: p for p in result.predictions}
    for task, r in result.per_task.items():
        mine = [preds[ex.source]["correct"] for ex in items if ex.task == task]
        assert r["total"] == len(mine) and r["correct"] == sum(mine)
    assert math.isclose(result.average, np.mean([r["correct"] / r["total"] for r in result.per_task.values()]))
    md = result.to_markdown("x")
    assert "| colours | 2 |" in md and "**average**" in md


# --------------------------------------------------------------------------- analyses


def test_mutual_information_against_hand_computed_values():
    assert mutual_information(np.array([[10, 0], [0, 10]])) == pytest.approx(1.0)
    assert mutual_information(np.array([[5, 5], [5, 5]])) == pytest.approx(0.0, abs=1e-12)
    # p = [[.25, .25], [.5, 0]]: .25 log2(.25/.375) + .25 log2(.25/.125) + .5 log2(.5/.375)
    want = 0.25 * math.log2(0.25 / 0.375) + 0.25 * 1.0 + 0.5 * math.log2(0.5 / 0.375)
    assert mutual_information(np.array([[1, 1], [2, 0]])) == pytest.approx(want)
    assert want == pytest.approx(0.3113, abs=1e-4)


def test_collect_routing_counts_every_prompt_token(model, tok):
    items = _items()
    usage = collect_routing(model, tok, items, "choice", batch_size=3, code_modules=("layers.1.self_attn.v_proj",))
    lengths = {}
    for ex in items:
        lengths[ex.task] = lengths.get(ex.task, 0) + len(tok(render(ex, "choice")[0])["input_ids"])
    assert dict(zip(usage.tasks, usage.tokens)) == lengths
    np.testing.assert_allclose(usage.expert_counts.sum(-1), np.repeat(2 * usage.tokens[:, None], 8, 1))  # k = 2
    np.testing.assert_allclose(usage.set_counts.sum(-1), usage.tokens[:, None].repeat(len(usage.modules), 1))
    np.testing.assert_allclose(usage.workload().sum(-1), 1.0)
    mi = task_expert_mi(usage)
    assert mi.shape == (8,) and (mi >= 0).all() and (mi <= math.log2(3) + 1e-9).all()
    assert usage.codes["layers.1.self_attn.v_proj"].shape == (4, 4, 4)
    points, experts = expert_outputs_2d(model, usage, "layers.1.self_attn.v_proj")
    assert points.shape == (16, 2) and sorted(set(experts)) == [0, 1, 2, 3]
    # the same counts straight from one probed forward of the first item
    ids = jnp.asarray([tok(render(items[0], "choice")[0])["input_ids"]], jnp.int32)
    n = ids.shape[1]
    _, trace = nnx.capture(model.forward, RoutingTrace)(ids, ctx=ForwardContext(jnp.ones((1, n)), jnp.float32(n)))
    topk = np.asarray(model.stat(trace, "topk")[0, 0])  # module layers.0.self_attn.q_proj, first row
    single = collect_routing(model, tok, items[:1], "choice", batch_size=1)
    np.testing.assert_array_equal(single.expert_counts[0, 0], np.bincount(topk.ravel(), minlength=4))


def test_evaluation_sharded_over_four_devices_gives_the_same_predictions(model, tok):
    import jax

    from comoe_jax import sharding as shd
    from comoe_jax.config import MeshConfig
    from comoe_jax.model import flat_values

    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=1), jax.devices()[:4])
    sharded = from_pretrained("random", adapter=AdapterConfig(num_experts=4, top_k=2, rank=4), random_arch=ARCH,
                              seed=1, mesh=mesh, rules=shd.rules_dict(MeshConfig().rules))
    nnx.update(sharded, jax.tree.map(lambda v, s: jax.device_put(np.asarray(v), s.sharding),
                                     nnx.state(model), nnx.state(sharded)))  # the same weights, on 4 devices
    assert {len(v.sharding.device_set) for v in flat_values(nnx.state(sharded)).values()} == {4}
    items = _items() + [multiple_choice("sums", f"What is {i}+1?", [str(i + 1), str(i)], str(i + 1), f"s#{i}")
                        for i in range(7)]
    for mode, kept in (("label", items), ("loglik", [ex for ex in items if ex.options]), ("generate", items)):
        one = evaluate(model, tok, kept, mode=mode, template="choice", batch_size=3, max_new_tokens=4)
        four = evaluate(sharded, tok, kept, mode=mode, template="choice", batch_size=3, max_new_tokens=4)
        assert [p["prediction"] for p in four.predictions] == [p["prediction"] for p in one.predictions], mode
    usage_one = collect_routing(model, tok, items, "choice", batch_size=3)
    usage_four = collect_routing(sharded, tok, items, "choice", batch_size=3)
    np.testing.assert_array_equal(usage_four.expert_counts, usage_one.expert_counts)


def test_options_scored_from_the_context_cache_equal_whole_sequences(model, tok):
    rng = np.random.default_rng(3)
    contexts = [list(rng.integers(3, 250, size=n)) for n in (5, 17, 9, 33, 2, 12, 40)]
    options = [[list(rng.integers(3, 250, size=m)) for m in sizes]
               for sizes in ([1, 3], [2, 2, 5], [4], [1, 1, 1, 6], [3, 2], [7, 1], [2, 9, 3])]
    scorer = Scorer(model, tok.pad_token_id, batch_size=3)
    cached = scorer.option_logprobs(contexts, options)
    whole = scorer.continuation_logprobs([(c, o) for c, opts in zip(contexts, options) for o in opts])
    flat = np.concatenate(cached)
    np.testing.assert_allclose(flat, [total for total, _ in whole], rtol=1e-4, atol=1e-4)
    assert [len(s) for s in cached] == [len(o) for o in options]


def test_packed_rows_with_a_shared_prefix_score_like_whole_sequences(model, tok):
    """Rows of 32 tokens: several items per row, items longer than a row, a context that is all prefix but
    its last token, one-token options (nothing of them in the row), calls of 3 rows and fewer."""
    rng = np.random.default_rng(11)
    header = list(rng.integers(3, 250, size=9))
    contexts = [header + list(rng.integers(3, 250, size=n)) for n in (1, 17, 4, 40, 2, 3, 9, 0, 6, 1, 25)]
    options = [[list(rng.integers(3, 250, size=m)) for m in sizes] for sizes in
               ([1, 3], [2, 2, 5], [4], [1, 1, 1, 6], [3, 2], [7, 1], [2, 9, 3], [1, 2], [5, 5], [1], [2, 30])]
    assert shared_prefix(contexts) == header[:8]
    scorer = Scorer(model, tok.pad_token_id, batch_size=3, row_len=32)
    packed = scorer.option_logprobs(contexts, options)
    whole = scorer.continuation_logprobs([(c, o) for c, opts in zip(contexts, options) for o in opts])
    np.testing.assert_allclose(np.concatenate(packed), [total for total, _ in whole], rtol=1e-4, atol=1e-4)
    assert [len(s) for s in packed] == [len(o) for o in options]


def test_packing_places_every_token_once_at_its_own_position():
    rng = np.random.default_rng(5)
    contexts = [[1, 2, 3] + list(rng.integers(4, 99, size=n)) for n in rng.integers(1, 50, size=23)]
    options = [[list(rng.integers(4, 99, size=m)) for m in rng.integers(1, 6, size=k)]
               for k in rng.integers(1, 5, size=23)]
    calls = pack_calls(contexts, options, rows_per_call=4, pad_id=0, row_len=64, row_multiple=2)
    assert sum(c.items for c in calls) == 23
    seen = {}
    for call in calls:
        rows = call.ids.shape[0]
        assert rows <= 4 and rows % 2 == 0 and call.cols.shape[1] & (call.cols.shape[1] - 1) == 0
        assert (call.ids[:, :3] == [1, 2, 3]).all() and (call.item[:, :3] == 0).all()
        for r, n in zip(*np.nonzero(call.owner[..., 0] >= 0)):
            i, j = call.owner[r, n]
            slot = call.cols[r, n]
            seen.setdefault((i, j), []).append((call.positions[r, slot], call.targets[r, n]))
    for i, (context, opts) in enumerate(zip(contexts, options)):
        for j, option in enumerate(opts):  # target t predicted at position len(context) + t - 1
            assert seen[i, j] == [(len(context) + t - 1, tok) for t, tok in enumerate(option)]


def test_long_rows_go_fewer_to_a_call(monkeypatch):
    """Attention memory grows with rows x length^2: long rows (lm_eval's rolling windows) are split finer."""
    from comoe_jax import option_packing

    rng = np.random.default_rng(6)
    contexts = [list(rng.integers(4, 99, size=n)) for n in (20, 30, 150, 200, 180, 10)]
    options = [[[5, 6]] for _ in contexts]
    monkeypatch.setattr(option_packing, "ATTENTION_BUDGET", 4 * 64 * 64)
    calls = pack_calls(contexts, options, rows_per_call=8, pad_id=0, row_len=64)
    assert sum(c.items for c in calls) == len(contexts)
    for call in calls:
        rows, length = call.ids.shape
        assert rows <= max(1, 4 * 64 * 64 // length**2) and rows <= 8
    assert max(c.ids.shape[1] for c in calls) > 128  # some rows were long


def test_before_after_table_of_a_run_resumed_with_other_eval_settings():
    from comoe_jax.evaluate import EvalResult, comparison_markdown

    def result(mode, **tasks):
        per_task = {t: {"accuracy": c / n, "correct": c, "total": n} for t, (c, n) in tasks.items()}
        return EvalResult(mode, per_task, sum(r["accuracy"] for r in per_task.values()) / len(per_task))

    same = comparison_markdown(result("label", add=(1, 4), sort=(2, 4)), result("label", add=(3, 4), sort=(2, 4)),
                               "T")
    assert "| change | +50.0 | +0.0 | +25.0 |" in same and "mode `label`, 8 items" in same
    other = comparison_markdown(result("label", add=(1, 4), sort=(2, 4), copy=(0, 4)),
                                result("generate", add=(3, 4), dup=(1, 2)), "T")  # a task missing on either side
    assert "not comparable: before training mode `label` on 12 items, after training mode `generate` on 6" in other
    assert "|  | add | dup | sort | copy | Avg |" in other and "| change |" not in other
    assert "| before | 25.0 | - | 50.0 | 0.0 | 25.0 |" in other and "| after | 75.0 | 50.0 | - | - | 62.5 |" in other


def test_prompts_are_cut_at_the_models_own_context_and_the_cut_is_reported(tok):
    """The cut used to be a fixed 1024 tokens whatever the model; now it is the model's context."""
    from comoe_jax.evaluate import _fit, context_length, evaluate, length_budget

    short = from_pretrained("random", random_arch=ARCH | {"max_position_embeddings": 192}, seed=0)
    assert context_length(short) == 192
    long_item = multiple_choice("long", "Which is a colour? " + "Think about it. " * 12, ["red", "run"], "red", "l#0")
    items = [long_item, *_items()[:2]]
    said = []
    for mode in ("label", "loglik", "generate"):
        result = evaluate(short, tok, items, mode=mode, template="choice", batch_size=2, max_new_tokens=2,
                          say=said.append)
        assert result.truncated == 1, mode
    assert said.count("warning: 1 of 3 prompts are longer than the length budget (192 tokens: eval.max_len, else "
                      "the model's context up to 2048) and were cut from the left") == 3
    wide = from_pretrained("random", random_arch=ARCH | {"max_position_embeddings": 4096}, seed=0)
    assert evaluate(wide, tok, items, mode="label", template="choice", batch_size=2).truncated == 0
    assert evaluate(wide, tok, items, mode="label", template="choice", batch_size=2, max_len=150).truncated == 1
    assert length_budget(wide) == 2048 and length_budget(wide, 8192) == 4096 and length_budget(short, 100) == 100
    assert _fit([1, 2, 3], 0) == ([3], True)  # a continuation filling the budget keeps the last context token
