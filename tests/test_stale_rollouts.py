"""One-step-stale (pipelined) rollouts: the exact float64 bias of each estimator of ∇J(θ) when the
responses come from π_old, by enumeration (experiments/stale_bias.py; numbers in docs/overlap.md).

* the full sequence ratio π_θ(y)/π_old(y) with advantages at θ is unbiased at every staleness;
* at zero staleness every estimator is the library's on-policy OPD+ estimator;
* the loop's estimator (per-token ratio, advantages from π_old), the uncorrected one and the
  per-token ratio with fresh advantages are biased at first order in the staleness;
* which of "no correction" and "the loop's per-token ratio" is closer depends on the divergence:
  the ratio helps for reverse KL and hurts for forward KL; for forward KL at sequence level the
  uncorrected estimator is exact, because its advantage U = q(y)/π_old(y) is itself an importance weight.
"""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import exact

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "experiments"))
import stale_bias  # noqa: E402

EPSILONS = (0.0, 1e-3, 1e-2, 1e-1)
ETAS = (0.1,)
SEEDS = (0, 1, 2)
BIASED = ("no_correction", "token_ratio", "token_ratio_clip", "token_ratio_fresh_A")
# (divergence, level, eos)
CASES = (
    ("reverse_kl", "token", False),
    ("reverse_kl", "sequence", True),
    ("forward_kl", "token", False),
    ("forward_kl", "token", True),
    ("forward_kl", "sequence", True),
    ("js", "token", True),
    ("js", "sequence", False),
    ("squared_hellinger", "token", True),
    ("alpha", "sequence", True),
)
CASE_IDS = [f"{d}-{level}-{'eos' if eos else 'noeos'}" for d, level, eos in CASES]
PARAMS = {"alpha": {"alpha": 0.5}}


@functools.cache
def _measured(divergence, level, eos):
    return stale_bias.measure(divergence, PARAMS.get(divergence, {}), level=level, eos=eos, seeds=SEEDS,
                              epsilons=EPSILONS, etas=ETAS)


def _exact_for_free(divergence, level, estimator):
    """The uncorrected estimator is exact for forward KL at sequence level (A = U = q(y)/π_old(y))."""
    return divergence == "forward_kl" and level == "sequence" and estimator == "no_correction"


@pytest.mark.parametrize("divergence, level, eos", CASES, ids=CASE_IDS)
def test_the_sequence_ratio_is_unbiased_at_every_staleness(divergence, level, eos):
    result = _measured(divergence, level, eos)
    assert np.max(result["sequence_ratio"]["error"]) <= 1e-10
    assert np.max(result["sequence_ratio"]["step_error"]) <= 1e-10


@pytest.mark.parametrize("divergence, level, eos", CASES, ids=CASE_IDS)
def test_stale_estimators_are_biased_at_first_order(divergence, level, eos):
    result = _measured(divergence, level, eos)
    positive = [EPSILONS.index(e) for e in EPSILONS if e > 0]
    for estimator in BIASED:
        errors = result[estimator]["error"][:, positive]
        if _exact_for_free(divergence, level, estimator):
            assert np.max(errors) <= 1e-10
            continue
        assert np.min(errors) > 1e-5, estimator  # ≥ ~1e-4·ε/1e-3 measured; rounding is ~1e-15
        assert np.all(np.diff(errors, axis=-1) > 0), estimator  # shrinks with ε
        slopes = stale_bias.fitted_slope([EPSILONS[i] for i in positive], errors)
        # First order: the measured slopes are 0.99–1.01 on every case here.
        assert np.all((slopes > 0.9) & (slopes < 1.1)), (estimator, slopes)
        assert np.min(result[estimator]["step_error"]) > 1e-4, estimator


@pytest.mark.parametrize("divergence, level, eos", CASES, ids=CASE_IDS)
def test_the_clip_is_inactive_at_small_staleness(divergence, level, eos):
    """Below ε = 0.1 (|log ρ| ≤ 0.054) no token is clipped and the clipped surrogate is the unclipped one."""
    result = _measured(divergence, level, eos)
    assert np.max(result["clipped_fraction"]) == 0
    clipped, unclipped = result["token_ratio_clip"]["gradient"], result["token_ratio"]["gradient"]
    assert np.max(np.abs(clipped - unclipped)) <= 1e-12 * np.max(np.abs(unclipped))


@pytest.mark.parametrize("divergence, level, eos", CASES, ids=CASE_IDS)
def test_which_of_no_correction_and_the_loop_is_closer_depends_on_the_divergence(divergence, level, eos):
    result = _measured(divergence, level, eos)
    positive = slice(1, None)
    loop, uncorrected = result["token_ratio"]["error"][:, positive], result["no_correction"]["error"][:, positive]
    if divergence == "reverse_kl":
        assert np.all(loop < uncorrected)
    elif divergence == "forward_kl":
        assert np.all(loop > uncorrected)
    # js, squared Hellinger, alpha: the loop is closer on these cases at token level, but not on
    # every case measured (sequence-level JS with EOS has it the other way), so nothing is asserted.


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("eos", [False, True])
def test_zero_staleness_is_the_on_policy_estimator(level, eos):
    space, table, teacher_logits = exact.random_tabular_problem(3, 3, 3, 2 if eos else None)
    logits_fn = functools.partial(exact.tabular_logits, space=space)
    teacher_logp = exact.sampled_log_probs(teacher_logits, space.tokens)
    for divergence in ("forward_kl", "js"):
        on_policy = exact.estimator_gradient(logits_fn, table, teacher_logits, space, divergence=divergence,
                                             level=level, estimator="opd_plus", gamma=1.0)
        scale = float(jnp.max(jnp.abs(on_policy)))
        for estimator in stale_bias.ESTIMATORS:
            loss_fn = stale_bias.estimator_loss(estimator, teacher_logp, divergence=divergence, level=level)
            stale = exact.off_policy_expected_gradient(logits_fn, table, table, space, loss_fn)
            assert float(jnp.max(jnp.abs(stale - on_policy))) <= 1e-12 * scale, (divergence, estimator)


def test_one_step_responses_isolate_the_stale_advantage():
    """T = 1: the per-token ratio is the sequence ratio, so with fresh advantages it is exact and the
    loop's remaining bias is that of A_old alone; forward KL's A = q/π_old corrects itself. (At T = 1
    token- and sequence-level OPD+ coincide.)"""
    space, table, _ = exact.random_tabular_problem(0, 4, 1)
    _, _, teacher_logits = exact.random_tabular_problem(1, 4, 1)
    direction = jax.random.normal(jax.random.key(5), table.shape, jnp.float64)
    behaviour = table - 0.3 * direction / jnp.linalg.norm(direction)
    for divergence in ("reverse_kl", "forward_kl", "js"):
        target, estimates, _, _ = stale_bias.gradients(table, behaviour, teacher_logits, space,
                                                       divergence=exact.divergences_lib.get(divergence), level="token")
        error = {name: exact.compare_gradients(g, target)[0] for name, g in estimates.items()}
        assert error["token_ratio_fresh_A"] <= 1e-10 and error["sequence_ratio"] <= 1e-10
        assert error["token_ratio"] > 1e-3
        if divergence == "forward_kl":
            assert error["no_correction"] <= 1e-10
        else:
            assert error["no_correction"] > 1e-3
