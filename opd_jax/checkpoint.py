"""Training checkpoints with orbax (v1 API): async saves, keep the last k, verified restores.

Orbax commits a step atomically but does not checksum the bytes it wrote, so a file damaged later
(a truncated copy, a bad disk, a flipped bit) could load silently wrong. Every save therefore
records a checksum of the state (:func:`state_checksum`) in the step's custom metadata, and
:meth:`CheckpointStore.restore_latest` checks it after loading. A step that cannot be loaded, whose
checksum differs, or that has no checksum record (its ``_CHECKPOINT_METADATA`` lost: such a step is
refused, not trusted) is moved aside to ``quarantine/<step>-<reason>`` with a ``QUARANTINE.txt``
saying why, reported with a warning, and the previous step is tried. Moving it frees the step
number, so the resumed run can save that step again.

The checksum is computed on the devices, from the global arrays, so it is the same for any
sharding and any number of processes, and no process needs to hold more than its own shards: per
leaf, two 32-bit sums over every element's bit pattern, one weighted by an odd pseudo-random
function of the element's position, one of a bijective mix of bits and position. Any change of a
single element changes both sums (odd weights and bijections are invertible modulo 2³²); random
damage to many elements goes unnoticed with probability about 2⁻⁶⁴. The sums, the tree structure,
shapes and dtypes are then hashed with SHA-256.

Steps written by earlier versions carry a SHA-256 of the host bytes instead
(:func:`legacy_sha256`, single-process states only); they are verified with it.

In a multi-process run every process takes part in every save, load, checksum and decision (the
verdict on a step is agreed on by all), and process 0 alone moves folders.
"""

from __future__ import annotations

import hashlib
import pathlib
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from opd_jax import storage
from opd_jax.preemption import any_process

PyTree = Any

__all__ = ["CheckpointStore", "legacy_sha256", "state_checksum"]

_CHECKSUM_KEY = "opd_jax_checksum"
# Written by earlier versions (single-process states only): still verified, so their runs resume.
_LEGACY_SHA256_KEY = "opd_jax_sha256"
QUARANTINE = "quarantine"


def _mix(x):
    """A bijection of uint32 (the 'lowbias32' integer hash)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _as_uint32(leaf):
    """The bit pattern of every element as uint32 (64-bit elements as two trailing words)."""
    if leaf.dtype == jnp.bool_:
        return leaf.astype(jnp.uint32)
    width = jnp.dtype(leaf.dtype).itemsize
    if width >= 4:
        return jax.lax.bitcast_convert_type(leaf, jnp.uint32)
    return jax.lax.bitcast_convert_type(leaf, {1: jnp.uint8, 2: jnp.uint16}[width]).astype(jnp.uint32)


def _leaf_sums(leaf):
    bits = _as_uint32(leaf)
    position = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    linear = jnp.sum(bits * (_mix(position ^ jnp.uint32(0x9E3779B9)) | jnp.uint32(1)), dtype=jnp.uint32)
    mixed = jnp.sum(_mix(bits + _mix(position ^ jnp.uint32(0x85EBCA6B))), dtype=jnp.uint32)
    return jnp.stack([linear, mixed])


def state_checksum(state: PyTree) -> str:
    """A hex digest of ``state``'s structure, shapes, dtypes and every element's bits.

    Computed where the arrays live (see the module docstring), so it is equal for equal values
    under any sharding; in a multi-process run every process must call it.
    """
    leaves, treedef = jax.tree.flatten(state)
    mesh = next((leaf.sharding.mesh for leaf in leaves
                 if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding)), None)
    out_shardings = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sums = jax.jit(lambda xs: jnp.stack([_leaf_sums(x) for x in xs]), out_shardings=out_shardings)(leaves)
    digest = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        digest.update(f"{jnp.dtype(leaf.dtype)}{tuple(leaf.shape)};".encode())
    digest.update(np.asarray(sums.addressable_data(0), np.uint32).tobytes())
    return digest.hexdigest()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def legacy_sha256(state: PyTree) -> str:
    """The digest earlier versions recorded: SHA-256 of structure, dtypes, shapes and host bytes."""
    digest = hashlib.sha256(str(jax.tree.structure(state)).encode())
    for leaf in jax.tree.leaves(state):
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _matches(state: PyTree, expected: tuple[str, str]) -> bool:
    key, value = expected
    if key == _LEGACY_SHA256_KEY:
        return legacy_sha256(state) == value
    return state_checksum(state) == value


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
        # A gs:// folder is written straight to the bucket by tensorstore (every process its shards);
        # there a step is committed when its commit_success.txt is written, and orbax lists only those.
        self.directory = storage.as_path(directory)
        if not storage.is_remote(self.directory):
            self.directory = self.directory.resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.quarantined: list[pathlib.Path] = []
        training = ocp.v1.training
        self._checkpointer = training.Checkpointer(
            self.directory,
            preservation_policy=training.preservation_policies.LatestN(keep),
            save_decision_policy=training.save_decision_policies.FixedIntervalPolicy(1),
            # A save that a SIGKILL interrupted leaves `<step>.orbax-checkpoint-tmp`: removed here.
            cleanup_tmp_directories=True,
        )

    def steps(self) -> list[int]:
        """Committed steps on disk, oldest first."""
        return sorted(checkpoint.step for checkpoint in self._checkpointer.checkpoints)

    def path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def save(self, step: int, state: PyTree) -> None:
        """Start an asynchronous save of ``state`` as ``step``; returns once the arrays are copied."""
        self._checkpointer.save_async(step, state, custom_metadata={_CHECKSUM_KEY: state_checksum(state)})

    def wait(self) -> None:
        """Block until every started save is committed."""
        self._checkpointer.wait()

    def restore_latest(self, abstract_state: PyTree) -> tuple[int, PyTree] | None:
        """The newest step that loads and verifies, as ``(step, state)``; ``None`` if there is none.

        Every step tried and found bad on the way is quarantined (see the module docstring).

        Args:
          abstract_state: the state's structure with ``jax.ShapeDtypeStruct`` leaves (carrying the
            target shardings, if any).
        """
        self.wait()
        for step in reversed(self.steps()):
            state, reason, detail = None, None, None
            try:
                record = self._checkpointer.metadata(step).custom_metadata or {}
                # A legacy digest needs every byte on this process: multi-process states never had one.
                expected = next(((key, record[key]) for key in (_CHECKSUM_KEY, _LEGACY_SHA256_KEY) if key in record),
                                None)
            except Exception as error:  # noqa: BLE001 - a damaged step fails in many ways inside orbax
                expected = None
                reason, detail = "unreadable", f"its metadata cannot be read ({error!r})"
            if reason is None and expected is None:
                reason, detail = "no-checksum", ("it has no checksum record (_CHECKPOINT_METADATA missing or "
                                                 "rewritten), so it cannot be verified and is refused")
            if reason is None:
                try:
                    state = self._checkpointer.load(step, abstract_state)
                except Exception as error:  # noqa: BLE001
                    reason, detail = "unreadable", f"it cannot be loaded ({error!r})"
            # Every process must take the same branch from here (the checksum is a collective).
            if any_process(reason is not None):
                reason = reason or "unreadable"
                detail = detail or "another process could not load it"
            elif not _matches(state, expected):
                reason = "checksum-mismatch"
                detail = "its contents do not match the checksum recorded when it was saved"
            if reason is None:
                return step, state
            self._quarantine(step, reason, detail)
        return None

    def _quarantine(self, step: int, reason: str, detail: str) -> None:
        _barrier(f"opd_jax_quarantine_{step}_named")
        source = self.path(step)
        target = self.directory / QUARANTINE / f"{step}-{reason}"
        suffix = 1
        while target.exists():  # the same step may be quarantined by several re-runs
            suffix += 1
            target = self.directory / QUARANTINE / f"{step}-{reason}-{suffix}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.move_tree(source, target)
            (target / "QUARANTINE.txt").write_text(f"checkpoint step {step}: {detail}\n")
        _barrier(f"opd_jax_quarantine_{step}_moved")
        self._checkpointer.reload()
        self.quarantined.append(target)
        warnings.warn(f"checkpoint step {step} in {self.directory} is damaged: {detail}; moved to {target}; "
                      "falling back to the previous step", stacklevel=3)

    def close(self) -> None:
        """Wait for the started saves, then release orbax's resources (a second call does nothing)."""
        if self._checkpointer is None:
            return
        checkpointer, self._checkpointer = self._checkpointer, None
        checkpointer.wait()
        checkpointer.close()
