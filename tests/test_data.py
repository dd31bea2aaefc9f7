"""Loaders (every format, every bad-data message), templates, loss masks, packing, mixing, resumable stream."""

import json
from collections import Counter

import numpy as np
import pytest

from comoe_jax.data import (
    DataError,
    TrainStream,
    by_row,
    encode,
    encode_pair,
    load_source,
    load_sources,
    multiple_choice,
    render,
    render_cloze,
    tokenize,
    tokenize_rows,
)
from comoe_jax.data.loaders import MIX_DIR, load_bigbench, load_hf_dataset, load_jsonl, load_llm_adapters
from comoe_jax.loading import byte_tokenizer


def _write(path, text):
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- loaders


def test_committed_mix_has_four_tasks_and_disjoint_splits():
    splits = {s: load_source("mix", s) for s in ("train", "validation", "test")}
    for split, size in (("train", 1000), ("validation", 100), ("test", 200)):
        assert Counter(ex.task for ex in splits[split]) == {t: size for t in
                                                           ("social_iqa", "strategyqa", "math_qa", "winowhy")}
    questions = [{(ex.task, ex.instruction) for ex in exs} for exs in splits.values()]
    assert not (questions[0] & questions[2]) and not (questions[1] & questions[2])
    ex = splits["test"][0]
    assert ex.is_choice and ex.answer in ex.labels and len(ex.options) == len(ex.labels)
    assert (MIX_DIR / "README.md").exists()


def test_jsonl_loader_and_its_errors(tmp_path):
    good = _write(tmp_path / "qa.jsonl", '{"question": "2+2?", "options": ["3", "4"], "answer": "4"}\n\n'
                                         '{"instruction": "Say hi", "answer": "hi", "task": "greet"}\n')
    first, second = load_jsonl(good)
    assert (first.task, first.labels, first.answer, first.options) == ("qa", ("A", "B"), "B", ("3", "4"))
    assert (second.task, second.labels, second.response) == ("greet", (), "hi")
    cases = {
        '{"question": "x", "answer": "y"\n': r"bad\.jsonl:1: malformed JSON",
        '{"question": "x"}\n': r"bad\.jsonl:1: missing field 'answer'",
        '{"answer": "y"}\n': r"bad\.jsonl:1: missing field 'instruction' \(or 'question'; or a 'prompt'",
        '{"q": 1}\n{"question": "x", "options": ["a", "b"], "answer": "c"}\n': r"bad\.jsonl:1: missing field",
        '{"question": "x", "options": ["a", "b"], "answer": "c"}\n': r"bad\.jsonl:1: field 'answer' 'c' is not among "
                                                                     r"the options \['a', 'b'\]",
        '{"question": "x", "options": [], "answer": "c"}\n': r"bad\.jsonl:1: field 'options' has 0 option\(s\)",
        '{"question": "x", "options": ["a", "a"], "answer": "a"}\n': r"field 'options' repeats an option",
        '{"question": "x", "options": "a,b", "answer": "a"}\n': r"field 'options' should be a list",
        '[1, 2]\n': r"bad\.jsonl record 0: expected a JSON object, got int",
        "\n": r"bad\.jsonl: no examples",
    }
    for text, message in cases.items():
        with pytest.raises(DataError, match=message):
            load_jsonl(_write(tmp_path / "bad.jsonl", text))
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_mmlu_style_choices_and_answer_lists(tmp_path):
    rows = [{"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo"], "answer": 1},
            {"question": "2+2?", "options": ["3", "4"], "answer": "B"},
            {"question": "2+3?", "options": ["4", "5"], "answer": "5"},
            {"question": "Name a prime.", "answer": ["2", "3", "5"]}]
    mmlu, letter, text, free = load_jsonl(_write(tmp_path / "mc.jsonl", "\n".join(map(json.dumps, rows))))
    assert (mmlu.options, mmlu.answer) == (("Rome", "Paris", "Oslo"), "B")
    assert (letter.answer, text.answer) == ("B", "B")
    assert (free.answer, free.also_correct, free.is_choice) == ("2", ("3", "5"), False)
    cases = {
        '{"question": "x", "choices": ["a", "b"], "answer": 2}': r"mc\.jsonl:1: field 'answer' is index 2, but there "
                                                                 r"are 2 options \(0 to 1\)",
        '{"question": "x", "choices": ["1", "0"], "answer": 0}': r"field 'answer' 0 is ambiguous",
        '{"question": "x", "choices": "a b", "answer": 0}': r"field 'choices' should be a list",
        '{"question": "x", "answer": []}': r"field 'answer' should be text or a non-empty list",
    }
    for line, message in cases.items():
        with pytest.raises(DataError, match=message):
            load_jsonl(_write(tmp_path / "mc.jsonl", line))


def test_llm_adapters_loader(tmp_path):
    folder = tmp_path / "ARC-Easy"
    folder.mkdir()
    records = [
        {"instruction": "Please choose the correct answer to the question: Which is a metal?\n\nAnswer1: iron "
                        "Answer2: wood\n\nAnswer format: answer1/answer2", "input": "",
         "output": "the correct answer is answer1", "answer": "answer1"},
        {"instruction": "Please choose ...\n\nAnswer format: answer1/answer2", "input": "ctx",
         "output": "the correct answer is answer2", "answer": "answer2"},
    ]
    path = _write(folder / "test.json", json.dumps(records))
    a, b = load_llm_adapters(path)
    assert a.task == "ARC-Easy" and a.labels == ("answer1", "answer2") and a.answer == "answer1"
    assert a.response_prefix == "the correct answer is " and b.context == "ctx"
    math = _write(tmp_path / "gsm8k.json", json.dumps([{"instruction": "1+1?", "input": "", "output": "2",
                                                        "answer": 2}]))
    (m,) = load_llm_adapters(math)
    assert m.task == "gsm8k" and m.labels == () and m.answer == "2"
    bad = dict(records[0], answer="answer3")
    with pytest.raises(DataError, match=r"test\.json record 1: field 'answer' 'answer3' is not among the labels "
                                        r"answer1/answer2"):
        load_llm_adapters(_write(folder / "test.json", json.dumps([records[0], bad])))
    with pytest.raises(DataError, match=r"record 0: missing field 'instruction'"):
        load_llm_adapters(_write(folder / "test.json", json.dumps([{"answer": "x"}])))
    with pytest.raises(DataError, match=r"test\.json:1: malformed JSON"):
        load_llm_adapters(_write(folder / "test.json", "[{"))
    with pytest.raises(DataError, match="expected a JSON list"):
        load_llm_adapters(_write(folder / "test.json", "{}"))


def test_bigbench_loader(tmp_path):
    task = {"name": "toy", "examples": [
        {"input": "Is fire hot?", "target_scores": {"Yes": 1, "No": 0}},
        {"input": "Name a colour.", "target": ["red", "blue"]},
    ]}
    folder = tmp_path / "toy"
    folder.mkdir()
    _write(folder / "task.json", json.dumps(task))
    choice, free = load_bigbench(folder)
    assert (choice.task, choice.options, choice.answer) == ("toy", ("Yes", "No"), "A")
    assert free.answer == "red" and free.also_correct == ("blue",) and not free.is_choice
    task["examples"][0]["target_scores"] = {"Yes": 1, "No": 1}
    with pytest.raises(DataError, match=r"example 0: field 'target_scores' marks 2 options correct"):
        load_bigbench(_write(folder / "task.json", json.dumps(task)))
    task["examples"] = [{"input": "x"}]
    with pytest.raises(DataError, match=r"example 0: no options \(field 'target_scores'\) and no field 'target'"):
        load_bigbench(_write(folder / "task.json", json.dumps(task)))
    (folder / "sub").mkdir()
    _write(folder / "sub" / "task.json", "{}")
    with pytest.raises(DataError, match="it has subtasks, load one of: sub"):
        load_bigbench(_write(folder / "task.json", json.dumps({"name": "toy"})))


def test_hf_dataset_loader(tmp_path):
    datasets = pytest.importorskip("datasets")
    arc = datasets.Dataset.from_dict({"question": ["Which is a metal?"], "answerKey": ["2"],
                                      "choices": [{"label": ["1", "2"], "text": ["wood", "iron"]}]})
    piqa = datasets.Dataset.from_dict({"goal": ["Open a jar"], "sol1": ["twist"], "sol2": ["eat"], "label": [0]})
    siqa = datasets.Dataset.from_dict({"context": ["Ann won."], "question": ["How does Ann feel?"],
                                       "answerA": ["sad"], "answerB": ["happy"], "answerC": ["bored"], "label": ["2"]})
    boolq = datasets.Dataset.from_dict({"question": ["is the sky blue"], "answer": [True], "passage": ["It is."]})
    wino = datasets.Dataset.from_dict({"sentence": ["The cup fell off the table because _ was round."],
                                       "option1": ["the cup"], "option2": ["the table"], "answer": ["1"]})
    hella = datasets.Dataset.from_dict({"activity_label": ["Cooking"], "ctx": ["She cracks an egg"],
                                        "endings": [["into a bowl.", "into the sky.", "at a cat.", "on a car."]],
                                        "label": ["0"]})
    datasets.DatasetDict({"test": arc}).save_to_disk(tmp_path / "arc")
    for name, ds in (("piqa", piqa), ("siqa", siqa), ("boolq", boolq), ("wino", wino), ("hella", hella)):
        ds.save_to_disk(tmp_path / name)
    (a,) = load_hf_dataset(tmp_path / "arc", "test")
    assert a.task == "arc" and a.options == ("wood", "iron") and a.answer == "B"
    assert load_hf_dataset(tmp_path / "piqa", "test")[0].answer == "A"
    assert load_hf_dataset(tmp_path / "siqa", "test")[0].answer == "B"
    b = load_hf_dataset(tmp_path / "boolq", "test")[0]
    assert (b.labels, b.answer, b.context) == (("true", "false"), "true", "It is.")
    assert load_hf_dataset(tmp_path / "wino", "test")[0].answer == "A"
    assert load_hf_dataset(tmp_path / "hella", "test")[0].instruction.startswith("Cooking. She cracks")
    with pytest.raises(DataError, match=r"split 'train' not found; the dataset has test"):
        load_hf_dataset(tmp_path / "arc", "train")
    broken = datasets.Dataset.from_dict({"question": ["q"], "answerKey": ["9"],
                                         "choices": [{"label": ["1", "2"], "text": ["a", "b"]}]})
    broken.save_to_disk(tmp_path / "broken")
    with pytest.raises(DataError, match=r"broken row 0: field 'answerKey' '9' is not among"):
        load_hf_dataset(tmp_path / "broken", "test")
    mmlu = datasets.Dataset.from_dict({"question": ["Capital of France?"], "subject": ["geo"],
                                       "choices": [["Rome", "Paris", "Oslo", "Bern"]], "answer": [1]})
    mmlu.save_to_disk(tmp_path / "mmlu")
    m = load_hf_dataset(tmp_path / "mmlu", "test")[0]
    assert (m.options[m.answer_index], m.answer) == ("Paris", "B")
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        load_hf_dataset(tmp_path, "test")
    # hf:<folder>@<split>, as the split-not-found message suggests, passes the config check and reads that split
    from comoe_jax.config import Config, split_less, validate
    from comoe_jax.data import load_source

    cfg = Config()
    cfg.model.path, cfg.data.train = "random", (f"hf:{tmp_path / 'arc'}@test",)
    validate(cfg)
    assert split_less(cfg.data.train[0]) and load_source(cfg.data.train[0], "train")[0].answer == "B"
    with pytest.raises(DataError, match=r"x\.jsonl: hf: reads a folder .* or a data file ending in .* use jsonl:"):
        load_hf_dataset(_write(tmp_path / "x.jsonl", "{}"), "test")


def test_hub_data_files_parquet_csv_tsv_arrow(tmp_path):
    """The files a hub dataset repository holds read with the same column adapters as a save_to_disk folder."""
    datasets = pytest.importorskip("datasets")
    arc = datasets.Dataset.from_dict({"question": ["Which is a metal?", "Which is a gas?"], "answerKey": ["B", "A"],
                                      "choices": [{"label": ["A", "B"], "text": ["wood", "iron"]},
                                                  {"label": ["A", "B"], "text": ["air", "rock"]}]})
    alpaca = datasets.Dataset.from_dict({"instruction": ["Name a colour.", "Add 2 and 3"], "input": ["", ""],
                                         "output": ["Blue.", "5"]})
    arc.to_parquet(tmp_path / "arc.parquet")
    alpaca.to_csv(tmp_path / "alpaca.csv", index=False)
    alpaca.to_csv(tmp_path / "alpaca.tsv", index=False, sep="\t")
    alpaca.save_to_disk(tmp_path / "saved")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    expected = [(ex.instruction, ex.options, ex.answer) for ex in load_jsonl(_write(
        tmp_path / "arc.jsonl", "\n".join(json.dumps(r) for r in arc.to_list())))]
    parquet = load_source(f"hf:{tmp_path / 'arc.parquet'}", "test")
    assert [(ex.instruction, ex.options, ex.answer) for ex in parquet] == expected
    assert [ex.task for ex in parquet] == ["arc", "arc"] and parquet[1].source.endswith("arc.parquet row 1")
    for path in (tmp_path / "alpaca.csv", tmp_path / "alpaca.tsv", arrow):
        rows = load_hf_dataset(path, "validation")  # a file has no splits: any split reads it, as JSONL
        assert [(ex.instruction, ex.response) for ex in rows] == [("Name a colour.", "Blue."), ("Add 2 and 3", "5")]
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable parquet file \("):
        load_hf_dataset(_write(tmp_path / "broken.parquet", "not parquet at all"), "train")
    with pytest.raises(DataError, match=r"notes\.txt: hf: reads a folder .*\.parquet, \.csv, \.tsv, \.arrow$"):
        load_hf_dataset(_write(tmp_path / "notes.txt", "x"), "train")


def test_json_list_files_read_like_jsonl(tmp_path):
    """Stanford Alpaca's alpaca_data.json (a pretty-printed JSON list) and to_json(lines=False) exports."""
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"question": "2+2?", "options": ["3", "4"], "answer": "B", "task": "sums"}]
    lines = load_jsonl(_write(tmp_path / "data.jsonl", "\n".join(map(json.dumps, rows))))
    for text in (json.dumps(rows, indent=4), json.dumps(rows), "\n  " + json.dumps(rows) + "\n"):
        listed = load_jsonl(_write(tmp_path / "data.json", text))
        assert [(e.instruction, e.options, e.answer, e.response, e.task) for e in listed] == \
               [(e.instruction, e.options, e.answer, e.response, e.task) for e in lines]
        assert listed[1].source.endswith("data.json record 1")
    damaged = json.dumps(rows, indent=4)[:-30]
    with pytest.raises(DataError, match=r"data\.json:1[0-9]: malformed JSON"):
        load_jsonl(_write(tmp_path / "data.json", damaged))
    with pytest.raises(DataError, match=r"data\.json record 1: missing field 'answer'"):
        load_jsonl(_write(tmp_path / "data.json", json.dumps([rows[0], {"question": "x"}])))
    with pytest.raises(DataError, match=r"data\.json:1: expected a JSON object, got list"):  # JSON lines, a list first
        load_jsonl(_write(tmp_path / "data.json", '["a"]\n{"question": \n'))


def test_sft_records_alpaca_and_chat_messages(tmp_path):
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Translate", "input": "chat", "output": "cat", "task": "fr"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"}]},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                          {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "12"}]}]
    alpaca, with_input, chat, multi = load_jsonl(_write(tmp_path / "sft.jsonl", "\n".join(map(json.dumps, rows))))
    assert (alpaca.response, alpaca.answer, alpaca.labels, alpaca.task) == ("Blue.", "Blue.", (), "sft")
    assert (with_input.context, with_input.task) == ("chat", "fr")
    assert chat.messages == (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"))
    assert (chat.instruction, chat.context, chat.response) == ("Hi", "Be brief.", "Hello!")
    assert multi.instruction == "User: 2+2?\nAssistant: 4\nUser: times 3?" and multi.answer == "12"
    bad = {"ends-with-user": ([{"role": "user", "content": "x"}], r"last message is from 'user'"),
           "bad-role": ([{"role": "bot", "content": "x"}], r"messages\[0\] should be an object with 'role'"),
           "no-user": ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
                       "no user message"),
           "empty": ([], "non-empty list")}
    for name, (messages, message) in bad.items():
        path = _write(tmp_path / f"{name}.jsonl", json.dumps({"messages": messages}))
        with pytest.raises(DataError, match=rf"{name}\.jsonl:1: .*{message}"):
            load_jsonl(path)


def test_benchmark_columns_in_jsonl(tmp_path):
    """A benchmark exported with datasets' to_json keeps its columns: JSONL reads them as hf: does."""
    rows = [{"id": "Mercury_1", "question": "Which is a metal?", "answerKey": "2",
             "choices": {"label": ["1", "2"], "text": ["wood", "iron"]}},
            {"goal": "Open a jar", "sol1": "twist", "sol2": "eat", "label": 0},
            {"sentence": "The cup fell off the table because _ was round.", "option1": "the cup",
             "option2": "the table", "answer": "1"}]
    arc, piqa, wino = load_jsonl(_write(tmp_path / "exported.jsonl", "\n".join(map(json.dumps, rows))))
    assert (arc.options, arc.answer, arc.task, arc.source.endswith("exported.jsonl:1")) == (("wood", "iron"), "B",
                                                                                         "exported", True)
    assert (piqa.options, piqa.answer) == (("twist", "eat"), "A")
    assert (wino.options, wino.answer) == (("the cup", "the table"), "A")
    for name, row, message in [
            ("arc-no-labels", {"question": "q", "answerKey": "A", "choices": {"text": ["a", "b"]}},
             r"arc-no-labels\.jsonl:1: unexpected value \(KeyError: 'label'\)"),
            ("piqa-label", {"goal": "g", "sol1": "a", "sol2": "b", "label": 7},
             r"piqa-label\.jsonl:1: field 'label' is 7; with 2 options it should be 0 to 1"),
            ("not-an-object", [[1, 2]], r"not-an-object\.jsonl record 0: expected a JSON object, got list")]:
        with pytest.raises(DataError, match=message):
            load_jsonl(_write(tmp_path / f"{name}.jsonl", json.dumps(row)))


def test_sharegpt_and_prompt_completion_records(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello!"}]},
            {"prompt": "The capital of France is", "completion": " Paris.", "task": "capitals"},
            {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}]
    share, text, conversational = load_jsonl(_write(tmp_path / "sft.jsonl", "\n".join(map(json.dumps, rows))))
    assert share.messages == (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"))
    assert (share.instruction, share.context, share.response, share.task) == ("Hi", "Be brief.", "Hello!", "sft")
    assert (text.instruction, text.response, text.answer, text.task) == ("The capital of France is", " Paris.",
                                                                        "Paris.", "capitals")
    assert render(text, "raw") == ("The capital of France is", " Paris.")  # as written: nothing added
    ids, is_response, _ = encode(byte_tokenizer(), *render(text, "raw"), seq_len=64)
    assert byte_tokenizer().decode(ids[is_response == 1]) == " Paris.</s>"
    assert conversational.messages == (("user", "2+2?"), ("assistant", "4"))
    item = multiple_choice("t", "Pick one", ["x", "y"], "y", "m.jsonl:3")
    with pytest.raises(DataError, match=r"m\.jsonl:3: data\.template=raw .* a multiple-choice item needs alpaca"):
        render(item, "raw")
    bad = {"sharegpt-role": ({"conversations": [{"from": "bot", "value": "x"}]},
                             r"conversations\[0\] should be an object with 'from' \(system, human, user, gpt"),
           "sharegpt-empty": ({"conversations": []}, r"field 'conversations' should be a non-empty list of \{from, "),
           "completion-empty": ({"prompt": "p", "completion": "  "}, r"field 'completion' is empty"),
           "completion-object": ({"prompt": "p", "completion": {"a": 1}}, r"field 'completion' should be text"),
           "prompt-empty": ({"prompt": " ", "completion": "x"}, r"field 'prompt' is empty"),
           "mixed-kinds": ({"prompt": [{"role": "user", "content": "q"}], "completion": "a"},
                           r"fields 'prompt' and 'completion' should both be texts or both lists of \{role, content\} "
                           r"messages, got list and str"),
           "completion-bad-message": ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "x"}]},
                                      r"completion\[0\] should be an object with 'role'"),
           "sharegpt-no-user": ({"conversations": [{"from": "system", "value": "s"}, {"from": "gpt", "value": "a"}]},
                                r"field 'conversations' has no user message"),
           "nothing-known": ({"text": "x"}, r"missing field 'instruction' \(or 'question'; or a 'prompt' and "
                                            r"'completion' pair, or chat 'messages' / 'conversations'\)")}
    for name, (record, message) in bad.items():
        path = _write(tmp_path / f"{name}.jsonl", json.dumps(record))
        with pytest.raises(DataError, match=rf"{name}\.jsonl:1: {message}"):
            load_jsonl(path)


def test_chat_template_masks_exactly_the_assistant_reply():
    from comoe_jax.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."}]
    from comoe_jax.data.records import Example

    ex = Example(task="t", instruction="Capital of France?", answer="Paris.", output="Paris.", context="Be brief.",
                 messages=tuple((m["role"], m["content"]) for m in conversation))
    prompt, response = render(ex, "chat", tok)
    assert prompt == tok.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=False)
    assert response == "Paris."  # the template's end of turn is the EOS the encoder appends
    ids, mask, cut = encode(tok, prompt, response, 64, special_tokens=False)
    whole = tok.apply_chat_template(conversation, tokenize=False).rstrip("\n")
    assert ids.tolist() == tok(whole, add_special_tokens=False)["input_ids"] and not cut
    assert tok.decode(ids[mask.astype(bool)]) == "Paris.<|im_end|>"
    # a plain instruction item becomes the user's turn; options listed as in the other templates
    item = Example(task="t", instruction="Pick one", answer="B", options=("x", "y"), labels=("A", "B"))
    prompt, response = render(item, "chat", tok)
    assert "<|im_start|>user\nPlease choose the correct answer to the question: Pick one\n(A) x\n(B) y<|im_end|>" \
        in prompt and prompt.endswith("<|im_start|>assistant\n") and response == "B"
    with pytest.raises(DataError, match="data.template=chat needs a tokenizer with a chat template"):
        render(item, "chat", byte_tokenizer())


# Chat templates as their models ship them (shortened to what shapes a conversation).
_MISTRAL_V1 = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 "
               "== 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') "
               "}}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{%"
               " elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_excep"
               "tion('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
_MISTRAL_V3 = ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set"
               ' loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}{{- bos_'
               "token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}{%- if loop.last and"
               " system_message is defined %}{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INS"
               "T]' }}{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}{%- elif message['ro"
               "le'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token}}{%- endif %}{%- endfor %}")
_LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_hea"
           "der_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content "
           "= bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|st"
           "art_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
_GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not support"
          "ed') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set rol"
          "e = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '"
          "\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{"
          "'<start_of_turn>model\n'}}{% endif %}")


_PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
         "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif "
         "message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
# Qwen3's handling of reasoning: the last reply is written with its <think> block, earlier ones without.
_QWEN3 = ("{%- for message in messages %}{%- if message.role == 'assistant' %}{%- set content = message.content %}"
          "{%- set reasoning = '' %}{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0]"
          ".rstrip('\n').split('<think>')[-1].lstrip('\n') %}{%- set content = content.split('</think>')[-1]"
          ".lstrip('\n') %}{%- endif %}{%- if loop.last %}{{- '<|im_start|>assistant\n<think>\n' + "
          "reasoning.strip('\n') + '\n</think>\n\n' + content }}{%- else %}{{- '<|im_start|>assistant\n' + content }}"
          "{%- endif %}{{- '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + "
          "'<|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
          "{%- endif %}")


@pytest.mark.parametrize("template, replies, context", [
    (None, (" Four. <|im_end|>", "Eight."), ["<|im_start|>system\nBe brief.", "Doubled?<|im_end|>"]),
    (_MISTRAL_V1, (" Four. <|im_end|>", "Eight."), ["[INST] Be brief.\n\nWhat is 2+2? [/INST]"]),  # system folded
    (_MISTRAL_V3, (" Four.<|im_end|>", " Eight."), ["[INST] Be brief.\n\nWhat is 2+2?[/INST]"]),  # it drops it
    (_LLAMA3, ("Four.<|eot_id|>", "Eight.<|eot_id|>"), ["system<|end_header_id|>\n\nBe brief.<|eot_id|>"]),
    (_GEMMA, ("Four.<end_of_turn>", "Eight.<end_of_turn>"), ["user\nBe brief.\n\nWhat is 2+2?<end_of_turn>"]),
    (_PHI3, (" Four. <|end|>", "Eight.<|end|>\n"), ["<|system|>\nBe brief.<|end|>"]),  # EOS after a last reply
], ids=["chatml", "mistral-v0.1", "mistral-v0.3", "llama3", "gemma", "phi3"])
def test_multi_turn_chat_trains_on_every_reply_or_the_last(template, replies, context):
    from comoe_jax.data import encode_segments, render_segments
    from comoe_jax.data.records import Example
    from comoe_jax.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")  # its EOS is <|im_end|>, appended after the last reply
    if template:  # the real tokenizers have their turn markers as single special tokens
        tok.chat_template = template
        tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                                              "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]"]})
    turns = (("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", " Four. "), ("user", "Doubled?"),
             ("assistant", "Eight."))
    ex = Example(task="t", instruction="Doubled?", answer="Eight.", output="Eight.", context="Be brief.",
                 messages=turns)
    eos = "<|im_end|>"
    for which, trained in (("all", replies), ("last", replies[-1:])):
        segments = render_segments(ex, "chat", tok, which)
        assert [text for text, on in segments if on] == list(trained)
        text = "".join(t for t, _ in segments)
        assert all(piece in text for piece in context)
        ids, mask, cut = encode_segments(tok, segments, 256, special_tokens=False)
        assert tok.decode(ids) == text + eos and not cut  # (a token across a boundary: the generation prompt's split)
        spans = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))  # starts and ends of trained runs
        runs = [tok.decode(ids[a:b]) for a, b in zip(spans[::2], spans[1::2])]
        assert "".join(runs) == "".join(trained) + eos and len(runs) == len(trained)
    # evaluation prompts end where the last reply starts, as training renders it
    prompt, response = render(ex, "chat", tok)
    assert prompt + response == "".join(t for t, _ in render_segments(ex, "chat", tok, "last"))


def test_chat_replies_with_reasoning_and_option_scoring_after_a_spaced_reply():
    from comoe_jax.data import render_cloze, render_segments
    from comoe_jax.data.records import Example
    from comoe_jax.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    tok.chat_template = _QWEN3  # the last reply renders by its text (its reasoning block), earlier ones drop it
    turns = (("user", "Q1"), ("assistant", "<think>\na\n</think>\n\nA1"), ("user", "Q2"),
             ("assistant", "<think>\nhmm\n</think>\n\nA2"))
    ex = Example(task="t", instruction="Q2", answer="A2", output=turns[-1][1], messages=turns)
    segments = render_segments(ex, "chat", tok, "all")
    assert [t for t, on in segments if on] == ["A1<|im_end|>", "<think>\nhmm\n</think>\n\nA2"]
    assert segments[-2][0].endswith("<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")
    # a template with a space before the reply: option texts are scored after it, as training read the reply
    tok.chat_template = _MISTRAL_V3
    item = Example(task="t", instruction="Capital?", answer="A", options=("Paris", "Rome"), labels=("A", "B"))
    prompt, options = render_cloze(item, "chat", tok)
    assert prompt.endswith("[INST] Capital?[/INST]") and options == [" Paris", " Rome"]


def test_hub_datasets_by_name_load_and_stream_through_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import constants

    repo = tmp_path / "acme-sft"  # the repository's files, as the hub would serve them
    repo.mkdir()
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    _write(repo / "train.jsonl", "\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(5)))
    _write(repo / "validation.jsonl", json.dumps(chat))
    calls, real = [], datasets.load_dataset

    def hub(name, subset=None, *, split, streaming=False):
        calls.append((name, subset, split, streaming))
        assert name == "acme/sft"
        return real("json", data_files=str(repo / f"{split}.jsonl"), split="train", streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    train = load_source("hf:acme/sft", "train")
    assert [ex.response for ex in train] == [f"a{i}" for i in range(5)] and train[0].task == "sft"
    assert [ex.instruction for ex in load_sources(["hf:acme/sft"], "train", max_per_task=2)] == ["q0", "q1"]
    (val,) = load_source("hf:acme/sft:chat", "validation")
    assert val.messages[-1] == ("assistant", "Hello") and val.task == "sft_chat"
    (own,) = load_source("hf:acme/sft@validation", "train")  # @split: the hub's split name wins
    assert own.messages[-1] == ("assistant", "Hello") and own.task == "sft"
    assert calls == [("acme/sft", None, "train", False), ("acme/sft", None, "train", True),
                     ("acme/sft", "chat", "validation", False), ("acme/sft", None, "validation", False)]
    monkeypatch.setattr(datasets, "load_dataset", real)  # the real loader, offline, on a dataset never loaded
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"hf:acme/never-loaded: no such local folder, and the hub dataset cannot be "
                                        r"loaded for split 'train'"):
        load_source("hf:acme/never-loaded", "train")


def test_source_strings_and_task_filters(tmp_path):
    with pytest.raises(DataError, match="unknown built-in task\\(s\\) poetry"):
        load_source("builtin:add+poetry", "train")
    with pytest.raises(DataError, match="use 'mix', 'builtin' or '<format>:<path>'"):
        load_source("csv:x", "train")
    got = load_sources(["mix"], "test", tasks=("winowhy", "math_qa"), max_per_task=3)
    assert Counter(ex.task for ex in got) == {"winowhy": 3, "math_qa": 3}
    with pytest.raises(DataError, match="data.tasks names chess, not found"):
        load_sources(["mix"], "test", tasks=("chess",))


# --------------------------------------------------------------------------- templates and masks


def test_templates_render_options_and_answers():
    ex = load_source("mix", "test")[0]
    prompt, response = render(ex, "choice")
    assert prompt.startswith("Please choose the correct answer to the question: ")
    assert "\n(A) " in prompt and prompt.endswith("\nAnswer:") and response == " " + ex.answer
    prompt, response = render(ex, "alpaca")
    assert "### Instruction:" in prompt and prompt.endswith("### Response:\n") and response == ex.answer
    cloze, continuations = render_cloze(ex, "choice")
    assert "(A)" not in cloze and continuations == [" " + o for o in ex.options]
    free = load_source("builtin:add", "test")[0]
    assert render(free, "plain") == (f"Q: {free.instruction}\nA: ", free.answer)


def test_encode_masks_only_the_response_and_eos():
    tok = byte_tokenizer()
    ids, is_response, cut = encode(tok, "Q: hi\nA: ", "yo", seq_len=16)
    assert len(ids) == len("Q: hi\nA: ") + 3 and not cut
    assert tok.decode(ids[is_response == 1]) == "yo</s>"
    ids, _, cut = encode(tok, "Q: hi\nA: ", "a long answer", seq_len=10)
    assert len(ids) == 11 and cut


def sentencepiece_style_tokenizer():
    """A Llama-2 / Mistral style tokenizer (transformers' LlamaTokenizer: BPE over a '▁' word-start marker
    written before the first word of a text, newlines as byte fallback), trained here on a few sentences."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    words = "below is an instruction that describes a task write the response what capital of france paris".split()
    text = [" ".join(words[i:] + words[:i]).capitalize() + " ### Instruction: Response: Answer: A B" for i in
            range(len(words))]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    bpe.train_from_iterator(text * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]])
    tok.pad_token = tok.eos_token
    return tok


@pytest.mark.parametrize("prompt, response", [
    ("### Instruction:\nWhat is the capital of France?\n\n### Response:\n", "Paris"),
    ("What is the capital of France? Answer:", " A"),
])
def test_response_ids_are_those_of_the_whole_text(prompt, response):
    """A SentencePiece tokenizer starts every text with a word marker: the response encoded alone would begin
    with one it does not have after the prompt (so the model would be trained and scored on ids it never reads)."""
    tok = sentencepiece_style_tokenizer()
    whole = tok(prompt + response)["input_ids"]
    start = len(tok(prompt)["input_ids"])
    if response == "Paris":  # the case the split exists for
        assert tok(response, add_special_tokens=False)["input_ids"] != whole[start:]
    ids, is_response, cut = encode(tok, prompt, response, seq_len=128)
    assert ids.tolist() == whole + [tok.eos_token_id] and not cut
    assert is_response.tolist() == [0] * start + [1] * (len(whole) - start + 1)
    assert tok.decode(ids[start:-1]) == response.strip()


def test_option_ids_are_those_of_the_whole_text():
    from comoe_jax.evaluate import label_predictions, loglik_predictions

    class Recorder:
        max_len = 2048  # the model's context (Scorer.max_len)

        def option_logprobs(self, contexts, options):
            self.contexts, self.options = contexts, options
            return [np.arange(len(o), dtype=float) for o in options]

    tok, scorer = sentencepiece_style_tokenizer(), Recorder()
    item = multiple_choice("t", "What is the capital of France?", ["Paris", "France"], "Paris", "t.jsonl:1")
    for predict, template in ((loglik_predictions, "alpaca"), (label_predictions, "choice")):
        predict(scorer, tok, [item], template)
        prompt, continuations = render_cloze(item, template) if predict is loglik_predictions else \
            (render(item, template)[0], [" " + label for label in item.labels])
        assert scorer.contexts == [tok(prompt)["input_ids"]]
        assert scorer.options == [[tok(prompt + c)["input_ids"][len(scorer.contexts[0]):] for c in continuations]]


def test_a_token_across_the_prompt_boundary_falls_back_to_the_response_alone():
    from comoe_jax.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")  # byte-level BPE: "Answer: Paris" is "Answer", ":", " Paris"
    prompt_ids, response_ids = encode_pair(tok, "Answer: ", "Paris")
    assert prompt_ids == tok("Answer: ")["input_ids"]
    assert response_ids == tok("Paris", add_special_tokens=False)["input_ids"]
    assert encode_pair(tok, "Answer:", " Paris")[1] == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert encode_pair(tok, "Answer:", "") == (tok("Answer:")["input_ids"], [])


def test_tokenizer_without_pad_token_is_refused():
    tok = byte_tokenizer()
    tok.pad_token = None
    with pytest.raises(DataError, match="no pad token"):
        encode(tok, "a", "b", 8)


def test_truncation_is_counted_and_empty_responses_left_out():
    tok = byte_tokenizer()
    examples = load_source("builtin:upper", "train")[:16]
    _, counts = tokenize(tok, examples, "alpaca", 180, ("upper",))
    assert counts.kept["upper"] + counts.dropped["upper"] == 16 and counts.dropped["upper"] > 0
    assert counts.truncated["upper"] == counts.kept["upper"]
    assert "left out" in counts.summary(180)
    assert counts.summary(180).endswith("\nwarning: every example of upper is cut at data.seq_len=180 (the model "
                                        "never sees a whole answer and its end of sequence); raise data.seq_len")
    _, whole = tokenize(tok, examples, "alpaca", 2048, ("upper",))
    assert not whole.truncated["upper"] and "warning" not in whole.summary(2048)
    with pytest.raises(DataError, match="no usable training examples for task\\(s\\) upper"):
        tokenize(tok, examples, "alpaca", 20, ("upper",))


def _stream(packing, seed=0, weights=None, batch_size=4, seq_len=64):
    tok = byte_tokenizer()
    examples = load_source("builtin:add+antonym", "train")[:64]
    records, counts = tokenize(tok, examples, "plain", seq_len, ("add", "antonym"))
    assert not sum(counts.truncated.values())
    return tok, TrainStream(by_row(records, batch_size), batch_size=batch_size, seq_len=seq_len, seed=seed,
                            packing=packing, pad_id=tok.pad_token_id, weights=weights,
                            task_sizes={t: len(r) for t, r in records.items()})


@pytest.mark.parametrize("packing", [False, True])
def test_batches_keep_examples_apart(packing):
    tok, stream = _stream(packing)
    shared = []
    for _ in range(3):
        b = stream.next_batch()
        assert b["input_ids"].shape == (4, 64)
        np.testing.assert_array_equal(b["input_ids"][:, 1:], b["targets"][:, :-1])
        for row in range(4):
            seg = b["segment_ids"][row]
            for s in set(seg[seg > 0]):
                where = np.flatnonzero(seg == s)
                assert np.array_equal(b["positions"][row][where], np.arange(len(where)))  # restart per example
                response = b["targets"][row][where][b["loss_mask"][row][where] == 1]
                assert tok.decode(response).endswith("</s>")  # the answer and its EOS, nothing else
                assert len(set(b["task_ids"][row][where])) == 1
            assert (b["loss_mask"][row][seg == 0] == 0).all() and (b["task_ids"][row][seg == 0] == -1).all()
        shared.append(b["segment_ids"].max() > 1)
    assert any(shared) == packing  # packed rows hold several examples


def test_stream_resumes_exactly_and_mixes_by_weight():
    _, stream = _stream(True, seed=3)
    for _ in range(2):
        stream.next_batch()
    state = json.loads(json.dumps(stream.get_state()))  # what a checkpoint stores
    expected = [stream.next_batch() for _ in range(3)]
    _, again = _stream(True, seed=3)
    again.set_state(state)
    for want in expected:
        got = again.next_batch()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    _, other = _stream(True, seed=4)
    assert not np.array_equal(other.next_batch()["input_ids"], _stream(True, seed=3)[1].next_batch()["input_ids"])
    _, skewed = _stream(False, weights={"add": 3.0, "antonym": 1.0}, batch_size=8)
    tasks = np.concatenate([skewed.next_batch()["task_ids"][:, 0] for _ in range(25)])
    assert 0.65 < np.mean(tasks == 0) < 0.85
    with pytest.raises(DataError, match="data.mix_weights names task\\(s\\) chess"):
        _stream(False, weights={"chess": 1.0})


def test_every_batch_mixes_tasks_in_an_order_of_its_own_and_small_tasks_keep_their_share():
    """grain's weighted mix interleaves tasks in one fixed pattern: without the window shuffle every row
    of a batch held the same task, and a task with fewer examples than rows lived in only some rows."""
    from comoe_jax.data import assign_rows

    examples = (load_source("builtin:add+antonym+reverse", "train")[:48]
                + [ex for ex in load_source("builtin:sort", "train")[:2]])
    tasks = ("add", "antonym", "reverse", "sort")
    assert sorted(Counter(ex.task for ex in examples).items()) == [("add", 16), ("antonym", 16), ("reverse", 16),
                                                                   ("sort", 2)]
    rows = assign_rows(examples, 8, seed=0)
    for task in tasks:
        mine = [r for ex, rs in zip(examples, rows) if ex.task == task for r in rs]
        assert sorted(set(mine)) == list(range(8))  # every row holds every task, the small one lent around
        if task != "sort":
            assert Counter(mine).most_common()[0][1] - Counter(mine).most_common()[-1][1] <= 1
    assert rows != assign_rows(examples, 8, seed=1)  # a seeded order, not the file's
    tok = byte_tokenizer()
    records, _ = tokenize_rows(tok, examples, rows, "plain", 96, tasks)
    stream = TrainStream(records, batch_size=8, seq_len=96, seed=0, packing=False, pad_id=tok.pad_token_id,
                         task_sizes={t: 1 for t in tasks})  # equal weights
    first = np.stack([stream.next_batch()["task_ids"][:, 0] for _ in range(64)])  # [steps, rows]
    assert np.mean([len(set(step)) > 1 for step in first]) > 0.9  # batches hold several tasks
    assert not all(np.array_equal(first[:, 0], first[:, r]) for r in range(1, 8))  # rows differ
    share = np.bincount(first.ravel(), minlength=4) / first.size
    np.testing.assert_allclose(share, 0.25, atol=0.05)  # sort (2 examples, batch of 8) keeps its quarter


@pytest.mark.parametrize("packing", [False, True])
def test_processes_feeding_their_own_rows_make_up_the_single_process_batch(packing, tiny_config):
    from comoe_jax.trainer import training_stream

    cfg = tiny_config(data__packing=packing, train__batch_size=6)
    tok = byte_tokenizer()
    whole = training_stream(cfg, tok, lambda text: None)
    parts = [training_stream(cfg, tok, lambda text: None, rows=rows) for rows in ([0, 1, 2], [3, 4, 5])]
    assert whole.rows == list(range(6)) and [p.rows for p in parts] == [[0, 1, 2], [3, 4, 5]]
    for step in range(4):
        want = whole.next_batch()
        got = [p.next_batch() for p in parts]
        for k in want:
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k], err_msg=f"{k} step {step}")
    # each part tokenizes only its share, and its saved position restores the whole stream's rows
    state = {**parts[0].get_state(), **parts[1].get_state()}
    resumed = training_stream(cfg, tok, lambda text: None)
    resumed.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(resumed.next_batch()["input_ids"], whole.next_batch()["input_ids"])


@pytest.mark.parametrize("packing", [False, True])
def test_the_largest_seed_streams_and_the_model_vocabulary_is_checked(packing, tiny_config):
    """grain takes 32-bit seeds: the rows' derived seeds wrap instead of overflowing at train.seed = 2**32 - 1
    (which differs from seed 0's stream); a tokenizer whose ids the model has no embedding for is refused."""
    from comoe_jax.data import DataError
    from comoe_jax.trainer import training_stream

    tok = byte_tokenizer()
    first = {seed: training_stream(tiny_config(data__packing=packing, train__seed=seed, train__batch_size=6), tok,
                                   lambda text: None).next_batch()["input_ids"] for seed in (0, 2**32 - 1)}
    assert first[0].shape == first[2**32 - 1].shape and not np.array_equal(first[0], first[2**32 - 1])
    with pytest.raises(DataError, match=r"the tokenizer gives token id \d+ \(259 tokens\), but the model random has "
                                        r"vocab_size=100: the tokenizer does not belong to this model"):
        training_stream(tiny_config(data__packing=packing), tok, lambda text: None, vocab_size=100)


def test_byte_order_mark_json_booleans_and_empty_replies(tmp_path):
    rows = [{"question": "Is water wet?", "options": ["true", "false"], "answer": True},
            {"instruction": "Is ice cold?", "output": False},
            {"question": "2+2?", "options": ["3", "4"], "answer": 1}]
    text = "\n".join(map(json.dumps, rows))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())  # as Windows editors save UTF-8
    wet, ice, four = load_jsonl(bom)
    assert (wet.instruction, wet.options[wet.answer_index]) == ("Is water wet?", "true")  # JSON true, not "True"
    assert ice.response == "false" and four.options[four.answer_index] == "4"
    bom.write_bytes(b"\xef\xbb\xbf{}\n\xff")
    with pytest.raises(DataError, match=r"bom\.jsonl:2: not UTF-8 text \(byte 0xff at offset 6\)"):
        load_jsonl(bom)
    reply = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}
    with pytest.raises(DataError, match=r"empty\.jsonl:1: the assistant's last reply in field 'messages' is empty"):
        load_jsonl(_write(tmp_path / "empty.jsonl", json.dumps(reply)))
    middle = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
                           {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    (ex,) = load_jsonl(_write(tmp_path / "middle.jsonl", json.dumps(middle)))  # context, unless it is trained on
    from comoe_jax.data import render_segments
    from comoe_jax.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    assert [t for t, on in render_segments(ex, "chat", tok, "last") if on] == ["4"]
    with pytest.raises(DataError, match=r"middle\.jsonl:1: assistant reply 1 of 2 is empty, and data\.chat_replies="
                                        r"all trains on every reply"):
        render_segments(ex, "chat", tok, "all")


def test_the_data_fingerprint_is_about_contents_not_paths(tmp_path):
    from comoe_jax.data import data_fingerprint

    text = "\n".join(json.dumps({"question": f"{i}?", "answer": str(i)}) for i in range(5))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    here, there = _write(tmp_path / "a" / "qa.jsonl", text), _write(tmp_path / "b" / "qa.jsonl", text)
    first, second = load_jsonl(here), load_jsonl(there)
    assert first[0].source != second[0].source
    assert data_fingerprint(first) == data_fingerprint(second)  # another checkout, machine or host
    assert data_fingerprint(first[:4]) != data_fingerprint(first)
    assert data_fingerprint(first)["examples"] == {"qa": 5}


def test_a_position_saved_without_a_fingerprint_is_resumed_and_flagged():
    _, stream = _stream(True, seed=3)
    stream.fingerprint = {"examples": {"add": 1}, "sha256": "x"}
    state = {k: v for k, v in stream.get_state().items() if k != "data"}  # an older checkpoint
    stream.set_state(state)
    assert stream.unverified
    stream.set_state(stream.get_state())
    assert not stream.unverified
    with pytest.raises(DataError, match=r"examples per task add: 2 -> 1"):
        stream.set_state(stream.get_state() | {"data": {"examples": {"add": 2}, "sha256": "y"}})


def test_what_json_writers_emit_reads_as_written(tmp_path):
    """Unescaped line separators inside strings (json.dumps(ensure_ascii=False)), gzip, pretty-printed records one
    after another, Dolly's field names; a wrapper object is named as such, a damaged gzip too."""
    import gzip

    rows = [{"instruction": f"q{i}\u2028x\u0085y\u2029", "output": f"a{i}"} for i in range(3)]
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + '\n{"instruction": "q", "output": ""}\n'
    with pytest.raises(DataError, match=r"sep\.jsonl:4: field 'output' is empty"):  # the line count is not shifted
        load_jsonl(_write(tmp_path / "sep.jsonl", lines))
    assert [e.instruction for e in load_jsonl(_write(tmp_path / "sep.jsonl", lines.rsplit("\n", 2)[0]))] == \
        [r["instruction"].strip() for r in rows]  # (U+2029 at the end is whitespace to strip)
    (tmp_path / "g.jsonl.gz").write_bytes(gzip.compress("\n".join(map(json.dumps, rows)).encode()))
    assert [e.output for e in load_source(f"jsonl:{tmp_path / 'g.jsonl.gz'}", "train")] == ["a0", "a1", "a2"]
    (tmp_path / "cut.gz").write_bytes(gzip.compress(b"{}")[:-4])
    with pytest.raises(DataError, match=r"cut\.gz: a damaged gzip file"):
        load_jsonl(tmp_path / "cut.gz")
    pretty = "\n".join(json.dumps(r, indent=2) for r in rows)  # jq's output: 4 lines a record
    assert [e.source.rsplit(":", 1)[1] for e in load_jsonl(_write(tmp_path / "p.jsonl", pretty))] == ["1", "5", "9"]
    with pytest.raises(DataError, match=r"p\.jsonl:8: malformed JSON \(Expecting property name enclosed in double "
                                        r"quotes at column 1\), in the record that starts on line 5"):
        load_jsonl(_write(tmp_path / "p.jsonl", pretty.replace('"a1"', '"a1",')))
    with pytest.raises(DataError, match=r"p\.jsonl:4: malformed JSON \(text after the record that starts on line 1"):
        load_jsonl(_write(tmp_path / "p.jsonl", json.dumps(rows[0], indent=1) + " {}\n"))
    with pytest.raises(DataError, match=r"u\.jsonl:1: malformed JSON \(Unterminated string starting at column 17\)"):
        load_jsonl(_write(tmp_path / "u.jsonl", '{"instruction": "x\n'))  # no 'at at'
    with pytest.raises(DataError, match=r"w\.json:1: missing field 'instruction' .* its field 'data' holds a list of 3 "
                                        r"objects: if those are the records, give that list alone"):
        load_jsonl(_write(tmp_path / "w.json", json.dumps({"data": rows}, indent=2)))
    dolly = {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"}
    (d,) = load_jsonl(_write(tmp_path / "dolly.jsonl", json.dumps(dolly)))
    assert (d.instruction, d.context, d.response, d.answer) == ("Summarise.", "A long text.", "Short.", "Short.")
    with pytest.raises(DataError, match=r"missing field 'answer' \(or an Alpaca 'output', or a Dolly 'response'\)"):
        load_jsonl(_write(tmp_path / "none.jsonl", json.dumps({"instruction": "Summarise."})))


def test_openai_reply_weights_leave_replies_out_of_the_loss(tmp_path):
    from comoe_jax.data import render_segments
    from comoe_jax.loading import load_tokenizer

    def chat(*weights):
        turns = []
        for i, w in enumerate(weights):
            reply = {"role": "assistant", "content": f"reply {i}"} | ({} if w is None else {"weight": w})
            turns += [{"role": "user", "content": f"question {i}"}, reply]
        return {"messages": turns}

    tok = load_tokenizer("smollm2-135m")
    (ex,) = load_jsonl(_write(tmp_path / "w.jsonl", json.dumps(chat(0, None, 1))))
    assert ex.untrained_replies == (0,)
    assert [t for t, on in render_segments(ex, "chat", tok, "all") if on] == ["reply 1<|im_end|>", "reply 2"]
    assert [t for t, on in render_segments(ex, "chat", tok, "last") if on] == ["reply 2"]
    for weights, message in (((1, 0), r"the last assistant reply in field 'messages' has weight 0"),
                             ((0.5, 1), r"messages\[1\] has weight 0\.5; a weight is 0 \(not trained on\) or 1")):
        with pytest.raises(DataError, match=r"w\.jsonl:1: " + message):
            load_jsonl(_write(tmp_path / "w.jsonl", json.dumps(chat(*weights))))
    user_weight = chat(1)
    user_weight["messages"][0]["weight"] = 0
    with pytest.raises(DataError, match=r"messages\[0\] has weight 0; .* only an assistant message is trained on"):
        load_jsonl(_write(tmp_path / "w.jsonl", json.dumps(user_weight)))


def test_a_saved_dataset_dict_split_by_its_own_name(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"messages": [[{"role": "user", "content": "Hi", "weight": None},
                          {"role": "assistant", "content": "Hello", "weight": None}]]}  # datasets' filled-in keys
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_dict(rows)}).save_to_disk(tmp_path / "chat")
    (ex,) = load_source(f"hf:{tmp_path / 'chat'}@train_sft", "train")
    assert ex.response == "Hello" and ex.untrained_replies == ()
    with pytest.raises(DataError, match=r"split 'train' not found; the dataset has train_sft; pick one with "
                                        r"hf:.*chat@<split>"):
        load_source(f"hf:{tmp_path / 'chat'}", "train")
