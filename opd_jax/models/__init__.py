"""Language models: an NNX decoder for Qwen3 / Qwen2 / Llama and Hugging Face checkpoint I/O."""

from opd_jax.models.config import DecoderConfig, RopeConfig
from opd_jax.models.decoder import Decoder, KVCache
from opd_jax.models.hf import from_pretrained, load_config, save_pretrained

__all__ = [
    "Decoder",
    "DecoderConfig",
    "KVCache",
    "RopeConfig",
    "from_pretrained",
    "load_config",
    "save_pretrained",
]
