"""The on-policy distillation loop.

One step: prompts → ``group_size`` student rollouts per prompt → :func:`opd_jax.step.make_train_step`'s
``prepare`` (behaviour and teacher log-probs, advantages) → ``epochs × minibatches`` optax updates
→ metrics (computed inside jit, fetched once per step) → checkpoint. The objective plugs in as
``advantage_fn`` / ``loss_fn`` (see :mod:`opd_jax.step`); the run folder's files belong to
:class:`opd_jax.run_folder.RunFolder`, the checkpoints to :class:`opd_jax.checkpoint.CheckpointStore`.

Every random choice is derived from ``(seed, step)`` and the prompt order from ``(seed, epoch)``, and
the state saved at a checkpoint is everything the loop carries (parameters, optimiser state, step,
PRNG key, data position), so a run that is killed and resumed ends with bitwise the same parameters
as one that never stopped.

Resuming and stopping. :func:`train` resumes from the newest good checkpoint in
``output_dir/checkpoints`` when there is one: the saved ``config.json`` must then match ``config``
except in :data:`RESUME_FREE` fields (so a finished run can be extended with more ``steps``), damaged
checkpoints on the way are quarantined (:mod:`opd_jax.checkpoint`), and ``metrics.jsonl`` /
TensorBoard continue from the restored step. SIGTERM and SIGINT finish the current step, commit it
and raise :class:`Preempted` (:mod:`opd_jax.preemption`); a second one exits at once.

Placement (:class:`~opd_jax.sharding.Placement`). ``mesh`` shards the run over a ``data × fsdp ×
tensor`` device mesh (all devices of all processes; :mod:`opd_jax.sharding`; ``None``: one device).
In a multi-process run every process calls :func:`train` with the same arguments; process 0 alone
writes metrics, config, curves and the export, orbax writes checkpoints together, and every process
gets the student's weights as whole host arrays and reads the records that process 0 wrote.
``teacher_mesh`` is the teacher's own mesh over the devices after ``mesh``'s (one process; not with
``full_vocab_weight > 0``): the rollout producer scores each rollout there and sends only ``[B, T]``
log-probs back, so with ``pipeline_rollouts`` sampling and scoring of step ``k + 1`` run while step
``k`` updates. ``student_rules`` / ``teacher_rules`` are the two models' partition rules.

Rollouts. ``rollout_fn(student, prompt_tokens, prompt_mask, key, sampling_config) -> Rollout``; the
default samples one response per prompt. Multi-turn rollouts (:mod:`opd_jax.rollouts`) keep tokens
inserted by the environment in ``token_mask`` as context for both models but out of
``response_mask``, so they get no advantage and no gradient. A ``rollout_backend``
(:mod:`opd_jax.backends`) passed to :func:`train` is sent the student's weights before every rollout
and left open, and ``rollout_fn`` is then not used; without one, :func:`train` starts the backend
``config.rollout_backend`` names and closes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import chunking
from opd_jax import rollout_estimate, rollout_layout
from opd_jax import sharding as sharding_lib
from opd_jax import topologies as topologies_lib
from opd_jax.alignment import AlignedTeacher
from opd_jax.backends import JaxBackend, RolloutBackend, WeightSyncError
from opd_jax.checkpoint import CheckpointStore
from opd_jax.config import RESUME_FREE, TrainConfig
from opd_jax.models import Decoder
from opd_jax.models.config import DecoderConfig
from opd_jax.pipeline import RolloutPipeline
from opd_jax.preemption import Preempted, StopSignals
from opd_jax.rollouts import MultiTurn, MultiTurnBackend
from opd_jax.rollout_layout import RolloutShardings
from opd_jax.run_folder import RunFolder
from opd_jax.sampling import Rollout, SamplingConfig, generate
from opd_jax.step import (AdvantageFn, LossFn, StepShardings, TrainStep, make_optimizer, make_step_shardings,
                           make_train_step)

Array = jax.Array
PyTree = Any

__all__ = [
    "RESUME_FREE", "NonFiniteError", "Preempted", "PromptSet", "StepShardings", "TrainConfig", "TrainResult",
    "TrainStep", "WeightSyncError", "check_teacher_mesh", "make_train_step", "train",
]


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Tokenised prompts: ``tokens`` / ``mask`` ``[N, P]`` (left-padded), read in a seeded order.

    The order is a fresh permutation of all ``N`` prompts per epoch, from ``(seed, epoch)``, so the
    batch at any data position can be recomputed after a restart. ``teacher_ids`` ``[N]`` int
    routes each prompt to a teacher (an index into the teachers passed to :func:`train`, in their
    order); ``None``: every prompt goes to the first. ``teacher_text`` (a
    :class:`~opd_jax.retokenize.TeacherReader`: each teacher's tokenizer and its own encoding of every
    prompt) is what ``tokenizer_alignment = "text"`` reads the rollouts with.
    """

    tokens: np.ndarray
    mask: np.ndarray
    teacher_ids: np.ndarray | None = None
    teacher_text: Any = None

    def __post_init__(self):
        if self.tokens.ndim != 2 or self.tokens.shape != self.mask.shape or len(self.tokens) == 0:
            raise ValueError(
                f"prompt tokens {list(self.tokens.shape)} and mask {list(self.mask.shape)} must be the same non-empty [N, P]"
            )
        if self.teacher_ids is not None and np.shape(self.teacher_ids) != (len(self.tokens),):
            raise ValueError(f"teacher_ids must be [N] = {[len(self.tokens)]}; got {list(np.shape(self.teacher_ids))}")

    def indices(self, position: int, size: int, seed: int) -> np.ndarray:
        """``[size]`` the prompts at data positions ``position, ..., position + size − 1``."""
        count = len(self.tokens)
        indices = []
        for i in range(position, position + size):
            epoch, offset = divmod(i, count)
            indices.append(np.random.default_rng([seed, epoch]).permutation(count)[offset])
        return np.asarray(indices)

    def batch(self, position: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        indices = self.indices(position, size, seed)
        return self.tokens[indices], self.mask[indices]

    def teachers(self, position: int, size: int, seed: int) -> np.ndarray:
        """``[size]`` int32 teacher index of each prompt of :meth:`batch`."""
        return self.teachers_of(self.indices(position, size, seed))

    def teachers_of(self, indices: np.ndarray) -> np.ndarray:
        """The int32 teacher index of the prompts at ``indices``."""
        if self.teacher_ids is None:
            return np.zeros(len(indices), np.int32)
        return np.asarray(self.teacher_ids, np.int32)[indices]


@dataclasses.dataclass
class TrainResult:
    student: Decoder
    history: list[dict]
    output_dir: pathlib.Path


def _flatten(tree: PyTree) -> dict[str, Array]:
    """A flat ``{path: array}`` dict: what orbax stores."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-process run (nothing to do in a single one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _global_batch(rows: np.ndarray, sharding) -> Array:
    """A ``[B, ...]`` host array (the same on every process) as a global array split by ``sharding``.

    Each process transfers only the rows its own devices hold.
    """
    return jax.make_array_from_callback(rows.shape, sharding, lambda index: rows[index])


def _addressable(tree: PyTree) -> PyTree:
    """``tree`` with every array readable on this process (gathered if it spans other processes).

    Gathered one leaf at a time into host memory, so a device never holds more than one whole
    matrix (a whole float32 8B model would not fit on one).
    """
    if all(leaf.is_fully_addressable for leaf in jax.tree.leaves(tree)):
        return tree

    def gather(leaf):
        if leaf.is_fully_addressable:
            return leaf
        whole = jax.jit(lambda x: x, out_shardings=jax.sharding.NamedSharding(leaf.sharding.mesh,
                                                                            jax.sharding.PartitionSpec()))(leaf)
        return np.asarray(whole.addressable_data(0))

    return jax.tree.map(gather, tree)


def _place_on_mesh(config, placement: sharding_lib.Placement, state, teacher_params, reference_params, optimizer):
    """Check the mesh against devices, parameters and batch, then place state, teacher and reference on it.

    All checks run on shapes only, before any compilation or transfer. The reference model (often
    the initial student) is split by the student's rules. With a teacher mesh the student takes the
    first devices and the teacher the rest (:func:`opd_jax.sharding.disjoint_meshes`).

    Returns:
      ``(StepShardings, state, teacher_params, reference_params)`` with the state's parameters and
      optimiser state split by the rules and its counters and key replicated.
    """
    shardings = make_step_shardings(config, placement.mesh, state["params"], teacher_params, optimizer,
                                    placement.student_rules, placement.teacher_rules, placement.teacher_mesh,
                                    reference_params)
    if reference_params is not None:
        reference_params = sharding_lib.place(reference_params, shardings.reference_params)
    params = sharding_lib.place(state["params"], shardings.params)
    teacher_params = sharding_lib.place(teacher_params, shardings.teacher_params)
    placed = {
        "params": params,
        # Initialised in place: the AdamW moments are never whole on one device.
        "opt_state": jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params),
        **{k: jax.device_put(state[k], shardings.replicated) for k in ("step", "key", "data_position")},
    }
    return shardings, placed, teacher_params, reference_params


def _rollout_shardings(config: TrainConfig, placement: sharding_lib.Placement, student: Decoder, params,
                       prompt_length: int, sampling: SamplingConfig, shardings: StepShardings
                       ) -> RolloutShardings | None:
    """The jax sampler's inference layout on the student's mesh (``config.rollout_mesh``; ``auto``
    for the chip of these devices and responses that run to ``max_new_tokens``), ``None`` for the
    training layout."""
    mesh = shardings.batch.mesh
    devices = list(mesh.devices.flat)
    try:
        chip = topologies_lib.parse_topology("local").chip
    except ValueError:  # a device kind without chip figures: auto keeps the training layout
        chip = None
    layout = rollout_estimate.resolve_layout(
        config.rollout_mesh, len(devices), student.config, chip, topologies_lib.device_memory_bytes(devices),
        rows=config.prompts_per_step * config.group_size, prompt_length=prompt_length,
        max_new_tokens=config.max_new_tokens, lengths=rollout_estimate.ResponseLengths(), stop_ids=sampling.stop_ids,
        compute_dtype=student.compute_dtype, slots=sampling.slots, group=sampling.group_size)
    return None if layout is None else rollout_layout.rollout_shardings(layout, mesh, params, placement.student_rules)


def _score_text(config: TrainConfig, prompts: PromptSet, step_fn: TrainStep, teacher_params, several_teachers: bool,
                batch_sharding, rollout: Rollout, data_position: int) -> AlignedTeacher:
    """Each row's teacher scores its own tokens of the row's text (``tokenizer_alignment = "text"``),
    on its own token shapes (its byte slots with ``alignment_credit = "characters"``); the step
    carries the scores onto the student's tokens."""
    picked = prompts.indices(data_position, config.prompts_per_step, config.seed)
    prompt_index, teacher_index = (np.repeat(a, config.group_size) for a in (picked, prompts.teachers_of(picked)))
    reader = prompts.teacher_text
    read = reader.read(np.asarray(rollout.tokens), np.asarray(rollout.response_mask), prompt_index, teacher_index,
                       byte_view=config.alignment_credit == "characters")
    index = teacher_index if several_teachers else None
    if read.bytes is None:
        logp = step_fn.score_teacher(teacher_params, read.tokens_BxN, read.token_mask_BxN, index)
        scored = AlignedTeacher(logp, read.response_mask_BxN, read.teacher_chunk_BxN, read.student_chunk_BxL)
    else:
        logp = step_fn.score_teacher_bytes(teacher_params, read.tokens_BxN, read.token_mask_BxN, index, read.bytes,
                                           tuple(vocabulary.rank_V for vocabulary in reader.vocabularies))
        flat = lambda slots_BxNxD: slots_BxNxD.reshape(slots_BxNxD.shape[0], -1)  # noqa: E731
        scored = AlignedTeacher(logp, flat(read.bytes.slot_mask_BxNxD), flat(read.bytes.slot_chunk_BxNxD),
                                read.student_chunk_BxL)
    return scored if batch_sharding is None else jax.device_put(scored, batch_sharding)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the loop holds fixed for a whole run."""

    config: TrainConfig
    graphdef: Any
    teacher_params: PyTree
    reference_params: PyTree | None
    step_fn: TrainStep
    shardings: StepShardings | None
    rollouts: RolloutPipeline
    finite_flags: Callable
    prompts: PromptSet
    several_teachers: bool


def _setup(config, models: tuple, prompts, sampling, backend, placement: sharding_lib.Placement,
           advantage_fn=None, loss_fn=None) -> tuple[_Run, dict]:
    """The jitted step and the initial state ``{params, opt_state, step, key, data_position}``, placed
    by ``placement``; ``models`` is ``(student, teacher or {name: teacher}, reference or None)``.

    With ``pipeline_rollouts`` the state also carries ``sampling_params``, the parameters the
    step's rollout is sampled from (the previous step's), so a resumed run samples it again. With a
    teacher mesh the rollout producer also scores each rollout with the teacher, on its devices.
    """
    student, teacher, reference = models
    teacher_mesh = placement.teacher_mesh
    graphdef, params = nnx.split(student)
    if isinstance(teacher, dict):
        teacher_graphdef = {name: nnx.graphdef(model) for name, model in teacher.items()}
        teacher_params = {name: nnx.state(model) for name, model in teacher.items()}
    else:
        teacher_graphdef, teacher_params = nnx.split(teacher)
    reference_graphdef, reference_params = nnx.split(reference) if reference is not None else (None, None)
    optimizer = make_optimizer(config)
    state = {"params": params, "opt_state": None, "step": jnp.zeros((), jnp.int32),
             "key": jax.random.key_data(jax.random.key(config.seed)), "data_position": jnp.zeros((), jnp.int32)}
    shardings = None
    if placement.mesh is None:
        state["opt_state"] = optimizer.init(params)
    else:
        shardings, state, teacher_params, reference_params = _place_on_mesh(
            config, placement, state, teacher_params, reference_params, optimizer)
        if isinstance(backend, JaxBackend) and backend.rollout_fn is generate:
            rollout = _rollout_shardings(config, placement, student, params, prompts.tokens.shape[1], sampling,
                                         shardings)
            backend = JaxBackend.sharded(graphdef, shardings, sampling, rollout)
    if config.pipeline_rollouts:
        state["sampling_params"] = state["params"]
    # A pipelined step keeps the parameters it started from (the next rollout's sampler reads them),
    # so the update may not donate them.
    step_fn = make_train_step(config, graphdef, teacher_graphdef, optimizer, shardings, advantage_fn=advantage_fn,
                              loss_fn=loss_fn, reference_graphdef=reference_graphdef,
                              donate_state=not config.pipeline_rollouts)
    finite_flags = jax.jit(_finite_flags, out_shardings=None if shardings is None else shardings.replicated)

    def step_batch(step: int, data_position: int):
        """The prompts (``group_size`` copies of each) and the sampling key of ``step``."""
        tokens, mask = prompts.batch(data_position, config.prompts_per_step, config.seed)
        tokens, mask = (np.repeat(a, config.group_size, axis=0) for a in (tokens, mask))
        if shardings is not None:
            tokens, mask = (_global_batch(a, shardings.batch) for a in (tokens, mask))
        return tokens, mask, _step_keys(state["key"], step)[0]

    several_teachers = isinstance(teacher, dict)

    def score_on_teacher_mesh(rollout: Rollout, data_position: int) -> Array:
        """The teacher's log-probs of ``rollout``, computed on the teacher's devices, sent back to the student's."""
        tokens, mask = jax.device_put((rollout.tokens, rollout.token_mask), shardings.teacher_batch)
        index = _teacher_index(config, prompts, data_position, shardings.teacher_batch, several_teachers)
        return jax.device_put(step_fn.score_teacher(teacher_params, tokens, mask, index), shardings.batch)

    score_text = functools.partial(_score_text, config, prompts, step_fn, teacher_params, several_teachers,
                                   None if shardings is None else shardings.batch)

    # The sampler's outputs are placed by XLA's propagation; the step's inputs are explicit.
    place = (lambda rollout: rollout) if shardings is None else (lambda r: jax.device_put(r, shardings.batch))
    retokenize = config.tokenizer_alignment == "text" and not prompts.teacher_text.identical
    score = score_text if retokenize else score_on_teacher_mesh if teacher_mesh is not None else None
    rollouts = RolloutPipeline(backend, step_batch, sampling, ahead=config.pipeline_rollouts, place=place,
                               score=score)
    return _Run(config, graphdef, teacher_params, reference_params, step_fn, shardings, rollouts, finite_flags,
                prompts, several_teachers), state


def _teacher_index(config: TrainConfig, prompts: PromptSet, data_position: int, sharding,
                   several_teachers: bool) -> Array | None:
    """``[B]`` int: the teacher of each row of the step at ``data_position`` (``None`` with one teacher)."""
    if not several_teachers:
        return None
    index_B = np.repeat(prompts.teachers(data_position, config.prompts_per_step, config.seed), config.group_size)
    return index_B if sharding is None else _global_batch(index_B, sharding)


def _step_keys(key_data: Array, step: int) -> tuple[Array, Array]:
    """``(sampling key, shuffle key)`` of ``step``: a function of the seed and the step only."""
    return jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(key_data), step))


def _restore(store: CheckpointStore, state: dict, config: TrainConfig, output_dir) -> tuple[int | None, dict]:
    """The newest good checkpoint's step and state, or ``(None, state)`` for a fresh start."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _flatten(state))
    restored = store.restore_latest(abstract)
    if restored is None:
        return None, state
    resume_step, flat_state = restored
    if resume_step > config.steps:
        raise ValueError(f"{output_dir} holds a checkpoint of step {resume_step}, past steps = {config.steps}; "
                         f"set steps >= {resume_step} to continue it, or choose another output directory")
    state = jax.tree_util.tree_unflatten(jax.tree.structure(state), [flat_state[k] for k in _flatten(state)])
    if jax.process_index() == 0:
        print(f"resuming from step {resume_step} of {config.steps} (checkpoint {store.path(resume_step)})",
              file=sys.stderr, flush=True)
    return resume_step, state


def _train_step(run: _Run, state: dict, step: int) -> tuple[dict, dict, Array]:
    """One step from ``state``: ``(next state, device metrics, finite flags)``, only the phase timings on the host.

    The rollout comes from ``sampling_params`` (pipelined: the previous step's parameters, whose
    log-probs are then the behaviour ones) and the update starts from ``params``.
    """
    config = run.config
    data_position = int(state["data_position"])
    sampling_params = state.get("sampling_params", state["params"])
    rollout, teacher_logp, seconds = run.rollouts.take(sampling_params, step, data_position)
    if step + 1 < config.steps:
        run.rollouts.prefetch(state["params"], step + 1, data_position + config.prompts_per_step)
    teacher_index = _teacher_index(config, run.prompts, data_position,
                                   None if run.shardings is None else run.shardings.batch, run.several_teachers)
    began = time.perf_counter()
    if teacher_logp is None:
        batch, scored = run.step_fn.prepare(sampling_params, run.teacher_params, rollout, run.reference_params,
                                            teacher_index)
    else:  # the teacher scored on its own mesh
        batch, scored = run.step_fn.prepare_scored(sampling_params, teacher_logp, rollout, run.reference_params,
                                                   teacher_index)
    jax.block_until_ready((batch, scored))
    seconds["score_seconds"] = time.perf_counter() - began
    update_teacher = run.teacher_params if teacher_logp is None else None  # read by the full-vocab term only
    began = time.perf_counter()
    rows_per_batch = config.prompts_per_step * config.group_size
    count = scored["response_tokens"] if config.loss_aggregation == "token_mean" else rows_per_batch
    normalizer = jnp.maximum(count, 1).astype(jnp.float32) / config.minibatches
    params, opt_state, updates = state["params"], state["opt_state"], []
    shuffle_key = _step_keys(state["key"], step)[1]
    for epoch in range(config.epochs):
        order = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), rows_per_batch)
        for rows in jnp.split(order, config.minibatches):
            params, opt_state, metrics = run.step_fn.update(params, opt_state, update_teacher,
                                                            run.step_fn.take_rows(batch, rows), normalizer)
            updates.append(metrics)
    jax.block_until_ready(params)
    seconds["update_seconds"] = time.perf_counter() - began
    step_count = jnp.asarray(step + 1, jnp.int32)
    if run.shardings is not None:  # a multi-process orbax save takes only global arrays
        step_count = _global_batch(np.asarray(step + 1, np.int32), run.shardings.replicated)
    next_state = {"params": params, "opt_state": opt_state, "step": step_count, "key": state["key"],
                  "data_position": state["data_position"] + config.prompts_per_step}
    if "sampling_params" in state:
        next_state["sampling_params"] = state["params"]
    return next_state, {"scored": scored, "updates": updates, "seconds": seconds}, run.finite_flags(params, opt_state)


def _record(config: TrainConfig, metrics: dict, seconds: float) -> dict[str, float]:
    """The step's ``metrics.jsonl`` record from the fetched metrics."""
    updates = metrics["updates"]
    scored = {k: float(v) for k, v in metrics["scored"].items()}
    tokens = scored.pop("response_tokens")
    return {
        "loss": float(np.mean([u["loss"] for u in updates])),
        "grad_norm": float(np.mean([u["grad_norm"] for u in updates])),
        "clip_fraction": float(sum(u["clipped_tokens"] for u in updates)) / (config.epochs * max(tokens, 1.0)),
        "log_ratio_abs_max": float(max(u["log_ratio_abs_max"] for u in updates)),
        **scored,
        "tokens_per_second": tokens / seconds,
        "step_seconds": seconds,
        **metrics["seconds"],
    }


def train(
    config: TrainConfig,
    student: Decoder,
    student_config: DecoderConfig,
    teacher: Decoder,
    prompts: PromptSet,
    output_dir: str | pathlib.Path,
    *,
    stop_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    evaluate: Callable[[Decoder], dict[str, float]] | None = None,
    rollout_fn: Callable[..., Rollout] = generate,
    rollout_backend: RolloutBackend | None = None,
    progress: bool = True,
    label: str = "",
    placement: sharding_lib.Placement = sharding_lib.Placement(),
    export_dtype: Any = None,
    advantage_fn: AdvantageFn | None = None,
    loss_fn: LossFn | None = None,
    reference: Decoder | None = None,
) -> TrainResult:
    """Distil ``teacher`` into ``student`` on the student's own rollouts; resumes ``output_dir``'s run.

    Resuming, stopping, placement, several processes and rollouts: see the module notes.

    Args:
      config: the run's :class:`TrainConfig`.
      student: the student decoder (its parameters are the starting point).
      student_config: its :class:`DecoderConfig` (for the export).
      teacher: the frozen teacher, or a ``{name: teacher}`` dict of several, indexed in order by
        ``prompts.teacher_ids`` (metrics then also per teacher); all share the student's vocabulary.
      prompts: the prompt set.
      output_dir: receives ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``,
        ``curves.png`` and the exported student in ``student/``.
      stop_ids, pad_id: sampling stop tokens and padding id.
      evaluate: ``model -> {metric: value}``, run first, every ``eval_every`` steps and last (logged as ``eval_*``).
      rollout_fn, rollout_backend: how rollouts are sampled (module notes).
      progress, label: show a progress bar, with this label.
      placement: where the models live (module notes).
      export_dtype: dtype of the exported student's tensors (default: its parameters' dtype).
      advantage_fn: ``(student_logp_BxT, teacher_logp_BxT, response_mask_BxT) -> [B, T] | [B]``
        replacing the config's estimator (run under jit, held under stop-gradient); see :mod:`opd_jax.step`.
      loss_fn: ``(student_logp_BxT, behaviour_logp_BxT, advantages, response_mask_BxT) -> [B]``
        replacing the PPO-clipped surrogate.
      reference: a frozen reference model (same vocabulary; e.g. the initial student) whose log-probs
        ``advantage_fn`` receives as ``reference_logp_BxT=`` (G-OPD / ExOPD; see docs/objectives.md).

    Returns:
      :class:`TrainResult` with the trained student and the metric records.

    Raises:
      ValueError: before the first update: vocabularies differ, ``output_dir`` holds a run of another
        configuration (nothing there is modified) or one past ``config.steps``, ``mesh`` does not fit
        the devices, a parameter or the batch, or ``advantage_fn`` / ``loss_fn`` return a wrong shape or dtype.
      Preempted: SIGTERM / SIGINT or a preemption notice; the step reached is committed (call again to resume).
      NonFiniteError: a loss, gradient norm, parameter or optimiser state is non-finite (not saved).
      WeightSyncError: the rollout backend could not take the weights (earlier checkpoints intact).
    """
    config, folder = _checked_folder(config, (student, teacher, reference), prompts, placement, output_dir)
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                              stop_ids=tuple(stop_ids), pad_id=pad_id, slots=config.rollout_slots,
                              group_size=config.group_size)
    backend = rollout_backend or _start_backend(config, student, student_config, rollout_fn)
    with contextlib.ExitStack() as cleanup:  # closed in reverse: logs, saves, the sampler, the engine
        if rollout_backend is None:
            cleanup.callback(backend.close)
        run, state, store = _open_run(cleanup, folder, config, (student, teacher, reference), prompts, sampling,
                                      backend, placement, advantage_fn, loss_fn)
        # From here on a signal only sets a flag; every exit waits for the started saves and closes the logs.
        with StopSignals() as stop_signals:
            state = _run_steps(run, state, store, folder, stop_signals, evaluate,
                               progress=progress and jax.process_index() == 0, label=label)
            cleanup.close()
            final_student = nnx.merge(run.graphdef, _addressable(state["params"]))
            folder.export(final_student, student_config, dtype=export_dtype)
            _sync_processes("opd_jax_exported")
    history = folder.history()
    folder.plot(history, label)
    return TrainResult(final_student, history, folder.path)


def _checked_folder(config: TrainConfig, models: tuple, prompts: PromptSet, placement: sharding_lib.Placement,
                    output_dir) -> tuple[TrainConfig, RunFolder]:
    """``(config with its logit chunks resolved, the run folder)`` once the models ``(student,
    teacher or {name: teacher}, reference or None)`` are checked against each other, the prompts and
    the placement, and ``output_dir`` as a run to resume; nothing is written here."""
    student, teacher, reference = models
    _check_run(config, student, teacher, reference, prompts, placement)
    config = resolve_logit_chunks(config, student.config.vocab_size, prompts.tokens.shape[1], placement,
                                  say=_say if jax.process_index() == 0 else None)
    folder = RunFolder(output_dir, config, writer=jax.process_index() == 0)
    folder.check_resumable()
    return config, folder


def _open_run(cleanup: contextlib.ExitStack, folder: RunFolder, *setup_args) -> tuple[_Run, dict, CheckpointStore]:
    """``(run, state, checkpoint store)``: :func:`_setup` of ``setup_args``, the newest good
    checkpoint restored into the state and the folder started at its step.

    Each piece opened here pushes its closing onto ``cleanup`` (the sampler, then the store, then
    the logs), so the caller closes them in reverse.
    """
    run, state = _setup(*setup_args)
    cleanup.callback(run.rollouts.close)
    store = cleanup.enter_context(contextlib.closing(
        CheckpointStore(folder.path / "checkpoints", keep=run.config.keep_checkpoints)))
    resume_step, state = _restore(store, state, run.config, folder.path)
    _sync_processes("opd_jax_config_checked")  # every process read the old config before it is replaced
    folder.start(resume_step)
    cleanup.callback(folder.close)
    return run, state, store


def resolve_logit_chunks(config: TrainConfig, vocab_size: int, prompt_length: int,
                         placement: sharding_lib.Placement = sharding_lib.Placement(), *,
                         device_memory_bytes: int | None = None,
                         say: Callable[[str], None] | None = None) -> TrainConfig:
    """``config`` with ``logit_chunk_size = "auto"`` resolved for a run's devices (train and plan).

    The sequence is ``prompt_length + max_new_tokens`` slots; a batch shard is one ``data × fsdp``
    position of the student's mesh, or of the teacher's where that has fewer (its devices score all
    rows); the memory is ``device_memory_bytes``, by default that of the first local device
    (:func:`opd_jax.topologies.device_memory_bytes`). ``say`` is given the line naming the choice.
    """
    if config.logit_chunk_size != chunking.AUTO:
        return config
    meshes = (placement.mesh, placement.teacher_mesh)
    shards = min([m.data * m.fsdp for m in meshes if m is not None] or [1])
    if device_memory_bytes is None:
        device_memory_bytes = topologies_lib.device_memory_bytes(jax.local_devices())
    sequence_length = prompt_length + config.max_new_tokens
    resolved = config.with_resolved_chunks(vocab_size=vocab_size, sequence_length=sequence_length,
                                           batch_shards=shards, device_memory_bytes=device_memory_bytes)
    if say is not None:
        chosen = "none (all at once)" if resolved.logit_chunk_size is None else f"{resolved.logit_chunk_size} tokens"
        say(f"logit_chunk_size auto: {chosen} (vocab_size {vocab_size}, {config.prompts_per_step * config.group_size} "
            f"rows × {sequence_length} slots over {shards} batch shard(s), "
            f"{device_memory_bytes / 2**30:.1f} GiB per device)")
    return resolved


def check_teacher_mesh(config: TrainConfig, mesh, teacher_mesh) -> None:
    """Refuse a ``teacher_mesh`` without ``mesh``, with the full-vocabulary term, or in several processes."""
    if teacher_mesh is None:
        return
    if mesh is None:
        raise ValueError("teacher_mesh needs mesh: the student's mesh takes the first devices and the teacher's "
                         "the rest; pass both")
    if config.full_vocab_weight > 0:
        raise ValueError(f"teacher_mesh with full_vocab_weight = {config.full_vocab_weight}: the full-vocabulary "
                         "term needs the teacher's hidden states in the update, on the student's devices; set "
                         "full_vocab_weight to 0 or drop teacher_mesh")
    if jax.process_count() > 1:
        raise ValueError("teacher_mesh runs in one process only (its scoring thread's transfers and collectives "
                         "could interleave differently on each process); drop it for a multi-process run")


def _check_run(config: TrainConfig, student: Decoder, teacher, reference: Decoder | None, prompts: PromptSet,
               placement: sharding_lib.Placement) -> None:
    """The models against each other and the prompts, and the placement against the config."""
    _check_teachers(teacher, student, prompts, config.tokenizer_alignment)
    if reference is not None and reference.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"reference vocab_size {reference.config.vocab_size} != student vocab_size "
                         f"{student.config.vocab_size}")
    check_teacher_mesh(config, placement.mesh, placement.teacher_mesh)
    if placement.mesh is not None:
        rollout_layout.check_rollout_mesh(config.rollout_mesh, placement.mesh.size, student.config,
                                          config.prompts_per_step * config.group_size)
    if config.pipeline_rollouts and jax.process_count() > 1:
        raise ValueError("pipeline_rollouts runs in one process only (a sampling thread's collectives could "
                         "interleave differently on each process); set it to false for a multi-process run")


def _check_teachers(teacher, student: Decoder, prompts: PromptSet, alignment: str) -> None:
    teachers = teacher if isinstance(teacher, dict) else {"teacher": teacher}
    if not teachers:
        raise ValueError("teacher: an empty dict; give at least one teacher")
    if alignment == "text":
        if prompts.teacher_text is None:
            raise ValueError("tokenizer_alignment 'text' needs prompts.teacher_text (each teacher's tokenizer and "
                             "its encoding of the prompts: opd_jax.launch builds it)")
        if jax.process_count() > 1:
            raise ValueError("tokenizer_alignment 'text' runs in one process only (each row is re-tokenized on the "
                             "host that holds it); use 'same' for a multi-process run")
    for name, model in teachers.items():
        if alignment == "same" and model.config.vocab_size != student.config.vocab_size:
            label = "teacher" if len(teachers) == 1 else f"teacher {name!r}"
            raise ValueError(f"{label} vocab_size {model.config.vocab_size} != student vocab_size "
                             f"{student.config.vocab_size}; tokenizer_alignment 'text' distils across tokenizers")
    if prompts.teacher_ids is not None:
        ids = np.asarray(prompts.teacher_ids)
        if ids.min() < 0 or ids.max() >= len(teachers):
            raise ValueError(f"prompts.teacher_ids must lie in [0, {len(teachers)}) (one per teacher: "
                             f"{', '.join(teachers)}); got {ids.min()}..{ids.max()}")


def _run_steps(run: _Run, state: dict, store: CheckpointStore, folder: RunFolder, stop_signals: StopSignals,
               evaluate, *, progress: bool, label: str) -> dict:
    """Steps from the state's step to ``config.steps``: log, check, evaluate, checkpoint, stop on a signal."""
    from tqdm import tqdm

    config = run.config

    def run_eval(step: int) -> None:
        if evaluate is not None:
            folder.log(step, {f"eval_{k}": v for k, v in evaluate(nnx.merge(run.graphdef, state["params"])).items()})

    start = int(state["step"])
    bar = tqdm(total=config.steps, initial=start, desc=label or "distil", dynamic_ncols=True, disable=not progress)
    try:
        if start == 0:
            run_eval(0)
        for step in range(start, config.steps):
            began = time.perf_counter()
            state, metrics, finite = _train_step(run, state, step)
            metrics, finite = jax.device_get((metrics, finite))  # the step's one fetch
            record = _record(config, metrics, time.perf_counter() - began)
            folder.log(step + 1, record)
            _check_finite(config, step + 1, metrics["updates"], finite, store)  # before any save
            bar.set_postfix(kl=f"{record['teacher_kl']:.3f}", len=f"{record['response_length']:.1f}")
            bar.update(1)
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
                run_eval(step + 1)
            saved = (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps
            if saved:
                folder.flush()  # the records up to a checkpoint are in the folder before it (a bucket is not appended)
                store.save(step + 1, _flatten(state))
            if step + 1 < config.steps and stop_signals.agreed(step + 1):
                if not saved:
                    folder.flush()
                    store.save(step + 1, _flatten(state))
                store.wait()
                raise Preempted(step + 1, config.steps, stop_signals.signal_name, str(store.path(step + 1)))
        store.close()
        if start < config.steps:
            run_eval(config.steps)
    finally:
        bar.close()
    return state


def _start_backend(config: TrainConfig, student: Decoder, student_config: DecoderConfig,
                   rollout_fn: Callable[..., Rollout]) -> RolloutBackend:
    """The backend ``config.rollout_backend`` names. An engine in its own process samples single
    turns; a :class:`~opd_jax.rollouts.MultiTurn` ``rollout_fn`` runs its episodes on those turns."""
    if config.rollout_backend == "jax":
        return JaxBackend(nnx.graphdef(student), rollout_fn)
    multi_turn = isinstance(rollout_fn, MultiTurn)
    if rollout_fn is not generate and not multi_turn:
        raise ValueError(f"rollout_backend {config.rollout_backend!r} samples single turns (and the multi-turn "
                         "episodes of an opd_jax.rollouts.MultiTurn rollout_fn); another custom rollout_fn needs "
                         "rollout_backend 'jax'")
    from opd_jax.backends.vllm import VllmBackend

    engine = VllmBackend(student_config, student)
    return MultiTurnBackend(engine, rollout_fn.environment) if multi_turn else engine


def _finite_flags(params, opt_state) -> Array:
    """``[2]`` bool: whether every float of the parameters, and of the optimiser state, is finite."""

    def finite(tree):
        checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
        return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)

    return jnp.stack([finite(params), finite(opt_state)])


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss, gradient norm, parameter or optimiser state.

    Attributes:
      step: the step whose update produced it (nothing of it was checkpointed or exported).
      quantity: ``"loss"``, ``"grad_norm"``, ``"parameters"`` or ``"optimizer state"``.
    """

    def __init__(self, step: int, quantity: str, message: str):
        self.step, self.quantity = step, quantity
        super().__init__(message)


def _check_finite(config: TrainConfig, step: int, updates: list[dict], flags, store: CheckpointStore) -> None:
    found = None
    for name in ("loss", "grad_norm"):
        for index, metrics in enumerate(updates):
            value = float(metrics[name])
            if not math.isfinite(value):
                found = found or (name, f"{name} {value} in update {index + 1} of {len(updates)}")
    flags = np.asarray(flags)
    for name, ok in zip(("parameters", "optimizer state"), flags):
        if not ok:
            found = found or (name, f"{name} (some entries are inf or nan)")
    if found is None:
        return
    quantity, what = found
    saved = store.steps()
    hint = ("log_ratio_clip is off: exp(log-ratio) overflows float32 for divergences whose generator grows "
            "faster than log (alpha, forward_kl, pearson_chi2, ...); set log_ratio_clip (e.g. 20)"
            if config.log_ratio_clip is None else "lower learning_rate or log_ratio_clip")
    raise NonFiniteError(
        step, quantity,
        f"step {step}: non-finite {what}; training stopped before this state was checkpointed or exported "
        f"(newest checkpoint: {f'step {saved[-1]}' if saved else 'none'}); {hint}",
    )
