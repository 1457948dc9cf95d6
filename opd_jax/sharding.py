"""Device meshes, partition rules and the sharded placement of model and batch.

The mesh has three named axes:

- ``data``: pure data parallelism (every device of a data row holds the same parameter shard);
- ``fsdp``: fully sharded data parallelism: the batch *and* the parameters (and so the AdamW
  moments) are split over it; XLA all-gathers a layer's weights just before they are used;
- ``tensor``: tensor parallelism over attention heads, the MLP width and the vocabulary.

The batch is split over ``data × fsdp``. Parameters are mapped to a :class:`PartitionSpec` by
regular-expression rules over their path in the NNX state (``layers/attention/q``), first match
wins; the same rules place the optimiser state, whose leaves end in the parameter paths. The rules
describe one layer's weight: the block parameters are stacked over layers (``[L, D, N, H]``), and
their leading layer axis is never split (the scan over layers reads one layer at a time). Every
divisibility requirement is checked here, before anything is compiled, so that a bad mesh fails
with a message naming the axis, its size, the parameter and the dimension instead of an XLA error.

Weight layouts of one layer (see :mod:`opd_jax.models.decoder`; block weights carry a leading,
unsplit layer axis ``L``), ``D`` width, ``N``/``K`` query/kv heads, ``H`` head size, ``F`` MLP
width, ``V`` vocabulary:

    embedding [V, D] -> (fsdp×tensor, -)   lm_head [D, V] -> (fsdp, tensor)
    q/k/v [D, N|K, H] -> (fsdp, tensor, -) o [N, H, D]    -> (tensor, -, fsdp)
    gate/up [D, F]   -> (fsdp, tensor)     down [F, D]    -> (tensor, fsdp)
    norms, output biases -> replicated     q/k/v / gate/up biases -> heads / width on tensor
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PyTree = Any

__all__ = [
    "AXES",
    "BATCH_AXES",
    "DEFAULT_RULES",
    "MeshConfig",
    "PartitionRules",
    "Placement",
    "batch_sharding",
    "check_batch",
    "check_divisible",
    "disjoint_meshes",
    "parse_mesh",
    "partition_specs",
    "path_name",
    "place",
    "shard_state",
    "state_shardings",
]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex searched in the '/'-joined path, spec); a tuple so that the default cannot be mutated.
PartitionRules = tuple[tuple[str, P], ...]

DEFAULT_RULES: PartitionRules = (
    # A vocabulary-parallel embedding: the gather becomes a masked gather plus a reduction. Splitting
    # D over fsdp instead made XLA re-shard the gathered [B, T, D] from rows-over-fsdp to
    # D-over-fsdp by full rematerialisation (its "involuntary full rematerialization" warning).
    (r"(^|/)embedding$", P(("fsdp", "tensor"), None)),
    (r"(^|/)lm_head$", P("fsdp", "tensor")),
    (r"attention/(q|k|v)$", P("fsdp", "tensor", None)),
    (r"attention/(q|k|v)_bias$", P("tensor", None)),
    (r"attention/o$", P("tensor", None, "fsdp")),
    (r"mlp/(gate|up)$", P("fsdp", "tensor")),
    (r"mlp/(gate|up)_bias$", P("tensor")),
    (r"mlp/down$", P("tensor", "fsdp")),
    # Vectors of width D are tiny; replicating them avoids a collective per use.
    (r"attention/o_bias$", P()),
    (r"mlp/down_bias$", P()),
    (r"norm/weight$", P()),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ``data``, ``fsdp`` and ``tensor`` mesh axes; their product is the device count.

    ``axis_types``: ``"auto"`` (the default) lets XLA's sharding propagation place intermediates
    from the shardings of parameters and batch; ``"explicit"`` makes shardings part of the types,
    which every einsum over a sharded contraction dimension would then have to resolve by hand; the
    model code does not, so ``"auto"`` is the working choice and ``"explicit"`` is for experiments.
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    axis_types: str = "auto"

    def __post_init__(self):
        for axis in AXES:
            size = getattr(self, axis)
            if not isinstance(size, (int, np.integer)) or size < 1:
                raise ValueError(f"mesh axis '{axis}' must be a positive integer; got {size!r}")
        if self.axis_types not in ("auto", "explicit"):
            raise ValueError(f"axis_types must be 'auto' or 'explicit'; got {self.axis_types!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def sizes(self) -> dict[str, int]:
        return dict(zip(AXES, self.shape))

    def make_mesh(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        """The mesh over ``devices`` (default: all devices of all processes).

        Raises:
          ValueError: the product of the axis sizes is not the device count.
        """
        count = len(devices) if devices is not None else jax.device_count()
        if self.size != count:
            raise ValueError(
                f"mesh data={self.data} × fsdp={self.fsdp} × tensor={self.tensor} = {self.size} devices, "
                f"but there are {count} devices; the product of the mesh axes must equal the device count"
            )
        kind = AxisType.Auto if self.axis_types == "auto" else AxisType.Explicit
        try:
            return jax.make_mesh(self.shape, AXES, axis_types=(kind,) * 3, devices=devices)
        except NotImplementedError:
            # An axis that is no product of whole physical axes (fsdp=32 on a v6e 8x8 slice) needs a
            # physical axis split between two mesh axes, which jax.make_mesh does not do.
            grid = mesh_utils.create_device_mesh(self.shape, devices, allow_split_physical_axes=True)
            return Mesh(grid, AXES, axis_types=(kind,) * 3)


def disjoint_meshes(student: MeshConfig, teacher: MeshConfig,
                    devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, Mesh]:
    """The student's mesh over the first ``student.size`` devices and the teacher's over the rest.

    Two device groups run their programs at the same time, so a teacher scoring on its own group
    does not wait for the student's update (the loop's ``teacher_mesh``).

    Raises:
      ValueError: the two sizes do not add up to the device count (the message names both meshes).
    """
    devices = list(jax.devices() if devices is None else devices)
    if student.size + teacher.size != len(devices):
        raise ValueError(
            f"mesh {student.data},{student.fsdp},{student.tensor} ({student.size} devices) + teacher mesh "
            f"{teacher.data},{teacher.fsdp},{teacher.tensor} ({teacher.size} devices) = {student.size + teacher.size}, "
            f"but there are {len(devices)} devices; with a teacher mesh the two must split the devices between them"
        )
    return student.make_mesh(devices[:student.size]), teacher.make_mesh(devices[student.size:])


def parse_mesh(text: str) -> MeshConfig:
    """``"2,2,2"`` (data,fsdp,tensor) or ``"data=2,fsdp=4"`` (missing axes are 1) -> :class:`MeshConfig`."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if parts and all("=" in p for p in parts):
            sizes = {}
            for part in parts:
                name, _, value = part.partition("=")
                if name.strip() not in AXES:
                    raise ValueError(f"unknown mesh axis {name.strip()!r}; axes are {', '.join(AXES)}")
                sizes[name.strip()] = int(value)
            return MeshConfig(**sizes)
        if len(parts) != 3:
            raise ValueError("expected three sizes data,fsdp,tensor")
        return MeshConfig(*(int(p) for p in parts))
    except ValueError as error:
        raise ValueError(f"mesh {text!r}: {error} (e.g. '2,2,2' or 'fsdp=8')") from None


def path_name(keypath) -> str:
    """``'layers/0/attention/q'`` from a pytree key path, dropping NNX's trailing ``value`` attribute."""
    names = []
    for key in keypath:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        names.append(str(name))
    if names and names[-1] in ("value", "raw_value"):
        names.pop()
    return "/".join(names)


def partition_specs(tree: PyTree, rules: PartitionRules = DEFAULT_RULES) -> PyTree:
    """A :class:`PartitionSpec` for every array leaf of ``tree`` (params, or optimiser state over them).

    Scalars (optimiser step counts) are replicated. Every other leaf must match a rule; a leaf
    under ``layers/`` (a stacked block parameter) gets its rule's spec after an unsplit layer axis.

    Raises:
      ValueError: a leaf matches no rule, or its rule's spec has more entries than it has dimensions.
    """

    def spec(keypath, leaf):
        name = path_name(keypath)
        if np.ndim(leaf) == 0:
            return P()
        stacked = re.search(r"(^|/)layers/", name) is not None
        for pattern, rule_spec in rules:
            if re.search(pattern, name):
                if len(rule_spec) + stacked > np.ndim(leaf):
                    raise ValueError(
                        f"partition rule {pattern!r} -> {rule_spec} has {len(rule_spec)} entries but parameter "
                        f"{name} has shape {list(np.shape(leaf))}" + (" (its first axis is the layer)" if stacked else "")
                    )
                return P(None, *rule_spec) if stacked else rule_spec
        raise ValueError(f"no partition rule matches parameter {name} (shape {list(np.shape(leaf))}); "
                         "add a (regex, PartitionSpec) rule for it")

    return jax.tree_util.tree_map_with_path(spec, tree)


def _axis_size(entry, sizes: dict[str, int]) -> tuple[str, int]:
    names = entry if isinstance(entry, tuple) else (entry,)
    return "×".join(names), math.prod(sizes[n] for n in names)


def check_divisible(tree: PyTree, specs: PyTree, mesh: MeshConfig | Mesh, *, what: str = "parameter") -> None:
    """Fail before compilation if a sharded dimension is not divisible by its mesh axis.

    Args:
      tree: arrays or ``jax.ShapeDtypeStruct`` leaves.
      specs: the matching tree of :class:`PartitionSpec` (from :func:`partition_specs`).
      mesh: a :class:`MeshConfig` or a mesh.
      what: the word for a leaf in the message ("student parameter", ...).

    Raises:
      ValueError: naming the axis, its size, the leaf's path, the dimension and its size.
    """
    sizes = mesh.sizes() if isinstance(mesh, MeshConfig) else dict(mesh.shape)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (keypath, leaf), spec in zip(leaves, spec_leaves, strict=True):
        shape = np.shape(leaf)
        for dim, entry in enumerate(spec):
            if entry is None:
                continue
            axis, size = _axis_size(entry, sizes)
            if shape[dim] % size:
                raise ValueError(
                    f"mesh axis '{axis}' of size {size} does not divide dimension {dim} (size {shape[dim]}) of "
                    f"{what} {path_name(keypath)} with shape {list(shape)}; choose an axis size that divides "
                    f"{shape[dim]} or change the partition rule"
                )


def check_batch(rows: int, mesh: MeshConfig | Mesh, *, what: str = "batch") -> None:
    """Fail if ``rows`` cannot be split over ``data × fsdp``; the message names both axes and sizes."""
    sizes = mesh.sizes() if isinstance(mesh, MeshConfig) else dict(mesh.shape)
    split = sizes["data"] * sizes["fsdp"]
    if rows % split:
        raise ValueError(
            f"the {what} of {rows} rows is split over mesh axes 'data' ({sizes['data']}) × 'fsdp' "
            f"({sizes['fsdp']}) = {split}, which does not divide it"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over ``data × fsdp``, every other dimension whole (``[B, ...]`` arrays)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def state_shardings(tree: PyTree, mesh: Mesh, rules: PartitionRules = DEFAULT_RULES, *, what: str = "parameter"):
    """The :class:`NamedSharding` tree of ``tree`` under ``rules``, after the divisibility check.

    ``tree`` may hold arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``), so a
    layout can be planned without allocating the model.
    """
    specs = partition_specs(tree, rules)
    check_divisible(tree, specs, mesh, what=what)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_state(state: PyTree, mesh: Mesh, rules: PartitionRules = DEFAULT_RULES, *, what: str = "parameter"):
    """Place an NNX state (or any tree of arrays) on ``mesh`` under ``rules``.

    Host arrays of the full shape are expected on every process (each process transfers only the
    shards its devices hold). The result never aliases the input buffers, so donating it in a
    jitted update cannot delete the arrays of the module it was split from.

    Returns:
      ``(sharded_state, shardings)``: the placed tree and its :class:`NamedSharding` tree.
    """
    shardings = state_shardings(state, mesh, rules, what=what)
    return place(state, shardings), shardings


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """``tree``'s arrays copied onto ``shardings`` (see :func:`shard_state`: never aliasing the input)."""
    return jax.tree.map(_fresh_copy, tree, shardings)


def _fresh_copy(x, sharding) -> jax.Array:
    # `device_put(..., may_alias=False)` still reuses the source buffer as the replica on its own
    # device, so a donated result would delete the caller's array; a host copy cannot alias.
    if getattr(x, "is_fully_addressable", True):
        return jax.device_put(np.asarray(x), sharding)
    return jax.device_put(x, sharding, may_alias=False)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Role -> mesh and partition rules: where the models of a run live.

    Attributes:
      mesh: the student's ``data × fsdp × tensor`` mesh (``None``: one device).
      teacher_mesh: the teacher's own mesh over the devices after ``mesh``'s (``None``: the student's).
      student_rules, teacher_rules: partition rules of the two models.
    """

    mesh: MeshConfig | None = None
    teacher_mesh: MeshConfig | None = None
    student_rules: PartitionRules = DEFAULT_RULES
    teacher_rules: PartitionRules = DEFAULT_RULES
