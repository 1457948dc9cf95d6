"""Tokenizers from local checkpoint folders, prompt encoding, and the teacher/student compatibility check.

OPD compares the teacher's and the student's log-probabilities of the *same token ids*. If the two
tokenizers disagree on the vocabulary, a special token or how a text splits into ids, every
log-ratio is silently wrong, so :func:`check_compatible` runs before any training and fails loudly,
naming every difference it finds.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from opd_jax import storage
from opd_jax.errors import InputError, InputFileNotFoundError
from opd_jax.models.config import DecoderConfig

__all__ = ["DEFAULT_PROBE", "PROBE_CONVERSATION", "check_compatible", "compatibility_differences",
           "encode_prompts", "import_transformers", "load_tokenizer"]

DEFAULT_PROBE = "Distil 12 + 30 = 42 step by step.\nÜber naïve café — 你好, мир! <|im_end|>"
# A conversation with every usual role, so that the templates' handling of each is compared.
PROBE_CONVERSATION = (
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": DEFAULT_PROBE},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "And 7 × 6?"},
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
#: Every tokenizer file transformers may read (the run identity digests these).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
# What a local copy of a remote folder needs to build its tokenizer (config.json names the class for some).
_TOKENIZER_COPY = TOKENIZER_FILES + ("config.json",)
_SHOWN = 5  # examples shown per kind of difference


class _DropNoTorchBanner(logging.Filter):
    """transformers announces at import that PyTorch is missing; opd_jax never needs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


def import_transformers():
    """``import transformers`` without its "PyTorch was not found" banner (other warnings stay).

    The banner is logged on the ``transformers`` logger while the package initialises, so the
    filter has to be on that logger before the first import.
    """
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _DropNoTorchBanner) for f in logger.filters):
        logger.addFilter(_DropNoTorchBanner())
    import transformers

    return transformers


def load_tokenizer(path: str | pathlib.Path):
    """A transformers tokenizer from a local folder (never the hub).

    Raises:
      InputFileNotFoundError: the folder has no tokenizer: none of ``tokenizer.json``,
        ``vocab.json``, ``tokenizer.model`` (``tokenizer_config.json`` alone names a class but holds
        no vocabulary).
      InputError: transformers cannot load the files there (its reason, with the folder).
    """
    transformers = import_transformers()

    folder = storage.as_path(path)
    present = [name for name in _TOKENIZER_FILES if (folder / name).is_file()]
    if not set(present) - {"tokenizer_config.json"}:
        found = f" (it has only {present[0]})" if present else ""
        raise InputFileNotFoundError(f"no tokenizer in {folder}{found}: expected tokenizer.json, vocab.json or "
                                     "tokenizer.model beside config.json")
    try:
        # transformers loads tokenizers from local folders only: a folder in a bucket has its
        # tokenizer files (small) copied to a temporary local folder first; the weights never are.
        with storage.local_copy(folder, _TOKENIZER_COPY) as local:
            return transformers.AutoTokenizer.from_pretrained(str(local), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as error:
        reason = " ".join(str(error).split())
        raise InputError(f"cannot load the tokenizer in {folder} ({', '.join(present)}): {reason}") from None


def encode_prompts(
    tokenizer,
    prompts: Sequence[str | list[dict[str, str]]],
    *,
    max_length: int,
    use_chat_template: bool = True,
    pad_id: int | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encode prompts as a left-padded batch for :func:`opd_jax.sampling.generate`.

    Args:
      tokenizer: a transformers tokenizer.
      prompts: texts, or chat conversations (lists of ``{"role", "content"}``).
      max_length: ``P``, the padded length.
      use_chat_template: wrap texts as a user turn and apply the tokenizer's chat template with the
        generation prompt, when the tokenizer has one.
      pad_id: padding id (default: the tokenizer's pad, else eos, else 0).
      labels: how errors name each prompt (default ``"prompt N"``, 1-based), e.g. its file and line.

    Returns:
      ``(tokens [B, P] int32, mask [B, P] bool)``.

    Raises:
      ValueError: prompts longer than ``max_length`` (the message names each, up to five, with its
        length, and the length that would fit them all).
    """
    if pad_id is None:
        pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    if labels is None:
        labels = [f"prompt {row + 1}" for row in range(len(prompts))]
    encoded = [_encode_one(tokenizer, prompt, use_chat_template) for prompt in prompts]
    too_long = [(label, len(ids)) for label, ids in zip(labels, encoded, strict=True) if len(ids) > max_length]
    if too_long:
        shown = _examples(too_long, lambda item: f"{item[0]} has {item[1]} tokens")
        raise ValueError(
            f"{len(too_long)} prompt(s) longer than max_length {max_length}: {shown} "
            f"(the longest has {max(n for _, n in too_long)} tokens)"
        )
    tokens = np.full((len(prompts), max_length), pad_id, np.int32)
    mask = np.zeros((len(prompts), max_length), bool)
    for row, ids in enumerate(encoded):
        if ids:
            tokens[row, -len(ids) :] = ids
            mask[row, -len(ids) :] = True
    return tokens, mask


def _encode_one(tokenizer, prompt: str | Sequence[dict[str, str]], use_chat_template: bool) -> list[int]:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str) and not (use_chat_template and has_template):
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    if not has_template:
        raise ValueError("a chat conversation was given, but the tokenizer has no chat_template")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
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
    chat_template: bool = True,
) -> None:
    """Fail before training if teacher and student would not score the same token ids.

    Compares everything :func:`compatibility_differences` does and raises once, naming every
    difference.

    Raises:
      ValueError: one line per difference, each naming what differs and both values.
    """
    differences = compatibility_differences(
        teacher_tokenizer, student_tokenizer, teacher_config, student_config,
        probe_text=probe_text, chat_template=chat_template,
    )
    if differences:
        lines = "\n".join(f"  - {d}" for d in differences)
        raise ValueError(
            f"teacher and student would not score the same token ids ({len(differences)} "
            f"difference{'s' if len(differences) > 1 else ''}):\n{lines}"
        )


def compatibility_differences(
    teacher_tokenizer,
    student_tokenizer,
    teacher_config: DecoderConfig,
    student_config: DecoderConfig,
    *,
    probe_text: str = DEFAULT_PROBE,
    chat_template: bool = True,
) -> list[str]:
    """Every way in which the teacher and the student would disagree on token ids.

    Compared: the whole vocabulary (each token's id, tokens only one side has), the tokenization
    model (type, BPE merges or unigram scores, its options, normaliser, pre-tokeniser and
    post-processor), the special tokens (bos / eos / pad / unk ids and every added token with its
    special flag), the ids of ``probe_text``, the chat template's rendering (text and ids) of
    :data:`PROBE_CONVERSATION` (unless ``chat_template`` is False) and both models' vocabulary sizes.

    Returns:
      one message per difference (empty when compatible), each of the form
      ``"teacher/student WHAT mismatch: ..."``.
    """
    differences: list[str] = []

    def mismatch(what, teacher_value, student_value):
        differences.append(f"teacher/student {what} mismatch: teacher {teacher_value!r}, student {student_value!r}")

    if len(teacher_tokenizer) != len(student_tokenizer):
        mismatch("tokenizer size", len(teacher_tokenizer), len(student_tokenizer))
    differences.extend(_vocabulary_differences(teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()))
    differences.extend(_model_differences(teacher_tokenizer, student_tokenizer))
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        teacher_value, student_value = getattr(teacher_tokenizer, attribute), getattr(student_tokenizer, attribute)
        if teacher_value != student_value:
            mismatch(attribute, teacher_value, student_value)
    differences.extend(_added_token_differences(teacher_tokenizer, student_tokenizer))
    teacher_ids = list(teacher_tokenizer.encode(probe_text, add_special_tokens=True))
    student_ids = list(student_tokenizer.encode(probe_text, add_special_tokens=True))
    if teacher_ids != student_ids:
        differences.append(f"teacher/student token ids of the probe text mismatch: {_first_difference(teacher_ids, student_ids)}")
    if chat_template:
        differences.extend(_chat_template_differences(teacher_tokenizer, student_tokenizer))
    if teacher_config.vocab_size != student_config.vocab_size:
        mismatch("model vocab_size (config.json)", teacher_config.vocab_size, student_config.vocab_size)
    for side, config, tokenizer in (("teacher", teacher_config, teacher_tokenizer),
                                    ("student", student_config, student_tokenizer)):
        if config.vocab_size < len(tokenizer):
            differences.append(
                f"{side} model vocab_size {config.vocab_size} (config.json) is smaller than the tokenizer's "
                f"{len(tokenizer)} tokens"
            )
    return differences


def _examples(items: list, render) -> str:
    shown = ", ".join(render(item) for item in items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _vocabulary_differences(teacher_vocab: dict[str, int], student_vocab: dict[str, int]) -> list[str]:
    out = []
    moved = sorted(((t, teacher_vocab[t], student_vocab[t]) for t in teacher_vocab.keys() & student_vocab.keys()
                    if teacher_vocab[t] != student_vocab[t]), key=lambda item: item[1])
    if moved:
        out.append(f"teacher/student vocabulary mismatch: {len(moved)} token(s) have different ids: "
                   + _examples(moved, lambda m: f"{m[0]!r} teacher {m[1]}, student {m[2]}"))
    for side, mine, other in (("teacher", teacher_vocab, student_vocab), ("student", student_vocab, teacher_vocab)):
        only = sorted(((t, mine[t]) for t in mine.keys() - other.keys()), key=lambda item: item[1])
        if only:
            out.append(f"teacher/student vocabulary mismatch: {len(only)} token(s) only the {side} has: "
                       + _examples(only, lambda o: f"{o[0]!r} (id {o[1]})"))
    return out


def _backend(tokenizer) -> dict | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())


def _model_differences(teacher_tokenizer, student_tokenizer) -> list[str]:
    teacher, student = _backend(teacher_tokenizer), _backend(student_tokenizer)
    if teacher is None or student is None:  # a slow (Python) tokenizer: compare what it is
        teacher_kind, student_kind = type(teacher_tokenizer).__name__, type(student_tokenizer).__name__
        if teacher_kind != student_kind:
            return [f"teacher/student tokenizer class mismatch: teacher {teacher_kind!r}, student {student_kind!r}"]
        return []
    out = []
    teacher_model, student_model = teacher["model"], student["model"]
    if teacher_model.get("type") != student_model.get("type"):
        out.append(f"teacher/student tokenizer model type mismatch: teacher {teacher_model.get('type')!r}, "
                   f"student {student_model.get('type')!r}")
        return out
    # BPE: merges decide how a word splits; Unigram: the piece scores do. The vocabulary is compared above.
    for key, what in (("merges", "BPE merges"), ("vocab", "unigram pieces and scores")):
        if key == "vocab" and teacher_model.get("type") != "Unigram":
            continue
        teacher_items = [tuple(m) if isinstance(m, list) else m for m in teacher_model.get(key) or []]
        student_items = [tuple(m) if isinstance(m, list) else m for m in student_model.get(key) or []]
        if teacher_items != student_items:
            out.append(f"teacher/student {what} mismatch: {_first_difference(teacher_items, student_items)}")
    options = sorted(k for k in teacher_model.keys() | student_model.keys()
                     if k not in ("vocab", "merges") and teacher_model.get(k) != student_model.get(k))
    for key in options:
        out.append(f"teacher/student tokenizer model option {key!r} mismatch: teacher {teacher_model.get(key)!r}, "
                   f"student {student_model.get(key)!r}")
    for part in ("normalizer", "pre_tokenizer", "post_processor"):
        if teacher.get(part) != student.get(part):
            out.append(f"teacher/student {part} mismatch: teacher {json.dumps(teacher.get(part))}, "
                       f"student {json.dumps(student.get(part))}")
    return out


def _added_token_differences(teacher_tokenizer, student_tokenizer) -> list[str]:
    def added(tokenizer):
        return {i: (str(t), bool(getattr(t, "special", False)))
                for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}

    teacher, student = added(teacher_tokenizer), added(student_tokenizer)
    differing = sorted(i for i in teacher.keys() | student.keys() if teacher.get(i) != student.get(i))
    if not differing:
        return []

    def render(i):
        def side(entry):
            return "none" if entry is None else f"{entry[0]!r}{' (special)' if entry[1] else ''}"

        return f"id {i}: teacher {side(teacher.get(i))}, student {side(student.get(i))}"

    return [f"teacher/student added/special tokens mismatch: {len(differing)} id(s) differ: "
            + _examples(differing, render)]


def _render(tokenizer, tokenize: bool):
    """The chat template applied to :data:`PROBE_CONVERSATION` (or why it could not be)."""
    if not getattr(tokenizer, "chat_template", None):
        return "no chat_template"
    try:
        if tokenize:
            return _encode_one(tokenizer, PROBE_CONVERSATION, True)
        return tokenizer.apply_chat_template(list(PROBE_CONVERSATION), add_generation_prompt=True, tokenize=False)
    except Exception as error:  # noqa: BLE001 - a template may raise anything (jinja, its own checks)
        return f"an error ({type(error).__name__}: {error})"


def _chat_template_differences(teacher_tokenizer, student_tokenizer) -> list[str]:
    teacher_text, student_text = _render(teacher_tokenizer, False), _render(student_tokenizer, False)
    if teacher_text != student_text:
        if isinstance(teacher_text, str) and isinstance(student_text, str) and not teacher_text.startswith(
            ("no chat_template", "an error")
        ) and not student_text.startswith(("no chat_template", "an error")):
            return [f"teacher/student chat-template rendering of the probe conversation mismatch: "
                    f"{_first_difference(teacher_text, student_text)}"]
        return [f"teacher/student chat template mismatch: teacher gives {_short(teacher_text)}, "
                f"student gives {_short(student_text)}"]
    teacher_ids, student_ids = _render(teacher_tokenizer, True), _render(student_tokenizer, True)
    if teacher_ids != student_ids and isinstance(teacher_ids, list) and isinstance(student_ids, list):
        return [f"teacher/student chat-template token ids mismatch: {_first_difference(teacher_ids, student_ids)}"]
    return []


def _short(value, width: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return repr(text if len(text) <= width else text[:width] + "…")


def _first_difference(teacher: Sequence, student: Sequence) -> str:
    """Where two sequences (texts, id lists) part, with a little context from each."""
    index = next((i for i, (a, b) in enumerate(zip(teacher, student)) if a != b), min(len(teacher), len(student)))
    start = max(0, index - 3)

    def window(items):
        part = items[start : index + 5]
        return repr(part) if isinstance(items, str) else repr(list(part))

    return (f"first difference at position {index} (lengths {len(teacher)} and {len(student)}): "
            f"teacher {window(teacher)}, student {window(student)}")
