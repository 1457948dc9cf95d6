"""Prompt files: JSON lines, one prompt per line, validated before any model is loaded."""

from __future__ import annotations

import json
import pathlib

__all__ = ["read_prompt_file"]


def read_prompt_file(path: str | pathlib.Path) -> list[str | list[dict[str, str]]]:
    """Read prompts from a ``.jsonl`` file.

    Each non-empty line is an object with either ``"prompt"`` (a string) or ``"messages"`` (a chat:
    a list of ``{"role": ..., "content": ...}``); other keys (e.g. ``"answer"``) are ignored.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: a malformed line; the message gives the file, the line number and what is wrong.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts: list[str | list[dict[str, str]]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with 'prompt' or 'messages'")
        if isinstance(record.get("prompt"), str) and record["prompt"]:
            prompts.append(record["prompt"])
        elif isinstance(record.get("messages"), list) and record["messages"] and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in record["messages"]
        ):
            prompts.append(record["messages"])
        else:
            raise ValueError(
                f"{where}: needs a non-empty string 'prompt' or a non-empty 'messages' list of "
                "{'role': str, 'content': str} objects"
            )
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
