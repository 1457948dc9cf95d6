"""Prompts the tokenizer cannot represent: text that encodes to its unknown token.

A vocabulary without byte fallback (the toy tasks' character tokenizer, WordPiece, some
SentencePiece models) maps what it has no piece for to ``unk``; the student then trains on prompts
it never saw as written. :func:`check_prompts` names each such prompt by file and line, with the
characters that fell out, before anything is written: an error by default, a warning when allowed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from opd_jax.errors import InputError

__all__ = ["check_prompts", "unknown_characters"]

_SHOWN_PROMPTS = 5
_SHOWN_CHARACTERS = 20


def unknown_characters(tokenizer, text: str) -> list[str]:
    """The pieces of ``text`` that ``tokenizer`` encodes to its unknown token, in order, each once.

    Empty when the tokenizer has no unknown token (byte-level BPE represents every text).
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not text:
        return []
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # a slow (Python) tokenizer has no offsets
        encoded = None
    if encoded is not None:
        pieces = [text[start:end] for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"],
                                                                  strict=True) if token == unk]
    elif unk in tokenizer.encode(text, add_special_tokens=False):
        pieces = [c for c in text if unk in tokenizer.encode(c, add_special_tokens=False)]
    else:
        pieces = []
    return list(dict.fromkeys(p for p in pieces if p))


def check_prompts(tokenizer, prompts: Sequence[str | list[dict[str, str]]], labels: Sequence[str], *,
                  allow: bool = False, flag: str = "--allow-unknown-tokens") -> list[str]:
    """Refuse (or, with ``allow``, warn about) prompts with text that encodes to the unknown token.

    Args:
      tokenizer: the student's tokenizer (the teachers' is the same, checked elsewhere).
      prompts: texts, or chats (each message's ``content`` is checked).
      labels: how each prompt is named, e.g. ``"/data/p.jsonl:3"``.
      allow: warn on stderr instead of raising.
      flag: what allows them, for the message.

    Returns:
      one line per prompt with unknown characters (``LABEL: 'x', 'y'``); empty when there are none.

    Raises:
      InputError: naming up to five prompts by label with their characters, the unknown token and
        ``flag``.
    """
    found = []
    for label, prompt in zip(labels, prompts, strict=True):
        texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
        pieces = list(dict.fromkeys(p for text in texts for p in unknown_characters(tokenizer, text)))
        if pieces:
            shown = ", ".join(repr(p) for p in pieces[:_SHOWN_CHARACTERS])
            more = f" and {len(pieces) - _SHOWN_CHARACTERS} more" if len(pieces) > _SHOWN_CHARACTERS else ""
            found.append(f"{label}: {shown}{more}")
    if not found:
        return []
    token = f"{tokenizer.unk_token!r} (id {tokenizer.unk_token_id})"
    listed = "; ".join(found[:_SHOWN_PROMPTS]) + (
        f"; and {len(found) - _SHOWN_PROMPTS} more prompt(s)" if len(found) > _SHOWN_PROMPTS else "")
    message = (f"{len(found)} prompt(s) hold text the student's tokenizer has no token for; it encodes to the "
               f"unknown token {token}, which the models would see instead: {listed}")
    if not allow:
        raise InputError(f"{message}. Rewrite the prompts with characters the vocabulary has, or pass {flag} "
                         "to train on them as encoded")
    print(f"warning: {message} ({flag}: training on them as encoded)", file=sys.stderr)
    return found
