"""JSON-lines input files (prompts, datasets), validated before any model is loaded; errors name FILE:LINE.

Files are read in bounded pieces (:data:`READ_BYTES` at a time), never whole, and a line longer than
the caller's byte bound is refused as soon as the bound is passed, before it is decoded, parsed or
tokenized: one 200 MiB line costs a bounded read, not a parse and a tokenization of 200 MiB.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

from opd_jax import storage
from opd_jax.errors import InputError, InputFileNotFoundError

__all__ = ["BYTES_PER_TOKEN", "LINE_SLACK_BYTES", "prompt_line_bound", "prompt_of", "prompt_teachers",
           "read_json_lines", "read_prompt_file", "read_prompt_records"]

Prompt = str | list[dict[str, str]]

#: Bytes of a JSONL line allowed per prompt token slot. A prompt that fits ``max_prompt_length``
#: tokens has at most that many tokens of text, and one token of the vocabularies we load spans at
#: most a few dozen bytes of UTF-8 (the longest in Llama 3's / Qwen's byte-level BPE are runs of
#: ~100 spaces or '=' signs, rare); JSON may write each character as a 6-byte ``\\uXXXX`` escape
#: (12 for a surrogate pair). 256 bytes a token covers a prompt of such long tokens, escaped, so a
#: line that the tokenizer would accept is never refused by the byte bound, while a line over it
#: cannot fit and is refused without being read whole.
BYTES_PER_TOKEN = 256
#: Bytes beside the prompt text: the keys, a chat's roles and JSON punctuation, and keys the trainer
#: ignores (e.g. a reference ``"answer"``).
LINE_SLACK_BYTES = 1 << 20
#: How much of a file is read at a time.
READ_BYTES = 1 << 20


def prompt_line_bound(max_prompt_length: int) -> int:
    """The longest prompt-file line, in bytes, that could hold a prompt of ``max_prompt_length`` tokens
    (:data:`BYTES_PER_TOKEN` per token plus :data:`LINE_SLACK_BYTES`)."""
    return BYTES_PER_TOKEN * int(max_prompt_length) + LINE_SLACK_BYTES


def read_prompt_file(path: str | pathlib.Path, *, max_line_bytes: int | None = None) -> list[Prompt]:
    """Read prompts from a ``.jsonl`` file.

    Each non-empty line is an object with either ``"prompt"`` (a string) or ``"messages"`` (a chat:
    a list of ``{"role": ..., "content": ...}``); other keys (e.g. ``"answer"``) are ignored. The
    file must be UTF-8.

    Args:
      path: the ``.jsonl`` file.
      max_line_bytes: refuse a line longer than this many bytes (the newline not counted) before
        decoding it (``None``: no bound); see :func:`prompt_line_bound`.

    Raises:
      InputFileNotFoundError: the file does not exist.
      InputError: a malformed or too long line; the message gives the file, the line number and what
        is wrong.
    """
    return [prompt for _, prompt in read_prompt_records(path, max_line_bytes=max_line_bytes)]


def read_prompt_records(path: str | pathlib.Path, *, max_line_bytes: int | None = None,
                        limit_hint: str = "") -> list[tuple[int, Prompt]]:
    """Like :func:`read_prompt_file`, with the 1-based line number of each prompt.

    Args:
      limit_hint: appended to the message of a line over ``max_line_bytes`` (which option sets it).

    Returns:
      ``[(line_number, prompt), ...]`` in file order (blank lines skipped).
    """
    records = [(number, prompt_of(record, f"{path}:{number}"))
               for number, record in read_json_lines(path, kind="prompt file", max_line_bytes=max_line_bytes,
                                                     limit_hint=limit_hint)]
    if not records:
        raise InputError(f"{path}: no prompts (every line is blank); give one JSON object per line")
    return records


def prompt_teachers(path: str | pathlib.Path, teacher_names: tuple[str, ...], *,
                    max_line_bytes: int | None = None) -> list[int]:
    """The teacher of each prompt of the file (an index into ``teacher_names``), from its ``"teacher"`` key.

    With one teacher the key may be left out; with several every line needs one.

    Raises:
      InputError: ``FILE:LINE: ...`` for a missing key (several teachers), a non-string, or a name
        that is not in ``teacher_names`` (the message lists them).
    """
    given = ", ".join(teacher_names)
    routes = []
    for number, record in read_json_lines(path, kind="prompt file", max_line_bytes=max_line_bytes):
        where = f"{path}:{number}"
        name = record.get("teacher")
        if name is None and len(teacher_names) == 1:
            routes.append(0)
            continue
        if name is None:
            raise InputError(f"{where}: no 'teacher' key; with several teachers each prompt names one of: {given}")
        if not isinstance(name, str) or name not in teacher_names:
            raise InputError(f"{where}: teacher {name!r} names no --teacher; given: {given}")
        routes.append(teacher_names.index(name))
    return routes


def read_json_lines(path: str | pathlib.Path, *, kind: str, max_line_bytes: int | None = None,
                    limit_hint: str = "") -> list[tuple[int, dict]]:
    """``(line_number, object)`` of every non-blank line of a UTF-8 JSONL file, in file order.

    Args:
      path: the ``.jsonl`` file.
      kind: what the file is, for messages ("prompt file", "dataset").
      max_line_bytes: refuse a longer line (newline not counted) as soon as the bound is passed,
        before decoding or parsing it (``None``: no bound).
      limit_hint: appended to that refusal (e.g. which option sets the bound).

    Raises:
      InputFileNotFoundError: the file does not exist or is a folder.
      InputError: ``FILE:LINE: ...`` for a line that is too long, not UTF-8, not JSON, or not a JSON
        object.
    """
    path = storage.as_path(path)  # a local file or a gs:// object, streamed
    if path.is_dir():
        raise InputFileNotFoundError(f"{kind} {path} is a folder; give a .jsonl file")
    if not path.is_file():
        raise InputFileNotFoundError(f"{kind} {path} does not exist")
    records: list[tuple[int, dict]] = []
    # Split the bytes, not decoded text, so that an encoding error is reported at its own line.
    for number, raw in _lines(path, kind, max_line_bytes, limit_hint):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"{where}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                             f"{kind}s must be UTF-8 encoded") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{where}: not valid JSON ({error.msg} at column {error.colno}); each line of a "
                             f"{kind} is one JSON object") from None
        except RecursionError:
            raise InputError(f"{where}: JSON nested too deeply to read; each line of a {kind} is one flat "
                             "JSON object") from None
        except ValueError as error:  # e.g. an integer of more digits than Python converts
            raise InputError(f"{where}: cannot read this JSON ({error}); each line of a {kind} is one JSON "
                             "object") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def _lines(path: pathlib.Path, kind: str, max_line_bytes: int | None, limit_hint: str) -> Iterator[tuple[int, bytes]]:
    """``(line_number, bytes)`` of each line (without its newline), reading :data:`READ_BYTES` at a
    time and holding at most ``max_line_bytes`` (plus one read) of a line in memory."""
    number, pieces, held = 1, [], 0
    with path.open("rb") as file:
        while piece := file.read(READ_BYTES):
            start = 0
            while (end := piece.find(b"\n", start)) >= 0:
                _check_length(path, kind, number, held + end - start, max_line_bytes, limit_hint)
                yield number, b"".join([*pieces, piece[start:end]])
                number, pieces, held, start = number + 1, [], 0, end + 1
            if start < len(piece):
                held += len(piece) - start
                _check_length(path, kind, number, held, max_line_bytes, limit_hint, more=True)
                pieces.append(piece[start:])
    if pieces:
        yield number, b"".join(pieces)


def _check_length(path, kind, number, length, bound, hint, *, more=False) -> None:
    if bound is not None and length > bound:
        size = f"more than {bound} bytes" if more else f"{length} bytes"
        raise InputError(f"{path}:{number}: line of {size}; a {kind} line may have at most {bound} bytes{hint} "
                         "(refused before reading it whole)")


def prompt_of(record: dict, where: str, *, hint: str = "") -> Prompt:
    """The record's non-empty ``"prompt"`` string or ``"messages"`` chat; else an ``InputError`` at
    ``where`` (``FILE:LINE``), followed by ``hint``."""
    if isinstance(record.get("prompt"), str) and record["prompt"]:
        return _text(record["prompt"], where, "'prompt'")
    messages = record.get("messages")
    if isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        for k, message in enumerate(messages):
            _text(message["role"], where, f"messages[{k}].role")
            _text(message["content"], where, f"messages[{k}].content")
        return messages
    raise InputError(f"{where}: needs a non-empty string 'prompt' or a non-empty 'messages' list of "
                     f"{{'role': str, 'content': str}} objects{hint}")


def _text(text: str, where: str, what: str) -> str:
    """``text``, if it is Unicode text (JSON's ``\\ud800`` escapes can give a lone surrogate, which
    no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(f"{where}: {what} holds a lone surrogate {text[error.start]!r} at character "
                         f"{error.start + 1} (a \\uD800-\\uDFFF escape without its pair); prompts must be "
                         "Unicode text") from None
    return text
