"""Prompt files: JSON lines, one prompt per line, validated before any model is loaded."""

from __future__ import annotations

import json
import pathlib

__all__ = ["read_prompt_file", "read_prompt_records"]

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
    path = pathlib.Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"prompt file {path} is a folder; give a .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    records: list[tuple[int, Prompt]] = []
    # Split the bytes, not decoded text, so that an encoding error is reported at its own line.
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            byte = raw[error.start]
            raise ValueError(
                f"{where}: not valid UTF-8 (byte 0x{byte:02x} at column {error.start + 1}); "
                "prompt files must be UTF-8 encoded"
            ) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with 'prompt' or 'messages'")
        if isinstance(record.get("prompt"), str) and record["prompt"]:
            records.append((number, record["prompt"]))
        elif isinstance(record.get("messages"), list) and record["messages"] and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in record["messages"]
        ):
            records.append((number, record["messages"]))
        else:
            raise ValueError(
                f"{where}: needs a non-empty string 'prompt' or a non-empty 'messages' list of "
                "{'role': str, 'content': str} objects"
            )
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records
