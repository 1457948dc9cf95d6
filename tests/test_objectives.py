"""Losses: the policy-gradient surrogates and the full-vocabulary divergence.

Every numerical claim is compared with an independent numpy (float64) computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from opd_jax import divergences
from opd_jax.objectives import (
    clipped_token_mask,
    full_vocab_divergence,
    importance_surrogate,
    pg_surrogate,
)

jax.config.update("jax_enable_x64", True)  # also done by conftest.py; harmless twice

B, T = 3, 7


def _mask(rng, batch=B, length=T):
    """Response masks: row 0 full, row 1 of length 1, the others of random length ≥ 1."""
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length
    if batch > 1:
        lengths[1] = 1
    mask = np.arange(length)[None, :] < lengths[:, None]
    return mask


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------------------------------
# pg_surrogate
# ---------------------------------------------------------------------------------------------


def test_pg_surrogate_matches_numpy(rng):
    logp = -rng.exponential(size=(B, T))
    advantages = rng.normal(size=(B, T))
    mask = _mask(rng)
    expected = -(mask * advantages * logp).sum(-1)
    got = pg_surrogate(jnp.asarray(logp), jnp.asarray(advantages), jnp.asarray(mask))
    assert got.shape == (B,) and got.dtype == jnp.float64
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-15)
    # mask given as {0, 1} floats gives the same
    np.testing.assert_allclose(pg_surrogate(logp, advantages, mask.astype(np.float32)), expected, rtol=1e-13)


def test_pg_surrogate_broadcasts_sequence_advantages(rng):
    logp = -rng.exponential(size=(B, T))
    advantages = rng.normal(size=(B,))
    mask = _mask(rng)
    expected = -(mask * advantages[:, None] * logp).sum(-1)
    np.testing.assert_allclose(pg_surrogate(logp, advantages, mask), expected, rtol=1e-13)
    grad = jax.grad(lambda lp: pg_surrogate(lp, advantages, mask).sum())(jnp.asarray(logp))
    np.testing.assert_array_equal(grad, np.where(mask, -advantages[:, None], 0.0))


@pytest.mark.parametrize("advantages_shape", ["token", "sequence"])
def test_pg_surrogate_gradient_is_minus_mask_times_advantage(rng, advantages_shape):
    logp = -rng.exponential(size=(B, T))
    mask = _mask(rng)
    advantages = rng.normal(size=(B, T) if advantages_shape == "token" else (B,))
    weights = rng.normal(size=B)  # a non-trivial reduction of the per-row losses
    grad_logp, grad_adv = jax.grad(
        lambda lp, a: jnp.sum(weights * pg_surrogate(lp, a, mask)), argnums=(0, 1)
    )(jnp.asarray(logp), jnp.asarray(advantages))
    full = advantages if advantages.ndim == 2 else advantages[:, None]
    np.testing.assert_allclose(grad_logp, np.where(mask, -full * weights[:, None], 0.0), rtol=1e-14, atol=0)
    np.testing.assert_array_equal(grad_adv, np.zeros_like(advantages))  # advantages are constants


@pytest.mark.parametrize("fill", [-np.inf, np.nan])
def test_pg_surrogate_ignores_garbage_at_masked_positions(rng, fill):
    logp = -rng.exponential(size=(B, T))
    advantages = rng.normal(size=(B, T))
    mask = _mask(rng)
    assert not mask.all()
    expected = -(mask * advantages * logp).sum(-1)
    dirty_logp = np.where(mask, logp, fill)
    dirty_advantages = np.where(mask, advantages, np.nan)
    loss, grad = jax.value_and_grad(lambda lp: pg_surrogate(lp, dirty_advantages, mask).sum())(jnp.asarray(dirty_logp))
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, expected.sum(), rtol=1e-13)
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
    np.testing.assert_allclose(np.asarray(grad)[mask], -advantages[mask], rtol=1e-14)


def test_pg_surrogate_keeps_the_dtype_of_the_log_probs(rng):
    logp = jnp.asarray(-rng.exponential(size=(B, T)), jnp.float32)
    out = pg_surrogate(logp, jnp.asarray(rng.normal(size=(B, T))), _mask(rng))
    assert out.dtype == jnp.float32


def test_pg_surrogate_rejects_sequence_advantages_of_the_wrong_length(rng):
    logp = -rng.exponential(size=(B, T))
    with pytest.raises(ValueError, match=r"\[4\]"):
        pg_surrogate(logp, np.ones(B + 1), _mask(rng))
    with pytest.raises(ValueError):
        pg_surrogate(logp, np.ones((B, T + 1)), _mask(rng))
    with pytest.raises(ValueError):
        pg_surrogate(logp, np.ones((B, T)), np.ones((B, T + 1), bool))


# ---------------------------------------------------------------------------------------------
# importance_surrogate / clipped_token_mask
# ---------------------------------------------------------------------------------------------


def _np_ppo(logp, behavior, advantages, mask, low, high):
    """Value [B] and gradient wrt logp [B, T] of −Σ m·min(r A, clip(r, 1−ε, 1+ε_h) A), in numpy."""
    ratio = np.exp(logp - behavior)
    unclipped = ratio * advantages
    clipped = np.clip(ratio, 1 - low, 1 + high) * advantages
    value = -(mask * np.minimum(unclipped, clipped)).sum(-1)
    # d/d logp of min(...): r A where the unclipped term is the minimum (ties included: there the
    # clipped term equals r A too, with the same derivative), else the constant clipped term: 0.
    unclipped_active = unclipped <= clipped
    grad = -np.where(mask & unclipped_active, unclipped, 0.0)
    return value, grad


@pytest.mark.parametrize("clip_epsilon_high", [None, 0.28])
def test_importance_surrogate_on_the_rollout_policy_is_the_policy_gradient(rng, clip_epsilon_high):
    logp = jnp.asarray(-rng.exponential(size=(B, T)))
    advantages = jnp.asarray(rng.normal(size=(B, T)))
    mask = _mask(rng)
    kwargs = dict(clip_epsilon=0.2, clip_epsilon_high=clip_epsilon_high)
    value = importance_surrogate(logp, logp, advantages, mask, **kwargs)
    # r = 1: the value is −Σ m A (the policy-gradient surrogate −Σ m A log π differs by a constant
    # of the parameters only), and the gradient is the policy gradient's
    np.testing.assert_allclose(value, -(mask * advantages).sum(-1), rtol=1e-13)
    grad = jax.grad(lambda lp: importance_surrogate(lp, logp, advantages, mask, **kwargs).sum())(logp)
    grad_pg = jax.grad(lambda lp: pg_surrogate(lp, advantages, mask).sum())(logp)
    np.testing.assert_allclose(grad, grad_pg, rtol=1e-14, atol=0)
    # nothing is clipped there
    assert not clipped_token_mask(logp, logp, advantages, mask, **kwargs).any()
    # sequence advantages [B] behave as their broadcast
    seq = advantages[:, 0]
    np.testing.assert_allclose(
        importance_surrogate(logp, logp, seq, mask, **kwargs),
        importance_surrogate(logp, logp, jnp.broadcast_to(seq[:, None], (B, T)), mask, **kwargs),
        rtol=1e-14,
    )


@pytest.mark.parametrize("clip_epsilon,clip_epsilon_high", [(0.2, None), (0.2, 0.28), (0.1, 0.5)])
def test_importance_surrogate_matches_numpy_ppo(rng, clip_epsilon, clip_epsilon_high):
    batch, length = 8, 16
    mask = _mask(rng, batch, length)
    behavior = -rng.exponential(size=(batch, length))
    logp = behavior + rng.normal(scale=0.4, size=(batch, length))  # ratios from ~0.3 to ~3
    advantages = rng.normal(size=(batch, length))
    high = clip_epsilon if clip_epsilon_high is None else clip_epsilon_high
    kwargs = dict(clip_epsilon=clip_epsilon, clip_epsilon_high=clip_epsilon_high)
    expected_value, expected_grad = _np_ppo(logp, behavior, advantages, mask, clip_epsilon, high)

    value, grad = jax.value_and_grad(
        lambda lp: importance_surrogate(lp, behavior, advantages, mask, **kwargs).sum()
    )(jnp.asarray(logp))
    np.testing.assert_allclose(
        importance_surrogate(logp, behavior, advantages, mask, **kwargs), expected_value, rtol=1e-13
    )
    np.testing.assert_allclose(value, expected_value.sum(), rtol=1e-13)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-13, atol=1e-15)
    # the behavior log-probs are constants
    grad_behavior = jax.grad(
        lambda b: importance_surrogate(jnp.asarray(logp), b, advantages, mask, **kwargs).sum()
    )(jnp.asarray(behavior))
    np.testing.assert_array_equal(grad_behavior, 0.0)

    clipped = np.asarray(clipped_token_mask(logp, behavior, advantages, mask, **kwargs))
    assert clipped.dtype == bool and clipped.shape == (batch, length)
    zero_gradient = mask & (expected_grad == 0.0)
    np.testing.assert_array_equal(clipped, zero_gradient)
    assert 0 < clipped.sum() < mask.sum()  # the case exercises both regimes


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2])
def test_bad_clip_epsilon_is_rejected(rng, bad):
    logp = -rng.exponential(size=(B, T))
    args = (logp, logp, rng.normal(size=(B, T)), _mask(rng))
    with pytest.raises(ValueError, match="clip_epsilon"):
        importance_surrogate(*args, clip_epsilon=bad)
    with pytest.raises(ValueError, match="clip_epsilon"):
        clipped_token_mask(*args, clip_epsilon=bad)


@pytest.mark.parametrize("bad", [0.0, -0.1])
def test_bad_clip_epsilon_high_is_rejected(rng, bad):
    logp = -rng.exponential(size=(B, T))
    with pytest.raises(ValueError, match="clip_epsilon_high"):
        importance_surrogate(logp, logp, rng.normal(size=(B, T)), _mask(rng), clip_epsilon_high=bad)


def test_importance_surrogate_ignores_garbage_at_masked_positions(rng):
    mask = _mask(rng)
    behavior = -rng.exponential(size=(B, T))
    logp = behavior + rng.normal(scale=0.3, size=(B, T))
    advantages = rng.normal(size=(B, T))
    expected_value, expected_grad = _np_ppo(logp, behavior, advantages, mask, 0.2, 0.2)
    dirty = [np.where(mask, x, fill) for x, fill in ((logp, -np.inf), (behavior, np.nan), (advantages, np.nan))]
    value, grad = jax.value_and_grad(lambda lp: importance_surrogate(lp, *dirty[1:], mask).sum())(jnp.asarray(dirty[0]))
    np.testing.assert_allclose(value, expected_value.sum(), rtol=1e-13)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Dual-clip PPO (clip_ratio_c)
# ---------------------------------------------------------------------------------------------


def _np_dual_clip_ppo(logp, behavior, advantages, mask, low, high, c):
    """Value [B] and gradient wrt logp [B, T] of verl's dual-clip loss, in numpy, in loss space:
    loss = max(−A r, −A clip(r, 1−ε, 1+ε_h)), then min(loss, −A c) where A < 0."""
    ratio = np.exp(logp - behavior)
    unclipped = -advantages * ratio
    clipped = -advantages * np.clip(ratio, 1 - low, 1 + high)
    single = np.maximum(unclipped, clipped)
    capped = (advantages < 0) & (-advantages * c < single)
    loss = np.where(capped, -advantages * c, single)
    value = (mask * loss).sum(-1)
    # The unclipped term carries the gradient −A r where it is the max (ties: inside the clip
    # range both terms are −A r) and the dual clip does not cap it; elsewhere the loss is constant.
    grad = np.where(mask & (unclipped >= clipped) & ~capped, unclipped, 0.0)
    return value, grad


def _dual_clip_case(rng, batch=16, length=16):
    mask = _mask(rng, batch, length)
    behavior = -rng.exponential(size=(batch, length))
    logp = behavior + rng.normal(scale=1.0, size=(batch, length))  # ratios from ~0.05 to ~20
    advantages = rng.normal(size=(batch, length))
    return logp, behavior, advantages, mask


@pytest.mark.parametrize("clip_ratio_c", [1.5, 2.5, 5.0])  # 1.5 < 1 + ε_high = 1.8 in one case
@pytest.mark.parametrize("clip_epsilon,clip_epsilon_high", [(0.2, None), (0.2, 0.28), (0.1, 0.8)])
def test_dual_clip_matches_numpy(rng, clip_ratio_c, clip_epsilon, clip_epsilon_high):
    logp, behavior, advantages, mask = _dual_clip_case(rng)
    high = clip_epsilon if clip_epsilon_high is None else clip_epsilon_high
    kwargs = dict(clip_epsilon=clip_epsilon, clip_epsilon_high=clip_epsilon_high, clip_ratio_c=clip_ratio_c)
    expected_value, expected_grad = _np_dual_clip_ppo(
        logp, behavior, advantages, mask, clip_epsilon, high, clip_ratio_c
    )
    ratio = np.exp(logp - behavior)
    capped = mask & (advantages < 0) & (ratio > clip_ratio_c)
    assert capped.any()  # the case exercises the dual clip

    value = importance_surrogate(logp, behavior, advantages, mask, **kwargs)
    np.testing.assert_allclose(value, expected_value, rtol=1e-13)
    grad = jax.grad(lambda lp: importance_surrogate(lp, behavior, advantages, mask, **kwargs).sum())(jnp.asarray(logp))
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(grad)[capped], 0.0)

    clipped = np.asarray(clipped_token_mask(logp, behavior, advantages, mask, **kwargs))
    np.testing.assert_array_equal(clipped, mask & (expected_grad == 0.0))
    assert (clipped & capped).sum() == capped.sum()
    # Without the dual clip the capped tokens have a gradient of −A r (they are not clipped).
    single_grad = jax.grad(
        lambda lp: importance_surrogate(
            lp, behavior, advantages, mask, clip_epsilon=clip_epsilon, clip_epsilon_high=clip_epsilon_high
        ).sum()
    )(jnp.asarray(logp))
    np.testing.assert_allclose(np.asarray(single_grad)[capped], (-advantages * ratio)[capped], rtol=1e-13)


def _old_importance_surrogate(student_logp, behavior_logp, advantages, mask, low, high):
    """The single-clip surrogate exactly as written before ``clip_ratio_c`` existed."""
    in_response = jnp.asarray(mask).astype(bool)
    log_ratio = jnp.where(in_response, student_logp - jax.lax.stop_gradient(behavior_logp), 0.0)
    ratio = jnp.exp(log_ratio)
    advantages = jnp.where(in_response, jnp.asarray(advantages), 0)
    objective = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - low, 1 + high) * advantages)
    return -jnp.sum(jnp.where(in_response, objective, 0), axis=-1)


@pytest.mark.parametrize("clip_epsilon_high", [None, 0.28])
def test_no_dual_clip_is_bitwise_the_single_clip(rng, clip_epsilon_high):
    logp, behavior, advantages, mask = (jnp.asarray(x) for x in _dual_clip_case(rng))
    high = 0.2 if clip_epsilon_high is None else clip_epsilon_high

    def loss(lp, **kwargs):
        return importance_surrogate(lp, behavior, advantages, mask, clip_epsilon_high=clip_epsilon_high, **kwargs)

    old_value, old_grad = jax.value_and_grad(
        lambda lp: _old_importance_surrogate(lp, behavior, advantages, mask, 0.2, high).sum()
    )(logp)
    old_clipped = clipped_token_mask(logp, behavior, advantages, mask, clip_epsilon_high=clip_epsilon_high)
    for kwargs in ({}, {"clip_ratio_c": None}):
        value, grad = jax.value_and_grad(lambda lp, kwargs=kwargs: loss(lp, **kwargs).sum())(logp)
        np.testing.assert_array_equal(value, old_value)
        np.testing.assert_array_equal(grad, old_grad)
        np.testing.assert_array_equal(loss(logp, **kwargs), _old_importance_surrogate(logp, behavior, advantages, mask, 0.2, high))
        np.testing.assert_array_equal(
            clipped_token_mask(logp, behavior, advantages, mask, clip_epsilon_high=clip_epsilon_high, **kwargs),
            old_clipped,
        )
    # A bound above every ratio caps nothing: the single clip again, to the bit.
    ratio_max = float(np.exp(np.asarray(logp - behavior)).max())
    large = {"clip_ratio_c": 2 * ratio_max}
    value, grad = jax.value_and_grad(lambda lp: loss(lp, **large).sum())(logp)
    np.testing.assert_array_equal(loss(logp, **large), loss(logp))
    np.testing.assert_array_equal(value, old_value)
    np.testing.assert_array_equal(grad, old_grad)
    np.testing.assert_array_equal(
        clipped_token_mask(logp, behavior, advantages, mask, clip_epsilon_high=clip_epsilon_high, **large), old_clipped
    )


def test_dual_clip_on_the_rollout_policy_is_the_policy_gradient(rng):
    logp = jnp.asarray(-rng.exponential(size=(B, T)))
    advantages = jnp.asarray(rng.normal(size=(B, T)))
    mask = _mask(rng)
    grad = jax.grad(lambda lp: importance_surrogate(lp, logp, advantages, mask, clip_ratio_c=1.01).sum())(logp)
    grad_pg = jax.grad(lambda lp: pg_surrogate(lp, advantages, mask).sum())(logp)
    np.testing.assert_allclose(grad, grad_pg, rtol=1e-14, atol=0)
    assert not clipped_token_mask(logp, logp, advantages, mask, clip_ratio_c=1.01).any()


@pytest.mark.parametrize("bad", [1.0, 0.5, 0.0, -3.0, float("inf"), float("nan")])
def test_bad_clip_ratio_c_is_rejected_naming_the_range(rng, bad):
    logp = -rng.exponential(size=(B, T))
    args = (logp, logp, rng.normal(size=(B, T)), _mask(rng))
    with pytest.raises(ValueError, match=r"clip_ratio_c must be None or lie in \(1, ∞\)"):
        importance_surrogate(*args, clip_ratio_c=bad)
    with pytest.raises(ValueError, match=r"clip_ratio_c must be None or lie in \(1, ∞\)"):
        clipped_token_mask(*args, clip_ratio_c=bad)


# ---------------------------------------------------------------------------------------------
# full_vocab_divergence
# ---------------------------------------------------------------------------------------------


def _np_generator(name, params):
    """f(u) as a numpy function of u, from the definitions (DESIGN.md §2)."""
    if name == "reverse_kl":
        return lambda u: -np.log(u)
    if name == "forward_kl":
        return lambda u: u * np.log(u)
    if name in ("js", "generalized_js"):
        b = params.get("beta", 0.5)
        return lambda u: b * u * np.log(u) - (b * u + 1 - b) * np.log(b * u + 1 - b)
    if name == "total_variation":
        return lambda u: 0.5 * np.abs(u - 1)
    if name == "squared_hellinger":
        return lambda u: (np.sqrt(u) - 1) ** 2
    if name == "pearson_chi2":
        return lambda u: (u - 1) ** 2
    if name == "neyman_chi2":
        return lambda u: (1 - u) ** 2 / u
    if name == "alpha":
        a = params["alpha"]
        return lambda u: (u**a - a * u - (1 - a)) / (a * (a - 1))
    raise AssertionError(name)


def _np_softmax(logits):
    logits = np.asarray(logits, np.float64)
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _np_full_vocab(student_logits, teacher_logits, mask, name, params):
    p, q = _np_softmax(student_logits), _np_softmax(teacher_logits)
    per_token = (p * _np_generator(name, params)(q / p)).sum(-1)
    return np.where(mask, per_token, 0.0)


GENERATORS = (
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("js", {}),
    ("generalized_js", {"beta": 0.2}),
    ("total_variation", {}),
    ("squared_hellinger", {}),
    ("pearson_chi2", {}),
    ("neyman_chi2", {}),
    ("alpha", {"alpha": -0.5}),
    ("alpha", {"alpha": 0.5}),
    ("alpha", {"alpha": 2.0}),
)
GEN_IDS = [name + "".join(f"({v})" for v in params.values()) for name, params in GENERATORS]


def _logits(rng, shape, scale=2.0):
    return rng.normal(scale=scale, size=shape)


@pytest.mark.parametrize("name,params", GENERATORS, ids=GEN_IDS)
def test_full_vocab_divergence_matches_numpy(rng, name, params):
    shape = (B, T, 11)
    student, teacher = _logits(rng, shape), _logits(rng, shape)
    mask = _mask(rng)
    divergence = divergences.get(name, **params)
    got = full_vocab_divergence(jnp.asarray(student), jnp.asarray(teacher), mask, divergence=divergence)
    assert got.shape == (B, T) and got.dtype == jnp.float64
    expected = _np_full_vocab(student, teacher, mask, name, params)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13)
    assert (expected[mask] > 0).all()
    if not params:  # by name as well
        by_name = full_vocab_divergence(student, teacher, mask, divergence=name)
        np.testing.assert_allclose(by_name, expected, rtol=1e-10, atol=1e-13)


def test_full_vocab_kl_closed_forms(rng):
    shape = (B, T, 9)
    student, teacher = _logits(rng, shape), _logits(rng, shape)
    mask = np.ones((B, T), bool)
    p, q = _np_softmax(student), _np_softmax(teacher)
    kl_q_p = (q * (np.log(q) - np.log(p))).sum(-1)
    kl_p_q = (p * (np.log(p) - np.log(q))).sum(-1)
    np.testing.assert_allclose(full_vocab_divergence(student, teacher, mask, divergence="forward_kl"), kl_q_p, rtol=1e-12)
    np.testing.assert_allclose(full_vocab_divergence(student, teacher, mask, divergence="reverse_kl"), kl_p_q, rtol=1e-12)
    # D_f(q‖q) = 0
    np.testing.assert_allclose(full_vocab_divergence(teacher, teacher, mask, divergence="js"), 0.0, atol=1e-15)


@pytest.mark.parametrize("name,params", [("js", {}), ("alpha", {"alpha": 2.0})])
def test_full_vocab_chunked_equals_unchunked(rng, name, params):
    batch, length, vocab = 3, 16, 13  # B·T = 48
    student = jnp.asarray(_logits(rng, (batch, length, vocab)))
    teacher = jnp.asarray(_logits(rng, (batch, length, vocab)))
    mask = _mask(rng, batch, length)
    weights = jnp.asarray(rng.normal(size=(batch, length)))
    divergence = divergences.get(name, **params)

    def loss(s, t, chunk_size):
        return jnp.sum(weights * full_vocab_divergence(s, t, mask, divergence=divergence, chunk_size=chunk_size))

    reference = full_vocab_divergence(student, teacher, mask, divergence=divergence)
    reference_grad = jax.grad(loss)(student, teacher, None)
    assert np.abs(reference_grad).max() > 0
    for chunk_size in (1, 7, 16, 100):  # 48 rows: dividing, not dividing, more than all rows
        got = full_vocab_divergence(student, teacher, mask, divergence=divergence, chunk_size=chunk_size)
        np.testing.assert_allclose(got, reference, rtol=1e-12, atol=1e-15, err_msg=str(chunk_size))
        grad_student, grad_teacher = jax.grad(loss, argnums=(0, 1))(student, teacher, chunk_size)
        np.testing.assert_allclose(grad_student, reference_grad, rtol=1e-12, atol=1e-15, err_msg=str(chunk_size))
        np.testing.assert_array_equal(grad_teacher, 0.0)  # the teacher is a constant


def test_full_vocab_is_zero_and_gradient_free_at_masked_positions(rng):
    shape = (B, T, 6)
    student, teacher = jnp.asarray(_logits(rng, shape)), jnp.asarray(_logits(rng, shape))
    mask = _mask(rng)
    assert not mask.all()
    for chunk_size in (None, 5):
        out, vjp = jax.vjp(
            lambda s: full_vocab_divergence(s, teacher, mask, divergence="pearson_chi2", chunk_size=chunk_size), student
        )
        np.testing.assert_array_equal(np.asarray(out)[~mask], 0.0)
        assert (np.asarray(out)[mask] > 0).all()
        (grad,) = vjp(jnp.ones((B, T)))
        np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
        assert (np.abs(np.asarray(grad)[mask]).sum(-1) > 0).all()


def test_full_vocab_bfloat16_logits_compute_in_float32(rng):
    shape = (B, T, 32)
    student = jnp.asarray(_logits(rng, shape), jnp.bfloat16)
    teacher = jnp.asarray(_logits(rng, shape), jnp.bfloat16)
    mask = _mask(rng)
    for chunk_size in (None, 4):
        out = full_vocab_divergence(student, teacher, mask, divergence="js", chunk_size=chunk_size)
        assert out.dtype == jnp.float32
        expected = _np_full_vocab(np.asarray(student, np.float64), np.asarray(teacher, np.float64), mask, "js", {})
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)
    grad = jax.grad(lambda s: full_vocab_divergence(s, teacher, mask, divergence="js").sum())(student)
    assert grad.dtype == jnp.bfloat16 and np.isfinite(np.asarray(grad, np.float32)).all()
    # float32 stays float32
    out32 = full_vocab_divergence(student.astype(jnp.float32), teacher.astype(jnp.float32), mask, divergence="js")
    assert out32.dtype == jnp.float32


@pytest.mark.parametrize(
    "name,chunk_size,order", [("js", None, 1), ("forward_kl", None, 2), ("neyman_chi2", 4, 2), ("js", 4, 1)]
)
def test_full_vocab_gradients_match_finite_differences(rng, name, chunk_size, order):
    shape = (2, 3, 5)
    student, teacher = jnp.asarray(_logits(rng, shape, 1.0)), jnp.asarray(_logits(rng, shape, 1.0))
    mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
    weights = jnp.asarray(rng.normal(size=(2, 3)))
    fn = jax.jit(lambda s: jnp.sum(weights * full_vocab_divergence(s, teacher, mask, divergence=name, chunk_size=chunk_size)))
    check_grads(fn, (student,), order=order, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Memory of the chunked computation
# ---------------------------------------------------------------------------------------------


def _temp_bytes(chunk_size, batch=4, length=256, vocab=4096):
    logits = jax.ShapeDtypeStruct((batch, length, vocab), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)
    grad = jax.jit(
        jax.grad(lambda s, t, m: full_vocab_divergence(s, t, m, divergence="js", chunk_size=chunk_size).sum())
    )
    analysis = grad.lower(logits, logits, mask).compile().memory_analysis()
    if analysis is None:
        pytest.skip("memory_analysis() is not available on this backend")
    return analysis.temp_size_in_bytes


def test_chunking_at_least_halves_the_temporaries_of_the_gradient():
    unchunked, chunked = _temp_bytes(None), _temp_bytes(64)
    print(f"temp_size_in_bytes: unchunked {unchunked}, chunk_size=64 {chunked}")
    assert chunked <= unchunked / 2


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_full_vocab_rejects_mismatched_logits_naming_both_shapes():
    with pytest.raises(ValueError) as info:
        full_vocab_divergence(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 4)), jnp.ones((2, 3)), divergence="js")
    assert "[2, 3, 5]" in str(info.value) and "[2, 3, 4]" in str(info.value)
    with pytest.raises(ValueError, match=r"\[6, 5\]"):
        full_vocab_divergence(jnp.zeros((6, 5)), jnp.zeros((6, 5)), jnp.ones((6,)), divergence="js")


def test_full_vocab_rejects_a_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"mask \[3, 2\]"):
        full_vocab_divergence(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 5)), jnp.ones((3, 2)), divergence="js")


@pytest.mark.parametrize("chunk_size", [0, -3])
def test_full_vocab_rejects_a_nonpositive_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        full_vocab_divergence(
            jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 5)), jnp.ones((2, 3)), divergence="js", chunk_size=chunk_size
        )


def test_full_vocab_rejects_an_unknown_divergence():
    with pytest.raises(ValueError, match="forward_kl"):  # the message lists the valid names
        full_vocab_divergence(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 5)), jnp.ones((2, 3)), divergence="kl")


# ---------------------------------------------------------------------------------------------
# Property test
# ---------------------------------------------------------------------------------------------

PROPERTY_GENERATORS = GENERATORS + (("generalized_js", {"beta": 0.9}), ("alpha", {"alpha": 3.0}))


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 5),
    vocab=st.integers(2, 9),
    chunk=st.integers(1, 16),
    dtype=st.sampled_from(["float32", "float64"]),
    generator=st.sampled_from(PROPERTY_GENERATORS),
    scale=st.floats(0.1, 3.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_full_vocab_properties(batch, length, vocab, chunk, dtype, generator, scale, seed):
    rng = np.random.default_rng(seed)
    name, params = generator
    divergence = divergences.get(name, **params)
    student = jnp.asarray(rng.normal(scale=scale, size=(batch, length, vocab)), dtype)
    teacher = jnp.asarray(rng.normal(scale=scale, size=(batch, length, vocab)), dtype)
    mask = rng.random((batch, length)) < 0.7

    unchunked = full_vocab_divergence(student, teacher, mask, divergence=divergence)
    chunked = full_vocab_divergence(student, teacher, mask, divergence=divergence, chunk_size=chunk)
    assert unchunked.shape == chunked.shape == (batch, length)
    assert unchunked.dtype == chunked.dtype == jnp.dtype(dtype)
    rtol, atol = (1e-12, 1e-14) if dtype == "float64" else (1e-5, 1e-6)
    np.testing.assert_allclose(chunked, unchunked, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(np.asarray(chunked)[~mask], 0.0)

    # D_f ≥ 0 (Jensen), up to rounding relative to the size of the terms summed
    p, q = _np_softmax(np.asarray(student, np.float64)), _np_softmax(np.asarray(teacher, np.float64))
    magnitude = (p * np.abs(_np_generator(name, params)(q / p))).sum(-1)
    eps = np.finfo(dtype).eps
    assert (np.asarray(unchunked) >= -(64 * eps * (1 + magnitude))).all()
    # and it matches the float64 reference to the precision of the dtype
    expected = _np_full_vocab(np.asarray(student, np.float64), np.asarray(teacher, np.float64), mask, name, params)
    np.testing.assert_allclose(unchunked, expected, rtol=1e-10 if dtype == "float64" else 2e-4, atol=1e-12 + 1e3 * eps * (1 + magnitude.max()))


# ---------------------------------------------------------------------------------------------
# Dtypes and mask values (issue 14)
# ---------------------------------------------------------------------------------------------


def test_integer_log_probs_and_logits_are_refused_naming_the_argument(rng):
    logp, mask = -rng.exponential(size=(B, T)), _mask(rng)
    ints = np.zeros((B, T), np.int32)
    with pytest.raises(ValueError, match="student_logp must have a floating-point dtype"):
        pg_surrogate(ints, np.ones((B, T)), mask)
    with pytest.raises(ValueError, match="behavior_logp must have a floating-point dtype"):
        importance_surrogate(logp, ints, np.ones((B, T)), mask)
    with pytest.raises(ValueError, match="student_logp must have a floating-point dtype"):
        clipped_token_mask(ints, logp, np.ones((B, T)), mask)
    with pytest.raises(ValueError, match="teacher_logits must have a floating-point dtype"):
        full_vocab_divergence(np.zeros((B, T, 4)), np.zeros((B, T, 4), np.int32), mask, divergence="js")


def test_non_binary_masks_are_refused(rng):
    logp = -rng.exponential(size=(B, T))
    mask = _mask(rng).astype(np.float32)
    mask[0, 0] = 0.5
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1.*0\.5"):
        pg_surrogate(logp, np.ones((B, T)), mask)
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1"):
        importance_surrogate(logp, logp, np.ones((B, T)), mask)
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1"):
        full_vocab_divergence(np.zeros((B, T, 4)), np.zeros((B, T, 4)), mask, divergence="js")
