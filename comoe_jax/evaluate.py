"""Evaluation: restricted-label scoring, option log-likelihood, generation; per-task accuracy as JSON / markdown.

- ``label``: the log-probability of each option label right after the prompt (MoE-PEFT's
  restricted-label scoring: with one-token labels this is the logits of the labels at the
  answer position, so numbers compare with the paper's tables);
- ``loglik``: the log-likelihood of each option's text after a prompt that does not list the
  options, divided by its number of tokens (length-normalised);
- ``generate``: greedy generation with a KV cache, then the answer read off the text
  (:func:`extract_answer`: option labels, the last number for numeric answers, else exact match
  against any accepted answer).

In ``label`` and ``loglik`` mode, items are packed into rows of a fixed length (:mod:`option_packing`):
the prompt header all items share once per row, each context once, each option after it, no padding
between items, so a model compiles once or twice whatever the prompt lengths. Generation pads batches to
a few fixed lengths (``generate.LENGTH_BUCKETS``).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from comoe_jax import option_packing
from comoe_jax import sharding as shd
from comoe_jax.config import read_json
from comoe_jax.data import DataError, Example, encode, encode_pair, render, render_cloze
from comoe_jax.data.templates import prompt_special_tokens, reply_lead
from comoe_jax.errors import RunFolderError
from comoe_jax.generate import LENGTH_BUCKETS, bucket, greedy_generate, stop_token_ids
from comoe_jax.paths import as_path
from comoe_jax.progress import ItemProgress
from comoe_jax.tables import markdown_table, percent

# Prompts longer than the length budget (less the scored or generated tokens) are cut from the left (the
# question's end is kept). The budget is eval.max_len, else the model's context up to DEFAULT_MAX_LEN: scoring
# and generation attend over whole rows, whose memory grows with the square of their length.
DEFAULT_MAX_LEN = 2048


def context_length(model) -> int:
    """Tokens the model reads at once: its ``max_position_embeddings``."""
    rope = getattr(getattr(model, "spec", None), "rope", None)
    return int(getattr(rope, "max_position_embeddings", 0) or DEFAULT_MAX_LEN)


def length_budget(model, max_len: int = 0) -> int:
    """Tokens of a prompt and its continuation at most: ``max_len`` (0: ``DEFAULT_MAX_LEN``), within the
    model's context."""
    return min(max_len or DEFAULT_MAX_LEN, context_length(model))


@dataclass
class EvalResult:
    mode: str
    per_task: dict  # task -> {"accuracy", "correct", "total"}
    average: float  # mean of the per-task accuracies (the paper's "Avg")
    predictions: list = field(default_factory=list)  # {source, task, prediction, answer, correct}
    truncated: int = 0
    seconds: float = 0.0

    def to_markdown(self, title: str = "") -> str:
        rows = [[task, r["total"], percent(r["accuracy"])] for task, r in self.per_task.items()]
        rows.append(["**average**", sum(r["total"] for r in self.per_task.values()), f"**{percent(self.average)}**"])
        head = f"### {title}\n\n" if title else ""
        return head + f"mode `{self.mode}`\n\n" + markdown_table(["task", "items", "accuracy %"], rows)

    def write(self, path_stem: Path) -> None:
        """``<stem>.json`` (everything, predictions included) and ``<stem>.md``."""
        stem = as_path(path_stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_name(stem.name + ".json").write_text(json.dumps(asdict(self), indent=1))
        stem.with_name(stem.name + ".md").write_text(self.to_markdown(stem.name))


# --------------------------------------------------------------------------- jitted forwards


@partial(jax.jit, static_argnums=0)
def _next_token_logprobs(graphdef, state, ids, mask):
    """``[B, T-1]``: log p(ids[t+1] | ids[:t+1])."""
    logits = nnx.merge(graphdef, state).forward(ids, mask).logits[:, :-1]
    target = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    return target - jax.nn.logsumexp(logits, axis=-1)  # no [B, T, V] log-softmax copy


@partial(jax.jit, static_argnums=0)
def _packed_logprobs(graphdef, state, ids, positions, item, branch, cols, targets):
    """``[R, N]`` log p(targets | what the slot ``cols`` sees) for packed rows (:mod:`option_packing`), and
    whether each target is the argmax there; the LM head runs at the ``cols`` slots only."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden(ids, positions=positions, pair_mask=option_packing.visible(item, branch, jnp))
    logits = model.head(hidden[jnp.arange(ids.shape[0])[:, None], cols])
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets


def padded_batches(seqs: list[list[int]], batch_size: int, pad_id: int, left: bool = False,
                   buckets: tuple[int, ...] | int = LENGTH_BUCKETS):
    """Yield (indices, ids [batch_size, L], mask, lengths) over ``seqs`` sorted by length; L is one of
    ``buckets`` (see :func:`generate.bucket`). ``left``: pad on the left, so every row ends at the last slot."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        length = bucket(max(len(seqs[i]) for i in idx), buckets)
        ids = np.full((batch_size, length), pad_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for row, i in enumerate(idx):
            where = slice(length - len(seqs[i]), length) if left else slice(0, len(seqs[i]))
            ids[row, where], mask[row, where] = seqs[i], 1
        mask[len(idx):, -1 if left else 0] = 1  # filler rows: one real token so nothing is fully masked
        yield idx, ids, mask, np.array([len(seqs[i]) for i in idx] + [1] * (batch_size - len(idx)))


class Scorer:
    """Log-probabilities of continuations after contexts, batched and jitted; rows are split over the
    model's mesh (each device, and each host, scores its share) and the results gathered. ``progress``
    prints items/s and the ETA while it works; ``buckets``: the padded lengths of whole sequences (see
    :func:`generate.bucket`); ``row_len``: the length of packed rows (:mod:`option_packing`)."""

    def __init__(self, model, pad_id: int, batch_size: int = 16, progress: Callable[[int, int], None] | None = None,
                 buckets: tuple[int, ...] | int = LENGTH_BUCKETS, row_len: int = option_packing.ROW_LEN,
                 max_len: int = 0):
        self.max_len = length_budget(model, max_len)
        self.graphdef, self.state = nnx.split(model)
        self.mesh, self.batch_size = shd.eval_mesh(self.state, batch_size)
        self.pad_id, self.buckets, self.row_len = pad_id, buckets, row_len
        self.progress = progress or (lambda done, total: None)

    def _batches(self, seqs: list[list[int]], left: bool = False):
        return padded_batches(seqs, self.batch_size, self.pad_id, left, self.buckets)

    def continuation_logprobs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        """(sum of log-probabilities of the continuation's tokens, their number) for each pair, each pair
        encoded whole (the reference for :meth:`option_logprobs`)."""
        seqs = [ctx + cont for ctx, cont in pairs]
        out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
        for idx, ids, mask, _ in self._batches(seqs):
            lp = shd.to_host(_next_token_logprobs(self.graphdef, self.state, *shd.place_rows(self.mesh, ids, mask)))
            for row, i in enumerate(idx):
                ctx_len, cont_len = len(pairs[i][0]), len(pairs[i][1])
                out[i] = (float(lp[row, ctx_len - 1: ctx_len - 1 + cont_len].sum()), cont_len)
            self.progress(len(idx), len(pairs))
        return out

    def option_logprobs(self, contexts: list[list[int]], options: list[list[list[int]]]) -> list[np.ndarray]:
        """Summed log-probability of each option's tokens after its context (one array per item)."""
        return [total for total, _ in self.option_scores(contexts, options)]

    def option_scores(self, contexts: list[list[int]], options: list[list[list[int]]]) \
            -> list[tuple[np.ndarray, np.ndarray]]:
        """Per item: the summed log-probability of each option's tokens after its context, and whether greedy
        decoding would give each option. Items are packed into fixed-shape rows (:mod:`option_packing`): the
        prefix all contexts share once per row, each context once, each option after it."""
        totals = [np.zeros(len(opts)) for opts in options]
        greedy = [np.ones(len(opts), bool) for opts in options]
        shards = shd.batch_shards(self.mesh) if self.mesh is not None else 1
        for call in option_packing.pack_calls(contexts, options, rows_per_call=self.batch_size, pad_id=self.pad_id,
                                              row_len=self.row_len, row_multiple=shards):
            arrays = (call.ids, call.positions, call.item, call.branch, call.cols, call.targets)
            lp, top = map(shd.to_host, _packed_logprobs(self.graphdef, self.state, *shd.place_rows(self.mesh, *arrays)))
            real = call.owner[..., 0] >= 0
            for (i, j), value, hit in zip(call.owner[real], lp[real], top[real]):
                totals[i][j] += value
                greedy[i][j] &= hit
            self.progress(call.items, len(contexts))
        return list(zip(totals, greedy))


# --------------------------------------------------------------------------- the three modes


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _pairs(tokenizer, prompt: str, continuations: list[str], template: str) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids and each continuation's ids as they follow the prompt (:func:`encode_pair`)."""
    special = prompt_special_tokens(template)
    context = _ids(tokenizer, prompt, special)
    return context, [encode_pair(tokenizer, prompt, c, special, prompt_ids=context)[1] for c in continuations]


def _fit(context: list[int], room: int) -> tuple[list[int], bool]:
    room = max(room, 1)  # a continuation as long as the budget still gets its last context token
    return (context[-room:], True) if len(context) > room else (context, False)


def require_choice(examples: list[Example], mode: str, need_options: bool = False) -> None:
    """Refuse items that scoring mode ``mode`` (label / loglik) cannot score, naming the item."""
    for ex in examples:
        if not ex.labels:
            raise DataError(f"{ex.source}: eval.mode={mode} needs multiple-choice items, but task {ex.task!r} has "
                            "free-form answers; use eval.mode=generate")
        if need_options and not ex.options:
            raise DataError(f"{ex.source}: eval.mode={mode} needs the option texts, but this item lists its options "
                            "inside the instruction; use eval.mode=label or eval.mode=generate")


def label_predictions(scorer: Scorer, tokenizer, examples: list[Example], template: str) -> tuple[list[str], int]:
    """Predicted label per example (restricted-label scoring) and the number of cut prompts."""
    require_choice(examples, "label")
    contexts, conts, cut = [], [], 0
    for ex in examples:
        prompt, response = render(ex, template, tokenizer)
        context, options = _pairs(tokenizer, prompt, [reply_lead(template, response) + ex.response_prefix + label
                                                      for label in ex.labels], template)
        if _some_extends_another(options):  # "A" vs "AB": the answer's end tells them apart
            end = _answer_end(tokenizer, ex, response)
            options = [o + end for o in options]
        context, was_cut = _fit(context, scorer.max_len - max(map(len, options)))
        contexts.append(context)
        conts.append(options)
        cut += was_cut
    scores = scorer.option_logprobs(contexts, conts)
    return [ex.labels[int(np.argmax(s))] for ex, s in zip(examples, scores)], cut


def _some_extends_another(options: list[list[int]]) -> bool:
    return any(len(a) < len(b) and b[:len(a)] == a for a in options for b in options)


def _answer_end(tokenizer, ex: Example, response: str) -> list[int]:
    """The ids training puts after a label answer: the rest of the response (a chat template's end of turn) and
    EOS. Without them a label that extends another ("AB" after "A", "10" after "1") could never score higher."""
    at = response.rfind(ex.answer)
    rest = response[at + len(ex.answer):] if at >= 0 else ""
    return tokenizer(rest, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def loglik_predictions(scorer: Scorer, tokenizer, examples: list[Example], template: str) -> tuple[list[str], int]:
    """Predicted label per example by length-normalised option log-likelihood."""
    require_choice(examples, "loglik", need_options=True)
    contexts, options, cut = [], [], 0
    for ex in examples:
        context, conts = _pairs(tokenizer, *render_cloze(ex, template, tokenizer), template)
        context, was_cut = _fit(context, scorer.max_len - max(map(len, conts)))
        contexts.append(context)
        options.append(conts)
        cut += was_cut
    scores = scorer.option_logprobs(contexts, options)
    preds = [ex.labels[int(np.argmax(s / np.maximum([len(o) for o in opts], 1)))]
             for ex, s, opts in zip(examples, scores, options)]
    return preds, cut


# a sign only where it cannot be a hyphen ("15-20" is not -20); ".5" has no leading digit; U+2212 is a minus
_NUMBER = re.compile(r"(?:(?<![0-9A-Za-z.])[-\u2212])?(?:\d(?:[\d,]*\d)?(?:\.\d+)?|\.\d+)")


def _as_number(text: str) -> float | None:
    """A number written as text: thousands commas, a currency sign or a trailing percent sign allowed."""
    plain = text.strip().replace("\u2212", "-").replace(",", "").removesuffix("%")
    plain = re.sub(r"^(-?)[$\u20ac\u00a3]", r"\1", plain)  # $, EUR, GBP signs
    try:
        return float(plain)
    except ValueError:
        return None


def extract_answer(text: str, example: Example) -> str:
    """The answer in a generation. Word labels (answer1, true, ...): LLM-Adapters' rule, the first one
    mentioned. Letters: an explicit "answer is (B)" / "Answer: B", else "(B)", else the first capital letter
    standing alone that does not begin a sentence's words ("A dog", "I think" are not answers), else "b)",
    else the first letter mentioned. Free-form: the last number for numeric answers, else the text."""
    if example.labels:
        words = any(len(label) > 1 for label in example.labels)
        alt = "|".join(re.escape(label) for label in sorted(example.labels, key=len, reverse=True))
        alone = rf"(?<![A-Za-z0-9])({alt})(?![A-Za-z0-9])"
        patterns = [alone] if words else [
            rf"(?i:answer(?:\s+is)?)\s*[:\-]?\s*\(?({alt})(?![A-Za-z0-9])", rf"\(({alt})\)",
            alone + r"(?!\s+[a-z])", rf"(?<![A-Za-z0-9])({alt.lower()})\)", alone]
        for pattern in patterns:
            if m := re.search(pattern, text, flags=re.I if words else 0):
                return next(label for label in example.labels if label.lower() == m.group(1).lower())
        return ""
    if _as_number(example.answer) is not None:
        numbers = _NUMBER.findall(text)
        # no number at all: the text, which may match an accepted spelled-out answer
        return numbers[-1].replace(",", "").replace("\u2212", "-") if numbers else text.strip()
    return text.strip()


def is_correct(prediction: str, example: Example) -> bool:
    if example.labels:
        return prediction == example.answer
    want, got = _as_number(example.answer), _as_number(prediction) if prediction else None
    if want is not None:
        wants = [want, *(v for v in map(_as_number, example.also_correct) if v is not None)]
        if got is not None and any(math.isclose(got, w, rel_tol=1e-4, abs_tol=1e-3) for w in wants):
            return True
    norm = lambda s: s.strip().strip(".").lower()  # noqa: E731
    return any(norm(prediction) == norm(answer) for answer in (example.answer, *example.also_correct))


def generate_predictions(model, tokenizer, examples: list[Example], template: str, *, max_new_tokens: int,
                         batch_size: int, progress=None, max_len: int = 0) -> tuple[list[str], int, list[str]]:
    """Extracted answers, cut prompts, and the raw generations."""
    prompts, cut = [], 0
    for ex in examples:
        prompt, _ = render(ex, template, tokenizer)
        ids, was_cut = _fit(_ids(tokenizer, prompt, prompt_special_tokens(template)),
                            length_budget(model, max_len) - max_new_tokens)
        prompts.append(ids)
        cut += was_cut
    tokens = greedy_generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=stop_token_ids(tokenizer),
                             pad_id=tokenizer.pad_token_id, batch_size=batch_size, progress=progress)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return [extract_answer(after_reasoning(text), ex) for text, ex in zip(texts, examples)], cut, texts


def after_reasoning(text: str, end: str = "</think>") -> str:
    """The answer part of a generation: what follows a reasoning block (Qwen3's chat template trains even a
    direct answer as ``<think>\n\n</think>\n\nanswer``), else the whole text."""
    return text.rsplit(end, 1)[1] if end in text else text


def loss_pairs(tokenizer, examples: list[Example], template: str, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of the examples that keep a response token when cut at ``seq_len`` as in
    training; a DataError when none does."""
    pairs = []
    for ex in examples:
        prompt, response = render(ex, template, tokenizer)
        ids, is_response, _ = encode(tokenizer, prompt, response, seq_len, prompt_special_tokens(template))
        start = int(np.argmax(is_response))
        if is_response.any() and start > 0:
            pairs.append((ids[:start].tolist(), ids[start:].tolist()))
    if not pairs:
        sources = sorted({ex.source.rsplit(":", 1)[0].rsplit(" record", 1)[0] for ex in examples})
        raise DataError(f"no validation item of {', '.join(sources[:3])} keeps a response token within "
                        f"data.seq_len={seq_len} (the validation loss is the training loss); raise data.seq_len")
    return pairs


def response_loss(model, tokenizer, examples: list[Example], *, template: str, seq_len: int,
                  batch_size: int = 16) -> float:
    """Mean cross-entropy per response token (the training CE: response and EOS, each example alone, cut
    at ``seq_len`` as in training) of ``model`` on ``examples``."""
    pairs = loss_pairs(tokenizer, examples, template, seq_len)
    contexts, responses = zip(*pairs)  # packed rows: the shared header once per row, the LM head at the responses
    scores = Scorer(model, tokenizer.pad_token_id, batch_size).option_logprobs(list(contexts), [[r] for r in responses])
    return -sum(float(s[0]) for s in scores) / sum(map(len, responses))


def evaluate(model, tokenizer, examples: list[Example], *, mode: str, template: str, batch_size: int = 16,
             max_new_tokens: int = 16, say=None, max_len: int = 0) -> EvalResult:
    """Accuracy per task (and macro average) of ``model`` on ``examples``; ``say`` prints progress lines
    (items/s, ETA); ``max_len``: see :func:`length_budget`."""
    start = time.perf_counter()
    generations = None
    progress = ItemProgress(f"eval ({mode})", say=say) if say is not None else None
    if mode == "generate":
        preds, cut, generations = generate_predictions(model, tokenizer, examples, template,
                                                       max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                       progress=progress, max_len=max_len)
    else:
        scorer = Scorer(model, tokenizer.pad_token_id, batch_size, progress, max_len=max_len)
        scorer_fn = label_predictions if mode == "label" else loglik_predictions
        preds, cut = scorer_fn(scorer, tokenizer, examples, template)
    per_task: dict[str, dict] = {}
    records = []
    for i, (ex, pred) in enumerate(zip(examples, preds)):
        ok = is_correct(pred, ex)
        r = per_task.setdefault(ex.task, {"correct": 0, "total": 0})
        r["correct"] += ok
        r["total"] += 1
        records.append({"source": ex.source, "task": ex.task, "prediction": pred, "answer": ex.answer, "correct": ok}
                       | ({"generation": generations[i]} if generations else {}))
    for r in per_task.values():
        r["accuracy"] = r["correct"] / r["total"]
    average = float(np.mean([r["accuracy"] for r in per_task.values()])) if per_task else 0.0
    if cut and say is not None:
        say(f"warning: {cut} of {len(examples)} prompts are longer than the length budget "
            f"({length_budget(model, max_len)} tokens: eval.max_len, else the model's context up to "
            f"{DEFAULT_MAX_LEN}) and were cut from the left")
    return EvalResult(mode, per_task, average, records, cut, time.perf_counter() - start)


def load_eval(path: Path) -> EvalResult | None:
    """An :class:`EvalResult` written by :meth:`EvalResult.write` (None if the file does not exist)."""
    path = as_path(path)
    if not path.exists():
        return None
    data = read_json(path, RunFolderError)
    try:
        return EvalResult(**data)
    except TypeError:
        raise RunFolderError(f"{path}: not an evaluation result written by comoe-jax (fields {sorted(data)[:6]})") \
            from None


def comparison_markdown(before: EvalResult, after: EvalResult, title: str) -> str:
    """Before / after accuracy per task, the paper's table layout. Evaluations on other items or in another
    mode (a run resumed with changed ``eval.*`` settings) are shown side by side, without a change row."""
    tasks = list(dict.fromkeys([*after.per_task, *before.per_task]))

    def accuracy(result: EvalResult, task: str):
        return result.per_task[task]["accuracy"] if task in result.per_task else None

    def items(result: EvalResult) -> int:
        return sum(r["total"] for r in result.per_task.values())

    rows = [[name] + [percent(accuracy(r, t)) for t in tasks] + [percent(r.average)]
            for name, r in (("before", before), ("after", after))]
    same = before.mode == after.mode and {t: r["total"] for t, r in before.per_task.items()} == \
        {t: r["total"] for t, r in after.per_task.items()}
    if not same:
        return (f"## {title}\n\naccuracy %; not comparable: before training mode `{before.mode}` on "
                f"{items(before)} items, after training mode `{after.mode}` on {items(after)} items (the run was "
                "resumed with other eval.* settings; `evaluate.py` scores both on the same items)\n\n"
                + markdown_table(["", *tasks, "Avg"], rows))
    rows.append(["change"] + [percent(accuracy(after, t) - accuracy(before, t), signed=True) for t in tasks]
                + [percent(after.average - before.average, signed=True)])
    return (f"## {title}\n\naccuracy %, mode `{after.mode}`, {items(after)} items\n\n"
            + markdown_table(["", *tasks, "Avg"], rows))
