"""Exact objectives and exact expected estimator gradients by enumerating every response.

For a tiny autoregressive student (vocabulary ``V``, horizon ``T``, optionally an EOS token that
ends a response early) every response ``y`` can be listed. Then

* ``J_tok = Σ_y π(y) Σ_n m_n f(u_n)`` and ``J_seq = Σ_y π(y) f(U(y))`` are finite sums, and their
  gradients come from ``jax.grad`` through both ``π(y)`` and the log-ratios: no score-function
  identity, no estimator, nothing shared with :mod:`opd_jax.advantages`;
* the *expected* gradient of an estimator is ``Σ_y π(y) ∇_θ L(y; θ)`` with ``π(y)`` held fixed, where
  ``L`` is the library's surrogate built from the library's advantages.

Comparing the two turns the statements "OPD+ is unbiased" and "stop-gradient OPD is biased" into
numbers with rounding error (~1e-15 in float64) instead of Monte Carlo noise. Enable float64 with
``jax.config.update("jax_enable_x64", True)`` before use when exactness is the point.

Levels and the objective each estimator claims to follow:

* ``"token"``: ``J_tok``; estimators ``stop_grad`` / ``opd_plus`` (any ``gamma``) and ``full_vocab``
  (the gradient of ``Σ_n m_n D_f(q‖π)(s_n)`` with the states' distribution held fixed, GKD style);
* ``"sequence"``: ``J_seq``; estimators ``stop_grad`` / ``opd_plus``.

``J_tok`` also equals the full-vocabulary objective ``E[Σ_n m_n D_f(q‖π)(s_n)]`` in value, which
:func:`objective` computes as the level ``"full_vocab"`` for checking.

Top-k distillation (:mod:`opd_jax.topk`) has its own objective, the bucketed ``J̃_tok`` over
``{teacher's top-k ids, tail}`` (:func:`topk_objective`, levels ``"token"`` and
``"topk_divergence"``, equal in value), and :func:`topk_estimator_gradient` gives the expected
gradient of its estimators (``stop_grad`` / ``opd_plus`` with bucket ratios, ``topk_divergence``),
to compare with ``∇J̃_tok`` (which ``opd_plus`` with ``gamma = 1`` follows exactly) or with the full
``∇J_tok`` (which it does not, unless ``k ≥ V − 1``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import divergences as divergences_lib
from opd_jax.advantages import ESTIMATORS, sequence_advantages, token_advantages
from opd_jax.objectives import full_vocab_divergence, pg_surrogate
from opd_jax.topk import (
    bucket_log_probs,
    sampled_in_topk,
    teacher_topk,
    topk_divergence,
    topk_token_advantages,
)

Array = jax.Array
PyTree = Any

LEVELS = ("token", "sequence")
# The registry's sampled-token estimators at both levels, and the direct full-vocabulary gradient.
ESTIMATORS_BY_LEVEL = {"token": (*ESTIMATORS, "full_vocab"), "sequence": tuple(ESTIMATORS)}
TOPK_LEVELS = ("token", "topk_divergence")
TOPK_ESTIMATORS = ("stop_grad", "opd_plus", "topk_divergence")

__all__ = [
    "BiasRow",
    "SequenceSpace",
    "bias_report",
    "compare_gradients",
    "enumerate_responses",
    "estimator_gradient",
    "expected_gradient",
    "objective",
    "objective_gradient",
    "off_policy_expected_gradient",
    "random_tabular_problem",
    "response_log_probs",
    "sampled_log_probs",
    "tabular_logits",
    "topk_estimator_gradient",
    "topk_objective",
    "topk_objective_gradient",
]


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceSpace:
    """Every response of a tiny autoregressive policy.

    Attributes:
      vocab_size: ``V``.
      horizon: ``T``, the maximum response length.
      eos_id: the token ending a response (itself part of the response), or ``None``.
      tokens: ``[N, T]`` int32, one row per response; positions after EOS hold ``eos_id``.
      mask: ``[N, T]`` bool, 1 at response tokens (up to and including the first EOS).
      state_index: ``[N, T]`` int32, the index of the prefix ``y_<t`` among all ``num_states``
        prefixes of length ``< T`` (for tabular policies).
      num_states: ``Σ_{t<T} V^t``.
    """

    vocab_size: int
    horizon: int
    eos_id: int | None
    tokens: np.ndarray
    mask: np.ndarray
    state_index: np.ndarray
    num_states: int

    @property
    def num_responses(self) -> int:
        return self.tokens.shape[0]


def enumerate_responses(vocab_size: int, horizon: int, eos_id: int | None = None) -> SequenceSpace:
    """List every response of length ``horizon`` (or shorter, ending in ``eos_id``).

    Args:
      vocab_size: ``V ≥ 2``.
      horizon: ``T ≥ 1``.
      eos_id: optional token in ``[0, V)`` that ends a response.

    Returns:
      The :class:`SequenceSpace`; ``N = V^T`` responses without EOS.
    """
    if vocab_size < 2 or horizon < 1:
        raise ValueError(f"need vocab_size >= 2 and horizon >= 1, got {vocab_size}, {horizon}")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id must lie in [0, {vocab_size}), got {eos_id}")
    rows = []
    for row in itertools.product(range(vocab_size), repeat=horizon):
        if eos_id is not None and eos_id in row:
            first = row.index(eos_id)
            if any(token != eos_id for token in row[first:]):
                continue  # the same response as the row padded with EOS, listed once
        rows.append(row)
    tokens = np.asarray(rows, dtype=np.int32).reshape(-1, horizon)
    if eos_id is None:
        mask = np.ones_like(tokens, dtype=bool)
    else:
        eos_before = np.cumsum(tokens == eos_id, axis=1) - (tokens == eos_id)
        mask = eos_before == 0
    # Prefix y_<t as a number in base V, offset by the count of shorter prefixes.
    offsets = np.cumsum([0] + [vocab_size**t for t in range(horizon)])
    state_index = np.zeros_like(tokens)
    for t in range(1, horizon):
        state_index[:, t] = (state_index[:, t - 1] - offsets[t - 1]) * vocab_size + tokens[:, t - 1] + offsets[t]
    return SequenceSpace(
        vocab_size, horizon, eos_id, tokens, mask, state_index.astype(np.int32), int(offsets[horizon])
    )


def tabular_logits(table_SxV: Array, space: SequenceSpace) -> Array:
    """Logits of a tabular policy (one row per prefix) at every position: ``[N, T, V]``."""
    if table_SxV.shape != (space.num_states, space.vocab_size):
        raise ValueError(
            f"table shape {list(table_SxV.shape)} != [num_states, V] = {[space.num_states, space.vocab_size]}"
        )
    return table_SxV[space.state_index]


def random_tabular_problem(
    seed: int,
    vocab_size: int,
    horizon: int,
    eos_id: int | None = None,
    *,
    student_scale: float = 1.0,
    teacher_scale: float = 1.5,
    dtype=jnp.float64,
) -> tuple[SequenceSpace, Array, Array]:
    """A random tabular student and teacher.

    Returns:
      ``(space, student_table [num_states, V], teacher_logits [N, T, V])``, Gaussian logits with
      the given scales, in ``dtype``.
    """
    space = enumerate_responses(vocab_size, horizon, eos_id)
    student_key, teacher_key = jax.random.split(jax.random.key(seed))
    shape = (space.num_states, vocab_size)
    student_table = student_scale * jax.random.normal(student_key, shape, dtype)
    teacher_table = teacher_scale * jax.random.normal(teacher_key, shape, dtype)
    return space, student_table, tabular_logits(teacher_table, space)


def sampled_log_probs(logits_NxTxV: Array, tokens_NxT: Array) -> Array:
    """``log softmax(logits)`` at the given tokens: ``[N, T]``."""
    log_probs = jax.nn.log_softmax(logits_NxTxV, axis=-1)
    return jnp.take_along_axis(log_probs, jnp.asarray(tokens_NxT)[..., None], axis=-1)[..., 0]


def response_log_probs(logp_NxT: Array, mask_NxT: Array) -> Array:
    """``log π(y) = Σ_t m_t log π(y_t|s_t)``: ``[N]``."""
    return jnp.sum(jnp.where(mask_NxT, logp_NxT, 0), axis=-1)


def _check_level(level: str, allowed: Sequence[str]) -> None:
    if level not in allowed:
        raise ValueError(f"level must be one of {', '.join(allowed)}; got {level!r}")


def objective(
    student_logits: Array,
    teacher_logits: Array,
    space: SequenceSpace,
    *,
    divergence: str | divergences_lib.Divergence,
    level: str,
) -> Array:
    """The exact objective, differentiable in ``student_logits``.

    Args:
      student_logits, teacher_logits: ``[N, T, V]`` logits at every position of every response.
      space: the enumerated responses.
      divergence: a name or a ``Divergence``.
      level: ``"token"`` (``J_tok``), ``"sequence"`` (``J_seq``) or ``"full_vocab"``
        (``E[Σ_n m_n D_f(q‖π)(s_n)]``, equal to ``J_tok`` in value).

    Returns:
      A scalar in the dtype of the logits.
    """
    _check_level(level, ("token", "sequence", "full_vocab"))
    divergence = divergences_lib.get(divergence)
    mask = jnp.asarray(space.mask)
    student_logp = sampled_log_probs(student_logits, space.tokens)
    weights = jnp.exp(response_log_probs(student_logp, mask))
    if level == "full_vocab":
        per_token = full_vocab_divergence(student_logits, teacher_logits, mask, divergence=divergence)
        return jnp.sum(weights * jnp.sum(per_token, axis=-1))
    teacher_logp = sampled_log_probs(jax.lax.stop_gradient(teacher_logits), space.tokens)
    log_u = jnp.where(mask, teacher_logp - student_logp, 0)
    if level == "token":
        per_response = jnp.sum(jnp.where(mask, divergence.f(log_u), 0), axis=-1)
    else:
        per_response = divergence.f(jnp.sum(log_u, axis=-1))
    return jnp.sum(weights * per_response)


def objective_gradient(
    student_logits_fn: Callable[[PyTree], Array],
    params: PyTree,
    teacher_logits: Array,
    space: SequenceSpace,
    *,
    divergence: str | divergences_lib.Divergence,
    level: str,
) -> PyTree:
    """``∇_θ J`` by ``jax.grad``; ``student_logits_fn(params) -> [N, T, V]`` must be causal."""
    return jax.grad(
        lambda p: objective(student_logits_fn(p), teacher_logits, space, divergence=divergence, level=level)
    )(params)


def off_policy_expected_gradient(
    student_logits_fn: Callable[[PyTree], Array],
    params: PyTree,
    behaviour_params: PyTree,
    space: SequenceSpace,
    loss_fn: Callable[[Array, Array, Array, Array], Array],
) -> PyTree:
    """``Σ_y π_old(y) ∇_θ L(y; θ, π_old)``: the expected gradient at ``θ`` of a surrogate fed by ``π_old``.

    The responses are drawn from the behaviour policy ``π_old = π_{behaviour_params}``, which is held
    fixed (no gradient flows into it, neither through the weights ``π_old(y)`` nor through
    ``behaviour_logp``); the surrogate is differentiated at ``θ = params``. This is what an update on
    stale rollouts follows on average, e.g. the PPO-clipped
    :func:`opd_jax.objectives.importance_surrogate` with advantages computed from ``π_old``. Compare
    it with :func:`objective_gradient` at ``params`` to measure its bias. With
    ``behaviour_params = params`` it is :func:`expected_gradient`.

    Args:
      student_logits_fn: ``params -> [N, T, V]`` logits at every position of every response
        (causal); evaluated at both ``params`` and ``behaviour_params``.
      params: ``θ``, the point at which to differentiate.
      behaviour_params: ``θ_old``, the parameters that sampled the responses (same structure).
      space: the enumerated responses.
      loss_fn: ``(student_logits_NxTxV, student_logp_NxT, behaviour_logp_NxT, mask_NxT) -> [N]``,
        the surrogate of each response; ``student_*`` are differentiable at ``θ``,
        ``behaviour_logp_NxT`` is ``log π_old(y_t|s_t)`` (a constant).

    Returns:
      A pytree like ``params``.
    """
    mask = jnp.asarray(space.mask)
    behaviour_logits = jax.lax.stop_gradient(student_logits_fn(behaviour_params))
    behaviour_logp = sampled_log_probs(behaviour_logits, space.tokens)
    weights = jnp.exp(response_log_probs(behaviour_logp, mask))

    def expected_surrogate(p):
        student_logits = student_logits_fn(p)
        student_logp = sampled_log_probs(student_logits, space.tokens)
        return jnp.sum(weights * loss_fn(student_logits, student_logp, behaviour_logp, mask))

    return jax.grad(expected_surrogate)(params)


def expected_gradient(
    student_logits_fn: Callable[[PyTree], Array],
    params: PyTree,
    space: SequenceSpace,
    loss_fn: Callable[[Array, Array, Array], Array],
) -> PyTree:
    """``Σ_y π(y) ∇_θ L(y; θ)`` for any per-response surrogate ``L``, with ``π(y)`` held fixed.

    What an estimator follows on average: compare it with :func:`objective_gradient` (or the
    gradient of your own exact objective) to prove an estimator unbiased, or measure its bias.
    The on-policy case of :func:`off_policy_expected_gradient` (behaviour = ``params``, held fixed).

    Args:
      student_logits_fn: ``params -> [N, T, V]`` logits at every position of every response.
      params: the point at which to differentiate.
      space: the enumerated responses.
      loss_fn: ``(student_logits_NxTxV, student_logp_NxT, mask_NxT) -> [N]``, the surrogate of each
        response (e.g. :func:`opd_jax.pg_surrogate` of your advantages).
    """
    return off_policy_expected_gradient(
        student_logits_fn, params, params, space,
        lambda student_logits, student_logp, _behaviour_logp, mask: loss_fn(student_logits, student_logp, mask),
    )


def estimator_gradient(
    student_logits_fn: Callable[[PyTree], Array],
    params: PyTree,
    teacher_logits: Array,
    space: SequenceSpace,
    *,
    divergence: str | divergences_lib.Divergence,
    level: str,
    estimator: str,
    gamma: float = 0.0,
    log_ratio_clip: float | None = None,
) -> PyTree:
    """The expected gradient ``Σ_y π(y) ∇_θ L(y; θ)`` of an estimator's surrogate loss.

    ``π(y)`` is held fixed (it is the sampling distribution), so this is exactly what the estimator
    follows on average. Token-level estimators use :func:`opd_jax.token_advantages` with
    ``gamma``; sequence-level ones :func:`opd_jax.sequence_advantages`; ``full_vocab`` the
    gradient of :func:`opd_jax.full_vocab_divergence` summed over the response.
    """
    _check_level(level, LEVELS)
    if estimator not in ESTIMATORS_BY_LEVEL[level]:
        raise ValueError(
            f"estimator for level {level!r} must be one of {', '.join(ESTIMATORS_BY_LEVEL[level])}; "
            f"got {estimator!r}"
        )
    divergence = divergences_lib.get(divergence)
    teacher_logp = sampled_log_probs(teacher_logits, space.tokens)

    def loss_fn(student_logits, student_logp, mask):
        if estimator == "full_vocab":
            return jnp.sum(full_vocab_divergence(student_logits, teacher_logits, mask, divergence=divergence), axis=-1)
        if level == "token":
            advantages = token_advantages(
                student_logp, teacher_logp, mask, divergence=divergence, estimator=estimator,
                gamma=gamma, log_ratio_clip=log_ratio_clip,
            )
        else:
            advantages = sequence_advantages(
                student_logp, teacher_logp, mask, divergence=divergence, estimator=estimator,
                log_ratio_clip=log_ratio_clip,
            )
        return pg_surrogate(student_logp, advantages, mask)

    return expected_gradient(student_logits_fn, params, space, loss_fn)


def topk_objective(
    student_logits: Array,
    teacher_logits: Array,
    space: SequenceSpace,
    *,
    divergence: str | divergences_lib.Divergence,
    k: int,
    level: str = "token",
) -> Array:
    """The exact bucketed objective ``J̃_tok`` of top-k distillation, differentiable in ``student_logits``.

    ``J̃_tok = Σ_y π(y) Σ_n m_n f(ũ_n)`` with the bucket ratio ``ũ_n`` of :mod:`opd_jax.topk`
    (``q(y_n)/π(y_n)`` for a token among the teacher's top ``k`` at ``s_n``, ``q_tail/π_tail``
    otherwise). Gradients flow through ``π(y)`` and through ``ũ_n`` (``π(y_n)`` or ``π_tail``).

    Args:
      student_logits, teacher_logits: ``[N, T, V]`` logits at every position of every response.
      space: the enumerated responses.
      divergence: a name or a ``Divergence``.
      k: the teacher's top-k size, in ``[1, V]``.
      level: ``"token"`` (``J̃_tok`` from the sampled-token bucket ratios, computed here from the
        full teacher log-probs) or ``"topk_divergence"`` (``Σ_y π(y) Σ_n m_n D̃_f(s_n)`` from
        :func:`opd_jax.topk.topk_divergence`, equal to ``J̃_tok`` in value).

    Returns:
      A scalar in the dtype of the logits.
    """
    _check_level(level, TOPK_LEVELS)
    divergence = divergences_lib.get(divergence)
    mask = jnp.asarray(space.mask)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    topk = teacher_topk(teacher_logits, k)
    student_logp = sampled_log_probs(student_logits, space.tokens)
    weights = jnp.exp(response_log_probs(student_logp, mask))
    if level == "topk_divergence":
        per_token = topk_divergence(student_logits, topk, mask, divergence=divergence)
        return jnp.sum(weights * jnp.sum(per_token, axis=-1))
    _, student_tail_logp, _ = bucket_log_probs(student_logits, topk.token_ids_BxTxK)
    teacher_logp = sampled_log_probs(teacher_logits, space.tokens)
    # An empty teacher tail (k = V) is never reached by a sampled tail token; -inf keeps the
    # unselected branch an exact 0-probability ratio rather than a placeholder.
    teacher_tail_logp = jnp.where(topk.tail_mask_BxT, topk.tail_logp_BxT, -jnp.inf)
    log_u = jnp.where(
        sampled_in_topk(space.tokens, topk), teacher_logp - student_logp, teacher_tail_logp - student_tail_logp
    )
    log_u = jnp.where(mask, log_u, 0)
    per_response = jnp.sum(jnp.where(mask, divergence.f(log_u), 0), axis=-1)
    return jnp.sum(weights * per_response)


def topk_objective_gradient(
    student_logits_fn: Callable[[PyTree], Array],
    params: PyTree,
    teacher_logits: Array,
    space: SequenceSpace,
    *,
    divergence: str | divergences_lib.Divergence,
    k: int,
    level: str = "token",
) -> PyTree:
    """``∇_θ J̃_tok`` by ``jax.grad`` of :func:`topk_objective`."""
    return jax.grad(
        lambda p: topk_objective(student_logits_fn(p), teacher_logits, space, divergence=divergence, k=k, level=level)
    )(params)


def topk_estimator_gradient(
    student_logits_fn: Callable[[PyTree], Array],
    params: PyTree,
    teacher_logits: Array,
    space: SequenceSpace,
    *,
    divergence: str | divergences_lib.Divergence,
    k: int,
    estimator: str,
    gamma: float = 0.0,
    log_ratio_clip: float | None = None,
) -> PyTree:
    """The expected gradient ``Σ_y π(y) ∇_θ L(y; θ)`` of a top-k estimator, ``π(y)`` held fixed.

    ``stop_grad`` / ``opd_plus``: the surrogate :func:`opd_jax.pg_surrogate` with the advantages
    of :func:`opd_jax.topk.topk_token_advantages` (bucket ratios, discount ``gamma``);
    ``topk_divergence``: the gradient of :func:`opd_jax.topk.topk_divergence` summed over the
    response. Compare with :func:`topk_objective_gradient` (``J̃_tok``) or with
    :func:`objective_gradient` at level ``"token"`` (the full ``J_tok``).
    """
    if estimator not in TOPK_ESTIMATORS:
        raise ValueError(f"top-k estimator must be one of {', '.join(TOPK_ESTIMATORS)}; got {estimator!r}")
    divergence = divergences_lib.get(divergence)
    topk = teacher_topk(teacher_logits, k)

    def loss_fn(student_logits, student_logp, mask):
        if estimator == "topk_divergence":
            return jnp.sum(topk_divergence(student_logits, topk, mask, divergence=divergence), axis=-1)
        _, student_tail_logp, _ = bucket_log_probs(student_logits, topk.token_ids_BxTxK)
        advantages = topk_token_advantages(
            space.tokens, student_logp, student_tail_logp, topk, mask, divergence=divergence,
            estimator=estimator, gamma=gamma, log_ratio_clip=log_ratio_clip,
        )
        return pg_surrogate(student_logp, advantages, mask)

    return expected_gradient(student_logits_fn, params, space, loss_fn)


def compare_gradients(estimate: PyTree, exact: PyTree) -> tuple[float, float]:
    """``(‖g − g*‖ / ‖g*‖, cos(g, g*))`` over all leaves, flattened."""
    g = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(estimate)])
    g_star = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(exact)])
    norm_star = jnp.linalg.norm(g_star)
    relative_error = jnp.linalg.norm(g - g_star) / norm_star
    cosine = jnp.dot(g, g_star) / (jnp.linalg.norm(g) * norm_star)
    return float(relative_error), float(cosine)


@dataclasses.dataclass(frozen=True)
class BiasRow:
    """One line of the bias report.

    Compares the estimator's expected gradient with the exact gradient of ``target`` (``J_tok`` or
    ``J_seq``) over several problems: the largest relative error and the range of cosines.
    """

    divergence: str
    level: str
    estimator: str
    gamma: float | None
    target: str
    relative_error: float
    cosine_min: float
    cosine_max: float

    @property
    def unbiased(self) -> bool:
        return self.relative_error <= 1e-8


DEFAULT_DIVERGENCES: tuple[tuple[str, dict[str, float]], ...] = (
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("js", {}),
    ("generalized_js", {"beta": 0.1}),
    ("generalized_js", {"beta": 0.9}),
    ("total_variation", {}),
    ("squared_hellinger", {}),
    ("pearson_chi2", {}),
    ("neyman_chi2", {}),
    ("alpha", {"alpha": -0.5}),
    ("alpha", {"alpha": 0.5}),
    ("alpha", {"alpha": 2.5}),
)


def divergence_label(name: str, params: dict[str, float]) -> str:
    """``"alpha(0.5)"``-style label of a generator and its parameters."""
    return name + ("(" + ", ".join(f"{v:g}" for v in params.values()) + ")" if params else "")


def _report_cases() -> list[tuple[str, str, float | None]]:
    """Every registered estimator at γ = 0 and 1 (token level) and at sequence level, and full_vocab."""
    return [
        *(("token", estimator, gamma) for estimator in ESTIMATORS for gamma in (0.0, 1.0)),
        ("token", "full_vocab", None),
        *(("sequence", estimator, None) for estimator in ESTIMATORS),
    ]


def bias_report(
    *,
    seeds: Sequence[int] = (0,),
    vocab_size: int = 3,
    horizon: int = 3,
    eos: bool = True,
    divergences: Sequence[tuple[str, dict[str, float]]] = DEFAULT_DIVERGENCES,
    progress: Callable[[int, int], None] | None = None,
) -> list[BiasRow]:
    """Bias of every estimator against the exact gradient of its objective, on random tabular problems.

    Each seed draws a student and a teacher (:func:`random_tabular_problem`, EOS = token ``V − 1``
    when ``eos``). Rows give the largest error and the range of cosines over the seeds.
    Run under float64 for meaningful errors.

    Args:
      seeds: problem seeds.
      vocab_size, horizon, eos: the response space.
      divergences: ``(name, params)`` pairs for :func:`opd_jax.divergences.get`.
      progress: called as ``progress(done, total)`` after each divergence.

    Returns:
      One :class:`BiasRow` per divergence × (level, estimator, gamma).
    """
    dtype = jnp.result_type(float)
    eos_id = vocab_size - 1 if eos else None
    problems = [random_tabular_problem(seed, vocab_size, horizon, eos_id, dtype=dtype) for seed in seeds]
    space = problems[0][0]
    student_tables = jnp.stack([table for _, table, _ in problems])
    teacher_logits = jnp.stack([teacher for _, _, teacher in problems])
    logits_fn = functools.partial(tabular_logits, space=space)
    summary: dict[tuple[str, str, str, float | None], tuple[float, float, float]] = {}
    for done, (name, params) in enumerate(divergences, start=1):
        divergence = divergences_lib.get(name, **params)

        def all_gradients(student_table, teacher, divergence=divergence):
            kwargs = dict(divergence=divergence)
            exact = {
                level: objective_gradient(logits_fn, student_table, teacher, space, level=level, **kwargs)
                for level in LEVELS
            }
            estimates = [
                estimator_gradient(
                    logits_fn, student_table, teacher, space, level=level, estimator=estimator,
                    gamma=0.0 if gamma is None else gamma, **kwargs,
                )
                for level, estimator, gamma in _report_cases()
            ]
            return exact, estimates

        # One vectorised pass over all seeds (same response space, different tables).
        exact, estimates = jax.vmap(all_gradients)(student_tables, teacher_logits)
        label = divergence_label(name, params)
        for (level, estimator, gamma), estimate in zip(_report_cases(), estimates):
            per_seed = [
                compare_gradients(estimate[i], exact[level][i]) for i in range(len(problems))
            ]
            errors, cosines = zip(*per_seed)
            summary[(label, level, estimator, gamma)] = (max(errors), min(cosines), max(cosines))
        if progress is not None:
            progress(done, len(divergences))
    return [
        BiasRow(label, level, estimator, gamma, "J_tok" if level == "token" else "J_seq", *values)
        for (label, level, estimator, gamma), values in summary.items()
    ]
