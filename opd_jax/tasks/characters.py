"""The character-level vocabulary and tokenizer that every toy task uses.

A toy task's text is written in a small alphabet, one token per character. Ids: the special tokens
``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then one id per character of the task's alphabet, in the
alphabet's order, from id 3 (any other character encodes as ``<unk>``). There is no BOS and no chat
template: encoding gives exactly one id per character, decoding concatenates the tokens.

:class:`CharacterVocabulary` holds these ids and encodes without ``transformers`` (a multi-turn
environment encodes every tool output with it); :meth:`CharacterVocabulary.tokenizer` builds the
``transformers`` fast tokenizer with the same ids, the one saved beside the shipped models. The ids
of the shipped tokenizers depend on the construction here, so it must not change:
``tests/test_tasks.py`` and ``tests/test_tool_use.py`` compare it with the shipped ``tokenizer.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = ["SPECIAL_TOKENS", "CharacterVocabulary", "build_tokenizer"]

#: Special tokens at ids 0, 1, 2 (padding, end of sequence, unknown character).
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")


@dataclasses.dataclass(frozen=True)
class CharacterVocabulary:
    """The ids of a character-level vocabulary: :data:`SPECIAL_TOKENS`, then ``alphabet``.

    Attributes:
      alphabet: every character the task writes, each once (its order fixes the ids).
    """

    alphabet: str

    def __post_init__(self):
        if not isinstance(self.alphabet, str) or not self.alphabet:
            raise ValueError(f"alphabet must be a non-empty string, got {self.alphabet!r}")
        if len(set(self.alphabet)) != len(self.alphabet):
            repeated = sorted({c for c in self.alphabet if self.alphabet.count(c) > 1})
            raise ValueError(f"alphabet characters must be distinct; repeated: {repeated}")

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every token, by id: the special tokens, then the characters of the alphabet."""
        return (*SPECIAL_TOKENS, *self.alphabet)

    @property
    def pad_id(self) -> int:
        return SPECIAL_TOKENS.index("<pad>")

    @property
    def eos_id(self) -> int:
        return SPECIAL_TOKENS.index("<eos>")

    @property
    def unk_id(self) -> int:
        return SPECIAL_TOKENS.index("<unk>")

    def __len__(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        """One id per character of ``text`` (``<unk>`` for a character outside the alphabet)."""
        offset = len(SPECIAL_TOKENS)
        return [offset + self.alphabet.index(c) if c in self.alphabet else self.unk_id for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """The tokens of ``ids`` concatenated; special tokens as their names (so that they break any
        format a checker expects, as they do in the tokenizer's ``decode``)."""
        tokens = self.tokens
        return "".join(tokens[i] for i in map(int, ids))

    def tokenizer(self, *, model_max_length: int = 1024):
        """The ``transformers`` fast tokenizer with these ids (:func:`build_tokenizer`)."""
        return build_tokenizer(self.alphabet, model_max_length=model_max_length)

    def check_tokenizer(self, tokenizer, task: str) -> None:
        """Raise ``ValueError`` naming ``task`` unless ``tokenizer`` encodes the alphabet, EOS and
        padding with these ids (a tokenizer loaded from a model folder before its model is used)."""
        ids = tokenizer(self.alphabet, add_special_tokens=True)["input_ids"]
        if ids != self.encode(self.alphabet) or (tokenizer.eos_token_id, tokenizer.pad_token_id) != (
                self.eos_id, self.pad_id):
            raise ValueError(f"the tokenizer does not match the {task} task's character vocabulary")


def build_tokenizer(alphabet: str, *, model_max_length: int = 1024):
    """The character-level ``transformers`` fast tokenizer of ``alphabet`` (ids of :class:`CharacterVocabulary`).

    A ``WordLevel`` model over :data:`SPECIAL_TOKENS` and the characters, after a pre-tokenizer
    that makes every character its own pre-token. ``encode`` with ``add_special_tokens=True`` gives
    one id per character; decoding concatenates the tokens. Save it with ``save_pretrained(folder)``;
    :func:`opd_jax.tokenization.load_tokenizer` loads it back.

    Raises:
      ValueError: an empty alphabet or one with a repeated character.
    """
    import tokenizers

    from opd_jax.tokenization import import_transformers

    transformers = import_transformers()  # without the "PyTorch was not found" banner

    vocabulary = CharacterVocabulary(alphabet)
    pad, eos, unk = SPECIAL_TOKENS
    ids = {token: index for index, token in enumerate(vocabulary.tokens)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(ids, unk_token=unk))
    # One pre-token per character ([\s\S] also matches newlines), each looked up in the vocabulary.
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, eos_token=eos, unk_token=unk, clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
