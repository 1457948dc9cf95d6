"""Exact enumeration with two tokenizers over one character alphabet: what cross-tokenizer OPD follows.

The student writes tokens of its own vocabulary (pieces of text over a character alphabet, plus
EOS); the teacher scores the student's text on its own tokenization. With both vocabularies
tiny, every student response is listed (:func:`opd_jax.exact.enumerate_responses`), its text
re-tokenized with the teacher's canonical tokenizer (greedy longest match, as WordPiece does), and
the teacher's tabular policy scores those tokens. The objectives:

* ``"sequence"``: ``J_seq = Σ_y π(y) f(q(z(y)) / π(y))``, where ``z(y)`` is the teacher's canonical
  tokenization of ``y``'s text (and EOS when ``y`` stopped). Sequence-level OPD+ on the aligned
  log-probs (:func:`opd_jax.alignment.aligned_teacher_logp`) is unbiased for it: the score-function
  identity holds for any fixed ``q(z(y))``, and the aligned log-ratios sum to ``log q(z(y)) − log π(y)``.
* ``"chunk"``: ``J_chunk = Σ_y π(y) Σ_c f(u_c)``, the token-sum objective over the aligned chunks.
  Token-level estimators share each chunk's ratio among its student tokens (or credit it to the
  last one); they are biased for it whenever a chunk holds several student tokens (``f`` of a share
  is not a share of ``f``) or the teacher re-tokenizes a prefix when the text goes on (a later token
  changes an earlier chunk).
* ``"bytes"``: ``J_bytes = Σ_y π(y) Σ_n f(ũ_n)``, the token-sum objective with the teacher's
  log-probs factored over the characters of the text (:mod:`opd_jax.teacher_bytes`, computed here
  from the teacher's whole distribution at each of its tokens) and summed per student token. Each
  character's share depends on the text up to that character whenever the teacher's tokenization
  of a prefix is settled by the next character, as greedy matching with these pieces is, so then
  token-level OPD+ with γ = 1 is unbiased for it, as with one tokenizer.
* ``"text"``: the f-divergence between the two distributions over texts, ``Σ_t π(t) f(q(t) / π(t))``
  with ``π(t)`` summed over every student tokenization of ``t`` and ``q(t)`` over every teacher
  tokenization. This is what one might want, and **no estimator here follows it**: ``J_seq`` compares
  one student tokenization with the teacher's canonical one. The two agree when both tokenizers
  are unambiguous (each text has one tokenization on each side) and :func:`measure` says by how much
  they differ otherwise.

Everything is float64 when ``jax_enable_x64`` is on; the teacher is a constant.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import divergences as divergences_lib
from opd_jax.advantages import sequence_advantages, token_advantages
from opd_jax.alignment import aligned_teacher_logp, chunk_ids
from opd_jax.exact import SequenceSpace, enumerate_responses, expected_gradient, response_log_probs, sampled_log_probs
from opd_jax.objectives import pg_surrogate

__all__ = ["CrossProblem", "PieceTokenizer", "cross_estimator_gradient", "cross_objective", "make_problem"]

Array = jax.Array
OBJECTIVES = ("sequence", "chunk", "bytes", "text")
CREDITS = ("spread", "last", "characters")


@dataclasses.dataclass(frozen=True)
class PieceTokenizer:
    """A vocabulary of text pieces over a character alphabet; id ``len(pieces)`` is EOS.

    Canonical tokenization is greedy longest match from the left; every single character of the
    texts it is given must be a piece.
    """

    pieces: tuple[str, ...]

    @property
    def eos_id(self) -> int:
        return len(self.pieces)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces) + 1

    def encode(self, text: str) -> tuple[int, ...]:
        """The canonical ids of ``text`` (no EOS)."""
        ids, start = [], 0
        while start < len(text):
            match = max((i for i, piece in enumerate(self.pieces) if text.startswith(piece, start)),
                        key=lambda i: len(self.pieces[i]), default=None)
            if match is None:
                raise ValueError(f"{text[start]!r} at {start} of {text!r} is not a piece of {self.pieces}")
            ids.append(match)
            start += len(self.pieces[match])
        return tuple(ids)

    def segmentations(self, text: str) -> list[tuple[int, ...]]:
        """Every sequence of ids whose pieces spell ``text`` (the canonical one among them)."""
        if not text:
            return [()]
        return [(i, *rest) for i, piece in enumerate(self.pieces) if text.startswith(piece)
                for rest in self.segmentations(text[len(piece):])]

    def text(self, ids) -> tuple[str, bool]:
        """``(text, stopped)`` of ids, read up to and without the first EOS."""
        ids = list(ids)
        stopped = self.eos_id in ids
        return "".join(self.pieces[i] for i in ids[: ids.index(self.eos_id) if stopped else len(ids)]), stopped

    def ends(self, ids) -> list[int]:
        """Character end offset of each id; EOS gets a character of its own past the text."""
        ends, position = [], 0
        for i in ids:
            position += 1 if i == self.eos_id else len(self.pieces[i])
            ends.append(position)
        return ends


@dataclasses.dataclass(frozen=True, eq=False)
class CrossProblem:
    """Every student response with its text, the teacher's tokens of it, and the alignment.

    Attributes:
      space: the student's enumerated responses ``[N, T]``.
      teacher_tokens, teacher_mask: ``[N, M]`` the teacher's canonical tokens (and EOS if stopped).
      teacher_logp: ``[N, M]`` their log-probs under the teacher (0 where masked).
      student_chunk, teacher_chunk: ``[N, T]`` / ``[N, M]`` int32 chunk indices (0 where masked).
      text_group: ``[N]`` int32, one index per distinct ``(text, stopped)``.
      teacher_text_logp: ``[G]`` ``log q(t)``, summed over every teacher tokenization of each text.
      char_logp, char_mask, char_chunk: ``[N, K]`` the teacher's log-prob of each character of the
        text (and of the EOS when stopped; :mod:`opd_jax.teacher_bytes`), and its student chunk.
      char_student_chunk: ``[N, T]`` the chunk of each student token against the characters.
    """

    space: SequenceSpace
    teacher_tokens: np.ndarray
    teacher_mask: np.ndarray
    teacher_logp: np.ndarray
    student_chunk: np.ndarray
    teacher_chunk: np.ndarray
    text_group: np.ndarray
    teacher_text_logp: np.ndarray
    char_logp: np.ndarray
    char_mask: np.ndarray
    char_chunk: np.ndarray
    char_student_chunk: np.ndarray


def _teacher_rows(seed: int, vocab_size: int, scale: float) -> Callable[[tuple[int, ...]], np.ndarray]:
    """The tabular teacher's log-softmax row after each prefix of its tokens: Gaussian logits drawn
    on first use from a generator seeded by the prefix, so a score never depends on call order."""

    @functools.cache
    def log_softmax_row(prefix: tuple[int, ...]) -> np.ndarray:
        logits = scale * np.random.default_rng([seed, len(prefix), *prefix]).standard_normal(vocab_size)
        return logits - np.logaddexp.reduce(logits)

    return log_softmax_row


def _character_log_probs(tokenizer: PieceTokenizer, rows, z: tuple[int, ...], stopped: bool) -> list[float]:
    """The teacher's log-prob of each character of ``z``'s text (then of its EOS when ``stopped``):
    character ``d`` of token ``t`` gets ``log m_t(P_t[:d+1]) − log m_t(P_t[:d])`` (``m_t(s)``: the mass
    of the pieces that start with ``s``), and ``log q(z_t) − log m_t(P_t)`` goes to the next character
    (the EOS; or the token's last character when nothing follows)."""
    values, stop = [], 0.0
    for t, token in enumerate(z):
        row = rows(tuple(z[:t]))
        if token == tokenizer.eos_id:
            values.append(stop + float(row[token]))
            continue
        piece, before = tokenizer.pieces[token], 0.0
        for d in range(len(piece)):
            mass = float(np.logaddexp.reduce([row[i] for i, p in enumerate(tokenizer.pieces)
                                              if p.startswith(piece[: d + 1])]))
            values.append(mass - before + (stop if d == 0 else 0.0))
            before = mass
        stop = float(row[token]) - before
    if not stopped and z:
        values[-1] += stop
    return values


def make_problem(student: PieceTokenizer, teacher: PieceTokenizer | None, horizon: int, *, seed: int = 0,
                 teacher_scale: float = 1.5) -> CrossProblem:
    """Enumerate the student's responses and score their texts with a random tabular teacher.

    ``teacher=None`` is the one-tokenizer case: the teacher scores the student's own tokens (not a
    re-tokenization), so every chunk is one token and ``"chunk"`` is ``J_tok``.
    """
    space = enumerate_responses(student.vocab_size, horizon, student.eos_id)
    scorer = teacher or student
    rows_fn = _teacher_rows(seed, scorer.vocab_size, teacher_scale)
    score = lambda z: [float(rows_fn(tuple(z[:j]))[token]) for j, token in enumerate(z)]  # noqa: E731
    rows, groups = [], {}
    for tokens, mask in zip(space.tokens, space.mask):
        ids = tokens[mask].tolist()
        text, stopped = student.text(ids)
        eos = (scorer.eos_id,) if stopped else ()
        z = tuple(ids) if teacher is None else teacher.encode(text) + eos
        student_chunk, teacher_chunk = chunk_ids(student.ends(ids), scorer.ends(z))
        if (text, stopped) not in groups:
            every = [float(np.sum(score(seg + eos))) for seg in scorer.segmentations(text)]
            groups[(text, stopped)] = (len(groups), float(np.logaddexp.reduce(every)))
        characters = _character_log_probs(scorer, rows_fn, z, stopped)
        char_student_chunk, char_chunk = chunk_ids(student.ends(ids), list(range(1, len(characters) + 1)))
        rows.append((z, score(z), student_chunk, teacher_chunk, groups[(text, stopped)][0], characters, char_chunk,
                     char_student_chunk))
    width = max(len(z) for z, *_ in rows)
    chars = max(len(row[5]) for row in rows)
    column = lambda index, length, dtype: _padded([row[index] for row in rows], length, dtype)  # noqa: E731
    return CrossProblem(
        space, column(0, width, np.int32), _padded([[True] * len(z) for z, *_ in rows], width, bool),
        column(1, width, np.float64), column(2, horizon, np.int32), column(3, width, np.int32),
        np.asarray([row[4] for row in rows], np.int32),
        np.asarray([logp for _, logp in sorted(groups.values())], np.float64),
        column(5, chars, np.float64), _padded([[True] * len(row[5]) for row in rows], chars, bool),
        column(6, chars, np.int32), column(7, horizon, np.int32))


def _padded(rows, length: int, dtype) -> np.ndarray:
    """Ragged rows as ``[len(rows), length]``, zeros after each row's end."""
    out = np.zeros((len(rows), length), dtype)
    for index, row in enumerate(rows):
        out[index, : len(row)] = row
    return out


def _teacher_side(problem: CrossProblem, view: str) -> tuple[np.ndarray, ...]:
    """``(teacher_logp, teacher_mask, teacher_chunk, student_chunk)`` of the token (chunk) or character view."""
    if view == "characters":
        return problem.char_logp, problem.char_mask, problem.char_chunk, problem.char_student_chunk
    return problem.teacher_logp, problem.teacher_mask, problem.teacher_chunk, problem.student_chunk


def _aligned(student_logp: Array, problem: CrossProblem, credit: str) -> Array:
    if credit not in CREDITS:
        raise ValueError(f"credit must be one of {', '.join(CREDITS)}; got {credit!r}")
    teacher_logp, teacher_mask, teacher_chunk, student_chunk = _teacher_side(problem, credit)
    return aligned_teacher_logp(student_logp, jnp.asarray(teacher_logp, student_logp.dtype),
                                jnp.asarray(student_chunk), jnp.asarray(teacher_chunk), jnp.asarray(problem.space.mask),
                                jnp.asarray(teacher_mask), credit="spread" if credit == "characters" else credit)


def cross_objective(student_logits: Array, problem: CrossProblem, *, divergence, objective: str) -> Array:
    """The exact ``"sequence"``, ``"chunk"``, ``"bytes"`` or ``"text"`` objective (module docstring),
    differentiable in ``student_logits [N, T, V]``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    divergence = divergences_lib.get(divergence)
    mask = jnp.asarray(problem.space.mask)
    student_logp = jnp.where(mask, sampled_log_probs(student_logits, problem.space.tokens), 0)
    log_pi = response_log_probs(student_logp, mask)
    if objective == "text":
        groups = jnp.asarray(problem.text_group)
        log_pi_text = jax.ops.segment_sum(jnp.exp(log_pi), groups, num_segments=len(problem.teacher_text_logp))
        log_pi_text = jnp.log(log_pi_text)
        return jnp.sum(jnp.exp(log_pi_text) * divergence.f(jnp.asarray(problem.teacher_text_logp) - log_pi_text))
    teacher_response = jnp.sum(jnp.where(problem.teacher_mask, problem.teacher_logp, 0), axis=-1)
    if objective == "sequence":
        return jnp.sum(jnp.exp(log_pi) * divergence.f(teacher_response - log_pi))
    chunks = problem.space.horizon

    def chunk_terms(student_row, teacher_row, student_chunk, teacher_chunk, student_mask, teacher_mask):
        teacher_sum = jax.ops.segment_sum(jnp.where(teacher_mask, teacher_row, 0), teacher_chunk, chunks)
        student_sum = jax.ops.segment_sum(jnp.where(student_mask, student_row, 0), student_chunk, chunks)
        present = jax.ops.segment_sum(student_mask.astype(jnp.int32), student_chunk, chunks) > 0
        return jnp.sum(jnp.where(present, divergence.f(teacher_sum - student_sum), 0))

    teacher_logp, teacher_mask, teacher_chunk, student_chunk = _teacher_side(
        problem, "characters" if objective == "bytes" else "chunks")
    per_response = jax.vmap(chunk_terms)(student_logp, jnp.asarray(teacher_logp), student_chunk, teacher_chunk, mask,
                                         jnp.asarray(teacher_mask))
    return jnp.sum(jnp.exp(log_pi) * per_response)


def cross_estimator_gradient(student_logits_fn: Callable, params, problem: CrossProblem, *, divergence,
                             level: str, estimator: str, gamma: float = 0.0, credit: str = "spread"):
    """``Σ_y π(y) ∇L(y)`` of the library's ``level`` estimator on the aligned teacher log-probs
    (``credit``: ``"spread"`` or ``"last"``, how a chunk's ratio reaches its tokens,
    :func:`opd_jax.alignment.aligned_teacher_logp`; ``"characters"``: the character view, summed
    per student token)."""
    divergence = divergences_lib.get(divergence)

    def loss_fn(_student_logits, student_logp, mask):
        teacher_logp = _aligned(student_logp, problem, credit)
        if level == "token":
            advantages = token_advantages(student_logp, teacher_logp, mask, divergence=divergence,
                                          estimator=estimator, gamma=gamma)
        else:
            advantages = sequence_advantages(student_logp, teacher_logp, mask, divergence=divergence,
                                             estimator=estimator)
        return pg_surrogate(student_logp, advantages, mask)

    return expected_gradient(student_logits_fn, params, problem.space, loss_fn)
