"""A Flax NNX decoder for the Llama family: Qwen3, Qwen2 and Llama from one set of config flags.

Weights are stored in einsum-friendly layouts with named dimensions (``D`` model width, ``N`` query
heads, ``K`` key/value heads, ``H`` head size, ``F`` MLP width, ``V`` vocabulary, ``L`` layers):

    embedding [V, D]      lm_head [D, V] (absent when tied)     final_norm [D]
    layers/attention/q [L, D, N, H]   k, v [L, D, K, H]   o [L, N, H, D]
    layers/mlp/gate, up [L, D, F]     down [L, F, D]       layers/*_norm [L, D]

The blocks are **stacked**: every block parameter has a leading layer axis and the forward pass is
one ``lax.scan`` over it, so compile time does not grow with depth. Each block can be
rematerialised (``remat``): ``"none"`` keeps every activation for the backward pass, ``"full"``
keeps only each block's input (the backward pass recomputes the block: activations
O(layers · tokens · D) instead of O(layers · tokens · (F + N · keys))), ``"dots"`` also keeps the
outputs of the weight matmuls and recomputes the rest (attention, norms, activations).

Mixed precision: parameters live in ``param_dtype`` (float32 master weights by default) and are
cast to ``compute_dtype`` layer by layer as they are used, so matmuls, activations and the KV
cache run in the compute dtype (bfloat16 on accelerators) while gradients and optimizer state stay
in the parameter dtype. RMSNorm statistics, softmax statistics and logits are float32 always, so
log-softmax never runs in bfloat16.

The KV cache is a plain pytree passed in and returned, so decoding is a pure function under
``jax.jit`` / ``lax.while_loop``.

The sampler's one-token decode steps run a second form of the same computation
(:meth:`Decoder.decode_step`): the weights are rearranged once per rollout, outside the decode
loop (:class:`DecodeWeights`: fused ``q|k|v`` and ``gate|up`` projections, cast to the compute
dtype; the stored parameters keep their names and layout), the blocks are unrolled, and the cache
is one heads-first array per layer (:class:`DecodeCache`). On XLA:CPU a scanned decode step sliced
every layer's weights and cache out of the stacked arrays (copies) and transposed the cache for
attention, at every step; that, not the matmuls, was what grew with the batch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.models import attention as attention_lib
from opd_jax.models.config import DecoderConfig, RopeConfig

Array = jax.Array

__all__ = ["DTYPES", "REMAT_POLICIES", "AttentionConfig", "DecodeCache", "DecodeLayer", "DecodeWeights", "Decoder",
           "KVCache", "resolve_dtype", "rope_inverse_frequencies"]

REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16")


def resolve_dtype(name: str, platform: str) -> str:
    """A dtype name from :data:`DTYPES`, or ``"auto"``: bfloat16 on TPU / GPU, float32 on CPU
    (where bfloat16 matmuls are slow)."""
    if name != "auto":
        return name
    return "bfloat16" if platform in ("tpu", "gpu") else "float32"


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
    """``w · x / sqrt(mean(x²) + eps)``: the statistics in float32, then (as in transformers) the
    normalised ``x`` is cast back to its dtype before the weight multiplies it."""

    def __init__(self, size: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        return _rms_norm(x, self.weight[...], self.eps)


def _rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """:class:`RMSNorm` as a function of its weight (the decode step holds prepared weights)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for ``S`` slots, stacked over layers.

    Attributes:
      keys_LxBxSxKxH, values_LxBxSxKxH: the cache, in the model's compute dtype.
      valid_BxS: bool, slots holding a real (non-padding) token.
      index: ``[]`` int32, the next slot to write; all rows write the same slot (prompts are
        left-padded, so rows stay aligned).
    """

    keys_LxBxSxKxH: Array
    values_LxBxSxKxH: Array
    valid_BxS: Array
    index: Array

    @classmethod
    def zeros(cls, config: DecoderConfig, batch_size: int, num_slots: int, dtype=jnp.float32) -> KVCache:
        shape = (config.num_layers, batch_size, num_slots, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch_size, num_slots), bool),
                   jnp.zeros((), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeLayer:
    """One block's weights laid out for a one-token decode step, in the compute dtype.

    Built by :meth:`Decoder.decode_weights` from the stored parameters (which keep their names and
    layout): the query, key and value projections side by side in one ``[D, (N + 2K) · H]`` matrix
    and gate and up in one ``[D, 2F]``, so a step runs one matmul where it ran three and two; the
    QK-norm weights of the ``M = N + K`` query and key heads stacked ``[M, H]``, so one norm and one
    RoPE cover queries and keys. Optional parts (biases, QK-norm) are ``None`` when the architecture
    has none.
    """

    attention_norm_D: Array
    qkv_DxE: Array
    o_ExD: Array
    mlp_norm_D: Array
    gate_up_Dx2F: Array
    down_FxD: Array
    qkv_bias_E: Array | None = None
    qk_norm_MxH: Array | None = None
    o_bias_D: Array | None = None
    gate_up_bias_2F: Array | None = None
    down_bias_D: Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeWeights:
    """Every weight a decode step reads, prepared once per rollout (outside the decode loop).

    Attributes:
      embedding_VxD: the token embedding, in the compute dtype.
      layers: one :class:`DecodeLayer` per block (the decode step runs the blocks unrolled, so each
        reads its own arrays instead of slicing a stacked one, which XLA:CPU copies every step).
      final_norm_D: the final RMSNorm weight.
      projection_DxV: the output projection (the LM head, or the transposed embedding when tied).
    """

    embedding_VxD: Array
    layers: tuple[DecodeLayer, ...]
    final_norm_D: Array
    projection_DxV: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCache:
    """The KV cache of the decode loop: one array per layer, heads before slots.

    Attributes:
      keys_BxKxHxS: one ``[B, K, H, S]`` array per layer (slots last), in the compute dtype.
      values_BxKxSxH: one ``[B, K, S, H]`` array per layer.
        Per-layer arrays are updated in place in the loop carry. With key / value heads leading,
        both attention products are batched matmuls over ``(B, K)`` reading the cache where it lies;
        keys with slots last make the score product a plain ``[G, H] @ [H, S]`` (measured on
        XLA:CPU at batch 256: 1.0 ms against 1.6 ms for ``[S, H]`` keys at 144 slots, 3.3 against
        10 ms at 528).
      valid_BxS: bool, slots holding a real (non-padding) token.
      index: the next slot to write: ``[]`` int32 shared by all rows (a static batch of left-padded
        prompts stays aligned), or ``[B]`` int32 per row (the slot scheduler refills a row with a
        new prompt while the others go on).

    ``S`` is the number of slots allocated so far: the sampler grows the cache with
    :meth:`grown` as the rollout fills it, so attention reads about the filled part only.
    """

    keys_BxKxHxS: tuple[Array, ...]
    values_BxKxSxH: tuple[Array, ...]
    valid_BxS: Array
    index: Array

    @property
    def num_slots(self) -> int:
        return self.valid_BxS.shape[1]

    @classmethod
    def from_cache(cls, cache: KVCache, num_slots: int) -> DecodeCache:
        """The decode layout of a (prefill) :class:`KVCache`, padded to ``num_slots`` slots."""
        keys = cache.keys_LxBxSxKxH.transpose(0, 1, 3, 4, 2)
        values = cache.values_LxBxSxKxH.transpose(0, 1, 3, 2, 4)
        layers = keys.shape[0]
        grown = cls(tuple(keys[i] for i in range(layers)), tuple(values[i] for i in range(layers)),
                    cache.valid_BxS, cache.index)
        return grown.grown(num_slots)

    def grown(self, num_slots: int) -> DecodeCache:
        """The same cache with ``num_slots`` slots (new slots empty and invalid)."""
        extra = num_slots - self.num_slots
        if extra < 0:
            raise ValueError(f"a cache of {self.num_slots} slots cannot shrink to {num_slots}")
        if extra == 0:
            return self
        key_pad, value_pad = ((0, 0), (0, 0), (0, 0), (0, extra)), ((0, 0), (0, 0), (0, extra), (0, 0))
        return DecodeCache(tuple(jnp.pad(k, key_pad) for k in self.keys_BxKxHxS),
                           tuple(jnp.pad(v, value_pad) for v in self.values_BxKxSxH),
                           jnp.pad(self.valid_BxS, ((0, 0), (0, extra))), self.index)


def _slot_writer(index: Array, batch: int):
    """``write(array, new, slot_axis)``: ``new`` (``array`` without its slot axis) written at each
    row's slot ``index`` of a ``[B, ...]`` cache array.

    A shared index ``[]`` is one ``dynamic_update_slice`` (XLA updates the loop carry in place); a
    per-row index ``[B]`` is a scatter of one entry per row.
    """
    if index.ndim == 0:
        def write(array, new, slot_axis):
            start = [jnp.zeros((), jnp.int32)] * array.ndim
            start[slot_axis] = index
            return jax.lax.dynamic_update_slice(array, jnp.expand_dims(new, slot_axis), tuple(start))
        return write
    rows_B = jnp.arange(batch)

    def write(array, new, slot_axis):
        where = (rows_B,) + (slice(None),) * (slot_axis - 1) + (index,)
        return array.at[where].set(new)
    return write


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Which attention kernel the decoder runs (see :mod:`opd_jax.models.attention`).

    Attributes:
      implementation: ``auto`` | ``xla`` | ``chunked`` | ``splash`` | ``cudnn``; ``auto`` picks
        splash on TPU, cudnn on GPU and chunked elsewhere, and never one the platform lacks.
      platform: the platform compiled for (``None``: jax's default backend). Set it when compiling
        ahead of time for another platform (``opd-jax plan`` compiles for TPU on a CPU host).
      interpret: run the Pallas splash kernel in interpret mode (on CPU, for tests).
      block_size: query / key block of the chunked kernel.

    Self-attention over a whole sequence (training, scoring) uses the chosen kernel. With a
    :class:`KVCache` (the sampler's prefill) ``xla`` stays ``xla`` and every other choice runs
    ``chunked``: splash has no cache form. The sampler's one-token decode steps
    (:meth:`Decoder.decode_step`) run :func:`opd_jax.models.attention.decode_attention` whatever the
    choice: one query row against the cache is small.
    """

    implementation: str = "auto"
    platform: str | None = None
    interpret: bool = False
    block_size: int = 512

    def resolved(self) -> str:
        return attention_lib.resolve_implementation(self.implementation, self.platform, interpret=self.interpret)


def _attention_config(attention: str | AttentionConfig) -> AttentionConfig:
    config = attention if isinstance(attention, AttentionConfig) else AttentionConfig(attention)
    return dataclasses.replace(config, implementation=config.resolved())


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

    def project(self, x_BxTxD: Array, positions_BxT: Array, rope: tuple[np.ndarray, float]):
        """Queries ``[B, T, N, H]``, keys and values ``[B, T, K, H]`` of the tokens, RoPE applied."""
        config = self.config
        q = jnp.einsum("btd,dnh->btnh", x_BxTxD, self.q[...])
        k = jnp.einsum("btd,dkh->btkh", x_BxTxD, self.k[...])
        v = jnp.einsum("btd,dkh->btkh", x_BxTxD, self.v[...])
        if config.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return _apply_rope(q, positions_BxT, *rope), _apply_rope(k, positions_BxT, *rope), v

    def output(self, attended_BxTxNxH: Array) -> Array:
        out = jnp.einsum("btnh,nhd->btd", attended_BxTxNxH, self.o[...])
        return out + self.o_bias[...] if self.config.o_bias else out


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
    """One pre-norm transformer block; in a :class:`Decoder` its parameters carry a layer axis."""

    def __init__(self, config: DecoderConfig, dtype, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attention = Attention(config, dtype, rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)


def _stacked_blocks(config: DecoderConfig, dtype, rngs: nnx.Rngs) -> Block:
    """A :class:`Block` whose parameters are the ``L`` layers' stacked on a leading axis.

    The layers are drawn one after another from ``rngs``, as an unstacked model would draw them.
    """
    layers = [nnx.split(Block(config, dtype, rngs)) for _ in range(config.num_layers)]
    stacked = jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *(state for _, state in layers))
    return nnx.merge(layers[0][0], stacked)


def _remat(body, policy: str):
    if policy == "none":
        return body
    if policy == "full":
        return jax.checkpoint(body)
    return jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class Decoder(nnx.Module):
    """Decoder-only transformer (Qwen3 / Qwen2 / Llama) with stacked, scanned blocks.

    Args:
      config: the :class:`DecoderConfig`.
      rngs: initialisation randomness (weights ~ N(0, 0.02²), norms 1, biases 0).
      param_dtype: dtype of every parameter (float32 master weights, or bfloat16).
      compute_dtype: dtype of matmuls, activations and the KV cache (``None``: ``param_dtype``);
        logits are float32 either way.
      attention: an implementation name or an :class:`AttentionConfig`.
      remat: ``none`` | ``full`` | ``dots``, what each block keeps for the backward pass.

    Raises:
      ValueError: an unknown ``remat`` or attention implementation, or one the platform lacks.
    """

    def __init__(
        self,
        config: DecoderConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        compute_dtype=None,
        attention: str | AttentionConfig = "auto",
        remat: str = "none",
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}; got {remat!r}")
        self.config = config
        self.compute_dtype = jnp.dtype(compute_dtype or param_dtype)
        self.attention_config = _attention_config(attention)
        self.remat = remat
        self.embedding = _normal(rngs, (config.vocab_size, config.hidden_size), param_dtype)
        self.layers = _stacked_blocks(config, param_dtype, rngs)
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
        """Final-norm hidden states ``[B, T, D]`` in the compute dtype (and the updated cache).

        Args:
          tokens_BxT: int token ids.
          positions_BxT: RoPE positions; default ``0..T−1`` (plus ``cache.index``).
          token_mask_BxT: 1 for real tokens, 0 for padding (keys at padding are never attended).
          cache: if given, the tokens are written at slots ``[index, index + T)`` and attend to
            every valid earlier slot; the returned cache has ``index + T``.
        """
        batch, length = tokens_BxT.shape
        token_mask_BxT = jnp.ones((batch, length), bool) if token_mask_BxT is None else token_mask_BxT.astype(bool)
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        query_slots_T = start + jnp.arange(length, dtype=jnp.int32)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(query_slots_T, (batch, length))
        x_BxTxD = self.embedding[...][tokens_BxT].astype(self.compute_dtype)
        if cache is None:
            x_BxTxD = self._scan_blocks(x_BxTxD, positions_BxT, token_mask_BxT)
            return self.final_norm(x_BxTxD), None
        valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, token_mask_BxT, cache.index, axis=1)
        x_BxTxD, keys, values = self._scan_blocks_cached(
            x_BxTxD, positions_BxT, query_slots_T, valid_BxS, cache
        )
        return self.final_norm(x_BxTxD), KVCache(keys, values, valid_BxS, cache.index + length)

    def _layer_modules(self):
        """``(graphdef, stacked params)`` of the blocks, cast to the compute dtype."""
        graphdef, params = nnx.split(self.layers)
        return graphdef, _cast_floats(params, self.compute_dtype)

    def _attend(self, q, k, v, query_slots_T, key_valid_BxS, implementation: str) -> Array:
        return attention_lib.attention(
            q, k, v, query_slots_T=query_slots_T, key_valid_BxS=key_valid_BxS, scale=self.config.attention_scale,
            implementation=implementation, block_size=self.attention_config.block_size,
            interpret=self.attention_config.interpret,
        )

    def _scan_blocks(self, x_BxTxD: Array, positions_BxT: Array, token_mask_BxT: Array) -> Array:
        """Self-attention over the whole sequence, one ``lax.scan`` step per block."""
        graphdef, params = self._layer_modules()
        rope = rope_inverse_frequencies(self.config.rope, self.config.head_dim)
        query_slots_T = jnp.arange(x_BxTxD.shape[1], dtype=jnp.int32)
        implementation = self.attention_config.implementation

        def block_step(x, layer_params):
            block = nnx.merge(graphdef, layer_params)
            q, k, v = block.attention.project(block.attention_norm(x), positions_BxT, rope)
            x = x + block.attention.output(self._attend(q, k, v, query_slots_T, token_mask_BxT, implementation))
            return x + block.mlp(block.mlp_norm(x)), None

        x_BxTxD, _ = jax.lax.scan(_remat(block_step, self.remat), x_BxTxD, params)
        return x_BxTxD

    def _scan_blocks_cached(self, x_BxTxD, positions_BxT, query_slots_T, valid_BxS, cache: KVCache):
        """The blocks over new tokens written into the cache; the cache rides in the scan carry,
        so each layer's slots are updated in place rather than the whole cache rebuilt."""
        graphdef, params = self._layer_modules()
        rope = rope_inverse_frequencies(self.config.rope, self.config.head_dim)
        implementation = "xla" if self.attention_config.implementation == "xla" else "chunked"

        def block_step(carry, layer):
            x, keys, values = carry
            index, layer_params = layer
            block = nnx.merge(graphdef, layer_params)
            q, k, v = block.attention.project(block.attention_norm(x), positions_BxT, rope)
            zero = jnp.zeros((), jnp.int32)
            start = (index, zero, cache.index, zero, zero)
            keys = jax.lax.dynamic_update_slice(keys, k[None].astype(keys.dtype), start)
            values = jax.lax.dynamic_update_slice(values, v[None].astype(values.dtype), start)
            attended = self._attend(q, keys[index].astype(q.dtype), values[index].astype(q.dtype), query_slots_T,
                                    valid_BxS, implementation)
            x = x + block.attention.output(attended)
            return (x + block.mlp(block.mlp_norm(x)), keys, values), None

        layers = (jnp.arange(self.config.num_layers, dtype=jnp.int32), params)
        (x_BxTxD, keys, values), _ = jax.lax.scan(
            block_step, (x_BxTxD, cache.keys_LxBxSxKxH, cache.values_LxBxSxKxH), layers
        )
        return x_BxTxD, keys, values

    def decode_weights(self) -> DecodeWeights:
        """The weights in the decode layout (:class:`DecodeWeights`), cast to the compute dtype.

        Call it once per rollout, outside the decode loop: it concatenates the projections (a copy
        of the block weights), which :meth:`decode_step` then reads every step.
        """
        config, dtype = self.config, self.compute_dtype
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        attention, mlp = self.layers.attention, self.layers.mlp

        def get(param):
            return param[...].astype(dtype)

        q, kk, v, o = get(attention.q), get(attention.k), get(attention.v), get(attention.o)
        gate, up, down = get(mlp.gate), get(mlp.up), get(mlp.down)
        layers = []
        for i in range(config.num_layers):
            extras = {}
            if config.qkv_bias:
                extras["qkv_bias_E"] = jnp.concatenate(
                    [get(attention.q_bias)[i].reshape(-1), get(attention.k_bias)[i].reshape(-1),
                     get(attention.v_bias)[i].reshape(-1)])
            if config.qk_norm:
                extras["qk_norm_MxH"] = jnp.concatenate([
                    jnp.broadcast_to(get(attention.q_norm.weight)[i], (n, h)),
                    jnp.broadcast_to(get(attention.k_norm.weight)[i], (k, h))])
            if config.o_bias:
                extras["o_bias_D"] = get(attention.o_bias)[i]
            if config.mlp_bias:
                extras["gate_up_bias_2F"] = jnp.concatenate([get(mlp.gate_bias)[i], get(mlp.up_bias)[i]])
                extras["down_bias_D"] = get(mlp.down_bias)[i]
            layers.append(DecodeLayer(
                attention_norm_D=get(self.layers.attention_norm.weight)[i],
                qkv_DxE=jnp.concatenate(
                    [q[i].reshape(d, n * h), kk[i].reshape(d, k * h), v[i].reshape(d, k * h)], axis=1),
                o_ExD=o[i].reshape(n * h, d),
                mlp_norm_D=get(self.layers.mlp_norm.weight)[i],
                gate_up_Dx2F=jnp.concatenate([gate[i], up[i]], axis=1),
                down_FxD=down[i],
                **extras,
            ))
        return DecodeWeights(
            embedding_VxD=get(self.embedding), layers=tuple(layers), final_norm_D=get(self.final_norm.weight),
            projection_DxV=self.output_projection(),
        )

    def decode_step(
        self, weights: DecodeWeights, tokens_B: Array, positions_B: Array, live_B: Array, cache: DecodeCache
    ) -> tuple[Array, DecodeCache]:
        """One token per row through the model, written into the cache at slot ``cache.index``.

        The same computation as :meth:`hidden_states` + :meth:`logits` with ``T = 1`` and a cache,
        restructured for a decode loop: fused projections (:class:`DecodeWeights`), the blocks
        unrolled over per-layer cache arrays updated in place, and attention over the cache's
        allocated slots (:func:`~opd_jax.models.attention.decode_attention`).

        Args:
          weights: from :meth:`decode_weights` (prepared once, outside the loop).
          tokens_B: int32 token ids.
          positions_B: int32 RoPE positions.
          live_B: bool; a row that is not live writes an invalid slot (never attended to).
          cache: a :class:`DecodeCache` with a free slot at ``index`` (shared or per row).

        Returns:
          float32 logits ``[B, V]`` and the cache with ``index + 1``.
        """
        config = self.config
        n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
        batch = tokens_B.shape[0]
        inv_freq, factor = rope_inverse_frequencies(config.rope, h)
        angles = positions_B.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)  # [B, H/2]
        angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]
        cos = (jnp.cos(angles) * factor).astype(self.compute_dtype)
        sin = (jnp.sin(angles) * factor).astype(self.compute_dtype)

        def rope(x_BxMxH):
            first, second = jnp.split(x_BxMxH, 2, axis=-1)
            return x_BxMxH * cos + jnp.concatenate([-second, first], axis=-1) * sin

        write = _slot_writer(cache.index, batch)
        valid_BxS = write(cache.valid_BxS, live_B, slot_axis=1)
        x = weights.embedding_VxD[tokens_B]  # [B, D]
        keys, values = [], []
        for layer, layer_keys, layer_values in zip(weights.layers, cache.keys_BxKxHxS, cache.values_BxKxSxH):
            qkv = _rms_norm(x, layer.attention_norm_D, config.rms_norm_eps) @ layer.qkv_DxE
            if layer.qkv_bias_E is not None:
                qkv = qkv + layer.qkv_bias_E
            # Query and key heads side by side [B, N + K, H]: norm and RoPE act per head alike.
            qk = qkv[:, : (n + k) * h].reshape(batch, n + k, h)
            new_v = qkv[:, (n + k) * h :].reshape(batch, k, h)
            if layer.qk_norm_MxH is not None:
                qk = _rms_norm(qk, layer.qk_norm_MxH, config.rms_norm_eps)
            qk = rope(qk)
            q, new_k = qk[:, :n], qk[:, n:]
            layer_keys = write(layer_keys, new_k.astype(layer_keys.dtype), slot_axis=3)
            layer_values = write(layer_values, new_v.astype(layer_values.dtype), slot_axis=2)
            keys.append(layer_keys)
            values.append(layer_values)
            attended = attention_lib.decode_attention(
                q.reshape(batch, k, n // k, h), layer_keys.astype(q.dtype), layer_values.astype(q.dtype), valid_BxS,
                config.attention_scale,
            )
            out = attended.reshape(batch, n * h) @ layer.o_ExD
            x = x + (out + layer.o_bias_D if layer.o_bias_D is not None else out)
            gate_up = _rms_norm(x, layer.mlp_norm_D, config.rms_norm_eps) @ layer.gate_up_Dx2F
            if layer.gate_up_bias_2F is not None:
                gate_up = gate_up + layer.gate_up_bias_2F
            gate, up = jnp.split(gate_up, 2, axis=-1)
            out = (jax.nn.silu(gate) * up) @ layer.down_FxD
            x = x + (out + layer.down_bias_D if layer.down_bias_D is not None else out)
        hidden = _rms_norm(x, weights.final_norm_D, config.rms_norm_eps)
        logits = jnp.einsum("bd,dv->bv", hidden, weights.projection_DxV, preferred_element_type=jnp.float32)
        return logits, DecodeCache(tuple(keys), tuple(values), valid_BxS, cache.index + 1)

    def output_projection(self) -> Array:
        """``[D, V]`` in the compute dtype: the LM head, or the transposed embedding when tied."""
        projection = self.embedding[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return projection.astype(self.compute_dtype)

    def logits(self, hidden_BxTxD: Array) -> Array:
        """``[B, T, V]`` float32 logits from hidden states."""
        return jnp.einsum(
            "btd,dv->btv", hidden_BxTxD, self.output_projection(), preferred_element_type=jnp.float32
        )

    def __call__(self, tokens_BxT: Array, *, positions_BxT: Array | None = None, token_mask_BxT: Array | None = None) -> Array:
        """``[B, T] int -> [B, T, V]`` float32 logits of a causal forward pass."""
        hidden, _ = self.hidden_states(tokens_BxT, positions_BxT=positions_BxT, token_mask_BxT=token_mask_BxT)
        return self.logits(hidden)
