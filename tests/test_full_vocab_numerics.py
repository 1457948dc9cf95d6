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

    (_, per_token), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(student)
    return np.asarray(per_token, np.float64)[:, 0], np.asarray(grad, np.float64)[:, 0, :]


def _relative_errors(got, want, floor):
    """``|got − want| / max(|want|, floor)`` with matching infinities counted as exact."""
    both_inf = np.isinf(got) & np.isinf(want) & (np.sign(got) == np.sign(want))
    with np.errstate(invalid="ignore"):  # inf − inf where both are inf: counted as exact below
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


def _errors_against_reference(name, params, dtype, chunk_size=None) -> tuple[float, float, tuple]:
    """``(max relative error of the values, of the gradients, where the worst gradient is)`` against the
    50-digit reference, after checking that infinities and NaNs fall exactly where the reference's do."""
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
    worst = np.unravel_index(grad_err.argmax(), grad_err.shape)
    return float(value_err.max()), float(grad_err.max()), (worst, got_grads[worst], want_grads[worst], scales[worst])


@pytest.mark.parametrize("name,params", SPECS, ids=SPEC_IDS)
def test_float32_equals_the_50_digit_reference(name, params):
    value_error, grad_error, worst = _errors_against_reference(name, params, jnp.float32)
    assert value_error <= 1e-5 and grad_error <= 1e-5, (value_error, grad_error, worst)


@pytest.mark.parametrize("name,params", [("js", {}), ("pearson_chi2", {}), ("alpha", {"alpha": -1.5})],
                         ids=["js", "pearson_chi2", "alpha(-1.5)"])
def test_float32_chunked_equals_the_50_digit_reference(name, params):
    value_error, grad_error, worst = _errors_against_reference(name, params, jnp.float32, chunk_size=3)  # 5 chunks + tail
    assert value_error <= 1e-5 and grad_error <= 1e-5, (value_error, grad_error, worst)


@pytest.mark.parametrize("name,params", SPECS, ids=SPEC_IDS)
def test_float64_equals_the_50_digit_reference(name, params):
    value_error, grad_error, worst = _errors_against_reference(name, params, jnp.float64)
    assert value_error <= 1e-11 and grad_error <= 1e-11, (value_error, grad_error, worst)


def test_the_reference_exercises_every_regime():
    """The rows reach terms that are +inf, values beyond float32 only, and zero probabilities."""
    fkl, _, _ = _reference("forward_kl", {})
    rkl, _, _ = _reference("reverse_kl", {})
    pearson, _, _ = _reference("pearson_chi2", {})
    js, _, _ = _reference("js", {})
    assert np.isinf(fkl).any() and np.isfinite(fkl).sum() >= 8
    assert np.isinf(rkl).any() and np.isfinite(rkl).sum() >= 8
    exact_pearson = [decimal_full_vocab("pearson_chi2", {}, STUDENT[i], TEACHER[i])[0] for i in range(N)]
    assert any(v.is_finite() and np.isinf(x) for v, x in zip(exact_pearson, pearson))  # beyond float32
    assert np.isfinite(js).all()
    assert (STUDENT == NEG_INF).any() and (TEACHER == NEG_INF).any()
    assert ((STUDENT == NEG_INF) & (TEACHER == NEG_INF)).any()


# ---------------------------------------------------------------------------------------------
# The cases of issue 14's table
# ---------------------------------------------------------------------------------------------


DEPTHS = np.array([-86.0, -95.0, -200.0, -1e4])


@pytest.mark.parametrize("name", ["forward_kl", "js", "reverse_kl", "pearson_chi2", "neyman_chi2", "squared_hellinger"])
def test_issue_14_case_student_0_0_minus_95_against_uniform_teacher(name):
    """Student logits [0, 0, d] against teacher [0, 0, 0] in float32 (before: NaN at d = −95 for
    forward KL and JS, forward KL's gradient too; inf at −86). Forward KL is checked against its
    float64 closed form from exact log-probs, 31.2612 at d = −95 (the issue's long-double value)."""
    student = jnp.asarray(np.stack([np.zeros_like(DEPTHS), np.zeros_like(DEPTHS), DEPTHS], -1)[:, None, :], jnp.float32)
    teacher = jnp.zeros((len(DEPTHS), 1, 3), jnp.float32)
    mask = np.ones((len(DEPTHS), 1), bool)
    def total(s):
        per_row = full_vocab_divergence(s, teacher, mask, divergence=name)[:, 0]
        return jnp.sum(per_row), per_row  # rows are independent: one gradient gives every row's

    (_, values), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(student)
    values, grad = np.asarray(values), np.asarray(grad)[:, 0, :]
    assert not np.isnan(values).any() and not np.isnan(grad).any()
    if name == "pearson_chi2":  # Σ (q − π)²/π ≈ (1/9) e^{-d}: beyond float32 for d < −88.7
        np.testing.assert_array_equal(np.isinf(values), DEPTHS < -88.7)
    else:
        assert np.isfinite(values).all()
    if name == "forward_kl":
        lse = np.log(2.0) + np.log1p(np.exp(DEPTHS) / 2)  # log π = z − log(2 + e^d), float64
        log_p = np.stack([-lse, -lse, DEPTHS - lse], -1)
        q = np.full(3, 1 / 3)
        expected = np.sum(q * (np.log(q) - log_p), -1)
        assert expected[1] == pytest.approx(31.2612, abs=5e-5)
        np.testing.assert_allclose(values, expected, rtol=1e-6)
        np.testing.assert_allclose(grad, np.exp(log_p) - q, rtol=1e-6, atol=1e-12)  # ∂KL(q‖π)/∂z = π − q


@pytest.mark.parametrize("name,params", SPECS, ids=SPEC_IDS)
def test_a_token_impossible_in_both_models_changes_nothing(name, params):
    """A −inf logit in both models is a zero-probability token: 0 · f(·) = 0, so value and
    gradient equal those without the token (before: NaN for every generator)."""
    rng = np.random.default_rng(5)
    student = rng.normal(scale=2.0, size=(2, 3, 5)).astype(np.float32)
    teacher = rng.normal(scale=2.0, size=(2, 3, 5)).astype(np.float32)
    mask = np.ones((2, 3), bool)
    div = divergences.get(name, **params)
    with_token_s = np.concatenate([student, np.full((2, 3, 1), NEG_INF, np.float32)], -1)
    with_token_t = np.concatenate([teacher, np.full((2, 3, 1), NEG_INF, np.float32)], -1)

    @jax.jit
    def run(s, t):
        fn = lambda x: full_vocab_divergence(x, t, mask, divergence=div)
        out, vjp = jax.vjp(fn, s)
        return out, vjp(jnp.ones((2, 3), out.dtype))[0]

    out, grad = map(np.asarray, run(with_token_s, with_token_t))
    base_out, base_grad = map(np.asarray, run(student, teacher))
    assert np.isfinite(out).all() and np.isfinite(grad).all()
    np.testing.assert_allclose(out, base_out, rtol=1e-6)
    np.testing.assert_allclose(grad[..., :5], base_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grad[..., 5], 0.0)


def _expected_one_sided(name, params, zero_in):
    """True if the divergence is +inf when one token has probability 0 in ``zero_in`` only."""
    f_at_zero, slope_at_infinity = decimal_limits(name, params)
    return (slope_at_infinity if zero_in == "student" else f_at_zero).is_infinite()


@pytest.mark.parametrize("zero_in", ["student", "teacher"])
@pytest.mark.parametrize("name,params", SPECS, ids=SPEC_IDS)
def test_a_token_impossible_in_one_model_is_inf_or_its_finite_limit(name, params, zero_in):
    student = np.array([[[0.5, -1.0, 0.0, 2.0]]], np.float32)
    teacher = np.array([[[0.0, 1.0, -2.0, 0.5]]], np.float32)
    (student if zero_in == "student" else teacher)[0, 0, 2] = NEG_INF
    mask = np.ones((1, 1), bool)
    value, grad = jax.jit(jax.value_and_grad(
        lambda s: full_vocab_divergence(s, jnp.asarray(teacher), mask, divergence=divergences.get(name, **params)).sum()
    ))(jnp.asarray(student))
    value, grad = float(value), np.asarray(grad)
    want, want_grad, _ = decimal_full_vocab(name, params, student[0, 0], teacher[0, 0])
    assert not np.isnan(value) and not np.isnan(grad).any()
    if _expected_one_sided(name, params, zero_in):
        assert want.is_infinite() and value == np.inf
        np.testing.assert_array_equal(grad, 0.0)  # documented: no finite descent direction
    else:
        assert value == pytest.approx(float(want), rel=1e-5)
        np.testing.assert_allclose(grad[0, 0], [float(g) for g in want_grad], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "js", "pearson_chi2", "neyman_chi2"])
def test_masked_positions_holding_nan_or_inf_give_zero_gradients(name, chunk_size):
    """Padding holding NaN, ±inf or 1e30 (in both models, mixed with ordinary numbers) changes no
    value and gets gradient exactly 0; the other positions' gradients are unchanged."""
    rng = np.random.default_rng(11)
    student = rng.normal(size=(2, 4, 6)).astype(np.float32)
    teacher = rng.normal(size=(2, 4, 6)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 0]], bool)
    fills = np.array([np.nan, np.inf, NEG_INF, 1e30, 0.0, np.nan], np.float32)
    dirty_student, dirty_teacher = student.copy(), teacher.copy()
    for k, (b, t) in enumerate(zip(*np.nonzero(~mask))):
        dirty_student[b, t] = np.roll(fills, k)
        dirty_teacher[b, t] = np.roll(fills, k + 1)
    weights = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)

    def loss(s, t, m):
        return jnp.sum(weights * full_vocab_divergence(s, t, m, divergence=name, chunk_size=chunk_size))

    traced = jax.jit(jax.value_and_grad(loss))  # the mask traced
    concrete = jax.jit(jax.value_and_grad(lambda s, t: loss(s, t, mask)))  # the mask a constant
    clean_value, clean_grad = traced(student, teacher, mask)
    for value, grad in (traced(dirty_student, dirty_teacher, mask), concrete(dirty_student, dirty_teacher)):
        grad = np.asarray(grad)
        assert np.isfinite(float(value)) and np.isfinite(grad).all()
        assert float(value) == float(clean_value)
        np.testing.assert_array_equal(grad[~mask], 0.0)
        np.testing.assert_array_equal(grad[mask], np.asarray(clean_grad)[mask])
    assert np.abs(np.asarray(clean_grad)[mask]).sum() > 0


# ---------------------------------------------------------------------------------------------
# The limits used by the reference, checked against the table at extreme ratios
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", SPECS, ids=SPEC_IDS)
def test_reference_limits_agree_with_the_table_at_extreme_ratios(name, params):
    f_at_zero, slope_at_infinity = decimal_limits(name, params)
    with decimal.localcontext(decimal.Context(prec=50, Emax=10**9, Emin=-(10**9))):
        D = decimal.Decimal
        f_small = decimal_closed_form(name, params, D(-2000))[0]  # u = e^-2000
        f_large = decimal_closed_form(name, params, D(2000))[0] / D(2000).exp()
        if f_at_zero.is_infinite():
            assert f_small >= 2000  # grows without bound (like log 1/u or a power of 1/u)
        else:
            assert abs(f_small - f_at_zero) < D("1e-40")
        if slope_at_infinity.is_infinite():
            assert f_large > 10**3
        else:
            assert abs(f_large - slope_at_infinity) < D("1e-40")
