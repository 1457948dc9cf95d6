"""Row-chunked evaluation with rematerialisation, to keep ``[rows, V]`` temporaries at ``[chunk, V]``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def map_row_chunks(fn: Callable[..., Array], *arrays: Array, chunk_size: int | None) -> Array:
    """``fn(*arrays)`` evaluated ``chunk_size`` rows at a time, equal to the unchunked call.

    ``fn`` must be row-wise: it maps inputs whose leading axis is ``R`` to an output whose leading
    axis is ``R``. Chunks are read with ``dynamic_slice`` from the unpadded inputs (padding would
    copy them) inside ``jax.checkpoint``, so the backward pass recomputes each chunk instead of
    storing its intermediates; the rows that do not fill a last chunk are one extra call.

    Args:
      fn: row-wise function of ``len(arrays)`` arrays.
      *arrays: inputs sharing the leading axis ``R``.
      chunk_size: rows per chunk; ``None`` (or ``≥ R``) calls ``fn`` once.

    Returns:
      ``fn``'s output for all ``R`` rows.
    """
    num_rows = arrays[0].shape[0]
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    if chunk_size is None or chunk_size >= num_rows:
        return fn(*arrays)
    num_full = num_rows // chunk_size

    # The slice sits inside the checkpoint so that the backward pass keeps only the chunk index and
    # the full inputs (already live) as residuals; slicing outside would save every chunk's slices,
    # i.e. a second copy of the inputs, and lower no peak.
    @jax.checkpoint
    def one_chunk(index, *full_arrays):
        start = index * chunk_size
        return fn(*(jax.lax.dynamic_slice_in_dim(a, start, chunk_size) for a in full_arrays))

    full = jax.lax.map(lambda index: one_chunk(index, *arrays), jnp.arange(num_full))
    pieces = [full.reshape(num_full * chunk_size, *full.shape[2:])]
    tail = num_full * chunk_size
    if tail < num_rows:
        pieces.append(jax.checkpoint(fn)(*(a[tail:] for a in arrays)))
    return jnp.concatenate(pieces)


#: ``logit_chunk_size = "auto"``: chosen by :func:`auto_logit_chunk_size`.
AUTO = "auto"
#: The share of one device's memory that the float32 logits of one chunk may take.
LOGIT_BUDGET_FRACTION = 1 / 32
# float32 logits, their exponentials (log-sum-exp) and, in the update, their cotangent.
_LOGIT_COPIES = 3


def logit_bytes_per_token(vocab_size: int) -> int:
    """Bytes one token's vocabulary projection holds at its peak: ``3 · 4 · V`` (see :func:`auto_logit_chunk_size`)."""
    return _LOGIT_COPIES * 4 * int(vocab_size)


def auto_logit_chunk_size(*, vocab_size: int, tokens_per_device: int, device_memory_bytes: int) -> int | None:
    """The ``logit_chunk_size`` that ``"auto"`` stands for: the one rule of train and plan.

    The vocabulary projection of a token holds ``3 · 4 · V`` bytes at its peak (float32 logits,
    their exponentials, and their cotangent in the update); the logits of one chunk may take
    :data:`LOGIT_BUDGET_FRACTION` of a device's memory.

    * If all of a device's tokens fit that budget at once, nothing is chunked (``None``).
    * Otherwise the chunk is the largest power of two of tokens whose logits fit the budget. It
      is sized against one device although a chunk is counted in tokens of the whole batch: a
      chunk's rows are read by a dynamic slice, which the partitioner serves by gathering them onto
      every device of the batch axes, so a device holds the whole chunk's logits.

    Args:
      vocab_size: ``V`` of the output projection.
      tokens_per_device: the most tokens one device projects in one program (the scoring pass:
        rows × sequence length over the batch shards).
      device_memory_bytes: memory of one device.

    Returns:
      Tokens per chunk, or ``None`` for no chunking.

    Raises:
      ValueError: one token's logits alone exceed the budget (the message names the bytes).

    >>> auto_logit_chunk_size(vocab_size=151_936, tokens_per_device=65_536, device_memory_bytes=95 * 2**30)
    1024
    >>> auto_logit_chunk_size(vocab_size=32, tokens_per_device=4_096, device_memory_bytes=2**30) is None
    True
    """
    per_token = logit_bytes_per_token(vocab_size)
    budget = int(device_memory_bytes * LOGIT_BUDGET_FRACTION)
    if tokens_per_device * per_token <= budget:
        return None
    if per_token > budget:
        raise ValueError(
            f"logit_chunk_size auto: one token's logits need {per_token} bytes (3 × 4 × vocab_size {vocab_size}), "
            f"more than the {budget} bytes ({LOGIT_BUDGET_FRACTION:g} of the device's {device_memory_bytes}) a chunk "
            "may take; this vocabulary does not fit the device"
        )
    return 1 << ((budget // per_token).bit_length() - 1)
