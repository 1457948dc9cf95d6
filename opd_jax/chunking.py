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
