"""Small procedurally generated instruction tasks (free-form answers), for tests and quick runs."""

from __future__ import annotations

import numpy as np

from comoe_jax.data.records import Example

BUILTIN_TASKS = ("add", "reverse", "upper", "sort", "antonym")

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


def load_builtin(tasks=BUILTIN_TASKS, size: int = 2048, seed: int = 0) -> list[Example]:
    """``size`` examples cycling through ``tasks``, a pure function of ``seed``."""
    rng = np.random.default_rng([seed, 1])
    out = []
    for i in range(size):
        task = tasks[i % len(tasks)]
        instruction, response = make_example(task, rng)
        out.append(Example(task=task, instruction=instruction, answer=response, source=f"builtin:{task}#{i}"))
    return out
