"""Attention implementations behind one pure function: an XLA reference, a blockwise (flash-style)
plain-JAX kernel, the Pallas TPU splash kernel and cuDNN.

Every implementation computes the same thing (dimension names: ``B`` batch, ``T`` queries, ``S``
key / value cache slots, ``N`` query heads, ``K`` key / value heads, ``H`` head size)::

    out[b, t, n] = softmax_s(scale · q[b, t, n] · k[b, s, n // (N // K)])  @  v[b, s, n // (N // K)]
    over the visible slots  s <= query_slots_T[t]  and  key_valid_BxS[b, s]

so query row ``t`` sits at absolute cache slot ``query_slots_T[t]``: ``arange(T)`` for prefill /
training (``S == T``), ``[index]`` for one decode step against a cache of ``S`` slots. Grouped-query
attention maps query head ``n`` to key / value head ``n // (N // K)`` (as
``jax.nn.dot_product_attention`` does; ``K == 1`` is multi-query attention). Softmax statistics
and accumulation are float32 always; the output has the dtype of ``q``.

Rows without a visible key output zeros for ``xla``, ``chunked`` and ``cudnn``. ``splash`` is only
for self-attention and differs at padding rows (see ``_splash``); at every row with a visible key
the implementations agree.

Implementations (``IMPLEMENTATIONS``; ``resolve_implementation`` maps ``"auto"`` to one):

- ``xla``: ``jax.nn.dot_product_attention`` with the explicit mask; materialises the
  ``[B, N, T, S]`` scores (memory O(T·S) forward and backward). The reference.
- ``chunked``: online softmax over key blocks inside a loop over query blocks, with a custom VJP
  that saves only the output and the per-row logsumexp and recomputes scores block by block in the
  backward pass (FlashAttention-2). Memory O(block²) beyond the O(T·N·H) inputs and outputs; any
  backend, any ``T`` / ``S`` (padded internally), jit- and vmap-able.
- ``splash``: the Pallas TPU splash-attention kernel (TPU, or ``interpret=True`` anywhere) for
  causal self-attention with padding as segment ids; wrapped in ``jax.shard_map`` under a mesh.
- ``cudnn``: cuDNN flash attention through ``jax.nn.dot_product_attention(implementation="cudnn")``
  (GPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "chunked", "splash", "cudnn")
_RESOLVED = ("xla", "chunked", "splash", "cudnn")

# Masked scores are replaced by this finite value (not -inf) so that the running maximum of a block
# row without visible keys stays finite and exp(m_old - m_new) never computes inf - inf.
_MASKED_SCORE = -1e30

# Splash kernel blocks must be multiples of the TPU lane width (128); larger blocks are faster.
_SPLASH_LANES = 128
_SPLASH_BLOCKS = (512, 256, 128)

# Mesh axes the splash wrapper shards over: batch over data-parallel axes, heads over "tensor".
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"


# --------------------------------------------------------------------------------------------------
# Choosing an implementation


def _cudnn_usable() -> bool:
    """Whether cuDNN flash attention can run here: a CUDA GPU of compute capability >= 8.0 and cuDNN.

    jax has no public query for cuDNN, so this asks its private version module and treats any
    failure (no GPU backend, no CUDA plugin, a ROCm device) as "not usable".
    """
    try:
        from jax._src.lib import cuda_versions

        if cuda_versions is None or cuda_versions.cudnn_get_version() <= 0:
            return False
        device = jax.devices("gpu")[0]
        major = int(str(device.compute_capability).split(".")[0])
    except Exception:  # noqa: BLE001 - any failure means cuDNN cannot be used
        return False
    return major >= 8


def resolve_implementation(implementation: str, platform: str | None = None, *, interpret: bool = False) -> str:
    """Maps a configured attention implementation to one that can run on ``platform``.

    Args:
      implementation: one of ``IMPLEMENTATIONS``. ``"auto"`` picks ``"splash"`` on TPU, ``"cudnn"`` on
        a GPU where cuDNN flash attention is usable, ``"chunked"`` otherwise; it never picks an
        implementation that cannot run.
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``; defaults to ``jax.default_backend()``. Pass
        ``"tpu"`` when compiling ahead of time for a TPU topology from another host.
      interpret: allow ``"splash"`` off TPU (the Pallas interpreter: slow, for tests).

    Returns:
      One of ``"xla"``, ``"chunked"``, ``"splash"``, ``"cudnn"``.

    Raises:
      ValueError: for an unknown name (the message lists the allowed ones), ``"splash"`` off TPU
        without ``interpret``, or ``"cudnn"`` where cuDNN flash attention is not usable.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; allowed: {', '.join(IMPLEMENTATIONS)}")
    platform = jax.default_backend() if platform is None else platform
    if implementation == "auto":
        if platform == "tpu":
            return "splash"
        if platform == "gpu" and _cudnn_usable():
            return "cudnn"
        return "chunked"
    if implementation == "splash" and platform != "tpu" and not interpret:
        raise ValueError(
            f"attention implementation 'splash' is a Pallas TPU kernel and the platform is {platform!r}; "
            "use 'chunked' (or interpret=True, the slow Pallas interpreter, for tests)"
        )
    if implementation == "cudnn" and not (platform == "gpu" and _cudnn_usable()):
        raise ValueError(
            f"attention implementation 'cudnn' needs a CUDA GPU (compute capability >= 8.0) with cuDNN; "
            f"the platform is {platform!r}{' without usable cuDNN' if platform == 'gpu' else ''}; use 'chunked'"
        )
    return implementation


# --------------------------------------------------------------------------------------------------
# Entry point


def visible_mask(query_slots_T: Array, key_valid_BxS: Array) -> Array:
    """The attention rule as a bool ``[B, T, S]`` mask: slot ``s`` is visible to query row ``t`` iff
    ``s <= query_slots_T[t]`` and ``key_valid_BxS[b, s]``."""
    slots_S = jnp.arange(key_valid_BxS.shape[1], dtype=jnp.int32)
    causal_TxS = slots_S[None, :] <= query_slots_T.astype(jnp.int32)[:, None]
    return causal_TxS[None] & key_valid_BxS.astype(bool)[:, None, :]


def attention(
    q_BxTxNxH: Array,
    k_BxSxKxH: Array,
    v_BxSxKxH: Array,
    *,
    query_slots_T: Array,
    key_valid_BxS: Array,
    scale: float,
    implementation: str = "xla",
    block_size: int = 512,
    interpret: bool = False,
) -> Array:
    """Masked (grouped-query) attention of ``T`` queries against ``S`` key / value slots.

    Args:
      q_BxTxNxH: queries, float dtype.
      k_BxSxKxH: keys; ``N % K == 0``. Cast to the dtype of ``q``.
      v_BxSxKxH: values, like ``k``.
      query_slots_T: int32 ``[T]``, the absolute cache slot of each query row.
      key_valid_BxS: bool ``[B, S]``, which slots hold real tokens.
      scale: multiplies the scores (usually ``H ** -0.5``).
      implementation: ``"xla"``, ``"chunked"``, ``"splash"`` or ``"cudnn"``, already resolved by
        ``resolve_implementation`` (``"auto"`` is refused here).
      block_size: query and key block size of ``"chunked"`` (capped at ``T`` and ``S``); the other
        implementations ignore it.
      interpret: run ``"splash"`` in the Pallas interpreter (any backend; slow).

    Returns:
      ``[B, T, N, H]`` in the dtype of ``q``. Rows without a visible key are zeros (``splash``: see
      ``_splash`` for its padding rows).
    """
    if implementation not in _RESOLVED:
        raise ValueError(
            f"attention implementation must be one of {', '.join(_RESOLVED)} (resolve 'auto' with "
            f"resolve_implementation first); got {implementation!r}"
        )
    _check_shapes(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, query_slots_T, key_valid_BxS)
    k_BxSxKxH = k_BxSxKxH.astype(q_BxTxNxH.dtype)
    v_BxSxKxH = v_BxSxKxH.astype(q_BxTxNxH.dtype)
    if implementation == "chunked":
        return _chunked(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, query_slots_T, key_valid_BxS, scale, block_size)
    if implementation == "splash":
        return _splash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, query_slots_T, key_valid_BxS, scale, interpret)
    mask_BxTxS = visible_mask(query_slots_T, key_valid_BxS)
    if implementation == "cudnn":
        return _cudnn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, scale)
    out = jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_BxTxS[:, None], scale=scale)
    return _zero_empty_rows(out, mask_BxTxS)


def decode_attention(q_BxKxGxH: Array, keys_BxKxHxS: Array, values_BxKxSxH: Array, visible_BxS: Array,
                     scale: float) -> Array:
    """One query row per sequence against a decode cache laid out heads-first.

    The sampler's decode step: key / value heads lead the cache (keys ``[B, K, H, S]``, values
    ``[B, K, S, H]``), so both products are plain batched matmuls over ``(B, K)`` that read the
    cache where it lies, with no transpose or copy of it; ``S`` is the part of the cache the
    sampler has grown so far (see :class:`opd_jax.models.decoder.DecodeCache`), not the whole
    rollout length.

    The arithmetic is that of one ``chunked`` key block (float32 scores, maximum, ``exp``, sum,
    ``p @ v`` then one division), so it agrees with the cached ``chunked`` / ``xla`` paths to
    float32 round-off.

    Args:
      q_BxKxGxH: queries, the ``G = N / K`` query heads of each key / value head side by side
        (query head ``n = k * G + g``, as grouped-query attention maps them).
      keys_BxKxHxS, values_BxKxSxH: the cache, in the dtype of ``q``.
      visible_BxS: bool, the slots this row may attend to (written and real).
      scale: multiplies the scores.

    Returns:
      ``[B, K, G, H]`` in the dtype of ``q``; zeros for a row without a visible slot.
    """
    s = jnp.einsum("bkgh,bkhs->bkgs", q_BxKxGxH, keys_BxKxHxS, preferred_element_type=jnp.float32)
    s = s * jnp.float32(scale)
    visible = visible_BxS[:, None, None, :]
    m = jnp.max(jnp.where(visible, s, _MASKED_SCORE), axis=-1)
    p = jnp.where(visible, jnp.exp(s - m[..., None]), 0.0)
    l = jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkgs,bksh->bkgh", p.astype(values_BxKxSxH.dtype), values_BxKxSxH,
                    preferred_element_type=jnp.float32)
    seen = l > 0
    out = jnp.where(seen[..., None], pv / jnp.where(seen, l, 1.0)[..., None], 0.0)
    return out.astype(q_BxKxGxH.dtype)


def _check_shapes(q, k, v, query_slots_T, key_valid_BxS) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"attention wants q [B, T, N, H] and k, v [B, S, K, H]; got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    (B, T, N, H), (Bk, S, K, Hk) = q.shape, k.shape
    if Bk != B or Hk != H or N % K:
        raise ValueError(
            f"attention: q {q.shape} and k/v {k.shape} disagree (batch and head size must match, "
            f"query heads N={N} must be a multiple of key/value heads K={K})"
        )
    if query_slots_T.shape != (T,) or key_valid_BxS.shape != (B, S):
        raise ValueError(
            f"attention: query_slots_T must be [T]={(T,)} and key_valid_BxS [B, S]={(B, S)}; "
            f"got {query_slots_T.shape} and {key_valid_BxS.shape}"
        )


def _zero_empty_rows(out_BxTxNxH: Array, mask_BxTxS: Array) -> Array:
    # jax.nn.dot_product_attention (xla and cudnn) gives a row without visible keys a uniform
    # softmax over all slots (the mean of v), not zeros; the contract is zeros, like "chunked".
    any_BxT = jnp.any(mask_BxTxS, axis=-1)
    return jnp.where(any_BxT[:, :, None, None], out_BxTxNxH, jnp.zeros((), out_BxTxNxH.dtype))


# --------------------------------------------------------------------------------------------------
# cuDNN


def _cudnn(q, k, v, mask_BxTxS, scale):
    """cuDNN flash attention; the visibility rule goes in as the boolean mask.

    cuDNN's own ``is_causal`` / ``*_seq_lengths`` express only top-left-aligned causality and right
    padding, not left-padded prompts or queries at cache offsets, so the mask is passed instead
    (jax turns it into a ``[B, 1, T, S]`` additive bias: O(B·T·S), not per head). cuDNN wants
    bfloat16 / float16: float32 inputs are cast to bfloat16 for the call and the output back.
    """
    dtype = q.dtype
    if dtype == jnp.float32:
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask_BxTxS[:, None], scale=scale, implementation="cudnn")
    return _zero_empty_rows(out, mask_BxTxS).astype(dtype)


# --------------------------------------------------------------------------------------------------
# Chunked (FlashAttention-2 in plain JAX)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _chunked(q, k, v, query_slots_T, key_valid_BxS, scale, block_size):
    """Pads ``T`` / ``S`` to block multiples, groups query heads by key / value head, runs ``_flash``.

    Padded query rows sit at slot -1 (they see nothing and are sliced off); padded slots are
    invalid, so padding changes no real row.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if block_size < 1:
        raise ValueError(f"attention block_size must be >= 1; got {block_size}")
    bq, bk = min(block_size, T), min(block_size, S)
    Tp, Sp = _round_up(T, bq), _round_up(S, bk)
    slots_T = jnp.pad(query_slots_T.astype(jnp.int32), (0, Tp - T), constant_values=-1)
    valid_BxS = jnp.pad(key_valid_BxS.astype(bool), ((0, 0), (0, Sp - S)))
    q_BxTxKxGxH = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0))).reshape(B, Tp, K, N // K, H)
    k, v = (jnp.pad(x, ((0, 0), (0, Sp - S), (0, 0), (0, 0))) for x in (k, v))
    out = _flash(q_BxTxKxGxH, k, v, slots_T, valid_BxS, float(scale), bq, bk)
    return out.reshape(B, Tp, N, H)[:, :T]


def _block_scores(q_BxQxKxGxH, k_BxCxKxH, slots_Q, key_slots_C, valid_BxC, scale):
    """Scaled float32 scores ``[B, K, G, Q, C]`` of one query block against one key block, and the
    visibility mask ``[B, 1, 1, Q, C]``."""
    s = jnp.einsum("bqkgh,bckh->bkgqc", q_BxQxKxGxH, k_BxCxKxH, preferred_element_type=jnp.float32)
    visible_BxQxC = (key_slots_C[None, :] <= slots_Q[:, None])[None] & valid_BxC[:, None, :]
    return s * jnp.float32(scale), visible_BxQxC[:, None, None]


def _block_needed(slots_Q, j, bk):
    # A key block is skipped when it lies entirely after the last slot of the query block (the
    # causal upper triangle); slots are shared by the batch, so this stays a real branch under vmap.
    return jnp.max(slots_Q) >= j * bk


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, slots_T, valid_BxS, scale, bq, bk):
    """Blockwise attention of grouped queries ``q [B, Tp, K, G, H]`` against ``k, v [B, Sp, K, H]``
    (``Tp % bq == Sp % bk == 0``); returns ``[B, Tp, K, G, H]`` in the dtype of ``q``."""
    return _flash_forward(q, k, v, slots_T, valid_BxS, scale, bq, bk)[0]


def _flash_forward(q, k, v, slots_T, valid_BxS, scale, bq, bk):
    """Online softmax: a ``lax.map`` over query blocks, a loop over key blocks carrying the running
    maximum ``m``, normaliser ``l`` and unnormalised output ``acc`` (float32). Returns the output
    and the per-row logsumexp ``[B, K, G, Tp]`` (0 for rows without a visible key)."""
    B, Tp, K, G, H = q.shape
    nq, nk = Tp // bq, k.shape[1] // bk

    def query_block(i):
        q_b = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
        slots_b = lax.dynamic_slice_in_dim(slots_T, i * bq, bq)

        def key_step(j, carry):
            m, l, acc = carry
            k_b, v_b = (lax.dynamic_slice_in_dim(x, j * bk, bk, axis=1) for x in (k, v))
            valid_b = lax.dynamic_slice_in_dim(valid_BxS, j * bk, bk, axis=1)
            key_slots = j * bk + jnp.arange(bk, dtype=jnp.int32)
            s, vis = _block_scores(q_b, k_b, slots_b, key_slots, valid_b, scale)
            m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, _MASKED_SCORE), axis=-1))
            p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqc,bckh->bkgqh", p.astype(v_b.dtype), v_b, preferred_element_type=jnp.float32)
            return m_new, l * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

        def maybe_key_step(j, carry):
            return lax.cond(_block_needed(slots_b, j, bk), key_step, lambda _, c: c, j, carry)

        init = (
            jnp.full((B, K, G, bq), _MASKED_SCORE, jnp.float32),
            jnp.zeros((B, K, G, bq), jnp.float32),
            jnp.zeros((B, K, G, bq, H), jnp.float32),
        )
        m, l, acc = lax.fori_loop(0, nk, maybe_key_step, init)
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        out_b = jnp.where(seen[..., None], acc / l_safe[..., None], 0.0)
        lse_b = jnp.where(seen, m + jnp.log(l_safe), 0.0)
        return out_b.transpose(0, 3, 1, 2, 4).astype(q.dtype), lse_b

    out_nxBxQxKxGxH, lse_nxBxKxGxQ = lax.map(query_block, jnp.arange(nq))
    out = out_nxBxQxKxGxH.transpose(1, 0, 2, 3, 4, 5).reshape(B, Tp, K, G, H)
    lse = lse_nxBxKxGxQ.transpose(1, 2, 3, 0, 4).reshape(B, K, G, Tp)
    return out, lse


def _flash_fwd(q, k, v, slots_T, valid_BxS, scale, bq, bk):
    out, lse = _flash_forward(q, k, v, slots_T, valid_BxS, scale, bq, bk)
    return out, (q, k, v, slots_T, valid_BxS, out, lse)


def _flash_bwd(scale, bq, bk, residuals, dout):
    q, k, v, slots_T, valid_BxS, out, lse = residuals
    dq, dk, dv = _flash_backward(q, k, v, slots_T, valid_BxS, out, lse, dout, scale, bq, bk)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _flash_backward(q, k, v, slots_T, valid_BxS, out, lse, dout, scale, bq, bk):
    """FlashAttention-2 backward: a scan over key blocks (emitting dk, dv) with a loop over query
    blocks inside that recomputes ``p = exp(s - lse)`` and adds each block's dq into a float32
    ``[B, Tp, K, G, H]`` carry. Memory O(block²) beyond the O(T·N·H) arrays."""
    B, Tp, K, G, H = q.shape
    Sp = k.shape[1]
    nq, nk = Tp // bq, Sp // bk
    # D_t = sum_h dout · out = sum_s p · dp, the softmax-backward row term.
    delta = jnp.einsum("btkgh,btkgh->bkgt", dout.astype(jnp.float32), out.astype(jnp.float32))

    def key_block(dq, j):
        k_b, v_b = (lax.dynamic_slice_in_dim(x, j * bk, bk, axis=1) for x in (k, v))
        valid_b = lax.dynamic_slice_in_dim(valid_BxS, j * bk, bk, axis=1)
        key_slots = j * bk + jnp.arange(bk, dtype=jnp.int32)

        def query_step(i, carry):
            dq, dk, dv = carry
            q_b, do_b = (lax.dynamic_slice_in_dim(x, i * bq, bq, axis=1) for x in (q, dout))
            slots_b = lax.dynamic_slice_in_dim(slots_T, i * bq, bq)
            lse_b, delta_b = (lax.dynamic_slice_in_dim(x, i * bq, bq, axis=3) for x in (lse, delta))
            s, vis = _block_scores(q_b, k_b, slots_b, key_slots, valid_b, scale)
            p = jnp.where(vis, jnp.exp(s - lse_b[..., None]), 0.0)
            dv = dv + jnp.einsum("bkgqc,bqkgh->bckh", p.astype(do_b.dtype), do_b, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgh,bckh->bkgqc", do_b, v_b, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_b[..., None]) * jnp.float32(scale)
            dk = dk + jnp.einsum("bkgqc,bqkgh->bckh", ds.astype(q_b.dtype), q_b, preferred_element_type=jnp.float32)
            dq_b = jnp.einsum("bkgqc,bckh->bqkgh", ds.astype(k_b.dtype), k_b, preferred_element_type=jnp.float32)
            dq_b = dq_b + lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=1)
            dq = lax.dynamic_update_slice_in_dim(dq, dq_b, i * bq, axis=1)
            return dq, dk, dv

        def maybe_query_step(i, carry):
            slots_b = lax.dynamic_slice_in_dim(slots_T, i * bq, bq)
            return lax.cond(_block_needed(slots_b, j, bk), query_step, lambda _, c: c, i, carry)

        zeros_kv = jnp.zeros((B, bk, K, H), jnp.float32)
        dq, dk, dv = lax.fori_loop(0, nq, maybe_query_step, (dq, zeros_kv, zeros_kv))
        return dq, (dk, dv)

    dq, (dk_n, dv_n) = lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
    dk, dv = (x.transpose(1, 0, 2, 3, 4).reshape(B, Sp, K, H) for x in (dk_n, dv_n))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# --------------------------------------------------------------------------------------------------
# Splash (Pallas TPU kernel)


def _splash(q, k, v, query_slots_T, key_valid_BxS, scale, interpret):
    """Causal self-attention with the Pallas TPU splash kernel; padding goes in as segment ids.

    Only for self-attention: ``S == T`` (checked) and ``query_slots_T == arange(T)`` (checked when
    concrete; the decoder calls it only for a full-sequence forward). The segment id of a token is
    ``key_valid`` (1 real, 0 padding) for queries and keys alike, so a real query attends the real
    keys at slots <= its own: the rule of ``attention`` at every real row. A padding row attends the
    padding slots <= its own instead (it always sees itself, so its output is finite but
    arbitrary): compare, and take losses over, real rows only.

    ``T`` is padded at the end to a multiple of 128 (the kernel's lane width) with segment 0, which
    no real query can see past causality. Under an active mesh the kernel runs in ``jax.shard_map``
    (XLA cannot partition a Pallas call): batch over the mesh's ("data", "fsdp") axes, heads over
    "tensor". Kernel blocks are the largest of 512 / 256 / 128 dividing the padded length.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if S != T:
        raise ValueError(f"attention 'splash' is self-attention only: key slots S={S} must equal queries T={T}")
    if not isinstance(query_slots_T, jax.core.Tracer) and not np.array_equal(np.asarray(query_slots_T), np.arange(T)):
        raise ValueError("attention 'splash' is self-attention only: query_slots_T must be arange(T)")
    if not interpret and jax.config.jax_enable_x64:
        # Mosaic lowers the kernel's index arithmetic to mixed i32 / i64 ops and fails verification.
        raise ValueError(
            "attention 'splash' does not lower for TPU with jax_enable_x64 on; turn it off "
            "(jax.enable_x64(False) around tracing and lowering) or use 'chunked'"
        )
    # The kernel takes q pre-scaled; scale in float32 so bfloat16 q rounds once.
    q = (q.astype(jnp.float32) * jnp.float32(scale)).astype(q.dtype)
    segment_BxT = key_valid_BxS.astype(jnp.int32)
    local = functools.partial(_splash_local, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_BxT)
    batch_axes, head_axis = _splash_mesh_axes(mesh, B, N, K)
    qkv_spec = jax.P(batch_axes, None, head_axis, None)
    return jax.shard_map(
        local,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, jax.P(batch_axes, None)),
        out_specs=qkv_spec,
        check_vma=False,
    )(q, k, v, segment_BxT)


def _splash_mesh_axes(mesh, B, N, K):
    """The mesh axes splash's ``shard_map`` uses for the batch and the heads; checks divisibility."""
    batch_axes = tuple(a for a in _BATCH_AXES if a in mesh.axis_names)
    batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
    head_axis = _HEAD_AXIS if _HEAD_AXIS in mesh.axis_names else None
    head_shards = mesh.shape[head_axis] if head_axis else 1
    if B % batch_shards:
        raise ValueError(
            f"attention 'splash' under a mesh: batch B={B} must be divisible by the {batch_axes} "
            f"mesh axes (size {batch_shards})"
        )
    if N % head_shards or K % head_shards:
        raise ValueError(
            f"attention 'splash' under a mesh: query heads N={N} and key/value heads K={K} must both be "
            f"divisible by the {head_axis!r} mesh axis (size {head_shards})"
        )
    return (batch_axes or None), head_axis


def _splash_block(length: int) -> int:
    """The largest kernel block (512, 256, 128) dividing ``length`` (a multiple of 128)."""
    return next(b for b in _SPLASH_BLOCKS if length % b == 0)


def _splash_local(q, k, v, segment_BxT, *, interpret):
    """The splash kernel on one device's shard: ``q [B, T, N, H]`` (pre-scaled), ``k, v [B, T, K, H]``,
    ``segment_BxT`` int32; returns ``[B, T, N, H]`` in the dtype of ``q``."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # TPU-only code: import late

    B, T, N, H = q.shape
    K = k.shape[2]
    Tp = _round_up(T, _SPLASH_LANES)
    pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
    # Heads-first: q [B, K, G, Tp, H] (query heads grouped by their key/value head), k, v [B, K, Tp, H].
    q = jnp.pad(q, pad).reshape(B, Tp, K, N // K, H).transpose(0, 2, 3, 1, 4)
    k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (k, v))
    segment_BxT = jnp.pad(segment_BxT, ((0, 0), (0, Tp - T)))
    kernel = _splash_kernel(N // K, Tp, interpret)

    def one(q_GxTxH, k_TxH, v_TxH, segment_T):
        return kernel(q_GxTxH, k_TxH, v_TxH, splash.SegmentIds(q=segment_T, kv=segment_T))

    # The MQA kernel per key/value head (its G query heads share k and v), vmapped over heads and
    # batch. (The MHA kernel's own GQA path does not trace under jax_enable_x64: its head index
    # arithmetic mixes int32 and int64.)
    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head)(q, k, v, segment_BxT)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, H)[:, :T].astype(q.dtype)


def _splash_kernel(num_heads: int, length: int, interpret: bool):
    """The causal splash MQA kernel for ``num_heads`` query heads sharing one key/value head."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = _splash_block(length)
    block_sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(num_heads)])
    return splash.make_splash_mqa(
        mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
