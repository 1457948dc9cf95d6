"""The rollout's inference layout: the student resharded into tensor-parallel groups × data replicas.

Training shards the student over ``fsdp`` (and perhaps ``tensor``): every device holds a slice of
every weight, and a decode step on that layout must gather each layer's weights over the
interconnect (or hold a gathered copy) to decode its few rows. Decoding wants the opposite: each
weight read from local memory by as few devices as possible. The inference layout is a mesh over
the same devices with ``data = R`` replicas of ``tensor = T`` devices each (``fsdp = 1``), as
MaxText's inference mesh and tunix's rollout resharding do:

- once per step, after the update, :func:`make_reshard`'s program copies the weights from the
  training layout into this one (the partition rules of :mod:`opd_jax.sharding` on a mesh without
  ``fsdp``: heads, MLP width and vocabulary over ``tensor``, replicated over ``data``);
- :func:`replica_sampler` decodes each replica's share of the rows in its own slots
  (:func:`opd_jax.sampling.generate_rows` under ``jax.shard_map`` over ``data``; ``tensor`` stays
  with XLA's partitioner), so refills and drain stages never move rows between devices.

A row draws the noise of its global row index, so the rollout equals the one on the training
layout (tests/test_rollout_layout.py). The mesh keeps the training mesh's device order, ``T``
consecutive devices to a group: the neighbours of the mesh's innermost axes.

``TrainConfig.rollout_mesh`` (``--rollout-mesh``) names the layout: ``auto`` (the one
:func:`opd_jax.rollout_estimate.choose_layout` finds fastest for the chip, what ``opd-jax plan``
plans), ``training`` (decode on the training layout, the static batch) or ``data=R,tensor=T``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from opd_jax import sharding as sharding_lib
from opd_jax.sampling import Rollout, SamplingConfig, checked_slots, generate_rows

__all__ = ["AUTO", "TRAINING", "RolloutLayout", "RolloutShardings", "check_layout", "check_rollout_mesh", "layouts",
           "make_reshard", "parse_rollout_mesh", "replica_sampler", "rollout_shardings"]

AUTO = "auto"
TRAINING = "training"


@dataclasses.dataclass(frozen=True)
class RolloutLayout:
    """``data`` replicas of ``tensor`` devices each; ``data × tensor`` is the student's device count."""

    data: int
    tensor: int

    @property
    def devices(self) -> int:
        return self.data * self.tensor

    def mesh_config(self) -> sharding_lib.MeshConfig:
        return sharding_lib.MeshConfig(data=self.data, fsdp=1, tensor=self.tensor)

    def __str__(self) -> str:
        return f"data={self.data},tensor={self.tensor}"


def parse_rollout_mesh(text: str) -> str | RolloutLayout:
    """``"auto"``, ``"training"``, ``"data=R,tensor=T"`` or ``"R,T"`` -> the word or a :class:`RolloutLayout`.

    Raises:
      ValueError: anything else, naming the forms allowed.
    """
    text = text.strip()
    if text in (AUTO, TRAINING):
        return text
    parts = [p.strip() for p in text.split(",")]
    try:
        if all("=" in p for p in parts):
            sizes = {name.strip(): int(value) for name, _, value in (p.partition("=") for p in parts)}
            if not set(sizes) <= {"data", "tensor"}:
                raise ValueError
            layout = RolloutLayout(sizes.get("data", 1), sizes.get("tensor", 1))
        else:
            data, tensor = (int(p) for p in parts)
            layout = RolloutLayout(data, tensor)
    except ValueError:
        layout = None
    if layout is None or layout.data < 1 or layout.tensor < 1:
        raise ValueError(f"rollout_mesh must be 'auto', 'training', 'data=R,tensor=T' or 'R,T' with R, T >= 1; "
                         f"got {text!r}")
    return layout


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(devices: int, model_config, rows: int) -> list[RolloutLayout]:
    """Every layout of ``devices`` whose ``tensor`` divides the model's query and key/value heads and
    whose ``data`` divides the ``rows``, fewest tensor devices first."""
    return [RolloutLayout(devices // t, t) for t in _divisors(devices)
            if model_config.num_heads % t == 0 and model_config.num_kv_heads % t == 0 and rows % (devices // t) == 0]


def check_layout(layout: RolloutLayout, devices: int, model_config, rows: int) -> None:
    """Refuse a layout that does not use the student's devices, split its heads or split the rows.

    Raises:
      ValueError: naming ``rollout_mesh``, what it must divide and the layouts that would.
    """
    fits = ", ".join(map(str, layouts(devices, model_config, rows))) or "none"
    problem = None
    if layout.devices != devices:
        problem = f"data × tensor = {layout.devices}, but the student has {devices} devices"
    elif model_config.num_heads % layout.tensor or model_config.num_kv_heads % layout.tensor:
        problem = (f"tensor {layout.tensor} does not divide the student's num_heads ({model_config.num_heads}) and "
                   f"num_kv_heads ({model_config.num_kv_heads})")
    elif rows % layout.data:
        problem = f"data {layout.data} does not divide the {rows} rows of a rollout"
    if problem:
        raise ValueError(f"rollout_mesh {layout}: {problem}; layouts that fit: {fits}")


def check_rollout_mesh(rollout_mesh: str, devices: int, model_config, rows: int) -> str | RolloutLayout:
    """:func:`parse_rollout_mesh`, and a named layout checked (:func:`check_layout`)."""
    choice = parse_rollout_mesh(rollout_mesh)
    if isinstance(choice, RolloutLayout):
        check_layout(choice, devices, model_config, rows)
    return choice


@dataclasses.dataclass(frozen=True)
class RolloutShardings:
    """Where the rollout's inputs live on the inference layout.

    Attributes:
      mesh: ``data × fsdp(1) × tensor`` over the training mesh's devices, in its order.
      params: the student's parameter shardings on ``mesh`` (the training rules without ``fsdp``).
      batch: rows over ``data``.
      replicated: the key.
    """

    mesh: Mesh
    params: Any
    batch: NamedSharding
    replicated: NamedSharding


def rollout_shardings(layout: RolloutLayout, training_mesh: Mesh, params,
                      rules: sharding_lib.PartitionRules = sharding_lib.DEFAULT_RULES) -> RolloutShardings:
    """The inference layout's shardings over ``training_mesh``'s devices (``params``: arrays or
    ``ShapeDtypeStruct``, only their shapes are read).

    Raises:
      ValueError: a parameter dimension ``tensor`` does not divide (the message names it).
    """
    grid = np.asarray(training_mesh.devices).reshape(layout.data, 1, layout.tensor)
    mesh = Mesh(grid, sharding_lib.AXES, axis_types=(AxisType.Auto,) * 3)
    return RolloutShardings(mesh, sharding_lib.state_shardings(params, mesh, rules, what="student parameter"),
                            sharding_lib.batch_sharding(mesh), NamedSharding(mesh, P()))


def make_reshard(training, inference: RolloutShardings) -> Callable:
    """The jitted copy of ``(params, prompt_tokens, prompt_mask, key)`` from the training layout
    (``training``: anything with ``params``, ``batch`` and ``replicated`` shardings, such as the
    step's :class:`~opd_jax.step.StepShardings`) into the inference layout; the training copy stays
    (the update goes on from it)."""
    return jax.jit(lambda *arrays: arrays, in_shardings=_arguments(training), out_shardings=_arguments(inference))


def _arguments(shardings) -> tuple:
    """The shardings of a sampler's ``(params, prompt_tokens, prompt_mask, key)``."""
    return shardings.params, shardings.batch, shardings.batch, shardings.replicated


def replica_sampler(graphdef, shardings: RolloutShardings, sampling: SamplingConfig
                    ) -> Callable[..., Rollout]:
    """``(params, prompt_tokens_BxP, prompt_mask_BxP, key) -> Rollout``: each data replica decodes
    its ``B / R`` rows in its own slots (``sampling.slots`` per replica, ``None``: chosen from its
    rows), every row with the noise of its global index. Inputs on ``shardings`` (params on
    ``shardings.params``, rows on ``shardings.batch``)."""
    replicas, tensor = shardings.mesh.shape["data"], shardings.mesh.shape["tensor"]

    def per_replica(params, prompt_tokens, prompt_mask, key):
        model = nnx.merge(graphdef, params)
        rows = prompt_tokens.shape[0]
        slots = checked_slots(model, prompt_tokens, prompt_mask, sampling)
        first_row = jax.lax.axis_index("data") * rows
        return generate_rows(model, prompt_tokens, prompt_mask, key, sampling, slots, first_row=first_row,
                             total_rows=rows * replicas, sync_axis="data" if tensor > 1 else None)

    mapped = jax.shard_map(per_replica, mesh=shardings.mesh, in_specs=(P(), P("data"), P("data"), P()),
                           out_specs=P("data"), axis_names=frozenset({"data"}), check_vma=False)
    return jax.jit(mapped, in_shardings=_arguments(shardings), out_shardings=shardings.batch)

