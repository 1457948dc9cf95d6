"""Two tokenizers over one alphabet, enumerated exactly in float64 (issue 24: the objectives and the bias).

The student writes pieces of ``{a, b, ab}``; the teacher re-tokenizes the text greedily with
``{a, b, ba, bb}``, so chunks hold several tokens on either side and the teacher's tokenization of
a prefix changes when the text goes on. The exact gradients come from ``jax.grad`` of the stated
objectives (:mod:`opd_jax.exact_cross`), the estimators from the library's advantages on
:func:`opd_jax.alignment.aligned_teacher_logp`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import divergences, exact
from opd_jax import exact_cross as xc
from opd_jax.advantages import token_advantages
from opd_jax.alignment import aligned_teacher_logp, chunk_ids

STUDENT = xc.PieceTokenizer(("a", "b", "ab"))
TEACHER = xc.PieceTokenizer(("a", "b", "ba", "bb"))
BUILT_INS = [("reverse_kl", {}), ("forward_kl", {}), ("js", {}), ("generalized_js", {"beta": 0.3}),
             ("total_variation", {}), ("squared_hellinger", {}), ("pearson_chi2", {}), ("neyman_chi2", {}),
             ("alpha", {"alpha": 0.5}), ("alpha", {"alpha": -1.0})]


@pytest.fixture(scope="module")
def setup():
    problem = xc.make_problem(STUDENT, TEACHER, horizon=3, seed=0)
    table = 0.7 * jax.random.normal(jax.random.key(1), (problem.space.num_states, STUDENT.vocab_size), jnp.float64)
    return problem, table, lambda t: exact.tabular_logits(t, problem.space)


def _objective_gradient(problem, logits_fn, table, divergence, objective):
    return jax.grad(lambda t: xc.cross_objective(logits_fn(t), problem, divergence=divergence,
                                                 objective=objective))(table)


@pytest.mark.parametrize("name, params", BUILT_INS)
def test_sequence_opd_plus_is_unbiased_for_the_canonical_sequence_objective(setup, name, params):
    problem, table, logits_fn = setup
    divergence = divergences.get(name, **params)
    exact_gradient = _objective_gradient(problem, logits_fn, table, divergence, "sequence")
    estimate = xc.cross_estimator_gradient(logits_fn, table, problem, divergence=divergence, level="sequence",
                                           estimator="opd_plus")
    error, _ = exact.compare_gradients(estimate, exact_gradient)
    assert error <= 1e-10
    by_characters = xc.cross_estimator_gradient(logits_fn, table, problem, divergence=divergence, level="sequence",
                                                estimator="opd_plus", credit="characters")
    assert exact.compare_gradients(by_characters, exact_gradient)[0] <= 1e-10
    if name != "reverse_kl":  # stop-gradient drops U f'(U): biased unless u f'(u) is constant
        stop_grad = xc.cross_estimator_gradient(logits_fn, table, problem, divergence=divergence,
                                                level="sequence", estimator="stop_grad")
        assert exact.compare_gradients(stop_grad, exact_gradient)[0] > 0.05


def test_token_level_bias_is_measured_beside_the_one_tokenizer_bias(setup):
    """Token-level OPD+ on chunks follows neither J_chunk nor, with γ = 0, J_tok: the figures."""
    problem, table, logits_fn = setup
    same = xc.make_problem(STUDENT, None, horizon=3, seed=0)
    rows = {}
    for name in ("reverse_kl", "forward_kl", "js"):
        row = []
        for case in (problem, same):
            target = _objective_gradient(case, logits_fn, table, name, "chunk")
            for gamma in (0.0, 1.0):
                estimate = xc.cross_estimator_gradient(logits_fn, table, case, divergence=name, level="token",
                                                       estimator="opd_plus", gamma=gamma)
                row.append(exact.compare_gradients(estimate, target)[0])
        rows[name] = row
    for name, (cross_0, cross_1, same_0, same_1) in rows.items():
        assert same_1 <= 1e-10  # one tokenizer, γ = 1: unbiased for J_tok (DESIGN §2)
        assert cross_1 > 0.05  # re-tokenization: a later token changes an earlier chunk
        assert same_0 > 1e-3 and cross_0 > 1e-3  # γ = 0 drops the future either way


@pytest.mark.parametrize("name, params", BUILT_INS)
def test_character_view_token_level_opd_plus_is_unbiased_for_j_bytes(setup, name, params):
    """Greedy matching with {a, b, ba, bb} is settled by the next character, so each character's
    teacher log-prob is a function of the text up to it: γ = 1 OPD+ follows J_bytes exactly."""
    problem, table, logits_fn = setup
    divergence = divergences.get(name, **params)
    target = _objective_gradient(problem, logits_fn, table, divergence, "bytes")
    estimates = [xc.cross_estimator_gradient(logits_fn, table, problem, divergence=divergence, level="token",
                                             estimator="opd_plus", gamma=gamma, credit="characters")
                 for gamma in (0.0, 1.0)]
    assert exact.compare_gradients(estimates[1], target)[0] <= 1e-10
    assert exact.compare_gradients(estimates[0], target)[0] > 1e-3  # γ = 0 drops the future, as with one tokenizer


def test_character_view_sums_to_the_sequence_and_is_biased_where_the_teacher_looks_ahead(setup):
    """The characters' log-probs sum to log q(z(y)); a teacher whose greedy match reads two characters
    ahead ("aab" against "a", "a") makes a character's share depend on the next one, and γ = 1 OPD+
    then misses J_bytes by a measured amount."""
    problem, table, logits_fn = setup
    for case in (problem, xc.make_problem(STUDENT, xc.PieceTokenizer(("a", "b", "aab")), horizon=3, seed=0)):
        np.testing.assert_allclose(np.where(case.char_mask, case.char_logp, 0).sum(1),
                                   np.where(case.teacher_mask, case.teacher_logp, 0).sum(1), rtol=0, atol=1e-13)
    ahead = xc.make_problem(STUDENT, xc.PieceTokenizer(("a", "b", "aab")), horizon=3, seed=0)
    target = _objective_gradient(ahead, logits_fn, table, "js", "bytes")
    estimate = xc.cross_estimator_gradient(logits_fn, table, ahead, divergence="js", level="token",
                                           estimator="opd_plus", gamma=1.0, credit="characters")
    assert exact.compare_gradients(estimate, target)[0] > 1e-3


def test_the_text_divergence_is_not_what_is_followed(setup):
    """With an ambiguous student vocabulary ("ab" vs "a"+"b") the text-level f-divergence differs."""
    problem, table, logits_fn = setup
    sequence = _objective_gradient(problem, logits_fn, table, "js", "sequence")
    text = _objective_gradient(problem, logits_fn, table, "js", "text")
    assert exact.compare_gradients(sequence, text)[0] > 0.05
    # Unambiguous on both sides (one tokenization per text): the two objectives are the same number.
    plain = xc.PieceTokenizer(("a", "b"))
    unambiguous = xc.make_problem(plain, xc.PieceTokenizer(("a", "b")), horizon=3, seed=2)
    logits = exact.tabular_logits(
        jax.random.normal(jax.random.key(3), (unambiguous.space.num_states, 3), jnp.float64), unambiguous.space)
    values = [xc.cross_objective(logits, unambiguous, divergence="js", objective=o) for o in ("sequence", "text")]
    np.testing.assert_allclose(values[0], values[1], rtol=1e-13)


def test_one_tokenizer_gives_bitwise_the_same_advantages(setup):
    problem, table, logits_fn = setup
    same = xc.make_problem(STUDENT, None, horizon=3, seed=0)
    student_logp = exact.sampled_log_probs(logits_fn(table), same.space.tokens)
    mask = jnp.asarray(same.space.mask)
    teacher_logp = jnp.asarray(same.teacher_logp)
    aligned = aligned_teacher_logp(student_logp, teacher_logp, jnp.asarray(same.student_chunk),
                                   jnp.asarray(same.teacher_chunk), mask, jnp.asarray(same.teacher_mask))
    np.testing.assert_array_equal(aligned, jnp.where(mask, teacher_logp, 0))
    for gamma in (0.0, 1.0):
        kwargs = dict(divergence="js", estimator="opd_plus", gamma=gamma)
        np.testing.assert_array_equal(token_advantages(student_logp, aligned, mask, **kwargs),
                                      token_advantages(student_logp, teacher_logp, mask, **kwargs))


def test_chunk_ids_on_the_cases_peers_broke_on():
    # A special token on one side only (zero width, e.g. a template marker): it joins the next chunk.
    student, teacher = chunk_ids([1, 3], [0, 1, 3])
    assert student.tolist() == [0, 1] and teacher.tolist() == [0, 0, 1]
    # No common boundary before the end: one chunk for the whole response.
    student, teacher = chunk_ids([2, 4, 6], [1, 3, 5, 6])
    assert set(student.tolist()) == set(teacher.tolist()) == {0}
    # An empty response: no tokens, no chunks.
    student, teacher = chunk_ids([], [])
    assert student.size == teacher.size == 0
    # Byte offsets: a teacher splitting a two-byte character ("é" = 2 bytes) mid-character ends
    # inside it; the chunk runs on to the next boundary both share.
    student, teacher = chunk_ids([1, 3], [1, 2, 3])
    assert student.tolist() == [0, 1] and teacher.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="do not cover the same text"):
        chunk_ids([1, 3], [1, 4])
    with pytest.raises(ValueError, match="must not decrease"):
        chunk_ids([2, 1], [2])


def test_aligned_log_ratios_sum_to_the_text_log_ratio(setup):
    problem, table, logits_fn = setup
    student_logp = exact.sampled_log_probs(logits_fn(table), problem.space.tokens)
    mask = jnp.asarray(problem.space.mask)
    aligned = aligned_teacher_logp(student_logp, jnp.asarray(problem.teacher_logp), jnp.asarray(problem.student_chunk),
                                   jnp.asarray(problem.teacher_chunk), mask, jnp.asarray(problem.teacher_mask))
    text_ratio = (np.where(problem.teacher_mask, problem.teacher_logp, 0).sum(-1)
                  - np.where(problem.space.mask, student_logp, 0).sum(-1))
    np.testing.assert_allclose(jnp.sum(jnp.where(mask, aligned - student_logp, 0), -1), text_ratio, atol=1e-13)
