"""The one exception type for bad input: what ``opd-jax train`` reports as exit code 2.

Every check that runs before a run writes anything (options, config files, prompt files, model and
run folders) raises :class:`InputError`, naming the file, field or line and what is allowed. It is a
``ValueError``, so code that caught ``ValueError`` before keeps working; a missing file or folder is
an :class:`InputFileNotFoundError`, which is also a ``FileNotFoundError``.
"""

from __future__ import annotations

__all__ = ["InputError", "InputFileNotFoundError", "RunFolderError"]


class InputError(ValueError):
    """Bad input, found before anything was written: the message names where and what is allowed."""


class InputFileNotFoundError(InputError, FileNotFoundError):
    """A file or folder named in the input does not exist (the message names it)."""


class RunFolderError(InputError):
    """The run folder cannot be used: other inputs, in use by another process, not ours, or not
    writable (:mod:`opd_jax.run_folder`; the bucket lock of :mod:`opd_jax.storage` raises it too)."""
