"""ExOPD (G-OPD reward extrapolation) written through the advantage_fn plug point: what it follows,
by exact enumeration in float64."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import exact, token_advantages
from opd_jax.objectives import pg_surrogate

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "experiments"))
from exopd import exopd_advantage_fn  # noqa: E402


def _problem(seed, eos):
    space, student_table, teacher_logits = exact.random_tabular_problem(seed, 3, 3, eos_id=2 if eos else None)
    reference_table = 0.8 * jax.random.normal(jax.random.key(seed + 100), student_table.shape, jnp.float64)
    return space, student_table, teacher_logits, exact.tabular_logits(reference_table, space)


def _exopd_objective(table, teacher_logits, reference_logits, space, scale):
    """``J_λ = Σ_y π(y) Σ_n m_n [log π − λ log q − (1 − λ) log π_ref](y_n)``, through π(y) and log π."""
    mask = jnp.asarray(space.mask)
    logp = exact.sampled_log_probs(exact.tabular_logits(table, space), space.tokens)
    teacher = exact.sampled_log_probs(teacher_logits, space.tokens)
    reference = exact.sampled_log_probs(reference_logits, space.tokens)
    cost = jnp.where(mask, logp - scale * teacher - (1 - scale) * reference, 0.0)
    return jnp.sum(jnp.exp(exact.response_log_probs(logp, mask)) * jnp.sum(cost, axis=-1))


def _expected_gradient(table, teacher_logits, reference_logits, space, advantage_fn):
    """``Σ_y π(y) ∇ L(y)`` with π(y) held fixed, L the surrogate of the plugged-in advantages."""
    teacher = exact.sampled_log_probs(teacher_logits, space.tokens)
    reference = exact.sampled_log_probs(reference_logits, space.tokens)

    def loss_fn(logits, logp, mask):
        advantages = advantage_fn(jax.lax.stop_gradient(logp), teacher, mask, reference_logp_BxT=reference)
        return pg_surrogate(logp, advantages, mask)

    return exact.expected_gradient(lambda p: exact.tabular_logits(p, space), table, space, loss_fn)


@pytest.mark.parametrize("eos", [False, True])
@pytest.mark.parametrize("scale", [0.5, 1.0, 1.5, 2.0])
def test_exopd_with_reward_to_go_follows_the_extrapolated_objective_exactly(scale, eos):
    for seed in range(3):
        space, table, teacher_logits, reference_logits = _problem(seed, eos)
        exact_gradient = jax.grad(_exopd_objective)(table, teacher_logits, reference_logits, space, scale)
        estimate = _expected_gradient(table, teacher_logits, reference_logits, space,
                                      exopd_advantage_fn(scale, gamma=1.0))
        relative, _ = exact.compare_gradients(estimate, exact_gradient)
        assert relative <= 1e-10


def test_the_per_token_form_is_biased_for_it_and_the_bias_is_measured():
    space, table, teacher_logits, reference_logits = _problem(0, eos=True)
    exact_gradient = jax.grad(_exopd_objective)(table, teacher_logits, reference_logits, space, 1.5)
    estimate = _expected_gradient(table, teacher_logits, reference_logits, space, exopd_advantage_fn(1.5, gamma=0.0))
    relative, cosine = exact.compare_gradients(estimate, exact_gradient)
    print(f"ExOPD per-token (gamma 0), scale 1.5: rel. error {relative:.3f}, cosine {cosine:.3f}")
    assert relative > 0.05


def test_at_scale_one_it_is_reverse_kl_stop_gradient_opd():
    space, table, teacher_logits, reference_logits = _problem(1, eos=True)
    mask = jnp.asarray(space.mask)
    logp = exact.sampled_log_probs(exact.tabular_logits(table, space), space.tokens)
    teacher = exact.sampled_log_probs(teacher_logits, space.tokens)
    reference = exact.sampled_log_probs(reference_logits, space.tokens)
    for gamma in (0.0, 0.5, 1.0):
        ours = exopd_advantage_fn(1.0, gamma)(logp, teacher, mask, reference_logp_BxT=reference)
        builtin = token_advantages(logp, teacher, mask, divergence="reverse_kl", estimator="stop_grad", gamma=gamma)
        np.testing.assert_allclose(ours, builtin, rtol=1e-12, atol=1e-12)
