"""Fine-tune a Llama-family model with CoMoE adapters.

    python train.py                                   # configs/default.py
    python train.py --config configs/tiny.py train.steps=50 loss.contrastive_weight=0
    python train.py --help                            # every config key, default and meaning
"""

from __future__ import annotations

import argparse
import sys

from comoe_jax.config import ConfigError, apply_overrides, describe, load_config_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    parser.add_argument("--config", default="configs/default.py", help="a configs/*.py file")
    parser.add_argument("-h", "--help", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = apply_overrides(load_config_file(args.config), overrides)
        if args.help:
            print(__doc__ + "\nConfig keys (section.key=value):\n" + describe(cfg))
            return 0
        from comoe_jax.data import DataError  # imports JAX: after the cheap checks
        from comoe_jax.loading import LoadError
        from comoe_jax.progress import TrainingDiverged
        from comoe_jax.trainer import train

        try:
            train(cfg)
        except LoadError as e:
            print(f"model error: {e}", file=sys.stderr)
            return 2
        except DataError as e:
            print(f"data error: {e}", file=sys.stderr)
            return 2
        except TrainingDiverged as e:
            print(f"training diverged: {e}", file=sys.stderr)
            return 3
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
