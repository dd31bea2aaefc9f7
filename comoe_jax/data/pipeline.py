"""Tokenization (response-only loss), per-task mixing, packing, and a checkpointable batch stream (grain).

``TrainStream`` yields batches of ``[B, T]`` arrays:

- ``input_ids`` and ``targets`` (the next token), ``positions`` (restart at 0 in each packed example),
- ``segment_ids`` (1, 2, ... per packed example, 0 = padding; attention stays within a segment),
- ``attention_mask`` (1 for real tokens), ``loss_mask`` (1 where the target is a response token of
  the same example), ``task_ids`` (index into ``TrainStream.tasks``, -1 for padding).

The stream is a grain pipeline: each task's examples are shuffled and repeated with a fixed
seed, mixed by ``data.mix_weights`` (default: in proportion to their sizes), then packed
(first-fit) or padded. ``get_state()`` is a small JSON dict stored in every checkpoint, so a
resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import grain
import numpy as np

from comoe_jax.data.records import DataError, Example
from comoe_jax.data.templates import render

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
        return "data: " + ", ".join(parts)


def check_tokenizer(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no pad token: set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, so responses cannot be terminated")


def encode(tokenizer, prompt: str, response: str, seq_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Token ids (at most ``seq_len + 1``), the response mask over them, and whether they were cut.

    The prompt takes the tokenizer's special tokens (BOS where it adds one); the response is
    followed by EOS and is the only part the loss sees.
    """
    check_tokenizer(tokenizer)
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids, is_response = (p + r)[: seq_len + 1], ([0] * len(p) + [1] * len(r))[: seq_len + 1]
    return np.array(ids, np.int32), np.array(is_response, np.int32), len(p) + len(r) > seq_len + 1


def tokenize(tokenizer, examples: list[Example], template: str, seq_len: int,
             tasks: tuple[str, ...]) -> tuple[dict[str, list[dict]], TokenCounts]:
    """Records ``{ids, response, task}`` per task; examples with no response token left are left out."""
    out: dict[str, list[dict]] = {t: [] for t in tasks}
    counts = TokenCounts()
    for ex in examples:
        prompt, response = render(ex, template)
        ids, is_response, cut = encode(tokenizer, prompt, response, seq_len)
        if not is_response[1:].any():
            counts.dropped[ex.task] += 1
            continue
        counts.kept[ex.task] += 1
        counts.truncated[ex.task] += cut
        out[ex.task].append({"ids": ids, "response": is_response,
                             "task": np.full(len(ids), tasks.index(ex.task), np.int32)})
    empty = [t for t in tasks if not out[t]]
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


class TrainStream:
    """Infinite, deterministic, checkpointable stream of training batches (see the module docstring)."""

    def __init__(self, records: dict[str, list[dict]], *, batch_size: int, seq_len: int, seed: int,
                 packing: bool, pad_id: int, weights: dict[str, float] | None = None):
        self.tasks = tuple(records)
        sizes = [len(records[t]) for t in self.tasks]
        weights = weights or {}
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise DataError(f"data.mix_weights names task(s) {', '.join(unknown)} not in the training data "
                            f"({', '.join(self.tasks)})")
        mix = [float(weights.get(t, n)) for t, n in zip(self.tasks, sizes)]
        per_task = [grain.MapDataset.source(records[t]).shuffle(seed=seed + i).repeat()
                    for i, t in enumerate(self.tasks)]
        stream = grain.MapDataset.mix(per_task, weights=mix).to_iter_dataset()
        length = seq_len + 1
        if packing:
            stream = grain.experimental.FirstFitPackIterDataset(
                stream, length_struct={"ids": length, "response": length, "task": length},
                num_packing_bins=batch_size, seed=seed, shuffle_bins=False)
        else:
            stream = stream.map(lambda r: _pad(r, length, pad_id))
        self.dataset = stream.batch(batch_size, drop_remainder=True)
        self.iterator = iter(self.dataset)
        self.weights = dict(zip(self.tasks, np.array(mix) / sum(mix)))

    def next_batch(self) -> dict[str, np.ndarray]:
        return _to_model_batch(next(self.iterator))

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)
