"""Top-k teacher distillation (opd_jax.topk), checked exactly by enumeration in float64.

* top-k OPD+ with ``gamma = 1`` is unbiased for the bucketed objective ``J̃_tok``, for every
  generator, ``k ∈ {1, 2, V − 1, V}``, with and without EOS (≤ 1e-10);
* at ``k ≥ V − 1`` (a tail of at most one token) everything equals the full-vocabulary quantities;
* at ``k ≤ V − 2`` it is measurably biased for the full ``J_tok``, and so are the peer shortcuts
  that give tail tokens no reward or skip them (biased for ``J̃_tok`` too);
* ``topk_divergence`` is below ``full_vocab_divergence`` (data processing) and matches a numpy
  reference, as do the top-k structure, the bucket ratios and the advantages;
* bad inputs raise errors naming the argument; empty or underflowing tails give no NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fdiv_reference import np_closed_form
from jax.test_util import check_grads

from opd_jax import divergences, exact
from opd_jax.advantages import token_advantages
from opd_jax.objectives import full_vocab_divergence, pg_surrogate
from opd_jax.topk import (
    TeacherTopK,
    bucket_log_probs,
    sampled_in_topk,
    teacher_topk,
    teacher_topk_from_hidden,
    teacher_topk_from_log_probs,
    topk_divergence,
    topk_log_ratio,
    topk_token_advantages,
)

jax.config.update("jax_enable_x64", True)  # also done by conftest.py

GENERATORS = (
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("js", {}),
    ("generalized_js", {"beta": 0.1}),
    ("total_variation", {}),
    ("squared_hellinger", {}),
    ("pearson_chi2", {}),
    ("neyman_chi2", {}),
    ("alpha", {"alpha": -1.5}),
    ("alpha", {"alpha": 0.5}),
    ("alpha", {"alpha": 2.0}),
)
GEN_IDS = [name + "".join(f"({v})" for v in params.values()) for name, params in GENERATORS]

VOCAB, HORIZON = 4, 3
KS = (1, 2, VOCAB - 1, VOCAB)


@functools.cache
def _problem(eos: bool, seed: int):
    """``(space, student table, teacher logits, logits_fn)``; EOS is token ``V − 1``."""
    space = exact.enumerate_responses(VOCAB, HORIZON, VOCAB - 1 if eos else None)
    rng = np.random.default_rng([seed, int(eos)])
    table = jnp.asarray(rng.normal(size=(space.num_states, VOCAB)))
    teacher = jnp.asarray(1.5 * rng.normal(size=(space.num_states, VOCAB)))[space.state_index]
    return space, table, teacher, functools.partial(exact.tabular_logits, space=space)


def _relative_error(estimate, target):
    return exact.compare_gradients(estimate, target)[0]


# ---------------------------------------------------------------------------------------------
# (a) unbiased for the bucketed objective
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eos", [False, True], ids=["no_eos", "eos"])
@pytest.mark.parametrize("index", range(len(GENERATORS)), ids=GEN_IDS)
def test_topk_opd_plus_is_unbiased_for_the_bucketed_objective(index, eos):
    name, params = GENERATORS[index]
    divergence = divergences.get(name, **params)
    space, table, teacher, logits_fn = _problem(eos, seed=index)
    for k in KS:
        kwargs = dict(divergence=divergence, k=k)
        target = exact.topk_objective_gradient(logits_fn, table, teacher, space, **kwargs)
        estimate = exact.topk_estimator_gradient(
            logits_fn, table, teacher, space, estimator="opd_plus", gamma=1.0, **kwargs
        )
        assert _relative_error(estimate, target) <= 1e-10, (name, k, eos)
        # J̃_tok from sampled bucket ratios equals the response average of the bucketed divergence.
        by_tokens = exact.topk_objective(logits_fn(table), teacher, space, **kwargs)
        by_buckets = exact.topk_objective(logits_fn(table), teacher, space, level="topk_divergence", **kwargs)
        np.testing.assert_allclose(by_tokens, by_buckets, rtol=1e-12)


def test_topk_stop_grad_is_unbiased_for_reverse_kl_only():
    space, table, teacher, logits_fn = _problem(True, seed=0)
    for name, expected_unbiased in (("reverse_kl", True), ("forward_kl", False), ("js", False)):
        target = exact.topk_objective_gradient(logits_fn, table, teacher, space, divergence=name, k=2)
        estimate = exact.topk_estimator_gradient(
            logits_fn, table, teacher, space, divergence=name, k=2, estimator="stop_grad", gamma=1.0
        )
        error = _relative_error(estimate, target)
        assert (error <= 1e-10) == expected_unbiased, (name, error)


def test_topk_per_token_forms_are_biased_beyond_one_step():
    """``gamma = 0`` OPD+ and the direct ``topk_divergence`` gradient are the per-state gradient:
    biased for ``J̃_tok`` at T > 1, exact at T = 1."""
    one_step = exact.enumerate_responses(VOCAB, 1, None)
    rng = np.random.default_rng(1)
    one_step_problem = (
        one_step,
        jnp.asarray(rng.normal(size=(one_step.num_states, VOCAB))),
        jnp.asarray(1.5 * rng.normal(size=(one_step.num_states, VOCAB)))[one_step.state_index],
        functools.partial(exact.tabular_logits, space=one_step),
    )
    for (space, table, teacher, logits_fn), biased in ((one_step_problem, False), (_problem(False, 0), True)):
        target = exact.topk_objective_gradient(logits_fn, table, teacher, space, divergence="js", k=2)
        for estimator, gamma in (("opd_plus", 0.0), ("topk_divergence", 0.0)):
            estimate = exact.topk_estimator_gradient(
                logits_fn, table, teacher, space, divergence="js", k=2, estimator=estimator, gamma=gamma
            )
            error = _relative_error(estimate, target)
            assert (error > 1e-3) if biased else (error <= 1e-10), (space.horizon, estimator, error)


# ---------------------------------------------------------------------------------------------
# (b) k ≥ V − 1: the full objective and the full estimators
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eos", [False, True], ids=["no_eos", "eos"])
@pytest.mark.parametrize("name,params", [("forward_kl", {}), ("js", {}), ("alpha", {"alpha": -1.5})])
def test_topk_equals_the_full_quantities_when_the_tail_has_at_most_one_token(name, params, eos):
    divergence = divergences.get(name, **params)
    space, table, teacher, logits_fn = _problem(eos, seed=7)
    full_objective = exact.objective(logits_fn(table), teacher, space, divergence=divergence, level="token")
    full_gradient = exact.objective_gradient(logits_fn, table, teacher, space, divergence=divergence, level="token")
    full_estimators = {
        (estimator, gamma): exact.estimator_gradient(
            logits_fn, table, teacher, space, divergence=divergence, level="token",
            estimator=estimator, gamma=gamma,
        )
        for estimator, gamma in (("opd_plus", 1.0), ("stop_grad", 0.0), ("full_vocab", 0.0))
    }
    for k in (VOCAB - 1, VOCAB):
        kwargs = dict(divergence=divergence, k=k)
        np.testing.assert_allclose(
            exact.topk_objective(logits_fn(table), teacher, space, **kwargs), full_objective, rtol=1e-12
        )
        gradient = exact.topk_objective_gradient(logits_fn, table, teacher, space, **kwargs)
        assert _relative_error(gradient, full_gradient) <= 1e-12
        for (estimator, gamma), full in full_estimators.items():
            topk_estimator = "topk_divergence" if estimator == "full_vocab" else estimator
            estimate = exact.topk_estimator_gradient(
                logits_fn, table, teacher, space, estimator=topk_estimator, gamma=gamma, **kwargs
            )
            assert _relative_error(estimate, full) <= 1e-12, (k, estimator, gamma)


def test_at_k_equal_v_every_ratio_is_the_full_ratio_and_the_tail_is_empty():
    space, table, teacher, logits_fn = _problem(True, seed=3)
    topk = teacher_topk(teacher, VOCAB)
    assert not np.any(topk.tail_mask_BxT) and np.all(topk.tail_logp_BxT == 0)
    student_logits = logits_fn(table)
    student_logp = exact.sampled_log_probs(student_logits, space.tokens)
    _, student_tail, student_tail_mask = bucket_log_probs(student_logits, topk.token_ids_BxTxK)
    assert not np.any(student_tail_mask)
    ratio = topk_log_ratio(space.tokens, student_logp, student_tail, topk, space.mask)
    full_ratio = exact.sampled_log_probs(teacher, space.tokens) - student_logp
    np.testing.assert_allclose(ratio, np.where(space.mask, full_ratio, 0), rtol=1e-13, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# (c) measured bias against the full objective, and the peer shortcuts
# ---------------------------------------------------------------------------------------------


def _shortcut_expected_gradient(space, table, teacher, logits_fn, divergence, k, shortcut):
    """Expected gradient of top-k OPD+ (gamma = 1) with a peer shortcut for tail tokens.

    ``"reward_zero"``: a tail token's bucket ratio is replaced by 0 (``ũ = 1``: cost ``f(1) = 0``,
    nothing learned from the teacher's tail). ``"skip"``: tail tokens are removed from the loss and
    from every reward-to-go (masked out).
    """
    topk = teacher_topk(teacher, k)
    mask = jnp.asarray(space.mask)
    in_topk = sampled_in_topk(space.tokens, topk)

    def expected_surrogate(p):
        logits = logits_fn(p)
        logp = exact.sampled_log_probs(logits, space.tokens)
        weights = jax.lax.stop_gradient(jnp.exp(exact.response_log_probs(logp, mask)))
        _, tail, _ = bucket_log_probs(logits, topk.token_ids_BxTxK)
        if shortcut == "skip":
            loss_mask = mask & in_topk
            advantages = topk_token_advantages(
                space.tokens, logp, tail, topk, loss_mask, divergence=divergence, gamma=1.0
            )
        else:
            loss_mask = mask
            ratio = topk_log_ratio(space.tokens, logp, tail, topk, mask)
            ratio = jnp.where(in_topk, ratio, 0)
            advantages = token_advantages(
                jnp.zeros_like(ratio), ratio, mask, divergence=divergence, gamma=1.0
            )
        return jnp.sum(weights * pg_surrogate(logp, advantages, loss_mask))

    return jax.grad(expected_surrogate)(table)


@pytest.mark.parametrize("name,params", [("forward_kl", {}), ("reverse_kl", {}), ("js", {}), ("alpha", {"alpha": 0.5})])
def test_topk_opd_plus_is_biased_for_the_full_objective_and_tail_shortcuts_for_both(name, params):
    divergence = divergences.get(name, **params)
    space, table, teacher, logits_fn = _problem(True, seed=11)
    full = exact.objective_gradient(logits_fn, table, teacher, space, divergence=divergence, level="token")
    for k in (1, 2):
        bucketed = exact.topk_objective_gradient(logits_fn, table, teacher, space, divergence=divergence, k=k)
        estimate = exact.topk_estimator_gradient(
            logits_fn, table, teacher, space, divergence=divergence, k=k, estimator="opd_plus", gamma=1.0
        )
        error_full, cosine_full = exact.compare_gradients(estimate, full)
        print(f"\n{name} V={VOCAB} T={HORIZON} eos k={k}: top-k OPD+ (gamma=1) vs full ∇J_tok: "
              f"relative error {error_full:.4f}, cosine {cosine_full:.4f}")
        assert _relative_error(estimate, bucketed) <= 1e-10
        assert error_full > 1e-2 and cosine_full < 1 - 1e-6
        for shortcut in ("reward_zero", "skip"):
            biased = _shortcut_expected_gradient(space, table, teacher, logits_fn, divergence, k, shortcut)
            error_bucketed, cosine_bucketed = exact.compare_gradients(biased, bucketed)
            error_vs_full, cosine_vs_full = exact.compare_gradients(biased, full)
            print(f"  shortcut {shortcut}: vs ∇J̃_tok relative error {error_bucketed:.4f}, cosine "
                  f"{cosine_bucketed:.4f}; vs full ∇J_tok relative error {error_vs_full:.4f}, "
                  f"cosine {cosine_vs_full:.4f}")
            assert error_bucketed > 1e-2


# ---------------------------------------------------------------------------------------------
# (d), (e) values: data-processing bound, numpy reference, chunking, jit, gradients
# ---------------------------------------------------------------------------------------------


def _random_logits(seed, shape=(3, 4, 7), scale=2.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(scale * rng.normal(size=shape))


@pytest.mark.parametrize("index", range(len(GENERATORS)), ids=GEN_IDS)
def test_topk_divergence_is_below_the_full_divergence_and_equal_at_k_v(index):
    name, params = GENERATORS[index]
    divergence = divergences.get(name, **params)
    student, teacher = _random_logits(index), _random_logits(100 + index, scale=3.0)
    vocab = student.shape[-1]
    mask = np.ones(student.shape[:2], bool)
    full = full_vocab_divergence(student, teacher, mask, divergence=divergence)
    for k in range(1, vocab + 1):
        bucketed = topk_divergence(student, teacher_topk(teacher, k), mask, divergence=divergence)
        if k >= vocab - 1:
            np.testing.assert_allclose(bucketed, full, rtol=1e-12, atol=1e-14)
        else:
            assert np.all(bucketed <= full * (1 + 1e-12) + 1e-15)
            assert np.all(bucketed >= -1e-15)
            if name != "total_variation":  # TV loses nothing where q − π has one sign on the tail
                assert np.any(bucketed < full * (1 - 1e-6))  # strictly convex f: strictly below


def _np_topk_reference(student, teacher, k):
    """Top-k buckets from probabilities (argsort, softmax, explicit tail sums): numpy float64."""
    student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    ids = np.argsort(-teacher, axis=-1, kind="stable")[..., :k]
    p = np.exp(student - student.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(teacher - teacher.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    outside = np.ones(teacher.shape, bool)
    np.put_along_axis(outside, ids, False, axis=-1)
    p_top, q_top = np.take_along_axis(p, ids, -1), np.take_along_axis(q, ids, -1)
    p_tail, q_tail = np.sum(np.where(outside, p, 0), -1), np.sum(np.where(outside, q, 0), -1)
    return ids, p_top, q_top, p_tail, q_tail


@pytest.mark.parametrize("name,params", [("forward_kl", {}), ("reverse_kl", {}), ("js", {}),
                                         ("pearson_chi2", {}), ("squared_hellinger", {}), ("alpha", {"alpha": -1.5})])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_values_match_an_independent_numpy_computation(name, params, k):
    divergence = divergences.get(name, **params)
    student, teacher = _random_logits(1), _random_logits(2, scale=3.0)
    mask = np.ones(student.shape[:2], bool)
    mask[0, -1] = mask[2, -2:] = False
    ids, p_top, q_top, p_tail, q_tail = _np_topk_reference(student, teacher, k)

    topk = teacher_topk(teacher, k)
    np.testing.assert_array_equal(topk.token_ids_BxTxK, ids)
    np.testing.assert_allclose(np.exp(topk.logp_BxTxK), q_top, rtol=1e-13)
    np.testing.assert_allclose(np.exp(topk.tail_logp_BxT), q_tail, rtol=1e-12)
    assert np.all(topk.tail_mask_BxT)

    def np_perspective(p, q):  # p f(q/p)
        return p * np_closed_form(name, params, np.log(q / p))[0]

    reference = np.sum(np_perspective(p_top, q_top), -1) + np_perspective(p_tail, q_tail)
    value = topk_divergence(student, topk, mask, divergence=divergence)
    np.testing.assert_allclose(value, np.where(mask, reference, 0), rtol=1e-11, atol=1e-14)

    # Bucket ratios and advantages of sampled tokens: some in the top-k, some in the tail.
    tokens = np.random.default_rng(3).integers(0, student.shape[-1], size=student.shape[:2])
    p_full = np.exp(np.asarray(jax.nn.log_softmax(student)))
    q_full = np.exp(np.asarray(jax.nn.log_softmax(teacher)))
    in_top = np.any(tokens[..., None] == ids, -1)
    assert in_top.any() and (~in_top).any()
    p_y = np.take_along_axis(p_full, tokens[..., None], -1)[..., 0]
    q_y = np.take_along_axis(q_full, tokens[..., None], -1)[..., 0]
    ratio_ref = np.where(mask, np.where(in_top, np.log(q_y / p_y), np.log(q_tail / p_tail)), 0)
    student_logp = jnp.log(jnp.asarray(p_y))
    _, student_tail, _ = bucket_log_probs(student, topk.token_ids_BxTxK)
    np.testing.assert_allclose(student_tail, np.log(p_tail), rtol=1e-12)
    np.testing.assert_array_equal(sampled_in_topk(tokens, topk), in_top)
    ratio = topk_log_ratio(tokens, student_logp, student_tail, topk, mask)
    np.testing.assert_allclose(ratio, ratio_ref, rtol=1e-11, atol=1e-13)

    f, ufp, reward = (np.where(mask, x, 0) for x in np_closed_form(name, params, ratio_ref))
    future = np.cumsum(f[:, ::-1], axis=1)[:, ::-1] - f  # γ = 1, all positions kept but masked ones 0
    for estimator, gamma, expected in (
        ("opd_plus", 0.0, reward),
        ("stop_grad", 0.0, -f),
        ("opd_plus", 1.0, reward - future),
    ):
        advantages = topk_token_advantages(
            tokens, student_logp, student_tail, topk, mask, divergence=divergence, estimator=estimator, gamma=gamma
        )
        np.testing.assert_allclose(advantages, np.where(mask, expected, 0), rtol=1e-11, atol=1e-12)


def test_topk_divergence_gradients_match_finite_differences():
    student, teacher = _random_logits(5, shape=(2, 3, 6)), _random_logits(6, shape=(2, 3, 6), scale=3.0)
    mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
    for name, params in (("js", {}), ("forward_kl", {}), ("alpha", {"alpha": -1.5})):
        topk = teacher_topk(teacher, 2)

        def loss(logits, name=name, params=params, topk=topk):
            return jnp.sum(topk_divergence(logits, topk, mask, divergence=divergences.get(name, **params)))

        check_grads(loss, (student,), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def test_chunked_jitted_and_vmapped_calls_agree():
    student, teacher = _random_logits(7, shape=(3, 5, 9)), _random_logits(8, shape=(3, 5, 9))
    mask = np.ones((3, 5), bool)
    mask[1, 3:] = False
    topk = teacher_topk(teacher, 3)
    direct = topk_divergence(student, topk, mask, divergence="js")
    assert len(jax.tree.leaves(topk)) == 4

    @functools.partial(jax.jit, static_argnames="chunk_size")
    def jitted(logits, topk, chunk_size):
        return topk_divergence(logits, topk, mask, divergence="js", chunk_size=chunk_size)

    for chunk_size in (None, 4):  # 4: three chunks of the 15 rows and a remainder of 3
        np.testing.assert_allclose(jitted(student, topk, chunk_size), direct, rtol=1e-14, atol=1e-15)
    grad_direct = jax.grad(lambda x: jnp.sum(topk_divergence(x, topk, mask, divergence="js")))(student)
    grad_chunked = jax.grad(lambda x: jnp.sum(jitted(x, topk, 4)))(student)
    np.testing.assert_allclose(grad_chunked, grad_direct, rtol=1e-13, atol=1e-15)
    rebuilt = jax.jit(lambda logits: teacher_topk(logits, 3))(teacher)
    assert isinstance(rebuilt, TeacherTopK)
    jax.tree.map(np.testing.assert_array_equal, rebuilt, topk)
    per_row = jax.vmap(lambda logits: teacher_topk(logits[None], 3))(teacher)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[:, 0], b), per_row, topk)


def test_advantages_under_jit_match_eager_calls():
    student, teacher = _random_logits(14), _random_logits(15)
    mask = np.ones(student.shape[:2], bool)
    mask[0, 2:] = False
    tokens = np.random.default_rng(16).integers(0, student.shape[-1], size=student.shape[:2]).astype(np.int32)
    topk = teacher_topk(teacher, 3)
    student_logp = exact.sampled_log_probs(student, tokens)
    _, student_tail, _ = bucket_log_probs(student, topk.token_ids_BxTxK)

    def advantages(tokens, student_logp, student_tail, topk):
        return topk_token_advantages(
            tokens, student_logp, student_tail, topk, mask, divergence="js", gamma=1.0, log_ratio_clip=20.0
        )

    np.testing.assert_allclose(
        jax.jit(advantages)(tokens, student_logp, student_tail, topk),
        advantages(tokens, student_logp, student_tail, topk),
        rtol=1e-14, atol=1e-15,
    )


def test_teacher_topk_from_hidden_and_from_log_probs_match_teacher_topk():
    rng = np.random.default_rng(9)
    hidden, projection = jnp.asarray(rng.normal(size=(2, 5, 8))), jnp.asarray(rng.normal(size=(8, 11)))
    expected = teacher_topk(hidden @ projection, 4)
    for chunk_size in (None, 3, 10):
        got = teacher_topk_from_hidden(hidden, projection, 4, chunk_size=chunk_size)
        np.testing.assert_array_equal(got.token_ids_BxTxK, expected.token_ids_BxTxK)
        for field in ("logp_BxTxK", "tail_logp_BxT"):
            np.testing.assert_allclose(getattr(got, field), getattr(expected, field), rtol=1e-12, atol=1e-13)
    from_log_probs = teacher_topk_from_log_probs(expected.token_ids_BxTxK, expected.logp_BxTxK)
    np.testing.assert_allclose(from_log_probs.tail_logp_BxT, expected.tail_logp_BxT, rtol=1e-12)
    assert np.all(from_log_probs.tail_mask_BxT)


def test_float32_inputs_compute_in_float32_with_accurate_tiny_tails():
    """A tail mass of ~1e-9 (top-k holding nearly everything) is exact in float32: it is summed
    from the logits outside the top-k, not formed as 1 − Σ q_k (which rounds to 0 in float32)."""
    teacher64 = jnp.asarray([[[30.0, 29.0, 10.0, 9.0, 8.5]]])
    student64 = jnp.asarray([[[1.0, 0.5, -3.0, 0.0, 2.0]]])
    mask = np.ones((1, 1), bool)
    for divergence in ("forward_kl", "js", "reverse_kl"):
        reference = topk_divergence(student64, teacher_topk(teacher64, 2), mask, divergence=divergence)
        topk32 = teacher_topk(teacher64.astype(jnp.float32), 2)
        assert topk32.logp_BxTxK.dtype == jnp.float32
        np.testing.assert_allclose(topk32.tail_logp_BxT, teacher_topk(teacher64, 2).tail_logp_BxT, rtol=1e-6)
        value = topk_divergence(student64.astype(jnp.float32), topk32, mask, divergence=divergence)
        assert value.dtype == jnp.float32
        np.testing.assert_allclose(value, reference, rtol=1e-5)
    # bf16 logits are promoted to float32
    assert teacher_topk(teacher64.astype(jnp.bfloat16), 2).logp_BxTxK.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# (f) bad inputs and edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -1, 8, 2.5, True])
def test_k_outside_one_to_v_is_refused_naming_k_and_the_range(k):
    logits = _random_logits(0)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, V\] = \[1, 7\], got k="):
        teacher_topk(logits, k)
    with pytest.raises(ValueError, match=r"\[1, V\] = \[1, 7\]"):
        teacher_topk_from_hidden(jnp.ones((1, 2, 3)), jnp.ones((3, 7)), k)


def test_mismatched_and_malformed_inputs_are_named():
    student, teacher = _random_logits(0), _random_logits(1)
    mask = np.ones(student.shape[:2], bool)
    topk = teacher_topk(teacher, 3)
    with pytest.raises(ValueError, match="mask_BxT"):
        topk_divergence(student, topk, mask[:, :2], divergence="js")
    with pytest.raises(ValueError, match=r"topk.token_ids_BxTxK \[3, 2, 3\]"):
        topk_divergence(student, teacher_topk(teacher[:, :2], 3), mask, divergence="js")
    with pytest.raises(ValueError, match=r"K must lie in \[1, V\] = \[1, 5\]"):
        topk_divergence(student[..., :5], teacher_topk(jnp.pad(teacher, ((0, 0), (0, 0), (0, 3))), 6), mask,
                        divergence="js")
    bad_range = TeacherTopK(topk.token_ids_BxTxK.at[0, 0, 0].set(7), topk.logp_BxTxK, topk.tail_logp_BxT,
                            topk.tail_mask_BxT)
    with pytest.raises(ValueError, match=r"must lie in \[0, V\) = \[0, 7\)"):
        topk_divergence(student, bad_range, mask, divergence="js")
    repeated = TeacherTopK(topk.token_ids_BxTxK.at[0, 0, 1].set(topk.token_ids_BxTxK[0, 0, 0]), topk.logp_BxTxK,
                           topk.tail_logp_BxT, topk.tail_mask_BxT)
    with pytest.raises(ValueError, match="distinct"):
        topk_divergence(student, repeated, mask, divergence="js")
    bad_tail = TeacherTopK(topk.token_ids_BxTxK, topk.logp_BxTxK, topk.tail_logp_BxT[:, :2], topk.tail_mask_BxT)
    with pytest.raises(ValueError, match=r"topk.tail_logp_BxT \[3, 2\]"):
        topk_divergence(student, bad_tail, mask, divergence="js")
    with pytest.raises(ValueError, match="topk must be a TeacherTopK"):
        topk_divergence(student, (topk.token_ids_BxTxK, topk.logp_BxTxK), mask, divergence="js")
    with pytest.raises(ValueError, match="student_logits_BxTxV must be"):
        topk_divergence(student[0], topk, mask, divergence="js")
    with pytest.raises(ValueError, match="student_logits_BxTxV must have a floating-point dtype"):
        topk_divergence(jnp.ones(student.shape, jnp.int32), topk, mask, divergence="js")
    with pytest.raises(ValueError, match="mask_BxT must hold only 0 and 1"):
        topk_divergence(student, topk, mask * 0.5, divergence="js")
    tokens = np.zeros(student.shape[:2], np.int32)
    logp = jnp.full(student.shape[:2], -1.0)
    with pytest.raises(ValueError, match="tokens_BxT must have an integer dtype"):
        topk_log_ratio(tokens.astype(float), logp, logp, topk, mask)
    with pytest.raises(ValueError, match=r"student_tail_logp_BxT \[3, 3\]"):
        topk_log_ratio(tokens, logp, logp[:, :3], topk, mask)
    with pytest.raises(ValueError, match="tokens_BxT must be an integer"):
        sampled_in_topk(tokens.astype(float), topk)
    with pytest.raises(ValueError, match=r"topk.token_ids_BxTxK \[3, 4, 3\]"):
        sampled_in_topk(tokens[:, :2], topk)
    with pytest.raises(ValueError, match=r"logp_BxTxK \[3, 4, 2\] does not match token_ids_BxTxK \[3, 4, 3\]"):
        teacher_topk_from_log_probs(topk.token_ids_BxTxK, topk.logp_BxTxK[..., :2])
    with pytest.raises(ValueError, match="the same D"):
        teacher_topk_from_hidden(jnp.ones((1, 2, 3)), jnp.ones((4, 7)), 2)


def _all_finite(tree):
    return all(bool(np.all(np.isfinite(np.asarray(x, np.float64)))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_empty_and_underflowing_tails_give_no_nan(dtype):
    minus_inf = -jnp.inf
    teacher = jnp.asarray([[[0.0, 0.0, -1e4, -1e4], [2.0, 1.0, minus_inf, minus_inf], [1.0, 0.5, 0.2, 0.1]]], dtype)
    student = jnp.asarray([[[0.0, 1.0, 2.0, 3.0], [1e4, 0.0, -1e4, 5.0], [0.3, -0.2, 0.0, 1.0]]], dtype)
    mask = np.ones((1, 3), bool)
    topk = teacher_topk(teacher, 2)
    # underflowing tail: mass e^{-1e4}, finite in log space; -inf logits outside: an empty tail.
    np.testing.assert_allclose(topk.tail_logp_BxT[0, 0], -1e4, rtol=1e-6)  # q_tail = 2e^{-1e4} / 2
    np.testing.assert_array_equal(topk.tail_mask_BxT, [[True, False, True]])
    assert topk.tail_logp_BxT[0, 1] == 0 and _all_finite(topk)
    for k in (2, 4):
        topk = teacher_topk(teacher, k)
        for name in ("forward_kl", "reverse_kl", "js", "neyman_chi2"):
            value = topk_divergence(student, topk, mask, divergence=name)
            grad = jax.grad(
                lambda x, topk=topk, name=name: jnp.sum(topk_divergence(x, topk, mask, divergence=name))
            )(student)
            assert not np.any(np.isnan(np.asarray(value, np.float64))), (k, name, value)
            assert _all_finite(grad), (k, name)
        # q = 0 < π on the tail (k = 2) or on two top-k tokens (k = 4): reverse KL is infinite there only.
        reverse = np.asarray(topk_divergence(student, topk, mask, divergence="reverse_kl"))
        assert np.isposinf(reverse[0, 1]) and np.all(np.isfinite(reverse[0, [0, 2]]))
    # The tail token at the empty-tail position gets ratio -inf (ũ = 0) and finite OPD+ advantages.
    topk = teacher_topk(teacher, 2)
    tokens = np.array([[3, 3, 0]], np.int32)
    logits_logp = jax.nn.log_softmax(student.astype(jnp.float64)).astype(dtype)
    student_logp = jnp.take_along_axis(logits_logp, tokens[..., None], -1)[..., 0]
    _, student_tail, _ = bucket_log_probs(student, topk.token_ids_BxTxK)
    ratio = topk_log_ratio(tokens, student_logp, student_tail, topk, mask)
    assert ratio[0, 1] == -jnp.inf and np.all(np.isfinite(ratio[0, [0, 2]]))
    for name in ("forward_kl", "js", "squared_hellinger"):
        advantages = topk_token_advantages(tokens, student_logp, student_tail, topk, mask, divergence=name)
        assert _all_finite(advantages), name


def test_from_log_probs_with_all_the_mass_in_the_top_k_has_an_empty_tail():
    ids = jnp.asarray([[[0, 1], [2, 0], [1, 2]]], jnp.int32)
    log_half = np.log(0.5)
    logp = jnp.asarray([[[log_half, log_half], [0.0, 1e-7], [-1e-30, -80.0]]], jnp.float32)
    topk = teacher_topk_from_log_probs(ids, logp)
    np.testing.assert_array_equal(topk.tail_mask_BxT, [[False, False, True]])
    assert _all_finite(topk)
    np.testing.assert_array_equal(topk.tail_logp_BxT[0, :2], 0.0)
    student = jnp.zeros((1, 3, 3), jnp.float32)
    value = topk_divergence(student, topk, np.ones((1, 3), bool), divergence="forward_kl")
    assert not np.any(np.isnan(value))


def test_masked_positions_contribute_nothing_whatever_they_hold():
    student, teacher = _random_logits(12), _random_logits(13)
    mask = np.ones(student.shape[:2], bool)
    mask[1, 2:] = False
    topk = teacher_topk(teacher, 3)
    garbage = TeacherTopK(
        jnp.where(mask[..., None], topk.token_ids_BxTxK, 99),
        jnp.where(mask[..., None], topk.logp_BxTxK, jnp.nan),
        jnp.where(mask, topk.tail_logp_BxT, jnp.inf),
        topk.tail_mask_BxT,
    )
    poisoned = jnp.where(mask[..., None], student, jnp.nan)

    def total(logits, topk):
        return jnp.sum(topk_divergence(logits, topk, mask, divergence="forward_kl"))

    np.testing.assert_allclose(total(poisoned, garbage), total(student, topk), rtol=1e-14)
    grad = jax.grad(total)(poisoned, garbage)
    assert _all_finite(grad) and np.all(np.asarray(grad)[~mask] == 0)
    np.testing.assert_allclose(grad, jax.grad(total)(student, topk), rtol=1e-13, atol=1e-15)


def test_bucket_log_probs_refuses_mismatched_leading_axes_and_non_integer_ids():
    logits = _random_logits(0)
    with pytest.raises(ValueError, match=r"logits_BxTxV \[3, 4, 7\] and token_ids_BxTxK \[3, 3, 2\]"):
        bucket_log_probs(logits, jnp.zeros((3, 3, 2), jnp.int32))
    with pytest.raises(ValueError, match="token_ids_BxTxK must have an integer dtype"):
        bucket_log_probs(logits, jnp.zeros((3, 4, 2)))
    with pytest.raises(ValueError, match=r"K = 0 ids per position; K must lie in \[1, V\]"):
        teacher_topk_from_log_probs(jnp.zeros((3, 4, 0), jnp.int32), jnp.zeros((3, 4, 0)))
