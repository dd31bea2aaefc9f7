"""Loaders: the committed mix, JSONL, LLM-Adapters JSON, BIG-bench task.json, Hugging Face datasets on disk.

Every loader returns a list of :class:`Example` and refuses bad data with a
:class:`DataError` naming the file, the line or record, and the field.

Source strings (``data.train`` / ``data.eval`` in the config):

- ``mix``: ``comoe_jax/data/comoe_mix/<split>.jsonl`` (built by ``scripts/build_mix.py``);
- ``builtin`` or ``builtin:add+reverse``: the small procedural tasks of ``comoe_jax.data.builtin``;
- ``jsonl:PATH``: one JSON object a line (or one JSON list of them, or pretty-printed objects one after
  another; gzip-compressed files, e.g. ``.jsonl.gz``, are read as they are), fields ``instruction`` (or
  ``question``), ``answer``, optional ``options`` (or ``choices``; ``answer`` is then the option's text,
  its letter or its 0-based index, as in MMLU), ``task``, ``input``, ``output``, ``labels``; a list of answers accepts
  each (the first is trained on); Alpaca SFT records
  (``instruction``, ``input``, ``output``: the output is the answer; Dolly's ``context`` and ``response``
  read as ``input`` and ``output``); chat records
  ``{"messages": [{"role": "system" | "user" | "assistant", "content"}, ...]}`` ending with the
  assistant's reply (or ShareGPT's ``{"conversations": [{"from": "human" | "gpt" | "system", "value"}]}``);
  an assistant message's ``"weight": 0``, as in OpenAI's fine-tuning files, leaves that reply out of the loss;
  TRL's prompt-completion records ``{"prompt", "completion"}`` (texts, trained as written with
  ``data.template=raw``, or message lists); the benchmark columns ``hf:`` recognises (a dataset
  exported with ``to_json``);
- ``llm_adapters:PATH``: a JSON list of ``{instruction, input, output, answer}`` (the LLM-Adapters
  commonsense and math files; option labels come from the ``Answer format: a/b/c`` line);
- ``bigbench:PATH``: a BIG-bench ``task.json`` (or its folder);
- ``hf:PATH``: a ``datasets`` folder saved with ``save_to_disk``, or a Parquet / CSV / TSV / Arrow file
  (ARC, OBQA, CommonsenseQA, BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, MMLU columns, or the JSONL field
  names, chat ``messages`` included); ``hf:PATH@split`` picks a split of a saved DatasetDict by its own name;
  ``hf:org/name[:subset][@split]``: a hub dataset by name (``datasets.load_dataset``, its cache, streaming
  the first rows when a per-task cap is set; ``@split``: the hub's own split name, e.g. ``@train_sft``).
"""

from __future__ import annotations

import codecs
import gzip
import json
import math
import re
import zlib
from pathlib import Path

from comoe_jax import constants
from comoe_jax.constants import CHAT_ROLES, SPLITS
from comoe_jax.constants import SOURCE_FORMATS as FORMATS
from comoe_jax.data.records import OPTION_LETTERS, DataError, Example, multiple_choice
from comoe_jax.paths import as_path

MIX_DIR = Path(__file__).resolve().parent / "comoe_mix"  # package data: ships in the wheel


def load_source(spec: str, split: str, *, seed: int = 0, limit: int = 0) -> list[Example]:
    """Examples of one source string (see the module docstring) for ``split``; ``limit``: a hub dataset
    streams only its first ``limit`` rows."""
    if spec == "mix":
        if split not in SPLITS:
            raise DataError(f"mix: split {split!r} does not exist; splits are {', '.join(SPLITS)}")
        return load_jsonl(MIX_DIR / f"{split}.jsonl")
    if spec == "builtin" or spec.startswith("builtin:"):
        from comoe_jax.data.builtin import BUILTIN_TASKS, load_builtin

        tasks = tuple(t for t in spec.partition(":")[2].split("+") if t) or BUILTIN_TASKS
        unknown = [t for t in tasks if t not in BUILTIN_TASKS]
        if unknown:
            raise DataError(f"data source {spec!r}: unknown built-in task(s) {', '.join(unknown)}; built-in tasks are "
                            f"{', '.join(BUILTIN_TASKS)}")
        return load_builtin(tasks, size=2048 if split == "train" else 200, seed=seed + SPLITS.index(split))
    fmt, sep, path = spec.partition(":")
    if not sep or fmt not in FORMATS:
        raise DataError(f"data source {spec!r}: use 'mix', 'builtin' or '<format>:<path>' with format one of "
                        f"{', '.join(FORMATS)}")
    loader = {"jsonl": load_jsonl, "llm_adapters": load_llm_adapters, "bigbench": load_bigbench}.get(fmt)
    if loader is None:
        folder, at, own_split = path.rpartition("@")
        if at and not as_path(path).exists() and as_path(folder).exists():
            return load_hf_dataset(as_path(folder), own_split)
        if not as_path(path).exists() and HUB_DATASET.match(path):
            return load_hub_dataset(path, split, limit)
        return load_hf_dataset(as_path(path), split)
    return loader(as_path(path))


def _exists(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    return path


def _file(path: Path) -> Path:
    if _exists(path).is_dir():
        raise DataError(f"{path}: is a folder; give the data file itself")
    return path


def _read_text(path: Path) -> str:
    """The file's text (gzip-compressed files decompressed); bytes that are not UTF-8 are a DataError naming the
    line."""
    whole = _file(path).read_bytes()
    if whole.startswith(b"\x1f\x8b"):  # gzip's magic number, whatever the file's name
        try:
            whole = gzip.decompress(whole)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: a damaged gzip file ({e})") from None
    raw = whole.removeprefix(codecs.BOM_UTF8)  # a byte-order mark (Windows editors write one) is dropped
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        offset = e.start + len(whole) - len(raw)  # in the file, the mark included
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {offset}); save the "
                        "file as UTF-8") from None


def _text(record: dict, field: str, where: str, *, required: bool = True) -> str:
    value = record.get(field)
    missing = isinstance(value, float) and math.isnan(value)  # JSON NaN: a missing value as pandas writes it
    if value is None or missing:
        if required:
            raise DataError(f"{where}: missing field {field!r}" + (" (NaN, a missing value)" if missing else ""))
        return ""
    if isinstance(value, float) and math.isinf(value):
        raise DataError(f"{where}: field {field!r} is {value} (JSON Infinity), not text")
    if not isinstance(value, (str, int, float, bool)):
        raise DataError(f"{where}: field {field!r} should be text, got {type(value).__name__}")
    if isinstance(value, bool):  # JSON true / false, as written (Python's str() would give True / False)
        return "true" if value else "false"
    return str(value)


def file_task(path) -> str:
    """The task a file's records default to: its name without extension, or its folder's for a file named after a
    split (``boolq/test.jsonl`` is task boolq), so that two ``test.jsonl`` files are two tasks."""
    path = as_path(path)
    stem = path.name.split(".")[0]  # data.jsonl.gz -> data
    return path.parent.name if stem in SPLITS and path.parent.name else stem


def malformed_json(where: str, e: json.JSONDecodeError) -> str:
    """``where: malformed JSON (what at column N)``; some of json's messages already end in 'at'."""
    return f"{where}: malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})"


def _checked(examples: list[Example], path: Path) -> list[Example]:
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


# --------------------------------------------------------------------------- JSONL (the mix's own format)


# ShareGPT's speaker names -> chat roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _chat_turns(messages, field: str, where: str, sharegpt: bool = False) -> list[tuple[str, str, bool]]:
    """(role, text, trained on) turns of a ``field`` list of {role, content} objects (ShareGPT: {from, value});
    an assistant message with OpenAI's ``"weight": 0`` is not trained on."""
    role_key, text_key, roles = ("from", "value", SHAREGPT_ROLES) if sharegpt else \
        ("role", "content", {r: r for r in CHAT_ROLES})
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} should be a non-empty list of {{{role_key}, {text_key}}} objects")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get(role_key) not in roles or not isinstance(m.get(text_key), str):
            raise DataError(f"{where}: {field}[{i}] should be an object with {role_key!r} ({', '.join(roles)}) and "
                            f"text {text_key!r}, got {str(m)[:80]}")
        weight = 1 if m.get("weight") is None else m["weight"]  # datasets fills a column's missing keys with None
        if weight not in (0, 1) or isinstance(weight, bool) or (weight == 0 and roles[m[role_key]] != "assistant"):
            raise DataError(f"{where}: {field}[{i}] has weight {weight!r}; a weight is 0 (not trained on) or 1, and "
                            "only an assistant message is trained on")
        turns.append((roles[m[role_key]], m[text_key], weight == 1))
    return turns


def _from_messages(record: dict, task: str, where: str) -> Example:
    """A chat record ``{"messages": [{"role", "content"}, ...]}`` (or ShareGPT's ``{"conversations": [{"from",
    "value"}, ...]}``) ending with the assistant's reply."""
    field = "messages" if "messages" in record else "conversations"
    return _conversation(_chat_turns(record[field], field, where, sharegpt=field == "conversations"), record, task,
                         where, field)


def _conversation(turns: list[tuple[str, str, bool]], record: dict, task: str, where: str, field: str) -> Example:
    replies = [trained for role, _, trained in turns if role == "assistant"]
    if turns[-1][0] == "assistant" and not replies[-1]:
        raise DataError(f"{where}: the last assistant reply in field {field!r} has weight 0, but the loss and the "
                        "reference answer are taken on the last reply; drop the turn (and the user message it answers)")
    turns = [(role, text) for role, text, _ in turns]
    if turns[-1][0] != "assistant":
        raise DataError(f"{where}: the last message is from {turns[-1][0]!r}; a conversation must end with the "
                        "assistant's reply (the loss is taken on it)")
    dialogue = [(role, text) for role, text in turns[:-1] if role != "system"]
    if not any(role == "user" for role, _ in dialogue):
        raise DataError(f"{where}: field {field!r} has no user message before the assistant's reply")
    instruction = dialogue[-1][1] if len(dialogue) == 1 else \
        "\n".join(f"{role.capitalize()}: {text}" for role, text in dialogue)
    system = "\n".join(text for role, text in turns if role == "system")
    reply = turns[-1][1]
    if not reply.strip():
        raise DataError(f"{where}: the assistant's last reply in field {field!r} is empty; a conversation needs the "
                        "reply to train on")
    return Example(task=_text(record, "task", where, required=False) or task, instruction=instruction.strip(),
                   answer=reply.strip(), output=reply, context=system.strip(), source=where, messages=tuple(turns),
                   untrained_replies=tuple(i for i, trained in enumerate(replies) if not trained))


def _from_fields(record: dict, task: str, where: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record or "conversations" in record:
        return _from_messages(record, task, where)
    if "prompt" in record and "completion" in record:
        return _from_prompt_completion(record, task, where)
    field = "instruction" if "instruction" in record else "question"
    if record.get(field) is None:
        raise DataError(f"{where}: missing field 'instruction' (or 'question'; or a 'prompt' and 'completion' pair, "
                        f"or chat 'messages' / 'conversations'){_nested_records_hint(record)}")
    instruction = _text(record, field, where)
    task = _text(record, "task", where, required=False) or task
    context = _text(record, "input", where, required=False) or _text(record, "context", where, required=False)
    key = "options" if "options" in record else "choices"  # choices: MMLU's name
    options = record.get(key)
    if options is not None:
        if not isinstance(options, list):
            raise DataError(f"{where}: field {key!r} should be a list of option texts, got {type(options).__name__}")
        return multiple_choice(task, str(instruction), options, _correct_option(record, options, where), where,
                               context)
    answers = record.get("answer")
    if isinstance(answers, list):  # several accepted answers; the first is trained on
        if not answers or not all(isinstance(a, (str, int, float)) for a in answers):
            raise DataError(f"{where}: field 'answer' should be text or a non-empty list of texts")
        record = record | {"answer": answers[0]}
    # Alpaca-style SFT records have only an output (Dolly's: a response): it is the reference answer too
    output_key = "response" if "output" not in record and "response" in record else "output"
    if record.get("answer") is None and output_key not in record:
        raise DataError(f"{where}: missing field 'answer' (or an Alpaca 'output', or a Dolly 'response')")
    answer = _text(record, "answer", where, required=False) or _text(record, output_key, where, required=False)
    if not answer.strip():
        raise DataError(f"{where}: field {'answer' if 'answer' in record else output_key!r} is empty; a record "
                        "needs the answer (or the Alpaca output) to train on")
    labels = record.get("labels") or ()
    if not isinstance(labels, (list, tuple)) or not all(isinstance(v, str) for v in labels):
        raise DataError(f"{where}: field 'labels' should be a list of label texts (e.g. [\"true\", \"false\"]), "
                        f"got {json.dumps(labels)[:60]}")
    labels = tuple(labels)
    if any(not label.strip() for label in labels) or len(set(labels)) != len(labels):
        raise DataError(f"{where}: field 'labels' {list(labels)} has an empty or a repeated label")
    if labels and answer not in labels:
        raise DataError(f"{where}: field 'answer' {answer!r} is not among the labels {list(labels)}")
    return Example(task=task, instruction=str(instruction).strip(), answer=answer.strip(), labels=labels,
                   output=_text(record, output_key, where, required=False), context=context.strip(), source=where,
                   also_correct=tuple(str(a).strip() for a in answers[1:]) if isinstance(answers, list) else ())


def _nested_records_hint(record: dict) -> str:
    """A hint when ``record`` is a wrapper such as ``{"data": [{...}, ...]}`` rather than a record."""
    for key, value in record.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return (f"; its field {key!r} holds a list of {len(value)} objects: if those are the records, give that "
                    "list alone (a JSON list file) or one record a line")
    return ""


def _from_prompt_completion(record: dict, task: str, where: str) -> Example:
    """TRL's prompt-completion record: texts (trained as written with ``data.template=raw``), or message lists
    (a conversation whose completion is the assistant's reply)."""
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise DataError(f"{where}: fields 'prompt' and 'completion' should both be texts or both lists of "
                            f"{{role, content}} messages, got {type(prompt).__name__} and {type(completion).__name__}")
        turns = _chat_turns(prompt, "prompt", where) + _chat_turns(completion, "completion", where)
        return _conversation(turns, record, task, where, "prompt")
    prompt, completion = _text(record, "prompt", where), _text(record, "completion", where)
    if not prompt.strip():
        raise DataError(f"{where}: field 'prompt' is empty; the completion needs a prompt to follow")
    if not completion.strip():
        raise DataError(f"{where}: field 'completion' is empty; a record needs the completion to train on")
    return Example(task=_text(record, "task", where, required=False) or task, instruction=prompt,
                   answer=completion.strip(), output=completion, source=where)


def _correct_option(record: dict, options: list, where: str) -> str:
    """The correct option's text from ``answer``: the text itself, its letter (A, B, ...) or its 0-based index."""
    answer = record.get("answer")
    texts = [str(o).strip() for o in options]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(options):
            raise DataError(f"{where}: field 'answer' is index {answer}, but there are {len(options)} options "
                            f"(0 to {len(options) - 1})")
        if str(answer) in texts and texts.index(str(answer)) != answer:
            raise DataError(f"{where}: field 'answer' {answer} is ambiguous: an option's 0-based index and another "
                            f"option's text; give the option's text as a string ({json.dumps(str(answer))}) or "
                            "its letter")
        return texts[answer]
    answer = _text(record, "answer", where).strip()
    letters = OPTION_LETTERS[:len(options)]
    if answer not in texts and len(answer) == 1 and answer.upper() in letters:
        return texts[letters.index(answer.upper())]
    return answer


def load_jsonl(path: Path) -> list[Example]:
    """One JSON object a line (blank lines skipped; an object may also span lines, as ``jq .`` prints them), or
    one JSON list of such objects (Stanford Alpaca's ``alpaca_data.json``, ``to_json(lines=False)``); the task
    defaults to the file's name (:func:`file_task`)."""
    text = _read_text(as_path(path))
    listed = _json_list(path, text)
    if listed is not None:
        return listed
    examples = [_record(record, file_task(path), where) for where, record in _json_values(path, text)]
    return _checked(examples, as_path(path))


_DECODER = json.JSONDecoder()


def _json_values(path: Path, text: str):
    """``(path:line, value)`` of each JSON value of a JSON-lines text, the line its value starts on. A line
    that ends in an open object or list (``{``, ``[``, ``,``, ``:``) is read on into the next lines
    (pretty-printed objects). Lines end at newlines only: ``str.splitlines`` would also split at U+2028, U+2029
    and U+0085, which JSON allows unescaped in strings (``json.dumps(..., ensure_ascii=False)`` writes them)."""
    start, end = 0, 0  # where the line starts in text; where the last value read ended
    for number, line in enumerate(text.split("\n"), 1):
        start, line_start = start + len(line) + 1, start
        if line_start < end or not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            if e.pos < len(line.rstrip()) or line.rstrip()[-1] not in "{[,:":  # not a line a pretty printer ends
                raise DataError(malformed_json(f"{path}:{number}", e)) from None
            value, end = _value_across_lines(path, text, line_start + len(line) - len(line.lstrip()), number)
        yield f"{path}:{number}", value


def _value_across_lines(path: Path, text: str, at: int, number: int):
    """The JSON value that starts at ``text[at]`` (on line ``number``) and where it ends; nothing but
    whitespace may follow it on its last line."""
    try:
        value, end = _DECODER.raw_decode(text, at)
    except json.JSONDecodeError as e:
        if not text[e.pos:].strip():  # a record cut off by the end of the file
            raise DataError(f"{path}:{number}: malformed JSON (the record that starts on this line is cut off by the "
                            f"end of the file: {e.msg.removesuffix(' at')})") from None
        raise DataError(malformed_json(f"{path}:{e.lineno}", e) + f", in the record that starts on line "
                        f"{number}") from None
    newline = text.find("\n", end)
    rest = text[end:newline if newline >= 0 else len(text)].strip()
    if rest:
        raise DataError(f"{path}:{text.count(chr(10), 0, end) + 1}: malformed JSON (text after the record that "
                        f"starts on line {number}: {rest[:40]!r}); give one record a line")
    return value, end


def _json_list(path: Path, text: str) -> list[Example] | None:
    """The records of a JSON list file, or None when ``text`` is JSON lines. A text that opens with '[' but is
    no valid JSON is a damaged list unless its first line is a JSON value alone (JSON lines, whose reader
    then names the line)."""
    if not text.lstrip().startswith("["):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        try:
            json.loads(text.lstrip().split("\n")[0])
            return None
        except json.JSONDecodeError:
            raise DataError(malformed_json(f"{path}:{e.lineno}", e)) from None
    examples = [_record(record, file_task(path), f"{path} record {i}") for i, record in enumerate(data)]
    return _checked(examples, as_path(path))


# --------------------------------------------------------------------------- LLM-Adapters


_ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+?)\s*$", re.M)


def _read_json(path: Path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(malformed_json(f"{path}:{e.lineno}", e)) from None


def load_llm_adapters(path: Path) -> list[Example]:
    """LLM-Adapters JSON: a list of {instruction, input, output, answer}; task = the folder or file name."""
    data = _read_json(as_path(path))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    task = file_task(path)
    examples = []
    for i, record in enumerate(data):
        where = f"{path} record {i}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        instruction = _text(record, "instruction", where)
        answer = _text(record, "answer", where).strip()
        fmt = _ANSWER_FORMAT.search(instruction)
        labels = tuple(v.strip() for v in fmt.group(1).split("/")) if fmt else ()
        if labels and answer not in labels:
            raise DataError(f"{where}: field 'answer' {answer!r} is not among the labels {'/'.join(labels)} given by "
                            "the instruction's 'Answer format:' line")
        examples.append(Example(task=task, instruction=instruction.strip(), answer=answer, labels=labels,
                                output=_text(record, "output", where, required=False).strip(),
                                context=_text(record, "input", where, required=False).strip(), source=where))
    return _checked(examples, as_path(path))


# --------------------------------------------------------------------------- BIG-bench


def load_bigbench(path: Path) -> list[Example]:
    """A BIG-bench ``task.json`` (``examples: [{input, target_scores | target}]``)."""
    path = as_path(path)
    if path.is_dir():
        if not (path / "task.json").exists():
            raise DataError(f"{path}: no task.json in this folder")
        path = path / "task.json"
    data = _read_json(path)
    examples = data.get("examples") if isinstance(data, dict) else None
    if not examples:
        subtasks = sorted(p.parent.name for p in path.parent.glob("*/task.json"))
        hint = f"; it has subtasks, load one of: {', '.join(subtasks)}" if subtasks else ""
        raise DataError(f"{path}: field 'examples' is missing or empty{hint}")
    if not isinstance(examples, list):
        raise DataError(f"{path}: field 'examples' should be a list, got {type(examples).__name__}")
    task = str(data.get("name") or path.parent.name)
    out = []
    for i, example in enumerate(examples):
        where = f"{path} example {i}"
        if not isinstance(example, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(example).__name__}")
        question = _text(example, "input", where)
        scores = example.get("target_scores")
        if scores is not None and not isinstance(scores, dict):
            raise DataError(f"{where}: field 'target_scores' should map each option to 0 or 1, got "
                            f"{type(scores).__name__}")
        if scores:
            correct = [option for option, score in scores.items() if score == 1]
            if len(correct) != 1:
                raise DataError(f"{where}: field 'target_scores' marks {len(correct)} options correct; exactly one "
                                "is needed")
            out.append(multiple_choice(task, question, list(scores), correct[0], where))
        elif example.get("target"):
            targets = [str(t).strip() for t in example["target"]] if isinstance(example["target"], list) else \
                [str(example["target"]).strip()]
            # BIG-bench's exact match accepts any listed target; the first is trained on
            out.append(Example(task=task, instruction=question.strip(), source=where, answer=targets[0],
                               also_correct=tuple(targets[1:])))
        else:
            raise DataError(f"{where}: no options (field 'target_scores') and no field 'target'")
    return out


# --------------------------------------------------------------------------- Hugging Face datasets


def _hf_record(row: dict, task: str, where: str) -> Example:
    """One row of a known benchmark schema (by its columns), or of the JSONL field names."""
    cols = set(row)
    if "choices" in cols and "answerKey" in cols:  # ARC, OpenBookQA, CommonsenseQA
        choices = row["choices"]
        labels, texts = list(choices["label"]), list(choices["text"])
        if row["answerKey"] not in labels:
            raise DataError(f"{where}: field 'answerKey' {row['answerKey']!r} is not among {labels}")
        question = row.get("question", row.get("question_stem"))
        return multiple_choice(task, question, texts, texts[labels.index(row["answerKey"])], where)
    if {"goal", "sol1", "sol2", "label"} <= cols:  # PIQA
        options = [row["sol1"], row["sol2"]]
        return multiple_choice(task, row["goal"], options, _indexed(row, "label", options, 0, where), where)
    if {"context", "question", "answerA", "answerB", "answerC", "label"} <= cols:  # SIQA
        options = [row["answerA"], row["answerB"], row["answerC"]]
        return multiple_choice(task, f"{row['context']} {row['question']}", options,
                               _indexed(row, "label", options, 1, where), where)
    if {"ctx", "endings", "label"} <= cols:  # HellaSwag
        prefix = f"{row['activity_label']}. " if row.get("activity_label") else ""
        return multiple_choice(task, prefix + row["ctx"], row["endings"],
                               _indexed(row, "label", row["endings"], 0, where), where)
    if {"sentence", "option1", "option2", "answer"} <= cols:  # WinoGrande
        options = [row["option1"], row["option2"]]
        return multiple_choice(task, row["sentence"], options, _indexed(row, "answer", options, 1, where), where)
    if {"question", "answer", "passage"} <= cols and isinstance(row["answer"], bool):  # BoolQ
        return Example(task=task, instruction=row["question"].strip().rstrip("?") + "?", context=row["passage"],
                       answer="true" if row["answer"] else "false", labels=("true", "false"), source=where)
    return _from_fields(row, task, where)


def _indexed(row: dict, field: str, options: list, first: int, where: str) -> str:
    """The option that ``row[field]`` numbers (from ``first``: 0 or 1, as the benchmark counts)."""
    try:
        index = int(row[field]) - first
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(options):
        raise DataError(f"{where}: field {field!r} is {row[field]!r}; with {len(options)} options it should be "
                        f"{first} to {len(options) - 1 + first}")
    return options[index]


def _record(row, task: str, where: str) -> Example:
    """One record of a dataset or a JSONL line: a known benchmark's columns (a dataset exported with
    ``to_json`` keeps them) or the JSONL field names."""
    if not isinstance(row, dict):
        return _from_fields(row, task, where)  # refuses it, naming what it is
    try:
        return _hf_record(row, task, where)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: unexpected value ({type(e).__name__}: {e})") from None


def _hf_records(rows, task: str, where: str) -> list[Example]:
    examples = [_record(row, task, f"{where} row {i}") for i, row in enumerate(rows)]
    if not examples:
        raise DataError(f"{where}: no examples")
    return examples


HUB_DATASET = re.compile(constants.HUB_DATASET)  # hf:org/name[:subset][@split], when no such local folder exists


def _first_rows(rows, limit: int) -> list:
    """The first ``limit`` rows of a stream; all of them when rows name their task (each task needs its own)."""
    out = []
    for row in rows:
        out.append(row)
        if len(out) >= limit and "task" not in row:
            break
    return out


def load_hub_dataset(name: str, split: str, limit: int = 0) -> list[Example]:
    """A Hugging Face hub dataset (``org/name[:subset][@split]``: ``@split`` names the hub's split, e.g.
    ``train_sft``, in place of ``split``) through ``datasets.load_dataset`` and its cache
    (``HF_DATASETS_OFFLINE=1`` reads only datasets loaded before); ``limit`` > 0 streams the first rows only."""
    import datasets

    name, _, own_split = name.partition("@")
    split = own_split or split
    repo, _, subset = name.partition(":")
    try:
        data = datasets.load_dataset(repo, subset or None, split=split, streaming=limit > 0)
        rows = _first_rows(data, limit) if limit else data  # a stream reads (and can fail) here
    except (ConnectionError, FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise DataError(f"hf:{name}: no such local folder, and the hub dataset cannot be loaded for split "
                        f"{split!r} ({reason}); offline "
                        "(HF_DATASETS_OFFLINE=1 or no network) only datasets loaded once before are cached") from None
    task = repo.split("/")[-1] + (f"_{subset}" if subset else "")
    return _hf_records(rows, task, f"hf:{name} ({split})")


# data files ``datasets.load_dataset`` reads with a packaged builder (the hub's own formats)
DATA_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}


def load_hf_dataset(path: Path, split: str) -> list[Example]:
    """A folder written by ``datasets`` ``save_to_disk`` (a Dataset, or a DatasetDict holding ``split``), or
    one data file (Parquet, CSV / TSV, Arrow: no splits, like a JSONL file)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading Hugging Face datasets needs the 'datasets' package (pip install "
                        "datasets)") from None
    if as_path(path).is_file():
        return _hf_data_file(as_path(path), datasets)
    folder = _exists(as_path(path))
    try:
        data = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    except IndexError:  # datasets cannot concatenate zero Arrow tables: a saved dataset (or split) with no rows
        raise DataError(f"{path}: no examples (the saved dataset, or one of its splits, is empty)") from None
    except Exception as e:  # a damaged folder: state.json naming no or unreadable Arrow files (datasets / pyarrow)
        raise DataError(f"{path}: a save_to_disk folder that cannot be read ({type(e).__name__}: {e}); is it "
                        "complete?") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path}: split {split!r} not found; the dataset has {', '.join(data)}; pick one with "
                            f"hf:{path}@<split>")
        data = data[split]
    return _hf_records(data, as_path(path).name, str(path))


def _hf_data_file(path: Path, datasets) -> list[Example]:
    builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        hint = f"; for JSON lines or a JSON list use jsonl:{path}" if path.suffix.lower() in (".json", ".jsonl") else ""
        raise DataError(f"{path}: hf: reads a folder written by save_to_disk, a hub name (org/name) or a data file "
                        f"ending in {', '.join(DATA_FILE_BUILDERS)}{hint}")
    options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        data = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as e:  # the builders raise pyarrow / pandas errors of many kinds for a damaged file
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise DataError(f"{path}: not a readable {builder} file ({type(e).__name__}: {reason})") from None
    return _hf_records(data, path.stem, str(path))


def load_sources(specs, split: str, *, seed: int = 0, tasks=(), max_per_task: int = 0,
                 tasks_key: str = "data.tasks") -> list[Example]:
    """Examples of several sources for ``split``, optionally only ``tasks`` and at most ``max_per_task`` each."""
    limit = max_per_task if not tasks else 0  # a hub dataset then streams only the rows that are used
    examples = [ex for spec in specs for ex in load_source(spec, split, seed=seed, limit=limit)]
    if tasks:
        found = {ex.task for ex in examples}
        missing = [t for t in tasks if t not in found]
        if missing:
            raise DataError(f"{tasks_key} names {', '.join(missing)}, not found in {', '.join(specs)} ({split}); "
                            f"tasks there: {', '.join(sorted(found))}")
        examples = [ex for ex in examples if ex.task in tasks]
    if max_per_task:
        seen: dict[str, int] = {}
        kept = []
        for ex in examples:
            seen[ex.task] = seen.get(ex.task, 0) + 1
            if seen[ex.task] <= max_per_task:
                kept.append(ex)
        examples = kept
    return examples
