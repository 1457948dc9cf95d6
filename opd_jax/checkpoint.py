"""Training checkpoints with orbax (v1 API): async saves, keep the last k, verified restores.

Orbax commits a step atomically but does not checksum the bytes it wrote, so a file damaged later
(a truncated copy, a bad disk) could load silently wrong. Every save therefore records a SHA-256 of
the state's leaves in the step's custom metadata, and :meth:`CheckpointStore.restore_latest`
checks it: a step that fails to load or to verify is reported with a warning and the previous
good step is used instead.

In a multi-process run no process can read arrays split over other processes' devices, so such
states are saved without a digest (and restored unverified); orbax still commits them atomically.
"""

from __future__ import annotations

import hashlib
import pathlib
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

__all__ = ["CheckpointStore", "state_digest"]

_DIGEST_KEY = "opd_jax_sha256"


def state_digest(state: PyTree) -> str:
    """SHA-256 over the tree's structure, leaf dtypes, shapes and bytes (host copies)."""
    digest = hashlib.sha256(str(jax.tree.structure(state)).encode())
    for leaf in jax.tree.leaves(state):
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _readable(state: PyTree) -> bool:
    """Whether this process holds every byte of ``state`` (always true in a single-process run)."""
    return all(getattr(leaf, "is_fully_addressable", True) for leaf in jax.tree.leaves(state))


class CheckpointStore:
    """Numbered checkpoints of a training-state pytree in ``directory``.

    Args:
      directory: where step folders are written (created).
      keep: how many of the latest steps to keep on disk.
    """

    def __init__(self, directory: str | pathlib.Path, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        # orbax rejects relative paths inside its background commit thread, i.e. only after
        # training has run up to the first save; resolving here makes `--output runs/x` work.
        self.directory = pathlib.Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        training = ocp.v1.training
        self._checkpointer = training.Checkpointer(
            self.directory,
            preservation_policy=training.preservation_policies.LatestN(keep),
            save_decision_policy=training.save_decision_policies.FixedIntervalPolicy(1),
        )

    def steps(self) -> list[int]:
        """Committed steps on disk, oldest first."""
        return sorted(checkpoint.step for checkpoint in self._checkpointer.checkpoints)

    def save(self, step: int, state: PyTree) -> None:
        """Start an asynchronous save of ``state`` as ``step``; returns once the arrays are copied."""
        metadata = {_DIGEST_KEY: state_digest(state)} if _readable(state) else {}
        self._checkpointer.save_async(step, state, custom_metadata=metadata)

    def wait(self) -> None:
        """Block until every started save is committed."""
        self._checkpointer.wait()

    def restore_latest(self, abstract_state: PyTree) -> tuple[int, PyTree] | None:
        """The newest step that loads and verifies, as ``(step, state)``; ``None`` if there is none.

        Args:
          abstract_state: the state's structure with ``jax.ShapeDtypeStruct`` leaves (carrying the
            target shardings, if any).
        """
        self.wait()
        for step in reversed(self.steps()):
            try:
                state = self._checkpointer.load(step, abstract_state)
                expected = (self._checkpointer.metadata(step).custom_metadata or {}).get(_DIGEST_KEY)
            except Exception as error:  # a damaged step can fail in many ways inside orbax / tensorstore
                warnings.warn(f"checkpoint step {step} in {self.directory} cannot be loaded ({error!r}); "
                              "falling back to the previous one", stacklevel=2)
                continue
            if expected is not None and _readable(state) and expected != state_digest(state):
                warnings.warn(f"checkpoint step {step} in {self.directory} is corrupted (checksum mismatch); "
                              "falling back to the previous one", stacklevel=2)
                continue
            return step, state
        return None

    def close(self) -> None:
        self.wait()
        self._checkpointer.close()
