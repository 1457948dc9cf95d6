"""A student response as a teacher with another tokenizer reads it: its tokens and the chunk alignment.

The host side of ``tokenizer_alignment = "text"``. For each response the student's ids are decoded
to text (without its stop token), the text is encoded with the teacher's tokenizer (and the teacher's
EOS appended when the student stopped), and both token sequences get their character end offsets,
from which :func:`opd_jax.alignment.chunk_ids` cuts the common chunks.

* Student ends come from incremental decoding: the decoded text of a window of the last few ids,
  checked against the whole text (a window that does not decode to the text there, as with
  SentencePiece's leading-space rule, falls back to decoding the whole prefix). A token that ends
  inside a character (byte-level BPE splitting a UTF-8 character) ends where that character ends,
  so it joins the chunk of the token that completes the character.
* Teacher ends come from the fast tokenizer's offset mapping (byte-level tokens of one character
  share its span).
* The teacher must read back the text it was given: a tokenizer whose ``decode(encode(text))``
  differs (normalisation, unknown characters) would score another text, so it is refused naming the
  teacher and the string.

The prompt is not re-tokenized here: each teacher encodes the raw prompt with its own chat template
once, before training; the response is encoded on its own, after the teacher's generation prompt.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from opd_jax.alignment import chunk_ids

__all__ = ["MIN_BUCKET", "ByteBatch", "ResponseAlignment", "TeacherBatch", "TeacherReader", "align_response", "bucket",
           "measure_teacher_tokens", "student_token_ends", "teacher_encoding"]

_REPLACEMENT = "\ufffd"  # what decoding shows for an incomplete UTF-8 character


def student_token_ends(tokenizer, ids: Sequence[int], text: str, *, window: int = 8) -> list[int]:
    """The character offset in ``text`` (``tokenizer.decode(ids)``) where each id's text ends.

    A token that ends inside a character (its decoded prefix ends in an incomplete UTF-8 sequence)
    ends where that character ends, as a fast tokenizer's offsets say, so it joins the chunk of the
    token that completes the character. Windowed decoding keeps this ``O(len(ids) · window)``; every
    window is checked against ``text``.
    """
    ends: list[int] = []
    for n in range(len(ids)):
        start = max(0, n - window)
        end = _decoded_end(tokenizer.decode(ids[start:n + 1], skip_special_tokens=False), text,
                           ends[start - 1] if start else 0)
        if end is None:  # the window does not decode to the text there: decode the whole prefix
            end = _decoded_end(tokenizer.decode(ids[: n + 1], skip_special_tokens=False), text, 0)
        ends.append(max(end if end is not None else 0, ends[-1] if ends else 0))
    return ends


def _decoded_end(piece: str, text: str, base: int) -> int | None:
    """Where ``piece``, decoded from ids that start at ``text[base]``, ends in ``text`` (inside a
    character: that character's end), or ``None`` if it is not the text there."""
    if text.startswith(piece, base):
        return base + len(piece)
    complete = piece.rstrip(_REPLACEMENT)
    if complete != piece and text.startswith(complete, base):
        return min(base + len(complete) + 1, len(text))
    return None


def teacher_encoding(tokenizer, text: str, *, teacher: str) -> tuple[list[int], list[int]]:
    """``(ids, character end offsets)`` of ``text`` in the teacher's tokenizer, no special tokens added.

    Raises:
      ValueError: the tokenizer does not read ``text`` back (names the teacher and the string).
    """
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    if decoded != text:
        at = len(os.path.commonprefix((decoded, text)))
        raise ValueError(f"teacher {teacher!r}: its tokenizer does not read back the student's text {text!r} "
                         f"(decode(encode(text)) gives {decoded!r}, differing at character {at}); "
                         "tokenizer_alignment 'text' needs a tokenizer that round-trips the student's text")
    return ids, [int(end) for _, end in encoding["offset_mapping"]]


def measure_teacher_tokens(student_tokenizer, teacher_tokenizer, texts: Sequence[str],
                           vocab_size: int) -> tuple[float, int]:
    """``(ratio, longest)``: the teacher's tokens per student token over ``texts`` (no special tokens,
    no chat template), and its longest text piece among them in bytes (what ``opd-jax plan`` sizes
    the re-tokenized teacher with).

    Raises:
      ValueError: no text has a student token.
    """
    from opd_jax.teacher_bytes import vocabulary_bytes

    student_ids = student_tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    teacher_ids = teacher_tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    student_count = sum(len(ids) for ids in student_ids)
    if not student_count:
        raise ValueError("no prompt has a student token to measure the teacher's tokens against")
    vocabulary = vocabulary_bytes(teacher_tokenizer, vocab_size)
    longest = max((len(vocabulary.pieces[i]) for ids in teacher_ids for i in ids if not vocabulary.special[i]),
                  default=1)
    return sum(len(ids) for ids in teacher_ids) / student_count, longest


class ResponseAlignment(NamedTuple):
    """One response as the teacher reads it (see :func:`align_response`); ``text`` and the character
    ``student_ends`` of its text tokens are what the byte view (:mod:`opd_jax.teacher_bytes`) reads."""

    teacher_ids: list[int]
    student_chunk: np.ndarray
    teacher_chunk: np.ndarray
    text: str
    student_ends: list[int]
    stopped: bool


def align_response(student_tokenizer, teacher_tokenizer, response_ids: Sequence[int], *, stopped: bool,
                   teacher: str) -> ResponseAlignment:
    """The teacher's tokens of one student response and the chunk of every token on both sides.

    Args:
      response_ids: the student's response ids, its stop token last when ``stopped``.
      stopped: the response ended with a stop token; the teacher's EOS then ends its tokens, and
        the two end tokens form the last chunk (a character of their own past the text).
      teacher: the teacher's name, for errors.

    Returns:
      ``teacher_ids`` (list), ``student_chunk`` ``[len(response_ids)]`` and ``teacher_chunk``
      ``[len(teacher_ids)]`` int32.
    """
    text_ids = list(response_ids[:-1] if stopped else response_ids)
    text = student_tokenizer.decode(text_ids, skip_special_tokens=False)
    teacher_ids, teacher_ends = teacher_encoding(teacher_tokenizer, text, teacher=teacher)
    text_ends = student_token_ends(student_tokenizer, text_ids, text)
    student_ends = list(text_ends)
    if stopped:
        if teacher_tokenizer.eos_token_id is None:
            raise ValueError(f"teacher {teacher!r}: its tokenizer has no eos_token_id to end a stopped response with")
        teacher_ids.append(int(teacher_tokenizer.eos_token_id))
        student_ends.append(len(text) + 1)
        teacher_ends.append(len(text) + 1)
    student_chunk, teacher_chunk = chunk_ids(student_ends, teacher_ends)
    return ResponseAlignment(teacher_ids, student_chunk, teacher_chunk, text, text_ends, stopped)


class ByteBatch(NamedTuple):
    """The byte slots of a rollout batch (``alignment_credit = "characters"``; see
    :class:`opd_jax.teacher_bytes.ByteSlots`), laid on the teacher's ``[B, N]`` positions.

    Attributes:
      lo_BxNxD, hi_BxNxD, slot_mask_BxNxD, slot_chunk_BxNxD: per byte slot of each response token.
      depth_BxN: each response token's piece length in bytes (0 elsewhere and for special tokens).
      end_slot_BxN: the flat ``N · D`` slot that receives each token's stop term (0 elsewhere).
    """

    lo_BxNxD: np.ndarray
    hi_BxNxD: np.ndarray
    slot_mask_BxNxD: np.ndarray
    slot_chunk_BxNxD: np.ndarray
    depth_BxN: np.ndarray
    end_slot_BxN: np.ndarray


class TeacherBatch(NamedTuple):
    """A rollout batch as the teachers read it (host arrays; see :meth:`TeacherReader.read`).

    Attributes:
      tokens_BxN, token_mask_BxN: each row's teacher prompt (left-padded to the longest) then its
        response tokens, padded on the right to a bucket (so few shapes compile).
      response_mask_BxN: 1 at the teacher's response tokens (its EOS included).
      teacher_chunk_BxN, student_chunk_BxL: chunk indices of the response tokens (0 elsewhere).
      bytes: the byte slots (``None`` unless read with ``byte_view``); ``student_chunk_BxL`` is then
        the student side of their chunks (one per student token) instead of the token chunks'.
    """

    tokens_BxN: np.ndarray
    token_mask_BxN: np.ndarray
    response_mask_BxN: np.ndarray
    teacher_chunk_BxN: np.ndarray
    student_chunk_BxL: np.ndarray
    bytes: ByteBatch | None = None


#: The shortest teacher response bucket; buckets double from there.
MIN_BUCKET = 16


def bucket(length: int, smallest: int = MIN_BUCKET) -> int:
    """The smallest power-of-two multiple of ``smallest`` that holds ``length`` (the padded teacher
    response slots of a batch whose longest response has ``length`` teacher tokens)."""
    size = smallest
    while size < length:
        size *= 2
    return size


@dataclasses.dataclass(frozen=True, eq=False)
class TeacherReader:
    """How each teacher reads the student's rollouts under ``tokenizer_alignment = "text"``.

    Attributes:
      student_tokenizer: the student's tokenizer (decodes the responses).
      names, tokenizers: the teachers in :class:`~opd_jax.train.PromptSet`'s teacher-index order.
      prompt_tokens, prompt_mask: per teacher, ``[num_prompts, P_t]`` its own left-padded encoding of
        every prompt (with its chat template), made once before training.
      max_positions: per teacher, its ``max_position_embeddings``.
      stop_ids: the student's stop tokens (a response ending in one has stopped).
      identical: every teacher's tokenizer is the student's (nothing to re-tokenize: the step then
        scores the student's own tokens, exactly as ``"same"`` does).
      min_bucket: the shortest response bucket; buckets double from there.
      vocabularies: per teacher, its :class:`~opd_jax.teacher_bytes.VocabularyBytes`, read by the
        byte view (``alignment_credit = "characters"``).
    """

    student_tokenizer: Any
    names: tuple[str, ...]
    tokenizers: tuple[Any, ...]
    prompt_tokens: tuple[np.ndarray, ...]
    prompt_mask: tuple[np.ndarray, ...]
    max_positions: tuple[int, ...]
    stop_ids: tuple[int, ...]
    identical: bool = False
    min_bucket: int = MIN_BUCKET
    vocabularies: tuple[Any, ...] | None = None

    def read(self, tokens_BxL: np.ndarray, response_mask_BxL: np.ndarray, prompt_index_B: np.ndarray,
             teacher_index_B: np.ndarray, *, byte_view: bool = False) -> TeacherBatch:
        """Re-tokenize every response of a rollout batch for its row's teacher.

        Args:
          byte_view: also lay out the byte slots (``alignment_credit = "characters"``; needs
            ``vocabularies``).

        Raises:
          ValueError: a teacher that does not read a response back (or whose pieces do not spell
            it, with ``byte_view``), or a row longer than its teacher's positions (all named).
        """
        rows = [self._read_row(tokens, mask, int(prompt), int(teacher))
                for tokens, mask, prompt, teacher in zip(tokens_BxL, response_mask_BxL, prompt_index_B, teacher_index_B)]
        prompt_width = max(mask.shape[1] for mask in self.prompt_mask)
        width = bucket(max(len(row[1].teacher_ids) for row in rows), self.min_bucket)
        batch = [np.zeros((len(rows), prompt_width + width), dtype) for dtype in (np.int32, bool, bool, np.int32)]
        student_chunk = np.zeros(tokens_BxL.shape, np.int32)
        for b, (prompt_ids, aligned, teacher) in enumerate(rows):
            response_ids = aligned.teacher_ids
            length = len(prompt_ids) + len(response_ids)
            if length > self.max_positions[teacher]:
                raise ValueError(f"teacher {self.names[teacher]!r}: prompt {len(prompt_ids)} + response "
                                 f"{len(response_ids)} of its tokens = {length}, more than its max_position_embeddings "
                                 f"{self.max_positions[teacher]}; lower --max-new-tokens")
            start = prompt_width - len(prompt_ids)
            batch[0][b, start:start + length] = prompt_ids + response_ids
            batch[1][b, start:start + length] = True
            batch[2][b, prompt_width:prompt_width + len(response_ids)] = True
            batch[3][b, prompt_width:prompt_width + len(response_ids)] = aligned.teacher_chunk
            student_chunk[b, response_mask_BxL[b].astype(bool)] = aligned.student_chunk
        if not byte_view:
            return TeacherBatch(*batch, student_chunk)
        if self.vocabularies is None:
            raise ValueError("alignment_credit 'characters' needs each teacher's vocabulary as bytes "
                             "(TeacherReader.vocabularies, opd_jax.teacher_bytes.vocabulary_bytes)")
        byte_batch = self._byte_batch(rows, prompt_width, batch[0].shape[1], response_mask_BxL, student_chunk)
        return TeacherBatch(*batch, student_chunk, byte_batch)

    def _byte_batch(self, rows, prompt_width: int, width: int, response_mask_BxL: np.ndarray,
                    student_chunk_BxL: np.ndarray) -> ByteBatch:
        """The byte slots of every row (``student_chunk_BxL`` is rewritten with their student side)."""
        from opd_jax.teacher_bytes import byte_slots

        longest = max((len(self.vocabularies[t].pieces[i]) for _, aligned, t in rows for i in aligned.teacher_ids
                       if not self.vocabularies[t].special[i]), default=1)
        depth = bucket(max(longest, 1), 1)
        out = ByteBatch(*(np.zeros((len(rows), width, depth), dtype) for dtype in (np.int32, np.int32, bool, np.int32)),
                        np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32))
        for b, (_, aligned, teacher) in enumerate(rows):
            slots = byte_slots(self.vocabularies[teacher], aligned.teacher_ids, aligned.text, aligned.student_ends,
                               stopped=aligned.stopped, depth=depth, teacher=self.names[teacher])
            where = slice(prompt_width, prompt_width + len(aligned.teacher_ids))
            for target, value in zip(out[:5], slots[:5]):  # the fields ByteBatch and ByteSlots share, in order
                target[b, where] = value
            out.end_slot_BxN[b, where] = slots.end_slot_M + prompt_width * depth
            student_chunk_BxL[b, response_mask_BxL[b].astype(bool)] = slots.student_chunk
        return out

    def _read_row(self, tokens_L: np.ndarray, response_mask_L: np.ndarray, prompt: int, teacher: int):
        response = tokens_L[response_mask_L.astype(bool)].tolist()
        stopped = bool(response) and response[-1] in self.stop_ids
        aligned = align_response(self.student_tokenizer, self.tokenizers[teacher], response, stopped=stopped,
                                 teacher=self.names[teacher])
        prompt_ids = self.prompt_tokens[teacher][prompt][self.prompt_mask[teacher][prompt].astype(bool)].tolist()
        return prompt_ids, aligned, teacher
