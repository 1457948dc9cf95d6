"""Tokenizers from local checkpoint folders, prompt encoding, and the teacher/student compatibility check.

OPD compares the teacher's and the student's log-probabilities of the *same token ids*. If the two
tokenizers disagree on the vocabulary, a special token or how a text splits into ids, every
log-ratio is silently wrong, so :func:`check_compatible` runs before any training and fails loudly.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from opd_jax.models.config import DecoderConfig

__all__ = ["DEFAULT_PROBE", "check_compatible", "encode_prompts", "load_tokenizer"]

DEFAULT_PROBE = "Distil 12 + 30 = 42 step by step.\nÜber naïve café — 你好, мир! <|im_end|>"

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str | pathlib.Path):
    """A transformers tokenizer from a local folder (never the hub).

    Raises:
      FileNotFoundError: the folder has none of ``tokenizer.json``, ``tokenizer_config.json``,
        ``vocab.json``, ``tokenizer.model``.
    """
    import transformers

    folder = pathlib.Path(path)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {folder}: expected one of {', '.join(_TOKENIZER_FILES)}")
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def encode_prompts(
    tokenizer,
    prompts: Sequence[str | list[dict[str, str]]],
    *,
    max_length: int,
    use_chat_template: bool = True,
    pad_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encode prompts as a left-padded batch for :func:`opd_jax.sampling.generate`.

    Args:
      tokenizer: a transformers tokenizer.
      prompts: texts, or chat conversations (lists of ``{"role", "content"}``).
      max_length: ``P``, the padded length.
      use_chat_template: wrap texts as a user turn and apply the tokenizer's chat template with the
        generation prompt, when the tokenizer has one.
      pad_id: padding id (default: the tokenizer's pad, else eos, else 0).

    Returns:
      ``(tokens [B, P] int32, mask [B, P] bool)``.

    Raises:
      ValueError: a prompt longer than ``max_length`` (the message gives its index and length).
    """
    if pad_id is None:
        pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    tokens = np.full((len(prompts), max_length), pad_id, np.int32)
    mask = np.zeros((len(prompts), max_length), bool)
    for row, prompt in enumerate(prompts):
        ids = _encode_one(tokenizer, prompt, use_chat_template)
        if len(ids) > max_length:
            raise ValueError(f"prompt {row} has {len(ids)} tokens, more than max_length {max_length}")
        if ids:
            tokens[row, -len(ids) :] = ids
            mask[row, -len(ids) :] = True
    return tokens, mask


def _encode_one(tokenizer, prompt: str | list[dict[str, str]], use_chat_template: bool) -> list[int]:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str) and not (use_chat_template and has_template):
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    if not has_template:
        raise ValueError("a chat conversation was given, but the tokenizer has no chat_template")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    encoded: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def check_compatible(
    teacher_tokenizer,
    student_tokenizer,
    teacher_config: DecoderConfig,
    student_config: DecoderConfig,
    *,
    probe_text: str = DEFAULT_PROBE,
) -> None:
    """Fail before training if teacher and student would not score the same token ids.

    Checks that the tokenizers have the same size and special tokens (ids), that they encode the
    probe text (and its chat-template form) to the same ids, and that both models' output layers
    cover the tokenizer and have the same vocabulary size.

    Raises:
      ValueError: naming the first mismatch and both values.
    """
    def mismatch(what, teacher_value, student_value):
        return ValueError(f"teacher/student {what} mismatch: teacher {teacher_value!r}, student {student_value!r}")

    if len(teacher_tokenizer) != len(student_tokenizer):
        raise mismatch("tokenizer size", len(teacher_tokenizer), len(student_tokenizer))
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        teacher_value, student_value = getattr(teacher_tokenizer, attribute), getattr(student_tokenizer, attribute)
        if teacher_value != student_value:
            raise mismatch(attribute, teacher_value, student_value)
    teacher_ids = teacher_tokenizer.encode(probe_text, add_special_tokens=True)
    student_ids = student_tokenizer.encode(probe_text, add_special_tokens=True)
    if list(teacher_ids) != list(student_ids):
        raise mismatch("token ids of the probe text", list(teacher_ids), list(student_ids))
    if bool(getattr(teacher_tokenizer, "chat_template", None)) and bool(getattr(student_tokenizer, "chat_template", None)):
        conversation = [{"role": "user", "content": probe_text}]
        teacher_chat = _encode_one(teacher_tokenizer, conversation, True)
        student_chat = _encode_one(student_tokenizer, conversation, True)
        if teacher_chat != student_chat:
            raise mismatch("chat-template token ids", teacher_chat, student_chat)
    if teacher_config.vocab_size != student_config.vocab_size:
        raise mismatch("model vocab_size (config.json)", teacher_config.vocab_size, student_config.vocab_size)
    if teacher_config.vocab_size < len(teacher_tokenizer):
        raise ValueError(
            f"model vocab_size {teacher_config.vocab_size} is smaller than the tokenizer's {len(teacher_tokenizer)} tokens"
        )
