"""How busy the other processes kept the CPUs while a timed call ran (Linux ``/proc/stat``).

Both benchmark sides import this (it needs only the standard library). On a shared 2-core machine a
test run next door easily halves the measured speed, so each timed call reports the CPU time used by
*other* processes during it: machine-wide busy time minus this process's own CPU time, as a share of
all cores over the call's wall time. Resolution is one clock tick (usually 10 ms).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_seconds() -> float | None:
    """CPU-seconds all processes spent busy since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS_PER_SECOND


def timed_call(fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """Run ``fn()``; return its result, the wall seconds, and the share (0..1) of the machine's CPUs
    that other processes used meanwhile (``None`` where ``/proc/stat`` is unavailable)."""
    busy_before, own_before = _machine_busy_seconds(), time.process_time()
    start = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - start
    own, busy_after = time.process_time() - own_before, _machine_busy_seconds()
    if busy_before is None or busy_after is None:
        return result, wall, None
    cores = os.cpu_count() or 1  # /proc/stat counts every CPU of the machine
    foreign = max(0.0, (busy_after - busy_before) - own) / (wall * cores)
    return result, wall, min(foreign, 1.0)
