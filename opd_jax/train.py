"""The on-policy distillation loop.

One step: prompts → ``group_size`` student rollouts per prompt (KV-cache sampler) → student and
teacher log-probabilities of the sampled tokens → advantages (divergence, estimator, level, γ, clip,
baseline) → PPO-style clipped importance-ratio surrogate over ``epochs × minibatches`` optax updates
→ metrics → checkpoint.

Every random choice is derived from ``(seed, step)`` and the prompt order from ``(seed, epoch)``, and
the state saved at a checkpoint is everything the loop carries (parameters, optimiser state, step,
PRNG key, data position), so a run that is killed and resumed ends with bitwise the same parameters
as one that never stopped.

The loss of a minibatch is its summed surrogate divided by the response-token count of the whole
batch over the number of minibatches: a constant per step, so it does not depend on how tokens fall
into minibatches or devices.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from opd_jax import divergences as divergences_lib
from opd_jax import sharding as sharding_lib
from opd_jax.advantages import ESTIMATORS, leave_one_out_baseline, sequence_advantages, token_advantages
from opd_jax.checkpoint import CheckpointStore
from opd_jax.metrics import MetricsLog, plot_curves, read_jsonl
from opd_jax.models import Decoder, save_pretrained
from opd_jax.models.config import DecoderConfig
from opd_jax.objectives import clipped_token_mask, importance_surrogate
from opd_jax.preemption import Preempted, StopSignals
from opd_jax.sampling import Rollout, SamplingConfig, generate, token_log_probs

Array = jax.Array
PyTree = Any

__all__ = [
    "RESUME_FREE", "NonFiniteError", "Preempted", "PromptSet", "StepShardings", "TrainConfig", "TrainResult",
    "TrainStep", "make_train_step", "train",
]

LEVELS = ("token", "sequence")
BASELINES = ("none", "leave_one_out")
SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a distillation run (saved as ``config.json`` in the output folder).

    Objective: ``divergence`` (+ ``beta`` / ``alpha`` for the parametrised ones), ``estimator``
    (``stop_grad`` | ``opd_plus``), ``level`` (``token`` | ``sequence``), ``gamma`` in [0, 1],
    ``log_ratio_clip`` (> 0 or ``None``), ``baseline`` (``none`` | ``leave_one_out`` over the group).

    Rollouts: ``prompts_per_step`` × ``group_size`` samples of up to ``max_new_tokens`` at
    ``temperature``.

    Update: AdamW at ``learning_rate`` with ``warmup_steps`` and a ``constant`` or ``cosine``
    schedule, ``weight_decay``, global-norm clipping at ``grad_clip_norm``, ``epochs`` passes over
    ``minibatches`` minibatches, PPO clip ``clip_epsilon``.

    Loop: ``steps``, ``seed``, ``eval_every`` (0: only before and after), ``checkpoint_every``,
    ``keep_checkpoints``, ``logit_chunk_size`` (tokens per vocabulary-projection chunk).

    Every float must be finite. ``learning_rate`` lies in (0, 1] (AdamW moves each parameter by
    about the learning rate per update, so a larger one cannot train) and ``learning_rate ×
    weight_decay`` below 1 (each update multiplies the parameters by ``1 − learning_rate ×
    weight_decay``).

    A run folder may be resumed with other values of :data:`RESUME_FREE` fields only (``steps``
    too, to extend a finished run, unless the schedule is ``cosine``, whose shape depends on it).
    """

    divergence: str = "reverse_kl"
    beta: float | None = None
    alpha: float | None = None
    estimator: str = "opd_plus"
    level: str = "token"
    gamma: float = 0.0
    log_ratio_clip: float | None = 20.0
    baseline: str = "none"
    prompts_per_step: int = 16
    group_size: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    epochs: int = 1
    minibatches: int = 1
    clip_epsilon: float = 0.2
    steps: int = 100
    seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 25
    keep_checkpoints: int = 3
    logit_chunk_size: int | None = None

    def __post_init__(self):
        self.divergence_fn()  # validates name, beta, alpha
        _choice("estimator", self.estimator, ESTIMATORS)
        _choice("level", self.level, LEVELS)
        _choice("baseline", self.baseline, BASELINES)
        _choice("schedule", self.schedule, SCHEDULES)
        _range("gamma", self.gamma, 0.0, 1.0)
        if self.log_ratio_clip is not None:
            _range("log_ratio_clip", self.log_ratio_clip, 0.0, None, open_low=True)
        _range("temperature", self.temperature, 0.0, None, open_low=True)
        _range("learning_rate", self.learning_rate, 0.0, 1.0, open_low=True)
        _range("weight_decay", self.weight_decay, 0.0, None)
        if self.learning_rate * self.weight_decay >= 1:
            raise ValueError(
                f"learning_rate × weight_decay must be below 1 (each update multiplies the parameters by "
                f"1 − learning_rate × weight_decay); got {self.learning_rate} × {self.weight_decay}"
            )
        _range("grad_clip_norm", self.grad_clip_norm, 0.0, None, open_low=True)
        _range("clip_epsilon", self.clip_epsilon, 0.0, 1.0, open_low=True, open_high=True)
        for name in ("prompts_per_step", "group_size", "max_new_tokens", "epochs", "minibatches", "steps",
                     "checkpoint_every", "keep_checkpoints"):
            _range(name, getattr(self, name), 1, None)
        for name in ("warmup_steps", "eval_every", "seed"):
            _range(name, getattr(self, name), 0, None)
        if self.logit_chunk_size is not None:
            _range("logit_chunk_size", self.logit_chunk_size, 1, None)
        if self.baseline == "leave_one_out" and self.group_size < 2:
            raise ValueError("baseline 'leave_one_out' needs group_size >= 2")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError(
                f"minibatches ({self.minibatches}) must divide prompts_per_step × group_size "
                f"({self.prompts_per_step * self.group_size})"
            )

    def divergence_fn(self) -> divergences_lib.Divergence:
        params = {k: v for k, v in (("beta", self.beta), ("alpha", self.alpha)) if v is not None}
        for name, value in params.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number; got {value!r}")
        return divergences_lib.get(self.divergence, **params)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """From a mapping; unknown keys raise a ``ValueError`` listing the valid ones."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; valid: {sorted(fields)}")
        return cls(**values)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _range(name, value, low, high, *, open_low=False, open_high=False) -> None:
    ok = value is not None and (value > low if open_low else value >= low)
    # inf passes an open upper bound and nan fails every comparison: both are named "finite" here.
    finite = not isinstance(value, float) or math.isfinite(value)
    ok = ok and finite
    if high is not None:
        ok = ok and (value < high if open_high else value <= high)
    if not ok:
        bounds = f"{'(' if open_low else '['}{low}, {'∞)' if high is None else str(high) + (')' if open_high else ']')}"
        raise ValueError(f"{name} must lie in {bounds}{'' if finite else ' and be finite'}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Tokenised prompts: ``tokens`` / ``mask`` ``[N, P]`` (left-padded), read in a seeded order.

    The order is a fresh permutation of all ``N`` prompts per epoch, from ``(seed, epoch)``, so the
    batch at any data position can be recomputed after a restart.
    """

    tokens: np.ndarray
    mask: np.ndarray

    def __post_init__(self):
        if self.tokens.ndim != 2 or self.tokens.shape != self.mask.shape or len(self.tokens) == 0:
            raise ValueError(
                f"prompt tokens {list(self.tokens.shape)} and mask {list(self.mask.shape)} must be the same non-empty [N, P]"
            )

    def batch(self, position: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        count = len(self.tokens)
        indices = []
        for i in range(position, position + size):
            epoch, offset = divmod(i, count)
            indices.append(np.random.default_rng([seed, epoch]).permutation(count)[offset])
        return self.tokens[indices], self.mask[indices]


@dataclasses.dataclass
class TrainResult:
    student: Decoder
    history: list[dict]
    output_dir: pathlib.Path


def _make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
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


def _advantages(config: TrainConfig, student_logp, teacher_logp, response_mask):
    divergence = config.divergence_fn()
    if config.level == "token":
        advantages = token_advantages(
            student_logp, teacher_logp, response_mask, divergence=divergence, estimator=config.estimator,
            gamma=config.gamma, log_ratio_clip=config.log_ratio_clip,
        )
    else:
        advantages = sequence_advantages(
            student_logp, teacher_logp, response_mask, divergence=divergence, estimator=config.estimator,
            log_ratio_clip=config.log_ratio_clip,
        )
    if config.baseline == "leave_one_out":
        advantages = advantages - leave_one_out_baseline(advantages, config.group_size)
        if config.level == "token":
            advantages = jnp.where(response_mask, advantages, 0.0)
    return advantages


def _flatten(tree: PyTree) -> tuple[dict[str, Array], Any]:
    """A flat ``{path: array}`` dict (what orbax stores) and the treedef to rebuild the tree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}, treedef


def _sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-process run (nothing to do in a single one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class _NoLog:
    """The metrics log of processes other than 0: they compute every metric but write none."""

    def __init__(self, directory: pathlib.Path):
        self.path = pathlib.Path(directory) / "metrics.jsonl"

    def write(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


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


def _sharded_sampler(graphdef, shardings: StepShardings, sampling_config: SamplingConfig) -> Callable[..., Rollout]:
    """:func:`generate` compiled with explicit shardings: parameters by the rules, prompts and rollout by rows.

    Returns a function with ``rollout_fn``'s signature (the model's graph must be ``graphdef``).
    """
    batch = shardings.batch

    @functools.partial(jax.jit, in_shardings=(shardings.params, batch, batch, shardings.replicated),
                       out_shardings=batch)
    def sample(params, prompt_tokens, prompt_mask, key):
        return generate(nnx.merge(graphdef, params), prompt_tokens, prompt_mask, key, sampling_config)

    def rollout_fn(model, prompt_tokens, prompt_mask, key, config):
        assert config == sampling_config, "the sharded sampler was built for another SamplingConfig"
        return sample(nnx.state(model), prompt_tokens, prompt_mask, key)

    return rollout_fn


def _place_on_mesh(config, mesh_config, state, teacher_params, optimizer, student_rules, teacher_rules):
    """Check the mesh against devices, parameters and batch, then place state and teacher on it.

    All checks run on shapes only, before any compilation or transfer.

    Returns:
      ``(StepShardings, state, teacher_params)`` with the state's parameters and optimiser state
      split by the rules and its counters and key replicated.
    """
    batch_size = config.prompts_per_step * config.group_size
    mesh = mesh_config.make_mesh()
    sharding_lib.check_batch(batch_size, mesh, what="rollout batch (prompts_per_step × group_size)")
    sharding_lib.check_batch(batch_size // config.minibatches, mesh, what="minibatch")
    param_shardings = sharding_lib.state_shardings(state["params"], mesh, student_rules, what="student parameter")
    teacher_shardings = sharding_lib.state_shardings(teacher_params, mesh, teacher_rules, what="teacher parameter")
    opt_shardings = sharding_lib.state_shardings(
        jax.eval_shape(optimizer.init, state["params"]), mesh, student_rules, what="optimizer state of"
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = StepShardings(param_shardings, opt_shardings, teacher_shardings,
                              sharding_lib.batch_sharding(mesh), replicated)
    params, _ = sharding_lib.shard_state(state["params"], mesh, student_rules, what="student parameter")
    teacher_params, _ = sharding_lib.shard_state(teacher_params, mesh, teacher_rules, what="teacher parameter")
    placed = {
        "params": params,
        # Initialised in place: the AdamW moments are never whole on one device.
        "opt_state": jax.jit(optimizer.init, out_shardings=opt_shardings)(params),
        **{k: jax.device_put(state[k], replicated) for k in ("step", "key", "data_position")},
    }
    return shardings, placed, teacher_params


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where the train step's inputs and outputs live on a mesh.

    Attributes:
      params, opt_state, teacher_params: :class:`jax.sharding.NamedSharding` trees matching the
        student parameters, their optimiser state and the teacher parameters.
      batch: rows over ``data × fsdp`` (every ``[B, ...]`` array of a rollout).
      replicated: scalars (loss, normaliser, counters) on every device.
    """

    params: PyTree
    opt_state: PyTree
    teacher_params: PyTree
    batch: Any
    replicated: Any


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The jitted pieces of one training step (see :func:`make_train_step`).

    Attributes:
      prepare: ``(params, teacher_params, tokens, token_mask, response_mask)`` with ``[B, L]``
        arrays -> ``(old_logp [B, L], teacher_logp [B, L], advantages [B, L] or [B])``.
      update: ``(params, opt_state, tokens, token_mask, response_mask, old_logp, advantages,
        normalizer [])`` for one minibatch ``[M, L]`` -> ``(params, opt_state, loss [], grad_norm [],
        clipped_tokens [])``.
      take_rows: ``(arrays, rows [M])`` -> the ``rows`` of every ``[B, ...]`` array in the tuple
        ``arrays`` (a minibatch), placed like the batch.
    """

    prepare: Callable
    update: Callable
    take_rows: Callable


def make_train_step(
    config: TrainConfig,
    graphdef,
    teacher_graphdef,
    optimizer: optax.GradientTransformation,
    shardings: StepShardings | None = None,
) -> TrainStep:
    """Build the jitted prepare / update functions of a step, pure in their array arguments.

    Without ``shardings`` they are plain ``jax.jit`` on the default device (the single-device
    path). With them, every input and output has an explicit sharding and ``update`` donates the
    parameters and optimiser state, whose buffers it replaces, so a step holds one copy of each.
    """

    def prepare(params, teacher_params, tokens, token_mask, response_mask):
        """Behaviour (old) log-probs, teacher log-probs and advantages of one rollout batch."""
        student_model = nnx.merge(graphdef, params)
        teacher_model = nnx.merge(teacher_graphdef, teacher_params)
        old_logp = token_log_probs(student_model, tokens, token_mask, chunk_size=config.logit_chunk_size)
        teacher_logp = token_log_probs(teacher_model, tokens, token_mask, chunk_size=config.logit_chunk_size)
        advantages = _advantages(config, old_logp, teacher_logp, response_mask)
        return old_logp, teacher_logp, advantages

    def loss_fn(params, tokens, token_mask, response_mask, old_logp, advantages, normalizer):
        logp = token_log_probs(nnx.merge(graphdef, params), tokens, token_mask, chunk_size=config.logit_chunk_size)
        per_sequence = importance_surrogate(logp, old_logp, advantages, response_mask, clip_epsilon=config.clip_epsilon)
        clipped = clipped_token_mask(logp, old_logp, advantages, response_mask, clip_epsilon=config.clip_epsilon)
        return jnp.sum(per_sequence) / normalizer, jnp.sum(clipped)

    def update(params, opt_state, tokens, token_mask, response_mask, old_logp, advantages, normalizer):
        (loss, clipped), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, tokens, token_mask, response_mask, old_logp, advantages, normalizer
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads), clipped

    def take_rows(arrays, rows):
        return tuple(a[rows] for a in arrays)

    if shardings is None:
        # Row selection stays eager here, as it always was on one device.
        return TrainStep(jax.jit(prepare), jax.jit(update), take_rows)
    batch, replicated = shardings.batch, shardings.replicated
    return TrainStep(
        prepare=jax.jit(
            prepare,
            in_shardings=(shardings.params, shardings.teacher_params, batch, batch, batch),
            out_shardings=(batch, batch, batch),
        ),
        update=jax.jit(
            update,
            in_shardings=(shardings.params, shardings.opt_state, batch, batch, batch, batch, batch, replicated),
            out_shardings=(shardings.params, shardings.opt_state, replicated, replicated, replicated),
            donate_argnums=(0, 1),
        ),
        # A gather of rows from a sharded batch, re-split over data × fsdp for the update.
        take_rows=jax.jit(take_rows, out_shardings=batch),
    )


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
    progress: bool = True,
    label: str = "",
    mesh: sharding_lib.MeshConfig | None = None,
    student_rules: sharding_lib.PartitionRules = sharding_lib.DEFAULT_RULES,
    teacher_rules: sharding_lib.PartitionRules = sharding_lib.DEFAULT_RULES,
    export_dtype: Any = None,
) -> TrainResult:
    """Distil ``teacher`` into ``student`` on the student's own rollouts.

    Resumes from the newest good checkpoint in ``output_dir/checkpoints`` when there is one (the
    saved ``config.json`` must then match ``config`` except in :data:`RESUME_FREE` fields, so a
    finished run can be extended with more ``steps``); damaged checkpoints on the way are
    quarantined (see :mod:`opd_jax.checkpoint`), and ``metrics.jsonl`` / TensorBoard continue from
    the restored step. SIGTERM and SIGINT finish the current step, commit it and raise
    :class:`Preempted` (see :mod:`opd_jax.preemption`); a second one exits at once.

    Args:
      config: the run's :class:`TrainConfig`.
      student: the student decoder (its parameters are the starting point).
      student_config: its :class:`DecoderConfig` (for the export).
      teacher: the frozen teacher; it must share the student's vocabulary.
      prompts: the prompt set.
      output_dir: receives ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``,
        ``curves.png`` and the exported student in ``student/``.
      stop_ids, pad_id: sampling stop tokens and padding id.
      evaluate: optional ``model -> {metric: value}``, run before training, every ``eval_every``
        steps and at the end; its values are logged with an ``eval_`` prefix.
      rollout_fn: ``(student, prompt_tokens, prompt_mask, key, sampling_config) -> Rollout``; the
        default samples one response per prompt. Multi-turn tasks pass their own: tokens inserted
        by the environment (tool outputs) stay in ``token_mask`` as context for both models but
        out of ``response_mask``, so they get no advantage and no gradient.
      progress: show a progress bar.
      label: shown in the progress bar.
      mesh: shard the run over a ``data × fsdp × tensor`` device mesh (all devices of all
        processes; see :mod:`opd_jax.sharding`). ``None``: the single-device path. In a
        multi-process run every process calls ``train`` with the same arguments; process 0 alone
        writes metrics, config, curves and the export, and orbax writes checkpoints together.
      student_rules, teacher_rules: partition rules of the two models under ``mesh``.
      export_dtype: dtype of the exported student's tensors (default: its parameters' dtype).

    Returns:
      :class:`TrainResult` with the trained student and the metric records (in a multi-process
      run the student's weights are whole host arrays on every process, and every process reads
      the records that process 0 wrote).

    Raises:
      ValueError: teacher and student vocabularies differ, ``output_dir`` holds a run with a
        different configuration (in a :data:`RESUME_FREE`-excluded field; nothing there is
        modified) or one already past ``config.steps``, or ``mesh`` does not fit the devices, a
        parameter or the batch (raised before anything is compiled).
      Preempted: SIGTERM / SIGINT (or a preemption notice on any process) arrived; the state of
        the step reached is committed, and calling ``train`` again resumes it.
      NonFiniteError: a loss, gradient norm, parameter or optimiser state became non-finite; the
        state of that step is neither checkpointed nor exported.
    """
    from tqdm import tqdm

    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(
            f"teacher vocab_size {teacher.config.vocab_size} != student vocab_size {student.config.vocab_size}"
        )
    output_dir = pathlib.Path(output_dir)
    config_path = output_dir / "config.json"
    _check_resumable(output_dir, config)

    graphdef, params = nnx.split(student)
    teacher_graphdef, teacher_params = nnx.split(teacher)
    optimizer = _make_optimizer(config)
    state = {
        "params": params,
        "opt_state": None,
        "step": jnp.zeros((), jnp.int32),
        "key": jax.random.key_data(jax.random.key(config.seed)),
        "data_position": jnp.zeros((), jnp.int32),
    }
    step_shardings = None
    if mesh is None:
        state["opt_state"] = optimizer.init(params)
    else:
        step_shardings, state, teacher_params = _place_on_mesh(
            config, mesh, state, teacher_params, optimizer, student_rules, teacher_rules
        )
    flat_state, treedef = _flatten(state)
    store = CheckpointStore(output_dir / "checkpoints", keep=config.keep_checkpoints)
    restored = store.restore_latest(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), flat_state)
    )
    resume_step = None
    if restored is not None:
        resume_step, flat_state = restored
        if resume_step > config.steps:
            store.close()
            raise ValueError(f"{output_dir} holds a checkpoint of step {resume_step}, past steps = {config.steps}; "
                             f"set steps >= {resume_step} to continue it, or choose another output directory")
        state = jax.tree_util.tree_unflatten(treedef, [flat_state[k] for k in _flatten(state)[0]])
        if jax.process_index() == 0:
            print(f"resuming from step {resume_step} of {config.steps} (checkpoint {store.path(resume_step)})",
                  file=sys.stderr, flush=True)
    # Every process has read the old config before process 0 overwrites it (with new steps etc.).
    _sync_processes("opd_jax_config_checked")
    if jax.process_index() == 0:
        config_path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    log = MetricsLog(output_dir, resume_step=resume_step) if jax.process_index() == 0 else _NoLog(output_dir)

    sampling_config = SamplingConfig(
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, stop_ids=tuple(stop_ids), pad_id=pad_id
    )
    batch_size = config.prompts_per_step * config.group_size
    minibatch = batch_size // config.minibatches

    train_step = make_train_step(config, graphdef, teacher_graphdef, optimizer, step_shardings)
    prepare, update = train_step.prepare, train_step.update
    if step_shardings is not None and rollout_fn is generate:
        rollout_fn = _sharded_sampler(graphdef, step_shardings, sampling_config)
    finite_flags = jax.jit(_finite_flags, out_shardings=None if step_shardings is None else step_shardings.replicated)

    def run_eval(step: int, params) -> None:
        if evaluate is not None:
            log.write(step, {f"eval_{k}": v for k, v in evaluate(nnx.merge(graphdef, params)).items()})

    start = int(state["step"])
    bar = tqdm(total=config.steps, initial=start, desc=label or "distil", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)
    # From here on every exit waits for the started saves and closes the logs: a signal only sets a
    # flag, and errors pass through the finally.
    with StopSignals() as stop_signals:
        try:
            if start == 0:
                run_eval(0, state["params"])
            for step in range(start, config.steps):
                began = time.perf_counter()
                step_key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), step)
                sample_key, shuffle_key = jax.random.split(step_key)
                prompt_tokens, prompt_mask = prompts.batch(int(state["data_position"]), config.prompts_per_step,
                                                           config.seed)
                prompt_tokens = np.repeat(prompt_tokens, config.group_size, axis=0)
                prompt_mask = np.repeat(prompt_mask, config.group_size, axis=0)
                if step_shardings is not None:
                    prompt_tokens = _global_batch(prompt_tokens, step_shardings.batch)
                    prompt_mask = _global_batch(prompt_mask, step_shardings.batch)
                rollout = rollout_fn(nnx.merge(graphdef, state["params"]), prompt_tokens, prompt_mask, sample_key,
                                     sampling_config)
                if step_shardings is not None:
                    # The sampler's outputs are placed by XLA's propagation; the step's inputs are explicit.
                    rollout = jax.device_put(rollout, step_shardings.batch)
                old_logp, teacher_logp, advantages = prepare(
                    state["params"], teacher_params, rollout.tokens, rollout.token_mask, rollout.response_mask
                )
                response_tokens = jnp.sum(rollout.response_mask)
                normalizer = jnp.maximum(response_tokens, 1).astype(jnp.float32) / config.minibatches
                params, opt_state = state["params"], state["opt_state"]
                losses, grad_norms, clipped_total = [], [], 0.0
                for epoch in range(config.epochs):
                    order = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), batch_size)
                    for start_row in range(0, batch_size, minibatch):
                        rows = order[start_row : start_row + minibatch]
                        params, opt_state, loss, grad_norm, clipped = update(
                            params, opt_state,
                            *train_step.take_rows(
                                (rollout.tokens, rollout.token_mask, rollout.response_mask, old_logp, advantages),
                                rows,
                            ),
                            normalizer,
                        )
                        losses.append(loss)
                        grad_norms.append(grad_norm)
                        clipped_total += clipped
                state = {
                    "params": params,
                    "opt_state": opt_state,
                    "step": jnp.asarray(step + 1, jnp.int32),
                    "key": state["key"],
                    "data_position": state["data_position"] + config.prompts_per_step,
                }
                if step_shardings is not None:  # a multi-process orbax save takes only global arrays
                    state["step"] = _global_batch(np.asarray(step + 1, np.int32), step_shardings.replicated)
                mask = rollout.response_mask
                count = jnp.maximum(response_tokens, 1)
                token_advantage = jnp.broadcast_to(advantages if advantages.ndim == 2 else advantages[:, None],
                                                   mask.shape)
                elapsed = time.perf_counter() - began
                record = {
                    "loss": float(np.mean(losses)),
                    "grad_norm": float(np.mean(grad_norms)),
                    "clip_fraction": float(clipped_total) / (config.epochs * float(count)),
                    "teacher_kl": float(jnp.sum(jnp.where(mask, old_logp - teacher_logp, 0.0)) / count),
                    "advantage_mean": float(jnp.sum(jnp.where(mask, token_advantage, 0.0)) / count),
                    "advantage_abs_max": float(jnp.max(jnp.abs(advantages))),
                    "response_length": float(response_tokens) / batch_size,
                    "tokens_per_second": float(response_tokens) / elapsed,
                    "step_seconds": elapsed,
                }
                log.write(step + 1, record)
                # Before anything can checkpoint, evaluate or export this state.
                _check_finite(config, step + 1, losses, grad_norms,
                              finite_flags(params, opt_state), store)
                bar.set_postfix(kl=f"{record['teacher_kl']:.3f}", len=f"{record['response_length']:.1f}")
                bar.update(1)
                if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
                    run_eval(step + 1, state["params"])
                saved = (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps
                if saved:
                    store.save(step + 1, _flatten(state)[0])
                if step + 1 < config.steps and stop_signals.agreed(step + 1):
                    if not saved:
                        store.save(step + 1, _flatten(state)[0])
                    store.wait()
                    raise Preempted(step + 1, config.steps, stop_signals.signal_name, str(store.path(step + 1)))
            bar.close()
            store.close()
            if start < config.steps:
                run_eval(config.steps, state["params"])
        finally:
            bar.close()
            store.close()
            log.close()
        final_student = nnx.merge(graphdef, _addressable(state["params"]))
        if jax.process_index() == 0:
            save_pretrained(final_student, student_config, output_dir / "student", dtype=export_dtype)
        _sync_processes("opd_jax_exported")
    history = read_jsonl(log.path)
    if jax.process_index() != 0:
        return TrainResult(final_student, history, output_dir)
    plot_curves(
        {label or "run": history},
        [k for k in ("teacher_kl", "eval_accuracy", "response_length", "loss", "grad_norm", "clip_fraction")
         if any(k in r for r in history)],
        output_dir / "curves.png",
        title=label or None,
    )
    return TrainResult(final_student, history, output_dir)


# Options that change only when or how often something happens, or how fast, not the trajectory of
# the state: a run may be resumed with other values (steps: unless the schedule is cosine).
RESUME_FREE = ("steps", "eval_every", "checkpoint_every", "keep_checkpoints", "logit_chunk_size")


def _check_resumable(output_dir: pathlib.Path, config: TrainConfig) -> None:
    """Refuse a run folder whose checkpoints were made under options this run would change.

    Only fields a resume depends on count, and only when there is a checkpoint to resume from:
    a run that failed before its first checkpoint may be re-run with any fix. Reads only.
    """
    config_path = output_dir / "config.json"
    checkpoints = output_dir / "checkpoints"
    has_checkpoints = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    if not config_path.is_file() or not has_checkpoints:
        return
    previous = json.loads(config_path.read_text())
    free = set(RESUME_FREE) - ({"steps"} if config.schedule == "cosine" else set())
    current = config.to_dict()
    changed = sorted(k for k in current if k not in free and previous.get(k) != current[k])
    if changed:
        raise ValueError(
            f"{output_dir} holds a run with a different configuration (differs in {changed}); choose another "
            f"output directory (a resume may change only {', '.join(sorted(free))})"
        )


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


def _check_finite(config: TrainConfig, step: int, losses, grad_norms, flags, store: CheckpointStore) -> None:
    updates = len(losses)
    found = None
    for name, values in (("loss", losses), ("grad_norm", grad_norms)):
        for index, value in enumerate(values):
            value = float(value)
            if not math.isfinite(value):
                found = found or (name, f"{name} {value} in update {index + 1} of {updates}")
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
