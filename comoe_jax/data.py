"""Training batches: a small built-in multi-task instruction set, Alpaca prompts, response-only loss.

Batches are a pure function of ``(seed, step)``, so a resumed run sees exactly the
examples an uninterrupted run would, and every process of a multi-host run builds
the same global batch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

BUILTIN_TASKS = ("add", "reverse", "upper", "sort", "antonym")
BATCH_ARRAYS = ("input_ids", "targets", "loss_mask", "attention_mask")  # what the train step reads

TEMPLATES = {
    # The Alpaca template the paper's LLM-Adapters data uses.
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
    # A short one for byte-level tokenizers and tiny test models.
    "plain": "Q: {instruction}\nA: ",
}

_WORDS = (
    "apple river stone garden window paper silver forest candle rabbit orange pencil mirror button castle "
    "planet guitar bottle summer winter yellow purple dragon rocket flower market bridge island monkey "
    "cookie basket ladder marble pepper tunnel velvet wizard zebra anchor banana cactus donkey engine falcon "
    "harbor igloo jacket kettle lemon magnet needle oyster parrot quartz saddle tomato violin walnut"
).split()

_ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("early", "late"), ("hard", "soft"), ("high", "low"), ("rich", "poor"), ("old", "young"),
    ("full", "empty"), ("wet", "dry"), ("strong", "weak"), ("loud", "quiet"), ("long", "short"), ("thick", "thin"),
    ("near", "far"), ("clean", "dirty"), ("heavy", "light"), ("true", "false"), ("win", "lose"), ("buy", "sell"),
    ("push", "pull"), ("first", "last"), ("inside", "outside"), ("always", "never"), ("friend", "enemy"),
    ("begin", "end"), ("accept", "refuse"), ("arrive", "leave"), ("cheap", "expensive"), ("safe", "dangerous"),
)


class Batch(NamedTuple):
    """One batch; every array is ``[B, T]`` but ``task_ids`` (``[B]``).

    input_ids: tokens fed to the model; targets: the next token at each position;
    loss_mask: 1 where the target is a response token (CE is taken there only);
    attention_mask: 1 for real tokens, 0 for padding.
    """

    input_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    attention_mask: np.ndarray
    task_ids: np.ndarray


def make_example(task: str, rng: np.random.Generator) -> tuple[str, str]:
    """One (instruction, response) pair of a built-in task."""
    if task == "add":
        a, b = (int(v) for v in rng.integers(10, 100, size=2))
        return f"Add {a} and {b}.", str(a + b)
    if task == "reverse":
        w = str(rng.choice(_WORDS))
        return f"Reverse the letters of the word '{w}'.", w[::-1]
    if task == "upper":
        w = " ".join(rng.choice(_WORDS, size=2))
        return f"Write '{w}' in capital letters.", w.upper()
    if task == "sort":
        nums = [int(v) for v in rng.choice(100, size=4, replace=False)]
        return f"Sort these numbers from smallest to largest: {' '.join(map(str, nums))}.", " ".join(
            map(str, sorted(nums)))
    if task == "antonym":
        pair = _ANTONYMS[int(rng.integers(len(_ANTONYMS)))]
        word, opposite = pair if rng.random() < 0.5 else pair[::-1]
        return f"Give the opposite of the word '{word}'.", opposite
    raise ValueError(f"data.tasks: unknown task {task!r}; built-in tasks are {', '.join(BUILTIN_TASKS)}")


def encode(tokenizer, prompt: str, response: str, seq_len: int) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Token ids ``[seq_len + 1]`` (padded), response mask over them, unpadded length, truncated?

    The prompt takes the tokenizer's special tokens (BOS where it adds one); the
    response is followed by EOS and is the only part the loss sees.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, so responses cannot be terminated")
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    truncated = len(p) + len(r) > seq_len + 1
    ids = (p + r)[: seq_len + 1]
    length = len(ids)
    is_response = ([0] * len(p) + [1] * len(r))[: seq_len + 1]
    pad = seq_len + 1 - length
    return (np.array(ids + [tokenizer.pad_token_id] * pad, np.int32),
            np.array(is_response + [0] * pad, np.int32), length, truncated)


class BuiltinData:
    """A fixed pool of built-in examples, tokenized once, served in seeded epochs.

    ``batch(step, batch_size)`` depends only on ``(seed, step, batch_size)``. Examples
    cut at ``seq_len`` are counted in ``truncated``; those left with no response token
    are left out and counted in ``dropped``.
    """

    def __init__(self, tokenizer, tasks, seq_len: int, seed: int = 0, size: int = 2048, template: str = "alpaca"):
        rng = np.random.default_rng([seed, 1])
        self.tasks = tuple(tasks)
        rows, masks, lengths, task_ids = [], [], [], []
        self.truncated = self.dropped = 0
        for i in range(size):
            task_id = i % len(self.tasks)
            instruction, response = make_example(self.tasks[task_id], rng)
            prompt = TEMPLATES[template].format(instruction=instruction)
            ids, is_response, length, truncated = encode(tokenizer, prompt, response, seq_len)
            if not is_response[1:].any():  # the cutoff left no response token: nothing to learn from
                self.dropped += 1
                continue
            rows.append(ids)
            masks.append(is_response)
            lengths.append(length)
            task_ids.append(task_id)
            self.truncated += truncated
        if not rows:
            raise ValueError(f"data.seq_len={seq_len} leaves no response tokens in any example: raise "
                             "data.seq_len or use a shorter data.template")
        self.ids, self.is_response = np.stack(rows), np.stack(masks)
        self.lengths, self.task_ids = np.array(lengths), np.array(task_ids, np.int32)
        self.seed, self.size = seed, len(rows)

    def indices(self, step: int, batch_size: int) -> np.ndarray:
        start = step * batch_size
        out = []
        while len(out) < batch_size:
            epoch, offset = divmod(start + len(out), self.size)
            order = np.random.default_rng([self.seed, 2, epoch]).permutation(self.size)
            out.extend(order[offset: offset + batch_size - len(out)])
        return np.array(out)

    def batch(self, step: int, batch_size: int) -> Batch:
        idx = self.indices(step, batch_size)
        ids, is_response, lengths = self.ids[idx], self.is_response[idx], self.lengths[idx]
        positions = np.arange(ids.shape[1] - 1)
        real = (positions[None, :] < (lengths[:, None] - 1)).astype(np.int32)
        return Batch(
            input_ids=ids[:, :-1],
            targets=ids[:, 1:],
            loss_mask=is_response[:, 1:] * real,
            attention_mask=(positions[None, :] < lengths[:, None]).astype(np.int32),
            task_ids=self.task_ids[idx],
        )
