"""The one record every loader produces, and the error every loader raises."""

from __future__ import annotations

from dataclasses import dataclass

from comoe_jax.errors import DataError

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Example:
    """One training or test item, whatever file it came from.

    instruction: what the model is asked (the template may list ``options`` under it).
    options: option texts the template shows as (A) ..., (B) ...; empty when the
      instruction already shows them or the task is free-form.
    labels: what the model answers with, one per choice ("A", "B", ... or
      "answer1", ... or "true", "false"); empty for free-form tasks.
    answer: the correct label (multiple choice) or the reference answer (free-form).
    output: the training response; empty means the answer itself.
    context: an extra input paragraph (LLM-Adapters' ``input``; a chat's system message).
    source: "file:line" (or "file#index"), for messages.
    messages: a chat record's ``(role, content)`` turns, ending with the assistant reply the loss is
      taken on (``data.template=chat`` renders them with the tokenizer's chat template); empty otherwise.
    untrained_replies: which of a chat record's assistant replies (0-based, counting replies only) are left
      out of the loss (OpenAI's ``"weight": 0``) when ``data.chat_replies=all`` trains on every reply.
    also_correct: further accepted answers of a free-form item (BIG-bench lists several targets);
      ``answer`` is the one trained on.
    """

    task: str
    instruction: str
    answer: str
    options: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    output: str = ""
    context: str = ""
    source: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    untrained_replies: tuple[int, ...] = ()
    also_correct: tuple[str, ...] = ()

    @property
    def is_choice(self) -> bool:
        return bool(self.labels)

    @property
    def response(self) -> str:
        return self.output or self.answer

    @property
    def answer_index(self) -> int:
        return self.labels.index(self.answer)

    @property
    def response_prefix(self) -> str:
        """Text of the response before the answer label ('the correct answer is ' in LLM-Adapters)."""
        response = self.response
        at = response.rfind(self.answer)
        return response[:at] if self.answer and at >= 0 else ""


def multiple_choice(task: str, instruction: str, options, correct: str, source: str, context: str = "") -> Example:
    """An example whose options are lettered A, B, ...; ``correct`` is the correct option's text."""
    options = tuple(str(o).strip() for o in options)
    if len(options) < 2:
        raise DataError(f"{source}: field 'options' has {len(options)} option(s); a multiple-choice item needs 2 "
                        "or more")
    if len(options) > len(OPTION_LETTERS):
        raise DataError(f"{source}: field 'options' has {len(options)} options; at most {len(OPTION_LETTERS)}")
    if len(set(options)) != len(options):
        raise DataError(f"{source}: field 'options' repeats an option: {list(options)}")
    if "" in options:  # an empty continuation scores log-likelihood 0 and would win every item
        raise DataError(f"{source}: field 'options' has an empty option (option {OPTION_LETTERS[options.index('')]})")
    correct = str(correct).strip()
    if correct not in options:
        raise DataError(f"{source}: field 'answer' {correct!r} is not among the options {list(options)}")
    labels = tuple(OPTION_LETTERS[: len(options)])
    return Example(task=task, instruction=instruction.strip(), answer=labels[options.index(correct)],
                   options=options, labels=labels, context=context.strip(), source=source)
