"""Packing multiple-choice items into a few fixed-shape rows, so scoring does no work twice.

An item is a context and its options (token lists); what is scored is log p(option | context) for
every option. A row holds, in order:

- the **prefix** every context of the call shares (e.g. a prompt template's header), once per row;
- then one item after another: its context (without the prefix), then each option's tokens but the
  last (an option's last token is only ever predicted, never read).

Each token sees (``visible``): the prefix, its own item's context, and the earlier tokens of its own
option: a tree per item, many trees per row. Tokens keep the positions they would have in
``context + option`` encoded alone, so the scores equal those of whole sequences (up to float
rounding). A target is (the slot whose next-token distribution predicts it, the token): an option's
first token is predicted at its context's last slot, token t at the slot of token t - 1.

Items go into rows best-fit by decreasing size; rows are ``row_len`` tokens, longer (one of
``generate.LENGTH_BUCKETS``) where a single item needs it; rows of one length are scored in calls of
a fixed number of rows, the last call with the fewest rows (a power of two) that holds what is left.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

import numpy as np

from comoe_jax.generate import bucket

ROW_LEN = 256  # tokens per packed row unless one item needs more
# Rows x length^2 of one call's share on one device at most: attention scores grow with the square of the row
# length, so long rows (lm_eval's rolling windows of a model's whole context) go fewer to a call; rows of up to
# 2048 tokens at eval.batch_size 16 are not affected.
ATTENTION_BUDGET = 16 * 2048 * 2048


@dataclass
class PackedCall:
    """One jitted call's inputs (``[R, L]`` token slots, ``[R, N]`` targets) and where its scores go."""

    ids: np.ndarray  # [R, L] int32 tokens (pad where empty)
    positions: np.ndarray  # [R, L] int32 position each token has in its item encoded alone
    item: np.ndarray  # [R, L] int32: 0 the shared prefix, 1.. the row's items, -1 empty
    branch: np.ndarray  # [R, L] int32: 0 a context (or the prefix), j + 1 option j
    cols: np.ndarray  # [R, N] int32 slot predicting each target
    targets: np.ndarray  # [R, N] int32 target token
    owner: np.ndarray  # [R, N, 2] int64 (item index, option index) of each target; -1 for none
    items: int  # how many items the call completes


def shared_prefix(contexts: list[list[int]]) -> list[int]:
    """The longest prefix of every context, leaving at least one token of each (its last token predicts)."""
    if not contexts:
        return []
    common = os.path.commonprefix(contexts)
    return list(common[: min(map(len, contexts)) - 1])


def _rows(sizes: list[int], room: int, prefix: int) -> list[tuple[int, list[int]]]:
    """Best-fit decreasing: (row length, item indices), each row's items within its room. An item that
    does not fit an empty row of ``room`` opens a row of its own bucketed length."""
    rows: list[tuple[int, list[int]]] = []
    free: list[tuple[int, int]] = []  # (free slots, row number), sorted
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        at = bisect.bisect_left(free, (sizes[i], -1))  # the fullest row it fits in
        if at < len(free):
            space, r = free.pop(at)
        else:
            length = room if sizes[i] <= room - prefix else bucket(prefix + sizes[i])
            space, r = length - prefix, len(rows)
            rows.append((length, []))
        rows[r][1].append(i)
        bisect.insort(free, (space - sizes[i], r))
    return rows


def pack_calls(contexts: list[list[int]], options: list[list[list[int]]], *, rows_per_call: int, pad_id: int,
               row_len: int = ROW_LEN, row_multiple: int = 1) -> list[PackedCall]:
    """The calls that score every option of every item (see the module docstring). ``row_multiple``:
    the row count of every call is a multiple of it (the mesh's batch shards)."""
    if any(not c for c in contexts):
        raise ValueError("every context needs at least one token (its last token predicts the options)")
    prefix = shared_prefix(contexts)
    p = len(prefix)
    sizes = [len(c) - p + sum(max(len(o) - 1, 0) for o in opts) for c, opts in zip(contexts, options)]
    by_length: dict[int, list[list[int]]] = {}
    for length, items in _rows(sizes, row_len, p):
        by_length.setdefault(length, []).append(items)
    calls = []
    for length, rows in sorted(by_length.items()):
        per_call = max(1, min(rows_per_call, row_multiple * max(1, ATTENTION_BUDGET // (length * length))))
        for start in range(0, len(rows), per_call):
            chunk = rows[start:start + per_call]
            count = min(per_call, 1 << (len(chunk) - 1).bit_length())
            count = -(-count // row_multiple) * row_multiple
            calls.append(_call(chunk, count, length, prefix, contexts, options, pad_id))
    return calls


def _call(rows, count, length, prefix, contexts, options, pad_id) -> PackedCall:
    p = len(prefix)
    ids = np.full((count, length), pad_id, np.int32)
    positions = np.zeros((count, length), np.int32)
    item = np.full((count, length), -1, np.int32)
    branch = np.zeros((count, length), np.int32)
    ids[:, :p], positions[:, :p], item[:, :p] = prefix, np.arange(p), 0
    targets = [[] for _ in range(count)]  # (slot, token, item index, option index)
    for r, members in enumerate(rows):
        slot = p
        for local, i in enumerate(members, 1):
            context = contexts[i][p:]
            end = slot + len(context)
            ids[r, slot:end], positions[r, slot:end], item[r, slot:end] = context, np.arange(p, p + len(context)), local
            last, slot = end - 1, end
            for j, option in enumerate(options[i]):
                read = option[:-1]
                end = slot + len(read)
                ids[r, slot:end], item[r, slot:end], branch[r, slot:end] = read, local, j + 1
                positions[r, slot:end] = np.arange(len(contexts[i]), len(contexts[i]) + len(read))
                predictors = [last] + list(range(slot, end))
                targets[r].extend((s, tok, i, j) for s, tok in zip(predictors, option))
                slot = end
    width = 1 << max(4, (max(map(len, targets)) - 1).bit_length())  # a power of two: few compiles
    cols = np.zeros((count, width), np.int32)
    target = np.zeros((count, width), np.int32)
    owner = np.full((count, width, 2), -1, np.int64)
    for r, row in enumerate(targets):
        if row:
            cols[r, :len(row)], target[r, :len(row)] = [t[0] for t in row], [t[1] for t in row]
            owner[r, :len(row)] = [t[2:] for t in row]
    return PackedCall(ids, positions, item, branch, cols, target, owner, sum(map(len, rows)))


def visible(item, branch, xp=np):
    """``[R, L, L]`` bool: which slots each slot's token may see, causality apart (the model's attention
    is causal); every slot sees itself, so no row of the attention is empty."""
    q_item, k_item = item[:, :, None], item[:, None, :]
    q_branch, k_branch = branch[:, :, None], branch[:, None, :]
    own = (k_item == q_item) & (k_item > 0) & ((k_branch == 0) | (k_branch == q_branch))
    return (k_item == 0) | own | xp.eye(item.shape[1], dtype=bool)[None]
