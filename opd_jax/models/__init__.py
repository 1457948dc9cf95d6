"""Language models: an NNX decoder for Qwen3 / Qwen2 / Llama and Hugging Face checkpoint I/O."""

from opd_jax.models.config import DecoderConfig, RopeConfig
from opd_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from opd_jax.models.decoder import DTYPES, REMAT_POLICIES, AttentionConfig, Decoder, KVCache, resolve_dtype
from opd_jax.models.execution import Execution
from opd_jax.models.hf import check_weights, from_pretrained, load_config, save_pretrained

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "DTYPES",
    "REMAT_POLICIES",
    "AttentionConfig",
    "Decoder",
    "DecoderConfig",
    "Execution",
    "KVCache",
    "RopeConfig",
    "check_weights",
    "from_pretrained",
    "load_config",
    "resolve_dtype",
    "save_pretrained",
]
