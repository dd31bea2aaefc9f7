"""comoe-jax: contrastive mixture-of-LoRA-experts fine-tuning (CoMoE, arXiv 2505.17553) in JAX / Flax NNX."""

from comoe_jax import ops
from comoe_jax.adapters import ForwardContext, MoESpec, MoLoRALinear
from comoe_jax.config import AdapterConfig, Config, ConfigError, LossConfig, validate
from comoe_jax.data import DataError, Example, load_sources
from comoe_jax.evaluate import evaluate
from comoe_jax.loading import LoadError, from_pretrained, load_tokenizer
from comoe_jax.model import CausalLM, DecoderSpec

__all__ = [
    "AdapterConfig", "CausalLM", "Config", "ConfigError", "DataError", "Example", "ForwardContext", "DecoderSpec",
    "LoadError", "LossConfig", "MoESpec", "MoLoRALinear", "evaluate", "from_pretrained", "load_sources",
    "load_tokenizer", "ops", "validate",
]
__version__ = "0.1.0"
