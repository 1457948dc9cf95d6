"""Top-k teacher distillation: divergences and sampled-token estimators from the teacher's top-k.

When the teacher's full ``[B, T, V]`` distribution cannot be shipped to the learner, the teacher
sends, per position, its ``K`` most likely token ids, their log-probabilities and the log of the
remaining *tail* mass (:class:`TeacherTopK`). Everything here works on the *bucketed*
distributions over the ``K + 1`` outcomes ``{id_1, …, id_K, tail}`` of each state ``s``:

* teacher ``q̃ = (q(id_1), …, q(id_K), q_tail)``, ``q_tail = 1 − Σ_k q(id_k)``;
* student ``π̃ = (π(id_1), …, π(id_K), π_tail)``, ``π_tail = 1 − Σ_k π(id_k)``, on the teacher's ids.

**Bucketed divergence.** :func:`topk_divergence` is ``D̃_f(s) = D_f(q̃ ‖ π̃) = Σ_b π̃_b f(q̃_b/π̃_b)``,
differentiable in the student logits. Bucketing is a deterministic map of the outcome, so by the
data-processing inequality ``D̃_f(s) ≤ D_f(q ‖ π)(s)`` for every generator, with equality when
``K ≥ V − 1`` (the tail is at most one token) or, more generally, when ``q/π`` is constant on the
tail.

**Sampled-token estimator.** For a response ``y ~ π`` the bucket ratio of token ``y_n`` is

    ℓ̃_n = log q(y_n) − log π(y_n)        if y_n is one of the teacher's top-k ids at s_n,
    ℓ̃_n = log q_tail − log π_tail        otherwise,

and ``ũ_n = exp(ℓ̃_n)``. Because ``E_{y_n~π}[f(ũ_n)] = D̃_f(s_n)``, the *bucketed token-sum
objective* is

    J̃_tok(θ) = E_{y~π_θ}[ Σ_n m_n f(ũ_n) ] = E_{y~π_θ}[ Σ_n m_n D̃_f(s_n) ].

For a tail token ``∇ũ = −ũ ∇log π_tail``, and ``E_{y~π}[1{y ∈ tail} g ∇log π(y)] = g ∇π_tail =
g π_tail ∇log π_tail`` for any ``g`` constant on the tail, so the usual OPD+ advantage built from
``ℓ̃`` with the usual score ``∇log π(y_n)`` (:func:`topk_token_advantages`, ``opd_plus``,
``γ = 1``) is **unbiased for J̃_tok**. It is **biased for the full J_tok** unless the bucketing
loses nothing (``K ≥ V − 1``, or ``q/π`` constant on each state's tail). ``γ = 0`` is biased for
J̃_tok beyond one step and ``stop_grad`` is biased except for reverse KL, exactly as for the full
estimators (:mod:`opd_jax.advantages`). :mod:`opd_jax.exact` measures all of this by enumeration
(``topk_objective``, ``topk_estimator_gradient``).

**Empty tails, explicit masks.** The tail bucket has probability exactly 0 when ``K = V`` or when
every token outside the top-k has probability 0 (``−inf`` logits, or top-k log-probs that sum to 1
or more in floating point). Its log-probability is then ``−inf``; instead of storing that, the
structures hold ``tail_mask_BxT = False`` and a placeholder ``tail_logp_BxT = 0`` that no function
here reads. A tail mass that underflows in linear space (teacher logits far apart) is no problem:
it is computed in log space from the logits outside the top-k and stays finite. Nothing returns NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import divergences as divergences_lib
from opd_jax.advantages import check_float, check_mask, check_same_shape, token_advantages
from opd_jax.chunking import map_row_chunks

Array = jax.Array

__all__ = [
    "TeacherTopK",
    "bucket_log_probs",
    "sampled_in_topk",
    "teacher_topk",
    "teacher_topk_from_hidden",
    "teacher_topk_from_log_probs",
    "topk_divergence",
    "topk_log_ratio",
    "topk_token_advantages",
]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["token_ids_BxTxK", "logp_BxTxK", "tail_logp_BxT", "tail_mask_BxT"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class TeacherTopK:
    """The teacher's top-k per position: what a teacher server sends instead of ``[B, T, V]`` logits.

    A pytree (all four fields are leaves), so it passes through ``jax.jit``, ``vmap`` and
    ``device_put`` like a tuple of arrays.

    Attributes:
      token_ids_BxTxK: ``[B, T, K]`` int32, distinct token ids in ``[0, V)`` per position
        (:func:`teacher_topk` orders them by decreasing probability; no function relies on it).
      logp_BxTxK: ``[B, T, K]`` float, the teacher's log-probabilities of those ids (``−inf`` only
        for a token the teacher gives probability exactly 0).
      tail_logp_BxT: ``[B, T]`` float, ``log q_tail = log(1 − Σ_k q(id_k))`` where
        ``tail_mask_BxT``; ``0`` (a placeholder, never read) where the tail is empty.
      tail_mask_BxT: ``[B, T]`` bool, ``True`` where the tail bucket has positive probability.
    """

    token_ids_BxTxK: Array
    logp_BxTxK: Array
    tail_logp_BxT: Array
    tail_mask_BxT: Array

    @property
    def k(self) -> int:
        """``K``, the number of top tokens per position."""
        return self.token_ids_BxTxK.shape[-1]


def _is_concrete(x) -> bool:
    if isinstance(x, jax.core.Tracer):
        return False
    return not (isinstance(x, jax.Array) and not x.is_fully_addressable)


def _check_k(k, vocab: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in [1, V] = [1, {vocab}], got k={k!r}")
    return int(k)


def _check_logits(name: str, logits) -> Array:
    logits = jnp.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"{name} must be [B, T, V], got shape {list(logits.shape)}")
    check_float(**{name: logits})
    return logits


def _check_token_ids(
    token_ids_BxTxK, vocab: int | None, name: str = "token_ids_BxTxK", keep_BxT: Array | None = None
) -> Array:
    """Integer ``[B, T, K]`` ids, ``K ≤ V``; when concrete, each in ``[0, V)`` and distinct within a
    position (checked at the positions where ``keep_BxT``, all positions without it)."""
    token_ids_BxTxK = jnp.asarray(token_ids_BxTxK)
    if token_ids_BxTxK.ndim != 3:
        raise ValueError(f"{name} must be [B, T, K], got shape {list(token_ids_BxTxK.shape)}")
    if not jnp.issubdtype(token_ids_BxTxK.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {token_ids_BxTxK.dtype}")
    k = token_ids_BxTxK.shape[-1]
    if k < 1 or (vocab is not None and k > vocab):
        allowed = f"[1, V] = [1, {vocab}]" if vocab is not None else "[1, V]"
        raise ValueError(f"{name} holds K = {k} ids per position; K must lie in {allowed}")
    if not (_is_concrete(token_ids_BxTxK) and (keep_BxT is None or _is_concrete(keep_BxT))):
        return token_ids_BxTxK
    ids_NxK = np.asarray(token_ids_BxTxK).reshape(-1, token_ids_BxTxK.shape[-1])
    if keep_BxT is not None:
        ids_NxK = ids_NxK[np.asarray(keep_BxT).reshape(-1).astype(bool)]
    if vocab is not None and ids_NxK.size and (ids_NxK.min() < 0 or ids_NxK.max() >= vocab):
        raise ValueError(
            f"{name} must lie in [0, V) = [0, {vocab}), got values in [{ids_NxK.min()}, {ids_NxK.max()}]"
        )
    ordered_NxK = np.sort(ids_NxK, axis=-1)
    if np.any(ordered_NxK[:, 1:] == ordered_NxK[:, :-1]):
        raise ValueError(f"{name} must hold K distinct ids at each position; some position repeats an id")
    return token_ids_BxTxK


def _check_topk(
    topk: TeacherTopK, batch: int, length: int, vocab: int | None, keep_BxT: Array | None = None
) -> None:
    if not isinstance(topk, TeacherTopK):
        raise ValueError(f"topk must be a TeacherTopK, got {type(topk).__name__}")
    k = jnp.shape(topk.token_ids_BxTxK)[-1] if jnp.ndim(topk.token_ids_BxTxK) else 0
    expected = {
        "token_ids_BxTxK": (batch, length, k),
        "logp_BxTxK": (batch, length, k),
        "tail_logp_BxT": (batch, length),
        "tail_mask_BxT": (batch, length),
    }
    actual = {name: tuple(jnp.shape(getattr(topk, name))) for name in expected}
    if actual != expected:
        described = ", ".join(f"topk.{name} {list(shape)}" for name, shape in actual.items())
        raise ValueError(
            f"TeacherTopK fields must be [B, T, K] / [B, T] with [B, T] = {[batch, length]}; got {described}"
        )
    _check_token_ids(topk.token_ids_BxTxK, vocab, "topk.token_ids_BxTxK", keep_BxT)
    check_float(**{"topk.logp_BxTxK": topk.logp_BxTxK, "topk.tail_logp_BxT": topk.tail_logp_BxT})
    mask_dtype = jnp.asarray(topk.tail_mask_BxT).dtype
    if mask_dtype != jnp.bool_:
        raise ValueError(f"topk.tail_mask_BxT must be bool, got {mask_dtype}")


def _outside(token_ids_BxTxK: Array, vocab: int) -> Array:
    """``[B, T, V]`` bool, ``True`` at the tokens that are *not* among the given ids."""
    inside = jnp.zeros(token_ids_BxTxK.shape[:-1] + (vocab,), bool)
    inside = jnp.put_along_axis(inside, token_ids_BxTxK, True, axis=-1, inplace=False)
    return ~inside


def bucket_log_probs(logits_BxTxV: Array, token_ids_BxTxK: Array) -> tuple[Array, Array, Array]:
    """A model's bucketed log-probabilities on the given ids and the tail, differentiable.

    The tail is computed from the logits outside the ids, ``log π_tail = logsumexp_{v ∉ ids} z_v −
    logsumexp_v z_v`` (shifted by the largest tail logit, so the sum inside the log is ≥ 1), not as
    ``log(1 − Σ_k π(id_k))``: it keeps full relative precision when the ids hold nearly all the
    mass and stays finite when the tail mass underflows in linear space.

    Args:
      logits_BxTxV: ``[B, T, V]`` float (any float dtype; computed in float32 at least). Any
        number of leading axes works; reductions are over the last one.
      token_ids_BxTxK: ``[B, T, K]`` integer, distinct ids in ``[0, V)`` per position (their
        values are checked by :func:`topk_divergence` and :func:`teacher_topk`, not here).

    Returns:
      ``(logp_BxTxK, tail_logp_BxT, tail_mask_BxT)``: log-probabilities of the ids and of the tail
      in the compute dtype, and a bool mask, ``True`` where the tail has positive probability (some
      token outside the ids has a logit above ``−inf``). Where it is ``False`` the tail log-prob is
      the placeholder 0, with zero gradient.
    """
    logits_BxTxV, token_ids_BxTxK = jnp.asarray(logits_BxTxV), jnp.asarray(token_ids_BxTxK)
    if logits_BxTxV.shape[:-1] != token_ids_BxTxK.shape[:-1] or token_ids_BxTxK.ndim < 1:
        raise ValueError(
            f"logits_BxTxV {list(logits_BxTxV.shape)} and token_ids_BxTxK {list(token_ids_BxTxK.shape)} "
            "must share their leading axes"
        )
    check_float(logits_BxTxV=logits_BxTxV)
    if not jnp.issubdtype(token_ids_BxTxK.dtype, jnp.integer):
        raise ValueError(f"token_ids_BxTxK must have an integer dtype, got {token_ids_BxTxK.dtype}")
    compute_dtype = jnp.promote_types(logits_BxTxV.dtype, jnp.float32)
    z_BxTxV = logits_BxTxV.astype(compute_dtype)
    log_norm_BxT = jax.nn.logsumexp(z_BxTxV, axis=-1)
    logp_BxTxK = jnp.take_along_axis(z_BxTxV, token_ids_BxTxK, axis=-1) - log_norm_BxT[..., None]
    counted_BxTxV = _outside(token_ids_BxTxK, z_BxTxV.shape[-1]) & (z_BxTxV > -jnp.inf)
    tail_mask_BxT = jnp.any(counted_BxTxV, axis=-1)
    lowest = jnp.finfo(compute_dtype).min
    # The shift cancels in value and gradient, so it is held constant (as logsumexp does).
    shift_BxT = jax.lax.stop_gradient(jnp.max(jnp.where(counted_BxTxV, z_BxTxV, lowest), axis=-1))
    shift_BxT = jnp.where(tail_mask_BxT, shift_BxT, 0)
    shifted_BxTxV = jnp.where(counted_BxTxV, z_BxTxV - shift_BxT[..., None], 0)
    tail_sum_BxT = jnp.sum(jnp.where(counted_BxTxV, jnp.exp(shifted_BxTxV), 0), axis=-1)
    tail_logp_BxT = shift_BxT + jnp.log(jnp.where(tail_mask_BxT, tail_sum_BxT, 1)) - log_norm_BxT
    return logp_BxTxK, jnp.where(tail_mask_BxT, tail_logp_BxT, 0), tail_mask_BxT


def teacher_topk(teacher_logits_BxTxV: Array, k: int) -> TeacherTopK:
    """The teacher's top-k ids, their log-probabilities and the tail, from full logits.

    Args:
      teacher_logits_BxTxV: ``[B, T, V]`` float (held constant: no gradient flows to it).
      k: ``K`` in ``[1, V]``; ``K = V`` gives an empty tail everywhere.

    Returns:
      :class:`TeacherTopK`, log-probs in float32 at least (float64 logits stay float64). Ties are
      broken towards the smaller token id (``jax.lax.top_k``).

    Raises:
      ValueError: ``k`` outside ``[1, V]`` (the message names ``k`` and the range), or logits that
        are not a float ``[B, T, V]`` array.

    >>> import jax.numpy as jnp
    >>> top = teacher_topk(jnp.log(jnp.array([[[0.6, 0.1, 0.3]]])), 2)
    >>> top.token_ids_BxTxK.tolist(), [round(float(p), 4) for p in jnp.exp(top.logp_BxTxK).ravel()]
    ([[[0, 2]]], [0.6, 0.3])
    >>> round(float(jnp.exp(top.tail_logp_BxT[0, 0])), 4)  # the mass outside the top 2
    0.1
    """
    teacher_logits_BxTxV = jax.lax.stop_gradient(_check_logits("teacher_logits_BxTxV", teacher_logits_BxTxV))
    k = _check_k(k, teacher_logits_BxTxV.shape[-1])
    _, token_ids_BxTxK = jax.lax.top_k(teacher_logits_BxTxV, k)
    token_ids_BxTxK = token_ids_BxTxK.astype(jnp.int32)
    return TeacherTopK(token_ids_BxTxK, *bucket_log_probs(teacher_logits_BxTxV, token_ids_BxTxK))


def teacher_topk_from_hidden(
    hidden_BxTxD: Array, projection_DxV: Array, k: int, *, chunk_size: int | None = None
) -> TeacherTopK:
    """:func:`teacher_topk` of ``logits = hidden @ projection`` without materialising ``[B, T, V]``.

    Positions are processed ``chunk_size`` at a time (``jax.lax.map`` with ``batch_size``), so the
    logits temporaries are ``[chunk_size, V]``; the result equals ``teacher_topk`` of the full
    product (to the rounding of the matmul, accumulated in float32 at least).

    Args:
      hidden_BxTxD: ``[B, T, D]`` float, the teacher's final hidden states (after its final norm).
      projection_DxV: ``[D, V]`` float, its output projection (the transposed embedding when tied).
      k: ``K`` in ``[1, V]``.
      chunk_size: positions per chunk over the flattened ``B · T`` axis; ``None`` for one chunk.

    Returns:
      :class:`TeacherTopK` as :func:`teacher_topk`.
    """
    hidden_BxTxD = jax.lax.stop_gradient(jnp.asarray(hidden_BxTxD))
    projection_DxV = jax.lax.stop_gradient(jnp.asarray(projection_DxV))
    if hidden_BxTxD.ndim != 3 or projection_DxV.ndim != 2 or hidden_BxTxD.shape[-1] != projection_DxV.shape[0]:
        raise ValueError(
            f"expected hidden_BxTxD [B, T, D] and projection_DxV [D, V] with the same D, got "
            f"{list(hidden_BxTxD.shape)} and {list(projection_DxV.shape)}"
        )
    check_float(hidden_BxTxD=hidden_BxTxD, projection_DxV=projection_DxV)
    batch, length, width = hidden_BxTxD.shape
    k = _check_k(k, projection_DxV.shape[-1])
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    compute_dtype = jnp.promote_types(jnp.result_type(hidden_BxTxD, projection_DxV), jnp.float32)

    def one_position(hidden_D):
        logits_1x1xV = jnp.dot(hidden_D, projection_DxV, preferred_element_type=compute_dtype)[None, None]
        return teacher_topk(logits_1x1xV, k)

    per_position = jax.lax.map(one_position, hidden_BxTxD.reshape(batch * length, width), batch_size=chunk_size)
    return jax.tree.map(lambda x: x.reshape(batch, length, *x.shape[3:]), per_position)


def _log1mexp(x: Array) -> Array:
    """``log(1 − e^x)`` for ``x < 0``: ``log(−expm1(x))`` near 0, ``log1p(−e^x)`` below ``−log 2``."""
    near_zero = x > -np.log(2.0)
    near = jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0)))
    far = jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x)))
    return jnp.where(near_zero, near, far)


def teacher_topk_from_log_probs(token_ids_BxTxK: Array, logp_BxTxK: Array) -> TeacherTopK:
    """A :class:`TeacherTopK` from top-k log-probabilities alone (what an inference server returns).

    Without the other logits the tail can only be ``log q_tail = log(1 − exp(logsumexp_k log q_k))``
    (computed as ``log1p(−e^s)`` or ``log(−expm1(s))``): its absolute error is that of the given
    log-probs, so its *relative* error grows as the tail mass shrinks (about ``ε / q_tail``,
    ``ε`` the rounding of the log-probs). Where the top-k log-probs sum to 1 or more in floating
    point the tail is taken as empty (``tail_mask_BxT = False``); no NaN, no ``−inf``. Conversely,
    with ``K = V`` a total that rounds to just below 1 leaves a spurious tail of mass about ``ε``
    (:func:`teacher_topk` on logits has no such error: its tail at ``K = V`` is empty by construction).

    Args:
      token_ids_BxTxK: ``[B, T, K]`` integer, distinct ids per position.
      logp_BxTxK: ``[B, T, K]`` float, the teacher's log-probabilities of those ids.

    Returns:
      :class:`TeacherTopK` in the dtype of ``logp_BxTxK`` promoted to float32 at least.
    """
    token_ids_BxTxK = _check_token_ids(token_ids_BxTxK, None)
    logp_BxTxK = jnp.asarray(logp_BxTxK)
    if logp_BxTxK.shape != token_ids_BxTxK.shape:
        raise ValueError(
            f"logp_BxTxK {list(logp_BxTxK.shape)} does not match token_ids_BxTxK {list(token_ids_BxTxK.shape)}"
        )
    check_float(logp_BxTxK=logp_BxTxK)
    logp_BxTxK = jax.lax.stop_gradient(logp_BxTxK.astype(jnp.promote_types(logp_BxTxK.dtype, jnp.float32)))
    log_top_mass_BxT = jax.nn.logsumexp(logp_BxTxK, axis=-1)
    tail_mask_BxT = log_top_mass_BxT < 0
    tail_logp_BxT = jnp.where(tail_mask_BxT, _log1mexp(jnp.where(tail_mask_BxT, log_top_mass_BxT, -1.0)), 0)
    return TeacherTopK(token_ids_BxTxK.astype(jnp.int32), logp_BxTxK, tail_logp_BxT, tail_mask_BxT)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _bucketed_divergence(divergence, log_p_RxM: Array, log_q_RxM: Array) -> Array:
    """``Σ_b p_b f(q_b/p_b)`` over the last axis from bucket log-probs (``−inf``: probability 0).

    The derivative in ``log p`` is the closed form of :func:`opd_jax.divergences.perspective`
    instead of automatic differentiation through the stable branches of ``f``; ``log q`` is a
    constant (its tangent is ignored).
    """
    term, _ = divergences_lib.perspective(divergence, log_p_RxM, log_q_RxM)
    return jnp.sum(term, axis=-1)


@_bucketed_divergence.defjvp
def _bucketed_divergence_jvp(divergence, primals, tangents):
    log_p_RxM, log_q_RxM = primals
    d_log_p_RxM = tangents[0]
    term, weight = divergences_lib.perspective(divergence, log_p_RxM, log_q_RxM)
    value_R = jnp.sum(term, axis=-1)
    zero = jnp.zeros((), weight.dtype)
    # A bucket the student gives probability 0 has a constant log-prob (its tangent is 0); a row
    # whose value or a weight is not finite has no finite descent direction and gets weight 0.
    weight = jnp.where(log_p_RxM == -jnp.inf, zero, weight)
    finite_R = jnp.isfinite(value_R) & jnp.all(jnp.isfinite(weight), axis=-1)
    finite_R = finite_R & jnp.isfinite(jnp.sum(jnp.where(finite_R[:, None], weight, zero), axis=-1))
    weight = jnp.where(finite_R[:, None], weight, zero)
    return value_R, jnp.sum(weight * d_log_p_RxM, axis=-1)


def topk_divergence(
    student_logits_BxTxV: Array,
    topk: TeacherTopK,
    mask_BxT: Array,
    *,
    divergence: str | divergences_lib.Divergence,
    chunk_size: int | None = None,
) -> Array:
    """Per-token bucketed divergence ``D̃_f(s_t) = D_f(q̃ ‖ π̃)`` over ``{top-k ids, tail}``.

    ``D̃_f = Σ_k π(id_k) f(q(id_k)/π(id_k)) + π_tail f(q_tail/π_tail)``, the student's buckets on
    the teacher's ids (:func:`bucket_log_probs`). A lower bound of
    :func:`opd_jax.objectives.full_vocab_divergence` (data-processing inequality), equal to it when
    ``K ≥ V − 1``. Summed over a response and averaged over ``y ~ π`` it equals ``J̃_tok`` in value;
    its gradient is the per-state gradient (exact for ``J̃_tok`` in one-step problems only, as the
    full-vocabulary gradient is for ``J_tok``).

    Differentiable in ``student_logits_BxTxV``, computed in float32 at least. Terms come from
    :func:`opd_jax.divergences.perspective` (no ratio of probabilities is formed) and the
    derivative in the bucket log-probs is its closed form. An empty tail in both models
    contributes 0; in one model only, the term's limit (``+inf`` where the divergence is infinite,
    e.g. ``reverse_kl`` with ``q_tail = 0 < π_tail``). Never NaN; a row whose value is not finite
    gets a zero gradient. Masked positions contribute 0 to values and gradients whatever their
    logits and top-k hold (replaced before any arithmetic).

    Args:
      student_logits_BxTxV: ``[B, T, V]`` float.
      topk: :class:`TeacherTopK` with ``[B, T, K]`` fields.
      mask_BxT: ``[B, T]`` bool or {0, 1}.
      divergence: a name or a ``Divergence``.
      chunk_size: positions per chunk (over the flattened ``B · T`` axis, under
        ``jax.checkpoint``), ``None`` for no chunking; the result is the same.

    Returns:
      ``[B, T]`` in the compute dtype, 0 at masked positions.

    Raises:
      ValueError: shapes that do not match (named), non-float logits or log-probs, non-integer or
        (when concrete) out-of-range or repeated ids, ``K > V``, or a concrete non-0/1 mask.
    """
    divergence = divergences_lib.get(divergence)
    student_logits_BxTxV = _check_logits("student_logits_BxTxV", student_logits_BxTxV)
    batch, length, vocab = student_logits_BxTxV.shape
    if tuple(jnp.shape(mask_BxT)) != (batch, length):
        raise ValueError(
            f"mask_BxT {list(jnp.shape(mask_BxT))} does not match student_logits_BxTxV [B, T] = {[batch, length]}"
        )
    check_mask(mask_BxT, "mask_BxT")
    _check_topk(topk, batch, length, vocab, mask_BxT)
    compute_dtype = jnp.promote_types(student_logits_BxTxV.dtype, jnp.float32)
    k = topk.k
    rows = batch * length
    keep_BxT = jnp.asarray(mask_BxT).astype(bool)
    per_token = map_row_chunks(
        functools.partial(_topk_rows_divergence, divergence, compute_dtype),
        student_logits_BxTxV.reshape(rows, vocab),
        jnp.asarray(topk.token_ids_BxTxK).reshape(rows, k),
        jax.lax.stop_gradient(jnp.asarray(topk.logp_BxTxK)).reshape(rows, k),
        jax.lax.stop_gradient(jnp.asarray(topk.tail_logp_BxT)).reshape(rows),
        jnp.asarray(topk.tail_mask_BxT).reshape(rows),
        keep_BxT.reshape(rows),
        chunk_size=chunk_size,
    ).reshape(batch, length)
    return jnp.where(keep_BxT, per_token, jnp.zeros((), compute_dtype))


def _topk_rows_divergence(divergence, compute_dtype, student_RxV, ids_RxK, q_RxK, q_tail_R, q_tail_mask_R, keep_R):
    """``[R]`` bucketed divergence of ``R`` rows (one chunk of :func:`topk_divergence`), 0 where not ``keep_R``.

    ``student_RxV`` ``[R, V]`` logits; ``ids_RxK``, ``q_RxK`` ``[R, K]`` the teacher's ids and
    log-probs; ``q_tail_R``, ``q_tail_mask_R`` ``[R]`` its tail; ``keep_R`` ``[R]`` bool. Computed in
    ``compute_dtype``, differentiable in ``student_RxV``.
    """
    # Masked rows become a uniform student whose own buckets stand in for the teacher's: a
    # finite divergence of 0 that NaN / inf padding can never reach.
    keep_Rx1 = keep_R[:, None]
    student_RxV = jnp.where(keep_Rx1, student_RxV.astype(compute_dtype), 0)
    ids_RxK = jnp.where(keep_Rx1, ids_RxK, jnp.arange(ids_RxK.shape[-1], dtype=ids_RxK.dtype))
    log_p_RxK, p_tail_R, p_tail_mask_R = bucket_log_probs(student_RxV, ids_RxK)
    own = jax.lax.stop_gradient
    q_RxK = jnp.where(keep_Rx1, q_RxK.astype(compute_dtype), own(log_p_RxK))
    q_tail_R = jnp.where(keep_R, q_tail_R.astype(compute_dtype), own(p_tail_R))
    q_tail_mask_R = jnp.where(keep_R, q_tail_mask_R, p_tail_mask_R)
    minus_inf = jnp.asarray(-jnp.inf, compute_dtype)
    log_p_RxM = jnp.concatenate([log_p_RxK, jnp.where(p_tail_mask_R, p_tail_R, minus_inf)[:, None]], axis=-1)
    log_q_RxM = jnp.concatenate([q_RxK, jnp.where(q_tail_mask_R, q_tail_R, minus_inf)[:, None]], axis=-1)
    return _bucketed_divergence(divergence, log_p_RxM, jax.lax.stop_gradient(log_q_RxM))


def sampled_in_topk(tokens_BxT: Array, topk: TeacherTopK) -> Array:
    """``[B, T]`` bool: whether each sampled token is one of the teacher's top-k ids there.

    Args:
      tokens_BxT: ``[B, T]`` integer, the sampled tokens.
      topk: :class:`TeacherTopK` of the same positions.
    """
    tokens_BxT = jnp.asarray(tokens_BxT)
    if tokens_BxT.ndim != 2 or not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
        raise ValueError(f"tokens_BxT must be an integer [B, T] array, got {tokens_BxT.dtype} {list(tokens_BxT.shape)}")
    _check_topk(topk, *tokens_BxT.shape, None)
    return jnp.any(tokens_BxT[..., None] == topk.token_ids_BxTxK, axis=-1)


def topk_log_ratio(
    tokens_BxT: Array,
    student_logp_BxT: Array,
    student_tail_logp_BxT: Array,
    topk: TeacherTopK,
    mask_BxT: Array,
) -> Array:
    """Bucket log-ratio ``ℓ̃_n`` of each sampled token, under stop-gradient.

    ``ℓ̃_n = log q(y_n) − log π(y_n)`` where ``y_n`` is among the teacher's top-k ids (its teacher
    log-prob read from ``topk``), ``log q_tail − log π_tail`` elsewhere. Where the sampled token is
    outside the top-k and the teacher's tail is empty (``topk.tail_mask_BxT`` False: ``q_tail = 0``)
    the ratio is ``−inf``, the exact value (``ũ = 0``; the generators give their limit ``f(0)``).

    Args:
      tokens_BxT: ``[B, T]`` integer, the sampled tokens.
      student_logp_BxT: ``[B, T]`` float, ``log π(y_n|s_n)`` of the sampling policy.
      student_tail_logp_BxT: ``[B, T]`` float, ``log π_tail(s_n)`` on the teacher's ids (the middle
        output of :func:`bucket_log_probs` of the student logits). Read only where ``y_n`` is
        outside the top-k, where the student's tail cannot be empty (it holds ``y_n``).
      topk: :class:`TeacherTopK` of the same positions.
      mask_BxT: ``[B, T]`` bool or {0, 1}.

    Returns:
      ``[B, T]`` in the promoted float dtype of the log-probs, 0 at masked positions.
    """
    check_same_shape(
        tokens_BxT=tokens_BxT, student_logp_BxT=student_logp_BxT,
        student_tail_logp_BxT=student_tail_logp_BxT, mask_BxT=mask_BxT,
    )
    if not jnp.issubdtype(jnp.asarray(tokens_BxT).dtype, jnp.integer):
        raise ValueError(f"tokens_BxT must have an integer dtype, got {jnp.asarray(tokens_BxT).dtype}")
    check_float(student_logp_BxT=student_logp_BxT, student_tail_logp_BxT=student_tail_logp_BxT)
    check_mask(mask_BxT, "mask_BxT")
    batch, length = jnp.shape(tokens_BxT)
    _check_topk(topk, batch, length, None, mask_BxT)
    sg = jax.lax.stop_gradient
    dtype = jnp.result_type(student_logp_BxT, student_tail_logp_BxT, topk.logp_BxTxK, topk.tail_logp_BxT)
    match_BxTxK = jnp.asarray(tokens_BxT)[..., None] == topk.token_ids_BxTxK
    # Ids are distinct, so at most one term of the sum is non-zero: the sum is exact.
    teacher_logp_BxT = jnp.sum(jnp.where(match_BxTxK, sg(topk.logp_BxTxK).astype(dtype), 0), axis=-1)
    in_topk_BxT = jnp.any(match_BxTxK, axis=-1)
    ratio_top_BxT = teacher_logp_BxT - sg(student_logp_BxT).astype(dtype)
    ratio_tail_BxT = jnp.where(
        topk.tail_mask_BxT,
        sg(topk.tail_logp_BxT).astype(dtype) - sg(student_tail_logp_BxT).astype(dtype),
        jnp.asarray(-jnp.inf, dtype),
    )
    ratio_BxT = jnp.where(in_topk_BxT, ratio_top_BxT, ratio_tail_BxT)
    return jnp.where(jnp.asarray(mask_BxT).astype(bool), ratio_BxT, jnp.zeros((), dtype))


def topk_token_advantages(
    tokens_BxT: Array,
    student_logp_BxT: Array,
    student_tail_logp_BxT: Array,
    topk: TeacherTopK,
    mask_BxT: Array,
    *,
    divergence: str | divergences_lib.Divergence,
    estimator: str = "opd_plus",
    gamma: float = 0.0,
    log_ratio_clip: float | None = None,
) -> Array:
    """Token advantages of stop-gradient OPD / OPD+ with the bucket ratio ``ℓ̃`` of :func:`topk_log_ratio`.

    ``A_n = −Σ_{k≥n} γ^{k−n} m_k f(ũ_k) (+ ũ_n f'(ũ_n) for opd_plus)``, as
    :func:`opd_jax.token_advantages` with ``ℓ̃`` in place of ``ℓ`` (passed to it exactly, as a
    teacher log-prob ``ℓ̃`` against a student log-prob 0). Use with the usual surrogate
    :func:`opd_jax.pg_surrogate` on ``student_logp_BxT`` (the score ``∇log π(y_n)``).

    Bias: ``opd_plus`` with ``γ = 1`` is unbiased for the bucketed objective ``J̃_tok`` (module
    notes) and biased for the full ``J_tok`` unless ``K ≥ V − 1`` or ``q/π`` is constant on each
    state's tail; ``γ < 1`` is biased for ``J̃_tok`` beyond one step; ``stop_grad`` is unbiased for
    ``J̃_tok`` with ``reverse_kl`` only.

    Args:
      tokens_BxT, student_logp_BxT, student_tail_logp_BxT, topk, mask_BxT: as in :func:`topk_log_ratio`.
      divergence, estimator, gamma, log_ratio_clip: as in :func:`opd_jax.token_advantages`
        (the clip applies to ``ℓ̃``).

    Returns:
      ``[B, T]`` advantages under stop-gradient, 0 at masked positions.
    """
    log_ratio_BxT = topk_log_ratio(tokens_BxT, student_logp_BxT, student_tail_logp_BxT, topk, mask_BxT)
    return token_advantages(
        jnp.zeros_like(log_ratio_BxT), log_ratio_BxT, mask_BxT, divergence=divergence,
        estimator=estimator, gamma=gamma, log_ratio_clip=log_ratio_clip,
    )
