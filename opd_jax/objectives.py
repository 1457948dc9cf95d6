"""Losses built on the advantages: policy-gradient surrogates and full-vocabulary divergences.

All losses return per-sequence values ``[B]`` (sums over the response tokens of each row). Reduce
them with the *global* response-token count of the batch, not a per-row or per-device mean, so that
gradient accumulation and data-parallel size do not change the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opd_jax import divergences as divergences_lib
from opd_jax.advantages import check_float, check_mask, check_same_shape
from opd_jax.chunking import map_row_chunks

Array = jax.Array

__all__ = [
    "clipped_token_mask",
    "full_vocab_divergence",
    "importance_surrogate",
    "pg_surrogate",
]


def _broadcast_advantages(advantages: Array, mask: Array) -> Array:
    advantages = jnp.asarray(advantages)
    if advantages.ndim == 1:
        if advantages.shape[0] != jnp.shape(mask)[0]:
            raise ValueError(
                f"sequence advantages {list(advantages.shape)} do not match mask {list(jnp.shape(mask))}"
            )
        advantages = advantages[:, None]
    else:
        check_same_shape(advantages=advantages, mask=mask)
    return jnp.broadcast_to(advantages, jnp.shape(mask))


def pg_surrogate(student_logp: Array, advantages: Array, mask: Array) -> Array:
    """The policy-gradient surrogate ``L = −Σ_t m_t · sg(A_t) · log π(y_t|s_t)``.

    Its gradient, averaged over responses sampled from the student, is the gradient the advantage
    estimator claims to follow (exactly so for unbiased estimators).

    Args:
      student_logp: ``[B, T]`` float, differentiable log-probabilities of the sampled tokens.
      advantages: ``[B, T]`` token advantages or ``[B]`` sequence advantages (broadcast over t).
      mask: ``[B, T]`` bool or {0, 1}; other values raise a ``ValueError`` when the mask is
        concrete (a traced mask cannot be checked: there any non-zero value counts as 1).

    Returns:
      ``[B]`` per-sequence loss in the dtype of ``student_logp``; masked positions contribute
      nothing, even if they hold ``-inf`` or NaN.
    """
    check_same_shape(student_logp=student_logp, mask=mask)
    check_float(student_logp=student_logp)
    check_mask(mask)
    student_logp = jnp.asarray(student_logp)
    in_response = jnp.asarray(mask).astype(bool)
    advantages = jax.lax.stop_gradient(_broadcast_advantages(advantages, mask)).astype(student_logp.dtype)
    zero = jnp.zeros((), student_logp.dtype)
    # Both factors are masked before the product so no -inf * 0 reaches values or gradients.
    terms = jnp.where(in_response, advantages, zero) * jnp.where(in_response, student_logp, zero)
    return -jnp.sum(terms, axis=-1)


def _importance_ratio(student_logp: Array, behavior_logp: Array, mask: Array) -> tuple[Array, Array]:
    check_same_shape(student_logp=student_logp, behavior_logp=behavior_logp, mask=mask)
    check_float(student_logp=student_logp, behavior_logp=behavior_logp)
    check_mask(mask)
    student_logp = jnp.asarray(student_logp)
    in_response = jnp.asarray(mask).astype(bool)
    zero = jnp.zeros((), student_logp.dtype)
    log_ratio = jnp.where(
        in_response, student_logp - jax.lax.stop_gradient(behavior_logp).astype(student_logp.dtype), zero
    )
    return jnp.exp(log_ratio), in_response


def _check_clip_epsilons(clip_epsilon: float, clip_epsilon_high: float | None) -> tuple[float, float]:
    high = clip_epsilon if clip_epsilon_high is None else clip_epsilon_high
    if not 0.0 < float(clip_epsilon) < 1.0:
        raise ValueError(f"clip_epsilon must lie in (0, 1), got {clip_epsilon!r}")
    if not float(high) > 0.0:
        raise ValueError(f"clip_epsilon_high must be > 0, got {clip_epsilon_high!r}")
    return float(clip_epsilon), float(high)


def importance_surrogate(
    student_logp: Array,
    behavior_logp: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_epsilon: float = 0.2,
    clip_epsilon_high: float | None = None,
) -> Array:
    """PPO-style clipped surrogate for updates on rollouts sampled by an older policy.

    ``L = −Σ_t m_t · min(r_t A_t, clip(r_t, 1 − ε, 1 + ε_high) A_t)`` with the per-token importance
    ratio ``r_t = π_θ(y_t|s_t) / π_old(y_t|s_t)``. On the rollout policy itself (``r = 1``) its
    gradient equals that of :func:`pg_surrogate`.

    Args:
      student_logp: ``[B, T]`` differentiable log-probabilities under the current policy.
      behavior_logp: ``[B, T]`` log-probabilities under the policy that sampled the tokens.
      advantages: ``[B, T]`` or ``[B]``, treated as constants.
      mask: ``[B, T]`` bool or {0, 1}.
      clip_epsilon: lower clip ``ε`` in (0, 1).
      clip_epsilon_high: upper clip, ``ε`` if ``None`` (a larger value is the "clip-higher" variant).

    Returns:
      ``[B]`` per-sequence loss, dtype of ``student_logp``.
    """
    low, high = _check_clip_epsilons(clip_epsilon, clip_epsilon_high)
    ratio, in_response = _importance_ratio(student_logp, behavior_logp, mask)
    advantages = jax.lax.stop_gradient(_broadcast_advantages(advantages, mask)).astype(ratio.dtype)
    advantages = jnp.where(in_response, advantages, 0)
    objective = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - low, 1 + high) * advantages)
    return -jnp.sum(jnp.where(in_response, objective, 0), axis=-1)


def clipped_token_mask(
    student_logp: Array,
    behavior_logp: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_epsilon: float = 0.2,
    clip_epsilon_high: float | None = None,
) -> Array:
    """``[B, T]`` bool: response tokens whose gradient :func:`importance_surrogate` clips to zero."""
    low, high = _check_clip_epsilons(clip_epsilon, clip_epsilon_high)
    ratio, in_response = _importance_ratio(student_logp, behavior_logp, mask)
    advantages = _broadcast_advantages(advantages, mask)
    clipped = ((advantages > 0) & (ratio > 1 + high)) | ((advantages < 0) & (ratio < 1 - low))
    return in_response & clipped


def full_vocab_divergence(
    student_logits: Array,
    teacher_logits: Array,
    mask: Array,
    *,
    divergence: str | divergences_lib.Divergence,
    chunk_size: int | None = None,
) -> Array:
    """Per-token ``D_f(q ‖ π)(s_t) = Σ_v π(v|s_t) f(q(v|s_t)/π(v|s_t))`` from two logit tensors.

    Differentiable in ``student_logits``; the teacher is a constant. Log-softmax runs in float32
    at least (float64 inputs stay float64), whatever the logits' dtype.

    With ``chunk_size``, tokens are processed ``chunk_size`` at a time under ``jax.checkpoint``, so
    the temporaries of the forward and backward pass are ``O(chunk_size · V)`` instead of
    ``O(B · T · V)``; the result is the same as the unchunked one.

    Numerics (float32 included). Each term ``π(v) f(u_v)`` is formed by
    :func:`opd_jax.divergences.perspective` from ``log π`` and ``log q``: as ``π f(u)`` where
    ``u ≤ 1`` and as ``q f̃(1/u)`` (``f̃`` the conjugate generator) where ``u > 1``, so it is
    finite and accurate for any finite logits wherever the true value is within the float range,
    and its derivative gets the same treatment. ``−inf`` logits are zero-probability tokens:
    ``0 · f(·) = 0`` where both models give a token probability 0; where only one does, the term
    is its limit, ``+inf`` where the divergence is infinite (e.g. ``forward_kl`` with
    ``π(v) = 0 < q(v)``, ``reverse_kl`` with ``q(v) = 0 < π(v)``). Values are never NaN. A row whose
    value (or the derivative of one of its terms) is not finite gets a zero gradient: no finite
    descent direction is available there, and its ``+inf`` value says so. Each row needs at least
    one finite logit in each model.

    Masked positions contribute 0 to values and gradients, whatever their logits hold (NaN and
    ``±inf`` included): they are replaced before any arithmetic.

    Args:
      student_logits: ``[B, T, V]`` float (any float dtype).
      teacher_logits: ``[B, T, V]`` float.
      mask: ``[B, T]`` bool or {0, 1} (values are checked when the mask is concrete, not traced).
      divergence: a name or a ``Divergence``.
      chunk_size: tokens per chunk (over the flattened ``B · T`` axis), ``None`` for no chunking.

    Returns:
      ``[B, T]`` divergences in the compute dtype (float32, or float64 for float64 logits), 0 at
      masked positions.

    Raises:
      ValueError: shapes that do not match, non-float logits, or a concrete mask with values
        other than 0 and 1.
    """
    divergence = divergences_lib.get(divergence)
    student_logits = jnp.asarray(student_logits)
    teacher_logits = jnp.asarray(teacher_logits)
    if student_logits.ndim != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "expected matching [B, T, V] logits, got student_logits "
            f"{list(student_logits.shape)}, teacher_logits {list(teacher_logits.shape)}"
        )
    batch, length, vocab = student_logits.shape
    if tuple(jnp.shape(mask)) != (batch, length):
        raise ValueError(
            f"mask {list(jnp.shape(mask))} does not match logits [B, T] = {[batch, length]}"
        )
    check_float(student_logits=student_logits, teacher_logits=teacher_logits)
    check_mask(mask)
    compute_dtype = jnp.promote_types(student_logits.dtype, jnp.float32)
    in_response_BxT = jnp.asarray(mask).astype(bool)
    divergence_per_token = _per_token_divergence(divergence, compute_dtype)

    def masked_per_token(student_NxV, teacher_NxV, keep_N):
        # Padding is replaced before any arithmetic (not masked afterwards), so NaN / inf there
        # never enters the backward pass: the cotangent of the replaced entries is exactly 0.
        # Done per chunk, so no masked copy of the full logits is materialised.
        keep_Nx1 = keep_N[:, None]
        student_NxV = jnp.where(keep_Nx1, student_NxV, jnp.zeros((), student_NxV.dtype))
        teacher_NxV = jnp.where(keep_Nx1, teacher_NxV, jnp.zeros((), teacher_NxV.dtype))
        return divergence_per_token(student_NxV, teacher_NxV)

    num_tokens = batch * length
    student_flat = student_logits.reshape(num_tokens, vocab)
    teacher_flat = teacher_logits.reshape(num_tokens, vocab)
    per_token = map_row_chunks(
        masked_per_token, student_flat, teacher_flat, in_response_BxT.reshape(num_tokens), chunk_size=chunk_size
    )
    per_token = per_token.reshape(batch, length)
    return jnp.where(in_response_BxT, per_token, jnp.zeros((), compute_dtype))


def _per_token_divergence(divergence: divergences_lib.Divergence, compute_dtype):
    """``[N, V], [N, V] -> [N]``: ``Σ_v π(v) f(q(v)/π(v))`` with a closed-form derivative.

    The derivative in the student logits ``z`` is written out instead of differentiating ``f``:
    ``w_v = ∂/∂log π(v) [π(v) f(q(v)/π(v))] = π(v) (f(u_v) − u_v f'(u_v))`` comes from
    :func:`opd_jax.divergences.perspective` (formed like the term itself, from the larger of the two
    probabilities), and ``d log π = dz − Σ_w π(w) dz_w``. Automatic differentiation would go through
    both branches of every stable form of ``f`` (series, ``where``); the closed form costs one weight
    per entry, is exact (same value up to rounding) and, being a JVP rule, stays differentiable to
    any order. The teacher is a constant: its tangent is ignored.
    """

    def log_probs(student_NxV, teacher_NxV):
        log_p = jax.nn.log_softmax(student_NxV.astype(compute_dtype), axis=-1)
        log_q = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_NxV).astype(compute_dtype), axis=-1)
        return log_p, log_q

    @jax.custom_jvp
    def per_token(student_NxV: Array, teacher_NxV: Array) -> Array:
        term, _ = divergences_lib.perspective(divergence, *log_probs(student_NxV, teacher_NxV))
        return jnp.sum(term, axis=-1)

    @per_token.defjvp
    def per_token_jvp(primals, tangents):
        student_NxV, teacher_NxV = primals
        d_student_NxV = tangents[0].astype(compute_dtype)
        log_p, log_q = log_probs(student_NxV, teacher_NxV)
        term, weight = divergences_lib.perspective(divergence, log_p, log_q)
        value = jnp.sum(term, axis=-1)
        # A row whose value or a weight is not finite gets weight 0 (documented above): a
        # non-finite weight would make the transposed product (cotangent · weight) NaN.
        finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(weight), axis=-1)
        finite = finite & jnp.isfinite(jnp.sum(jnp.where(finite[:, None], weight, 0), axis=-1))
        weight = jnp.where(finite[:, None], weight, jnp.zeros((), weight.dtype))
        d_log_p = d_student_NxV - jnp.sum(jnp.exp(log_p) * d_student_NxV, axis=-1, keepdims=True)
        return value, jnp.sum(weight * d_log_p, axis=-1)

    return per_token
