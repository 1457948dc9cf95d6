"""Ahead-of-time plan of one OPD step for a device topology: compile the step's programs, run nothing.

A step of :func:`opd_jax.train.train` runs three compiled programs:

- ``rollout``: the sampler (:meth:`opd_jax.backends.JaxBackend.sharded` over
  :func:`opd_jax.sampling.generate`): prefill of ``prompt_length`` slots, then KV-cache decoding of
  ``sequence_length - prompt_length`` tokens for ``prompts_per_step × group_size`` rows;
- ``score``: :func:`opd_jax.step.make_train_step`'s ``prepare``: student and teacher log-probs of
  the sampled tokens and the advantages, over ``[rows, sequence_length]``;
- ``update``: its ``update`` on one minibatch of ``rows / minibatches`` rows (run
  ``minibatches × epochs`` times per step).

:func:`compile_programs` builds the models abstractly (``nnx.eval_shape``: no weights), gives every
input a ``jax.ShapeDtypeStruct`` with its ``NamedSharding`` on a mesh over the topology's devices
(compile-only TPU devices from libtpu on any host), and lowers and compiles each program with
``jax.jit(...).trace(...).lower().compile()`` under ``jax.set_mesh``. :func:`plan` turns the
compiled programs into a report.

**Memory.** Per device, from ``compiled.memory_analysis()``: ``argument_bytes``, ``output_bytes``,
``alias_bytes`` (outputs written into donated arguments), ``temp_bytes``; ``peak_bytes`` is the
larger of the compiler's ``peak_memory_in_bytes`` (``compiler_peak_bytes``) and argument + output +
temp − alias: the TPU compiler's temporary allocation can exceed the peak it reports (seen: a
rollout with 21.2 GiB of temporaries and a 13.4 GiB peak), so the plan takes the safe figure. While a program runs, the step also holds
buffers it does not take as arguments (the optimizer state during the rollout, the teacher and the
whole rollout batch during an update, ...): their per-device bytes are ``resident_bytes``, and
``total_bytes = peak_bytes + resident_bytes``. ``fits`` is every program's ``total_bytes`` ≤
``device_memory_bytes``, the smaller of the chip's documented HBM and what the compiler lets one
program use (see :mod:`opd_jax.topologies`; the runtime keeps the difference for itself). A program
the compiler itself refuses (``CompileTimeHbmOom``) does not fit; its ``peak_bytes`` is the
requirement from the compiler's message and its other figures are ``None``.

**FLOPs and bytes accessed.** ``xla_flops`` / ``xla_bytes_accessed`` are ``cost_analysis()``'s, per
device, for reference only: XLA counts the body of every loop once (checked: a 10-trip ``while``
reports one trip's FLOPs), and the layers are a ``lax.scan``, the decode loop a few
``lax.while_loop``, the logit chunks a ``lax.map``, and the TPU compiler turns large sharded
matmuls into loops of its own (Qwen3-8B scoring on v5p-64: 18 ``while`` loops in the compiled
program against 2 layer scans in the jaxpr, and 1/8 of its matmul FLOPs reported). So both figures
come from the program's jaxpr instead (:class:`_Counter`), every loop multiplied by its own trip
count: a scan by its length, a ``while`` by what its ``counter < bound`` condition allows from
where its counter starts (followed through the program, so each of the sampler's decode segments,
:func:`opd_jax.sampling.cache_segments`, counts its own steps, every row decoding to the end: the
worst case):

- ``flops``: every ``dot_general``'s ``2 · M · N · K``, split evenly over the devices. Pallas
  kernels (splash attention) are opaque to XLA and to the jaxpr; their FLOPs come from the attention
  shapes (QKᵀ and PV over half the score matrix under the causal mask, the backward kernels 3.5×
  that; see :func:`_attention_kernel_flops`). Checked on a 2-layer model with XLA attention: the
  jaxpr's count with each loop body once is within 4% of XLA's FLOPs × devices; and the rollout's
  count against a formula of the model's dimensions (tests/test_plan.py).
- ``bytes_accessed``: HBM traffic per device under a simple model: every matmul and kernel reads
  its operands and writes its result once; a weight (anything computed from the parameters alone:
  casts, layer slices; not a lookup by token ids) is read whole by every device of a ``tensor``
  shard, as if FSDP gathered it; activations and the KV cache are split over all devices.
  Elementwise traffic (mostly fused into the matmuls) is left out.
- ``collective_bytes``: what each device sends plus receives in the compiled program's
  all-gathers, reduce-scatters, all-reduces, all-to-alls and collective-permutes under ring
  algorithms, loops multiplied out (:mod:`opd_jax.plan_collectives`); ``collectives`` by kind,
  ``collectives_matched`` whether every loop of the compiled program got a trip count.

**Phases and step time.** A program with top-level ``while`` loops (the rollout) is split into
phases: ``prefill`` (everything outside them: the prompt's forward pass, the decode weights'
preparation) and one phase per decode segment, ``decode steps a-b`` (its ``repeats`` = steps, its
``cache_slots``, and figures per step). Each phase is a roofline of its own: ``max(flops /
peak_flops, bytes_accessed / hbm_bandwidth, collective_bytes / ici_bandwidth)`` with the chip's
peak bf16 FLOP/s, HBM bandwidth and bidirectional interconnect bandwidth (``collective_seconds``;
``roofline_seconds_without_collectives`` leaves the last term out). A program's
``roofline_seconds`` is the sum over its phases of repeats × roofline; ``decode_weight_gathers``
says whether the compiled decode loop gathers loop-invariant data (weights) at every step, and each
segment's ``weight_gather_bytes`` how much. ``estimated_step_seconds = rollout + score +
minibatches × epochs × update``. It assumes compute, memory and communication overlap perfectly and
ignores elementwise work and kernel efficiency, so it is a lower bound.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import plan_collectives
from opd_jax import rollout_estimate
from opd_jax import rollout_layout as rollout_layout_lib
from opd_jax import sampling as sampling_lib
from opd_jax import sharding as sharding_lib
from opd_jax import step as step_lib
from opd_jax import topologies as topologies_lib
from opd_jax.backends import JaxBackend
from opd_jax import train as train_lib
from opd_jax.alignment import AlignedTeacher
from opd_jax.models import AttentionConfig, Decoder, DecoderConfig, Execution, resolve_dtype
from opd_jax.retokenize import ByteBatch, bucket
from opd_jax.sharding import Placement
from opd_jax.sampling import Rollout, SamplingConfig

__all__ = ["PROGRAMS", "CompiledPlan", "PlanCompileError", "PlanConfig", "check_config", "check_mesh",
           "compile_programs", "default_mesh", "format_report", "plan", "report"]

PROGRAMS = ("rollout", "score", "update")
GIB = 2**30
_TENSOR_CHOICES = (1, 2, 4, 8)


class PlanCompileError(RuntimeError):
    """The compiler rejected a program for a reason other than memory; the message names it."""


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """One step to plan: the step :func:`opd_jax.train.train` runs for ``train`` on ``topology``.

    Attributes:
      student, teacher: architectures (see :func:`opd_jax.models.presets.resolve_model`).
      train: the run's :class:`~opd_jax.config.TrainConfig`, objective included (rows per step =
        ``prompts_per_step × group_size``, ``max_new_tokens`` response slots, ``minibatches ×
        epochs`` updates; ``logit_chunk_size = "auto"`` is resolved for the topology).
      topology: a name accepted by :func:`opd_jax.topologies.parse_topology`.
      prompt_length: prompt slots ``P``; the sequence has ``L = P + max_new_tokens`` slots.
      execution: how the models run (:class:`~opd_jax.models.Execution`; ``auto`` dtypes resolve
        for the topology's platform: bfloat16 on TPU).
      placement: the meshes and partition rules (:class:`~opd_jax.sharding.Placement`): ``mesh``
        ``None`` is chosen by :func:`default_mesh`; a ``teacher_mesh`` (which needs ``mesh``) puts
        the teacher on the devices after ``mesh``'s, as ``train(teacher_mesh=)``, and its scoring
        is then the program ``teacher``.
      student_name, teacher_name: labels for the report.
      teacher_token_ratio: with ``tokenizer_alignment = "text"``, the teacher's tokens per student
        token: its prompt takes ``ceil(ratio · P)`` slots and its response the bucket that holds
        ``ceil(ratio · max_new_tokens)`` (:func:`opd_jax.retokenize.bucket`), as train pads them.
      teacher_piece_bytes: with ``alignment_credit = "characters"``, the longest teacher piece in
        bytes that a batch holds: the byte slots per token (rounded up to a power of two).
      response_lengths: the response-length distribution the rollout is estimated under (and
        ``rollout_mesh = "auto"`` chooses its layout for); the default, every response to
        ``max_new_tokens``, is the compiled programs' own worst case.
    """

    student: DecoderConfig
    teacher: DecoderConfig
    train: train_lib.TrainConfig = dataclasses.field(default_factory=train_lib.TrainConfig)
    topology: str = "local"
    prompt_length: int = 512
    execution: Execution = Execution()
    placement: Placement = Placement()
    student_name: str = "student"
    teacher_name: str = "teacher"
    teacher_token_ratio: float = 1.0
    teacher_piece_bytes: int = 16
    response_lengths: rollout_estimate.ResponseLengths = rollout_estimate.ResponseLengths()

    @property
    def rows(self) -> int:
        return self.train.prompts_per_step * self.train.group_size

    @property
    def new_tokens(self) -> int:
        return self.train.max_new_tokens

    @property
    def sequence_length(self) -> int:
        return self.prompt_length + self.train.max_new_tokens

    @property
    def retokenized(self) -> bool:
        """The teacher scores its own tokens of the text (``tokenizer_alignment = "text"``)."""
        return self.train.tokenizer_alignment == "text"

    @property
    def teacher_sequence_length(self) -> int:
        """The teacher's slots: the student's, or its own prompt and response bucket when re-tokenized."""
        if not self.retokenized:
            return self.sequence_length
        ratio = self.teacher_token_ratio
        return math.ceil(ratio * self.prompt_length) + bucket(math.ceil(ratio * self.new_tokens))

    @property
    def teacher_byte_slots(self) -> int | None:
        """Byte slots per teacher token (``alignment_credit = "characters"``), else ``None``."""
        if not self.retokenized or self.train.alignment_credit != "characters":
            return None
        return bucket(self.teacher_piece_bytes, 1)


def check_config(config: PlanConfig) -> None:
    """Everything that needs no devices, so that a bad plan fails before anything is built.

    (The :class:`~opd_jax.config.TrainConfig` and :class:`~opd_jax.models.Execution` checked
    themselves when they were made.)

    Raises:
      ValueError: naming the field, its value and what is allowed.
    """
    if not isinstance(config.prompt_length, (int, np.integer)) or config.prompt_length < 1:
        raise ValueError(f"prompt_length must be an integer >= 1; got {config.prompt_length!r}")
    if not config.teacher_token_ratio > 0 or not math.isfinite(config.teacher_token_ratio):
        raise ValueError(f"teacher_token_ratio must be a number > 0; got {config.teacher_token_ratio!r}")
    if not isinstance(config.teacher_piece_bytes, (int, np.integer)) or config.teacher_piece_bytes < 1:
        raise ValueError(f"teacher_piece_bytes must be an integer >= 1; got {config.teacher_piece_bytes!r}")
    for role, model in (("student", config.student), ("teacher", config.teacher)):
        if config.sequence_length > model.max_position_embeddings:
            raise ValueError(
                f"sequence_length {config.sequence_length} (prompt_length {config.prompt_length} + max_new_tokens "
                f"{config.new_tokens}) exceeds the {role}'s ({getattr(config, role + '_name')}) "
                f"max_position_embeddings {model.max_position_embeddings}"
            )
    if config.teacher_sequence_length > config.teacher.max_position_embeddings:
        raise ValueError(
            f"the teacher's re-tokenized sequence, {config.teacher_sequence_length} of its tokens (teacher_token_ratio "
            f"{config.teacher_token_ratio} of prompt {config.prompt_length} + the bucket of max_new_tokens "
            f"{config.new_tokens}), exceeds its ({config.teacher_name}) max_position_embeddings "
            f"{config.teacher.max_position_embeddings}")
    if config.student.vocab_size != config.teacher.vocab_size and not config.retokenized:
        raise ValueError(f"teacher vocab_size {config.teacher.vocab_size} != student vocab_size "
                         f"{config.student.vocab_size}: distillation needs one vocabulary, or tokenizer_alignment "
                         "'text' (the teacher scores its own tokens of the text)")
    placement = config.placement
    if placement.teacher_mesh is not None:
        train_lib.check_teacher_mesh(config.train, placement.mesh, placement.teacher_mesh)


def check_mesh(config: PlanConfig, mesh: sharding_lib.MeshConfig, num_devices: int) -> None:
    """Refuse a mesh that does not fit the devices, the heads of either model or the batch.

    (Parameter dimensions are checked against the mesh when the shardings are built.)
    """
    teacher_mesh = config.placement.teacher_mesh
    meshes = {"student": mesh, "teacher": mesh if teacher_mesh is None else teacher_mesh}
    used = mesh.size + (0 if teacher_mesh is None else teacher_mesh.size)
    if used != num_devices:
        teacher = "" if teacher_mesh is None else f" + teacher mesh of {teacher_mesh.size}"
        raise ValueError(
            f"mesh data={mesh.data} × fsdp={mesh.fsdp} × tensor={mesh.tensor} = {mesh.size} devices{teacher}, but "
            f"topology {config.topology} has {num_devices}; the meshes must use every device"
        )
    for role, model in (("student", config.student), ("teacher", config.teacher)):
        tensor = meshes[role].tensor
        if model.num_heads % tensor or model.num_kv_heads % tensor:
            raise ValueError(
                f"mesh axis 'tensor' ({tensor}) must divide the {role}'s ({getattr(config, role + '_name')}) "
                f"num_heads ({model.num_heads}) and num_kv_heads ({model.num_kv_heads}): attention heads are "
                "split over it"
            )
    sharding_lib.check_batch(config.rows, mesh, what="rollout batch (prompts_per_step × group_size)")
    sharding_lib.check_batch(config.rows // config.train.minibatches, mesh,
                             what="update minibatch (prompts_per_step × group_size / minibatches)")


def default_mesh(config: PlanConfig, num_devices: int, student_params=None, teacher_params=None
                 ) -> sharding_lib.MeshConfig:
    """The mesh used when none is given: FSDP over every device, tensor parallelism only if needed.

    Candidates in order: ``tensor`` = 1, 2, 4, 8, and for each ``data`` = 1, 2, 4, ... with
    ``fsdp`` the rest of the devices. The first one that passes :func:`check_mesh` (the update
    minibatch must have at least one row per ``data × fsdp`` shard, the heads must split over
    ``tensor``) and whose parameter shardings divide every sharded dimension wins. So a minibatch
    with fewer rows than devices moves a factor to ``tensor``, and a vocabulary that the device
    count does not divide moves one to ``data``.

    Raises:
      ValueError: no candidate fits; the message gives the reason of the plain FSDP mesh.
    """
    first_error = None
    for tensor in _TENSOR_CHOICES:
        if num_devices % tensor:
            continue
        rest = num_devices // tensor
        for data in (d for d in range(1, rest + 1) if rest % d == 0):
            candidate = sharding_lib.MeshConfig(data=data, fsdp=rest // data, tensor=tensor)
            try:
                check_mesh(config, candidate, num_devices)
                placement = config.placement
                for tree, what, rules in ((student_params, "student parameter", placement.student_rules),
                                          (teacher_params, "teacher parameter", placement.teacher_rules)):
                    if tree is not None:
                        specs = sharding_lib.partition_specs(tree, rules)
                        sharding_lib.check_divisible(tree, specs, candidate, what=what)
                return candidate
            except ValueError as error:
                first_error = first_error or error
    raise ValueError(f"no data × fsdp × tensor mesh over {num_devices} devices fits this plan; with "
                     f"fsdp={num_devices}: {first_error}; give --mesh")


def _abstract_model(config: DecoderConfig, param_dtype, compute_dtype, attention: AttentionConfig,
                    remat: str):
    """``(graphdef, abstract params)`` of a :class:`Decoder`: shapes and dtypes only, no weights."""
    model = nnx.eval_shape(lambda: Decoder(
        config, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(param_dtype), compute_dtype=jnp.dtype(compute_dtype),
        attention=attention, remat=remat,
    ))
    return nnx.split(model)


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _device_bytes(tree) -> int:
    """Bytes of the largest shard of each leaf (``ShapeDtypeStruct`` with a sharding), summed."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass
class _Program:
    jitted: Callable
    args: tuple
    executions: int
    resident: tuple[str, ...]  # buffers of the step alive during the program but not among its arguments
    weight_args: tuple[int, ...]  # which arguments are parameter trees (for the traffic model)

    def weight_flags(self) -> list[bool]:
        """Per flattened argument leaf: whether it is a model parameter."""
        return [i in self.weight_args for i, arg in enumerate(self.args) for _ in jax.tree.leaves(arg)]


@dataclasses.dataclass
class CompiledPlan:
    """The compiled programs of a step and what was needed to build them.

    Attributes:
      config: the :class:`PlanConfig` (with the mesh filled in).
      topology: the :class:`~opd_jax.topologies.Topology`.
      mesh: the ``jax.sharding.Mesh``.
      attention: the resolved attention implementation.
      compiled: program name -> ``jax.stages.Compiled`` (missing where the compiler ran out of memory).
      traced: program name -> ``jax.stages.Traced`` (its ``.jaxpr`` is what FLOPs are counted on).
      weights: program name -> per input of the jaxpr, whether it is a model parameter.
      compile_seconds: program name -> trace + lower + compile seconds.
      oom: program name -> the compiler's out-of-memory message.
      resident_bytes: program name -> per-device bytes of step buffers alive but not arguments.
      executions: program name -> runs per step.
      parameters: ``{"student": n, "teacher": n}`` parameter counts.
      meshes: program name -> the mesh it runs on (the teacher's own, for ``teacher``).
      arguments: program name -> the abstract, sharded arguments it was compiled for.
      step_programs: every program of the step (compiled or not).
    """

    config: PlanConfig
    topology: topologies_lib.Topology
    mesh: jax.sharding.Mesh
    attention: str
    compiled: dict[str, Any]
    traced: dict[str, Any]
    weights: dict[str, list[bool]]
    compile_seconds: dict[str, float]
    oom: dict[str, str]
    resident_bytes: dict[str, int]
    executions: dict[str, int]
    parameters: dict[str, int]
    meshes: dict[str, jax.sharding.Mesh] = dataclasses.field(default_factory=dict)
    arguments: dict[str, tuple] = dataclasses.field(default_factory=dict)
    step_programs: tuple[str, ...] = PROGRAMS
    rollout: dict[str, Any] = dataclasses.field(default_factory=dict)


def _rollout_layout(config: PlanConfig, topology, devices, compute_dtype) -> tuple[Any, dict[str, Any]]:
    """The inference layout ``train.rollout_mesh`` resolves to on the student's devices (``None``:
    the training layout) and the rollout's estimates under ``config.response_lengths``: the JSON's
    ``rollout`` block (every candidate layout's roofline, the chosen one's slots and KV cache)."""
    train = config.train
    student_devices = config.placement.mesh.size
    estimate = dict(rows=config.rows, prompt_length=config.prompt_length, max_new_tokens=config.new_tokens,
                    lengths=config.response_lengths, stop_ids=tuple(config.student.eos_token_id),
                    compute_dtype=compute_dtype, slots=train.rollout_slots, group=train.group_size)
    candidates = rollout_estimate.layout_estimates(config.student, student_devices, topology.chip, **estimate)
    try:
        layout = rollout_estimate.resolve_layout(train.rollout_mesh, student_devices, config.student, topology.chip,
                                                 topology.memory_bytes(devices), candidates=candidates, **estimate)
    except ValueError as error:
        raise ValueError(f"rollout_mesh: {error}") from None
    chosen = next((c for c in candidates if c.layout == layout), None)
    block = {"rollout_mesh": train.rollout_mesh, "layout": "training" if layout is None else str(layout),
             "response_lengths": config.response_lengths.describe(),
             "slots": None if chosen is None else chosen.slots,
             "kv_cache_bytes": None if chosen is None else chosen.kv_cache_bytes,
             "estimate": None if chosen is None else chosen.to_json(),
             "layouts": [c.to_json() for c in candidates]}
    return layout, block


def _build_programs(config: PlanConfig, devices, student, teacher, layout=None
                    ) -> tuple[dict[str, _Program], dict[str, Any]]:
    """The jitted programs of a step with their abstract, sharded arguments, and the buffers a step
    keeps alive between programs (by name): the step and shardings of :func:`opd_jax.train.train`."""
    (graphdef, params), (teacher_graphdef, teacher_params) = student, teacher
    train_config = config.train
    optimizer = step_lib.make_optimizer(train_config)
    placement = config.placement
    shardings = step_lib.make_step_shardings(train_config, placement.mesh, params, teacher_params, optimizer,
                                             placement.student_rules, placement.teacher_rules,
                                             placement.teacher_mesh, devices=devices)
    params = _with_shardings(params, shardings.params)
    opt_state = _with_shardings(jax.eval_shape(optimizer.init, params), shardings.opt_state)
    teacher_params = _with_shardings(teacher_params, shardings.teacher_params)
    own_mesh = shardings.teacher_batch is not None

    def rows(n, length, dtype, sharding=shardings.batch):
        return jax.ShapeDtypeStruct((n, length) if length else (n,), jnp.dtype(dtype), sharding=sharding)

    B, L, M = config.rows, config.sequence_length, config.rows // train_config.minibatches
    sequence_level = train_config.level == "sequence"
    full_vocab = train_config.full_vocab_weight > 0
    def scored(n):  # a ScoredBatch of n rows
        hidden = (jax.ShapeDtypeStruct((n, L, config.teacher.hidden_size), jnp.dtype(config.execution.compute_dtype),
                                       sharding=shardings.batch) if full_vocab else None)
        return step_lib.ScoredBatch(rows(n, L, "int32"), rows(n, L, "bool"), rows(n, L, "bool"), rows(n, L, "float32"),
                                    rows(n, None if sequence_level else L, "float32"), hidden)

    rollout_batch = Rollout(rows(B, L, "int32"), rows(B, L, "bool"), rows(B, L, "bool"), rows(B, L, "float32"))
    buffers = {  # what a step keeps alive between its programs
        "params": params, "opt_state": opt_state, "teacher_params": teacher_params, "rollout": rollout_batch,
        "scores": scored(B),
    }
    # The static batch (every row decodes to the end, in one slot each): the worst case, and the
    # program whose decode loops the counter can read.
    sampling_config = SamplingConfig(max_new_tokens=config.new_tokens, temperature=train_config.temperature,
                                     stop_ids=tuple(config.student.eos_token_id), slots=B)
    sampler = JaxBackend.sharded(graphdef, shardings, sampling_config)

    def rollout(params, prompt_tokens, prompt_mask, key):
        return sampler.rollout_fn(nnx.merge(graphdef, params), prompt_tokens, prompt_mask, key, sampling_config)

    replicated = shardings.replicated
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
    step = step_lib.make_train_step(train_config, graphdef, teacher_graphdef, optimizer, shardings,
                                    donate_state=not train_config.pipeline_rollouts)
    # Beside each program the step holds what it does not take as arguments; a teacher on its own
    # devices is resident on none of the student's programs.
    teacher_beside = () if own_mesh else ("teacher_params",)
    programs = {
        "rollout": _Program(
            jax.jit(rollout),
            (params, rows(B, config.prompt_length, "int32"), rows(B, config.prompt_length, "bool"), key),
            1, ("opt_state", *teacher_beside), (0,),
        ),
        "score": _Program(step.prepare, (params, teacher_params, rollout_batch, None, None), 1, ("opt_state",),
                          (0, 1)),
        # The update reads the teacher only for a full-vocabulary term; otherwise jit drops the
        # argument, and the teacher counts as resident beside the program.
        "update": _Program(
            step.update,
            (params, opt_state, None if own_mesh else teacher_params, scored(M),
             jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)),
            train_config.minibatches * train_config.epochs,
            ("scores",) if full_vocab or own_mesh else ("scores", "teacher_params"), (0, 2),
        ),
    }
    if layout is not None:
        programs.update(_layout_programs(config, graphdef, params, shardings, layout, sampling_config, key,
                                         teacher_beside))
        programs["rollout"] = dataclasses.replace(programs["rollout"], executions=0)  # compared, not run
    if own_mesh or config.retokenized:
        teacher_program, scores = _teacher_program(config, step, teacher_params, shardings, rows)
        # On the student's devices (re-tokenized, no teacher mesh) the student's state stays beside it.
        programs["teacher"] = dataclasses.replace(
            teacher_program, resident=() if own_mesh else ("params", "opt_state", "rollout"))
        programs["score"] = _Program(step.prepare_scored, (params, scores, rollout_batch, None, None),
                                     1, ("opt_state",), (0,))
    order = ("rollout", "reshard", "rollout_layout", "teacher", "score", "update")  # as a step runs them
    return {name: programs[name] for name in order if name in programs}, buffers


def _layout_programs(config: PlanConfig, graphdef, params, shardings, layout, sampling_config: SamplingConfig, key,
                     teacher_beside) -> dict[str, _Program]:
    """``reshard`` (the student and the prompts from the training layout onto ``layout``) and
    ``rollout_layout`` (every data replica decoding its rows in its slots, with ``sampling_config``'s
    settings and the run's own slots and groups), as the loop runs them."""
    train = config.train
    target = rollout_layout_lib.rollout_shardings(layout, jax.tree.leaves(shardings.params)[0].mesh, params,
                                                  config.placement.student_rules)
    prompts = functools.partial(jax.ShapeDtypeStruct, (config.rows, config.prompt_length))
    sampling_config = dataclasses.replace(sampling_config, slots=train.rollout_slots, group_size=train.group_size)
    return {
        "reshard": _Program(rollout_layout_lib.make_reshard(shardings, target),
                            (params, prompts(jnp.int32, sharding=shardings.batch),
                             prompts(jnp.bool_, sharding=shardings.batch), key), 1, ("opt_state", *teacher_beside),
                            (0,)),
        # The training copy of the weights stays beside the rollout (the update goes on from it).
        "rollout_layout": _Program(rollout_layout_lib.replica_sampler(graphdef, target, sampling_config),
                                   (_with_shardings(params, target.params), prompts(jnp.int32, sharding=target.batch),
                                    prompts(jnp.bool_, sharding=target.batch),
                                    jax.ShapeDtypeStruct((), key.dtype, sharding=target.replicated)),
                                   1, ("params", "opt_state", *teacher_beside), (0,)),
    }


def _retokenized_lines(retokenized: dict | None) -> list[str]:
    """The report's line on the teacher's own slots (none unless it re-tokenizes)."""
    if retokenized is None:
        return []
    slots = retokenized["byte_slots_per_token"]
    return [f"teacher re-tokenizes the text: {retokenized['teacher_sequence_length']} slots of its own tokens "
            f"({retokenized['teacher_token_ratio']:.3g} per student token)"
            + ("" if slots is None else f", {slots} byte slots per token (pieces up to "
                                        f"{retokenized['teacher_piece_bytes']} bytes)")]


def _teacher_program(config: PlanConfig, step, teacher_params, shardings, rows) -> tuple[_Program, Any]:
    """The teacher's own scoring program (on its mesh, or on its own tokens when re-tokenized) and the
    abstract scores it hands to ``prepare_scored``: ``[B, L]`` log-probs, or an
    :class:`~opd_jax.alignment.AlignedTeacher` on the teacher's ``N`` slots (``N · D`` byte slots)."""
    B, L, N = config.rows, config.sequence_length, config.teacher_sequence_length
    sharding = shardings.teacher_batch or shardings.batch
    teacher_rows = functools.partial(rows, sharding=sharding)
    tokens = (teacher_params, teacher_rows(B, N, "int32"), teacher_rows(B, N, "bool"), None)
    if not config.retokenized:
        return _Program(step.score_teacher, tokens, 1, (), (0,)), rows(B, L, "float32")
    depth = config.teacher_byte_slots
    if depth is None:
        program = _Program(step.score_teacher, tokens, 1, (), (0,))
        slots = N
    else:
        cube = lambda dtype: jax.ShapeDtypeStruct((B, N, depth), jnp.dtype(dtype), sharding=sharding)  # noqa: E731
        byte_batch = ByteBatch(cube("int32"), cube("int32"), cube("bool"), cube("int32"), teacher_rows(B, N, "int32"),
                               teacher_rows(B, N, "int32"))
        rank = (jax.ShapeDtypeStruct((config.teacher.vocab_size,), jnp.int32, sharding=shardings.replicated),)
        program = _Program(step.score_teacher_bytes, (*tokens, byte_batch, rank), 1, (), (0,))
        slots = N * depth
    scores = AlignedTeacher(rows(B, slots, "float32"), rows(B, slots, "bool"), rows(B, slots, "int32"),
                            rows(B, L, "int32"))
    return program, scores


_OOM = re.compile(r"required for [^(]*\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")


def _parse_oom(message: str) -> tuple[int, int] | None:
    """``(required, available)`` bytes from libtpu's ``CompileTimeHbmOom`` message ("G" = 2**30 bytes)."""
    match = _OOM.search(message)
    if match is None:
        return None
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return (int(float(match.group(1)) * scale[match.group(2)]), int(float(match.group(3)) * scale[match.group(4)]))


def compile_programs(config: PlanConfig, *, programs: Sequence[str] | None = None,
                     progress: Callable[[str], None] | None = None) -> CompiledPlan:
    """Build the step's programs for ``config.topology`` and compile them (nothing runs).

    Args:
      config: the :class:`PlanConfig`.
      programs: which of ``rollout``, ``score``, ``update`` (and ``teacher`` with a teacher mesh) to
        compile; ``None``: all.
      progress: called with a line before and after each compile (e.g. ``print`` to stderr).

    Returns:
      A :class:`CompiledPlan`; ``compiled[name].as_text()`` is the optimised HLO.

    Raises:
      ValueError: a bad topology, model, mesh, sequence length, dtype or attention choice (before
        anything is compiled), or libtpu missing for a TPU topology.
      PlanCompileError: the compiler failed on a program for a reason other than memory.
    """
    check_config(config)
    topology = topologies_lib.parse_topology(config.topology)
    devices = topology.devices()
    platform = devices[0].platform
    execution = dataclasses.replace(config.execution, **{
        name: resolve_dtype(getattr(config.execution, name), platform) for name in ("compute_dtype", "teacher_dtype")})
    attention = AttentionConfig(execution.attention, platform=platform)
    resolved = attention.resolved()  # an attention kernel the platform lacks fails here
    student = _abstract_model(config.student, execution.param_dtype, execution.compute_dtype, attention,
                              execution.remat)
    teacher = _abstract_model(config.teacher, execution.teacher_dtype, execution.compute_dtype, attention, "none")
    placement = config.placement
    if placement.mesh is None:
        placement = dataclasses.replace(placement, mesh=default_mesh(config, len(devices), student[1], teacher[1]))
    config = dataclasses.replace(config, execution=execution, placement=placement)
    check_mesh(config, placement.mesh, len(devices))
    config = dataclasses.replace(config, train=train_lib.resolve_logit_chunks(
        config.train, config.student.vocab_size, config.prompt_length, placement,
        device_memory_bytes=topology.memory_bytes(devices), say=progress))
    layout, rollout_block = _rollout_layout(config, topology, devices, execution.compute_dtype)
    # Splash's Pallas kernel does not lower with 64-bit indices; every input here has an explicit dtype.
    with jax.enable_x64(False):
        built, buffers = _build_programs(config, devices, student, teacher, layout)
        names = list(built) if programs is None else list(programs)
        unknown = [p for p in names if p not in built]
        if unknown:
            raise ValueError(f"unknown program(s) {unknown}; this step's programs are {', '.join(built)}")
        mesh = jax.tree.leaves(buffers["params"])[0].sharding.mesh
        result = CompiledPlan(
            config, topology, mesh, resolved, {}, {}, {}, {}, {}, {}, {},
            {"student": _count(student[1]), "teacher": _count(teacher[1])}, step_programs=tuple(built),
            rollout=rollout_block,
        )
        for index, name in enumerate(names, 1):
            program = built[name]
            result.executions[name] = program.executions
            result.resident_bytes[name] = sum(_device_bytes(buffers[b]) for b in program.resident)
            if progress:
                progress(f"compiling {name} ({index}/{len(names)})...")
            began = time.perf_counter()
            _compile(program, name, result)
            result.compile_seconds[name] = time.perf_counter() - began
            if progress:
                state = "out of memory" if name in result.oom else "done"
                progress(f"  {name}: {state} in {result.compile_seconds[name]:.1f} s")
    return result


def _compile(program: _Program, name: str, result: CompiledPlan) -> None:
    """Trace, lower and compile ``program`` on its own mesh into ``result`` (an OOM is recorded, not raised)."""
    result.arguments[name] = program.args
    mesh = result.meshes[name] = jax.tree.leaves(program.args[0])[0].sharding.mesh
    with jax.set_mesh(mesh):
        try:
            traced = program.jitted.trace(*program.args)
        except ValueError as error:  # a shape the model or a kernel refuses, e.g. splash's divisibility
            raise ValueError(f"building program {name!r}: {error}") from error
        result.traced[name] = traced
        flags = program.weight_flags()
        result.weights[name] = flags if len(flags) == len(traced.jaxpr.jaxpr.invars) else []
        try:
            result.compiled[name] = traced.lower().compile()
        except Exception as error:  # XLA raises JaxRuntimeError; an OOM is a finding, not a failure
            message = str(error)
            if "RESOURCE_EXHAUSTED" in message and _parse_oom(message) is not None:
                result.oom[name] = message.splitlines()[0]
            else:
                raise PlanCompileError(f"compiling program {name!r} failed: {message}") from error


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------------
# Counting work on the jaxpr (XLA counts each loop body once)


@dataclasses.dataclass
class _Work:
    """Work of a jaxpr: matmul FLOPs and Pallas kernel FLOPs (over all devices; XLA's cost analysis
    does not see inside a kernel), and HBM bytes per device."""

    flops: float = 0.0
    bytes: float = 0.0
    kernel_flops: float = 0.0

    def __add__(self, other: _Work) -> _Work:
        return _Work(self.flops + other.flops, self.bytes + other.bytes, self.kernel_flops + other.kernel_flops)

    def __sub__(self, other: _Work) -> _Work:
        return self + other * -1

    def __mul__(self, k: float) -> _Work:
        return _Work(self.flops * k, self.bytes * k, self.kernel_flops * k)


def _aval_bytes(var) -> int:
    aval = getattr(var, "aval", None)
    if aval is None or not hasattr(aval, "shape") or not hasattr(aval, "dtype"):
        return 0
    try:
        return math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize
    except TypeError:  # key types
        return 0


def _is_float_array(var) -> bool:
    aval = getattr(var, "aval", None)
    try:
        return bool(aval.shape) and jnp.issubdtype(aval.dtype, jnp.floating)
    except (AttributeError, TypeError):
        return False


def _attention_kernel_flops(eqn) -> float:
    """FLOPs of a splash attention kernel from its operand shapes (0 for any other Pallas kernel).

    Operands ``q [..., T, H]`` then ``k [..., S, H]`` (after the scalar-prefetch arrays): the forward
    computes QKᵀ and PV, ``2 · 2 · T · S · H`` per head, halved because the causal mask lets the
    kernel skip the blocks above the diagonal. The ``dq`` kernel computes three products of that
    size (QKᵀ again, dO·Vᵀ, dS·K): 1.5× the forward; the ``dkv`` kernel four (QKᵀ, dO·Vᵀ, Pᵀ·dO,
    dSᵀ·Q): 2×.
    """
    name = str(eqn.params.get("name") or "")
    if not name.startswith("splash"):
        return 0.0
    # After the scalar-prefetch block tables come q [..., T, H] and k [..., S, H] (the leading dims
    # are the heads, and the batch where it is not 1, vmapped in).
    first = eqn.params["grid_mapping"].num_index_operands
    q, k = (eqn.invars[first + i].aval.shape for i in (0, 1))
    forward = 2.0 * 2.0 * math.prod(q[:-2]) * q[-2] * k[-2] * q[-1] / 2
    return forward * (2.0 if "_dkv" in name else 1.5 if "_dq" in name else 1.0)


def _member(var, variables: set) -> bool:
    try:
        return var in variables
    except TypeError:  # a literal constant
        return False


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        inner = getattr(value, "jaxpr", value)
        if hasattr(inner, "eqns"):
            yield inner


@dataclasses.dataclass(frozen=True)
class _Loop:
    """A ``while`` loop of a program's top level (not inside another loop), with its trip count.

    Attributes:
      trips: how many times the body runs (every row decoding to the end: the worst case).
      first: the value of the loop's counter on entry (the first decode step of a sampler segment),
        ``None`` where not known.
      body: the work of one trip.
      derived: whether ``trips`` was read from the jaxpr (``False``: the counter's fallback).
    """

    trips: int
    first: int | None
    body: _Work
    derived: bool


def _int_value(var, known: dict) -> int | None:
    """The value of an integer scalar: a literal, or one :class:`_Counter` has followed."""
    if isinstance(var, jax_core.Literal):
        value = np.asarray(var.val)
        return int(value) if value.shape == () and np.issubdtype(value.dtype, np.integer) else None
    return _member_get(known, var)


def _member_get(mapping: dict, var):
    try:
        return mapping.get(var)
    except TypeError:  # an unhashable literal
        return None


def _while_trips(eqn, known: dict) -> tuple[int, int, int, int] | None:
    """``(trips, first, bound, carry index)`` of a ``while`` whose condition includes ``counter <
    bound`` (alone or under ``and``, as the sampler's ``step < last & ~all(done)``), whose body adds
    1 to the counter, and whose counter's start and bound are known; else ``None``.

    The trip count is ``bound − first``: the most the loop can run (its other conditions, such as
    every row having stopped, only end it sooner).
    """
    cond, body = eqn.params["cond_jaxpr"].jaxpr, eqn.params["body_jaxpr"].jaxpr
    cond_consts, body_consts = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    inner_known = {v: k for v, x in zip(cond.invars[:cond_consts], eqn.invars[:cond_consts])
                   if (k := _int_value(x, known)) is not None}
    carry = list(cond.invars[cond_consts:])
    defined = {out: e for e in cond.eqns for out in e.outvars}
    comparisons = []

    def visit(var):
        e = _member_get(defined, var)
        if e is None:
            return
        if e.primitive.name in ("and", "convert_element_type"):
            for operand in e.invars:
                visit(operand)
        elif e.primitive.name in ("lt", "gt"):
            counter, bound = e.invars if e.primitive.name == "lt" else e.invars[::-1]
            if counter in carry and (value := _int_value(bound, inner_known)) is not None:
                comparisons.append((carry.index(counter), value))

    visit(cond.outvars[0])
    body_defined = {out: e for e in body.eqns for out in e.outvars}
    for index, bound in comparisons:
        step = _member_get(body_defined, body.outvars[index])
        counter_in = body.invars[body_consts + index]
        increments = (step is not None and step.primitive.name == "add" and counter_in in step.invars
                      and any(_int_value(v, {}) == 1 for v in step.invars))
        first = _int_value(eqn.invars[cond_consts + body_consts + index], known)
        if increments and first is not None:
            return max(bound - first, 0), first, bound, index
    return None


@dataclasses.dataclass(frozen=True)
class _Counter:
    """Counts the work of a jaxpr, with its loops multiplied out or (``multiply=False``) each loop body
    counted once, as XLA's cost analysis does.

    A ``scan`` runs ``length`` times. A ``while`` runs as often as its counter can count: the
    condition's ``counter < bound`` with the counter's start and the bound followed through the
    program as integer constants (:func:`_while_trips`); so each of the sampler's decode segments
    counts its own steps, and the next segment starts where the last one ended. A ``while`` whose
    trip count cannot be read so counts ``decode_trips`` (the response length: no decode loop runs
    longer) and is marked as such.

    HBM bytes per device follow a simple traffic model: every matmul reads its operands and writes
    its result once; an operand computed from the parameters alone (a weight, cast or sliced) is
    read whole by every device of a ``tensor`` shard (FSDP gathers it), any other (activations,
    the KV cache) is split over all devices; inside ``shard_map`` shapes are already one device's.
    Pallas kernels read and write their operands once. Elementwise traffic (mostly fused) is left
    out; collectives are counted on the compiled program (:mod:`opd_jax.plan_collectives`).
    """

    multiply: bool
    decode_trips: int
    tensor: int
    devices: int

    def walk(self, jaxpr, weights: Sequence[bool] = (), local: bool = False,
             loops: list[_Loop] | None = None) -> tuple[_Work, list[bool]]:
        """``(work, which outputs are weights)``; ``weights[i]``: whether input ``i`` is a weight.

        ``loops``, if given, receives the top-level ``while`` loops in program order.
        """
        work, flags, _ = self._walk(jaxpr, weights, local, {}, loops)
        return work, flags

    def _walk(self, jaxpr, weights, local, known_in: dict, loops) -> tuple[_Work, list[bool], dict]:
        is_weight = {v for v, w in zip(jaxpr.invars, weights) if w}
        known = dict(known_in)
        work = _Work()

        def share(var) -> float:
            size = _aval_bytes(var)
            if local:
                return size
            return size / self.tensor if _member(var, is_weight) else size / self.devices

        for eqn in jaxpr.eqns:
            flags = [_member(v, is_weight) for v in eqn.invars]
            eqn_work, out_flags = self._equation(eqn, flags, local, known, loops, share)
            work += eqn_work
            is_weight.update(v for v, f in zip(eqn.outvars, out_flags) if f)
        # A body can return a literal (a constant), which is never a weight and is not hashable.
        return (work, [not isinstance(v, jax_core.Literal) and v in is_weight for v in jaxpr.outvars],
                {i: k for i, v in enumerate(jaxpr.outvars) if (k := _int_value(v, known)) is not None})

    def _equation(self, eqn, flags, local, known, loops, share) -> tuple[_Work, list[bool]]:
        """The work of one equation and which of its outputs are weights (``known`` is updated)."""
        name = eqn.primitive.name
        out_flags = [False] * len(eqn.outvars)
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
            flops = 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
            return _Work(flops, sum(share(v) for v in (*eqn.invars, *eqn.outvars))), out_flags
        if name == "pallas_call":
            estimate = eqn.params.get("cost_estimate")
            kernel_flops = float(estimate.flops) if estimate is not None and estimate.flops else 0.0
            return _Work(0.0, sum(share(v) for v in (*eqn.invars, *eqn.outvars)),
                         kernel_flops or _attention_kernel_flops(eqn)), out_flags
        if name == "scan":
            # Inputs map one to one to the body's (consts, carry, xs): stacked layer weights are xs.
            body, _ = self.walk(eqn.params["jaxpr"].jaxpr, flags, local)
            return body * (eqn.params["length"] if self.multiply else 1), out_flags
        if name == "while":
            return self._while(eqn, flags, local, known, loops), out_flags
        if name == "cond":
            branches = [self.walk(b.jaxpr, flags[1:], local)[0] for b in eqn.params["branches"]]
            return max(branches, key=lambda w: w.flops), out_flags
        if subs := list(_sub_jaxprs(eqn)):
            return self._call(eqn, subs, flags, local, known, loops)
        if name in ("convert_element_type", "copy", "broadcast_in_dim") and eqn.invars:
            if (value := _int_value(eqn.invars[0], known)) is not None and eqn.outvars[0].aval.shape == ():
                known[eqn.outvars[0]] = value
        # Elementwise / structural: a weight stays a weight through casts, slices, transposes; not
        # through a gather by data (an embedding lookup of the tokens is an activation).
        floats = [f for v, f in zip(eqn.invars, flags) if _is_float_array(v)]
        by_data = any(getattr(getattr(v, "aval", None), "shape", ()) and not _is_float_array(v) for v in eqn.invars)
        return _Work(), [bool(floats) and all(floats) and not by_data] * len(eqn.outvars)

    def _while(self, eqn, flags, local, known, loops) -> _Work:
        skip, consts = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        inner = [f and i < consts for i, f in enumerate(flags[skip:])]
        body, _ = self.walk(eqn.params["body_jaxpr"].jaxpr, inner, local)
        found = _while_trips(eqn, known)
        if found is None:
            loop = _Loop(self.decode_trips, None, body, derived=False)
        else:
            trips, first, bound, index = found
            known[eqn.outvars[index]] = max(first, bound)  # where the next loop's counter starts
            loop = _Loop(trips, first, body, derived=True)
        if loops is not None:
            loops.append(loop)
        return body * (loop.trips if self.multiply else 1)

    def _call(self, eqn, subs, flags, local, known, loops) -> tuple[_Work, list[bool]]:
        """A call (jit, custom derivative rules, shard_map, ...): the work of its jaxprs, with the
        weights and integer constants of its inputs followed in and those of its outputs out."""
        scale, counter = 1, self
        if eqn.primitive.name == "shard_map":
            mesh = eqn.params["mesh"]
            axes = eqn.params.get("manual_axes") or eqn.params.get("newly_manual_axes") or tuple(mesh.shape)
            scale = math.prod(mesh.shape[a] for a in axes)
            if scale == mesh.size:  # the body is one device's: FLOPs of all devices, bytes of one
                local, loops = True, None
            else:  # one replica's, whole over the other axes (the rollout's tensor groups): a program of its own
                counter = dataclasses.replace(self, devices=self.devices // scale)
        work, out_flags = _Work(), [False] * len(eqn.outvars)
        for index, sub in enumerate(subs):
            mapped = len(sub.invars) == len(eqn.invars)
            sub_known = ({v: k for v, x in zip(sub.invars, eqn.invars) if (k := _int_value(x, known)) is not None}
                         if mapped else {})
            sub_work, sub_out, out_known = counter._walk(sub, flags if mapped else [], local, sub_known,
                                                         loops if index == 0 else None)
            work += _Work(sub_work.flops * scale, sub_work.bytes, sub_work.kernel_flops * scale)
            if index == 0 and len(sub_out) == len(eqn.outvars):
                out_flags = sub_out
                known.update({eqn.outvars[i]: k for i, k in out_known.items()})
        return work, out_flags


@dataclasses.dataclass(frozen=True)
class _Phase:
    """Per-device work of one phase of a program, run ``repeats`` times (a decode segment: once per step).

    ``first_step`` is the loop counter's first value (the first response slot a decode segment
    writes), ``trips_derived`` whether ``repeats`` was read from the jaxpr.
    """

    name: str
    repeats: int
    flops: float
    bytes: float
    first_step: int | None = None
    trips_derived: bool = True


def _phases(traced, weights: Sequence[bool], fallback_trips: int, tensor: int, devices: int,
            *, outside: str = "prefill", loop: str = "decode steps") -> tuple[list[_Phase], list[_Loop]]:
    """The phases of a program, per device, loops multiplied out (see :class:`_Counter`), and its
    top-level loops.

    One phase ``all`` for a program without a ``while`` loop. Otherwise ``outside`` (the sampler's
    prefill: everything not inside a top-level loop) and one phase per loop, named by the counter
    values it runs through (``decode steps 0-127``), repeated once per trip.
    """
    counter = _Counter(multiply=True, decode_trips=fallback_trips, tensor=tensor, devices=devices)
    loops: list[_Loop] = []
    full, _ = counter.walk(traced.jaxpr.jaxpr, weights, loops=loops)

    def per_device(work: _Work) -> tuple[float, float]:
        return (work.flops + work.kernel_flops) / devices, work.bytes

    if not loops:
        return [_Phase("all", 1, *per_device(full))], loops
    phases = []
    for index, found in enumerate(loops):
        full = full - found.body * found.trips
        name = (f"{loop} {found.first}-{found.first + found.trips - 1}" if found.first is not None
                else f"loop {index} (trip count not found: {found.trips} assumed)")
        phases.append(_Phase(name, found.trips, *per_device(found.body), found.first, found.derived))
    return [_Phase(outside, 1, *per_device(full)), *phases], loops


# --------------------------------------------------------------------------------------------------
# The report


def plan(config: PlanConfig, *, programs: Sequence[str] | None = None,
         progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compile the step for the topology and report memory, FLOPs, fit and a roofline step time.

    ``programs`` (default: all) limits the compile to some programs; the step time is then ``None``.

    Returns:
      A JSON-ready dict with ``topology``, ``devices``, ``device_memory_bytes``, ``programs.{rollout,
      score, update}.{argument_bytes, output_bytes, temp_bytes, peak_bytes, flops,
      compile_seconds, ...}``, ``fits``, ``estimated_step_seconds`` and ``mesh``, ``models``,
      ``batch``, ``chip``, ``over`` (the programs that do not fit and by how many bytes).
    """
    compiled = compile_programs(config, programs=programs, progress=progress)
    return report(compiled)


def report(compiled: CompiledPlan) -> dict[str, Any]:
    """The report of :func:`plan` from already compiled programs.

    A program with no runs per step (the training layout's ``rollout`` when the step decodes on an
    inference layout: compiled to compare) counts in neither ``fits`` nor the step time.
    """
    config, topology = compiled.config, compiled.topology
    memory = topology.memory_bytes(list(compiled.mesh.devices.flat))
    programs = {name: _program_entry(compiled, name) for name in compiled.traced}
    run = {name: p for name, p in programs.items() if compiled.executions[name]}
    over = [{"program": name, "bytes_over": p["total_bytes"] - memory} for name, p in run.items()
            if p["total_bytes"] > memory]
    step_seconds = None
    if set(compiled.traced) == set(compiled.step_programs) and all(
            p["roofline_seconds"] is not None for p in run.values()):  # a step time needs every program
        step_seconds = sum(compiled.executions[name] * p["roofline_seconds"] for name, p in run.items())
    rollout = _rollout_entry(compiled, programs)
    under_lengths = None
    if step_seconds is not None and rollout["estimate"] is not None:
        decoded = "rollout_layout" if "rollout_layout" in run else "rollout"
        under_lengths = step_seconds - run[decoded]["roofline_seconds"] + rollout["estimate"]["roofline_seconds"]
    return {**_report_header(compiled, memory), "programs": programs, "fits": not over, "over": over,
            "estimated_step_seconds": step_seconds, "rollout": rollout,
            "estimated_step_seconds_under_lengths": under_lengths}


def _rollout_entry(compiled: CompiledPlan, programs: dict[str, Any]) -> dict[str, Any]:
    """The JSON's ``rollout`` block: the layout, the estimates under the response lengths
    (:mod:`opd_jax.rollout_estimate`) and, beside them, the compiled static batch on the training
    layout cut at the batch's longest response (``static_training_layout``)."""
    config, block = compiled.config, dict(compiled.rollout)
    static = programs.get("rollout")
    if static is None or static.get("phases") is None:
        block["static_training_layout"] = None
        return block
    longest = int(config.response_lengths.rows(config.rows, config.new_tokens).max())
    seconds = {"roofline_seconds": 0.0, "roofline_seconds_without_collectives": 0.0}
    for name, phase in static["phases"].items():
        steps = 1 if name == "prefill" else min(phase["repeats"], max(0, longest - (phase["first_step"] or 0)))
        for key in seconds:
            seconds[key] += steps * phase[key]
    block["static_training_layout"] = {**seconds, "steps": longest}
    if block["estimate"] is None:  # decoding on the training layout: the static batch is the estimate
        block["estimate"] = {"layout": "training", **seconds, "steps": longest}
    return block


def _report_header(compiled: CompiledPlan, memory: int) -> dict[str, Any]:
    """The planned run: topology, chip, meshes, models, batch and configuration."""
    config, topology = compiled.config, compiled.topology
    chip = topology.chip
    mesh, teacher_mesh, train, execution = config.placement.mesh, config.placement.teacher_mesh, config.train, \
        config.execution
    return {
        "topology": config.topology,
        "devices": topology.num_devices,
        "device_memory_bytes": memory,
        "chip": {"name": chip.name, "peak_flops": chip.peak_flops, "hbm_bytes": chip.hbm_bytes,
                 "hbm_bandwidth": chip.hbm_bandwidth, "ici_bandwidth": chip.ici_bandwidth, "source": chip.source},
        "mesh": {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor},
        "teacher_mesh": None if teacher_mesh is None else {"data": teacher_mesh.data, "fsdp": teacher_mesh.fsdp,
                                                           "tensor": teacher_mesh.tensor},
        "models": {
            "student": {"name": config.student_name, "parameters": compiled.parameters["student"],
                        "param_dtype": execution.param_dtype, "compute_dtype": execution.compute_dtype,
                        "remat": execution.remat},
            "teacher": {"name": config.teacher_name, "parameters": compiled.parameters["teacher"],
                        "param_dtype": execution.teacher_dtype, "compute_dtype": execution.compute_dtype},
            "attention": compiled.attention,
        },
        "batch": {"rows": config.rows, "prompts_per_step": train.prompts_per_step, "group_size": train.group_size,
                  "sequence_length": config.sequence_length, "prompt_length": config.prompt_length,
                  "new_tokens": config.new_tokens, "minibatches": train.minibatches, "epochs": train.epochs,
                  "logit_chunk_size": train.logit_chunk_size},
        # The teacher's own slots when it re-tokenizes the text (tokenizer_alignment 'text').
        "retokenized": None if not config.retokenized else {
            "teacher_token_ratio": config.teacher_token_ratio, "teacher_sequence_length": config.teacher_sequence_length,
            "teacher_piece_bytes": config.teacher_piece_bytes, "byte_slots_per_token": config.teacher_byte_slots},
        # As the run folder's config.json records it ("auto" resolved), and how the models run.
        "train_config": train.to_json(),
        "execution": {**dataclasses.asdict(execution), "attention_resolved": compiled.attention},
    }


def _program_entry(compiled: CompiledPlan, name: str) -> dict[str, Any]:
    """One program's memory (``memory_analysis``), work (:func:`_phases`), collectives
    (:mod:`opd_jax.plan_collectives`) and roofline seconds."""
    resident = compiled.resident_bytes[name]
    entry: dict[str, Any] = {"executions": compiled.executions[name],
                             "compile_seconds": round(compiled.compile_seconds[name], 3), "resident_bytes": resident}
    if name in compiled.oom:
        required, _ = _parse_oom(compiled.oom[name])
        entry.update(argument_bytes=None, output_bytes=None, alias_bytes=None, temp_bytes=None,
                     peak_bytes=required, total_bytes=required + resident, flops=None, bytes_accessed=None,
                     xla_flops=None, xla_bytes_accessed=None, collective_bytes=None, collective_seconds=None,
                     roofline_seconds=None, roofline_seconds_without_collectives=None,
                     compiler_error=compiled.oom[name])
        return entry
    executable = compiled.compiled[name]
    stats = executable.memory_analysis()
    argument, output, alias, temp = (int(getattr(stats, f"{k}_size_in_bytes")) for k in
                                     ("argument", "output", "alias", "temp"))
    compiler_peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    peak = max(compiler_peak, argument + output + temp - alias)
    cost = executable.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    entry.update(argument_bytes=argument, output_bytes=output, alias_bytes=alias, temp_bytes=temp, peak_bytes=peak,
                 compiler_peak_bytes=compiler_peak, total_bytes=peak + resident)
    entry.update(_work_entry(compiled, name, executable.as_text()))
    entry.update(xla_flops=float(cost.get("flops", 0.0)), xla_bytes_accessed=float(cost.get("bytes accessed", 0.0)))
    return entry


def _roofline(chip: topologies_lib.Chip, flops: float, hbm_bytes: float, collective_bytes: float) -> dict[str, float]:
    without = max(flops / chip.peak_flops, hbm_bytes / chip.hbm_bandwidth)
    collective_seconds = collective_bytes / chip.ici_bandwidth
    return {"collective_seconds": collective_seconds, "roofline_seconds": max(without, collective_seconds),
            "roofline_seconds_without_collectives": without}


def _work_entry(compiled: CompiledPlan, name: str, hlo: str) -> dict[str, Any]:
    """FLOPs, HBM bytes and collective bytes of a program, in total and per phase, with rooflines.

    Each phase's figures are per repeat (a decode segment's: per step); the program's are the sum
    over phases of repeats × figures.
    """
    config, chip, mesh = compiled.config, compiled.topology.chip, compiled.meshes[name]
    phases, loops = _phases(compiled.traced[name], compiled.weights[name], config.new_tokens, mesh.shape["tensor"],
                            mesh.size)
    collectives = plan_collectives.count_collectives(
        hlo, mesh.size, [loop.trips for loop in loops],
        [None if loop.first is None else loop.first + loop.trips for loop in loops])
    segments = (sampling_lib.cache_segments(config.prompt_length, config.new_tokens)
                if name in ("rollout", "rollout_layout") else ())
    per_phase = [collectives.outside, *(collectives.loops + [{}] * len(loops))[:len(loops)]]
    entries, total = {}, {"flops": 0.0, "bytes_accessed": 0.0, "collective_bytes": 0.0, "roofline_seconds": 0.0,
                          "roofline_seconds_without_collectives": 0.0}
    for index, (phase, kinds) in enumerate(zip(phases, per_phase)):
        moved = sum(kinds.values())
        entry = {"repeats": phase.repeats, "flops": phase.flops, "bytes_accessed": phase.bytes,
                 "collective_bytes": moved, "collectives": dict(kinds),
                 **_roofline(chip, phase.flops, phase.bytes, moved)}
        if index:
            entry.update(first_step=phase.first_step, trips_derived=phase.trips_derived,
                         weight_gather_bytes=(collectives.loop_weight_gathers + [0.0] * index)[index - 1])
            end = None if phase.first_step is None else config.prompt_length + phase.first_step + phase.repeats
            entry["cache_slots"] = end if end in segments else None
        entries[phase.name] = entry
        for key in total:
            total[key] += phase.repeats * entry[key]
    result = {**total, "collective_seconds": total["collective_bytes"] / chip.ici_bandwidth,
              "collectives": collectives.total([p.repeats for p in phases[1:]]),
              "collectives_matched": collectives.matched}
    if len(phases) > 1:
        result["phases"] = entries
        result["decode_weight_gathers"] = any(e.get("weight_gather_bytes", 0.0) > 0 for e in entries.values())
    return result


def _configuration_lines(result: dict[str, Any]) -> list[str]:
    """The planned run's objective, logit chunking and teacher mesh, as the report echoes them."""
    objective, loop = result["train_config"]["objective"], result["train_config"]["loop"]
    parameters = "".join(f" {k}={objective[k]}" for k in ("beta", "alpha") if objective[k] is not None)
    level = objective["level"] + ("" if objective["level"] == "sequence" else f" (γ {objective['gamma']})")
    lines = [f"objective: {objective['divergence']}{parameters} {objective['estimator']}, {level} level, baseline "
             f"{objective['baseline']}, full-vocabulary weight {objective['full_vocab_weight']}; logit chunk "
             f"{loop['logit_chunk_size'] or 'none'} tokens"]
    teacher_mesh = result.get("teacher_mesh")
    if teacher_mesh:
        lines.append(f"teacher on its own mesh data={teacher_mesh['data']} fsdp={teacher_mesh['fsdp']} "
                     f"tensor={teacher_mesh['tensor']} (program 'teacher')")
    return lines


def _bound(phase: dict[str, Any], chip: dict[str, Any]) -> str:
    """What limits a phase's roofline: compute, memory or interconnect."""
    times = {"compute": phase["flops"] / chip["peak_flops"], "memory": phase["bytes_accessed"] / chip["hbm_bandwidth"]}
    if phase.get("collective_seconds") is not None:
        times["interconnect"] = phase["collective_seconds"]
    return max(times, key=times.get)


def _rollout_lines(result: dict[str, Any]) -> list[str]:
    """The rollout's phases, and each program's collectives (reports from before collectives were
    counted render as they did)."""
    chip, programs = result["chip"], result["programs"]
    lines = []
    phases = programs.get("rollout", {}).get("phases")
    if phases and "decode step" in phases:  # one decode loop × max_new_tokens: reports before issue 25
        prefill, decode = phases["prefill"], phases["decode step"]
        lines.append(f"rollout: prefill {prefill['roofline_seconds']:.3g} s + {decode['repeats']} decode steps × "
                     f"{1e3 * decode['roofline_seconds']:.3g} ms ({_bound(decode, chip)}-bound: "
                     f"{decode['bytes_accessed'] / GIB:.3g} GiB read per step and device)")
    elif phases:
        prefill = phases["prefill"]
        segments = [(n, p) for n, p in phases.items() if n != "prefill"]
        lines.append(f"rollout: prefill {prefill['roofline_seconds']:.3g} s + {len(segments)} decode segment(s), "
                     f"{sum(p['repeats'] for _, p in segments)} steps in all:")
        for name, p in segments:
            cache = "" if p.get("cache_slots") is None else f", cache {p['cache_slots']} slots"
            gathers = (f", weight gathers {p['weight_gather_bytes'] / GIB:.3g} GiB" if p.get("weight_gather_bytes")
                       else "")
            lines.append(f"  {name}{cache}: {p['repeats']} × {1e3 * p['roofline_seconds']:.3g} ms "
                         f"({_bound(p, chip)}-bound: {p['bytes_accessed'] / GIB:.3g} GiB read, "
                         f"{p['collective_bytes'] / GIB:.3g} GiB over ICI per step and device{gathers})")
        gathered = "yes" if programs["rollout"].get("decode_weight_gathers") else "no"
        lines.append(f"  weight gathers inside the decode loop: {gathered}")
    counted = {n: p for n, p in programs.items() if p.get("collective_bytes") is not None}
    if counted:
        lines.append("collectives per device (ICI " + f"{chip['ici_bandwidth'] / 1e9:.0f} GB/s): " + "; ".join(
            f"{n} {p['collective_bytes'] / GIB:.3g} GiB, {p['collective_seconds']:.3g} s (roofline "
            f"{p['roofline_seconds_without_collectives']:.3g} s without)" for n, p in counted.items()))
    return lines


def _layout_lines(result: dict[str, Any]) -> list[str]:
    """The rollout's layout and its estimates under the response lengths (reports before the
    inference layout have no ``rollout`` block)."""
    block = result.get("rollout")
    if not block or block.get("estimate") is None:
        return []
    estimate, static = block["estimate"], block.get("static_training_layout")
    lines = [f"rollout layout: {block['layout']} (rollout_mesh {block['rollout_mesh']})"
             + ("" if block["slots"] is None else f", {block['slots']} slots per replica, KV cache "
                f"{block['kv_cache_bytes'] / GIB:.3g} GiB per device")]
    lines.append(f"  under responses {block['response_lengths']}: {estimate['steps']} decode steps, "
                 f"{estimate['roofline_seconds']:.3g} s ({estimate['roofline_seconds_without_collectives']:.3g} s "
                 "without collectives)" + ("" if static is None else
                                           f"; the static batch on the training layout: {static['roofline_seconds']:.3g} s "
                                           f"({static['roofline_seconds_without_collectives']:.3g} s without)"))
    if len(block["layouts"]) > 1:
        lines.append("  layouts: " + ", ".join(f"{c['layout']} {c['roofline_seconds']:.3g} s" for c in block["layouts"]))
    if result.get("estimated_step_seconds_under_lengths") is not None:
        lines.append(f"  estimated step under these lengths: {result['estimated_step_seconds_under_lengths']:.3g} s")
    return lines


def format_report(result: dict[str, Any]) -> str:
    """The report as a readable table (GiB = 2**30 bytes per device)."""
    def gib(x):
        return "–" if x is None else f"{x / GIB:.3f}" if x < 10 * GIB else f"{x / GIB:.1f}"

    def billions(n):
        return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"

    mesh, models, batch = result["mesh"], result["models"], result["batch"]
    memory = result["device_memory_bytes"]
    lines = [
        f"{result['topology']}: {result['devices']} × {result['chip']['name']} ({gib(memory)} GiB per device), "
        f"mesh data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}, attention {models['attention']}",
        f"student {models['student']['name']} ({billions(models['student']['parameters'])}, "
        f"{models['student']['param_dtype']} params, {models['student']['compute_dtype']} compute, "
        f"remat {models['student']['remat']}); teacher {models['teacher']['name']} "
        f"({billions(models['teacher']['parameters'])}, {models['teacher']['param_dtype']})",
        f"{batch['rows']} rows ({batch['prompts_per_step']} prompts × {batch['group_size']}) of "
        f"{batch['sequence_length']} = {batch['prompt_length']} prompt + {batch['new_tokens']} new tokens; "
        f"{batch['minibatches']} minibatches × {batch['epochs']} epoch(s)",
        *_retokenized_lines(result.get("retokenized")),
        *_configuration_lines(result),
        "",
        "| program | runs | args GiB | out GiB | temp GiB | peak GiB | + resident GiB | total GiB | TFLOP/device "
        "| roofline s | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in result["programs"].items():
        flops = "–" if p["flops"] is None else f"{p['flops'] / 1e12:.3g}"
        seconds = "–" if p["roofline_seconds"] is None else f"{p['roofline_seconds']:.3g}"
        lines.append(
            f"| {name} | {p['executions']} | {gib(p['argument_bytes'])} | {gib(p['output_bytes'])} | "
            f"{gib(p['temp_bytes'])} | {gib(p['peak_bytes'])} | {gib(p['resident_bytes'])} | "
            f"{gib(p['total_bytes'])} | {flops} | {seconds} | {p['compile_seconds']:.1f} |"
        )
    lines.append("")
    if result["fits"]:
        name, p = max(result["programs"].items(), key=lambda item: item[1]["total_bytes"])
        lines.append(f"fits: yes (largest: {name}, {gib(p['total_bytes'])} of {gib(memory)} GiB, "
                     f"{100 * (1 - p['total_bytes'] / memory):.0f}% headroom)")
    else:
        lines.append("fits: NO: " + "; ".join(
            f"{o['program']} is {gib(o['bytes_over'])} GiB over the {gib(memory)} GiB of a device"
            + (" (the compiler refused it)" if result["programs"][o["program"]].get("compiler_error") else "")
            for o in result["over"]))
        if batch["logit_chunk_size"] is None and any(o["program"] != "rollout" for o in result["over"]):
            lines.append("  (score and update project all tokens onto the vocabulary at once: try --logit-chunk-size "
                         "1024; more devices, --minibatches or --remat full also lower the update's peak)")
    lines += _rollout_lines(result)
    lines += _layout_lines(result)
    if result["estimated_step_seconds"] is not None:
        lines.append(f"estimated step: {result['estimated_step_seconds']:.3g} s (roofline lower bound: "
                     "each program × its runs per step)")
    return "\n".join(lines)
