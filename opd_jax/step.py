"""One distillation step as jitted pure functions: score a rollout, then update on minibatches.

The step's functions are module-level and pure, each taking a frozen :class:`StepSpec` (the
config, the models' graphs, the plug points, the optimizer and the shardings) first, in the style
of nanodo's ``_train_step``; :func:`make_train_step` binds a spec and jits them.

``prepare(params, teacher_params, rollout) -> (ScoredBatch, metrics)`` takes the behaviour and
teacher log-probabilities of the sampled tokens (at the rollout temperature: the tempered policy
is the one trained, see :class:`~opd_jax.config.TrainConfig`), the advantages from an
``advantage_fn``, and, with a full-vocabulary term, its reward-to-go. ``update(params, opt_state,
teacher_params, rows, normalizer) -> (params, opt_state, metrics)`` minimises the ``loss_fn``
surrogate (plus the full-vocabulary term) over one minibatch with optax. A teacher on a mesh of its
own scores with ``score_teacher`` there, and ``prepare_scored`` is ``prepare`` given those log-probs.

The two plug points, with the config's built-ins as defaults:

* ``advantage_fn(student_logp_BxT, teacher_logp_BxT, response_mask_BxT) -> [B, T] or [B]``, float,
  run under jit and held under ``stop_gradient``; with a ``reference`` model (e.g. the initial
  student, for KL-regularised or extrapolated rewards) it is also passed ``reference_logp_BxT=``;
* ``loss_fn(student_logp_BxT, behaviour_logp_BxT, advantages, response_mask_BxT) -> [B]``, the
  per-sequence surrogate (default: the PPO-clipped :func:`~opd_jax.objectives.importance_surrogate`).

The loss of a minibatch is its summed per-sequence loss over a constant of the step (the batch's
response-token count, or its number of sequences for ``sequence_mean``, over the number of
minibatches), so it does not depend on how rows fall into minibatches or devices. Metrics are
computed inside the jitted functions; the loop fetches them once per step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from opd_jax import alignment, chunking, teacher_bytes, topologies
from opd_jax.advantages import broadcast_advantages, leave_one_out_baseline, sequence_advantages, token_advantages
from opd_jax.config import TrainConfig
from opd_jax.objectives import (
    clipped_token_mask,
    full_vocab_divergence_from_hidden,
    full_vocab_reward_to_go,
    importance_surrogate,
)
from opd_jax.sampling import Rollout, token_log_probs_and_hidden
from opd_jax import sharding as sharding_lib
from opd_jax.sharding import BATCH_AXES

Array = jax.Array
PyTree = Any
AdvantageFn = Callable[[Array, Array, Array], Array]
LossFn = Callable[[Array, Array, Array, Array], Array]

__all__ = ["AdvantageFn", "LossFn", "ScoredBatch", "StepShardings", "StepSpec", "TrainStep", "config_advantage_fn",
           "config_loss_fn", "make_optimizer", "make_step_shardings", "make_train_step", "minibatch_loss", "prepare",
           "prepare_scored", "score_teacher", "score_teacher_bytes", "scored_batch", "take_rows", "update"]


def config_advantage_fn(config: TrainConfig) -> AdvantageFn:
    """The advantages ``config`` describes: estimator, level, γ, log-ratio clip and baseline."""
    divergence = config.divergence_fn()

    def advantage_fn(student_logp_BxT: Array, teacher_logp_BxT: Array, response_mask_BxT: Array) -> Array:
        if config.level == "token":
            advantages = token_advantages(
                student_logp_BxT, teacher_logp_BxT, response_mask_BxT, divergence=divergence,
                estimator=config.estimator, gamma=config.gamma, log_ratio_clip=config.log_ratio_clip,
            )
        else:
            advantages = sequence_advantages(
                student_logp_BxT, teacher_logp_BxT, response_mask_BxT, divergence=divergence,
                estimator=config.estimator, log_ratio_clip=config.log_ratio_clip,
            )
        if config.baseline == "leave_one_out":
            advantages = advantages - leave_one_out_baseline(advantages, config.group_size)
            if config.level == "token":
                advantages = jnp.where(response_mask_BxT, advantages, 0.0)
        return advantages

    return advantage_fn


def config_loss_fn(config: TrainConfig) -> LossFn:
    """The PPO-clipped importance surrogate with ``config``'s clips (``clip_epsilon``, ``clip_ratio_c``)."""

    def loss_fn(student_logp_BxT, behaviour_logp_BxT, advantages, response_mask_BxT):
        return importance_surrogate(student_logp_BxT, behaviour_logp_BxT, advantages, response_mask_BxT,
                                    clip_epsilon=config.clip_epsilon, clip_ratio_c=config.clip_ratio_c)

    return loss_fn


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with warm-up and a constant or cosine schedule, after global-norm clipping."""
    updates_per_step = config.epochs * config.minibatches
    total = config.steps * updates_per_step
    warmup = config.warmup_steps * updates_per_step
    if config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(warmup, 1), max(total, warmup + 1))
    else:
        schedule = optax.linear_schedule(0.0, config.learning_rate, warmup) if warmup else config.learning_rate
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(schedule, weight_decay=config.weight_decay),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoredBatch:
    """A rollout with everything an update needs, ``[B, T]`` rows (``T`` = prompt + response slots).

    Attributes:
      tokens_BxT, token_mask_BxT, response_mask_BxT: the rollout's (:class:`~opd_jax.sampling.Rollout`).
      behaviour_logp_BxT: float32 log-probs of the sampled tokens under the sampling policy, as the
        trainer computes them (the PPO ratio's denominator).
      advantages: ``[B, T]`` or ``[B]`` float32, under stop-gradient.
      teacher_hidden_BxTxE: the teacher's final hidden states when the full-vocabulary term is on,
        else ``None``.
    """

    tokens_BxT: Array
    token_mask_BxT: Array
    response_mask_BxT: Array
    behaviour_logp_BxT: Array
    advantages: Array
    teacher_hidden_BxTxE: Array | None


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where the train step's inputs and outputs live on a mesh.

    Attributes:
      params, opt_state, teacher_params: :class:`jax.sharding.NamedSharding` trees matching the
        student parameters, their optimiser state and the teacher parameters.
      reference_params: the reference model's (``None`` without one).
      batch: rows over ``data × fsdp`` (every ``[B, ...]`` array of a rollout).
      replicated: scalars (metrics, normaliser, counters) on every device.
      teacher_batch: rows over the teacher's own mesh, disjoint from the student's (``None``: the
        teacher shares the student's mesh). ``teacher_params`` then lie on that mesh, the teacher
        scores through :attr:`TrainStep.score_teacher` there, and ``update`` takes no teacher.
    """

    params: PyTree
    opt_state: PyTree
    teacher_params: PyTree
    batch: Any
    replicated: Any
    reference_params: PyTree = None
    teacher_batch: Any = None


def make_step_shardings(config: TrainConfig, mesh_config, params, teacher_params, optimizer: optax.GradientTransformation,
                        student_rules=sharding_lib.DEFAULT_RULES, teacher_rules=sharding_lib.DEFAULT_RULES,
                        teacher_mesh_config=None, reference_params=None,
                        devices: Sequence[jax.Device] | None = None) -> StepShardings:
    """Where a step's inputs live: the one layout of :func:`opd_jax.train.train` and :mod:`opd_jax.plan`.

    Shapes only: the parameter trees may be arrays or ``jax.ShapeDtypeStruct``, and nothing is
    placed. The batch must split over the meshes' ``data × fsdp`` axes (the minibatch too) and
    every sharded parameter dimension over its axes; the reference model follows the student's
    rules. With ``teacher_mesh_config`` the student takes the first devices and the teacher the rest
    (:func:`opd_jax.sharding.disjoint_meshes`).

    Args:
      devices: the devices to build the meshes on (default: ``jax.devices()``; the plan passes a
        topology's compile-only devices).

    Raises:
      ValueError: the mesh does not fit the devices, the batch or a parameter (the message names which).
    """
    devices = list(jax.devices() if devices is None else devices)
    batch_size = config.prompts_per_step * config.group_size
    if teacher_mesh_config is None:
        mesh = teacher_mesh = mesh_config.make_mesh(devices)
    else:
        mesh, teacher_mesh = sharding_lib.disjoint_meshes(mesh_config, teacher_mesh_config, devices)
        sharding_lib.check_batch(batch_size, teacher_mesh, what="rollout batch (prompts_per_step × group_size) "
                                                                "on the teacher mesh")
    sharding_lib.check_batch(batch_size, mesh, what="rollout batch (prompts_per_step × group_size)")
    sharding_lib.check_batch(batch_size // config.minibatches, mesh, what="minibatch")
    reference = None
    if reference_params is not None:
        reference = sharding_lib.state_shardings(reference_params, mesh, student_rules, what="reference parameter")
    return StepShardings(
        params=sharding_lib.state_shardings(params, mesh, student_rules, what="student parameter"),
        opt_state=sharding_lib.state_shardings(jax.eval_shape(optimizer.init, params), mesh, student_rules,
                                               what="optimizer state of"),
        teacher_params=sharding_lib.state_shardings(teacher_params, teacher_mesh, teacher_rules,
                                                    what="teacher parameter"),
        batch=sharding_lib.batch_sharding(mesh),
        replicated=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
        reference_params=reference,
        teacher_batch=None if teacher_mesh is mesh else sharding_lib.batch_sharding(teacher_mesh),
    )


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The jitted pieces of one training step (see :func:`make_train_step`).

    Attributes:
      prepare: ``(params, teacher_params, rollout, reference_params, teacher_index_B=None)`` ->
        ``(ScoredBatch, metrics)``; ``reference_params`` is ``None`` without a reference model,
        ``teacher_index_B`` (int ``[B]``) is read with several teachers only (pass ``None``
        otherwise; the sharded step takes all five arguments).
      update: ``(params, opt_state, teacher_params, rows: ScoredBatch, normalizer [])`` for one
        minibatch -> ``(params, opt_state, metrics)``; ``teacher_params`` is read by the
        full-vocabulary term only (pass ``None`` when the teacher has its own mesh).
      take_rows: ``(ScoredBatch, rows [M])`` -> the minibatch of those rows, placed like the batch.
      score_teacher: ``(teacher_params, tokens_BxT, token_mask_BxT, teacher_index_B)`` -> float32
        ``[B, T]``, each row's own teacher's log-probs of its tokens, on the teacher's devices.
      prepare_scored: ``prepare`` with the teacher's log-probs given (``teacher_logp_BxT`` in place
        of ``teacher_params``, placed like the batch): the half of a step that runs on the student's
        mesh when the teacher scores on its own. No full-vocabulary term (it needs the teacher's
        hidden states).
      score_teacher_bytes: ``(teacher_params, tokens_BxN, token_mask_BxN, teacher_index_B, byte_batch,
        rank_V)`` -> float32 ``[B, N·D]``: the teacher's log-prob of every byte slot of its own tokens
        (``alignment_credit = "characters"``, :func:`score_teacher_bytes`).
    """

    prepare: Callable
    update: Callable
    take_rows: Callable
    score_teacher: Callable
    prepare_scored: Callable
    score_teacher_bytes: Callable


def _function_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _checked_advantages(advantage_fn: AdvantageFn, student_logp_BxT, teacher_logp_BxT, response_mask_BxT,
                        **reference) -> Array:
    """``advantage_fn``'s result under stop-gradient, refused at trace time unless ``[B, T]`` / ``[B]`` float."""
    advantages = advantage_fn(student_logp_BxT, teacher_logp_BxT, response_mask_BxT, **reference)
    shape, dtype = tuple(jnp.shape(advantages)), jnp.result_type(advantages)
    batch, length = response_mask_BxT.shape
    if shape not in ((batch, length), (batch,)) or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"advantage_fn {_function_name(advantage_fn)} returned shape {list(shape)} dtype {dtype}; it must return "
            f"floats of shape [B, T] = {[batch, length]} or [B] = {[batch]}"
        )
    return jax.lax.stop_gradient(advantages.astype(jnp.float32))


def _checked_loss(loss_fn: LossFn, logp_BxT, behaviour_logp_BxT, advantages, response_mask_BxT) -> Array:
    """``loss_fn``'s per-sequence surrogate, refused at trace time unless ``[B]`` float."""
    per_sequence = loss_fn(logp_BxT, behaviour_logp_BxT, advantages, response_mask_BxT)
    shape, dtype = tuple(jnp.shape(per_sequence)), jnp.result_type(per_sequence)
    batch = response_mask_BxT.shape[0]
    if shape != (batch,) or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"loss_fn {_function_name(loss_fn)} returned shape {list(shape)} dtype {dtype}; it must return the "
            f"per-sequence surrogate, floats of shape [B] = {[batch]} (inputs: student_logp {list(logp_BxT.shape)}, "
            f"advantages {list(jnp.shape(advantages))})"
        )
    return per_sequence


def _per_token_full_vocab(config: TrainConfig, student_hidden_BxTxD, student_projection, teacher_hidden_BxTxE,
                          teacher_projection, response_mask_BxT, chunk_size: int | None) -> Array:
    """``[B, T]`` ``D_f(q_T ‖ π_T)`` at the state before each response token (slot ``t − 1`` predicts ``t``)."""
    per_token = full_vocab_divergence_from_hidden(
        student_hidden_BxTxD[:, :-1], student_projection, teacher_hidden_BxTxE[:, :-1], teacher_projection,
        response_mask_BxT[:, 1:], divergence=config.full_vocab_divergence_fn(), chunk_size=chunk_size,
        temperature=config.temperature,
    )
    return jnp.pad(per_token, ((0, 0), (1, 0)))


def _masked_mean(values_BxT: Array, mask_BxT: Array) -> Array:
    return jnp.sum(jnp.where(mask_BxT, values_BxT, 0.0)) / jnp.maximum(jnp.sum(mask_BxT), 1)


def _per_teacher_metrics(teacher_names, teacher_index_B, log_ratio_BxT, token_advantage_BxT, mask_BxT) -> dict:
    """KL, mean advantage, response length and row count of the rows each teacher scored."""
    metrics = {}
    for index, name in enumerate(teacher_names):
        rows_B = teacher_index_B == index
        own_BxT = mask_BxT & rows_B[:, None]
        metrics |= {f"teacher_kl/{name}": _masked_mean(log_ratio_BxT, own_BxT),
                    f"advantage_mean/{name}": _masked_mean(token_advantage_BxT, own_BxT),
                    f"response_length/{name}": jnp.sum(own_BxT) / jnp.maximum(jnp.sum(rows_B), 1),
                    f"rows/{name}": jnp.sum(rows_B)}
    return metrics


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the step's pure functions read besides arrays: static under jit (see :func:`make_train_step`).

    Attributes:
      config: the run's configuration.
      graphdef: the student's NNX graph.
      teacher_graphdef: the teacher's graph, or ``{name: graph}`` of several teachers.
      advantage_fn, loss_fn: the plug points (module docstring), already defaulted.
      optimizer: the optax transformation.
      reference_graphdef: a frozen reference model's graph (``None``: none).
      shardings: where the step's arrays live (``None``: one device); ``"auto"`` logit chunks are
        resolved for its batch axes.
    """

    config: TrainConfig
    graphdef: Any
    teacher_graphdef: Any
    advantage_fn: AdvantageFn
    loss_fn: LossFn
    optimizer: optax.GradientTransformation
    reference_graphdef: Any = None
    shardings: StepShardings | None = None

    @property
    def teacher_names(self) -> tuple[str, ...] | None:
        """The teachers' names in routing order (``None``: one teacher)."""
        return tuple(self.teacher_graphdef) if isinstance(self.teacher_graphdef, dict) else None

    @property
    def full_vocab(self) -> bool:
        return self.config.full_vocab_weight > 0


def _chunk_size(spec: StepSpec, tokens_BxT: Array, vocab_size: int) -> int | None:
    """``config.logit_chunk_size``, with ``"auto"`` resolved for this call's sequence length (train
    and plan resolve it before building the step; this serves direct callers)."""
    config = spec.config
    if config.logit_chunk_size != chunking.AUTO:
        return config.logit_chunk_size
    mesh = None if spec.shardings is None else spec.shardings.batch.mesh
    devices = jax.devices()[:1] if mesh is None else list(mesh.devices.flat)
    shards = 1 if mesh is None else math.prod(mesh.shape[axis] for axis in BATCH_AXES)
    return config.with_resolved_chunks(
        vocab_size=vocab_size, sequence_length=tokens_BxT.shape[1], batch_shards=shards,
        device_memory_bytes=topologies.device_memory_bytes(devices)).logit_chunk_size


def _log_probs(spec: StepSpec, graph, params, tokens_BxT: Array, token_mask_BxT: Array):
    """``(logp_BxT, hidden_BxTxD, projection_DxV)`` of one model at the rollout temperature."""
    model = nnx.merge(graph, params)
    projection = model.output_projection()
    logp_BxT, hidden_BxTxD = token_log_probs_and_hidden(
        model, tokens_BxT, token_mask_BxT, temperature=spec.config.temperature,
        chunk_size=_chunk_size(spec, tokens_BxT, projection.shape[-1]),
    )
    return logp_BxT, hidden_BxTxD, projection


def _teacher_log_probs(spec: StepSpec, teacher_params, tokens_BxT, token_mask_BxT, teacher_index_B):
    """Each row's own teacher's log-probs; the hidden states and projection of a single teacher."""
    if spec.teacher_names is None:
        return _log_probs(spec, spec.teacher_graphdef, teacher_params, tokens_BxT, token_mask_BxT)
    logp_BxT = _routed(spec, teacher_params, teacher_index_B,
                       lambda graph, params, _: _log_probs(spec, graph, params, tokens_BxT, token_mask_BxT)[0])
    return logp_BxT, None, None


def _routed(spec: StepSpec, teacher_params, teacher_index_B, score: Callable) -> Array:
    """``score(graph, params, index)`` (``[B, ...]``) of each row's own teacher among several; 0 for
    a row routed to none."""
    routed = None
    for index, name in enumerate(spec.teacher_names):
        own = score(spec.teacher_graphdef[name], teacher_params[name], index)
        routed = jnp.where((teacher_index_B == index)[:, None], own, jnp.zeros_like(own) if routed is None else routed)
    return routed


def score_teacher(spec: StepSpec, teacher_params, tokens_BxT, token_mask_BxT, teacher_index_B=None) -> Array:
    """``[B, T]`` float32: each row's own teacher's log-probs of its tokens."""
    return _teacher_log_probs(spec, teacher_params, tokens_BxT, token_mask_BxT, teacher_index_B)[0]


def score_teacher_bytes(spec: StepSpec, teacher_params, tokens_BxN, token_mask_BxN, teacher_index_B, byte_batch,
                        rank_V) -> Array:
    """``[B, N·D]`` float32: each row's own teacher's log-prob of every byte slot of its tokens
    (:mod:`opd_jax.teacher_bytes`; ``byte_batch`` a :class:`~opd_jax.retokenize.ByteBatch`,
    ``rank_V`` a tuple of each teacher's piece ranks in routing order)."""

    def one_teacher(graph, params, rank):
        model = nnx.merge(graph, params)
        chunk_size = _chunk_size(spec, tokens_BxN, model.output_projection().shape[-1])
        logp_BxN, masses_BxNxD = teacher_bytes.prefix_log_masses(
            model, tokens_BxN, token_mask_BxN, byte_batch.lo_BxNxD, byte_batch.hi_BxNxD, rank,
            temperature=spec.config.temperature, chunk_size=chunk_size)
        return teacher_bytes.byte_log_probs(logp_BxN, masses_BxNxD, byte_batch.slot_mask_BxNxD, byte_batch.depth_BxN,
                                            byte_batch.end_slot_BxN)

    if spec.teacher_names is None:
        return one_teacher(spec.teacher_graphdef, teacher_params, rank_V[0])
    return _routed(spec, teacher_params, teacher_index_B,
                   lambda graph, params, index: one_teacher(graph, params, rank_V[index]))


def prepare(spec: StepSpec, params, teacher_params, rollout: Rollout, reference_params, teacher_index_B=None):
    """``(ScoredBatch, metrics)`` of ``rollout``: the teacher scores it, then :func:`scored_batch`."""
    teacher = _teacher_log_probs(spec, teacher_params, rollout.tokens, rollout.token_mask, teacher_index_B)
    return scored_batch(spec, params, teacher, rollout, reference_params, teacher_index_B)


def prepare_scored(spec: StepSpec, params, teacher_logp_BxT, rollout: Rollout, reference_params,
                   teacher_index_B=None):
    """:func:`prepare` with the teacher's log-probs given (scored on the teacher's own mesh)."""
    return scored_batch(spec, params, (teacher_logp_BxT, None, None), rollout, reference_params, teacher_index_B)


def scored_batch(spec: StepSpec, params, teacher, rollout: Rollout, reference_params, teacher_index_B):
    """The ScoredBatch and metrics from the teacher's ``(logp_BxT, hidden_BxTxE, projection)``; ``logp_BxT``
    may be an :class:`~opd_jax.alignment.AlignedTeacher` (a teacher with another tokenizer), carried onto
    the student's tokens here, where the student's log-probs are known."""
    config = spec.config
    teacher_logp, teacher_hidden, teacher_projection = teacher
    mask_BxT = rollout.response_mask
    behaviour_logp, student_hidden, student_projection = _log_probs(spec, spec.graphdef, params, rollout.tokens,
                                                                    rollout.token_mask)
    if isinstance(teacher_logp, alignment.AlignedTeacher):
        teacher_logp = alignment.carry(teacher_logp, behaviour_logp, mask_BxT)
    reference = {}
    if spec.reference_graphdef is not None:
        reference["reference_logp_BxT"], _, _ = _log_probs(spec, spec.reference_graphdef, reference_params,
                                                           rollout.tokens, rollout.token_mask)
    advantages = _checked_advantages(spec.advantage_fn, behaviour_logp, teacher_logp, mask_BxT, **reference)
    metrics = {}
    if spec.full_vocab:
        divergence_BxT = _per_token_full_vocab(config, student_hidden, student_projection, teacher_hidden,
                                               teacher_projection, mask_BxT,
                                               _chunk_size(spec, rollout.tokens, student_projection.shape[-1]))
        to_go = full_vocab_reward_to_go(config.full_vocab_weight * divergence_BxT, mask_BxT, gamma=config.gamma)
        advantages = broadcast_advantages(advantages, mask_BxT) + to_go
        metrics["full_vocab_divergence"] = _masked_mean(divergence_BxT, mask_BxT)
    token_advantage = broadcast_advantages(advantages, mask_BxT)
    response_tokens = jnp.sum(mask_BxT)
    metrics |= {
        "teacher_kl": _masked_mean(behaviour_logp - teacher_logp, mask_BxT),
        "advantage_mean": _masked_mean(token_advantage, mask_BxT),
        "advantage_abs_max": jnp.max(jnp.abs(advantages)),
        "response_length": response_tokens / mask_BxT.shape[0],
        "response_tokens": response_tokens,
        # The sampler's own log-probs against the trainer's: 0 up to rounding for our sampler;
        # an inference engine's numerics show up here.
        "sampling_logp_gap": _masked_mean(jnp.abs(rollout.sampling_logp - behaviour_logp), mask_BxT),
    }
    if spec.teacher_names is not None:
        metrics |= _per_teacher_metrics(spec.teacher_names, teacher_index_B, behaviour_logp - teacher_logp,
                                        token_advantage, mask_BxT)
    batch = ScoredBatch(rollout.tokens, rollout.token_mask, mask_BxT, behaviour_logp, advantages,
                        jax.lax.stop_gradient(teacher_hidden) if spec.full_vocab else None)
    return batch, metrics


def minibatch_loss(spec: StepSpec, params, teacher_params, rows: ScoredBatch, normalizer):
    """``(loss, aux)``: the minibatch's summed surrogate (plus the full-vocabulary term) over ``normalizer``."""
    config = spec.config
    logp, hidden, projection = _log_probs(spec, spec.graphdef, params, rows.tokens_BxT, rows.token_mask_BxT)
    mask_BxT = rows.response_mask_BxT
    per_sequence = _checked_loss(spec.loss_fn, logp, rows.behaviour_logp_BxT, rows.advantages, mask_BxT)
    if spec.full_vocab:
        teacher_projection = nnx.merge(spec.teacher_graphdef, teacher_params).output_projection()
        divergence_BxT = _per_token_full_vocab(config, hidden, projection, rows.teacher_hidden_BxTxE,
                                               teacher_projection, mask_BxT,
                                               _chunk_size(spec, rows.tokens_BxT, projection.shape[-1]))
        per_sequence = per_sequence + config.full_vocab_weight * jnp.sum(divergence_BxT, axis=-1)
    if config.loss_aggregation == "sequence_mean":
        per_sequence = per_sequence / jnp.maximum(jnp.sum(mask_BxT, axis=-1), 1)
    clipped = clipped_token_mask(logp, rows.behaviour_logp_BxT, rows.advantages, mask_BxT,
                                 clip_epsilon=config.clip_epsilon, clip_ratio_c=config.clip_ratio_c)
    log_ratio = jnp.where(mask_BxT, logp - rows.behaviour_logp_BxT, 0.0)
    aux = {"clipped_tokens": jnp.sum(clipped), "log_ratio_abs_max": jnp.max(jnp.abs(log_ratio))}
    return jnp.sum(per_sequence) / normalizer, aux


def update(spec: StepSpec, params, opt_state, teacher_params, rows: ScoredBatch, normalizer):
    """One optax update on a minibatch: ``(params, opt_state, metrics)``."""
    (loss, aux), grads = jax.value_and_grad(minibatch_loss, argnums=1, has_aux=True)(
        spec, params, teacher_params, rows, normalizer)
    updates, opt_state = spec.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}


def take_rows(batch: ScoredBatch, rows) -> ScoredBatch:
    """The minibatch of ``rows`` (int ``[M]``) of ``batch``."""
    return jax.tree.map(lambda a: a[rows], batch)


def make_train_step(
    config: TrainConfig,
    graphdef,
    teacher_graphdef,
    optimizer: optax.GradientTransformation,
    shardings: StepShardings | None = None,
    *,
    advantage_fn: AdvantageFn | None = None,
    loss_fn: LossFn | None = None,
    reference_graphdef=None,
    donate_state: bool = True,
) -> TrainStep:
    """Jit the step's pure functions (:func:`prepare`, :func:`update`, ...) over one :class:`StepSpec`.

    Args:
      config: the run's configuration.
      graphdef, teacher_graphdef: the models' NNX graphs (parameters are passed as arrays). Several
        teachers: ``teacher_graphdef`` is a ``{name: graphdef}`` dict, ``teacher_params`` the same
        dict of parameters, and ``prepare`` routes each row to ``teacher_index_B`` (an index into
        the dict's order): every teacher scores the batch once and a row keeps its own teacher's
        log-probs. ``prepare`` then also reports ``teacher_kl/NAME``, ``advantage_mean/NAME``,
        ``response_length/NAME`` and ``rows/NAME``.
      optimizer: the optax transformation (:func:`make_optimizer`).
      shardings: without them, plain ``jax.jit`` on the default device. With them, every input and
        output has an explicit sharding and ``update`` donates the parameters and optimiser state,
        so a step holds one copy of each (unless ``donate_state`` is false: pipelined rollouts still
        read the parameters a step started from).
      advantage_fn, loss_fn: the plug points (module docstring); ``None``: :func:`config_advantage_fn`,
        :func:`config_loss_fn`. A wrong shape or dtype is a ``ValueError`` at trace time, before any update.
      reference_graphdef: the graph of a frozen reference model; ``prepare`` then takes its
        parameters as ``reference_params`` and passes its log-probs to ``advantage_fn``.
    """
    if reference_graphdef is not None and advantage_fn is None:
        raise ValueError("a reference model is read only by an advantage_fn (reference_logp_BxT=); pass one")
    spec = StepSpec(config, graphdef, teacher_graphdef,
                    config_advantage_fn(config) if advantage_fn is None else advantage_fn,
                    config_loss_fn(config) if loss_fn is None else loss_fn, optimizer, reference_graphdef, shardings)
    if spec.teacher_names is not None and spec.full_vocab:
        raise ValueError("full_vocab_weight > 0 takes one teacher (its hidden states are kept for the update); "
                         f"got {len(spec.teacher_names)}: {', '.join(spec.teacher_names)}")
    # jit names a partial's program after its function (jit_prepare, ...), as before.
    bound = {fn.__name__: functools.partial(fn, spec)
             for fn in (prepare, update, score_teacher, prepare_scored, score_teacher_bytes)}
    if shardings is None:
        # Row selection stays eager here, as it always was on one device.
        return TrainStep(jax.jit(bound["prepare"]), jax.jit(bound["update"]), take_rows,
                         jax.jit(bound["score_teacher"]), jax.jit(bound["prepare_scored"]),
                         jax.jit(bound["score_teacher_bytes"]))
    return _sharded_step(spec, bound, shardings, donate_state)


def _sharded_step(spec: StepSpec, bound: dict[str, Callable], shardings: StepShardings,
                  donate_state: bool) -> TrainStep:
    """The step's functions jitted with explicit in / out shardings and donation."""
    batch, replicated = shardings.batch, shardings.replicated
    own_mesh = shardings.teacher_batch is not None
    if own_mesh and spec.full_vocab:
        raise ValueError("full_vocab_weight > 0 needs the teacher's hidden states in the update, on the student's "
                         "devices; a teacher on its own mesh (teacher_mesh) sends log-probs only: drop one of the two")
    teacher_batch = shardings.teacher_batch if own_mesh else batch
    update_teacher = None if own_mesh else shardings.teacher_params
    # The rollout is donated: its tokens and masks become the ScoredBatch's without a copy. With
    # explicit shardings every argument is passed, teacher_index_B too (None for one teacher).
    return TrainStep(
        prepare=jax.jit(bound["prepare"], in_shardings=(shardings.params, shardings.teacher_params, batch,
                                                        shardings.reference_params, batch),
                        out_shardings=(batch, replicated), donate_argnums=(2,)),
        update=jax.jit(
            bound["update"],
            in_shardings=(shardings.params, shardings.opt_state, update_teacher, batch, replicated),
            out_shardings=(shardings.params, shardings.opt_state, replicated),
            donate_argnums=(0, 1) if donate_state else (),
        ),
        # A gather of rows from a sharded batch, re-split over data × fsdp for the update.
        take_rows=jax.jit(take_rows, out_shardings=batch),
        score_teacher=jax.jit(bound["score_teacher"], in_shardings=(shardings.teacher_params,) + (teacher_batch,) * 3,
                              out_shardings=teacher_batch),
        prepare_scored=jax.jit(bound["prepare_scored"], in_shardings=(shardings.params, batch, batch,
                                                                      shardings.reference_params, batch),
                               out_shardings=(batch, replicated), donate_argnums=(2,)),
        # Host arrays of one process (tokenizer_alignment 'text'): placed by propagation from the teacher's.
        score_teacher_bytes=jax.jit(bound["score_teacher_bytes"]),
    )
