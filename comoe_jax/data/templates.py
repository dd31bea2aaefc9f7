"""Prompt templates: an Example -> (prompt, response) text pair.

- ``alpaca``: the Alpaca template of LLM-Adapters, which the paper's data uses (with an
  ``### Input:`` section when the example has a context);
- ``choice``: MoE-PEFT's plain multiple-choice prompt ("Please choose the correct answer to the
  question: ... (A) ... (B) ...\\nAnswer:" -> " A"), the form its restricted-label evaluator scores;
- ``plain``: "Q: ...\\nA: ", short, for byte-level tokenizers and tiny test models.

Multiple-choice examples list their options as ``(A) text`` lines and are answered with the label.
"""

from __future__ import annotations

from comoe_jax.constants import TEMPLATES
from comoe_jax.data.records import Example

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
    raise ValueError(f"data.template={template!r} is not allowed: one of {', '.join(TEMPLATES)}")


def separator(template: str) -> str:
    """What goes between the prompt and the response (the choice template answers ' A')."""
    return " " if template == "choice" else ""


def render(example: Example, template: str) -> tuple[str, str]:
    """(prompt, response) for training and for label scoring."""
    return _prompt(example, template, True), separator(template) + example.response


def render_cloze(example: Example, template: str) -> tuple[str, list[str]]:
    """(prompt without the options listed, one continuation per option) for option log-likelihood."""
    return _prompt(example, template, False), [separator(template) + option for option in example.options]
