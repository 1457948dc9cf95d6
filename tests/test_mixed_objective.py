"""The mixed sampled-token + full-vocabulary objective, checked exactly by enumeration (float64).

``J_tok = E_{y~π}[Σ_n m_n f(u_n)]`` and ``J_fv = E_{y~π}[Σ_n m_n D_f(q‖π)(s_n)]`` are equal in value.
A loop that adds ``λ Σ_n m_n D_f(q‖π)(s_n)``, differentiated directly, to the sampled-token surrogate
follows ``∇[(1 + λ) J_tok]`` only if the advantages also carry ``λ · full_vocab_reward_to_go(D, γ=1)``;
without it (the GKD-style direct term) the gradient is biased.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import divergences
from opd_jax.advantages import token_advantages
from opd_jax.exact import (
    compare_gradients,
    objective,
    objective_gradient,
    random_tabular_problem,
    response_log_probs,
    sampled_log_probs,
    tabular_logits,
)
from opd_jax.objectives import full_vocab_divergence, full_vocab_reward_to_go, pg_surrogate

jax.config.update("jax_enable_x64", True)  # also done by conftest.py; harmless twice

VOCAB, HORIZON = 3, 3
DIVERGENCES = (("reverse_kl", {}), ("forward_kl", {}), ("js", {}), ("alpha", {"alpha": 0.5}), ("neyman_chi2", {}))
DIVERGENCE_IDS = [name + "".join(f"({v})" for v in params.values()) for name, params in DIVERGENCES]


@functools.cache
def _problem(eos: bool):
    space, student_table, teacher_logits = random_tabular_problem(
        11, VOCAB, HORIZON, VOCAB - 1 if eos else None, dtype=jnp.float64
    )
    assert student_table.dtype == jnp.float64
    return space, student_table, teacher_logits


def _mixed_expected_gradient(divergence, lam, *, eos, gamma, reward_to_go_weight):
    """``Σ_y π(y) ∇L(y)`` with ``π(y)`` held fixed, for
    ``L(y) = pg_surrogate(log π, A_opd+(γ=1) + w · full_vocab_reward_to_go(D, γ), m) + λ Σ_t D(s_t)``."""
    space, student_table, teacher_logits = _problem(eos)
    mask = jnp.asarray(space.mask)
    teacher_logp = sampled_log_probs(teacher_logits, space.tokens)

    def expected_surrogate(table):
        logits = tabular_logits(table, space)
        student_logp = sampled_log_probs(logits, space.tokens)
        weights = jax.lax.stop_gradient(jnp.exp(response_log_probs(student_logp, mask)))
        per_token = full_vocab_divergence(logits, teacher_logits, mask, divergence=divergence)
        advantages = token_advantages(
            student_logp, teacher_logp, mask, divergence=divergence, estimator="opd_plus", gamma=1.0
        ) + reward_to_go_weight * full_vocab_reward_to_go(per_token, mask, gamma=gamma)
        loss = pg_surrogate(student_logp, advantages, mask) + lam * jnp.sum(per_token, axis=-1)
        return jnp.sum(weights * loss)

    return jax.grad(expected_surrogate)(student_table)


def _exact_gradients(divergence, lam, *, eos):
    """``(1 + λ) ∇J_tok`` and ``∇[J_tok + λ J_fv]``, the latter from the two objectives separately."""
    space, student_table, teacher_logits = _problem(eos)
    logits_fn = functools.partial(tabular_logits, space=space)
    grad_tok = objective_gradient(logits_fn, student_table, teacher_logits, space, divergence=divergence, level="token")
    grad_sum = jax.grad(
        lambda table: objective(logits_fn(table), teacher_logits, space, divergence=divergence, level="token")
        + lam * objective(logits_fn(table), teacher_logits, space, divergence=divergence, level="full_vocab")
    )(student_table)
    return (1 + lam) * grad_tok, grad_sum


@pytest.mark.parametrize("eos", [False, True], ids=["no_eos", "eos"])
@pytest.mark.parametrize("lam", [0.5, 2.0])
@pytest.mark.parametrize("name,params", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_reward_to_go_makes_the_mixed_gradient_unbiased(name, params, lam, eos):
    divergence = divergences.get(name, **params)
    scaled_tok, tok_plus_fv = _exact_gradients(divergence, lam, eos=eos)
    # J_fv = J_tok as functions of θ, so their gradients agree too.
    assert compare_gradients(tok_plus_fv, scaled_tok)[0] <= 1e-12
    estimate = _mixed_expected_gradient(divergence, lam, eos=eos, gamma=1.0, reward_to_go_weight=lam)
    error, cosine = compare_gradients(estimate, scaled_tok)
    print(f"{name}{params} λ={lam} eos={eos}: relative error {error:.2e}, cosine {cosine:.15f}")
    assert error <= 1e-10
    assert compare_gradients(estimate, tok_plus_fv)[0] <= 1e-10


@pytest.mark.parametrize("eos", [False, True], ids=["no_eos", "eos"])
@pytest.mark.parametrize("lam", [0.5, 2.0])
@pytest.mark.parametrize("name,params", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_the_direct_term_alone_is_biased(name, params, lam, eos):
    """γ = 0 (no reward to go): ``λ Σ_t D(s_t)`` differentiated with the states held fixed."""
    divergence = divergences.get(name, **params)
    scaled_tok, _ = _exact_gradients(divergence, lam, eos=eos)
    estimate = _mixed_expected_gradient(divergence, lam, eos=eos, gamma=0.0, reward_to_go_weight=lam)
    error, cosine = compare_gradients(estimate, scaled_tok)
    print(f"{name}{params} λ={lam} eos={eos}: direct term alone, relative error {error:.3e}, cosine {cosine:.6f}")
    assert error > 1e-3


def test_the_reward_to_go_needs_the_weight_of_the_direct_term():
    """Unweighted (``w = 1``) the reward to go restores ``∇J_fv`` once, not ``λ`` times: biased unless λ = 1."""
    divergence = divergences.get("js")
    for lam in (0.5, 2.0):
        scaled_tok, _ = _exact_gradients(divergence, lam, eos=True)
        estimate = _mixed_expected_gradient(divergence, lam, eos=True, gamma=1.0, reward_to_go_weight=1.0)
        error, _ = compare_gradients(estimate, scaled_tok)
        print(f"js λ={lam}: reward to go without the weight λ, relative error {error:.3e}")
        assert error > 1e-3
    scaled_tok, _ = _exact_gradients(divergence, 1.0, eos=True)
    estimate = _mixed_expected_gradient(divergence, 1.0, eos=True, gamma=1.0, reward_to_go_weight=1.0)
    assert compare_gradients(estimate, scaled_tok)[0] <= 1e-10


# ---------------------------------------------------------------------------------------------
# full_vocab_reward_to_go itself
# ---------------------------------------------------------------------------------------------


def _np_reward_to_go(divergence, mask, gamma):
    """``−Σ_{k>n, m_k} γ^{j(k)−j(n)} D_k`` by loops, ``j`` counting response tokens."""
    out = np.zeros_like(divergence)
    batch, length = divergence.shape
    for b in range(batch):
        positions = [t for t in range(length) if mask[b, t]]
        for j, n in enumerate(positions):
            out[b, n] = -sum(gamma ** (i - j) * divergence[b, k] for i, k in enumerate(positions) if i > j)
    return out


def _rtg_inputs(rng):
    # left padding, a masked hole inside the response (e.g. a tool output), right padding, empty row
    mask = np.array(
        [[1, 1, 1, 1, 1, 1, 1],
         [0, 0, 1, 1, 1, 0, 0],
         [1, 1, 0, 0, 1, 1, 0],
         [0, 0, 0, 0, 0, 0, 0]],
        bool,
    )
    return rng.exponential(size=mask.shape), mask


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 1.0])
def test_reward_to_go_matches_loops(gamma):
    divergence, mask = _rtg_inputs(np.random.default_rng(0))
    got = full_vocab_reward_to_go(jnp.asarray(divergence), mask, gamma=gamma)
    assert got.shape == mask.shape and got.dtype == jnp.float64
    np.testing.assert_allclose(got, _np_reward_to_go(divergence, mask, gamma), rtol=1e-14, atol=0)
    np.testing.assert_array_equal(np.asarray(got)[~mask], 0.0)
    if gamma == 0.0:
        np.testing.assert_array_equal(got, 0.0)


def test_reward_to_go_is_a_constant_and_ignores_masked_positions():
    divergence, mask = _rtg_inputs(np.random.default_rng(1))
    clean = full_vocab_reward_to_go(divergence, mask, gamma=1.0)
    dirty = np.where(mask, divergence, np.nan)
    np.testing.assert_array_equal(full_vocab_reward_to_go(dirty, mask, gamma=1.0), clean)
    grad = jax.grad(lambda d: jnp.sum(full_vocab_reward_to_go(d, mask, gamma=1.0)))(jnp.asarray(divergence))
    np.testing.assert_array_equal(grad, 0.0)
    # float32 stays float32; {0, 1} float masks work like bool ones
    got32 = full_vocab_reward_to_go(jnp.asarray(divergence, jnp.float32), mask.astype(np.float32), gamma=1.0)
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(got32, clean, rtol=1e-6)


def test_reward_to_go_rejects_bad_input():
    divergence, mask = _rtg_inputs(np.random.default_rng(2))
    for gamma in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
            full_vocab_reward_to_go(divergence, mask, gamma=gamma)
    with pytest.raises(ValueError, match=r"per_token_divergence_BxT \[4, 7\], mask_BxT \[4, 6\]"):
        full_vocab_reward_to_go(divergence, mask[:, :6], gamma=1.0)
    with pytest.raises(ValueError, match="per_token_divergence_BxT must have a floating-point dtype"):
        full_vocab_reward_to_go(divergence.astype(np.int32), mask, gamma=1.0)
    with pytest.raises(ValueError, match=r"mask_BxT must hold only 0 and 1"):
        full_vocab_reward_to_go(divergence, np.where(mask, 1.0, 0.5), gamma=1.0)
