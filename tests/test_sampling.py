"""The KV-cache sampler and teacher scoring."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import models, sampling
from opd_jax.models.decoder import DecodeCache

CONFIG = models.DecoderConfig(
    "qwen3", vocab_size=80, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=12, qk_norm=True, max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def model():
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(0))
    # Sharper than the 0.02 initialisation so that sampling distributions are far from uniform.
    model.embedding[...] = model.embedding[...] * 40
    return model


def _ragged_prompts():
    lengths = np.array([6, 2, 4, 1])
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CONFIG.vocab_size, size=(4, 6)).astype(np.int32)
    mask = np.arange(6)[None, :] >= 6 - lengths[:, None]  # left padding
    return jnp.asarray(np.where(mask, tokens, 0)), jnp.asarray(mask)


def test_cached_sampling_logp_equals_full_forward_score_with_ragged_prompts(model):
    prompts, mask = _ragged_prompts()
    rollout = sampling.generate(model, prompts, mask, jax.random.key(1), sampling.SamplingConfig(max_new_tokens=12))
    scored = sampling.score(model, rollout.tokens, rollout.token_mask, chunk_size=5)
    response = np.asarray(rollout.response_mask)
    assert response[:, 6:].all() and not response[:, :6].any()  # no stop ids: every slot is sampled
    np.testing.assert_allclose(np.where(response, scored, 0), rollout.sampling_logp, atol=1e-5)
    assert np.all(np.asarray(rollout.sampling_logp)[response] < 0)


def test_padding_does_not_change_a_rows_tokens_or_log_probs(model):
    """A prompt sampled alone (no padding) and inside a ragged batch gives the same greedy response."""
    prompts, mask = _ragged_prompts()
    config = sampling.SamplingConfig(max_new_tokens=8, temperature=0)
    batched = sampling.generate(model, prompts, mask, jax.random.key(0), config)
    alone = sampling.generate(model, prompts[2:3, 2:], mask[2:3, 2:], jax.random.key(0), config)
    np.testing.assert_array_equal(batched.tokens[2, 6:], alone.tokens[0, 4:])
    np.testing.assert_allclose(
        sampling.score(model, batched.tokens, batched.token_mask)[2, 6:],
        sampling.score(model, alone.tokens, alone.token_mask)[0, 4:],
        atol=1e-5,
    )


def test_low_temperature_equals_greedy_and_greedy_follows_the_argmax(model):
    prompts, mask = _ragged_prompts()
    greedy = sampling.generate(model, prompts, mask, jax.random.key(0), sampling.SamplingConfig(10, temperature=0))
    cold = sampling.generate(model, prompts, mask, jax.random.key(7), sampling.SamplingConfig(10, temperature=1e-6))
    np.testing.assert_array_equal(greedy.tokens, cold.tokens)
    top1 = sampling.generate(model, prompts, mask, jax.random.key(3), sampling.SamplingConfig(10, top_k=1))
    np.testing.assert_array_equal(greedy.tokens, top1.tokens)
    np.testing.assert_allclose(top1.sampling_logp, 0.0, atol=1e-6)  # a point mass after top-k = 1
    logits = model(greedy.tokens, positions_BxT=sampling.positions_from_mask(greedy.token_mask),
                   token_mask_BxT=greedy.token_mask)
    np.testing.assert_array_equal(jnp.argmax(logits[:, 5:-1], axis=-1), greedy.tokens[:, 6:])


def test_fixed_key_reproduces_tokens_and_other_keys_differ(model):
    prompts, mask = _ragged_prompts()
    config = sampling.SamplingConfig(max_new_tokens=10)
    first = sampling.generate(model, prompts, mask, jax.random.key(11), config)
    again = sampling.generate(model, prompts, mask, jax.random.key(11), config)
    other = sampling.generate(model, prompts, mask, jax.random.key(12), config)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens, other.tokens)


def test_stop_ids_end_rows_independently_and_pad_the_rest(model):
    prompts, mask = _ragged_prompts()
    greedy = sampling.generate(model, prompts, mask, jax.random.key(0), sampling.SamplingConfig(10, temperature=0))
    stop = int(greedy.tokens[0, 8])  # row 0 emits this token at its third response slot
    config = sampling.SamplingConfig(10, temperature=0, stop_ids=(stop,), pad_id=0)
    rollout = sampling.generate(model, prompts, mask, jax.random.key(0), config)
    tokens, response = np.asarray(rollout.tokens), np.asarray(rollout.response_mask)
    for row in range(4):
        generated = tokens[row, 6:]
        hits = np.flatnonzero(generated == stop)
        length = hits[0] + 1 if hits.size else 10
        assert response[row, 6:].sum() == length  # the stop token belongs to the response
        assert np.all(generated[length:] == 0)
        np.testing.assert_array_equal(generated[:length], np.asarray(greedy.tokens)[row, 6 : 6 + length])
    assert response[0, 6:].sum() <= 3
    np.testing.assert_array_equal(rollout.token_mask, np.concatenate([np.asarray(mask), response[:, 6:]], axis=1))


def test_top_k_and_top_p_only_sample_inside_the_kept_set(model):
    prompts, mask = _ragged_prompts()
    for config in (sampling.SamplingConfig(6, top_k=3), sampling.SamplingConfig(6, top_p=0.5)):
        rollout = sampling.generate(model, prompts, mask, jax.random.key(2), config)
        logits = model(rollout.tokens, positions_BxT=sampling.positions_from_mask(rollout.token_mask),
                       token_mask_BxT=rollout.token_mask)[:, 5:-1]
        sampled = np.asarray(rollout.tokens[:, 6:])
        order = np.argsort(-np.asarray(logits), axis=-1)
        rank = np.argmax(order == sampled[..., None], axis=-1)
        if config.top_k is not None:
            assert rank.max() < 3
        else:
            probs = np.asarray(jax.nn.softmax(logits, axis=-1))
            sorted_probs = np.take_along_axis(probs, order, axis=-1)
            mass_before = np.take_along_axis(np.cumsum(sorted_probs, -1) - sorted_probs, rank[..., None], -1)[..., 0]
            assert np.all(mass_before < 0.5 + 1e-5)
        # log-probs are those of the renormalised, truncated distribution: larger than the raw ones
        raw = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), sampled[..., None], -1)[..., 0]
        assert np.all(np.asarray(rollout.sampling_logp[:, 6:]) >= raw - 1e-5)


def test_score_chunking_and_temperature(model):
    prompts, mask = _ragged_prompts()
    rollout = sampling.generate(model, prompts, mask, jax.random.key(4), sampling.SamplingConfig(8))
    whole = sampling.score(model, rollout.tokens, rollout.token_mask)
    for chunk in (1, 7, 13, 1000):
        np.testing.assert_allclose(sampling.score(model, rollout.tokens, rollout.token_mask, chunk_size=chunk), whole,
                                   atol=1e-6)
    hot = sampling.score(model, rollout.tokens, rollout.token_mask, temperature=2.0)
    logits = model(rollout.tokens, positions_BxT=sampling.positions_from_mask(rollout.token_mask),
                   token_mask_BxT=rollout.token_mask)
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1] / 2.0, -1), rollout.tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(hot)[:, 6:], np.asarray(expected)[:, 5:], atol=1e-5)


def test_bad_input_is_named(model):
    prompts, mask = _ragged_prompts()
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings 64"):
        sampling.generate(model, prompts, mask, jax.random.key(0), sampling.SamplingConfig(max_new_tokens=60))
    with pytest.raises(ValueError, match=r"prompt_tokens \[4, 6\] and prompt_mask \[4, 5\]"):
        sampling.generate(model, prompts, mask[:, 1:], jax.random.key(0), sampling.SamplingConfig(4))
    for kwargs, field in (({"top_p": 0.0}, "top_p"), ({"top_k": 0}, "top_k"), ({"temperature": -1}, "temperature"),
                          ({"max_new_tokens": 0}, "max_new_tokens")):
        with pytest.raises(ValueError, match=field):
            sampling.SamplingConfig(**({"max_new_tokens": 4} | kwargs))


# --------------------------------------------------------------------------------------------------
# The decode path of generate: prepared weights, the per-layer cache, segments, the sampler's RNG

BIASED = models.DecoderConfig(
    "llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
    head_dim=8, qkv_bias=True, mlp_bias=True, tie_word_embeddings=True, max_position_embeddings=256,
    rope=models.RopeConfig(theta=500_000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=64),
)


def _randomised(config, seed=0):
    """A decoder whose every parameter (norms and zero-initialised biases too) is random."""
    model = models.Decoder(config, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [leaf + 0.3 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


@pytest.mark.parametrize("config", [CONFIG, BIASED], ids=["qwen3", "llama_biased_tied"])
def test_decode_weights_are_the_separate_projections_side_by_side(config):
    model = _randomised(config)
    weights = model.decode_weights()
    d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    attention, mlp = model.layers.attention, model.layers.mlp
    for i, layer in enumerate(weights.layers):
        x = jax.random.normal(jax.random.key(i), (5, d))
        qkv = np.asarray(x @ layer.qkv_DxE)
        np.testing.assert_array_equal(qkv[:, : n * h], np.asarray(x @ attention.q[...][i].reshape(d, n * h)))
        np.testing.assert_array_equal(qkv[:, n * h : (n + k) * h], np.asarray(x @ attention.k[...][i].reshape(d, -1)))
        np.testing.assert_array_equal(qkv[:, (n + k) * h :], np.asarray(x @ attention.v[...][i].reshape(d, -1)))
        gate_up = np.asarray(x @ layer.gate_up_Dx2F)
        np.testing.assert_array_equal(gate_up[:, : config.intermediate_size], np.asarray(x @ mlp.gate[...][i]))
        np.testing.assert_array_equal(gate_up[:, config.intermediate_size :], np.asarray(x @ mlp.up[...][i]))
        np.testing.assert_array_equal(layer.o_ExD, attention.o[...][i].reshape(n * h, d))
        if config.qkv_bias:
            np.testing.assert_array_equal(layer.qkv_bias_E, np.concatenate(
                [attention.q_bias[...][i].ravel(), attention.k_bias[...][i].ravel(), attention.v_bias[...][i].ravel()]))
            np.testing.assert_array_equal(layer.gate_up_bias_2F,
                                          np.concatenate([mlp.gate_bias[...][i], mlp.up_bias[...][i]]))
        if config.qk_norm:
            np.testing.assert_array_equal(layer.qk_norm_MxH[:n], np.broadcast_to(attention.q_norm.weight[...][i], (n, h)))
            np.testing.assert_array_equal(layer.qk_norm_MxH[n:], np.broadcast_to(attention.k_norm.weight[...][i], (k, h)))
        else:
            assert layer.qk_norm_MxH is None
    np.testing.assert_array_equal(weights.projection_DxV, model.output_projection())


@pytest.mark.parametrize("config", [CONFIG, BIASED], ids=["qwen3", "llama_biased_tied"])
def test_decode_step_equals_the_cached_forward_pass(config):
    """decode_step over a grown DecodeCache gives the logits of hidden_states + logits with a
    KVCache, token by token, padding rows and dead rows included."""
    model = _randomised(config)
    prompts, mask = _ragged_prompts()
    prompts = prompts % config.vocab_size
    batch, length, steps = 4, prompts.shape[1], 7
    positions = sampling.positions_from_mask(mask)
    cache = models.KVCache.zeros(config, batch, length + steps)
    _, cache = model.hidden_states(prompts, positions_BxT=positions, token_mask_BxT=mask, cache=cache)
    prefill = models.KVCache.zeros(config, batch, length)
    _, prefill = model.hidden_states(prompts, positions_BxT=positions, token_mask_BxT=mask, cache=prefill)
    decode_cache = DecodeCache.from_cache(prefill, length + 3)
    weights = model.decode_weights()
    step = jax.jit(model.decode_step)
    rng = np.random.default_rng(1)
    position = positions[:, -1] + 1
    for t in range(steps):
        tokens = jnp.asarray(rng.integers(0, config.vocab_size, batch), jnp.int32)
        live = jnp.asarray([True, t < 3, True, t % 2 == 0])
        hidden, cache = model.hidden_states(tokens[:, None], positions_BxT=position[:, None],
                                            token_mask_BxT=live[:, None], cache=cache)
        expected = model.logits(hidden)[:, 0]
        if decode_cache.num_slots == decode_cache.index:
            decode_cache = decode_cache.grown(decode_cache.num_slots + 2)
        logits, decode_cache = step(weights, tokens, position, live, decode_cache)
        np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=2e-5)
        position = position + 1
    assert int(decode_cache.index) == length + steps


def test_cache_segments_grow_to_the_rollout_length():
    assert sampling.cache_segments(16, 128) == (144,)
    assert sampling.cache_segments(16, 512) == (144, 272, 400, 528)
    assert sampling.cache_segments(6, 1) == (7,)
    sizes = sampling.cache_segments(100, 8000)
    assert sizes[0] == 228 and sizes[-1] == 8100 and len(sizes) < 25
    steps = np.diff(sizes)
    assert np.all(steps >= 1) and np.all(steps[:-1] >= 128) and np.all(steps[:-1] % 128 == 0)
    assert np.all(steps[:-1] <= np.maximum(128, np.asarray(sizes[:-2]) // 4 + 128))


def test_rollouts_across_cache_segments_match_scoring_and_stop_early():
    """151 new tokens run in two decode segments (144 slots, then 157): log-probs still equal the
    full forward pass, and rows stopping in either segment are padded from there on."""
    config = dataclasses.replace(CONFIG, max_position_embeddings=256)
    model = models.Decoder(config, rngs=nnx.Rngs(3))
    model.embedding[...] = model.embedding[...] * 40
    prompts, mask = _ragged_prompts()
    assert sampling.cache_segments(6, 151) == (134, 157)
    rollout = sampling.generate(model, prompts, mask, jax.random.key(5), sampling.SamplingConfig(151))
    response = np.asarray(rollout.response_mask)
    assert response[:, 6:].all()
    scored = sampling.score(model, rollout.tokens, rollout.token_mask)
    np.testing.assert_allclose(np.where(response, scored, 0), rollout.sampling_logp, atol=2e-5)
    tokens = np.asarray(rollout.tokens)
    stop = int(tokens[0, 6 + 140])  # row 0 emits it in the second segment (or earlier)
    stopped = sampling.generate(model, prompts, mask, jax.random.key(5), sampling.SamplingConfig(151, stop_ids=(stop,)))
    for row in range(4):
        hits = np.flatnonzero(tokens[row, 6:] == stop)
        length = hits[0] + 1 if hits.size else 151
        assert np.asarray(stopped.response_mask)[row, 6:].sum() == length
        np.testing.assert_array_equal(np.asarray(stopped.tokens)[row, 6 : 6 + length], tokens[row, 6 : 6 + length])


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5])
def test_sampler_random_numbers_are_bitwise_those_of_jax_random(seed):
    """Step n's key is the second half of the n-th split of the key chain, and slot s's noise is
    row row_S[s] of jax.random.gumbel(that key, (rows, V)): a row's tokens depend on the key, its
    row and its step only, never on the slot it is decoded in."""
    key = jax.random.key(seed)
    first, second = jax.jit(sampling._split)(key)
    expected = jax.random.split(key)
    np.testing.assert_array_equal(jax.random.key_data(first), jax.random.key_data(expected[0]))
    np.testing.assert_array_equal(jax.random.key_data(second), jax.random.key_data(expected[1]))
    steps = jax.jit(sampling._step_keys, static_argnums=1)(key, 3)
    chain = key
    for n in range(3):
        chain, sample = jax.random.split(chain)
        np.testing.assert_array_equal(jax.random.key_data(steps[n]), jax.random.key_data(sample))
    keys, rows = steps[jnp.asarray([0, 2, 1, 2])], jnp.asarray([5, 0, 63, 5])
    for vocab in (7, 1024, 4099):
        noise = jax.jit(sampling._gumbel_rows, static_argnums=(2, 3))(keys, rows, 64, vocab)
        for s in range(4):
            np.testing.assert_array_equal(noise[s], jax.random.gumbel(keys[s], (64, vocab), jnp.float32)[rows[s]])
    logits = 3 * jax.random.normal(jax.random.key(seed + 7), (4, 80), jnp.float32)  # as the model gives
    tokens, logp = jax.jit(sampling._sample, static_argnums=(3, 4))(logits, keys, rows, 64, sampling.SamplingConfig(4))
    for s in range(4):
        full = jnp.zeros((64, 80), jnp.float32).at[rows[s]].set(logits[s])
        assert tokens[s] == jax.random.categorical(keys[s], full)[rows[s]]
    np.testing.assert_array_equal(logp, jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, None], -1)[:, 0])
    greedy, _ = sampling._sample(logits, keys, rows, 64, sampling.SamplingConfig(4, temperature=0))
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
    # Ties go to the first maximal entry, as argmax does.
    tied = jnp.zeros((2, 5)).at[:, 1].set(1).at[:, 3].set(1)
    np.testing.assert_array_equal(sampling._first_argmax(tied), [1, 1])


def test_other_key_implementations_fall_back_to_jax_random():
    key = jax.random.key(4, impl="rbg")
    assert not sampling._straight_threefry_applies(key)
    first, _ = sampling._split(key)
    np.testing.assert_array_equal(jax.random.key_data(first), jax.random.key_data(jax.random.split(key)[0]))
    keys = jnp.stack([key, first])
    np.testing.assert_array_equal(sampling._gumbel_rows(keys, jnp.asarray([3, 1]), 4, 5)[1],
                                  jax.random.gumbel(first, (4, 5), jnp.float32)[1])


def _stopping_batch(rows: int, prompt_length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, prompt_length + 1, rows)
    mask = np.arange(prompt_length)[None] >= prompt_length - lengths[:, None]
    return np.where(mask, rng.integers(1, CONFIG.vocab_size, (rows, prompt_length)), 0).astype(np.int32), mask


def test_a_rows_tokens_do_not_depend_on_the_slots_it_is_decoded_in():
    """32 prompts in 32, 8 and 1 slots, across two cache segments (150 new tokens): slots refill as
    rows stop, yet every row's tokens and masks are bitwise those of the static batch."""
    config = dataclasses.replace(CONFIG, max_position_embeddings=256)
    model = models.Decoder(config, rngs=nnx.Rngs(0))
    model.embedding[...] = model.embedding[...] * 40
    tokens, mask = _stopping_batch(32, 6)
    rollouts = {
        slots: sampling.generate(model, tokens, mask, jax.random.key(2),
                                 sampling.SamplingConfig(150, stop_ids=(3, 7, 11), slots=slots))
        for slots in (32, 8, 1)
    }
    static = rollouts[32]
    lengths = np.asarray(static.response_mask).sum(1)
    assert lengths.min() < 10 and lengths.max() > 128  # rows stop in both segments
    for slots, rollout in rollouts.items():
        np.testing.assert_array_equal(rollout.tokens, static.tokens, err_msg=f"slots={slots}")
        np.testing.assert_array_equal(rollout.response_mask, static.response_mask, err_msg=f"slots={slots}")
        np.testing.assert_array_equal(rollout.token_mask, static.token_mask, err_msg=f"slots={slots}")
        np.testing.assert_allclose(rollout.sampling_logp, static.sampling_logp, atol=1e-6, rtol=0)
        scored = sampling.score(model, rollout.tokens, rollout.token_mask)
        np.testing.assert_allclose(np.where(rollout.response_mask, scored, 0), rollout.sampling_logp, atol=1e-5)


def test_slots_are_checked_clamped_and_sized(model, caplog):
    tokens, mask = _stopping_batch(4, 6)
    with pytest.raises(ValueError, match=r"slots must be None \(chosen from the batch\) or >= 1, got 0"):
        sampling.SamplingConfig(8, slots=0)
    with caplog.at_level("INFO", logger="opd_jax.sampling"):
        clamped = sampling.generate(model, tokens, mask, jax.random.key(0), sampling.SamplingConfig(8, slots=9))
    assert "slots 9 is more than the 4 prompts: decoding in 4 slots" in caplog.text
    np.testing.assert_array_equal(
        clamped.tokens, sampling.generate(model, tokens, mask, jax.random.key(0), sampling.SamplingConfig(8)).tokens)
    with pytest.raises(ValueError, match=r"stop_ids \[80, -1\] lie outside the vocabulary: allowed ids are 0\.\.79"):
        sampling.generate(model, tokens, mask, jax.random.key(0), sampling.SamplingConfig(8, stop_ids=(3, 80, -1)))
    # No stop ids with fewer slots than prompts: no slot could free up early.
    with pytest.raises(ValueError, match=r"stop_ids is empty, but 4 prompts decode in 2 slots.*allowed ids are 0\.\.79"):
        sampling.generate(model, tokens, mask, jax.random.key(0), sampling.SamplingConfig(8, slots=2))
    # Refused before anything is compiled or allocated: 2 · 64 layers · 8 heads · 128 dims · 2 bytes
    # per token and slot, for 32768 tokens × 2**20 slots.
    big = dataclasses.replace(CONFIG, num_layers=64, num_heads=32, num_kv_heads=8, head_dim=128)
    with pytest.raises(ValueError, match=r"slots 1048576 × sequence length 32768 needs a KV cache of \d+ bytes "
                                         r"\(\d+ per device over \d+ devices\).*at most \d+ slots fit"):
        sampling.resolve_slots(sampling.SamplingConfig(32000, slots=2**20), 2**20, big, jnp.bfloat16, 32768,
                               (4, 2**34))
    # Chosen slots are lowered to what fits instead: a slot takes 32768 · (2**18 + 1) bytes (the
    # validity mask's byte per token included), so 4 devices of 2**34 bytes hold 7, not 8.
    chosen = sampling.resolve_slots(sampling.SamplingConfig(32000, stop_ids=(1,)), 2**20, big, jnp.bfloat16, 32768,
                                    (4, 2**34))
    assert sampling.kv_cache_bytes(big, 1, 32768, jnp.bfloat16) == 32768 * (2 * 64 * 8 * 128 * 2 + 1)
    assert chosen == 7
    # Without memory facts (a program traced for other devices) the slots stand.
    assert sampling.resolve_slots(sampling.SamplingConfig(32000, slots=2**20), 2**20, big, jnp.bfloat16, 32768) == 2**20
    assert sampling.default_slots(1000, ()) == 1000 and sampling.default_slots(1000, (2,)) == 250
    assert sampling.default_slots(100, (2,)) == 64 and sampling.default_slots(10, (2,)) == 10


def test_group_sampling_prefills_each_prompt_once_and_samples_the_same_tokens(model):
    """8 prompts × 4 copies: with group_size 4 each prompt is prefilled once (the first prefill and
    every refill take whole groups), and the tokens are those sampled without sharing."""
    unique, unique_mask = _stopping_batch(8, 6, seed=1)
    tokens, mask = np.repeat(unique, 4, axis=0), np.repeat(unique_mask, 4, axis=0)
    for slots in (32, 8):
        config = sampling.SamplingConfig(40, stop_ids=(3, 7, 11), slots=slots)
        alone = sampling.generate(model, tokens, mask, jax.random.key(3), config)
        shared = sampling.generate(model, tokens, mask, jax.random.key(3), dataclasses.replace(config, group_size=4))
        assert len({tuple(row) for row in np.asarray(alone.tokens)}) > 8  # copies sample different responses
        np.testing.assert_array_equal(shared.tokens, alone.tokens)
        np.testing.assert_array_equal(shared.response_mask, alone.response_mask)
        np.testing.assert_allclose(shared.sampling_logp, alone.sampling_logp, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        sampling.SamplingConfig(8, group_size=0)
    # One prefill per group: the prefill's layer scan sees 8 rows, not 32.
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(sampling._generate, static_argnums=(0, 5, 6))(
        graphdef, state, tokens, mask, jax.random.key(0), sampling.SamplingConfig(40, group_size=4), 32)

    def scans(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                yield eqn
            for value in eqn.params.values():  # pjit / while / cond bodies
                for inner in value if isinstance(value, tuple) else (value,):
                    if hasattr(getattr(inner, "jaxpr", inner), "eqns"):
                        yield from scans(getattr(inner, "jaxpr", inner))

    hidden_rows = [v.aval.shape[0] for e in scans(jaxpr.jaxpr) for v in e.outvars if v.aval.ndim == 3]
    assert hidden_rows and set(hidden_rows) == {8}
