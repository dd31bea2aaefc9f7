"""Tokenization (response-only loss), per-task mixing, packing, and a checkpointable batch stream (grain).

``TrainStream`` yields batches of ``[B, T]`` arrays:

- ``input_ids`` and ``targets`` (the next token), ``positions`` (restart at 0 in each packed example),
- ``segment_ids`` (1, 2, ... per packed example, 0 = padding; attention stays within a segment),
- ``attention_mask`` (1 for real tokens), ``loss_mask`` (1 where the target is a response token of
  the same example), ``task_ids`` (index into ``TrainStream.tasks``, -1 for padding).

Rows are independent streams, so that several processes can each feed only their own rows of the
global batch: in a seeded random order of each task's examples, the j-th belongs to row ``j % batch_size``
(a task with fewer examples than rows lends each to several rows; :func:`assign_rows`), and row r's grain
pipeline shuffles and repeats its share of each task with a seed of its own, mixes the tasks by
``data.mix_weights`` (default: in proportion to the tasks' sizes in the whole data) in an order of its
own (windows of ``MIX_WINDOW`` examples shuffled, so a batch holds several tasks and the weights hold
per window, within an example) and packs examples first-fit into ``PACKING_BINS`` open rows (emitted one at
a time) or pads one example per row. A process tokenizes only the examples of its rows; whatever the
number of processes, row r holds the same tokens. ``get_state()`` is a small JSON dict per row (and a
fingerprint of the examples) stored in every checkpoint, so a resumed run (on any number of processes)
continues with exactly the batches it would have seen, and is refused if the data changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

import grain
import numpy as np

from comoe_jax.data.records import DataError, Example
from comoe_jax.data.templates import prompt_special_tokens, render_segments

PACKING_BINS = 8  # first-fit packing keeps this many rows of each row stream open at a time
MIX_WINDOW = 1024  # examples of a row's mixed stream shuffled together (the task weights hold per window)
BATCH_ARRAYS = ("input_ids", "targets", "loss_mask", "attention_mask", "positions", "segment_ids")


@dataclass
class TokenCounts:
    """Per task: examples kept, examples cut at ``seq_len``, examples left out (no response token left)."""

    kept: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)

    def summary(self, seq_len: int) -> str:
        parts = [f"{t} {self.kept[t]}" + (f" ({self.truncated[t]} truncated)" if self.truncated[t] else "")
                 + (f" ({self.dropped[t]} left out: no response token within data.seq_len={seq_len})"
                    if self.dropped[t] else "") for t in sorted(self.kept | self.dropped)]
        all_cut = [t for t in sorted(self.kept) if self.kept[t] and self.truncated[t] == self.kept[t]]
        warning = (f"\nwarning: every example of {', '.join(all_cut)} is cut at data.seq_len={seq_len} (the model "
                   "never sees a whole answer and its end of sequence); raise data.seq_len") if all_cut else ""
        return "data: " + ", ".join(parts) + warning


def check_tokenizer(tokenizer, encodes: bool = False) -> None:
    """Refuse a tokenizer without pad or EOS token; with ``encodes``, also one that turns text into nothing."""
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no pad token: set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, so responses cannot be terminated")
    if encodes and not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        raise DataError(f"the tokenizer ({type(tokenizer).__name__}, {len(tokenizer)} tokens) turns text into no "
                        "tokens: its vocabulary files (tokenizer.json, tokenizer.model) are missing or broken")


def check_token_ids(records: dict[int, dict[str, list[dict]]], tokenizer, vocab_size: int | None, model: str) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer of another model): they would train on NaN."""
    largest = max((int(r["ids"].max()) for tasks in records.values() for rs in tasks.values() for r in rs), default=-1)
    largest = max(largest, tokenizer.pad_token_id, tokenizer.eos_token_id)
    if vocab_size is not None and largest >= vocab_size:
        raise DataError(f"the tokenizer gives token id {largest} ({len(tokenizer)} tokens), but the model "
                        f"{model} has vocab_size={vocab_size}: the tokenizer does not belong to this model")


def encode_pair(tokenizer, prompt: str, continuation: str, special_tokens: bool = True,
                prompt_ids: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``continuation`` as the tokenizer splits ``prompt + continuation``.

    A continuation encoded on its own can start differently from the same text after its prompt:
    SentencePiece tokenizers (Llama 2, Mistral) write a word-start marker before the first word of
    every text, so "Paris" alone gives ``▁Pa ris`` where "...Response:\nParis" gives ``Pa ris``.
    The continuation's ids are therefore those the whole text has after the prompt's ids (as
    lm-evaluation-harness splits context and continuation). Where a token spans the boundary, so
    that the whole text does not begin with the prompt's ids, the continuation is encoded alone.
    ``prompt_ids``: the prompt's ids if already encoded (several continuations of one prompt).
    """
    p = tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"] if prompt_ids is None else prompt_ids
    if not continuation:
        return p, []
    whole = tokenizer(prompt + continuation, add_special_tokens=special_tokens)["input_ids"]
    if len(whole) > len(p) and whole[: len(p)] == p:
        return p, whole[len(p):]
    return p, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def encode(tokenizer, prompt: str, response: str, seq_len: int,
           special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray, bool]:
    """Token ids (at most ``seq_len + 1``), the response mask over them, and whether they were cut.

    The prompt takes the tokenizer's special tokens (BOS where it adds one) unless ``special_tokens``
    is False (a chat template writes its own); the response is followed by EOS and is the only part
    the loss sees.
    """
    return encode_segments(tokenizer, [(prompt, False), (response, True)], seq_len, special_tokens)


def encode_segments(tokenizer, segments: list[tuple[str, bool]], seq_len: int,
                    special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray, bool]:
    """:func:`encode` for a text in (text, trained on) pieces ending with the response (several replies
    of a conversation): each piece's ids are those the text up to it has after the ids before it."""
    check_tokenizer(tokenizer)
    ids, mask, text = [], [], ""
    for k, (piece, trained) in enumerate(segments):
        if k == 0:  # with the special tokens the tokenizer adds to a text (BOS)
            new = tokenizer(piece, add_special_tokens=special_tokens)["input_ids"]
        else:
            new = encode_pair(tokenizer, text, piece, special_tokens, prompt_ids=ids)[1]
        ids, mask, text = ids + new, mask + [int(trained)] * len(new), text + piece
    ids, mask = ids + [tokenizer.eos_token_id], mask + [1]
    return np.array(ids[: seq_len + 1], np.int32), np.array(mask[: seq_len + 1], np.int32), len(ids) > seq_len + 1


def assign_rows(examples: list[Example], batch_size: int, seed: int = 0) -> list[tuple[int, ...]]:
    """The batch rows each example feeds. Each task's examples are put in a seeded random order (so that
    what a row holds does not follow the file's order, e.g. long and short items alternating) and the j-th
    goes to row ``j % batch_size``; a task with fewer examples than rows gives each example to several rows
    (row r holds example ``r % n``), so that every row mixes every task and the tasks' shares hold."""
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_task.setdefault(ex.task, []).append(i)
    rows: list[tuple[int, ...]] = [()] * len(examples)
    for t, (task, members) in enumerate(by_task.items()):
        order = np.random.default_rng([seed, t]).permutation(len(members))
        n = len(members)
        for j, k in enumerate(order):
            rows[members[k]] = tuple(range(j, batch_size, n)) if n < batch_size else (j % batch_size,)
    return rows


def tokenize(tokenizer, examples: list[Example], template: str, seq_len: int,
             tasks: tuple[str, ...], replies: str = "all") -> tuple[dict[str, list[dict]], TokenCounts]:
    """Records ``{ids, response, task}`` per task; examples with no response token left are left out."""
    by_rows, counts = tokenize_rows(tokenizer, examples, [(0,)] * len(examples), template, seq_len, tasks, replies)
    return by_rows[0], counts


def tokenize_rows(tokenizer, examples: list[Example], rows: list[tuple[int, ...]], template: str, seq_len: int,
                  tasks: tuple[str, ...], replies: str = "all") -> tuple[dict[int, dict[str, list[dict]]], TokenCounts]:
    """Records ``{ids, response, task}`` per row (``rows[i]``: the rows example i feeds) and task; examples
    with no response token left are left out and counted (once, whatever their number of rows).
    ``replies``: which replies of a multi-turn chat record are trained on (``data.chat_replies``)."""
    out: dict[int, dict[str, list[dict]]] = {r: {t: [] for t in tasks} for rs in rows for r in rs}
    counts = TokenCounts()
    for ex, ex_rows in zip(examples, rows):
        segments = render_segments(ex, template, tokenizer, replies)
        ids, is_response, cut = encode_segments(tokenizer, segments, seq_len, prompt_special_tokens(template))
        if not is_response[1:].any():
            counts.dropped[ex.task] += 1
            continue
        counts.kept[ex.task] += 1
        counts.truncated[ex.task] += cut
        record = {"ids": ids, "response": is_response, "task": np.full(len(ids), tasks.index(ex.task), np.int32)}
        for row in ex_rows:
            out[row][ex.task].append(record)
    empty = [t for t in tasks if not any(out[r][t] for r in out)]
    if empty:
        raise DataError(f"no usable training examples for task(s) {', '.join(empty)}: every response was cut "
                        f"off by data.seq_len={seq_len}, or the task has no examples")
    return out, counts


def _pad(record: dict, length: int, pad_id: int) -> dict:
    n = len(record["ids"])
    pad = length - n
    return {"ids": np.pad(record["ids"], (0, pad), constant_values=pad_id),
            "ids_segment_ids": np.pad(np.ones(n, np.int32), (0, pad)),
            "ids_positions": np.pad(np.arange(n, dtype=np.int32), (0, pad)),
            "response": np.pad(record["response"], (0, pad)),
            "task": np.pad(record["task"], (0, pad), constant_values=-1)}


def _to_model_batch(b: dict) -> dict[str, np.ndarray]:
    """Rows of ``seq_len + 1`` tokens -> model inputs and next-token targets of ``seq_len``."""
    seg = b["ids_segment_ids"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    task = np.where(seg > 0, b["task"], -1)
    return {"input_ids": b["ids"][:, :-1].astype(np.int32), "targets": b["ids"][:, 1:].astype(np.int32),
            "loss_mask": (b["response"][:, 1:] * same).astype(np.int32),
            "attention_mask": (seg[:, :-1] > 0).astype(np.int32), "positions": b["ids_positions"][:, :-1],
            "segment_ids": seg[:, :-1].astype(np.int32), "task_ids": task[:, :-1].astype(np.int32)}


class WindowShuffled:
    """A sequence view of ``items`` (indexable, of any length) whose consecutive windows of ``window``
    elements (the last one possibly shorter) are each put in a random order of their own (seeded by ``seed``
    and the window's number)."""

    def __init__(self, items, window: int, seed):
        self.items, self.window, self.seed = items, window, list(seed)
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        block, offset = divmod(int(index), self.window)
        if self._cached is None or self._cached[0] != block:  # reads are sequential: one window at a time
            size = min(self.window, len(self.items) - block * self.window)
            self._cached = (block, np.random.default_rng([*self.seed, block]).permutation(size))
        return self.items[block * self.window + int(self._cached[1][offset])]


def data_fingerprint(examples: list[Example]) -> dict:
    """Examples per task and a hash of every example's contents, in order (what a run reads). Not where they
    were read from (``source`` holds a path), so a run resumes from another checkout, machine or host."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps(dataclasses.astuple(dataclasses.replace(ex, source="")), default=str).encode())
    return {"examples": dict(Counter(ex.task for ex in examples)), "sha256": digest.hexdigest()[:16]}


def _data_change(saved: dict, now: dict) -> str:
    before, after = saved.get("examples", {}), now["examples"]
    changed = [f"{t}: {before.get(t, 0)} -> {after.get(t, 0)}" for t in dict.fromkeys([*before, *after])
               if before.get(t, 0) != after.get(t, 0)]
    return "examples per task " + ", ".join(changed) if changed else "same counts, other contents"


def _seed32(seed: int) -> int:
    """grain's seeds are 32-bit: a row's derived seed wraps rather than overflow for seeds near 2**32."""
    return seed % 2**32


def by_row(records: dict[str, list[dict]], batch_size: int, rows=None) -> dict[int, dict[str, list[dict]]]:
    """Records of every task split over the rows (record j of a task to row ``j % batch_size``)."""
    rows = range(batch_size) if rows is None else rows
    return {r: {t: recs[r::batch_size] for t, recs in records.items()} for r in rows}


class TrainStream:
    """Infinite, deterministic, checkpointable stream of training batches (see the module docstring).

    Args:
      records_by_row: for each row this process feeds, the tokenized records of each task.
      task_sizes: examples per task in the whole data (every process), the default mixing weights.
      weights: ``data.mix_weights`` (task -> weight); tasks not named weigh their size.
    ``next_batch()`` gives the rows of ``records_by_row`` in increasing order.
    """

    def __init__(self, records_by_row: dict[int, dict[str, list[dict]]], *, batch_size: int, seq_len: int,
                 seed: int, packing: bool, pad_id: int, task_sizes: dict[str, int],
                 weights: dict[str, float] | None = None, fingerprint: dict | None = None):
        self.tasks = tuple(task_sizes)
        self.fingerprint = fingerprint  # saved with the position: a resumed run must read the same examples
        self.unverified = False  # set_state: the saved position had no fingerprint to check
        weights = weights or {}
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise DataError(f"data.mix_weights names task(s) {', '.join(unknown)} not in the training data "
                            f"({', '.join(self.tasks)})")
        mix = {t: float(weights.get(t, n)) for t, n in task_sizes.items()}
        self.weights = {t: w / sum(mix.values()) for t, w in mix.items()}
        self.rows = sorted(records_by_row)
        self.batch_size = batch_size
        self.iterators = {r: iter(self._row(records_by_row[r], r, mix, seq_len + 1, seed, packing, pad_id))
                          for r in self.rows}

    def _row(self, records: dict[str, list[dict]], row: int, mix: dict, length: int, seed: int, packing: bool,
             pad_id: int):
        tasks = [t for t in self.tasks if records.get(t)]
        if not tasks:
            raise DataError(f"batch row {row} has no training example: every example assigned to it was left "
                            f"out (no response token within data.seq_len); raise data.seq_len")
        per_task = [grain.MapDataset.source(records[t]).shuffle(
                        seed=_seed32(seed + 7919 * row + self.tasks.index(t)))
                    .repeat() for t in tasks]
        # grain's mix interleaves the tasks in one fixed pattern (the same in every row: a batch would hold one
        # task at a time); shuffling it in windows keeps the weights per window and makes rows differ.
        mixed = grain.MapDataset.mix(per_task, weights=[mix[t] for t in tasks])
        # The records are in memory: reading them on prefetch threads only adds GIL contention (grain's advice).
        stream = grain.MapDataset.source(WindowShuffled(mixed, MIX_WINDOW, seed=[seed, row])).to_iter_dataset(
            grain.ReadOptions(num_threads=0))
        if packing:
            return grain.experimental.FirstFitPackIterDataset(
                stream, length_struct={"ids": length, "response": length, "task": length},
                num_packing_bins=PACKING_BINS, seed=_seed32(seed + row), shuffle_bins=False)
        return stream.map(lambda r: _pad(r, length, pad_id))

    def next_batch(self) -> dict[str, np.ndarray]:
        rows = [next(self.iterators[r]) for r in self.rows]
        return _to_model_batch({k: np.stack([row[k] for row in rows]) for k in rows[0]})

    def get_state(self) -> dict:
        """Per row (keys are row numbers as text, JSON-ready) the position of its stream; ``"data"``: the
        fingerprint of the examples it reads."""
        fingerprint = {} if self.fingerprint is None else {"data": self.fingerprint}
        return {str(r): it.get_state() for r, it in self.iterators.items()} | fingerprint

    def set_state(self, state: dict) -> None:
        """Continue from :meth:`get_state` output (of any process: only this process's rows are read). A
        position saved over other examples (the data files changed since) is refused."""
        saved = state.get("data")
        self.unverified = saved is None  # a checkpoint from before fingerprints: the caller warns
        if saved is not None and self.fingerprint is not None and saved != self.fingerprint:
            change = _data_change(saved, self.fingerprint)
            raise DataError(f"the training data changed since this run was checkpointed ({change}): its saved "
                            "position would continue over other examples; restore the data, or train a new run in "
                            "another train.output_dir")
        missing = [r for r in self.rows if str(r) not in state]
        if missing:
            raise DataError(f"the saved data position has no entry for batch row(s) {missing[:4]}; it was written "
                            "by another version or with another train.batch_size")
        for r, it in self.iterators.items():
            it.set_state(state[str(r)])
