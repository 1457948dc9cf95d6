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
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.chunking import map_row_chunks
from opd_jax.models.decoder import DecodeCache, Decoder, DecodeWeights, KVCache

Array = jax.Array
_log = logging.getLogger(__name__)

__all__ = ["Rollout", "SamplingConfig", "checked_slots", "default_slots", "drain_stages", "generate", "generate_rows",
           "kv_cache_bytes", "positions_from_mask", "refill_rows", "resolve_slots", "score", "token_log_probs",
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
      slots: ``S``, the rows decoded at once. With fewer slots than prompts, a slot whose row
        stops takes the next prompt (its prefill written into that slot's cache) while the others
        go on, so a batch no longer decodes until its longest row ends. ``None``: chosen from the
        batch and the stop ids (:func:`default_slots`). Equal to the prompts: the static batch,
        every row in its own slot until the longest ends. A row's tokens do not depend on ``S``.
      group_size: the prompts come in runs of this many copies of one prompt (group sampling), so
        each run is prefilled once; used where it divides the prompts and the slots. Only set it
        when the rows really are such runs: the copies take the first row's prefill.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    slots: int | None = None
    group_size: int = 1

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be None or in (0, 1], got {self.top_p}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.slots is not None and self.slots < 1:
            raise ValueError(f"slots must be None (chosen from the batch) or >= 1, got {self.slots}")


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
    """Whether :func:`_split` / :func:`_gumbel_rows` reproduce ``jax.random`` for this key: a threefry
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


def _step_keys(key: Array, steps: int) -> Array:
    """``[steps]`` keys: the key of response step ``n`` is the second half of the ``n``-th split of
    the chain ``key → split(key)[0] → …``."""
    return jax.lax.scan(lambda chain, _: _split(chain), key, None, length=steps)[1]


def _gumbel_rows(keys_S: Array, row_S: Array, rows: int, vocab: int) -> Array:
    """Row ``row_S[s]`` of ``jax.random.gumbel(keys_S[s], (rows, vocab))`` for each slot, float32
    ``[S, vocab]``: a row's noise at a step depends on its row and that step's key only, not on the
    slot it is decoded in."""
    if not _straight_threefry_applies(keys_S) or rows * vocab >= 2**32:
        # One slot at a time, the whole [rows, vocab] draw (other key implementations, huge draws).
        return jax.lax.map(lambda pair: jax.random.gumbel(pair[0], (rows, vocab), jnp.float32)[pair[1]],
                           (keys_S, row_S))
    k = jax.random.key_data(keys_S)
    columns = jax.lax.broadcasted_iota(jnp.uint32, (row_S.shape[0], vocab), 1)
    counters = row_S.astype(jnp.uint32)[:, None] * np.uint32(vocab) + columns
    bits1, bits2 = _threefry2x32(k[:, :1], k[:, 1:], jnp.zeros_like(columns), counters)
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


def _sample(logits_SxV: Array, keys_S: Array, row_S: Array, rows: int, config: SamplingConfig
            ) -> tuple[Array, Array]:
    """Tokens ``[S]`` int32 and their log-probabilities ``[S]`` float32 under the filtered distribution.

    Slot ``s`` decodes row ``row_S[s]`` of ``rows``: its token is row ``row_S[s]`` of
    ``jax.random.categorical(keys_S[s], filtered)`` over all the rows (Gumbel-max with the same
    noise), and its log-probability that of ``jax.nn.log_softmax`` at the token (the same
    operations, evaluated at the picked entry only).
    """
    if config.temperature == 0:
        return _first_argmax(logits_SxV), jnp.zeros(logits_SxV.shape[:1], jnp.float32)
    filtered = _filter_logits(logits_SxV, config)
    noise = _gumbel_rows(keys_S, row_S, rows, filtered.shape[1])
    tokens = _first_argmax(noise + filtered)
    shift = jax.lax.stop_gradient(jnp.max(filtered, axis=-1, keepdims=True))
    shifted = filtered - shift
    picked = jnp.take_along_axis(shifted, tokens[:, None], axis=-1)[:, 0]
    logp = picked - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    return tokens, logp


def generate(
    model: Decoder, prompt_tokens: Array, prompt_mask: Array, key: Array, config: SamplingConfig
) -> Rollout:
    """Sample a response for every prompt: prefill, then cached decoding in slots until all rows stop.

    One jitted program: the prefill of the first ``S`` prompts (the model's scanned blocks, writing a
    :class:`KVCache`), the decode weights prepared once (:meth:`Decoder.decode_weights`), then the
    decode loop in segments of growing cache size (:func:`cache_segments`), each a
    ``lax.while_loop`` of :meth:`Decoder.decode_step`.

    With fewer slots ``S`` than prompts (:attr:`SamplingConfig.slots`), a slot whose row stops takes
    the next prompt: inside the loop, once enough slots are free, the next prompts are prefilled
    together and written into those slots' caches (no host round trip). Once the queue is empty and
    at most a quarter of the slots are live, the live rows move into a quarter of the slots (drain
    stages), so the longest rows do not keep every slot decoding. ``S`` equal to the prompts is the
    static batch: every row decodes in its own slot until the longest ends.

    Row ``b``'s token at response step ``n`` is row ``b`` of ``jax.random.categorical`` over the
    filtered logits of all ``B`` rows with the key ``k_n`` (``k_n`` the second half of the ``n``-th
    split of the chain ``key → split(key)[0] → …``): it depends on the key, the row and the step,
    not on ``S`` or on when the row was scheduled (and it is the token of the static batch of before).

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
    # Called eagerly, the cache is checked against this process's devices; traced inside another
    # jit (a sharded sampler, the plan), the caller's program decides where it lives.
    memory = None if isinstance(prompt_tokens, jax.core.Tracer) else (jax.device_count(), _device_memory_bytes())
    slots = checked_slots(model, prompt_tokens, prompt_mask, config, memory)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt_tokens, prompt_mask, key, config, slots)


def checked_slots(model: Decoder, prompt_tokens: Array, prompt_mask: Array, config: SamplingConfig,
                  memory: tuple[int, int] | None = None) -> int:
    """The slots :func:`generate` decodes ``[B, P]`` prompts in (:func:`resolve_slots`), after
    checking the prompts and ``config`` against the model (what :func:`generate_rows` assumes).

    Raises:
      ValueError: shapes disagree, the prompt plus ``max_new_tokens`` exceeds the model's
        ``max_position_embeddings``, stop ids lie outside the vocabulary (or there are none while
        slots should free up), or the cache cannot fit ``memory``.
    """
    if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_tokens {list(prompt_tokens.shape)} and prompt_mask {list(prompt_mask.shape)} must be the same [B, P]"
        )
    rows, prompt_length = prompt_tokens.shape
    total = prompt_length + config.max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt length {prompt_length} + max_new_tokens {config.max_new_tokens} = {total} exceeds "
            f"the model's max_position_embeddings {model.config.max_position_embeddings}"
        )
    slots = resolve_slots(config, rows, model.config, model.compute_dtype, total, memory)
    _check_stop_ids(config, model.config.vocab_size, rows, slots)
    return slots


def _check_stop_ids(config: SamplingConfig, vocab_size: int, rows: int, slots: int) -> None:
    """Refuse stop ids outside the vocabulary, and an empty stop-id set where slots should free up
    (``slots`` below the ``rows``): no row could stop before ``max_new_tokens``. Without slots to
    refill an empty set is fine: every row runs to ``max_new_tokens`` (fixed-length decoding).

    Raises:
      ValueError: naming ``stop_ids`` and the allowed ids.
    """
    outside = [i for i in config.stop_ids if not 0 <= i < vocab_size]
    if outside:
        raise ValueError(f"stop_ids {outside} lie outside the vocabulary: allowed ids are 0..{vocab_size - 1}")
    if not config.stop_ids and slots < rows:
        raise ValueError(f"stop_ids is empty, but {rows} prompts decode in {slots} slots: no response can stop "
                         f"before max_new_tokens to free a slot; give stop ids (allowed ids are 0..{vocab_size - 1}) "
                         "or as many slots as prompts")


def kv_cache_bytes(model_config, slots: int, length: int, dtype) -> int:
    """Bytes of the decode cache: keys and values of every layer for ``slots × length`` tokens."""
    per_token = 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim
    return slots * length * (per_token * jnp.dtype(dtype).itemsize + 1)  # + the validity mask


def _device_memory_bytes() -> int:
    """Memory of one device: the allocator's limit on an accelerator, physical memory on CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


#: Rows per slot the default keeps queued when responses can stop early (see :func:`default_slots`).
_ROWS_PER_SLOT = 4


def default_slots(rows: int, stop_ids: tuple[int, ...]) -> int:
    """Slots when :attr:`SamplingConfig.slots` is ``None``: every row at once when nothing stops a
    response early (each row runs to ``max_new_tokens``; refilling gains nothing), else a quarter
    of the rows (at least 64), so a slot decodes about four responses one after the other and the
    batch does not wait for its longest row."""
    if not stop_ids:
        return rows
    return min(rows, max(64, -(-rows // _ROWS_PER_SLOT)))


def resolve_slots(config: SamplingConfig, rows: int, model_config, dtype, length: int,
                  memory: tuple[int, int] | None = None) -> int:
    """The slots a rollout of ``rows`` prompts decodes in: ``config.slots`` (clamped to ``rows``, which
    is logged) or :func:`default_slots`, lowered to what fits when chosen here.

    Args:
      memory: ``(devices, bytes of one device)`` the cache is split over; ``None`` skips the memory
        check (a program traced for other devices, such as ``opd-jax plan``'s, is sized by the
        compiler's own memory analysis).

    Raises:
      ValueError: ``config.slots`` asks for a KV cache larger than the devices' memory, naming slots,
        sequence length and bytes.
    """
    slots = default_slots(rows, config.stop_ids) if config.slots is None else config.slots
    if slots > rows:
        _log.info("SamplingConfig.slots %d is more than the %d prompts: decoding in %d slots", slots, rows, rows)
        slots = rows
    if memory is None:
        return slots
    devices, device_bytes = memory
    fit = device_bytes * devices // kv_cache_bytes(model_config, 1, length, dtype)
    if slots > fit:
        if config.slots is not None or fit < 1:
            need = kv_cache_bytes(model_config, slots, length, dtype)
            raise ValueError(
                f"SamplingConfig.slots {slots} × sequence length {length} needs a KV cache of {need} bytes "
                f"({need // devices} per device over {devices} devices), more than the {device_bytes} bytes of one "
                f"device; at most {fit} slots fit"
            )
        slots = fit
    return slots


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
    """The carry of the decode loop: ``S`` slots decoding rows of an ``[R, P]`` prompt batch.

    Attributes:
      step: ``[]`` int32, decode steps run so far.
      logits_SxV: float32 logits of each slot's next token.
      cache: the :class:`DecodeCache`; its ``index`` is ``P + step`` (static batch) or per slot.
      row_S: int32, the prompt row each slot decodes.
      written_S: int32, response tokens the slot's row has so far (its next response column).
      position_S: RoPE position of the next token.
      done_S: slots whose row has stopped (a stop id or ``N`` tokens): free for the next prompt.
      queued: ``[]`` int32, prompt rows handed to a slot so far (the rest wait in the queue).
      tokens_RxN, mask_RxN, logp_RxN: the responses so far (``pad_id`` / False / 0 beyond them).
    """

    step: Array
    logits_SxV: Array
    cache: DecodeCache
    row_S: Array
    written_S: Array
    position_S: Array
    done_S: Array
    queued: Array
    tokens_RxN: Array
    mask_RxN: Array
    logp_RxN: Array


def _prefill(model: Decoder, prompt_tokens: Array, prompt_mask: Array, group: int = 1
             ) -> tuple[Array, Array, KVCache]:
    """Logits of each row's first response token ``[B, V]``, its RoPE position ``[B]`` and the
    prompt's :class:`KVCache` (``P`` slots).

    ``group > 1``: rows come in runs of ``group`` copies of one prompt (``B`` a multiple of it),
    and each run's prompt is run through the model once.
    """
    if group > 1:
        logits, position, cache = _prefill(model, prompt_tokens[::group], prompt_mask[::group])

        def repeat(array, axis=0):
            return jnp.repeat(array, group, axis=axis)

        return repeat(logits), repeat(position), KVCache(
            repeat(cache.keys_LxBxSxKxH, 1), repeat(cache.values_LxBxSxKxH, 1), repeat(cache.valid_BxS), cache.index)
    batch, prompt_length = prompt_tokens.shape
    positions = positions_from_mask(prompt_mask)
    hidden, cache = model.hidden_states(
        prompt_tokens, positions_BxT=positions, token_mask_BxT=prompt_mask,
        cache=KVCache.zeros(model.config, batch, prompt_length, model.compute_dtype),
    )
    # Left padding puts every row's last prompt token in the last slot.
    return model.logits(hidden[:, -1:])[:, 0], positions[:, -1] + 1, cache


def _prefill_group(config: SamplingConfig, rows: int, slots: int) -> int:
    """Rows that share one prefill: ``config.group_size`` when it divides the rows and the slots
    (so every prefill, the first and each refill, takes whole groups), else 1."""
    group = config.group_size
    return group if rows % group == 0 and slots % group == 0 else 1


def refill_rows(slots: int, group: int) -> int:
    """Prompts prefilled together when slots free up, a multiple of ``group``: waiting for an
    eighth of the slots keeps the prefill a batch (one matmul over several prompts) while a freed
    slot idles a few steps."""
    return max(group, slots // 8 // group * group)


def _refill(model: Decoder, prompt_tokens: Array, prompt_mask: Array, group: int, state: _DecodeState
            ) -> _DecodeState:
    """Prefill the next prompts of the queue into free slots: :func:`refill_rows` of them, or the
    rest of the queue (whole groups of ``group`` rows either way)."""
    rows, prompt_length = prompt_tokens.shape
    slots = state.done_S.shape[0]
    batch = refill_rows(slots, group)
    count = jnp.minimum(jnp.minimum(jnp.sum(state.done_S, dtype=jnp.int32), rows - state.queued), batch)
    count = count // group * group  # whole groups; `queued` stays at a group's first row
    offsets_Q = jnp.arange(batch, dtype=jnp.int32)
    (free_Q,) = jnp.nonzero(state.done_S, size=batch, fill_value=slots)
    slot_Q = jnp.where(offsets_Q < count, free_Q, slots)  # slot index `slots` is dropped by every write
    row_Q = jnp.minimum(state.queued + offsets_Q, rows - 1)
    mask_QxP = prompt_mask[row_Q]
    logits_QxV, position_Q, prefill = _prefill(model, prompt_tokens[row_Q], mask_QxP, group)
    cache = state.cache
    new_keys = prefill.keys_LxBxSxKxH.transpose(0, 1, 3, 4, 2)  # [layers, Q, K, H, P]
    new_values = prefill.values_LxBxSxKxH.transpose(0, 1, 3, 2, 4)  # [layers, Q, K, P, H]
    valid_QxC = jnp.pad(mask_QxP, ((0, 0), (0, cache.num_slots - prompt_length)))
    cache = DecodeCache(
        tuple(k.at[slot_Q, :, :, :prompt_length].set(new, mode="drop") for k, new in zip(cache.keys_BxKxHxS, new_keys)),
        tuple(v.at[slot_Q, :, :prompt_length].set(new, mode="drop")
              for v, new in zip(cache.values_BxKxSxH, new_values)),
        cache.valid_BxS.at[slot_Q].set(valid_QxC, mode="drop"),
        cache.index,
    )
    return dataclasses.replace(
        state,
        logits_SxV=state.logits_SxV.at[slot_Q].set(logits_QxV, mode="drop"),
        cache=cache,
        row_S=state.row_S.at[slot_Q].set(row_Q, mode="drop"),
        written_S=state.written_S.at[slot_Q].set(0, mode="drop"),
        position_S=state.position_S.at[slot_Q].set(position_Q, mode="drop"),
        done_S=state.done_S.at[slot_Q].set(False, mode="drop"),
        queued=state.queued + count,
    )


#: A drain stage has at least this many slots (fewer would save little over the stage before).
_MIN_DRAIN_SLOTS = 8


def drain_stages(slots: int) -> tuple[int, ...]:
    """Slot counts of the decode stages: ``slots``, then a quarter of the stage before while that
    is at least :data:`_MIN_DRAIN_SLOTS`."""
    stages = [slots]
    while stages[-1] // 4 >= _MIN_DRAIN_SLOTS:
        stages.append(stages[-1] // 4)
    return tuple(stages)


def _compact(state: _DecodeState, slots: int) -> _DecodeState:
    """The live slots of ``state`` (at most ``slots`` of them) moved into ``slots`` slots; the
    slots left over are marked done."""
    live = ~state.done_S
    (keep,) = jnp.nonzero(live, size=slots, fill_value=0)
    filled = jnp.arange(slots) < jnp.sum(live)
    cache = state.cache
    return dataclasses.replace(
        state,
        logits_SxV=state.logits_SxV[keep],
        cache=DecodeCache(tuple(k[keep] for k in cache.keys_BxKxHxS), tuple(v[keep] for v in cache.values_BxKxSxH),
                          cache.valid_BxS[keep], cache.index if cache.index.ndim == 0 else cache.index[keep]),
        row_S=state.row_S[keep],
        written_S=state.written_S[keep],
        position_S=state.position_S[keep],
        done_S=state.done_S[keep] | ~filled,
    )


@dataclasses.dataclass(frozen=True)
class _SlotLoop:
    """What the decode loop of one :func:`generate` call works with (traced values, static shapes).

    ``refills``: fewer slots than rows, so slots take new prompts and each slot writes its own
    cache column; otherwise the static batch, every row at column ``P + step`` (one shared cache
    index, one dynamic-update-slice per layer and step).
    """

    model: Decoder
    weights: DecodeWeights
    prompt_tokens: Array
    prompt_mask: Array
    step_keys: Array  # [N] keys of the response steps (_step_keys)
    config: SamplingConfig
    slots: int
    group: int
    first_row: Array | int = 0  # the global index of prompt row 0 (a replica's share of a larger batch)
    total_rows: int | None = None  # rows of the whole batch the noise is drawn for (None: these rows)
    # A mesh axis whose members must take the same branches (replicas whose steps run collectives
    # over another axis): a loop goes on, and a refill happens, while any member wants it.
    sync_axis: str | None = None

    def _any(self, wanted: Array) -> Array:
        if self.sync_axis is None:
            return wanted
        return jax.lax.pmax(wanted.astype(jnp.int32), self.sync_axis) > 0

    @property
    def rows(self) -> int:
        return self.prompt_tokens.shape[0]

    @property
    def refills(self) -> bool:
        return self.slots < self.rows

    def initial_state(self, logits_SxV: Array, position_S: Array, cache: DecodeCache) -> _DecodeState:
        rows, slots, new = self.rows, self.slots, self.config.max_new_tokens
        if self.refills:
            cache = dataclasses.replace(cache, index=jnp.full((slots,), self.prompt_tokens.shape[1], jnp.int32))
        return _DecodeState(
            step=jnp.zeros((), jnp.int32), logits_SxV=logits_SxV, cache=cache,
            row_S=jnp.arange(slots, dtype=jnp.int32), written_S=jnp.zeros((slots,), jnp.int32), position_S=position_S,
            done_S=jnp.zeros((slots,), bool), queued=jnp.asarray(slots, jnp.int32),
            tokens_RxN=jnp.full((rows, new), self.config.pad_id, jnp.int32), mask_RxN=jnp.zeros((rows, new), bool),
            logp_RxN=jnp.zeros((rows, new), jnp.float32),
        )

    def keep_going(self, state: _DecodeState, last: int, drain_at: int) -> Array:
        """Whether to decode another step in a segment whose cache holds response columns below
        ``last``, in a stage that ends once at most ``drain_at`` rows are live and none is queued."""
        live = jnp.sum(~state.done_S, dtype=jnp.int32)
        if not self.refills:  # `step < last`: the counter opd-jax plan reads each segment's steps from
            return (state.step < last) & self._any(live > drain_at)
        # Every live slot's next column fits the cache. A refilled slot starts again at column P,
        # so the cache only grows with the longest row.
        longest = jnp.max(jnp.where(state.done_S, 0, state.written_S))
        return self._any((longest < last) & ((state.queued < self.rows) | (live > drain_at)))

    def decode(self, state: _DecodeState, refill: bool) -> _DecodeState:
        """One decode step of every slot (after refilling free slots from the queue if ``refill``)."""
        config, rows, prompt_length = self.config, self.rows, self.prompt_tokens.shape[1]
        if refill:
            remaining = rows - state.queued
            wanted = self._any((remaining > 0) & (
                jnp.sum(state.done_S) >= jnp.minimum(remaining, refill_rows(self.slots, self.group))))
            state = jax.lax.cond(
                wanted, functools.partial(_refill, self.model, self.prompt_tokens, self.prompt_mask, self.group),
                lambda s: s, state)
        step_key_S = self.step_keys[jnp.minimum(state.written_S, config.max_new_tokens - 1)]
        token, token_logp = _sample(state.logits_SxV, step_key_S, state.row_S + self.first_row,
                                    self.total_rows or rows, config)
        live = ~state.done_S
        token = jnp.where(live, token, config.pad_id)
        cache = state.cache
        if self.refills:  # a finished slot's column may lie past the cache; it writes an invalid slot
            cache = dataclasses.replace(cache, index=jnp.minimum(prompt_length + state.written_S, cache.num_slots - 1))
        logits, cache = self.model.decode_step(self.weights, token, state.position_S, live, cache)
        target = (jnp.where(live, state.row_S, rows), state.written_S)  # row `rows` is dropped
        written = state.written_S + live
        stopped = jnp.isin(token, jnp.asarray(config.stop_ids, jnp.int32)) | (written >= config.max_new_tokens)
        return dataclasses.replace(
            state, step=state.step + 1, logits_SxV=logits, cache=cache, written_S=written,
            position_S=state.position_S + 1, done_S=state.done_S | stopped,
            tokens_RxN=state.tokens_RxN.at[target].set(token, mode="drop"),
            mask_RxN=state.mask_RxN.at[target].set(True, mode="drop"),
            logp_RxN=state.logp_RxN.at[target].set(token_logp, mode="drop"),
        )


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "slots"))
def _generate(graphdef, state, prompt_tokens, prompt_mask, key, config: SamplingConfig, slots: int) -> Rollout:
    return generate_rows(nnx.merge(graphdef, state), prompt_tokens, prompt_mask, key, config, slots)


def generate_rows(model: Decoder, prompt_tokens: Array, prompt_mask: Array, key: Array, config: SamplingConfig,
                  slots: int, *, first_row: Array | int = 0, total_rows: int | None = None,
                  sync_axis: str | None = None) -> Rollout:
    """:func:`generate`'s program (traced; inputs checked by :func:`checked_slots`) for rows ``first_row …`` of a batch of ``total_rows``.

    A data replica of the inference layout (:mod:`opd_jax.rollout_layout`) decodes its share of the
    batch in its own ``slots``; each row draws the noise of its global row index, so the replicas'
    rollouts together are the tokens :func:`generate` samples for the whole batch.

    Args:
      prompt_tokens, prompt_mask: ``[B, P]`` this replica's rows.
      slots: ``S`` ≤ ``B`` (see :func:`resolve_slots`).
      first_row: ``[]`` int, the global index of row 0 (traced: ``axis_index × B``).
      total_rows: rows of the whole batch (``None``: ``B``).
      sync_axis: inside ``shard_map``, the replicas' mesh axis when their steps hold collectives
        over another one (tensor parallelism): every replica then runs as many steps as the
        slowest (collectives need every member of the program), and refills when any replica does.
    """
    rows, prompt_length = prompt_tokens.shape
    sizes = cache_segments(prompt_length, config.max_new_tokens)
    group = _prefill_group(config, rows, slots)
    logits, position, prefill_cache = _prefill(model, prompt_tokens[:slots], prompt_mask[:slots], group)
    # Once per rollout, outside the loop: fused projections in the compute dtype.
    loop = _SlotLoop(model, model.decode_weights(), prompt_tokens, prompt_mask,
                     _step_keys(key, config.max_new_tokens), config, slots, group, first_row, total_rows, sync_axis)
    state = loop.initial_state(logits, position, DecodeCache.from_cache(prefill_cache, sizes[0]))
    # As many slots as rows: the static batch, the program of before slot scheduling, bitwise (a
    # sampler whose rows are split over devices keeps it: moving rows would cross devices).
    stages = drain_stages(slots) if loop.refills else (slots,)
    for stage, drain_at in enumerate((*stages[1:], 0)):
        # Each stage decodes until at most `drain_at` rows are left and none is queued; the next
        # stage goes on with the live rows only, in fewer slots, so the longest rows do not keep
        # every slot of the batch decoding. Refills happen in the first stage (the queue empties there).
        if stage:
            state = _compact(state, stages[stage])
        body = functools.partial(loop.decode, refill=loop.refills and not stage)
        # The first stage grows the cache segment by segment; later ones keep its full size.
        for size in sizes if not stage else sizes[-1:]:
            state = dataclasses.replace(state, cache=state.cache.grown(size))
            keep_going = functools.partial(loop.keep_going, last=size - prompt_length, drain_at=drain_at)
            state = jax.lax.while_loop(keep_going, body, state)
    pad_prompt = jnp.zeros((rows, prompt_length), bool)
    return Rollout(
        tokens=jnp.concatenate([prompt_tokens, state.tokens_RxN], axis=1),
        token_mask=jnp.concatenate([prompt_mask, state.mask_RxN], axis=1),
        response_mask=jnp.concatenate([pad_prompt, state.mask_RxN], axis=1),
        sampling_logp=jnp.concatenate([jnp.zeros((rows, prompt_length), jnp.float32), state.logp_RxN], axis=1),
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
