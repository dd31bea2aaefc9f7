"""Sweep runner: the paper's lambda / number-of-experts / layer-placement studies over several seeds.

`python sweep.py --help` (also installed as `comoe-sweep`).
"""

import sys

from comoe_jax.commands.sweep import main

if __name__ == "__main__":
    sys.exit(main())
