"""The tool-use task's characters and their ids: the :class:`Vocabulary` the environment encodes
with, the ``transformers`` tokenizer with the same ids, and the prompt encoder.

Both are :mod:`opd_jax.tasks.characters` over :data:`ALPHABET`, the construction the arithmetic
task's tokenizer uses too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from opd_jax.tasks.characters import CharacterVocabulary
from opd_jax.tasks.tool_use.problems import ToolUseProblem
from opd_jax.tasks.tool_use.tools import CALL_CLOSE

__all__ = ["ALPHABET", "Vocabulary", "build_tokenizer", "encode_prompts"]

#: Every character a prompt, a call, a tool output or an answer may contain. Their ids follow the
#: special tokens from id 3 in this order: the shipped models' ids, so the order is fixed.
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz[]:=,*+-.?> "


@dataclasses.dataclass(frozen=True)
class Vocabulary(CharacterVocabulary):
    """The task's character-level ids, for the environment (no tokenizer call per turn).

    ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then :data:`ALPHABET` from id 3 — the ids of
    :func:`build_tokenizer` and of the shipped tokenizer (checked by the tests).
    """

    alphabet: str = ALPHABET

    @property
    def close_id(self) -> int:
        """The id of ``]``, which ends a model turn."""
        return self.encode(CALL_CLOSE)[0]


def build_tokenizer():
    """The task's character-level ``transformers`` fast tokenizer (see :class:`Vocabulary` for ids).

    No BOS, no chat template: one id per character; decoding concatenates the tokens.
    """
    return Vocabulary().tokenizer()


def encode_prompts(problems: Sequence[ToolUseProblem], max_length: int,
                   vocabulary: Vocabulary = Vocabulary()) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids ``[N, max_length]`` int32 and mask ``[N, max_length]`` bool.

    Raises:
      ValueError: a prompt longer than ``max_length`` characters.
    """
    tokens = np.full((len(problems), max_length), vocabulary.pad_id, np.int32)
    mask = np.zeros((len(problems), max_length), bool)
    for row, problem in enumerate(problems):
        ids = vocabulary.encode(problem.prompt)
        if len(ids) > max_length:
            raise ValueError(f"prompt {problem.prompt!r} has {len(ids)} tokens, more than {max_length}")
        tokens[row, max_length - len(ids) :] = ids
        mask[row, max_length - len(ids) :] = True
    return tokens, mask
