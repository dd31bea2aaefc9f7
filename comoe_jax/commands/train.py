"""Fine-tune a Llama, SmolLM3, Granite, Mistral, Qwen2 / Qwen3, OLMo 2 / 3, Phi-3 or Gemma 1 / 2 / 3 model with CoMoE
adapters.

    python train.py                                   # configs/default.py
    python train.py --config configs/tiny.py train.steps=50 loss.contrastive_weight=0
    python train.py --help                            # every config key, default and meaning

Exit codes: 0 finished, 2 bad input, 3 diverged, 75 interrupted (SIGTERM / Ctrl-C; the last
step is saved, rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import sys

from comoe_jax.cli import command
from comoe_jax.config import apply_overrides, describe, load_config_file
from comoe_jax.constants import EXIT_INTERRUPTED


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    parser.add_argument("--config", default="configs/default.py",
                        help="a configs/*.py file, a shipped config by name (default, tiny) or a run's config.json")
    parser.add_argument("-h", "--help", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    cfg = apply_overrides(load_config_file(args.config), overrides)
    if args.help:
        print(__doc__ + "\nConfig keys (section.key=value):\n" + describe(cfg))
        return 0
    from comoe_jax.trainer import train  # imports JAX: after the cheap checks

    return EXIT_INTERRUPTED if train(cfg).interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
