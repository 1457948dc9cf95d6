"""A Flax NNX decoder for the Llama family: Qwen3, Qwen2 and Llama from one set of config flags.

Weights are stored in einsum-friendly layouts with named dimensions (``D`` model width, ``N`` query
heads, ``K`` key/value heads, ``H`` head size, ``F`` MLP width, ``V`` vocabulary):

    embedding [V, D]   q [D, N, H]   k, v [D, K, H]   o [N, H, D]
    gate, up [D, F]    down [F, D]   lm_head [D, V] (absent when tied)

The KV cache is a plain pytree passed in and returned, so decoding is a pure function under
``jax.jit`` / ``lax.while_loop``. Logits are produced in float32 whatever the parameter dtype, so
log-softmax never runs in bfloat16.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.models.config import DecoderConfig, RopeConfig

Array = jax.Array

__all__ = ["Decoder", "KVCache", "rope_inverse_frequencies"]


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``[H/2]`` (float32) and the attention factor scaling cos/sin."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "default":
        return inv_freq.astype(np.float32), 1.0
    if rope.rope_type == "linear":
        return (inv_freq / rope.factor).astype(np.float32), 1.0
    if rope.rope_type == "llama3":
        original = rope.original_max_position_embeddings
        low_freq_wavelen = original / rope.low_freq_factor
        high_freq_wavelen = original / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32), 1.0
    # yarn: interpolate low frequencies, extrapolate high ones, blend linearly in between.
    original = rope.original_max_position_embeddings

    def correction_dim(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    base_freq = rope.theta**exponents
    inv_freq = (1 / (rope.factor * base_freq)) * (1 - extrapolation_weight) + (1 / base_freq) * extrapolation_weight
    attention_factor = rope.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0
    return inv_freq.astype(np.float32), float(attention_factor)


def _apply_rope(x_BxTxNxH: Array, positions_BxT: Array, inv_freq: np.ndarray, attention_factor: float) -> Array:
    angles = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos = (jnp.cos(angles) * attention_factor).astype(x_BxTxNxH.dtype)
    sin = (jnp.sin(angles) * attention_factor).astype(x_BxTxNxH.dtype)
    first, second = jnp.split(x_BxTxNxH, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x_BxTxNxH * cos + rotated * sin


def _normal(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
    """``w · x / sqrt(mean(x²) + eps)``, the statistics in float32."""

    def __init__(self, size: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for ``S`` slots.

    Attributes:
      keys, values: per layer ``[B, S, K, H]``.
      valid: ``[B, S]`` bool, slots holding a real (non-padding) token.
      index: ``[]`` int32, the next slot to write; all rows write the same slot (prompts are
        left-padded, so rows stay aligned).
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    valid: Array
    index: Array

    @classmethod
    def zeros(cls, config: DecoderConfig, batch_size: int, num_slots: int, dtype=jnp.float32) -> KVCache:
        shape = (batch_size, num_slots, config.num_kv_heads, config.head_dim)
        empty = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return cls(empty, empty, jnp.zeros((batch_size, num_slots), bool), jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
    def __init__(self, config: DecoderConfig, dtype, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q = _normal(rngs, (d, n, h), dtype)
        self.k = _normal(rngs, (d, k, h), dtype)
        self.v = _normal(rngs, (d, k, h), dtype)
        self.o = _normal(rngs, (n, h, d), dtype)
        if config.qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((n, h), dtype))
            self.k_bias = nnx.Param(jnp.zeros((k, h), dtype))
            self.v_bias = nnx.Param(jnp.zeros((k, h), dtype))
        if config.o_bias:
            self.o_bias = nnx.Param(jnp.zeros((d,), dtype))
        if config.qk_norm:
            self.q_norm = RMSNorm(h, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(h, config.rms_norm_eps, dtype)
        self.config = config

    def __call__(
        self,
        x_BxTxD: Array,
        positions_BxT: Array,
        mask_BxTxS: Array,
        inv_freq: np.ndarray,
        attention_factor: float,
        cached: tuple[Array, Array, Array] | None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        config = self.config
        q = jnp.einsum("btd,dnh->btnh", x_BxTxD, self.q[...])
        k = jnp.einsum("btd,dkh->btkh", x_BxTxD, self.k[...])
        v = jnp.einsum("btd,dkh->btkh", x_BxTxD, self.v[...])
        if config.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = _apply_rope(q, positions_BxT, inv_freq, attention_factor)
        k = _apply_rope(k, positions_BxT, inv_freq, attention_factor)
        new_cache = None
        if cached is not None:
            cache_k, cache_v, index = cached
            k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), index, axis=1)
            new_cache = (k, v)
        out = jax.nn.dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask=mask_BxTxS[:, None], scale=config.attention_scale
        )
        out = jnp.einsum("btnh,nhd->btd", out, self.o[...])
        if config.o_bias:
            out = out + self.o_bias[...]
        return out, new_cache


class MLP(nnx.Module):
    def __init__(self, config: DecoderConfig, dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate = _normal(rngs, (d, f), dtype)
        self.up = _normal(rngs, (d, f), dtype)
        self.down = _normal(rngs, (f, d), dtype)
        if config.mlp_bias:
            self.gate_bias = nnx.Param(jnp.zeros((f,), dtype))
            self.up_bias = nnx.Param(jnp.zeros((f,), dtype))
            self.down_bias = nnx.Param(jnp.zeros((d,), dtype))
        self.has_bias = config.mlp_bias

    def __call__(self, x_BxTxD: Array) -> Array:
        gate = x_BxTxD @ self.gate[...]
        up = x_BxTxD @ self.up[...]
        if self.has_bias:
            gate, up = gate + self.gate_bias[...], up + self.up_bias[...]
        out = (jax.nn.silu(gate) * up) @ self.down[...]
        return out + self.down_bias[...] if self.has_bias else out


class Block(nnx.Module):
    def __init__(self, config: DecoderConfig, dtype, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attention = Attention(config, dtype, rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)


class Decoder(nnx.Module):
    """Decoder-only transformer (Qwen3 / Qwen2 / Llama).

    Args:
      config: the :class:`DecoderConfig`.
      rngs: initialisation randomness (weights ~ N(0, 0.02²), norms 1, biases 0).
      param_dtype: dtype of every parameter (float32 or bfloat16); activations follow it, logits
        are float32.
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        self.embedding = _normal(rngs, (config.vocab_size, config.hidden_size), param_dtype)
        self.layers = nnx.List([Block(config, param_dtype, rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _normal(rngs, (config.hidden_size, config.vocab_size), param_dtype)

    def hidden_states(
        self,
        tokens_BxT: Array,
        *,
        positions_BxT: Array | None = None,
        token_mask_BxT: Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Array, KVCache | None]:
        """Final-norm hidden states ``[B, T, D]`` (and the updated cache).

        Args:
          tokens_BxT: int token ids.
          positions_BxT: RoPE positions; default ``0..T−1`` (plus ``cache.index``).
          token_mask_BxT: 1 for real tokens, 0 for padding (keys at padding are never attended).
          cache: if given, the tokens are written at slots ``[index, index + T)`` and attend to
            every valid earlier slot; the returned cache has ``index + T``.
        """
        batch, length = tokens_BxT.shape
        if token_mask_BxT is None:
            token_mask_BxT = jnp.ones((batch, length), bool)
        token_mask_BxT = token_mask_BxT.astype(bool)
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(start + jnp.arange(length), (batch, length))
        if cache is None:
            key_valid_BxS = token_mask_BxT
            key_slots = jnp.arange(length)
        else:
            key_valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache.valid, token_mask_BxT, cache.index, axis=1)
            key_slots = jnp.arange(cache.valid.shape[1])
        query_slots = start + jnp.arange(length)
        mask_BxTxS = (key_slots[None, :] <= query_slots[:, None])[None] & key_valid_BxS[:, None, :]
        inv_freq, attention_factor = rope_inverse_frequencies(self.config.rope, self.config.head_dim)

        x = self.embedding[...][tokens_BxT]
        new_keys, new_values = [], []
        for layer_index, block in enumerate(self.layers):
            cached = None if cache is None else (cache.keys[layer_index], cache.values[layer_index], cache.index)
            attended, layer_cache = block.attention(
                block.attention_norm(x), positions_BxT, mask_BxTxS, inv_freq, attention_factor, cached
            )
            x = x + attended
            x = x + block.mlp(block.mlp_norm(x))
            if layer_cache is not None:
                new_keys.append(layer_cache[0])
                new_values.append(layer_cache[1])
        new_cache = None
        if cache is not None:
            new_cache = KVCache(tuple(new_keys), tuple(new_values), key_valid_BxS, cache.index + length)
        return self.final_norm(x), new_cache

    def output_projection(self) -> Array:
        """``[D, V]``: the LM head, or the transposed embedding when tied."""
        return self.embedding[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden_BxTxD: Array) -> Array:
        """``[B, T, V]`` float32 logits from hidden states."""
        return jnp.einsum(
            "btd,dv->btv", hidden_BxTxD, self.output_projection(), preferred_element_type=jnp.float32
        )

    def __call__(self, tokens_BxT: Array, *, positions_BxT: Array | None = None, token_mask_BxT: Array | None = None) -> Array:
        """``[B, T] int -> [B, T, V]`` float32 logits of a causal forward pass."""
        hidden, _ = self.hidden_states(tokens_BxT, positions_BxT=positions_BxT, token_mask_BxT=token_mask_BxT)
        return self.logits(hidden)
