"""A random tiny Llama on the built-in tasks, for tests, benchmarks and quick experiments (seconds on a CPU)."""

from comoe_jax.config import Config


def get_config() -> Config:
    cfg = Config()
    cfg.model.path = "random"
    cfg.adapter.target_modules = ("q_proj", "v_proj")  # fewer adapters: a faster compile
    cfg.data.train = ("builtin",)
    cfg.data.template = "plain"
    cfg.data.seq_len = 64
    cfg.eval.sources = ("builtin",)
    cfg.eval.mode = "generate"
    cfg.eval.max_per_task = 8
    cfg.train.steps = 20
    cfg.train.batch_size = 8
    cfg.train.save_every = 10
    cfg.train.log_every = 5
    cfg.optim.learning_rate = 3e-3
    cfg.optim.warmup_steps = 2
    cfg.train.output_dir = "runs/tiny"
    return cfg
