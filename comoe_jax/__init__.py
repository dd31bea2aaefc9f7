"""comoe-jax: contrastive mixture-of-LoRA-experts fine-tuning (CoMoE, arXiv 2505.17553) in JAX / Flax NNX."""

from comoe_jax import ops
from comoe_jax.adapters import AdapterStat, ForwardContext, MoESpec, MoLoRALinear, RoutingTrace
from comoe_jax.config import AdapterConfig, Config, LossConfig, validate
from comoe_jax.data import Example, load_sources
from comoe_jax.errors import AdapterFormatError, CheckpointError, ConfigError, DataError, LoadError, TrainingDiverged
from comoe_jax.evaluate import evaluate
from comoe_jax.loading import from_pretrained, load_tokenizer
from comoe_jax.model import CausalLM, DecoderSpec

__all__ = [
    "AdapterConfig", "AdapterFormatError", "AdapterStat", "CausalLM", "CheckpointError", "Config", "ConfigError",
    "DataError", "DecoderSpec", "Example", "ForwardContext", "LoadError", "LossConfig", "MoESpec", "MoLoRALinear",
    "RoutingTrace", "TrainingDiverged", "evaluate", "from_pretrained", "load_sources", "load_tokenizer", "ops",
    "validate",
]
__version__ = "0.2.0"
