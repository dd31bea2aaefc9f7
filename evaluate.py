"""Score the base model or a trained run on any loader's test set, per task; write JSON and markdown.

`python evaluate.py --help` (also installed as `comoe-eval`).
"""

import sys

from comoe_jax.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
