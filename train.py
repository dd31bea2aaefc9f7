"""Fine-tune a Llama, Mistral, Qwen2 / Qwen3 or Gemma 3 model with CoMoE adapters.

`python train.py --help` (also installed as `comoe-train`).
"""

import sys

from comoe_jax.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
