"""Rollouts with a KV cache, and scoring of token sequences by a teacher or the student.

Layout shared by every function here: a batch of sequences ``[B, L]`` with ``L = P + N``: a
left-padded prompt of ``P`` slots followed by ``N`` generated slots. Masks say which slots hold real
tokens (``token_mask``) and which hold response tokens (``response_mask``); per-token arrays
(log-probabilities, advantages) use the same ``[B, L]`` indexing, so a rollout's
``sampling_logp``, :func:`score`'s output and :func:`opd_jax.token_advantages` line up directly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.chunking import map_row_chunks
from opd_jax.models.decoder import DecodeCache, Decoder, KVCache

Array = jax.Array

__all__ = ["Rollout", "SamplingConfig", "generate", "positions_from_mask", "score", "token_log_probs",
           "token_log_probs_and_hidden"]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample a response.

    Attributes:
      max_new_tokens: ``N``, the number of generated slots.
      temperature: ``0`` is greedy decoding; otherwise logits are divided by it.
      top_k: keep only the ``k`` most likely tokens (``None``: all).
      top_p: keep the smallest set of most likely tokens whose probability reaches ``p``
        (``None``: all).
      stop_ids: tokens that end a response (EOS and any extra stop ids); the stop token is part of
        the response.
      pad_id: the token written in slots after a response has ended.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be None or in (0, 1], got {self.top_p}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
    """Sampled sequences, ``[B, L]`` each with ``L = P + N``.

    Attributes:
      tokens: int32 ids: the left-padded prompt, then the response, then ``pad_id``.
      token_mask: bool, real tokens (prompt and response).
      response_mask: bool, response tokens (up to and including the stop token).
      sampling_logp: float32 log-probability of each response token under the distribution it was
        sampled from (after temperature / top-k / top-p; 0 for greedy); 0 outside the response.
    """

    tokens: Array
    token_mask: Array
    response_mask: Array
    sampling_logp: Array


def positions_from_mask(token_mask_BxL: Array) -> Array:
    """RoPE positions that count real tokens only, so left padding does not shift them."""
    return jnp.maximum(jnp.cumsum(token_mask_BxL.astype(jnp.int32), axis=-1) - 1, 0)


def _filter_logits(logits_BxV: Array, config: SamplingConfig) -> Array:
    """Temperature, top-k and top-p applied to float32 logits; removed tokens get ``-inf``."""
    scaled = logits_BxV / config.temperature
    if config.top_k is not None and config.top_k < scaled.shape[-1]:
        kth_largest = jax.lax.top_k(scaled, config.top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth_largest, -jnp.inf, scaled)
    if config.top_p is not None and config.top_p < 1:
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        # The smallest logit still needed to reach top_p; the most likely token is always kept.
        kept = jnp.where(mass_before < config.top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    return scaled


# Threefry-2x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): 20
# rounds in 5 groups of 4, rotation constants alternating between the two groups below, a key
# injection after every group.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA


def _rotate_left(x: Array, bits: int) -> Array:
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def _threefry2x32(k1: Array, k2: Array, x1: Array, x2: Array) -> tuple[Array, Array]:
    """Threefry-2x32 of the counter words ``(x1, x2)`` (uint32) under the key words ``(k1, k2)``,
    written out straight so that XLA fuses it into one elementwise kernel. jax lowers its own
    (same) hash on CPU as a 5-step loop, which costs a dozen passes over the ``[B, V]`` noise per
    decode step; the result is bitwise that of ``jax.random`` (checked in tests/test_sampling.py)."""
    keys = (k1, k2, k1 ^ k2 ^ np.uint32(_THREEFRY_PARITY))
    x1, x2 = x1 + keys[0], x2 + keys[1]
    for group in range(5):
        for rotation in _THREEFRY_ROTATIONS[group % 2]:
            x1 = x1 + x2
            x2 = _rotate_left(x2, rotation) ^ x1
        x1 = x1 + keys[(group + 1) % 3]
        x2 = x2 + keys[(group + 2) % 3] + np.uint32(group + 1)
    return x1, x2


def _straight_threefry_applies(key: Array) -> bool:
    """Whether :func:`_split` / :func:`_gumbel` reproduce ``jax.random`` for this key: a threefry
    key with the (default) partitionable counter layout and low-range Gumbel noise."""
    return (
        str(jax.random.key_impl(key)) == "threefry2x32"
        and bool(jax.config.jax_threefry_partitionable)
        and not bool(jax.config.jax_high_dynamic_range_gumbel)
    )


def _split(key: Array) -> tuple[Array, Array]:
    """``jax.random.split(key)`` as a pair."""
    if not _straight_threefry_applies(key):
        first, second = jax.random.split(key)
        return first, second
    k = jax.random.key_data(key)
    bits1, bits2 = _threefry2x32(k[0], k[1], jnp.zeros((2,), jnp.uint32), jnp.arange(2, dtype=jnp.uint32))
    wrap = functools.partial(jax.random.wrap_key_data, impl="threefry2x32")
    return wrap(jnp.stack([bits1[0], bits2[0]])), wrap(jnp.stack([bits1[1], bits2[1]]))


def _gumbel(key: Array, shape: tuple[int, int]) -> Array:
    """``jax.random.gumbel(key, shape)`` in float32 (``shape`` 2-D, fewer than 2**32 entries)."""
    if not _straight_threefry_applies(key) or shape[0] * shape[1] >= 2**32:
        return jax.random.gumbel(key, shape, jnp.float32)
    k = jax.random.key_data(key)
    rows = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    columns = jax.lax.broadcasted_iota(jnp.uint32, shape, 1)
    bits1, bits2 = _threefry2x32(k[0], k[1], jnp.zeros(shape, jnp.uint32), rows * np.uint32(shape[1]) + columns)
    # 23 random mantissa bits under exponent 0: a float in [1, 2), minus 1, mapped to [tiny, 1).
    mantissa = ((bits1 ^ bits2) >> np.uint32(32 - 23)) | np.uint32(0x3F800000)
    tiny = jnp.float32(np.finfo(np.float32).tiny)
    uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - jnp.float32(1)
    uniform = jnp.maximum(tiny, uniform * (jnp.float32(1) - tiny) + tiny)
    return -jnp.log(-jnp.log(uniform))


def _first_argmax(x_BxV: Array) -> Array:
    """``jnp.argmax(x, axis=-1)`` (the first maximal index) for rows without NaN, as a maximum and a
    minimum: XLA:CPU runs argmax's variadic (value, index) reduction several times slower."""
    top = jnp.max(x_BxV, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x_BxV.shape, 1)
    return jnp.min(jnp.where(x_BxV == top, index, x_BxV.shape[-1]), axis=-1)


def _sample(logits_BxV: Array, key: Array, config: SamplingConfig) -> tuple[Array, Array]:
    """Tokens ``[B]`` int32 and their log-probabilities ``[B]`` float32 under the filtered distribution.

    The tokens are those of ``jax.random.categorical(key, filtered)`` (Gumbel-max with the same
    noise), and the log-probability that of ``jax.nn.log_softmax(filtered)`` at the token (the
    same operations, evaluated at the picked entry only).
    """
    if config.temperature == 0:
        return _first_argmax(logits_BxV), jnp.zeros(logits_BxV.shape[:1], jnp.float32)
    filtered = _filter_logits(logits_BxV, config)
    noise = _gumbel(key, filtered.shape)
    tokens = _first_argmax(noise + filtered)
    shift = jax.lax.stop_gradient(jnp.max(filtered, axis=-1, keepdims=True))
    shifted = filtered - shift
    picked = jnp.take_along_axis(shifted, tokens[:, None], axis=-1)[:, 0]
    logp = picked - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    return tokens, logp


def generate(
    model: Decoder, prompt_tokens: Array, prompt_mask: Array, key: Array, config: SamplingConfig
) -> Rollout:
    """Sample a response for every prompt: one prefill, then cached decoding until all rows stop.

    One jitted program: the prefill (the model's scanned blocks, writing a :class:`KVCache`), the
    decode weights prepared once (:meth:`Decoder.decode_weights`), then the decode loop in segments
    of growing cache size (:func:`cache_segments`), each a ``lax.while_loop`` of
    :meth:`Decoder.decode_step`. The tokens for a key are those of ``jax.random.categorical`` on
    the filtered logits, step by step.

    Args:
      model: the student (or any decoder).
      prompt_tokens: ``[B, P]`` int, left-padded (real tokens at the end of each row).
      prompt_mask: ``[B, P]`` bool or {0, 1}, 1 at real prompt tokens; every row needs at least one.
      key: PRNG key; the same key gives the same tokens.
      config: :class:`SamplingConfig`.

    Returns:
      A :class:`Rollout` of length ``P + max_new_tokens``.

    Raises:
      ValueError: the prompt plus ``max_new_tokens`` exceeds the model's ``max_position_embeddings``,
        or shapes disagree.
    """
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask).astype(bool)
    if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_tokens {list(prompt_tokens.shape)} and prompt_mask {list(prompt_mask.shape)} must be the same [B, P]"
        )
    total = prompt_tokens.shape[1] + config.max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt length {prompt_tokens.shape[1]} + max_new_tokens {config.max_new_tokens} = {total} exceeds "
            f"the model's max_position_embeddings {model.config.max_position_embeddings}"
        )
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt_tokens, prompt_mask, key, config)


# Slots the decode cache grows by (at least): the decode loop runs in segments, each with a cache
# of static size, so attention reads the filled part of the cache plus at most this many slots
# rather than all ``P + N`` from the first step.
_CACHE_GROWTH = 128


def cache_segments(prompt_length: int, max_new_tokens: int, growth: int = _CACHE_GROWTH) -> tuple[int, ...]:
    """Cache sizes of the decode segments: segment ``j`` decodes the steps whose slot fits in
    ``sizes[j]``; the last size is ``P + N``.

    Sizes grow by ``growth`` slots, or by a quarter of the current size once that is larger (a
    long rollout gets O(log N) segments, each one more copy of the decode loop to compile, and
    attention reads at most a quarter more than the filled part).
    """
    total = prompt_length + max_new_tokens
    sizes = [min(total, prompt_length + growth)]
    while sizes[-1] < total:
        step = max(growth, -(-(sizes[-1] // 4) // growth) * growth)
        sizes.append(min(total, sizes[-1] + step))
    return tuple(sizes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _DecodeState:
    """The carry of the decode loop.

    Attributes:
      step: ``[]`` int32, the response slot sampled next.
      logits_BxV: float32 logits of the next token.
      cache: the :class:`DecodeCache` (its ``index`` is ``P + step``).
      position_B: RoPE position of the next token.
      done_B: rows that have emitted a stop id.
      key: PRNG key, split once per step.
      tokens_BxN, mask_BxN, logp_BxN: the response so far (``pad_id`` / False / 0 beyond it).
    """

    step: Array
    logits_BxV: Array
    cache: DecodeCache
    position_B: Array
    done_B: Array
    key: Array
    tokens_BxN: Array
    mask_BxN: Array
    logp_BxN: Array


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def _generate(graphdef, state, prompt_tokens, prompt_mask, key, config: SamplingConfig) -> Rollout:
    model = nnx.merge(graphdef, state)
    batch, prompt_length = prompt_tokens.shape
    new = config.max_new_tokens
    sizes = cache_segments(prompt_length, new)
    prompt_positions = positions_from_mask(prompt_mask)
    hidden, prefill_cache = model.hidden_states(
        prompt_tokens, positions_BxT=prompt_positions, token_mask_BxT=prompt_mask,
        cache=KVCache.zeros(model.config, batch, prompt_length, model.compute_dtype),
    )
    # Once per rollout, outside the loop: fused projections in the compute dtype.
    weights = model.decode_weights()
    stop_ids = jnp.asarray(config.stop_ids, jnp.int32)

    def step(state: _DecodeState) -> _DecodeState:
        key, sample_key = _split(state.key)
        token, token_logp = _sample(state.logits_BxV, sample_key, config)
        live = ~state.done_B
        token = jnp.where(live, token, config.pad_id)
        logits, cache = model.decode_step(weights, token, state.position_B, live, state.cache)
        return _DecodeState(
            step=state.step + 1,
            logits_BxV=logits,
            cache=cache,
            position_B=state.position_B + 1,
            done_B=state.done_B | jnp.isin(token, stop_ids),
            key=key,
            tokens_BxN=state.tokens_BxN.at[:, state.step].set(token),
            mask_BxN=state.mask_BxN.at[:, state.step].set(live),
            logp_BxN=state.logp_BxN.at[:, state.step].set(jnp.where(live, token_logp, 0.0)),
        )

    # Left padding puts every row's last prompt token in the last slot.
    state = _DecodeState(
        step=jnp.zeros((), jnp.int32),
        logits_BxV=model.logits(hidden[:, -1:])[:, 0],
        cache=DecodeCache.from_cache(prefill_cache, sizes[0]),
        position_B=prompt_positions[:, -1] + 1,
        done_B=jnp.zeros((batch,), bool),
        key=key,
        tokens_BxN=jnp.full((batch, new), config.pad_id, jnp.int32),
        mask_BxN=jnp.zeros((batch, new), bool),
        logp_BxN=jnp.zeros((batch, new), jnp.float32),
    )
    for size in sizes:
        # The steps that write slots below `size`; once every row is done, the rest are skipped.
        def keep_going(state: _DecodeState, last=size - prompt_length) -> Array:
            return (state.step < last) & ~jnp.all(state.done_B)

        state = dataclasses.replace(state, cache=state.cache.grown(size))
        state = jax.lax.while_loop(keep_going, step, state)
    pad_prompt = jnp.zeros((batch, prompt_length), bool)
    return Rollout(
        tokens=jnp.concatenate([prompt_tokens, state.tokens_BxN], axis=1),
        token_mask=jnp.concatenate([prompt_mask, state.mask_BxN], axis=1),
        response_mask=jnp.concatenate([pad_prompt, state.mask_BxN], axis=1),
        sampling_logp=jnp.concatenate([jnp.zeros((batch, prompt_length), jnp.float32), state.logp_BxN], axis=1),
    )


def score(
    model: Decoder,
    tokens: Array,
    token_mask: Array,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Array:
    """Per-token log-probabilities ``log p(tokens[t] | tokens[<t])`` in one jitted forward pass.

    The jitted form of :func:`token_log_probs` (see there for the arguments); use that one inside
    your own ``jax.jit`` / ``jax.grad``.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    token_mask = jnp.asarray(token_mask).astype(bool)
    _check_scoring_input(tokens, token_mask, temperature)
    graphdef, state = nnx.split(model)
    return _score(graphdef, state, tokens, token_mask, float(temperature), chunk_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "chunk_size"))
def _score(graphdef, state, tokens, token_mask, temperature: float, chunk_size: int | None) -> Array:
    return token_log_probs(nnx.merge(graphdef, state), tokens, token_mask, temperature=temperature, chunk_size=chunk_size)


def _check_scoring_input(tokens: Array, token_mask: Array, temperature: float) -> None:
    if tokens.shape != token_mask.shape or tokens.ndim != 2:
        raise ValueError(f"tokens {list(tokens.shape)} and token_mask {list(token_mask.shape)} must be the same [B, L]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for scoring, got {temperature}")


def token_log_probs(
    model: Decoder,
    tokens: Array,
    token_mask: Array,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Array:
    """Per-token log-probabilities ``log p(tokens[t] | tokens[<t])``, differentiable in the model.

    The vocabulary projection and log-softmax run ``chunk_size`` tokens at a time (float32) under
    ``jax.checkpoint``, so ``[B, L, V]`` logits are never materialised, forward or backward.

    Args:
      model: teacher or student.
      tokens: ``[B, L]`` int ids (e.g. ``Rollout.tokens``).
      token_mask: ``[B, L]`` bool, real tokens; padding is neither attended to nor scored.
      temperature: logits are divided by it before the softmax (match the rollout's temperature
        when scoring the sampling policy).
      chunk_size: tokens per projection chunk (``None``: all at once).

    Returns:
      ``[B, L]`` float32; 0 at slots that are not real tokens or have no real token before them.
    """
    logp_BxL, _ = token_log_probs_and_hidden(model, tokens, token_mask, temperature=temperature,
                                             chunk_size=chunk_size)
    return logp_BxL


def token_log_probs_and_hidden(
    model: Decoder,
    tokens: Array,
    token_mask: Array,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[Array, Array]:
    """:func:`token_log_probs` and the final hidden states ``[B, L, D]`` (compute dtype) it used.

    The hidden states at slot ``t − 1`` predict token ``t``; with the model's
    ``output_projection()`` they are what a full-vocabulary term needs without ``[B, L, V]``
    logits (:func:`opd_jax.objectives.full_vocab_divergence_from_hidden`).
    """
    token_mask = token_mask.astype(bool)
    hidden, _ = model.hidden_states(tokens, positions_BxT=positions_from_mask(token_mask), token_mask_BxT=token_mask)
    batch, length, width = hidden.shape
    projection = model.output_projection()

    def target_logp(hidden_RxD, target_R):
        logits = jnp.einsum("rd,dv->rv", hidden_RxD, projection, preferred_element_type=jnp.float32) / temperature
        picked = jnp.take_along_axis(logits, target_R[:, None], axis=-1)[:, 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    # Position t-1 predicts token t.
    predicted = map_row_chunks(
        target_logp,
        hidden[:, :-1].reshape(-1, width),
        tokens[:, 1:].reshape(-1),
        chunk_size=chunk_size,
    ).reshape(batch, length - 1)
    logp = jnp.concatenate([jnp.zeros((batch, 1), jnp.float32), predicted], axis=1)
    has_context = token_mask & jnp.pad(token_mask[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(has_context, logp, 0.0), hidden
