"""Architectures of published checkpoints by name, for planning without downloading weights.

Each preset holds the values of the model's Hugging Face ``config.json`` (sizes, rotary settings,
tied embeddings, context length, RMSNorm epsilon, special tokens):

    qwen3-0.6b   Qwen/Qwen3-0.6B       qwen3-8b    Qwen/Qwen3-8B
    qwen3-1.7b   Qwen/Qwen3-1.7B       qwen3-14b   Qwen/Qwen3-14B
    qwen3-4b     Qwen/Qwen3-4B         qwen3-32b   Qwen/Qwen3-32B
    llama3.1-8b  meta-llama/Llama-3.1-8B (llama3 rope scaling, factor 8 over 8192 positions)
    qwen2.5-7b   Qwen/Qwen2.5-7B (the base model: 131072 positions; the Instruct variant has 32768)

Qwen3 0.6B / 1.7B / 4B tie the output projection to the embedding; the larger ones do not. All
Qwen3 sizes use ``head_dim`` 128 independently of ``hidden_size / num_heads``.
"""

from __future__ import annotations

import pathlib

from opd_jax.models.config import DecoderConfig, RopeConfig

__all__ = ["PRESETS", "resolve_model"]

_QWEN3_ROPE = RopeConfig(theta=1_000_000.0)
_QWEN_BOS, _QWEN_EOS = 151643, 151645


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, *, tied: bool) -> DecoderConfig:
    return DecoderConfig(
        "qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
        num_heads=heads, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope=_QWEN3_ROPE,
        tie_word_embeddings=tied, max_position_embeddings=40960, bos_token_id=_QWEN_BOS,
        eos_token_id=(_QWEN_EOS,),
    )


PRESETS: dict[str, DecoderConfig] = {
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, tied=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, tied=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, tied=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, tied=False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, tied=False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, tied=False),
    "llama3.1-8b": DecoderConfig(
        "llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500_000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=8192,
                        low_freq_factor=1.0, high_freq_factor=4.0),
        tie_word_embeddings=False, max_position_embeddings=131072, bos_token_id=128000, eos_token_id=(128001,),
    ),
    "qwen2.5-7b": DecoderConfig(
        "qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope=RopeConfig(theta=1_000_000.0),
        tie_word_embeddings=False, max_position_embeddings=131072, bos_token_id=_QWEN_BOS,
        eos_token_id=(_QWEN_BOS,),
    ),
}


def resolve_model(text: str | pathlib.Path) -> DecoderConfig:
    """A preset name (case-insensitive) or a Hugging Face folder (only its ``config.json`` is read).

    Raises:
      ValueError: neither a preset nor a folder; the message lists the presets. A folder whose
        ``config.json`` is missing or invalid raises with the file and field named.
    """
    from opd_jax.models.hf import load_config

    name = str(text).strip()
    if name.lower() in PRESETS:
        return PRESETS[name.lower()]
    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        try:
            return load_config(path)
        except FileNotFoundError as error:
            raise ValueError(str(error)) from None
    raise ValueError(
        f"unknown model {name!r}: not a preset and not a folder; presets are {', '.join(PRESETS)} "
        "(or give a Hugging Face checkpoint folder with a config.json)"
    )
