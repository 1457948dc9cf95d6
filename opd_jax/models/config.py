"""The decoder configuration: one frozen dataclass for Qwen3, Qwen2 and Llama checkpoints.

Built from a Hugging Face ``config.json`` (transformers 4 and 5 layouts: ``rope_theta`` at the top
level or under ``rope_parameters``) and written back in the transformers 5 layout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding and its scaling variant (HF ``rope_parameters``).

    ``rope_type``: ``default``; ``linear`` (positions divided by ``factor``); ``llama3`` (Llama 3.1
    frequency smoothing between ``low_freq_factor`` and ``high_freq_factor``); ``yarn`` (NTK-by-parts
    interpolation with ``beta_fast`` / ``beta_slow`` and an attention factor).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True

    def to_hf(self) -> dict[str, Any]:
        params: dict[str, Any] = {"rope_theta": self.theta, "rope_type": self.rope_type}
        if self.rope_type != "default":
            params["factor"] = self.factor
        if self.rope_type in ("llama3", "yarn"):
            params["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.rope_type == "llama3":
            params.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor)
        if self.rope_type == "yarn":
            params.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
            if self.attention_factor is not None:
                params["attention_factor"] = self.attention_factor
        return params


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a decoder-only transformer of the Llama family.

    Attributes:
      model_type: ``qwen3`` (q/k RMSNorm), ``qwen2`` (q/k/v bias) or ``llama``.
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim:
        sizes; ``num_heads`` must be a multiple of ``num_kv_heads`` (grouped-query attention).
      rms_norm_eps: RMSNorm epsilon.
      rope: rotary embedding settings.
      tie_word_embeddings: the output projection is the transposed input embedding.
      qk_norm: RMSNorm over ``head_dim`` on queries and keys before RoPE; Qwen3 always has it, the
        others never (``None``: what ``model_type`` implies).
      qkv_bias: bias on the q/k/v projections; Qwen2 always, Llama with ``attention_bias``, Qwen3
        never (``None``: what ``model_type`` implies, no bias for Llama).
      o_bias: bias on the output projection; Llama with ``attention_bias`` (then equal to
        ``qkv_bias``), never otherwise (``None``: as ``qkv_bias`` for Llama).
      mlp_bias: bias on the MLP projections (Llama ``mlp_bias`` only).
      max_position_embeddings: the longest context the checkpoint supports.
      bos_token_id, eos_token_id, pad_token_id: special tokens from ``config.json`` (eos may be a
        tuple of ids).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qk_norm: bool | None = None
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    mlp_bias: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type {self.rope.rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        self._resolve_architecture_flags()
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )

    def _resolve_architecture_flags(self) -> None:
        """Fill the ``None`` flags from ``model_type`` and reject the ones its ``config.json`` cannot say.

        A config that the Hugging Face architecture cannot express would save a checkpoint that
        loads back as a different model, so it is an error here rather than a surprise there.
        """
        if self.model_type == "qwen2":
            implied = {"qkv_bias": True, "o_bias": False}
        else:  # one attention_bias flag covers q/k/v and o
            attention_bias = bool(self.qkv_bias or self.o_bias)
            implied = {"qkv_bias": attention_bias, "o_bias": attention_bias}
        implied["qk_norm"] = self.model_type == "qwen3"
        for name, value in implied.items():
            given = getattr(self, name)
            if given is None:
                object.__setattr__(self, name, value)
            elif bool(given) != value:
                raise ValueError(
                    f"{name}={given} is not expressible for model_type {self.model_type!r} "
                    f"(its config.json implies {name}={value})"
                )
        if self.mlp_bias and self.model_type != "llama":
            raise ValueError(f"mlp_bias=True is not expressible for model_type {self.model_type!r}: only llama has it")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> DecoderConfig:
        """From the dictionary of a Hugging Face ``config.json``.

        Raises:
          ValueError: unsupported ``model_type``, rope type or sliding-window attention; the message
            names the field.
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if field not in hf:
                raise ValueError(f"config.json: missing field {field!r}")
        num_heads = hf["num_attention_heads"]
        rope_params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        rope = RopeConfig(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(rope_params.get("factor", 1.0)),
            original_max_position_embeddings=rope_params.get(
                "original_max_position_embeddings", hf.get("original_max_position_embeddings")
            ),
            low_freq_factor=float(rope_params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope_params.get("high_freq_factor", 4.0)),
            beta_fast=float(rope_params.get("beta_fast") or 32.0),
            beta_slow=float(rope_params.get("beta_slow") or 1.0),
            attention_factor=rope_params.get("attention_factor"),
            truncate=bool(rope_params.get("truncate", True)),
        )
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=rope,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers 5 ``config.json`` dictionary."""
        eos: Any = None if not self.eos_token_id else (
            self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        )
        hf: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": self.rope.to_hf(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "qwen3":
            hf["attention_bias"] = self.qkv_bias
        return hf

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)
