"""Compare trained runs the way the paper does: expert representations in 2-D (Fig. 5), per-task expert

`python analyze.py --help` (also installed as `comoe-analyze`).
"""

import sys

from comoe_jax.commands.analyze import main

if __name__ == "__main__":
    sys.exit(main())
