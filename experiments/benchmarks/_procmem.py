"""Peak resident memory of this process (Linux ``/proc/self``), the same way on the JAX and PyTorch sides.

Both benchmark sides import this (standard library only). The peak RSS (``VmHWM``) is reset with
``/proc/self/clear_refs`` (write ``5``, Linux >= 4.0) once the inputs are built, so that the peak
that follows counts only what the measured calls allocate on top of what was already resident
(interpreter, libraries, inputs). That delta is what a loss adds to a training step's memory: the
temporaries of its forward and backward pass and the gradient it returns.
"""

from __future__ import annotations

import pathlib

_STATUS = pathlib.Path("/proc/self/status")
_CLEAR_REFS = pathlib.Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Resident set size now (bytes), ``None`` where ``/proc`` is unavailable."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_bytes() -> int | None:
    """Peak resident set size since the process started or since :func:`reset_peak` (bytes)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS; ``False`` when the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
