"""Export a run's adapters: peft folders, or a transformers folder with the adapter merged in.

`python export.py --help` (also installed as `comoe-export`).
"""

import sys

from comoe_jax.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
