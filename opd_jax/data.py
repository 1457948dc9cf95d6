"""JSON-lines input files (prompts, datasets), validated before any model is loaded; errors name FILE:LINE."""

from __future__ import annotations

import json
import pathlib

__all__ = ["prompt_of", "prompt_teachers", "read_json_lines", "read_prompt_file", "read_prompt_records"]

Prompt = str | list[dict[str, str]]


def read_prompt_file(path: str | pathlib.Path) -> list[Prompt]:
    """Read prompts from a ``.jsonl`` file.

    Each non-empty line is an object with either ``"prompt"`` (a string) or ``"messages"`` (a chat:
    a list of ``{"role": ..., "content": ...}``); other keys (e.g. ``"answer"``) are ignored. The
    file must be UTF-8.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: a malformed line; the message gives the file, the line number and what is wrong.
    """
    return [prompt for _, prompt in read_prompt_records(path)]


def read_prompt_records(path: str | pathlib.Path) -> list[tuple[int, Prompt]]:
    """Like :func:`read_prompt_file`, with the 1-based line number of each prompt.

    Returns:
      ``[(line_number, prompt), ...]`` in file order (blank lines skipped).
    """
    records = [(number, prompt_of(record, f"{path}:{number}"))
               for number, record in read_json_lines(path, kind="prompt file")]
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def prompt_teachers(path: str | pathlib.Path, teacher_names: tuple[str, ...]) -> list[int]:
    """The teacher of each prompt of the file (an index into ``teacher_names``), from its ``"teacher"`` key.

    With one teacher the key may be left out; with several every line needs one.

    Raises:
      ValueError: ``FILE:LINE: ...`` for a missing key (several teachers), a non-string, or a name
        that is not in ``teacher_names`` (the message lists them).
    """
    given = ", ".join(teacher_names)
    routes = []
    for number, record in read_json_lines(path, kind="prompt file"):
        where = f"{path}:{number}"
        name = record.get("teacher")
        if name is None and len(teacher_names) == 1:
            routes.append(0)
            continue
        if name is None:
            raise ValueError(f"{where}: no 'teacher' key; with several teachers each prompt names one of: {given}")
        if not isinstance(name, str) or name not in teacher_names:
            raise ValueError(f"{where}: teacher {name!r} names no --teacher; given: {given}")
        routes.append(teacher_names.index(name))
    return routes


def read_json_lines(path: str | pathlib.Path, *, kind: str) -> list[tuple[int, dict]]:
    """``(line_number, object)`` of every non-blank line of a UTF-8 JSONL file, in file order.

    Args:
      path: the ``.jsonl`` file.
      kind: what the file is, for messages ("prompt file", "dataset").

    Raises:
      FileNotFoundError: the file does not exist or is a folder.
      ValueError: ``FILE:LINE: ...`` for a line that is not UTF-8, not JSON, or not a JSON object.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{kind} {path} is a folder; give a .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {path} does not exist")
    records: list[tuple[int, dict]] = []
    # Split the bytes, not decoded text, so that an encoding error is reported at its own line.
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{where}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                             f"{kind}s must be UTF-8 encoded") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def prompt_of(record: dict, where: str, *, hint: str = "") -> Prompt:
    """The record's non-empty ``"prompt"`` string or ``"messages"`` chat; else a ``ValueError`` at ``where``
    (``FILE:LINE``), followed by ``hint``."""
    if isinstance(record.get("prompt"), str) and record["prompt"]:
        return record["prompt"]
    messages = record.get("messages")
    if isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        return messages
    raise ValueError(f"{where}: needs a non-empty string 'prompt' or a non-empty 'messages' list of "
                     f"{{'role': str, 'content': str}} objects{hint}")
