"""The attention implementations against each other and against an independent float64 reference.

``xla`` (jax.nn.dot_product_attention with the explicit mask) is checked against a loop-free numpy
float64 implementation of the visibility rule; ``chunked`` and ``splash`` (the Pallas interpreter)
are checked against ``xla`` on outputs and on gradients w.r.t. q, k and v. Two compile-only tests
measure memory: ``chunked`` against ``xla`` on the CPU, and ``splash`` for a real TPU topology.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.models import attention as attn

# Parity tolerance, max|a - b| / max|b|, for float32 implementations against the float32 reference.
PARITY = 2e-6
# xla (float32) against the float64 reference: float32 rounding of scores, softmax and sums.
REFERENCE = 2e-6
SCALE = 0.4


def _reference_numpy(q, k, v, query_slots_T, key_valid_BxS, scale):
    """float64 attention by the rule: slot s is visible to row t iff s <= slot(t) and it is valid."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores_BxNxTxS = np.einsum("btnh,bsnh->bnts", q, k) * scale
    slots_S = np.arange(k.shape[1])
    visible_BxTxS = (slots_S[None, :] <= np.asarray(query_slots_T)[:, None])[None] & np.asarray(key_valid_BxS)[:, None]
    visible = visible_BxTxS[:, None]
    top = np.max(np.where(visible, scores_BxNxTxS, -np.inf), axis=-1, keepdims=True)
    weights = np.where(visible, np.exp(scores_BxNxTxS - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = weights.sum(-1, keepdims=True)
    probs = weights / np.where(total > 0, total, 1.0)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def _inputs(seed, B, T, S, N, K, H, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for shape in [(B, T, N, H), (B, S, K, H), (B, S, K, H)])
    cotangent = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    return q, k, v, cotangent


def _ragged_valid(B, S, seed=0):
    """Different leading padding per row, and trailing padding after some responses."""
    rng = np.random.default_rng(seed)
    valid = np.ones((B, S), bool)
    for b in range(B):
        lead = int(rng.integers(0, S // 3))
        valid[b, :lead] = False
        if b % 2:
            valid[b, S - int(rng.integers(1, S // 4 + 1)):] = False
    valid[0, : S // 4] = False  # at least one row with several fully masked query rows
    return valid


def _forward_and_grads(impl, q, k, v, slots, valid, cotangent_BxTxNxH, **kwargs):
    def run(q, k, v):
        return attn.attention(
            q, k, v, query_slots_T=slots, key_valid_BxS=valid, scale=SCALE, implementation=impl, **kwargs
        )

    def loss(q, k, v):
        return jnp.sum(run(q, k, v).astype(jnp.float32) * cotangent_BxTxNxH)

    return jax.jit(run)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _assert_parity(impl, q, k, v, slots, valid, cotangent, rows_BxT=None, **kwargs):
    """``impl`` against ``xla``: outputs (at ``rows_BxT``) and the gradients of sum(out · cotangent)
    over those rows."""
    valid = jnp.asarray(valid)
    rows = np.ones(valid.shape[:1] + (q.shape[1],), bool) if rows_BxT is None else rows_BxT
    cotangent = cotangent * jnp.asarray(rows)[:, :, None, None]
    out_ref, grads_ref = _forward_and_grads("xla", q, k, v, slots, valid, cotangent)
    out, grads = _forward_and_grads(impl, q, k, v, slots, valid, cotangent, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    errors = [_relative(np.asarray(out)[rows], np.asarray(out_ref)[rows])]
    errors += [_relative(g, g_ref) for g, g_ref in zip(grads, grads_ref)]
    assert max(errors) <= PARITY, f"{impl}: relative errors (out, dq, dk, dv) = {errors}"
    return errors


# Self-attention shapes (B, T, N, K, H): MHA, GQA, MQA.
HEADS = {"mha": (3, 4, 4, 8), "gqa": (3, 4, 2, 8), "mqa": (3, 4, 1, 16)}


@pytest.mark.parametrize("name", HEADS)
def test_xla_matches_float64_reference(name):
    B, N, K, H = HEADS[name]
    T = 21
    q, k, v, _ = _inputs(1, B, T, T, N, K, H)
    valid = _ragged_valid(B, T)
    slots = jnp.arange(T, dtype=jnp.int32)
    expected = _reference_numpy(q, k, v, np.arange(T), valid, SCALE)
    out = attn.attention(q, k, v, query_slots_T=slots, key_valid_BxS=jnp.asarray(valid), scale=SCALE)
    assert _relative(out, expected) <= REFERENCE
    # Rows without a visible key are zeros, by contract (jax's own xla path would give mean(v)).
    empty_BxT = ~(np.tril(np.ones((T, T), bool))[None] & valid[:, None]).any(-1)
    assert empty_BxT.any() and np.all(np.asarray(out)[empty_BxT] == 0.0)


def test_cache_shapes_match_float64_reference():
    q, k, v, _ = _inputs(2, 2, 3, 11, 4, 2, 8)
    slots = np.array([4, 7, 8])  # slot 8 opens the third key block: the block skip must keep it
    valid = np.ones((2, 11), bool)
    valid[0, :3] = valid[1, 5:7] = False
    for impl in ("xla", "chunked"):
        out = attn.attention(
            q, k, v, query_slots_T=jnp.asarray(slots, jnp.int32), key_valid_BxS=jnp.asarray(valid),
            scale=SCALE, implementation=impl, block_size=4,
        )
        assert _relative(out, _reference_numpy(q, k, v, slots, valid, SCALE)) <= REFERENCE, impl


@pytest.mark.parametrize("name", HEADS)
def test_chunked_matches_xla_ragged_self_attention(name):
    B, N, K, H = HEADS[name]
    T = 37  # not a multiple of the block size: padded internally
    q, k, v, cotangent = _inputs(3, B, T, T, N, K, H)
    slots = jnp.arange(T, dtype=jnp.int32)
    _assert_parity("chunked", q, k, v, slots, _ragged_valid(B, T, seed=1), cotangent, block_size=8)


@pytest.mark.parametrize("slot", [20, 16])  # 16: the query's own slot starts a key block
def test_chunked_matches_xla_decode_step(slot):
    q, k, v, cotangent = _inputs(4, 2, 1, 37, 4, 2, 8)
    valid = np.ones((2, 37), bool)
    valid[0, :6] = valid[1, 10:13] = valid[:, slot + 1 :] = False  # padding, a hole, unwritten slots
    slots = jnp.array([slot], jnp.int32)
    _assert_parity("chunked", q, k, v, slots, valid, cotangent, block_size=16)


def test_chunked_matches_xla_prefill_into_cache():
    q, k, v, cotangent = _inputs(5, 2, 8, 24, 4, 1, 8)
    valid = np.zeros((2, 24), bool)
    valid[0, :8] = True
    valid[1, 3:8] = True  # left-padded prompt: its first three query rows see nothing
    slots = jnp.arange(8, dtype=jnp.int32)
    _assert_parity("chunked", q, k, v, slots, valid, cotangent, block_size=4)


def test_chunked_vmaps_and_keeps_bfloat16():
    q, k, v, _ = _inputs(6, 2, 16, 16, 4, 2, 8)
    slots = jnp.arange(16, dtype=jnp.int32)
    valid = jnp.asarray(_ragged_valid(2, 16))

    def one(q, k, v, valid):  # one batch element, as [1, ...]
        out = attn.attention(
            q[None], k[None], v[None], query_slots_T=slots, key_valid_BxS=valid[None], scale=SCALE,
            implementation="chunked", block_size=4,
        )
        return out[0]

    batched = jax.jit(jax.vmap(one))(q, k, v, valid)
    direct = attn.attention(q, k, v, query_slots_T=slots, key_valid_BxS=valid, scale=SCALE, implementation="xla")
    assert _relative(batched, direct) <= PARITY
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out16 = attn.attention(
        q16, k16, v16, query_slots_T=slots, key_valid_BxS=valid, scale=SCALE, implementation="chunked", block_size=4
    )
    assert out16.dtype == jnp.bfloat16
    assert _relative(out16, direct) < 3e-2  # bfloat16 inputs, float32 statistics


@pytest.mark.parametrize("name", HEADS)
def test_splash_matches_xla_on_real_rows(name):
    B, N, K, H = HEADS[name]
    T = 40  # padded to the kernel's 128 internally
    q, k, v, cotangent = _inputs(7, B, T, T, N, K, H)
    valid = _ragged_valid(B, T, seed=2)
    slots = jnp.arange(T, dtype=jnp.int32)
    _assert_parity("splash", q, k, v, slots, valid, cotangent, rows_BxT=valid, interpret=True)


def test_splash_rejects_cross_attention():
    q, k, v, _ = _inputs(8, 1, 4, 8, 2, 2, 8)
    with pytest.raises(ValueError, match="self-attention"):
        attn.attention(
            q, k, v, query_slots_T=jnp.arange(4, dtype=jnp.int32), key_valid_BxS=jnp.ones((1, 8), bool),
            scale=SCALE, implementation="splash", interpret=True,
        )
    q, k, v, _ = _inputs(8, 1, 4, 4, 2, 2, 8)
    with pytest.raises(ValueError, match="arange"):
        attn.attention(
            q, k, v, query_slots_T=jnp.arange(1, 5, dtype=jnp.int32), key_valid_BxS=jnp.ones((1, 4), bool),
            scale=SCALE, implementation="splash", interpret=True,
        )


def test_attention_refuses_unresolved_names():
    q, k, v, _ = _inputs(9, 1, 2, 2, 2, 1, 4)
    for name in ("auto", "flash"):
        with pytest.raises(ValueError, match="resolve_implementation"):
            attn.attention(
                q, k, v, query_slots_T=jnp.arange(2, dtype=jnp.int32), key_valid_BxS=jnp.ones((1, 2), bool),
                scale=SCALE, implementation=name,
            )


def test_resolve_implementation():
    assert attn.resolve_implementation("auto", "cpu") == "chunked"
    assert attn.resolve_implementation("auto", "tpu") == "splash"
    assert attn.resolve_implementation("auto") == "chunked"  # the test backend is the CPU
    assert attn.resolve_implementation("auto", "gpu") in ("cudnn", "chunked")
    assert attn.resolve_implementation("xla", "cpu") == "xla"
    assert attn.resolve_implementation("splash", "cpu", interpret=True) == "splash"
    with pytest.raises(ValueError, match="TPU"):
        attn.resolve_implementation("splash", "cpu")
    with pytest.raises(ValueError, match="GPU"):
        attn.resolve_implementation("cudnn", "cpu")
    with pytest.raises(ValueError, match="auto, xla, chunked, splash, cudnn"):
        attn.resolve_implementation("flash", "cpu")


def _grad_temp_bytes(impl, T, *, B=1, N=4, H=64, block_size=128):
    """Temporary bytes of the compiled fwd + bwd of self-attention at ``T`` tokens (float32)."""
    spec = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)

    def loss(q, k, v, valid):
        out = attn.attention(
            q, k, v, query_slots_T=jnp.arange(T, dtype=jnp.int32), key_valid_BxS=valid, scale=SCALE,
            implementation=impl, block_size=block_size,
        )
        return jnp.sum(out)

    args = (spec, spec, spec, jax.ShapeDtypeStruct((B, T), jnp.bool_))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_is_linear_in_length():
    B, N, T = 1, 4, 2048
    scores_bytes = B * N * T * T * 4
    chunked, chunked_2x = _grad_temp_bytes("chunked", T), _grad_temp_bytes("chunked", 2 * T)
    xla = _grad_temp_bytes("xla", T)
    assert chunked < scores_bytes / 4, (chunked, scores_bytes)
    assert chunked < xla / 10, (chunked, xla)
    assert chunked_2x < 2.5 * chunked, (chunked, chunked_2x)  # O(T), not O(T²)


def test_splash_compiles_for_tpu_topology(monkeypatch):
    pytest.importorskip("libtpu", reason="libtpu (the tpu extra) is needed to compile for a TPU topology")
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock when it loads unless told otherwise; a compile-only topology
    # needs no exclusive TPU, and another process (a parallel test run, `opd-jax plan`) may hold it.
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    topology = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
    mesh = jax.sharding.Mesh(
        np.array(topology.devices).reshape(1, 2, 2), ("data", "fsdp", "tensor"),
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
    )
    B, T, N, K, H = 2, 1024, 8, 4, 128
    heads = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor", None))
    rows = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), None))

    def grads(q, k, v, valid):
        def loss(q, k, v):
            out = attn.attention(
                q, k, v, query_slots_T=jnp.arange(T, dtype=jnp.int32), key_valid_BxS=valid, scale=H**-0.5,
                implementation="splash",
            )
            return jnp.sum(out.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    args = (
        jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16, sharding=heads),
        jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16, sharding=heads),
        jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16, sharding=heads),
        jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=rows),
    )
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match="jax_enable_x64"):  # conftest turns it on
            jax.jit(grads).lower(*args)
    # The splash kernel lowers for TPU only with 32-bit jax (the default); lowering happens in .lower().
    with jax.set_mesh(mesh), jax.enable_x64(False):
        compiled = jax.jit(grads).lower(*args).compile()
        # Three key/value heads cannot be split over the two-way "tensor" axis.
        batch_only = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
        q6 = jax.ShapeDtypeStruct((B, T, 6, H), jnp.bfloat16, sharding=batch_only)
        kv3 = jax.ShapeDtypeStruct((B, T, 3, H), jnp.bfloat16, sharding=batch_only)
        with pytest.raises(ValueError, match="divisible by the 'tensor' mesh axis"):
            jax.jit(grads).lower(q6, kv3, kv3, args[3])
    hlo = compiled.as_text()
    assert 'custom_call_target="tpu_custom_call"' in hlo
    kernels = set(re.findall(r"splash_mqa_(?:fwd|dq|dkv)\w*", hlo))
    assert {"fwd", "dq", "dkv"} <= {name.split("_")[2] for name in kernels}, kernels
    assert "all-gather" not in hlo  # the kernel ran on local shards, nothing was gathered
    assert compiled.memory_analysis().temp_size_in_bytes < B * N * T * T * 4 / 8
