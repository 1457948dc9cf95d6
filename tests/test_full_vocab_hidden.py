"""``full_vocab_divergence_from_hidden``: the full-vocabulary divergence with the logits formed per chunk.

The reference is :func:`full_vocab_divergence` of the materialised logits ``hidden @ projection /
temperature`` (itself checked against numpy in test_objectives.py); values and gradients must agree,
and the compiled temporaries must stay ``O(chunk · V)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import divergences
from opd_jax.objectives import full_vocab_divergence, full_vocab_divergence_from_hidden

B, T, D, E, V = 3, 8, 6, 5, 13  # the teacher is narrower than the student (E ≠ D)

DIVERGENCES = (
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("js", {}),
    ("total_variation", {}),
    ("neyman_chi2", {}),
    ("alpha", {"alpha": 2.0}),
)
DIVERGENCE_IDS = [name + "".join(f"({v})" for v in params.values()) for name, params in DIVERGENCES]


def _problem(rng, dtype, batch=B, length=T):
    """Hidden states and projections of both models, a padded mask and per-token loss weights."""
    student_hidden = rng.normal(size=(batch, length, D))
    student_projection = rng.normal(scale=0.7, size=(D, V))
    teacher_hidden = rng.normal(size=(batch, length, E))
    teacher_projection = rng.normal(scale=0.9, size=(E, V))
    lengths = np.array([length, 1] + list(rng.integers(1, length + 1, size=batch - 2)))
    mask = np.arange(length)[None, :] < lengths[:, None]
    weights = rng.normal(size=(batch, length))
    arrays = [jnp.asarray(a, dtype) for a in (student_hidden, student_projection, teacher_hidden, teacher_projection)]
    return (*arrays, mask, jnp.asarray(weights, dtype))


def _materialised(student_hidden, student_projection, teacher_hidden, teacher_projection, mask, *, divergence,
                  temperature):
    """The reference: ``[B, T, V]`` logits, then :func:`full_vocab_divergence`."""
    dtype = jnp.promote_types(student_hidden.dtype, jnp.float32)
    student_logits = jnp.einsum("btd,dv->btv", student_hidden, student_projection, preferred_element_type=dtype)
    teacher_logits = jnp.einsum("bte,ev->btv", teacher_hidden, teacher_projection, preferred_element_type=dtype)
    return full_vocab_divergence(
        student_logits / temperature, teacher_logits / temperature, mask, divergence=divergence
    )


def _value_and_grads(fn, student_hidden, student_projection, teacher_hidden, teacher_projection, weights):
    """``Σ weights · fn(...)`` and its gradients in all four arrays."""
    return jax.value_and_grad(
        lambda sh, sp, th, tp: jnp.sum(weights * fn(sh, sp, th, tp)), argnums=(0, 1, 2, 3)
    )(student_hidden, student_projection, teacher_hidden, teacher_projection)


def _assert_gradient_close(got, expected, rtol, label):
    """Within ``rtol`` of the largest entry: gradients are sums whose terms may cancel, so rounding
    is relative to the gradient's scale, not to each (possibly tiny) entry."""
    scale = float(np.abs(np.asarray(expected)).max())
    assert scale > 0, label
    error = float(np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64)).max())
    assert error <= rtol * scale, f"{label}: max error {error / scale:.2g} x scale > {rtol:g}"


# Float32 values agree to 1e-6. Float32 gradients do not, at every temperature: the materialised
# float32 reference is itself up to ~2.3e-6 (of the gradient's scale) away from the float64
# gradient at temperature 0.7, and the chunked one is as close to float64 as it is (up to ~1.8e-6);
# the two float32 roundings differ by up to ~2e-6. Both are held to 3e-6, against each other and
# against float64.
TOLERANCES = {"float32": (1e-6, 3e-6), "float64": (1e-12, 1e-12)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,params", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_equals_full_vocab_divergence_of_the_materialised_logits(name, params, dtype):
    value_rtol, gradient_rtol = TOLERANCES[dtype]
    rng = np.random.default_rng(7)
    *arrays, mask, weights = _problem(rng, dtype)
    assert not mask.all()
    divergence = divergences.get(name, **params)
    for temperature in (1.0, 0.7):
        def materialised(*a):
            return _materialised(*a, mask, divergence=divergence, temperature=temperature)

        reference = materialised(*arrays)
        reference_value, reference_grads = _value_and_grads(materialised, *arrays, weights)
        _, exact_grads = _value_and_grads(
            materialised, *[a.astype(jnp.float64) for a in arrays], weights.astype(jnp.float64)
        )
        assert reference.dtype == dtype and np.all(np.asarray(reference)[mask] > 0)
        for chunk_size in (None, 1, 7, 24, 100):  # B·T = 24 rows: single, not dividing, exactly all, more
            def from_hidden(*a, chunk_size=chunk_size):
                return full_vocab_divergence_from_hidden(
                    *a, mask, divergence=divergence, chunk_size=chunk_size, temperature=temperature
                )

            label = f"chunk_size={chunk_size}, temperature={temperature}"
            got = from_hidden(*arrays)
            assert got.shape == (B, T) and got.dtype == dtype
            np.testing.assert_allclose(got, reference, rtol=value_rtol, atol=value_rtol * 1e-2, err_msg=label)
            np.testing.assert_array_equal(np.asarray(got)[~mask], 0.0)
            value, grads = _value_and_grads(from_hidden, *arrays, weights)
            # the weights have both signs: rounding is relative to Σ |w D|, not to the sum
            magnitude = float(np.sum(np.abs(np.asarray(weights * reference, np.float64))))
            np.testing.assert_allclose(value, reference_value, rtol=0, atol=value_rtol * magnitude, err_msg=label)
            for i, which in enumerate(("hidden", "projection")):
                _assert_gradient_close(grads[i], reference_grads[i], gradient_rtol, f"{label}, d/d {which}")
                _assert_gradient_close(grads[i], exact_grads[i], gradient_rtol, f"{label}, d/d {which} vs float64")
            # masked rows of the student's hidden states get no gradient; the teacher is a constant
            np.testing.assert_array_equal(np.asarray(grads[0])[~mask], 0.0)
            np.testing.assert_array_equal(grads[2], 0.0)
            np.testing.assert_array_equal(grads[3], 0.0)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_garbage_in_masked_hidden_rows_never_reaches_values_or_gradients(chunk_size):
    rng = np.random.default_rng(3)
    student_hidden, student_projection, teacher_hidden, teacher_projection, mask, weights = _problem(rng, jnp.float64)
    clean = _value_and_grads(
        lambda *a: full_vocab_divergence_from_hidden(*a, mask, divergence="js", chunk_size=chunk_size),
        student_hidden, student_projection, teacher_hidden, teacher_projection, weights,
    )
    padding = ~mask[..., None]
    dirty_student = jnp.where(padding, jnp.nan, student_hidden)
    dirty_teacher = jnp.where(padding, jnp.inf, teacher_hidden)
    dirty = _value_and_grads(
        lambda *a: full_vocab_divergence_from_hidden(*a, mask, divergence="js", chunk_size=chunk_size),
        dirty_student, student_projection, dirty_teacher, teacher_projection, weights,
    )
    np.testing.assert_array_equal(dirty[0], clean[0])
    for dirty_grad, clean_grad in zip(dirty[1], clean[1]):
        np.testing.assert_array_equal(dirty_grad, clean_grad)


def test_bfloat16_inputs_compute_in_float32():
    rng = np.random.default_rng(5)
    *arrays, mask, _ = _problem(rng, jnp.bfloat16)
    for chunk_size in (None, 4):
        got = full_vocab_divergence_from_hidden(*arrays, mask, divergence="js", chunk_size=chunk_size)
        assert got.dtype == jnp.float32
        # the same bfloat16 values, multiplied in float64
        reference = _materialised(*[a.astype(jnp.float64) for a in arrays], mask, divergence="js", temperature=1.0)
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)
    grads = jax.grad(
        lambda sh, sp: full_vocab_divergence_from_hidden(sh, sp, *arrays[2:], mask, divergence="js").sum(),
        argnums=(0, 1),
    )(*arrays[:2])
    assert all(g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# Memory: the compiled value-and-gradient's temporaries
# ---------------------------------------------------------------------------------------------

MEM_B, MEM_T, MEM_D, MEM_V = 4, 256, 64, 4096
LOGITS_BYTES = MEM_B * MEM_T * MEM_V * 4  # one float32 [B, T, V] tensor: 16 MiB


def _temp_bytes(chunk_size):
    hidden = jax.ShapeDtypeStruct((MEM_B, MEM_T, MEM_D), jnp.float32)
    projection = jax.ShapeDtypeStruct((MEM_D, MEM_V), jnp.float32)
    mask = jax.ShapeDtypeStruct((MEM_B, MEM_T), jnp.bool_)
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda sh, sp, th, tp, m: full_vocab_divergence_from_hidden(
            sh, sp, th, tp, m, divergence="js", chunk_size=chunk_size
        ).sum(),
        argnums=(0, 1),
    ))
    analysis = value_and_grad.lower(hidden, projection, hidden, projection, mask).compile().memory_analysis()
    if analysis is None:
        pytest.skip("memory_analysis() is not available on this backend")
    return analysis.temp_size_in_bytes


def test_chunked_temporaries_are_of_order_chunk_times_vocab():
    unchunked = _temp_bytes(None)
    chunks = (16, 32, 64)  # all divide B·T = 1024 (a tail chunk would add its own temporaries)
    chunked = {chunk: _temp_bytes(chunk) for chunk in chunks}
    row_bytes = MEM_V * 4  # one float32 logit row
    print(f"temp_size_in_bytes: unchunked {unchunked} ({unchunked / LOGITS_BYTES:.2f} x B·T·V·4), "
          + ", ".join(f"chunk {c}: {b} ({b / (c * row_bytes):.2f} x chunk·V·4)" for c, b in chunked.items()))
    # Unchunked, both models' [B, T, V] logits exist at once.
    assert unchunked >= 2 * LOGITS_BYTES
    for chunk, temp in chunked.items():
        # a few [chunk, V] arrays (XLA:CPU keeps 5 to 9) plus the [D, V] gradient of the projection
        assert temp <= 10 * chunk * row_bytes + 2 * MEM_D * MEM_V * 4, chunk
        assert temp <= LOGITS_BYTES / 2, chunk
    # they depend on the chunk (not on B·T)
    assert chunked[16] < chunked[32] < chunked[64]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _good():
    return (jnp.zeros((2, 3, 4)), jnp.zeros((4, 7)), jnp.zeros((2, 3, 5)), jnp.zeros((5, 7)), jnp.ones((2, 3), bool))


def _call(*args, **kwargs):
    return full_vocab_divergence_from_hidden(*args, divergence="js", **kwargs)


@pytest.mark.parametrize(
    "index,bad,match",
    [
        (1, jnp.zeros((3, 7)), r"student_hidden_BxTxD's D does not match student_projection_DxV's D.*\[2, 3, 4\].*\[3, 7\]"),
        (3, jnp.zeros((4, 7)), r"teacher_hidden_BxTxE's E does not match teacher_projection_ExV's E.*\[2, 3, 5\].*\[4, 7\]"),
        (3, jnp.zeros((5, 8)), r"differ in V.*student_projection_DxV \[4, 7\].*teacher_projection_ExV \[5, 8\]"),
        (2, jnp.zeros((2, 4, 5)), r"differ in \[B, T\].*student_hidden_BxTxD \[2, 3, 4\].*teacher_hidden_BxTxE \[2, 4, 5\]"),
        (0, jnp.zeros((6, 4)), r"expected \[B, T, D\], \[D, V\], \[B, T, E\], \[E, V\].*student_hidden_BxTxD \[6, 4\]"),
        (1, jnp.zeros((4, 7, 1)), r"student_projection_DxV \[4, 7, 1\]"),
        (4, jnp.ones((3, 2), bool), r"mask_BxT \[3, 2\] does not match hidden states \[B, T\] = \[2, 3\]"),
    ],
)
def test_shape_errors_name_the_arguments_and_shapes(index, bad, match):
    args = list(_good())
    args[index] = bad
    with pytest.raises(ValueError, match=match):
        _call(*args)


@pytest.mark.parametrize("index,name", [(0, "student_hidden_BxTxD"), (1, "student_projection_DxV"),
                                        (2, "teacher_hidden_BxTxE"), (3, "teacher_projection_ExV")])
def test_integer_inputs_are_refused_naming_the_argument(index, name):
    args = list(_good())
    args[index] = args[index].astype(jnp.int32)
    with pytest.raises(ValueError, match=f"{name} must have a floating-point dtype"):
        _call(*args)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        _call(*_good(), temperature=temperature)


def test_bad_mask_values_and_chunk_size_are_refused():
    args = list(_good())
    args[4] = jnp.asarray([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"mask_BxT must hold only 0 and 1.*0\.5"):
        _call(*args)
    with pytest.raises(ValueError, match="chunk_size"):
        _call(*_good(), chunk_size=0)
