"""Stop requests for the training loop: SIGTERM / SIGINT, agreed on by every process.

Preemptible TPU VMs and cluster schedulers (SLURM, Kubernetes) stop a job with SIGTERM and kill it
a grace period later; Cloud TPU maintenance events arrive the same way (as the preemption notice
that JAX's multihost preemption sync point listens for). Ctrl-C sends SIGINT. While
:class:`StopSignals` is active, the first of these signals only records a request; the loop
finishes the step it is in, commits a checkpoint of the state reached and raises
:class:`Preempted`, and ``opd-jax train`` exits with :data:`EXIT_RESUMABLE`. A second signal
exits at once, with the signal's default action.

In a multi-process run every process must stop after the same step (checkpoints are written by all
processes together). :meth:`StopSignals.agreed` is called by every process after every step: it
all-gathers the processes' requests (any one of them stops all), and also asks JAX's preemption
sync point (:func:`jax.experimental.multihost_utils.reached_preemption_sync_point`), which covers a
notice that reached JAX's own handler before this one was installed. Both give the same answer on
every process, so the processes agree on the step without any other exchange.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np

__all__ = ["EXIT_RESUMABLE", "Preempted", "StopSignals", "any_process"]

# EX_TEMPFAIL of sysexits.h: "temporary failure; the user is invited to retry".
EXIT_RESUMABLE = 75

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on request; the state of ``step`` is committed and re-running resumes it.

    Attributes:
      step: the step reached (and checkpointed).
      steps: the run's total number of steps.
      signal_name: ``"SIGTERM"``, ``"SIGINT"`` or ``"preemption notice"`` (another process, or
        JAX's preemption sync point).
      checkpoint: the committed checkpoint folder.
    """

    def __init__(self, step: int, steps: int, signal_name: str, checkpoint: str):
        self.step, self.steps, self.signal_name, self.checkpoint = step, steps, signal_name, checkpoint
        super().__init__(f"stopped by {signal_name} after step {step} of {steps}; checkpoint {checkpoint} is "
                         "committed; run the same command again to resume")


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (every process must call this at the same point)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


class StopSignals:
    """While active (a context manager), SIGTERM and SIGINT request a stop instead of killing.

    The handlers are installed only from the main thread (Python delivers signals there alone);
    elsewhere the object is inert and :meth:`agreed` still consults the other processes. On exit
    the previous handlers come back.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            # None: a handler installed outside Python (JAX's preemption notifier); it cannot be
            # put back, and the default action is what it would have delayed.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            os.write(2, f"\nopd-jax: second signal ({name}): stopping at once\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        # os.write, not print: a handler may interrupt a print of the main thread.
        os.write(2, f"\nopd-jax: {name} received: finishing this step, then checkpointing and exiting "
                    f"(status {EXIT_RESUMABLE}, resumable); send it again to stop at once\n".encode())

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "preemption notice"

    def agreed(self, step: int) -> bool:
        """Whether to stop after ``step``: the same answer on every process (each must call it)."""
        stop = any_process(self.received is not None)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                stop = multihost_utils.reached_preemption_sync_point(step) or stop
            except RuntimeError:  # the preemption service is disabled: the all-gather decides alone
                pass
        return stop
