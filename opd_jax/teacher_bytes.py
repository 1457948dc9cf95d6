"""A teacher's log-probs spread over the bytes of the text it scores (``alignment_credit = "characters"``).

Cutting both tokenizations at their common boundaries (:mod:`opd_jax.alignment`) gives each chunk
the right total, but it puts information in the wrong place. A teacher that reads ``"16"`` as one
token and ``"1"`` as another says, with the probability of ``"1"``, both "the next character is 1"
and "the number ends there". The second half is decided by the student's *next* token (``"-"``
rather than ``"6"``), yet the chunk rule charges it to the ``"1"``. Token-level estimators then
never penalise the decision that ended the number.

The byte view factors each teacher token's probability over its bytes, from the teacher's whole
distribution ``p_t`` at that token:

* byte ``d`` of token ``t`` (piece ``P_t``) gets ``log p_t(P_t[:d+1]…) − log p_t(P_t[:d]…)``, where
  ``p_t(s…)`` is the mass of the tokens whose piece starts with ``s`` (``p_t(…) = 1``): the
  teacher's probability of that byte given the token's bytes before it;
* the rest of ``log p_t(v_t)``, ``log p_t(v_t) − log p_t(P_t…)`` (the token stops there rather than
  going on), goes to the first byte of the *next* token, the byte that stopped it; after the last
  text token it goes to the EOS, or stays on the token's last byte when the response was cut.

Per token the terms telescope to ``log p_t(v_t)``, so the bytes of a text sum to the teacher's
log-prob of its canonical tokenization exactly: sequence-level estimators see the same ratio as
with chunks. Each student token then gets the sum over its bytes (a token that ends inside a UTF-8
character joins the token that completes it, as with chunks).

Prefix masses need every vocabulary piece as bytes. Pieces are sorted once, so the tokens that
start with a prefix are one contiguous range of ranks, and each mass is one masked log-sum-exp
over the vocabulary, computed beside the token's log-prob in the teacher's chunked projection.
A tokenizer whose pieces do not spell the text it encodes (a decoder that adds or strips spaces)
is refused naming the teacher and the string; ``alignment_credit = "spread"`` needs no pieces.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.alignment import chunk_ids
from opd_jax.chunking import map_row_chunks

__all__ = ["ByteSlots", "VocabularyBytes", "byte_log_probs", "byte_slots", "prefix_log_masses",
           "vocabulary_bytes"]

Array = jax.Array
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE convention: printable Latin-1 bytes stand for themselves, the other 68
    bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


def _decoder_types(tokenizer) -> set[str]:
    """The ``type`` of the fast tokenizer's decoder and of every decoder inside a ``Sequence``."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    found, stack = set(), [decoder]
    while stack:
        node = stack.pop()
        found.add(node.get("type"))
        stack.extend(node.get("decoders", []))
    return found


@dataclasses.dataclass(frozen=True, eq=False)
class VocabularyBytes:
    """Every id's piece as bytes, and the text pieces in sorted order.

    Attributes:
      pieces: ``[V]`` bytes; a special token's is its written form (what it spells in a text).
      special: ``[V]`` bool, tokens that are not text (BOS, EOS, template markers, ids the tokenizer
        does not have): no prefix range holds them.
      rank_V: ``[V]`` int32, each text piece's place in byte order; special tokens get ``V``.
      sorted_pieces: the text pieces in byte order.
    """

    pieces: tuple[bytes, ...]
    special: np.ndarray
    rank_V: np.ndarray
    sorted_pieces: tuple[bytes, ...]

    def prefix_range(self, prefix: bytes) -> tuple[int, int]:
        """``[lo, hi)``: the ranks of the text pieces that start with ``prefix`` (they sort together)."""
        # Above them all: the prefix with its trailing 0xff bytes dropped and its last byte raised.
        stripped = prefix.rstrip(b"\xff")
        above = stripped[:-1] + bytes([stripped[-1] + 1]) if stripped else None
        return (bisect.bisect_left(self.sorted_pieces, prefix),
                len(self.sorted_pieces) if above is None else bisect.bisect_left(self.sorted_pieces, above))


def vocabulary_bytes(tokenizer, vocab_size: int) -> VocabularyBytes:
    """The pieces of a fast tokenizer as bytes: byte-level BPE through its byte alphabet, byte-fallback
    tokens (``<0x41>``) as their byte, ``▁`` as a space (SentencePiece), anything else as UTF-8.

    Args:
      vocab_size: the teacher model's vocabulary (ids past the tokenizer's are special: never text).
    """
    decoders = _decoder_types(tokenizer)
    alphabet = _byte_level_alphabet() if "ByteLevel" in decoders else None
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    special_ids = set(tokenizer.all_special_ids)
    special = np.ones(vocab_size, bool)
    pieces: list[bytes] = []
    for index, token in enumerate(tokens):
        token = token or ""
        special[index] = index in special_ids or not token
        if special[index]:
            pieces.append(token.encode("utf-8"))
        elif alphabet is not None and all(c in alphabet for c in token):
            pieces.append(bytes(alphabet[c] for c in token))
        elif "ByteFallback" in decoders and _BYTE_FALLBACK.match(token):
            pieces.append(bytes([int(_BYTE_FALLBACK.match(token)[1], 16)]))
        else:
            pieces.append((token.replace("\u2581", " ") if decoders & {"Metaspace", "Replace"} else token).encode("utf-8"))
    pieces += [b""] * (vocab_size - len(pieces))
    order = sorted((piece, index) for index, piece in enumerate(pieces) if not special[index])
    rank = np.full(vocab_size, vocab_size, np.int32)
    rank[[index for _, index in order]] = np.arange(len(order), dtype=np.int32)
    return VocabularyBytes(tuple(pieces), special, rank, tuple(piece for piece, _ in order))


class ByteSlots(NamedTuple):
    """One response's teacher tokens laid out as ``[M, D]`` byte slots (slot ``(t, d)``: byte ``d`` of
    token ``t``; an EOS or other special token holds its whole log-prob in slot ``(t, 0)``).

    Attributes:
      lo_MxD, hi_MxD: the rank range of the prefix ``P_t[:d+1]`` (``0, 0`` where unused).
      slot_mask_MxD: a byte (or a special token's one slot).
      slot_chunk_MxD: the student chunk of each slot's byte.
      depth_M: the piece's length in bytes (0 for a special token).
      end_slot_M: the flat slot (``t · D + d``) that receives token ``t``'s stop term.
      student_chunk: ``[len(response)]`` the chunk of each student token.
    """

    lo_MxD: np.ndarray
    hi_MxD: np.ndarray
    slot_mask_MxD: np.ndarray
    slot_chunk_MxD: np.ndarray
    depth_M: np.ndarray
    end_slot_M: np.ndarray
    student_chunk: np.ndarray


def byte_slots(vocabulary: VocabularyBytes, teacher_ids: Sequence[int], text: str, student_char_ends: Sequence[int],
               *, stopped: bool, depth: int, teacher: str) -> ByteSlots:
    """The byte slots of one response (``teacher_ids`` end with the teacher's EOS when ``stopped``).

    A special token inside the text (the student wrote its written form) holds its whole log-prob
    in its one slot, which ends where its text ends.

    Args:
      student_char_ends: the character end of each student token of the text (EOS not included).
      depth: ``D``, at least the longest piece among ``teacher_ids``.

    Raises:
      ValueError: the teacher's pieces do not spell ``text`` (names the teacher and the string).
    """
    text_ids = list(teacher_ids[:-1] if stopped else teacher_ids)
    spelled = b"".join(vocabulary.pieces[i] for i in text_ids)
    if spelled != text.encode("utf-8"):
        raise ValueError(f"teacher {teacher!r}: its tokens' pieces spell {spelled!r}, not the student's text "
                         f"{text!r}; alignment_credit 'characters' needs a tokenizer whose pieces spell the text "
                         "(byte-level BPE, SentencePiece without an added space, character or WordLevel pieces): "
                         "use alignment_credit 'spread'")
    tokens = len(teacher_ids)
    lo, hi = np.zeros((tokens, depth), np.int32), np.zeros((tokens, depth), np.int32)
    slot_mask, slot_ends = np.zeros((tokens, depth), bool), np.zeros((tokens, depth), np.int64)
    depth_M = np.zeros(tokens, np.int32)
    start = 0
    for t, token in enumerate(text_ids):
        piece = vocabulary.pieces[token]
        if vocabulary.special[token]:
            slot_mask[t, 0], slot_ends[t, 0] = True, start + len(piece)
        else:
            depth_M[t] = len(piece)
            slot_mask[t, : len(piece)] = True
            slot_ends[t, : len(piece)] = start + np.arange(1, len(piece) + 1)
            for d in range(len(piece)):
                lo[t, d], hi[t, d] = vocabulary.prefix_range(piece[: d + 1])
        start += len(piece)
    # A token's stop term goes to the next token's first slot; the last text token keeps its own when
    # the response was cut (nothing follows it).
    end_slot = np.arange(1, tokens + 1, dtype=np.int32) * depth
    if stopped:
        slot_mask[-1, 0], slot_ends[-1, 0] = True, start + 1
        end_slot[-1] = (tokens - 1) * depth
    elif tokens:
        end_slot[-1] = (tokens - 1) * depth + max(int(depth_M[-1]) - 1, 0)
    byte_of_char = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])
    student_ends = [int(byte_of_char[end]) for end in student_char_ends] + [start + 1] * stopped
    student_chunk, chunk_of_slot = chunk_ids(student_ends, slot_ends[slot_mask])
    slot_chunk = np.zeros((tokens, depth), np.int32)
    slot_chunk[slot_mask] = chunk_of_slot
    return ByteSlots(lo, hi, slot_mask, slot_chunk, depth_M, end_slot, student_chunk)


def prefix_log_masses(model, tokens_BxN: Array, token_mask_BxN: Array, lo_BxNxD: Array, hi_BxNxD: Array,
                      rank_V: Array, *, temperature: float = 1.0, chunk_size: int | None = None) -> tuple[Array, Array]:
    """``(logp_BxN, masses_BxNxD)``: each token's log-prob and the log mass of every piece prefix in
    its byte slots, from the distribution that predicts it (the one at the slot before).

    ``masses[b, n, d] = log Σ_{v: lo ≤ rank_V[v] < hi} p(v | tokens[b, <n])`` with the bounds of slot
    ``(n, d)``; ``-inf`` for an empty range (unused slots, masked later). float32, chunked over
    tokens like :func:`opd_jax.sampling.token_log_probs`.
    """
    from opd_jax.sampling import positions_from_mask

    token_mask_BxN = token_mask_BxN.astype(bool)
    hidden, _ = model.hidden_states(tokens_BxN, positions_BxT=positions_from_mask(token_mask_BxN),
                                    token_mask_BxT=token_mask_BxN)
    batch, length, width = hidden.shape
    depth = lo_BxNxD.shape[-1]
    projection = model.output_projection()

    def rows(hidden_RxE, target_R, lo_RxD, hi_RxD):
        logits_RxV = jnp.einsum("re,ev->rv", hidden_RxE, projection, preferred_element_type=jnp.float32) / temperature
        total_R = jax.nn.logsumexp(logits_RxV, axis=-1)
        picked_R = jnp.take_along_axis(logits_RxV, target_R[:, None], axis=-1)[:, 0] - total_R
        masses = [jax.nn.logsumexp(jnp.where((rank_V >= lo_RxD[:, d, None]) & (rank_V < hi_RxD[:, d, None]),
                                             logits_RxV, -jnp.inf), axis=-1) - total_R for d in range(depth)]
        return jnp.concatenate([picked_R[:, None], jnp.stack(masses, axis=-1)], axis=-1)

    # Position n − 1 predicts token n.
    out = map_row_chunks(rows, hidden[:, :-1].reshape(-1, width), tokens_BxN[:, 1:].reshape(-1),
                         lo_BxNxD[:, 1:].reshape(-1, depth), hi_BxNxD[:, 1:].reshape(-1, depth),
                         chunk_size=chunk_size).reshape(batch, length - 1, depth + 1)
    out = jnp.concatenate([jnp.zeros((batch, 1, depth + 1), jnp.float32), out], axis=1)
    has_context = token_mask_BxN & jnp.pad(token_mask_BxN[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(has_context, out[..., 0], 0.0), out[..., 1:]


def byte_log_probs(logp_BxN: Array, masses_BxNxD: Array, slot_mask_BxNxD: Array, depth_BxN: Array,
                   end_slot_BxN: Array) -> Array:
    """``[B, N·D]``: the teacher's log-prob of each byte slot (module docstring); 0 at unused slots.

    Args:
      logp_BxN: each token's log-prob; masses_BxNxD: :func:`prefix_log_masses`.
      slot_mask_BxNxD, depth_BxN, end_slot_BxN: the :class:`ByteSlots` fields, placed at the
        teacher's response positions (``end_slot`` indexes the flat ``N · D`` slots).
    """
    batch, length, depth = masses_BxNxD.shape
    text_BxN = depth_BxN > 0
    text_slot = slot_mask_BxNxD & text_BxN[..., None]
    masses = jnp.where(text_slot, masses_BxNxD, 0.0)
    before = jnp.concatenate([jnp.zeros_like(masses[..., :1]), masses[..., :-1]], axis=-1)
    per_byte = jnp.where(text_slot, masses - before, 0.0)
    whole_piece = jnp.take_along_axis(masses, jnp.maximum(depth_BxN - 1, 0)[..., None], axis=-1)[..., 0]
    stop_BxN = jnp.where(text_BxN, logp_BxN - whole_piece, 0.0)
    special = slot_mask_BxNxD[..., 0] & ~text_BxN
    per_byte = per_byte.at[..., 0].add(jnp.where(special, logp_BxN, 0.0)).reshape(batch, length * depth)
    return jax.vmap(lambda row, slots, values: row.at[slots].add(values))(per_byte, end_slot_BxN, stop_BxN)
