"""lm-evaluation-harness with the ``comoe-jax`` model registered (installed as ``comoe-lm-eval``).

    comoe-lm-eval --model comoe-jax --model_args path=smollm2-135m,adapter=runs/default --tasks arc_easy

Every argument is lm_eval's; see docs/lm-eval.md. Without lm_eval installed it says how to install it
(exit 2) instead of failing on the import.
"""

from __future__ import annotations

import sys

from comoe_jax.cli import fail
from comoe_jax.constants import EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    try:
        from comoe_jax.lm_eval_model import main as run
    except ImportError as e:
        fail(f"error: {e}")
        return EXIT_BAD_INPUT
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
