"""Teacher log-probs on the student's tokens when the two tokenizers differ (``tokenizer_alignment = "text"``).

The teacher scores the student's text on its own tokenization. Both tokenizations cover the same
characters, so they share boundaries: the character offsets where a student token and a teacher
token both end. The coarsest common segmentation cuts the text at exactly those offsets; each piece
(a *chunk*) holds one or more whole student tokens and one or more whole teacher tokens. A chunk's
log-ratio ``ℓ_c = Σ_{teacher tokens in c} log q − Σ_{student tokens in c} log π`` is well defined,
and the chunks' log-ratios sum to the whole-text log-ratio ``log q(text) − log π(y)``.

:func:`aligned_teacher_logp` turns the teacher's per-token log-probs into a ``[B, T]`` array on the
student's positions such that ``teacher − student`` spreads ``ℓ_c`` evenly over the chunk's
student tokens (``ℓ_c / |c|`` each). Every advantage estimator then runs unchanged:

* sequence level: ``Σ_n m_n ℓ_n = log q(text) − log π(y)``, so sequence-level estimators see the
  whole-text ratio and need no alignment at all (:mod:`opd_jax.exact_cross` proves OPD+ unbiased for
  the objective it states);
* token level: every token of a chunk shares its ratio. The alternative, the whole ratio on the
  chunk's last student token (``credit="last"``), leaves the chunk's other tokens without a signal;
  :mod:`opd_jax.exact_cross` measures both (``experiments/cross_tokenizer_bias.py``).

The loop's default, ``alignment_credit = "characters"`` (:mod:`opd_jax.teacher_bytes`), uses this
function too: its "teacher tokens" are the bytes of the text, each with its share of the teacher's
log-prob, so its chunks are the student's tokens.

With one tokenizer every chunk is one token on both sides and the result is ``teacher_logp``
bitwise.

Offsets come from the host (:func:`chunk_ids` on each row's token end offsets); the array function
is jit-able. An end-of-sequence token is given its own character past the text on both sides, so the
two EOS tokens form the last chunk together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["AlignedTeacher", "aligned_teacher_logp", "carry", "chunk_ids"]

Array = jax.Array


def chunk_ids(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Chunk index of each student and each teacher token of one text.

    Args:
      student_ends, teacher_ends: the character offset where each token ends, non-decreasing, the
        last one the text's length (a zero-width token, e.g. a special token, ends where the one
        before it ends; it joins the next chunk).

    Returns:
      ``(student_chunk [T] int32, teacher_chunk [M] int32)``: chunk ``c`` ends at the ``c``-th
      offset where both sides have a token ending.

    Raises:
      ValueError: the two sides do not end at the same offset (not the same text), or offsets decrease.
    """
    student_ends, teacher_ends = np.asarray(student_ends, np.int64), np.asarray(teacher_ends, np.int64)
    for name, ends in (("student", student_ends), ("teacher", teacher_ends)):
        if ends.size and np.any(np.diff(ends) < 0):
            raise ValueError(f"{name} token end offsets must not decrease; got {ends.tolist()}")
    student_end, teacher_end = (int(ends[-1]) if ends.size else 0 for ends in (student_ends, teacher_ends))
    if student_end != teacher_end:
        raise ValueError(f"the two tokenizations end at different offsets (student {student_end}, teacher "
                         f"{teacher_end}): they do not cover the same text")
    common = np.intersect1d(student_ends, teacher_ends)
    # A token belongs to the first chunk whose end is at or after its own end.
    return (np.searchsorted(common, student_ends).astype(np.int32),
            np.searchsorted(common, teacher_ends).astype(np.int32))


def aligned_teacher_logp(student_logp_BxT: Array, teacher_logp_BxM: Array, student_chunk_BxT: Array,
                         teacher_chunk_BxM: Array, student_mask_BxT: Array, teacher_mask_BxM: Array,
                         credit: str = "spread") -> Array:
    """The teacher's log-probs carried onto the student's positions, chunk by chunk.

    Args:
      student_logp_BxT: ``log π(y_n|s_n)`` (treated as a constant: the result feeds advantages,
        which are computed under ``stop_gradient``).
      teacher_logp_BxM: the teacher's log-probs of its own tokens of the same texts.
      student_chunk_BxT, teacher_chunk_BxM: int chunk indices (:func:`chunk_ids`), in ``[0, T)``.
      student_mask_BxT, teacher_mask_BxM: 1 at response tokens.

      credit: ``"spread"``: every student token of a chunk gets ``student_logp + ℓ_c / |c|``;
        ``"last"``: the chunk's last student token gets ``Σ_{teacher in c} log q − Σ_{other students
        in c} log π`` and the others ``student_logp`` (a zero log-ratio). A one-token chunk gets
        ``teacher_logp`` exactly either way.

    Returns:
      ``[B, T]`` in the dtype of ``student_logp_BxT``, 0 where the mask is 0.
    """
    if credit not in ("spread", "last"):
        raise ValueError(f"credit must be 'spread' or 'last'; got {credit!r}")
    student_logp_BxT = jax.lax.stop_gradient(student_logp_BxT)
    num_chunks = student_logp_BxT.shape[1]
    dtype = student_logp_BxT.dtype

    def per_chunk(values, chunks, mask):
        return jax.ops.segment_sum(jnp.where(mask, values, 0).astype(dtype), chunks, num_segments=num_chunks)

    teacher_sum_BxC = jax.vmap(per_chunk)(teacher_logp_BxM, teacher_chunk_BxM, teacher_mask_BxM)
    student_sum_BxC = jax.vmap(per_chunk)(student_logp_BxT, student_chunk_BxT, student_mask_BxT)
    take = lambda sums, chunks: jnp.take_along_axis(sums, chunks, axis=1)  # noqa: E731
    teacher_at_BxT, student_at_BxT = take(teacher_sum_BxC, student_chunk_BxT), take(student_sum_BxC, student_chunk_BxT)
    # Written as teacher sum − (student sum − own), so that a one-token chunk gives teacher_logp exactly.
    credited_BxT = teacher_at_BxT - (student_at_BxT - student_logp_BxT)
    if credit == "spread":
        count_BxT = take(jax.vmap(per_chunk)(jnp.ones_like(student_logp_BxT), student_chunk_BxT, student_mask_BxT),
                         student_chunk_BxT)
        share_BxT = (teacher_at_BxT - student_at_BxT) / count_BxT
        return jnp.where(student_mask_BxT, jnp.where(count_BxT == 1, credited_BxT, student_logp_BxT + share_BxT), 0)
    next_chunk_BxT = jnp.concatenate([student_chunk_BxT[:, 1:], jnp.full_like(student_chunk_BxT[:, :1], -1)], axis=1)
    next_mask_BxT = jnp.concatenate([student_mask_BxT[:, 1:], jnp.zeros_like(student_mask_BxT[:, :1])], axis=1)
    last_BxT = (next_chunk_BxT != student_chunk_BxT) | ~next_mask_BxT.astype(bool)
    return jnp.where(student_mask_BxT, jnp.where(last_BxT, credited_BxT, student_logp_BxT), 0)

class AlignedTeacher(NamedTuple):
    """The teacher's scores of a batch on its own tokens, and the chunks that carry them onto the
    student's (a pytree: it crosses ``jit`` in place of ``teacher_logp_BxL``).

    Attributes:
      teacher_logp_BxN: the teacher's log-prob of each of its tokens (prompt and response).
      teacher_mask_BxN: 1 at the teacher's response tokens (its EOS included).
      teacher_chunk_BxN: the chunk of each teacher response token (0 elsewhere).
      student_chunk_BxL: the chunk of each student response token (0 elsewhere).
    """

    teacher_logp_BxN: Array
    teacher_mask_BxN: Array
    teacher_chunk_BxN: Array
    student_chunk_BxL: Array


def carry(teacher: AlignedTeacher, student_logp_BxL: Array, response_mask_BxL: Array) -> Array:
    """:func:`aligned_teacher_logp` of an :class:`AlignedTeacher`: ``[B, L]`` on the student's positions."""
    return aligned_teacher_logp(student_logp_BxL, teacher.teacher_logp_BxN, teacher.student_chunk_BxL,
                                teacher.teacher_chunk_BxN, response_mask_BxL, teacher.teacher_mask_BxN)
