"""The KV-cache sampler and teacher scoring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import models, sampling

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
