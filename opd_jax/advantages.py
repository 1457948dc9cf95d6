"""Advantage estimators for on-policy distillation: stop-gradient OPD and OPD+.

With ``ℓ_n = log q(y_n|s_n) − log π(y_n|s_n)`` at the sampled tokens and the generator ``f`` of a
:class:`~opd_jax.divergences.Divergence`, the estimators are (reward convention: higher is better)

=============  =========================================================  ====================
estimator      token level, discount γ                                    sequence level
=============  =========================================================  ====================
``stop_grad``  ``A_n = −Σ_{k≥n} γ^{k−n} m_k f(u_k)``                      ``A = −f(U)``
``opd_plus``   ``A_n = −Σ_{k≥n} γ^{k−n} m_k f(u_k) + u_n f'(u_n)``        ``A = −f(U) + U f'(U)``
=============  =========================================================  ====================

where ``log U = Σ_n m_n ℓ_n``. Minimising ``−Σ_n m_n A_n log π(y_n|s_n)`` follows, in expectation,
the exact gradient of ``J_tok = E[Σ_n m_n f(u_n)]`` for token-level ``opd_plus`` with ``γ = 1`` and of
``J_seq = E[f(U)]`` for sequence-level ``opd_plus``. ``γ = 0`` (the per-token form used in practice)
drops the effect of ``y_n`` on later states and is biased for ``J_tok`` beyond one step; stop-gradient
OPD is biased for every generator but reverse KL. :mod:`opd_jax.exact` measures both biases exactly.

The discount counts response tokens only: ``k − n`` is the number of response tokens between
positions ``n`` and ``k`` (masked positions are skipped, not discounted), so left padding, prompts
and masked tool outputs inside a response never change the weights.

Numerics. Log-ratios are formed only at response positions (padding may hold ``-inf`` log-probs).
``u = e^ℓ`` overflows for ``ℓ ≳ 88`` in float32 (``≳ 709`` in float64), and ``U`` is a product over
the whole response, so in training pass ``log_ratio_clip``: it clamps each token's ``ℓ`` (token
level) or ``log U`` (sequence level) to ``[−c, c]``; pick ``c`` so the generator stays in range
(``c = 20`` keeps ``u² = e^40`` finite in float32). It is off by default so that exact checks stay
exact. Without it, an overflowing ratio gives ±inf, never NaN,
at ``γ = 0`` and at sequence level; with ``γ > 0`` the discounted sum can meet two overflowed terms
(inf − inf) or a discount that underflowed times an overflowed cost (0 · inf), so the affected row
may hold NaN. OPD+ rewards that grow like ``log u`` or stay bounded never overflow: ``reverse_kl``,
``js`` / ``generalized_js``, ``total_variation``. The ones that need the clip grow like a power of
the ratio: ``forward_kl`` (``u``), ``pearson_chi2`` (``u²``), ``squared_hellinger`` (``√u``),
``alpha`` (``u^α``), ``neyman_chi2`` (``1/u``). Stop-gradient OPD uses ``f`` itself, which grows
at least linearly in ``u`` for every generator but reverse KL, so it needs the clip for all others.
A teacher log-prob of ``-inf`` at a response token (``u = 0``) gives the generator's limit at 0,
finite or ±inf (:mod:`opd_jax.divergences`), never NaN; so does a student one (``u = +inf``) at
``γ = 0`` and at sequence level.

Inputs are checked: log-probabilities must be floating point (integers raise), and a concrete mask
must hold only 0 and 1 (bool, integer or float); a mask traced under ``jax.jit`` can only be checked
for its dtype, and there any non-zero value counts as 1.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import divergences as divergences_lib

Array = jax.Array

LEVELS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class Estimator:
    """A sampled-token advantage estimator: the reward a token (or response) earns by itself.

    Both levels are built from it: token level ``A_n = own(ℓ_n) − Σ_{k>n} γ^{k−n} m_k f(u_k)``,
    sequence level ``A = own(log U)``.

    Attributes:
      name: the registry key (``TrainConfig.estimator``, ``opd-jax verify``, the CLI).
      own_reward: ``(divergence, log_u) -> reward``, elementwise, dtype-preserving.
      unbiased_for: level -> the objective whose exact gradient the estimator follows in
        expectation (checked by :mod:`opd_jax.exact`), or the reason it is biased.
    """

    name: str
    own_reward: Callable[[divergences_lib.Divergence, Array], Array]
    unbiased_for: Mapping[str, str]


def _stop_grad_reward(divergence: divergences_lib.Divergence, log_u: Array) -> Array:
    return -divergence.f(log_u)


def _opd_plus_reward(divergence: divergences_lib.Divergence, log_u: Array) -> Array:
    return divergence.opd_plus_reward(log_u)


#: The estimator registry: the loop, :mod:`opd_jax.exact`, the CLI and the experiments read it, so
#: adding an estimator is one entry here. (Estimators that need more than the two sampled-token
#: log-probs plug into the loop as ``advantage_fn`` instead; see :func:`opd_jax.train.train`.)
ESTIMATORS: Mapping[str, Estimator] = types.MappingProxyType({
    "stop_grad": Estimator(
        "stop_grad", _stop_grad_reward,
        {"token": "J_tok for reverse_kl only (biased for every other generator: it drops u f'(u))",
         "sequence": "J_seq for reverse_kl only (biased for every other generator)"},
    ),
    "opd_plus": Estimator(
        "opd_plus", _opd_plus_reward,
        {"token": "J_tok with gamma = 1 (gamma < 1 drops the effect of y_n on later states)",
         "sequence": "J_seq"},
    ),
})

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "LEVELS",
    "broadcast_advantages",
    "discounted_future",
    "leave_one_out_baseline",
    "masked_log_ratio",
    "reward_to_go",
    "sequence_advantages",
    "token_advantages",
]


def check_same_shape(**arrays: Array) -> None:
    """Raise a ``ValueError`` naming every shape unless all ``[B, T]`` arrays agree."""
    shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        described = ", ".join(f"{name} {list(s)}" for name, s in shapes.items())
        raise ValueError(f"expected matching [B, T] shapes, got {described}")


def broadcast_advantages(advantages: Array, mask: Array) -> Array:
    """Token or sequence advantages as one ``[B, T]`` array, for losses that weigh each token.

    Args:
      advantages: ``[B, T]`` token advantages, or ``[B]`` sequence advantages (one per row,
        repeated over its ``T`` positions).
      mask: ``[B, T]``; only its shape is read.

    Returns:
      ``[B, T]`` in the dtype of ``advantages`` (no stop-gradient and no masking: callers apply both).

    Raises:
      ValueError: ``[B]`` advantages whose ``B`` differs from the mask's, or ``[B, T]`` ones of
        another shape.
    """
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


def _dtype_of(x):
    dtype = getattr(x, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(x).dtype


def check_float(**arrays: Array) -> None:
    """Raise a ``ValueError`` naming the argument unless each array has a floating-point dtype.

    Log-probabilities and logits are real numbers; an integer array is almost always a token-id
    array passed in the wrong place, so it is refused rather than converted.
    """
    for name, a in arrays.items():
        dtype = _dtype_of(a)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating-point dtype (float16/bfloat16/float32/float64), got {dtype}")


def check_mask(mask: Array, name: str = "mask") -> None:
    """Raise a ``ValueError`` unless ``mask`` is bool, integer or float and holds only 0 and 1.

    The values are checked only when ``mask`` is concrete (not a tracer inside ``jax.jit``,
    ``vmap`` or ``grad`` of the mask) and readable by this process (not a global array spread
    over several processes): otherwise only the dtype can be checked, and a non-binary mask is
    treated as ``mask != 0``.
    """
    dtype = _dtype_of(mask)
    if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.integer)
            or jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(f"{name} must be bool or hold 0/1 as integers or floats, got dtype {dtype}")
    if jnp.issubdtype(dtype, jnp.bool_) or isinstance(mask, jax.core.Tracer):
        return
    if isinstance(mask, jax.Array) and not mask.is_fully_addressable:
        return  # a global array spread over processes: this process cannot read all values
    values = np.asarray(mask)
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        raise ValueError(
            f"{name} must hold only 0 and 1 (or be bool), got {bad.size} other value(s), e.g. "
            f"{', '.join(repr(v.item()) for v in bad.reshape(-1)[:3])}"
        )


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")


def _check_clip(log_ratio_clip: float | None) -> None:
    if log_ratio_clip is not None and not (float(log_ratio_clip) > 0.0):
        raise ValueError(f"log_ratio_clip must be None or a number > 0, got {log_ratio_clip!r}")


def _float_dtype(*arrays: Array):
    return jnp.result_type(*arrays)


def masked_log_ratio(
    student_logp: Array, teacher_logp: Array, mask: Array, *, log_ratio_clip: float | None = None
) -> Array:
    """``ℓ = teacher_logp − student_logp`` at response tokens, ``0`` elsewhere, under stop-gradient.

    Args:
      student_logp: ``[B, T]`` float, log-probabilities of the sampled tokens under the student.
      teacher_logp: ``[B, T]`` float, the same tokens under the teacher.
      mask: ``[B, T]`` bool or {0, 1}; 1 at response tokens.

    Raises:
      ValueError: shapes differ, a log-probability array is not floating point (integers are
        refused, not converted), or a concrete mask holds values other than 0 and 1 (a traced
        mask cannot be checked; there any non-zero counts as 1).
      log_ratio_clip: if set, ``ℓ`` is clamped to ``[−c, c]``.

    Returns:
      ``[B, T]`` log-ratios in the promoted float dtype of the log-probabilities.
    """
    check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp, mask=mask)
    check_float(student_logp=student_logp, teacher_logp=teacher_logp)
    check_mask(mask)
    _check_clip(log_ratio_clip)
    dtype = _float_dtype(student_logp, teacher_logp)
    student_logp = jax.lax.stop_gradient(jnp.asarray(student_logp, dtype))
    teacher_logp = jax.lax.stop_gradient(jnp.asarray(teacher_logp, dtype))
    in_response = jnp.asarray(mask).astype(bool)
    # `where`, not multiplication by the mask: padding may hold -inf, and -inf * 0 is NaN.
    log_u = jnp.where(in_response, teacher_logp - student_logp, jnp.zeros((), dtype))
    if log_ratio_clip is not None:
        log_u = jnp.clip(log_u, -log_ratio_clip, log_ratio_clip)
    return log_u


def discounted_future(cost_BxT: Array, in_response_BxT: Array, gamma: float) -> Array:
    """``Σ_{k>n} γ^{j(k)−j(n)} cost_k`` over response tokens ``k``, with ``j`` the response index.

    The discounted sum of the costs *after* each token (its own excluded): the reward-to-go part of
    :func:`token_advantages` and :func:`opd_jax.objectives.full_vocab_reward_to_go`. Masked
    positions are skipped, not discounted (``k − n`` counts response tokens only). A building
    block: the inputs are not checked, and no stop-gradient is applied.

    Solved as the linear recurrence ``C_n = a_n C_{n+1} + cost_n`` (``a_n = γ`` at response tokens,
    ``1`` at masked ones) by a parallel associative scan; the future of token ``n`` is ``γ C_{n+1}``.

    Args:
      cost_BxT: ``[B, T]`` float; 0 at masked positions (a masked cost would be added undiscounted).
      in_response_BxT: ``[B, T]`` bool, ``True`` at response tokens.
      gamma: a Python float in ``[0, 1]`` (``0`` returns zeros without a scan).

    Returns:
      ``[B, T]`` in the dtype of ``cost_BxT``; at masked positions the future of the next response
      token, which callers mask out.

    >>> import jax.numpy as jnp
    >>> discounted_future(jnp.array([[1.0, 2.0, 4.0]]), jnp.array([[True, True, True]]), 0.5).tolist()
    [[2.0, 2.0, 0.0]]
    """
    if gamma == 0.0:
        return jnp.zeros_like(cost_BxT)
    decay = jnp.where(in_response_BxT, jnp.asarray(gamma, cost_BxT.dtype), 1)

    def compose(earlier, later):  # on time-reversed arrays: x_t = a_t x_{t−1} + b_t
        a_1, b_1 = earlier
        a_2, b_2 = later
        return a_2 * a_1, a_2 * b_1 + b_2

    _, to_go_reversed = jax.lax.associative_scan(
        compose, (decay[:, ::-1], cost_BxT[:, ::-1]), axis=1
    )
    to_go = to_go_reversed[:, ::-1]  # C_n, including token n's own cost
    next_to_go = jnp.pad(to_go[:, 1:], ((0, 0), (0, 1)))
    return gamma * next_to_go


def reward_to_go(reward_BxT: Array, mask_BxT: Array, *, gamma: float) -> Array:
    """``Σ_{k≥n} γ^{k−n} m_k r_k``: each response token's discounted reward to the end of its response.

    The building block of a custom ``advantage_fn`` (see :mod:`opd_jax.step`): with ``γ = 1`` the
    surrogate ``−Σ_n m_n A_n log π(y_n|s_n)`` follows the exact gradient of ``−E[Σ_n m_n r_n]``
    whenever ``r_n`` does not depend on θ (``γ < 1`` drops part of the effect of ``y_n`` on later
    rewards). The discount counts response tokens only, as in :func:`token_advantages`.

    Args:
      reward_BxT: ``[B, T]`` float per-token rewards (any value at masked positions).
      mask_BxT: ``[B, T]`` bool or {0, 1}, response tokens.
      gamma: discount in ``[0, 1]``.

    Returns:
      ``[B, T]`` under stop-gradient, 0 at masked positions, dtype of ``reward_BxT``.

    >>> import jax.numpy as jnp
    >>> reward_to_go(jnp.array([[1.0, 2.0, 4.0]]), jnp.array([[1, 1, 0]]), gamma=0.5).tolist()
    [[2.0, 2.0, 0.0]]
    """
    check_float(reward_BxT=reward_BxT)
    check_mask(mask_BxT)
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
    in_response = jnp.asarray(mask_BxT).astype(bool)
    reward = jax.lax.stop_gradient(jnp.where(in_response, reward_BxT, jnp.zeros((), reward_BxT.dtype)))
    return jnp.where(in_response, reward + discounted_future(reward, in_response, float(gamma)), 0)


def token_advantages(
    student_logp: Array,
    teacher_logp: Array,
    mask: Array,
    *,
    divergence: str | divergences_lib.Divergence,
    estimator: str = "opd_plus",
    gamma: float = 0.0,
    log_ratio_clip: float | None = None,
    baseline: Array | None = None,
) -> Array:
    """Per-token advantages of stop-gradient OPD or OPD+.

    Args:
      student_logp: ``[B, T]`` float, student log-probabilities of the sampled tokens (the policy
        that sampled them).
      teacher_logp: ``[B, T]`` float, teacher log-probabilities of the same tokens.
      mask: ``[B, T]`` bool or {0, 1}, 1 at response tokens.
      divergence: a name for :func:`opd_jax.divergences.get` or a ``Divergence``.
      estimator: ``"stop_grad"`` (standard OPD) or ``"opd_plus"``.
      gamma: discount in ``[0, 1]``; ``1`` is unbiased for ``J_tok`` with ``opd_plus``, ``0`` is the
        per-token form.
      log_ratio_clip: clamp each ``ℓ_n`` to ``[−c, c]`` (see the module notes); ``None`` is exact.
      baseline: optional array broadcastable to ``[B, T]`` subtracted from the advantages. It keeps
        the estimator unbiased if ``baseline[b, n]`` does not depend on the token ``y_n`` (e.g.
        :func:`leave_one_out_baseline` over a group of samples of the same prompt).

    Returns:
      ``[B, T]`` advantages, computed under stop-gradient, 0 at masked positions; dtype of the
      log-probabilities.

    >>> import jax.numpy as jnp
    >>> student_logp = jnp.log(jnp.array([[0.5, 0.25, 1.0]]))
    >>> teacher_logp = jnp.log(jnp.array([[0.25, 0.5, 1.0]]))
    >>> mask = jnp.array([[1, 1, 0]])  # the last slot is padding
    >>> token_advantages(student_logp, teacher_logp, mask, divergence="forward_kl").tolist()  # OPD+, γ = 0: u
    [[0.5, 2.0, 0.0]]
    >>> advantages = token_advantages(student_logp, teacher_logp, mask, divergence="forward_kl",
    ...                               estimator="stop_grad", gamma=1.0)  # −Σ_{k≥n} u_k log u_k
    >>> [round(float(a), 4) for a in advantages[0]]
    [-1.0397, -1.3863, 0.0]
    """
    divergence = divergences_lib.get(divergence)
    _check_estimator(estimator)
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
    log_u = masked_log_ratio(student_logp, teacher_logp, mask, log_ratio_clip=log_ratio_clip)
    in_response = jnp.asarray(mask).astype(bool)
    zero = jnp.zeros((), log_u.dtype)
    cost = jnp.where(in_response, divergence.f(log_u), zero)
    own = jnp.where(in_response, ESTIMATORS[estimator].own_reward(divergence, log_u), zero)
    advantages = own - discounted_future(cost, in_response, float(gamma))
    if baseline is not None:
        advantages = advantages - jax.lax.stop_gradient(jnp.asarray(baseline, log_u.dtype))
    return jnp.where(in_response, advantages, zero)


def sequence_advantages(
    student_logp: Array,
    teacher_logp: Array,
    mask: Array,
    *,
    divergence: str | divergences_lib.Divergence,
    estimator: str = "opd_plus",
    log_ratio_clip: float | None = None,
    baseline: Array | None = None,
) -> Array:
    """Sequence-level advantages, from ``log U = Σ_n m_n ℓ_n``.

    Args:
      student_logp, teacher_logp, mask, divergence, estimator: as in :func:`token_advantages`.
      log_ratio_clip: clamp ``log U`` (not the per-token ratios) to ``[−c, c]``.
      baseline: optional ``[B]`` array subtracted from the advantages; unbiased if it does not
        depend on the row's own response.

    Returns:
      ``[B]`` advantages under stop-gradient; 0 for rows without response tokens.
    """
    divergence = divergences_lib.get(divergence)
    _check_estimator(estimator)
    log_u = masked_log_ratio(student_logp, teacher_logp, mask)
    _check_clip(log_ratio_clip)
    log_big_u = jnp.sum(log_u, axis=-1)
    if log_ratio_clip is not None:
        log_big_u = jnp.clip(log_big_u, -log_ratio_clip, log_ratio_clip)
    advantages = ESTIMATORS[estimator].own_reward(divergence, log_big_u)
    if baseline is not None:
        advantages = advantages - jax.lax.stop_gradient(jnp.asarray(baseline, log_u.dtype))
    has_response = jnp.any(jnp.asarray(mask).astype(bool), axis=-1)
    return jnp.where(has_response, advantages, jnp.zeros((), log_u.dtype))


def leave_one_out_baseline(values: Array, group_size: int) -> Array:
    """For each sample, the mean of ``values`` over the *other* samples of its group.

    Samples of one prompt must be contiguous: rows ``[g·k, g·(k+1))`` form group ``k``. Because
    the baseline of a sample is computed from independent samples only, subtracting it leaves
    every estimator's expected gradient unchanged while lowering its variance.

    Args:
      values: ``[B, ...]`` float, e.g. ``[B]`` sequence advantages or ``[B, T]`` token advantages.
      group_size: samples per prompt, ``≥ 2``, dividing ``B``.

    Returns:
      ``[B, ...]`` baseline, same dtype as ``values``.
    """
    values = jnp.asarray(values)
    batch = values.shape[0]
    if int(group_size) < 2 or batch % int(group_size):
        raise ValueError(
            f"group_size must be >= 2 and divide the batch size {batch}, got {group_size!r}"
        )
    grouped = values.reshape(batch // group_size, group_size, *values.shape[1:])
    others = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (group_size - 1)
    return others.reshape(values.shape)
