"""The main job: CoMoE-LoRA on the real SmolLM2-135M, fine-tuned on the BIG-bench multi-task mix, on a CPU.

The paper's adapter (4 experts, top-2, r 16, alpha 32, q/k/v/o, lambda 0.01) trained on
comoe_jax/data/comoe_mix (social_iqa, strategyqa, math_qa, winowhy) with the Alpaca template, evaluated
before and after on the mix's test split (restricted-label scoring). Every value not set here
is the documented default of comoe_jax/config.py (python train.py --help lists them).
"""

from comoe_jax.config import Config


def get_config() -> Config:
    cfg = Config()
    cfg.model.path = "smollm2-135m"
    cfg.data.train = ("mix",)
    cfg.data.seq_len = 160
    cfg.train.steps = 40
    cfg.train.batch_size = 4
    cfg.train.save_every = 20
    cfg.train.log_every = 5
    cfg.optim.learning_rate = 1e-3
    cfg.optim.warmup_steps = 5
    cfg.eval.sources = ("mix",)
    cfg.eval.max_per_task = 25
    cfg.train.output_dir = "runs/default"
    return cfg
