"""Prompt templates: an Example -> (prompt, response) text pair.

- ``alpaca``: the Alpaca template of LLM-Adapters, which the paper's data uses (with an
  ``### Input:`` section when the example has a context);
- ``choice``: MoE-PEFT's plain multiple-choice prompt ("Please choose the correct answer to the
  question: ... (A) ... (B) ...\\nAnswer:" -> " A"), the form its restricted-label evaluator scores;
- ``plain``: "Q: ...\\nA: ", short, for byte-level tokenizers and tiny test models;
- ``raw``: the instruction as written (after the context and a newline, if there is one) and the response
  as written (prompt-completion data that carries its own format; free-form items only);
- ``chat``: the tokenizer's own chat template (``apply_chat_template``): a chat record's turns, or
  the instruction as the user's message; the response is the assistant's reply and its end of turn.

Multiple-choice examples list their options as ``(A) text`` lines and are answered with the label.
"""

from __future__ import annotations

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


def _chat(example: Example, tokenizer, with_options: bool) -> tuple[str, str]:
    """(generation prompt, reply + end of turn) with the tokenizer's chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template=chat needs a tokenizer with a chat template (chat_template.jinja or "
                        "tokenizer_config.json's chat_template); this one has none: use alpaca, choice, plain or raw")
    messages = chat_messages(example, with_options)
    try:
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except ImportError as e:  # transformers renders chat templates with jinja2
        raise DataError(f"data.template=chat needs jinja2 to render the chat template: pip install jinja2 ({e})") \
            from None
    except Exception as e:  # noqa: BLE001  (a template that raises on this conversation: jinja's error types)
        raise DataError(f"{example.source}: the tokenizer's chat template cannot render this conversation "
                        f"({type(e).__name__}: {e})") from None
    if not full.startswith(prompt):
        raise DataError(f"{example.source}: the chat template renders the conversation before the reply differently "
                        "from its generation prompt, so the reply cannot be told apart; use another data.template")
    response = full[len(prompt):].rstrip()
    eos = tokenizer.eos_token
    if eos and response.endswith(eos):  # the encoder appends EOS itself
        response = response[: -len(eos)]
    return prompt, response


def prompt_special_tokens(template: str) -> bool:
    """Whether the tokenizer adds its special tokens (BOS) to a prompt: a chat template writes its own."""
    return template != "chat"


def separator(template: str) -> str:
    """What goes between the prompt and the response (the choice template answers ' A')."""
    return " " if template == "choice" else ""


def render(example: Example, template: str, tokenizer=None) -> tuple[str, str]:
    """(prompt, response) for training and for label scoring (``tokenizer``: for ``chat`` only)."""
    if template == "chat":
        return _chat(example, tokenizer, True)
    return _prompt(example, template, True), separator(template) + example.response


def render_cloze(example: Example, template: str, tokenizer=None) -> tuple[str, list[str]]:
    """(prompt without the options listed, one continuation per option) for option log-likelihood."""
    prompt = _chat(example, tokenizer, False)[0] if template == "chat" else _prompt(example, template, False)
    return prompt, [separator(template) + option for option in example.options]
