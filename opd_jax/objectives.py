"""Losses built on the advantages: policy-gradient surrogates and full-vocabulary divergences.

All losses return per-sequence values ``[B]`` (sums over the response tokens of each row). Reduce
them with the *global* response-token count of the batch, not a per-row or per-device mean, so that
gradient accumulation and data-parallel size do not change the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from opd_jax import divergences as divergences_lib
from opd_jax.advantages import broadcast_advantages, check_float, check_mask, check_same_shape, discounted_future
from opd_jax.chunking import map_row_chunks

Array = jax.Array

__all__ = [
    "clipped_token_mask",
    "full_vocab_divergence",
    "full_vocab_divergence_from_hidden",
    "full_vocab_reward_to_go",
    "importance_surrogate",
    "pg_surrogate",
]


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
    >>> import jax.numpy as jnp
    >>> logp = jnp.log(jnp.array([[0.5, 0.25, 1.0]]))
    >>> [round(float(v), 4) for v in pg_surrogate(logp, jnp.array([[1.0, -1.0, 5.0]]), jnp.array([[1, 1, 0]]))]
    [-0.6931]
    """
    check_same_shape(student_logp=student_logp, mask=mask)
    check_float(student_logp=student_logp)
    check_mask(mask)
    student_logp = jnp.asarray(student_logp)
    in_response = jnp.asarray(mask).astype(bool)
    advantages = jax.lax.stop_gradient(broadcast_advantages(advantages, mask)).astype(student_logp.dtype)
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


def _check_clip_ratio_c(clip_ratio_c: float | None) -> float | None:
    # c ≤ 1 would cap tokens at r = 1, so even an on-policy update would lose their gradient;
    # c = +inf caps nothing (that is None).
    if clip_ratio_c is None:
        return None
    if not (float(clip_ratio_c) > 1.0 and math.isfinite(float(clip_ratio_c))):
        raise ValueError(f"clip_ratio_c must be None or lie in (1, ∞), got {clip_ratio_c!r}")
    return float(clip_ratio_c)


def importance_surrogate(
    student_logp: Array,
    behavior_logp: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_epsilon: float = 0.2,
    clip_epsilon_high: float | None = None,
    clip_ratio_c: float | None = None,
) -> Array:
    """PPO-style clipped surrogate for updates on rollouts sampled by an older policy.

    ``L = −Σ_t m_t · min(r_t A_t, clip(r_t, 1 − ε, 1 + ε_high) A_t)`` with the per-token importance
    ratio ``r_t = π_θ(y_t|s_t) / π_old(y_t|s_t)``. On the rollout policy itself (``r = 1``) its
    gradient equals that of :func:`pg_surrogate`.

    Dual clip (``clip_ratio_c = c``, as in verl; Ye et al. 2020, "Mastering Complex Control in MOBA
    Games with Deep Reinforcement Learning"): at tokens with ``A_t < 0`` the single-clip objective
    is unbounded below as ``r_t → ∞`` (a token the old policy found unlikely and the new one likes),
    so the per-token loss is also capped at ``−c A_t``:
    ``loss_t = min(max(−r_t A_t, −clip(r_t, 1 − ε, 1 + ε_high) A_t), −c A_t)``. The capped tokens
    (``r_t > c``) get no gradient. Tokens with ``A_t ≥ 0`` are unchanged.

    Args:
      student_logp: ``[B, T]`` differentiable log-probabilities under the current policy.
      behavior_logp: ``[B, T]`` log-probabilities under the policy that sampled the tokens.
      advantages: ``[B, T]`` or ``[B]``, treated as constants.
      mask: ``[B, T]`` bool or {0, 1}.
      clip_epsilon: lower clip ``ε`` in (0, 1).
      clip_epsilon_high: upper clip, ``ε`` if ``None`` (a larger value is the "clip-higher" variant).
      clip_ratio_c: dual-clip bound ``c`` in ``(1, ∞)`` for negative advantages; ``None`` (the
        default) is the single clip.

    Returns:
      ``[B]`` per-sequence loss, dtype of ``student_logp``.

    Raises:
      ValueError: a clip parameter outside its range, shapes that do not match, non-float
        log-probabilities, or a concrete mask with values other than 0 and 1.
    >>> import jax.numpy as jnp
    >>> behaviour = jnp.log(jnp.array([[0.5, 0.5]]))
    >>> current = jnp.log(jnp.array([[0.9, 0.9]]))  # ratio 1.8 at both tokens
    >>> advantages, mask = jnp.array([[1.0, -1.0]]), jnp.array([[1, 1]])
    >>> [round(float(v), 4) for v in importance_surrogate(current, behaviour, advantages, mask)]  # −(1.2 − 1.8)
    [0.6]
    >>> [round(float(v), 4) for v in importance_surrogate(current, behaviour, advantages, mask, clip_ratio_c=1.5)]
    [0.3]
    """
    low, high = _check_clip_epsilons(clip_epsilon, clip_epsilon_high)
    bound = _check_clip_ratio_c(clip_ratio_c)
    ratio, in_response = _importance_ratio(student_logp, behavior_logp, mask)
    advantages = jax.lax.stop_gradient(broadcast_advantages(advantages, mask)).astype(ratio.dtype)
    advantages = jnp.where(in_response, advantages, 0)
    objective = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - low, 1 + high) * advantages)
    if bound is not None:
        # The objective is −loss, so capping the loss at −c A is a floor of c A on the objective.
        objective = jnp.where(advantages < 0, jnp.maximum(objective, bound * advantages), objective)
    return -jnp.sum(jnp.where(in_response, objective, 0), axis=-1)


def clipped_token_mask(
    student_logp: Array,
    behavior_logp: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_epsilon: float = 0.2,
    clip_epsilon_high: float | None = None,
    clip_ratio_c: float | None = None,
) -> Array:
    """``[B, T]`` bool: response tokens whose gradient :func:`importance_surrogate` clips to zero.

    With ``clip_ratio_c``, tokens capped by the dual clip (``A < 0`` and ``r > c``) count as well.
    Arguments as for :func:`importance_surrogate`.
    """
    low, high = _check_clip_epsilons(clip_epsilon, clip_epsilon_high)
    bound = _check_clip_ratio_c(clip_ratio_c)
    ratio, in_response = _importance_ratio(student_logp, behavior_logp, mask)
    advantages = broadcast_advantages(advantages, mask)
    clipped = ((advantages > 0) & (ratio > 1 + high)) | ((advantages < 0) & (ratio < 1 - low))
    if bound is not None:
        clipped = clipped | ((advantages < 0) & (ratio > bound))
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

    Cost. The value pass keeps ten numbers per token (value, normalisers, ``Σ_v`` of the derivative
    weights, …); the gradient is recomputed from the logits and those numbers in one more pass, so
    reverse mode holds no ``[B, T, V]`` temporary besides the gradient itself. The normaliser
    ``log Σ_v e^{z_v − max z}`` is ``log1p`` of the sum without the top entry, so ``log π`` of a
    likely token keeps its relative precision, and the gradient at the student's most likely token
    is formed without the ``1 / (1 − π)`` cancellation of ``w − π Σ w``.

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
    _check_token_inputs(mask, "mask", "logits", student_logits.shape[:2], student_logits=student_logits,
                        teacher_logits=teacher_logits)
    compute_dtype = jnp.promote_types(student_logits.dtype, jnp.float32)
    batch, length, vocab = student_logits.shape
    in_response_BxT = jnp.asarray(mask).astype(bool)
    rows = _full_vocab_rows(divergence, compute_dtype, chunk_size)
    per_token_BxT = rows(
        student_logits.reshape(batch * length, vocab), teacher_logits.reshape(batch * length, vocab),
        in_response_BxT.reshape(batch * length),
    ).reshape(batch, length)
    return jnp.where(in_response_BxT, per_token_BxT, jnp.zeros((), compute_dtype))


def full_vocab_divergence_from_hidden(
    student_hidden_BxTxD: Array,
    student_projection_DxV: Array,
    teacher_hidden_BxTxE: Array,
    teacher_projection_ExV: Array,
    mask_BxT: Array,
    *,
    divergence: str | divergences_lib.Divergence,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> Array:
    """:func:`full_vocab_divergence` of the logits ``hidden @ projection / temperature``, which are
    formed one chunk of tokens at a time and never as a ``[B, T, V]`` array.

    Each chunk's logits ``einsum(hidden_NxD, projection_DxV) / temperature`` (accumulated in float32
    at least, as the decoder's own LM head does) live only inside the chunk's ``jax.checkpoint``:
    the backward pass recomputes them per chunk, so the temporaries of the forward and backward
    pass are ``O(chunk_size · V)`` plus the ``[D, V]`` gradient of the projection, instead of the
    ``O(B · T · V)`` of the logits (two tensors of them, student and teacher). The values,
    numerics and conventions are those of :func:`full_vocab_divergence` (same per-token closed
    form, same treatment of infinite and masked entries). Masked rows of the hidden states are
    replaced before the projection, so NaN or ``±inf`` there never reaches values or gradients.

    Differentiable in ``student_hidden_BxTxD`` and ``student_projection_DxV``; the teacher's hidden
    states and projection are constants.

    Args:
      student_hidden_BxTxD: ``[B, T, D]`` float, the student's final hidden states (after the final
        norm), at the positions that predict the response tokens.
      student_projection_DxV: ``[D, V]`` float, the student's LM head (e.g.
        ``Decoder.output_projection()``).
      teacher_hidden_BxTxE: ``[B, T, E]`` float, the teacher's hidden states (its width ``E`` may
        differ from ``D``).
      teacher_projection_ExV: ``[E, V]`` float, the teacher's LM head, over the same vocabulary.
      mask_BxT: ``[B, T]`` bool or {0, 1} (values are checked when the mask is concrete).
      divergence: a name or a ``Divergence``.
      chunk_size: tokens per chunk (over the flattened ``B · T`` axis), ``None`` for no chunking.
      temperature: a finite number ``> 0`` dividing both models' logits.

    Returns:
      ``[B, T]`` divergences in the compute dtype (float32, or float64 when an input is float64),
      0 at masked positions.

    Raises:
      ValueError: shapes that do not match (the message names the arguments and their shapes),
        non-float inputs, a non-positive or non-finite temperature, or a concrete mask with values
        other than 0 and 1.
    """
    divergence = divergences_lib.get(divergence)
    student_hidden, student_projection, teacher_hidden, teacher_projection = _checked_hidden_inputs(
        student_hidden_BxTxD, student_projection_DxV, teacher_hidden_BxTxE, teacher_projection_ExV, mask_BxT,
        temperature,
    )
    compute_dtype = jnp.promote_types(
        jnp.result_type(student_hidden, student_projection, teacher_hidden, teacher_projection), jnp.float32
    )
    # One chunk of rows at a time (the outer map below), already masked.
    rows = _full_vocab_rows(divergence, compute_dtype, None)
    # Constants from here on: no backward pass through the teacher's projection is ever built.
    teacher_projection = jax.lax.stop_gradient(teacher_projection)

    def logits(hidden_NxD, projection_DxV):
        logits_NxV = jnp.einsum("nd,dv->nv", hidden_NxD, projection_DxV, preferred_element_type=compute_dtype)
        # Formed once per chunk: without the barrier XLA may fuse a small product into each of its
        # consumers, each rounding it its own way, and the passes would not see the same logits.
        return jax.lax.optimization_barrier(logits_NxV / jnp.asarray(temperature, compute_dtype))

    def per_token_from_hidden(student_NxD, teacher_NxE):
        return rows(logits(student_NxD, student_projection), logits(teacher_NxE, teacher_projection))

    return _masked_rows_map(
        per_token_from_hidden, (student_hidden, jax.lax.stop_gradient(teacher_hidden)), mask_BxT,
        chunk_size=chunk_size, dtype=compute_dtype,
    )


def _checked_hidden_inputs(
    student_hidden_BxTxD, student_projection_DxV, teacher_hidden_BxTxE, teacher_projection_ExV, mask_BxT, temperature
) -> tuple[Array, Array, Array, Array]:
    """The four arrays of :func:`full_vocab_divergence_from_hidden` as JAX arrays, once its checks pass.

    Raises the ``ValueError`` documented there; a shape error names all four arguments and shapes.
    """
    arrays = dict(
        student_hidden_BxTxD=jnp.asarray(student_hidden_BxTxD),
        student_projection_DxV=jnp.asarray(student_projection_DxV),
        teacher_hidden_BxTxE=jnp.asarray(teacher_hidden_BxTxE),
        teacher_projection_ExV=jnp.asarray(teacher_projection_ExV),
    )
    shapes = ", ".join(f"{name} {list(a.shape)}" for name, a in arrays.items())
    student_hidden, student_projection, teacher_hidden, teacher_projection = arrays.values()
    if (student_hidden.ndim, student_projection.ndim, teacher_hidden.ndim, teacher_projection.ndim) != (3, 2, 3, 2):
        raise ValueError(f"expected [B, T, D], [D, V], [B, T, E], [E, V] arrays, got {shapes}")
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(f"student and teacher hidden states differ in [B, T]: {shapes}")
    if student_hidden.shape[2] != student_projection.shape[0]:
        raise ValueError(f"student_hidden_BxTxD's D does not match student_projection_DxV's D: {shapes}")
    if teacher_hidden.shape[2] != teacher_projection.shape[0]:
        raise ValueError(f"teacher_hidden_BxTxE's E does not match teacher_projection_ExV's E: {shapes}")
    if student_projection.shape[1] != teacher_projection.shape[1]:
        raise ValueError(f"student_projection_DxV and teacher_projection_ExV differ in V: {shapes}")
    _check_token_inputs(mask_BxT, "mask_BxT", "hidden states", student_hidden.shape[:2], **arrays)
    if not (float(temperature) > 0.0 and math.isfinite(float(temperature))):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return student_hidden, student_projection, teacher_hidden, teacher_projection


def _check_token_inputs(
    mask: Array, mask_name: str, what: str, batch_length: tuple[int, int], **arrays: Array
) -> None:
    if tuple(jnp.shape(mask)) != tuple(batch_length):
        raise ValueError(f"{mask_name} {list(jnp.shape(mask))} does not match {what} [B, T] = {list(batch_length)}")
    check_float(**arrays)
    check_mask(mask, mask_name)


def _masked_rows_map(
    per_row_fn: Callable[..., Array], rows: tuple[Array, ...], mask_BxT: Array, *, chunk_size: int | None, dtype
) -> Array:
    """``per_row_fn`` over the ``B · T`` token rows of ``rows`` (each ``[B, T, ...]``), chunked, masked.

    Returns ``[B, T]`` in ``dtype``, 0 at masked positions.
    """
    batch, length = jnp.shape(mask_BxT)
    in_response_BxT = jnp.asarray(mask_BxT).astype(bool)

    def masked_rows(keep_N, *rows_N):
        # Padding is replaced before any arithmetic (not masked afterwards), so NaN / inf there
        # never enters the backward pass: the cotangent of the replaced entries is exactly 0.
        # Done per chunk, so no masked copy of the full inputs is materialised.
        rows_N = tuple(
            jnp.where(keep_N.reshape(-1, *([1] * (r.ndim - 1))), r, jnp.zeros((), r.dtype)) for r in rows_N
        )
        return per_row_fn(*rows_N)

    flat_rows = tuple(r.reshape(batch * length, *r.shape[2:]) for r in rows)
    per_token = map_row_chunks(masked_rows, in_response_BxT.reshape(batch * length), *flat_rows, chunk_size=chunk_size)
    return jnp.where(in_response_BxT, per_token.reshape(batch, length), jnp.zeros((), dtype))


def full_vocab_reward_to_go(per_token_divergence_BxT: Array, mask_BxT: Array, *, gamma: float) -> Array:
    """``−Σ_{k>n} γ^{k−n} m_k D_k``: the reward to go of a full-vocabulary term, for the sampled advantages.

    Training on ``L(y) = −Σ_n m_n sg(A_n) log π(y_n|s_n) + λ Σ_n m_n D_f(q‖π)(s_n)``, the second term
    differentiated directly (GKD style) follows only the part of ``∇ J_fv``,
    ``J_fv = E_{y~π}[Σ_n m_n D_f(q‖π)(s_n)]``, that holds the states fixed: it misses the effect of
    token ``y_n`` on the later states ``s_k, k > n``. The score-function identity restores it as a
    reward to go: adding ``λ ·`` this array (``D_k`` the per-token divergences, ``γ = 1``) to the
    advantages. With OPD+ advantages at ``γ = 1``,

        A_n = token_advantages(..., estimator="opd_plus", gamma=1) + λ · full_vocab_reward_to_go(D, m, gamma=1)

    the combination is unbiased for ``J_tok + λ J_fv`` (which equals ``(1 + λ) J_tok``, since
    ``J_fv = J_tok`` in value): ``E[∇L] = (1 + λ) ∇J_tok`` exactly. The weight ``λ`` must be the one
    of the direct term (equivalently, pass ``λ · D``). Terms ``k ≤ n`` are left out because they do
    not depend on ``y_n`` (a baseline). ``γ < 1`` discounts the later states and is biased, like
    ``γ < 1`` in :func:`opd_jax.token_advantages`; ``γ = 0`` (all zeros) is the direct term alone.

    The discount counts response tokens only, as in :mod:`opd_jax.advantages`: ``k − n`` is the
    number of response tokens between positions ``n`` and ``k``.

    Args:
      per_token_divergence_BxT: ``[B, T]`` float, ``D_f(q‖π)(s_t)`` per token (e.g. from
        :func:`full_vocab_divergence`); its values are used, its gradient is stopped.
      mask_BxT: ``[B, T]`` bool or {0, 1}, 1 at response tokens.
      gamma: discount in ``[0, 1]``; ``1`` for the unbiased combination.

    Returns:
      ``[B, T]`` in the dtype of ``per_token_divergence_BxT``, under ``stop_gradient``, 0 at masked
      positions (whatever the divergence holds there).

    Raises:
      ValueError: shapes that do not match, a non-float divergence, ``gamma`` outside ``[0, 1]``,
        or a concrete mask with values other than 0 and 1.
    """
    check_same_shape(per_token_divergence_BxT=per_token_divergence_BxT, mask_BxT=mask_BxT)
    check_float(per_token_divergence_BxT=per_token_divergence_BxT)
    check_mask(mask_BxT, "mask_BxT")
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
    divergence_BxT = jax.lax.stop_gradient(jnp.asarray(per_token_divergence_BxT))
    in_response_BxT = jnp.asarray(mask_BxT).astype(bool)
    zero = jnp.zeros((), divergence_BxT.dtype)
    cost_BxT = jnp.where(in_response_BxT, divergence_BxT, zero)
    return jnp.where(in_response_BxT, -discounted_future(cost_BxT, in_response_BxT, float(gamma)), zero)


# Columns of the per-row statistics saved by the value pass of the full-vocabulary divergence.
_VALUE, _TOTAL, _TOTAL_REST, _FINITE, _TOP_P, _LOG_P_TOP, _MAX_P, _LOG_SUM_P, _MAX_Q, _LOG_SUM_Q = range(10)


def _masked_logits(keep_N, logits_NxV, compute_dtype):
    """``[N, V]`` logits in ``compute_dtype``, rows with ``keep_N`` false replaced by zeros before any
    arithmetic (``keep_N = None`` keeps every row), so padding never reaches values or gradients."""
    logits_NxV = logits_NxV.astype(compute_dtype)
    if keep_N is None:
        return logits_NxV
    return jnp.where(keep_N[:, None], logits_NxV, divergences_lib.zeros_from(logits_NxV))


def _token_index_V(zeros_NxV, compute_dtype):
    """``[N, V]`` token indices as ``compute_dtype`` floats (exact below 2^24), built on ``zeros_NxV``.

    A float min-reduction over them is one vectorised pass, where XLA:CPU rewrites an integer one
    into a tree of reduce-windows.
    """
    return jax.lax.iota(compute_dtype, zeros_NxV.shape[-1])[None, :] + zeros_NxV


def _normalise(logits_NxV, compute_dtype):
    """``(shifted_NxV, is_top_NxV, top_N, log_p_top_N, max_N, log_sum_N, zeros_NxV)`` of ``[N, V]`` logits.

    ``log π = shifted − log_sum``, ``shifted = z − max z``, ``top`` the first index at the maximum
    (``V`` if none compares equal, which only logits recomputed with another rounding could cause).
    ``log_sum = log1p(Σ_{v ≠ top} e^{shifted_v} + expm1(shifted_top))``: the top entry's ``e^0 = 1``
    is not added to the sum, so the rounding of ``log_sum`` is relative to the rest, not to 1 + it,
    and ``log π`` of a likely token (near 0) keeps its relative precision. ``expm1(shifted_top)`` is
    0 in value and carries the top entry's derivative (the maximum is a constant, as in
    ``jax.nn.log_softmax``). ``zeros_NxV`` are full-size zeros built from the data (see
    :func:`opd_jax.divergences.zeros_from`).
    """
    zeros = divergences_lib.zeros_from(logits_NxV)
    vocab = logits_NxV.shape[-1]
    max_N = jax.lax.stop_gradient(jnp.max(logits_NxV, axis=-1))
    shifted_NxV = logits_NxV - max_N[:, None]
    top_N = jnp.min(jnp.where(shifted_NxV == 0, _token_index_V(zeros, compute_dtype), zeros + vocab), axis=-1)
    is_top_NxV = _token_index_V(zeros, compute_dtype) == top_N[:, None]
    found_N = top_N < vocab
    shifted_top_N = jnp.take_along_axis(
        shifted_NxV, jnp.minimum(top_N, vocab - 1).astype(jnp.int32)[:, None], axis=-1
    )[:, 0]
    rest_N = jnp.sum(jnp.where(is_top_NxV, zeros, jnp.exp(shifted_NxV)), axis=-1)
    log_sum_N = jnp.where(found_N, jnp.log1p(rest_N + jnp.expm1(shifted_top_N)), jnp.log(rest_N))
    log_p_top_N = jnp.where(found_N, shifted_top_N - log_sum_N, -jnp.inf)
    return shifted_NxV, is_top_NxV, top_N, log_p_top_N, max_N, log_sum_N, zeros


def _row_passes(divergence: divergences_lib.Divergence, compute_dtype):
    """``(statistics, gradient)``: the value pass and the gradient pass of the full-vocabulary
    divergence over ``[N, V]`` rows of logits.

    ``statistics(keep_N, student_NxV, teacher_NxV) -> [N, 10]`` (columns named above): per row the
    value ``Σ_v π(v) f(q(v)/π(v))``; ``W = Σ_v w_v`` with ``w_v = ∂/∂log π(v) [π(v) f(q(v)/π(v))]``
    (:func:`opd_jax.divergences.perspective_terms`); ``W`` without the student's most likely token;
    1 where the row has a finite descent direction, else 0; the index of that token and its
    log-probability; and per model the maximum logit and the log-sum-exp of the shifted logits
    (:func:`_normalise`).

    ``gradient(keep_N, student_NxV, teacher_NxV, statistics_NxS) -> [N, V]``: ``∂value/∂z_v =
    w_v − π(v) W`` (from ``d log π = dz − Σ π dz``), in one pass from the logits and the saved
    statistics, without the terms. At the student's most likely token it is written
    ``w_v (1 − π(v)) − π(v) (W − w_v)``: where ``π(v)`` is near 1 the two sides of ``w_v − π(v) W``
    nearly cancel (by ``1 / (1 − π(v))``), the second form does not. 0 in rows without a finite
    descent direction.

    The gradient pass finds that token by its saved index, not by comparing values again. Rows
    with ``keep_N`` false are replaced by zeros before any arithmetic (value 0, gradient 0,
    whatever they held; :func:`_masked_logits`); ``keep_N = None`` keeps every row.
    """
    zeros_from = divergences_lib.zeros_from  # full-size constants built from the data: see its docstring

    def masked(keep_N, logits_NxV):
        return _masked_logits(keep_N, logits_NxV, compute_dtype)

    def normalised(keep_N, logits_NxV):
        return _normalise(masked(keep_N, logits_NxV), compute_dtype)

    def statistics(keep_N, student_NxV, teacher_NxV):
        shifted_p, is_top, top_p, log_p_top, max_p, log_sum_p, zeros = normalised(keep_N, student_NxV)
        shifted_q, _, _, _, max_q, log_sum_q, _ = normalised(keep_N, jax.lax.stop_gradient(teacher_NxV))
        term, weight, _ = divergences_lib.perspective_terms(
            divergence, shifted_p - log_sum_p[:, None], shifted_q - log_sum_q[:, None]
        )
        value_N = jnp.sum(term, axis=-1)
        total_N = jnp.sum(weight, axis=-1)
        total_rest_N = jnp.sum(jnp.where(is_top, zeros, weight), axis=-1)
        # A row whose value or a weight is not finite has no finite descent direction (documented):
        # its gradient is 0. Σ w is finite exactly when every weight is (and the sum does not overflow).
        finite_N = jnp.isfinite(value_N) & jnp.isfinite(total_N)
        total_N = jnp.where(finite_N, total_N, 0)
        total_rest_N = jnp.where(finite_N, total_rest_N, 0)
        columns = (value_N, total_N, total_rest_N, finite_N.astype(compute_dtype), top_p, log_p_top, max_p, log_sum_p,
                   max_q, log_sum_q)
        return jnp.stack(columns, axis=-1)

    def gradient(keep_N, student_NxV, teacher_NxV, statistics_NxS):
        column = lambda index: statistics_NxS[:, index, None]  # noqa: E731
        shifted_p = masked(keep_N, student_NxV) - column(_MAX_P)
        shifted_q = masked(keep_N, jax.lax.stop_gradient(teacher_NxV)) - column(_MAX_Q)
        zeros = zeros_from(shifted_p)
        is_top = _token_index_V(zeros, compute_dtype) == column(_TOP_P)
        one_minus_top = -jnp.expm1(column(_LOG_P_TOP))  # 1 − π(top), accurate where π(top) is near 1
        # w_v − π(v) W, or w_v (1 − π(v)) − π(v) W_rest at the top token: a w_v − b π(v).
        grad = divergences_lib.perspective_gradient(
            divergence, shifted_p - column(_LOG_SUM_P), shifted_q - column(_LOG_SUM_Q),
            jnp.where(is_top, zeros + one_minus_top, zeros + 1),
            jnp.where(is_top, zeros + column(_TOTAL_REST), zeros + column(_TOTAL)),
        )
        active = column(_FINITE) > 0
        return jnp.where(active if keep_N is None else active & keep_N[:, None], grad, zeros)

    return statistics, gradient


def _full_vocab_rows(divergence: divergences_lib.Divergence, compute_dtype, chunk_size: int | None):
    """``(student_NxV, teacher_NxV[, keep_N]) -> [N]``: per-row ``Σ_v π(v) f(q(v)/π(v))``,
    differentiable in the student logits with a closed-form derivative; ``chunk_size`` rows at a
    time. Rows where ``keep_N`` is false give 0 and get gradient 0 whatever they hold.

    One pass over the logits per direction after the normalisers (:func:`_row_passes`):

    * value: the terms and ten statistics per row (value, ``Σ w``, normalisers, …), which are all
      the derivative keeps;
    * derivative: the gradient ``g_v`` recomputed from the logits and those statistics, under
      ``jax.checkpoint`` per chunk, so reverse mode stores no ``[N, V]`` array and repeats neither
      the log-sum-exp nor the terms; the tangent is ``Σ_v g_v dz_v``.

    The derivative is written out instead of differentiating ``f``'s stable branches: one weight
    per entry, exact (same value up to rounding), and, being a JVP rule, differentiable again (to
    any order, through the plain ``jnp`` of the two passes). The teacher is a constant: its tangent
    is ignored.
    """
    statistics, gradient = _row_passes(divergence, compute_dtype)

    def statistics_of(student_NxV, teacher_NxV, *keep):
        return statistics(keep[0] if keep else None, student_NxV, teacher_NxV)

    def tangent(student_NxV, teacher_NxV, statistics_NxS, d_student_NxV, *keep):
        keep_N = keep[0] if keep else None
        grad = gradient(keep_N, student_NxV, teacher_NxV, statistics_NxS)
        d_student_NxV = d_student_NxV.astype(compute_dtype)
        if keep_N is not None:  # the zeros come from the primal: the tangent is linear
            d_student_NxV = jnp.where(keep_N[:, None], d_student_NxV, divergences_lib.zeros_from(grad))
        return jnp.sum(grad * d_student_NxV, axis=-1)

    @jax.custom_jvp
    def rows(student_NxV: Array, teacher_NxV: Array, *keep: Array) -> Array:
        return map_row_chunks(statistics_of, student_NxV, teacher_NxV, *keep, chunk_size=chunk_size)[:, _VALUE]

    @rows.defjvp
    def rows_jvp(primals, tangents):
        student_NxV, teacher_NxV, *keep = primals
        statistics_NxS = map_row_chunks(statistics_of, student_NxV, teacher_NxV, *keep, chunk_size=chunk_size)
        d_value_N = _map_tangent_chunks(
            tangent, (student_NxV, teacher_NxV, statistics_NxS), tangents[0], tuple(keep), chunk_size=chunk_size
        )
        return statistics_NxS[:, _VALUE], d_value_N

    return rows


def _map_tangent_chunks(fn, primals, tangent_NxV, extra, *, chunk_size):
    """``fn(*primals, tangent, *extra)`` (row-wise, linear in ``tangent``) ``chunk_size`` rows at a
    time, each chunk under ``jax.checkpoint``.

    Unlike :func:`opd_jax.chunking.map_row_chunks`, the tangent's chunks are the scanned ``xs`` (a
    free reshape), not ``dynamic_slice`` reads: reverse mode then transposes the loop into one that
    emits the cotangent's chunks as its stacked outputs, instead of adding each chunk into an
    ``[N, V]`` accumulator. The primals (constants of the linear map) are read by ``dynamic_slice``
    inside the checkpoint, so they are residuals only once, as the full arrays.
    """
    num_rows = tangent_NxV.shape[0]
    if chunk_size is None or chunk_size >= num_rows:  # checkpointed too: no [N, V] residual either
        return jax.checkpoint(fn)(*primals, tangent_NxV, *extra)
    num_full = num_rows // chunk_size
    head = num_full * chunk_size

    @jax.checkpoint
    def one_chunk(index, tangent_CxV, *full):
        start = index * chunk_size
        sliced = [jax.lax.dynamic_slice_in_dim(a, start, chunk_size) for a in full]
        return fn(*sliced[: len(primals)], tangent_CxV, *sliced[len(primals):])

    tangent_KxCxV = tangent_NxV[:head].reshape(num_full, chunk_size, *tangent_NxV.shape[1:])
    out = jax.lax.map(lambda xs: one_chunk(xs[0], xs[1], *primals, *extra), (jnp.arange(num_full), tangent_KxCxV))
    pieces = [out.reshape(head, *out.shape[2:])]
    if head < num_rows:
        pieces.append(jax.checkpoint(fn)(*(a[head:] for a in primals), tangent_NxV[head:], *(a[head:] for a in extra)))
    return jnp.concatenate(pieces)
