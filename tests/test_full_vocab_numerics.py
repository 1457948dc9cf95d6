"""Float32 ``full_vocab_divergence`` against a 50-digit reference, at extreme and infinite logits.

The reference (tests/fdiv_reference.py, ``decimal_full_vocab``) takes the float32 logits exactly,
computes the log-softmax, every term ``π f(q/π)`` and the gradient in the student logits from the
DESIGN.md §2 table in 50-digit decimal arithmetic, with no overflow and no use of ``opd_jax``. Each
float32 result must equal the reference rounded to float32: ``+inf`` exactly where the reference is
beyond the float32 range (or infinite), otherwise within ``1e-5`` relative.
"""

from __future__ import annotations

import decimal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_reference import decimal_closed_form, decimal_full_vocab, decimal_limits, round_to
from opd_jax import divergences
from opd_jax.objectives import full_vocab_divergence

NEG_INF = -np.inf
V = 8

# The nine generators; generalized_js and alpha at two or more parameter values each.
SPECS = (
    [("reverse_kl", {}), ("forward_kl", {}), ("js", {})]
    + [("generalized_js", {"beta": b}) for b in (0.1, 0.9)]
    + [("total_variation", {}), ("squared_hellinger", {}), ("pearson_chi2", {}), ("neyman_chi2", {})]
    + [("alpha", {"alpha": a}) for a in (-1.5, 0.5, 2.0, 3.0)]
)
SPEC_IDS = [name + "".join(f"({v})" for v in params.values()) for name, params in SPECS]


def _rows():
    """``(student, teacher)`` float32 logit rows of length V: student log-probs from 0 down to
    −1e4, ``-inf`` in one model, in both, in neither; teachers moderate and extreme."""
    rows = [
        # the case of issue 14: [0, 0, -95] against [0, 0, 0] (padded with tokens impossible in both)
        ([0, 0, -95] + [NEG_INF] * 5, [0, 0, 0] + [NEG_INF] * 5),
        ([0, 0, -86] + [NEG_INF] * 5, [0, 0, 0] + [NEG_INF] * 5),
        ([0, -1, -3, -10, -30, -87, -95, -200], [0] * 8),
        ([0, -2, -50, -100, -500, -1e3, -5e3, -1e4], [-1, 0, -3, -2, -1, -0.5, -4, -2]),
        # zero probabilities: in both (index 2), only the student (3), only the teacher (1, 7)
        ([0, -1, NEG_INF, NEG_INF, -20, -1e4, 2, -300], [0, NEG_INF, NEG_INF, 1, -2, -3, 0, NEG_INF]),
        # only the teacher has zero-probability tokens
        ([0, -1, -2, -40, -90, -1e4, 1, -3], [0, NEG_INF, -1, -2, NEG_INF, -1, 0, -5]),
        # only the student has them
        ([0, NEG_INF, -1, -2, NEG_INF, -1e4, 1, -3], [0, -4, -1, -2, -0.5, -1, 0, -5]),
        # both probabilities tiny: ratios far beyond e^88 at terms of moderate size (the growing
        # generators' t^a overflows float32 on its own there)
        ([0, -60, -120, -150, -200, -1, -3, -1e4], [0, -20, -30, -60, -100, -2, -1, -9000]),
        ([0, -20, -30, -60, -100, -2, -1, -9000], [0, -60, -120, -150, -200, -1, -3, -1e4]),
        # extreme teacher, moderate student
        ([0, -1, -2, -3, -0.5, -4, -1, -2], [0, -1e4, -95, -300, -2, -1, -3e3, -87]),
    ]
    rng = np.random.default_rng(20261201)
    for _ in range(6):  # random rows: log-uniform depths down to -1e4, some -inf
        student = -(10.0 ** rng.uniform(-1, 4, V))
        teacher = rng.normal(scale=3.0, size=V)
        student[rng.integers(V)] = 0.0
        student[rng.random(V) < 0.15] = NEG_INF
        teacher[rng.random(V) < 0.15] = NEG_INF
        student[0], teacher[0] = 0.0, 0.0  # at least one finite logit in each model
        rows.append((student, teacher))
    student = np.array([r[0] for r in rows], np.float64).astype(np.float32)
    teacher = np.array([r[1] for r in rows], np.float64).astype(np.float32)
    return student, teacher


STUDENT, TEACHER = _rows()
N = STUDENT.shape[0]


def _reference(name, params, dtype=np.float32):
    """The reference rounded to ``dtype``: values ``[N]``, gradients ``[N, V]`` (zero rows where
    the value is +inf, the documented convention) and the gradients' scales ``[N, V]``."""
    values, grads, scales = np.zeros(N), np.zeros((N, V)), np.zeros((N, V))
    for i in range(N):
        value, grad, scale = decimal_full_vocab(name, params, STUDENT[i], TEACHER[i])
        values[i] = np.inf if value.is_infinite() else round_to(value, dtype)
        if np.isfinite(values[i]):
            grads[i] = [round_to(g, dtype) for g in grad]
            scales[i] = [float(x) for x in scale]
    return values, grads, scales


def _run(name, params, dtype=jnp.float32, chunk_size=None):
    div = divergences.get(name, **params)
    student = jnp.asarray(STUDENT, dtype)[:, None, :]  # [N, 1, V]
    teacher = jnp.asarray(TEACHER, dtype)[:, None, :]
    mask = np.ones((N, 1), bool)

    def total(s):
        per_token = full_vocab_divergence(s, teacher, mask, divergence=div, chunk_size=chunk_size)
        return jnp.sum(per_token), per_token

    (_, per_token), grad = jax.value_and_grad(total, has_aux=True)(student)
    return np.asarray(per_token, np.float64)[:, 0], np.asarray(grad, np.float64)[:, 0, :]


def _relative_errors(got, want, floor):
    """``|got − want| / max(|want|, floor)`` with matching infinities counted as exact."""
    both_inf = np.isinf(got) & np.isinf(want) & (np.sign(got) == np.sign(want))
    err = np.abs(got - want) / np.maximum(np.abs(want), floor)
    return np.where(both_inf, 0.0, err)


# A gradient component ∂D/∂z_v = w_v − π(v) Σ_w w_w is a difference; where the two sides nearly
# cancel, float32 cannot give it to 1e-5 of itself: its inputs (log π from the log-softmax, each
# side) carry a few float32 ulps (eps = 1.2e-7) of their own size. Its error is therefore
# measured relative to max(|∂D/∂z_v|, CANCELLATION · scale_v), scale_v = |w_v| + π(v) Σ|w| the
# size of the two sides: with rtol 1e-5 that allows 1e-6 · scale_v ≈ 8 ulps of the sides where
# they cancel by more than a factor 10, and is a plain 1e-5 relative check everywhere else (the
# printed "components without cancellation"). Below 1e-30 (float32's subnormal range starts at
# 1.2e-38) a component counts as zero.
CANCELLATION = 1e-1
GRAD_FLOOR = 1e-30


def _check(name, params, dtype, rtol, chunk_size=None):
    want_values, want_grads, scales = _reference(name, params, np.float32 if dtype == jnp.float32 else np.float64)
    got_values, got_grads = _run(name, params, dtype, chunk_size)
    assert not np.isnan(got_values).any() and not np.isnan(got_grads).any()
    # +inf exactly where the reference is infinite or beyond the float range
    np.testing.assert_array_equal(np.isinf(got_values), np.isinf(want_values))
    assert not np.isinf(got_grads).any()
    np.testing.assert_array_equal(got_grads[np.isinf(want_values)], 0.0)
    value_err = _relative_errors(got_values, want_values, 1e-30)
    grad_err = _relative_errors(got_grads, want_grads, np.maximum(CANCELLATION * scales, GRAD_FLOOR))
    plain = np.abs(got_grads - want_grads) / np.maximum(np.abs(want_grads), GRAD_FLOOR)
    well_conditioned = np.abs(want_grads) >= CANCELLATION * scales
    print(f"{name}{tuple(params.values())} {jnp.dtype(dtype).name}: max relative error of values "
          f"{value_err.max():.2e}, of gradients {grad_err.max():.2e} "
          f"(components without cancellation: {plain[well_conditioned].max():.2e})")
    assert value_err.max() <= rtol, (value_err, got_values, want_values)
    worst = np.unravel_index(grad_err.argmax(), grad_err.shape)
    assert grad_err.max() <= rtol, (worst, got_grads[worst], want_grads[worst], scales[worst])


@pytest.mark.parametrize("name,params", SPECS, ids=SPEC_IDS)
def test_float32_equals_the_50_digit_reference(name, params):
    _check(name, params, jnp.float32, 1e-5)
