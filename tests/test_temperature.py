"""The rollout temperature is the behaviour policy: what the loop's estimator follows at T ≠ 1,
by exact enumeration in float64 (see opd_jax.config.TrainConfig on the semantics)."""

import jax
import jax.numpy as jnp
import pytest

from opd_jax import exact, token_advantages
from opd_jax.objectives import importance_surrogate


def _expected_loop_gradient(table, teacher_logits, space, *, divergence, sample_temperature, score_temperature):
    """``Σ_y π_Ts(y) ∇ L(y)``: responses drawn at ``sample_temperature``, every log-prob of the loss
    (behaviour, current, teacher) taken at ``score_temperature``, as the loop's prepare / update do."""
    mask = jnp.asarray(space.mask)
    teacher = exact.sampled_log_probs(teacher_logits / score_temperature, space.tokens)
    behaviour = exact.sampled_log_probs(exact.tabular_logits(table, space) / score_temperature, space.tokens)
    advantages = token_advantages(behaviour, teacher, mask, divergence=divergence, estimator="opd_plus", gamma=1.0)

    def loss_fn(logits, logp, mask):
        # expected_gradient weights by π(y) of the logits it is given (the sampling policy, at
        # sample_temperature); the loss rescores the same logits at score_temperature.
        scored = jax.nn.log_softmax(logits * sample_temperature / score_temperature, axis=-1)
        scored_logp = jnp.take_along_axis(scored, jnp.asarray(space.tokens)[..., None], axis=-1)[..., 0]
        return importance_surrogate(scored_logp, behaviour, advantages, mask, clip_epsilon=0.2)

    return exact.expected_gradient(lambda p: exact.tabular_logits(p, space) / sample_temperature, table, space,
                                   loss_fn)


def _tempered_objective_gradient(table, teacher_logits, space, divergence, temperature):
    return jax.grad(lambda p: exact.objective(exact.tabular_logits(p, space) / temperature,
                                              teacher_logits / temperature, space, divergence=divergence,
                                              level="token"))(table)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js", "squared_hellinger"])
@pytest.mark.parametrize("temperature", [0.6, 1.5, 4.0])
def test_the_loop_follows_the_tempered_objective_exactly(divergence, temperature):
    for seed in range(2):
        space, table, teacher_logits = exact.random_tabular_problem(seed, 3, 3, eos_id=2)
        estimate = _expected_loop_gradient(table, teacher_logits, space, divergence=divergence,
                                           sample_temperature=temperature, score_temperature=temperature)
        target = _tempered_objective_gradient(table, teacher_logits, space, divergence, temperature)
        relative, _ = exact.compare_gradients(estimate, target)
        assert relative <= 1e-10


@pytest.mark.parametrize("temperature", [0.6, 4.0])
def test_scoring_at_one_what_was_sampled_at_t_is_biased_for_both_objectives(temperature):
    """0.1's loop: sampled at T, scored at 1. It follows neither the T = 1 nor the tempered objective."""
    space, table, teacher_logits = exact.random_tabular_problem(0, 3, 3, eos_id=2)
    estimate = _expected_loop_gradient(table, teacher_logits, space, divergence="js",
                                       sample_temperature=temperature, score_temperature=1.0)
    for target_temperature in (1.0, temperature):
        target = _tempered_objective_gradient(table, teacher_logits, space, "js", target_temperature)
        relative, cosine = exact.compare_gradients(estimate, target)
        print(f"sampled at T={temperature}, scored at 1, vs objective at T={target_temperature}: "
              f"rel. error {relative:.3f}, cosine {cosine:.3f}")
        assert relative > 0.05
