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
from flax import nnx

from opd_jax.chunking import map_row_chunks
from opd_jax.models.decoder import Decoder, KVCache

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


def _sample(logits_BxV: Array, key: Array, config: SamplingConfig) -> tuple[Array, Array]:
    if config.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32), jnp.zeros(logits_BxV.shape[:1], jnp.float32)
    filtered = _filter_logits(logits_BxV, config)
    tokens = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logp


def generate(
    model: Decoder, prompt_tokens: Array, prompt_mask: Array, key: Array, config: SamplingConfig
) -> Rollout:
    """Sample a response for every prompt: one prefill, then cached decoding until all rows stop.

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


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def _generate(graphdef, state, prompt_tokens, prompt_mask, key, config: SamplingConfig) -> Rollout:
    model = nnx.merge(graphdef, state)
    batch, prompt_length = prompt_tokens.shape
    new = config.max_new_tokens
    cache = KVCache.zeros(model.config, batch, prompt_length + new, model.compute_dtype)
    prompt_positions = positions_from_mask(prompt_mask)
    hidden, cache = model.hidden_states(
        prompt_tokens, positions_BxT=prompt_positions, token_mask_BxT=prompt_mask, cache=cache
    )
    # Left padding puts every row's last prompt token in the last slot.
    logits = model.logits(hidden[:, -1:])[:, 0]
    next_position = prompt_positions[:, -1] + 1
    stop_ids = jnp.asarray(config.stop_ids, jnp.int32)

    def step(carry):
        index, logits, cache, position, done, key, tokens, mask, logp = carry
        key, sample_key = jax.random.split(key)
        token, token_logp = _sample(logits, sample_key, config)
        live = ~done
        token = jnp.where(live, token, config.pad_id)
        tokens = tokens.at[:, index].set(token)
        mask = mask.at[:, index].set(live)
        logp = logp.at[:, index].set(jnp.where(live, token_logp, 0.0))
        done = done | jnp.isin(token, stop_ids)
        hidden, cache = model.hidden_states(
            token[:, None], positions_BxT=position[:, None], token_mask_BxT=live[:, None], cache=cache
        )
        return index + 1, model.logits(hidden)[:, 0], cache, position + 1, done, key, tokens, mask, logp

    def keep_going(carry):
        index, done = carry[0], carry[4]
        return (index < new) & ~jnp.all(done)

    initial = (
        jnp.zeros((), jnp.int32),
        logits,
        cache,
        next_position,
        jnp.zeros((batch,), bool),
        key,
        jnp.full((batch, new), config.pad_id, jnp.int32),
        jnp.zeros((batch, new), bool),
        jnp.zeros((batch, new), jnp.float32),
    )
    *_, response, response_mask, response_logp = jax.lax.while_loop(keep_going, step, initial)
    pad_prompt = jnp.zeros((batch, prompt_length), bool)
    return Rollout(
        tokens=jnp.concatenate([prompt_tokens, response], axis=1),
        token_mask=jnp.concatenate([prompt_mask, response_mask], axis=1),
        response_mask=jnp.concatenate([pad_prompt, response_mask], axis=1),
        sampling_logp=jnp.concatenate([jnp.zeros((batch, prompt_length), jnp.float32), response_logp], axis=1),
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
