"""Prompt templates: an Example -> (prompt, response) text pair.

- ``alpaca``: the Alpaca template of LLM-Adapters, which the paper's data uses (with an
  ``### Input:`` section when the example has a context);
- ``choice``: MoE-PEFT's plain multiple-choice prompt ("Please choose the correct answer to the
  question: ... (A) ... (B) ...\\nAnswer:" -> " A"), the form its restricted-label evaluator scores;
- ``plain``: "Q: ...\\nA: ", short, for byte-level tokenizers and tiny test models;
- ``raw``: the instruction as written (after the context and a newline, if there is one) and the response
  as written (prompt-completion data that carries its own format; free-form items only);
- ``chat``: the tokenizer's own chat template (``apply_chat_template``): a chat record's turns, or
  the instruction as the user's message; the response is the assistant's reply and its end of turn
  (every reply of a multi-turn record with ``data.chat_replies=all``), found where the template puts it.

Multiple-choice examples list their options as ``(A) text`` lines and are answered with the label.
"""

from __future__ import annotations

import os

from comoe_jax.constants import TEMPLATES
from comoe_jax.data.records import DataError, Example

_ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
           "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
_ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                 "{instruction}\n\n### Input:\n{context}\n\n### Response:\n")


def _question(example: Example, with_options: bool) -> str:
    text = example.instruction
    if example.options and with_options:
        listed = "\n".join(f"({label}) {option}" for label, option in zip(example.labels, example.options))
        text = f"Please choose the correct answer to the question: {text}\n{listed}"
    return text


def _prompt(example: Example, template: str, with_options: bool) -> str:
    question = _question(example, with_options)
    if template == "alpaca":
        if example.context:
            return _ALPACA_INPUT.format(instruction=question, context=example.context)
        return _ALPACA.format(instruction=question)
    if example.context:
        question = f"{example.context}\n{question}"
    if template == "choice":
        return f"{question}\nAnswer:"
    if template == "plain":
        return f"Q: {question}\nA: "
    if template == "raw":
        if example.labels:
            raise DataError(f"{example.source}: data.template=raw writes prompt and response as they are, with no "
                            "options listed or label asked for; a multiple-choice item needs alpaca, choice or chat")
        if not question.strip():
            raise DataError(f"{example.source}: data.template=raw needs a non-empty prompt (the instruction)")
        return question
    raise ValueError(f"data.template={template!r} is not allowed: one of {', '.join(TEMPLATES)}")


def chat_messages(example: Example, with_options: bool = True) -> list[dict]:
    """The conversation of ``example``: its own turns, or the instruction (with any context before it) as
    the user's message and the response as the assistant's."""
    if example.messages:
        return [{"role": role, "content": text} for role, text in example.messages]
    user = _question(example, with_options)
    if example.context:
        user = f"{example.context}\n\n{user}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": example.response}]


# Stands in for one reply's text to find where the template puts it (never tokenized, never trained on).
_SLOT = "\u2063comoe-reply\u2063"


def _apply(tokenizer, messages: list[dict], example: Example, **options) -> str:
    """``apply_chat_template`` to text; a template that refuses a system turn (Mistral v0.1 / v0.2, Gemma) gets
    the system text folded into the first user turn, as those models' own instructions do."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template=chat needs a tokenizer with a chat template (chat_template.jinja or "
                        "tokenizer_config.json's chat_template); this one has none: use alpaca, choice, plain or raw")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except ImportError as e:  # transformers renders chat templates with jinja2
        raise DataError(f"data.template=chat needs jinja2 to render the chat template: pip install jinja2 ({e})") \
            from None
    except Exception as e:  # noqa: BLE001  (a template that raises on this conversation: jinja's error types)
        folded = _fold_system(messages)
        if folded is not None:
            return _apply(tokenizer, folded, example, **options)
        raise DataError(f"{example.source}: the tokenizer's chat template cannot render this conversation "
                        f"({type(e).__name__}: {e})") from None


def _fold_system(messages: list[dict]) -> list[dict] | None:
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system or not rest or rest[0]["role"] != "user":
        return None
    rest[0]["content"] = "\n\n".join(system + [rest[0]["content"]])
    return rest


def _reply_span(tokenizer, messages: list[dict], i: int, full: str, example: Example) -> tuple[int, int] | None:
    """Where reply ``messages[i]`` and its end of turn lie in ``full`` (the rendered conversation), found by
    rendering the conversation with a placeholder for that reply, or, where the template renders a reply by
    its text (Qwen3 writes a reasoning block of the last reply apart), as what the conversation adds to the
    generation prompt before it. None: the template leaves the reply out."""
    marked = [dict(m, content=_SLOT) if j == i else m for j, m in enumerate(messages)]
    before, found, after = _apply(tokenizer, marked, example).partition(_SLOT)
    if not found:
        return None
    if full.startswith(before) and full.endswith(after) and len(before) + len(after) <= len(full):
        end = len(full) - len(after)
        # The turn's end marker (<|im_end|>, </s>, <end_of_turn>): what the template writes after the reply both
        # here and where the conversation stops at it (Phi-3 then adds EOS); the next turn's header is context.
        alone = _apply(tokenizer, marked[: i + 1], example).partition(_SLOT)[2]
        common = os.path.commonprefix([after, alone])
        if len(common) < len(alone.rstrip()):  # they part within a marker ("<|end|>\n<|user|>" / "<|end|>\n<|eos|>")
            common = common[: max(common.rfind("\n"), common.rfind(" ")) + 1]
        return len(before), end + len(common.rstrip())
    prompt = _apply(tokenizer, messages[:i], example, add_generation_prompt=True)
    upto = _apply(tokenizer, messages[: i + 1], example).rstrip()
    if full.startswith(prompt) and full.startswith(upto) and len(upto) > len(prompt):
        return len(prompt), len(upto)
    raise DataError(f"{example.source}: the chat template renders assistant turn {i} in a way that depends on its "
                    "text, so the reply cannot be told apart from the rest; use another data.template")


def _conversation(example: Example, tokenizer, with_options: bool) -> tuple[list[dict], str]:
    """The messages and their rendering; a system prompt the template leaves out (Mistral v0.3 and Nemo write
    it only when the last turn is the user's, never in a conversation that ends with the reply) goes into
    the first user turn, as for templates that refuse a system turn."""
    messages = chat_messages(example, with_options)
    full = _apply(tokenizer, messages, example)
    lost = [m for m in messages if m["role"] == "system" and m["content"].strip() not in full]
    folded = _fold_system(messages) if lost else None
    return (folded, _apply(tokenizer, folded, example)) if folded else (messages, full)


def _chat_segments(example: Example, tokenizer, with_options: bool, replies: str) -> list[tuple[str, bool]]:
    """The conversation as (text, trained on) pieces: the assistant's replies (the last one, or all with
    ``replies="all"``) with their end of turn, and the context between them."""
    messages, full = _conversation(example, tokenizer, with_options)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    segments, at = [], 0
    chosen = [i for n, i in enumerate(turns) if n not in example.untrained_replies] if replies == "all" else turns[-1:]
    for i in chosen:
        if not messages[i]["content"].strip():  # an earlier reply (the last is checked on loading)
            raise DataError(f"{example.source}: assistant reply {turns.index(i) + 1} of {len(turns)} is empty, and "
                            "data.chat_replies=all trains on every reply: give it text, drop the turn (and the user "
                            "message it answers), or use data.chat_replies=last")
        span = _reply_span(tokenizer, messages, i, full, example)
        if span is None and i == turns[-1]:
            raise DataError(f"{example.source}: the chat template leaves the last assistant reply out of the "
                            "conversation, so there is nothing to train on; use another data.template")
        if span is None:
            continue  # an earlier reply the template does not write: nothing of it to train on
        start, end = span
        if start < at:
            raise DataError(f"{example.source}: the chat template renders the replies out of order; use another "
                            "data.template")
        start = max(at, len(full[:start].rstrip(" ")))  # ' reply': the word-start space goes with the reply
        segments += [(full[at:start], False), (full[start:end], True)]
        at = end
    eos = tokenizer.eos_token
    last = segments[-1][0]
    if eos and last.endswith(eos):  # the encoder appends EOS itself
        segments[-1] = (last[: -len(eos)], True)
    return segments


def prompt_special_tokens(template: str) -> bool:
    """Whether the tokenizer adds its special tokens (BOS) to a prompt: a chat template writes its own."""
    return template != "chat"


def separator(template: str) -> str:
    """What goes between the prompt and the response (the choice template answers ' A')."""
    return " " if template == "choice" else ""


def render_segments(example: Example, template: str, tokenizer=None, replies: str = "last") -> list[tuple[str, bool]]:
    """The training text as (text, trained on) pieces, ending with the response; ``replies``: ``all`` trains
    on every assistant reply of a chat record (``data.template=chat``), ``last`` on the last one."""
    if template == "chat":
        return _chat_segments(example, tokenizer, True, replies)
    return [(_prompt(example, template, True), False), (separator(template) + example.response, True)]


def render(example: Example, template: str, tokenizer=None) -> tuple[str, str]:
    """(prompt, response) for evaluation and the validation loss (``tokenizer``: for ``chat`` only): the prompt is
    the text before the last reply as training sees it."""
    segments = render_segments(example, template, tokenizer)
    return "".join(text for text, _ in segments[:-1]), segments[-1][0]


def render_cloze(example: Example, template: str, tokenizer=None) -> tuple[str, list[str]]:
    """(prompt without the options listed, one continuation per option) for option log-likelihood."""
    if template == "chat":
        segments = _chat_segments(example, tokenizer, False, "last")
        prompt, lead = "".join(text for text, _ in segments[:-1]), reply_lead(template, segments[-1][0])
    else:
        prompt, lead = _prompt(example, template, False), separator(template)
    return prompt, [lead + option for option in example.options]


def reply_lead(template: str, response: str) -> str:
    """What goes before a scored answer (an option label or text) after the prompt: the separator, or for
    ``chat`` the space a template writes before the reply (Mistral's ``[/INST] reply``), which training
    reads as the reply's word-start."""
    return response[: len(response) - len(response.lstrip(" "))] if template == "chat" else separator(template)
