"""Comparison runner: every method in single-task (ST) and multi-task (MT) settings, the paper's Table 1.

`python compare.py --help` (also installed as `comoe-compare`).
"""

import sys

from comoe_jax.commands.compare import main

if __name__ == "__main__":
    sys.exit(main())
